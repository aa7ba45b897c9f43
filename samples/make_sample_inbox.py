"""Regenerates samples/inbox/: the small inbox the README's first command runs on.

Sources, all redistributable: scikit-image's bundled brick and gravel textures (CC0) and its
coins photo (public domain), plus washers rendered here from scratch (ours).
Run: python samples/make_sample_inbox.py
"""

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

ROOT = Path(__file__).resolve().parent / "inbox"


def save(category: str, name: str, array: np.ndarray) -> None:
    folder = ROOT / category
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / f"{name}.png", optimize=True)


def crops(image: np.ndarray, size: int) -> list[np.ndarray]:
    h, w = image.shape[:2]
    return [image[y:y + size, x:x + size] for y in range(0, h - size + 1, size)
            for x in range(0, w - size + 1, size)]


def washer(seed: int, size: int = 256) -> np.ndarray:
    """A brushed steel washer on a dark rubber mat, lit from the top left."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.uniform(-12, 12), size / 2 + rng.uniform(-12, 12)
    r = np.hypot(xx - cx, yy - cy)
    outer, inner = rng.uniform(88, 104), rng.uniform(34, 44)
    ring = np.clip(outer - r, 0, 1) * np.clip(r - inner, 0, 1)
    angle = np.arctan2(yy - cy, xx - cx)
    brushed = 0.06 * np.sin(angle * 180 + rng.uniform(0, 6)) + rng.normal(0, 0.025, (size, size))
    light = 0.62 + 0.18 * np.cos(angle + np.pi * 0.75) + 0.05 * (r - inner) / (outer - inner)
    metal = np.clip(light + brushed, 0, 1)
    mat = 0.13 + rng.normal(0, 0.015, (size, size))
    gray = ring * metal + (1 - ring) * mat
    rgb = np.stack([gray * 0.98, gray, gray * 1.03], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def main() -> None:
    for i, tile in enumerate(crops(data.brick(), 256)):
        save("brick", f"brick_{i}", tile)
    for i, tile in enumerate(crops(data.gravel(), 256)):
        save("gravel", f"gravel_{i}", tile)
    coins = data.coins()
    for i, (y, x) in enumerate([(0, 0), (0, 150), (150, 0), (150, 150)]):
        save("coin", f"coins_{i}", coins[y:y + 150, x:x + 150])
    for i in range(4):
        save("washer", f"washer_{i}", washer(seed=i))
    (ROOT / "washer" / "spec.toml").write_text(
        "# Washers are not in the knowledge base: name the material and the defects wanted.\n"
        'material = "metal"\ndefects = ["scratch", "dent", "stain", "missing"]\nper_image = 1\n')


if __name__ == "__main__":
    main()
