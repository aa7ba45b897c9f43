"""DRAEM-style anomaly: a Perlin-noise mask inside the region blended with a foreign texture.

The texture is either a scikit-image texture photograph (brick, grass, gravel ship with the
package) or a patch from elsewhere in the same image, rotated and tile-shuffled so that it no
longer lines up. Blending follows DRAEM: inside the mask, beta * image + (1 - beta) * texture
with beta in [0.2, 0.8); stronger prompts give smaller beta.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from appliance.tools.image_gen.noise import draem_perlin_noise
from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import (LUMA, Canvas, Rendered, irregular_radius,
                                                      smoothstep,
                                                      source_center)

TEXTURES = ("brick", "grass", "gravel")


@lru_cache(maxsize=len(TEXTURES))
def _texture(name: str) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)())


def _library_patch(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    name = TEXTURES[int(rng.integers(len(TEXTURES)))]
    texture = _texture(name)
    side = texture.shape[0]
    # A random zoom so the texture's grain is not always the same size.
    zoom = rng.uniform(0.5, 1.5)
    ph, pw = min(int(height / zoom) + 1, side), min(int(width / zoom) + 1, side)
    y, x = int(rng.integers(0, side - ph + 1)), int(rng.integers(0, side - pw + 1))
    patch = cv2.resize(texture[y:y + ph, x:x + pw], (width, height), interpolation=cv2.INTER_LINEAR)
    return np.repeat(patch[..., None], 3, axis=2).astype(np.float32), name


def _shuffled_patch(canvas: Canvas, height: int, width: int,
                    rng: np.random.Generator) -> np.ndarray:
    sx, sy = source_center(canvas, width / 2.0, height / 2.0, rng)
    full_h, full_w = canvas.foreground.shape
    x0 = int(np.clip(round(sx - width / 2.0), 0, max(full_w - width, 0)))
    y0 = int(np.clip(round(sy - height / 2.0), 0, max(full_h - height, 0)))
    patch = canvas.image[y0:y0 + height, x0:x0 + width].astype(np.float32)
    patch = cv2.resize(patch, (width, height)) if patch.shape[:2] != (height, width) else patch
    patch = np.rot90(patch, 2) if rng.random() < 0.5 else patch[:, ::-1]
    # Shuffle a grid of tiles so the borrowed structure no longer continues the surface.
    # Every tile needs at least a pixel each way.
    tiles = max(1, min(int(rng.integers(2, 4)), height, width))
    ys = np.linspace(0, height, tiles + 1).astype(int)
    xs = np.linspace(0, width, tiles + 1).astype(int)
    cells = [patch[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] for i in range(tiles) for j in range(tiles)]
    order = rng.permutation(len(cells))
    out = np.empty_like(patch)
    for index, target in enumerate(order):
        i, j = divmod(int(target), tiles)
        cell = cells[index]
        th, tw = ys[i + 1] - ys[i], xs[j + 1] - xs[j]
        out[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = cv2.resize(cell, (tw, th))
    return np.ascontiguousarray(out)


def _augment(texture: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One of DRAEM's photometric augmentations, so the texture differs from the surface."""
    op = ("gamma", "multiply", "invert", "autocontrast")[int(rng.integers(4))]
    if op == "gamma":
        texture = 255.0 * (texture / 255.0) ** rng.uniform(0.5, 2.0)
    elif op == "multiply":
        texture = texture * rng.uniform(0.6, 1.5)
    elif op == "invert":
        texture = 255.0 - texture
    else:
        low, high = np.percentile(texture, (2, 98))
        texture = (texture - low) * 255.0 / max(high - low, 1.0)
    return np.clip(texture, 0, 255), op


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    height, width = canvas.shape
    # DRAEM's noise shapes the anomaly; a falloff toward an ellipse around the region keeps it
    # local without cutting the blobs off with a hard elliptic edge.
    theta = float(params.orientation_deg or 0.0)
    a, b = canvas.ellipse_axes(params.elongation, theta)
    radius = canvas.ellipse_radius(a, b, theta)
    inside = radius <= 1.0
    falloff = 2.0 * smoothstep(0.55, 1.0, radius)
    # Scales of 2^0..2^3 cells across the region: finer noise would only make confetti here.
    mask = np.zeros((height, width), dtype=bool)
    for attempt in range(4):
        noise = draem_perlin_noise((height, width), rng, 1, 4, max_side=96)
        threshold = 0.5 - 0.15 * attempt
        # Either sign of the noise is DRAEM noise: try both before lowering the threshold.
        for signed in (noise, -noise):
            mask = (signed - falloff) > threshold
            if mask.sum() >= 0.2 * inside.sum():
                break
        if mask.sum() >= 0.2 * inside.sum():
            break
    if mask.sum() < 0.2 * inside.sum():
        # The noise left nothing usable: an irregular blob instead.
        mask = irregular_radius(canvas, radius, 0.8, a, rng) <= 0.8

    # A patch of a plain, smooth surface would blend in invisibly: use a photo texture there.
    plain = float(canvas.luma()[inside].std()) < 8.0 if inside.any() else True
    use_library = rng.random() < 0.5 or plain
    if use_library:
        texture, source = _library_patch(height, width, rng)
    else:
        # Borrow only as much as the anomaly covers, so the patch stays on the object.
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        texture = canvas.base.copy()
        texture[y0:y1, x0:x1] = _shuffled_patch(canvas, int(y1 - y0), int(x1 - x0), rng)
        source = "same-image"
    texture, op = _augment(texture, rng)
    if canvas.gray:
        texture = np.repeat((texture @ LUMA)[..., None], 3, axis=2)
    elif use_library:
        # A grey photo texture takes the colour of the surface it lands on.
        mean = canvas.base[inside].mean(axis=0)
        texture = texture * (mean / max(float(mean @ LUMA), 1.0))[None, None, :]
    beta = float(np.clip(0.8 - 0.6 * params.severity, 0.2, 0.799))
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0.6)[..., None]
    blended = beta * canvas.base + (1.0 - beta) * texture
    out = canvas.base * (1.0 - alpha) + blended * alpha
    return Rendered(np.clip(out, 0, 255), support=None,
                    details={"texture": source, "augment": op, "beta": round(beta, 3)})
