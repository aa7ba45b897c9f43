"""Real evaluation data: normal photos, real defect photos with masks, and the normal split.

Two layouts are read:

- a folder of normal images plus a folder of defect classes, one sub-folder per class, each
  image with its mask beside it. The magnetic tile dataset looks like this
  (``MT_Crack/Imgs/NAME.jpg`` with ``NAME.png``); ``NAME_mask.png`` beside the image works too.
- an MVTec-AD category folder: ``train/good``, ``test/good``, ``test/<defect>/NNN.png`` and
  ``ground_truth/<defect>/NNN_mask.png``.

Everything is resized to one square size, which is the resolution the UNet trains and is
scored at. Soft masks are thresholded at 128 after resizing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from appliance.imaging import IMAGE_SUFFIXES, load_rgb
from appliance.names import normalize_name

MASK_THRESHOLD = 128
GOOD = "good"


@dataclass
class LabeledImage:
    image: np.ndarray  # uint8 RGB (size, size, 3)
    mask: np.ndarray  # bool (size, size); all False for a normal image
    defect: str  # GOOD for a normal image
    source: str  # the file it came from, for the report


@dataclass
class EvalData:
    """What one evaluation run needs: train normals for synthesis, a held-out test set."""

    category: str
    train_normals: list[LabeledImage]
    test_normals: list[LabeledImage]
    test_defects: list[LabeledImage]
    train_pool_size: int  # normals available for training before --train-size picked from them

    @property
    def defect_classes(self) -> list[str]:
        return sorted({item.defect for item in self.test_defects})

    @property
    def test_set(self) -> list[LabeledImage]:
        return self.test_normals + self.test_defects


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    pil = Image.fromarray(image, mode="RGB").resize((size, size), Image.Resampling.BILINEAR,
                                                    reducing_gap=None)
    return np.asarray(pil, dtype=np.uint8)


def load_mask(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as pil:
        grey = pil.convert("L").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(grey) >= MASK_THRESHOLD


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _is_mask_file(path: Path) -> bool:
    """A mask, not a photo: ``*_mask.*``, or a PNG beside a photo of the same stem (MT layout)."""
    if path.stem.endswith("_mask"):
        return True
    if path.suffix.lower() != ".png":
        return False
    return any(path.with_suffix(s).exists() for s in IMAGE_SUFFIXES if s != ".png")


def find_images(folder: Path) -> list[Path]:
    """Photos under ``folder`` (recursively), masks excluded, in a fixed sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    return sorted((p for p in folder.rglob("*") if _is_image(p) and not _is_mask_file(p)),
                  key=lambda p: p.relative_to(folder).as_posix())


def mask_path_for(image: Path) -> Path | None:
    """The mask beside a photo: ``NAME.png`` next to a non-PNG photo, or ``NAME_mask.png``."""
    candidates = [image.with_name(f"{image.stem}_mask.png")]
    if image.suffix.lower() != ".png":
        candidates.insert(0, image.with_suffix(".png"))
    return next((c for c in candidates if c.exists()), None)


def _is_single_class(root: Path) -> bool:
    """``--defects MT_Crack`` (photos directly inside, or in ``Imgs``/``images``) is one class."""
    direct = [p for p in root.iterdir() if _is_image(p) and not _is_mask_file(p)]
    holders = [d for d in root.iterdir() if d.is_dir() and d.name.lower() in ("imgs", "images")]
    return bool(direct) or bool(holders)


def defect_class_name(folder_name: str) -> str:
    """``MT_Crack`` -> ``crack``; MVTec names pass through normalized."""
    name = folder_name[3:] if folder_name.upper().startswith("MT_") else folder_name
    return normalize_name(name)


def load_normals(paths: Sequence[Path], size: int) -> list[LabeledImage]:
    empty = np.zeros((size, size), dtype=bool)
    return [LabeledImage(resize_image(load_rgb(p), size), empty.copy(), GOOD, str(p)) for p in paths]


def load_defect_folder(root: Path, size: int, exclude: Sequence[Path] = ()) -> list[LabeledImage]:
    """Every sub-folder of ``root`` is one defect class; every photo needs a mask beside it.

    ``exclude`` names folders to skip (the normal folder, when it sits among the classes).
    """
    root = Path(root)
    skipped = {Path(e).resolve() for e in exclude}
    if _is_single_class(root):
        classes = [root]
    else:
        classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items: list[LabeledImage] = []
    for folder in classes:
        if folder.resolve() in skipped or any(folder.resolve() in s.parents for s in skipped):
            continue
        defect = defect_class_name(folder.name)
        if defect in (GOOD, "free"):
            continue
        for path in find_images(folder):
            mask_path = mask_path_for(path)
            if mask_path is None:
                raise FileNotFoundError(f"defect image without a mask beside it: {path}")
            items.append(LabeledImage(resize_image(load_rgb(path), size), load_mask(mask_path, size),
                                      defect, str(path)))
    if not items:
        raise FileNotFoundError(f"no defect images with masks under {root}")
    return items


def split_normals(paths: Sequence[Path], seed: int, test_fraction: float = 0.2
                  ) -> tuple[list[Path], list[Path]]:
    """Deterministic (train, test) split of normal images.

    The order on disk never matters: paths are sorted first, then permuted by ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be between 0 and 1")
    ordered = sorted(Path(p) for p in paths)
    if len(ordered) < 2:
        raise ValueError("need at least two normal images to split them")
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_test = min(max(1, round(len(ordered) * test_fraction)), len(ordered) - 1)
    test = sorted(ordered[i] for i in order[:n_test])
    train = [ordered[i] for i in order[n_test:]]  # kept in permuted order: --train-size takes a prefix
    return train, test


def load_folders(normal_dir: Path, defects_dir: Path, size: int, seed: int, train_size: int,
                 category: str, test_fraction: float = 0.2) -> EvalData:
    """The normal-folder + defect-folder layout (magnetic tile)."""
    train_paths, test_paths = split_normals(find_images(normal_dir), seed, test_fraction)
    return EvalData(
        category=category,
        train_normals=load_normals(train_paths[:train_size], size),
        test_normals=load_normals(test_paths, size),
        test_defects=load_defect_folder(defects_dir, size, exclude=[normal_dir]),
        train_pool_size=len(train_paths),
    )


def load_mvtec_category(category_dir: Path, size: int, seed: int, train_size: int,
                        category: str | None = None) -> EvalData:
    """An MVTec-AD category: its own train/test split of normals is kept (the standard protocol);
    ``seed`` only decides which ``train_size`` of the train normals are used."""
    root = Path(category_dir)
    train_paths = find_images(root / "train" / "good")
    order = np.random.default_rng(seed).permutation(len(train_paths))
    chosen = [train_paths[i] for i in order[:train_size]]
    test_good = find_images(root / "test" / "good") if (root / "test" / "good").is_dir() else []
    defects: list[LabeledImage] = []
    for folder in sorted(d for d in (root / "test").iterdir() if d.is_dir() and d.name != GOOD):
        for path in find_images(folder):
            mask_path = root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
            if not mask_path.exists():
                raise FileNotFoundError(f"no mask {mask_path} for {path}")
            defects.append(LabeledImage(resize_image(load_rgb(path), size), load_mask(mask_path, size),
                                        normalize_name(folder.name), str(path)))
    if not test_good:
        raise FileNotFoundError(f"{root}/test/good is empty: image-level metrics need normals")
    return EvalData(category=category or normalize_name(root.name),
                    train_normals=load_normals(chosen, size),
                    test_normals=load_normals(test_good, size),
                    test_defects=defects, train_pool_size=len(train_paths))
