"""Real evaluation data: normal photos, real defect photos with masks, and the normal split.

Two layouts are read:

- a folder of normal images plus a folder of defect classes, one sub-folder per class, each
  image with its mask beside it. The magnetic tile dataset looks like this
  (``MT_Crack/Imgs/NAME.jpg`` with ``NAME.png``); ``NAME_mask.png`` beside the image works too.
- an MVTec-AD category folder: ``train/good``, ``test/good``, ``test/<defect>/NNN.png`` and
  ``ground_truth/<defect>/NNN_mask.png``.

Everything is resized to one square size, which is the resolution the UNet trains and is
scored at. Soft masks are thresholded at 128 after resizing.

A plant often has defect photos sorted by type but never outlined. With ``image_labels`` (asked
for, never assumed: a mask saved under another name must not quietly turn a type into one
without masks) a defect class none of whose photos has a mask is read with image-level labels
only: it counts in the image metrics and is left out of the pixel metrics
(``LabeledImage.pixel_labels``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
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
    # False: a defect photo known to be defective but without a mask; its all-False mask is no
    # pixel label and it is left out of the pixel metrics. A normal image's empty mask is a label.
    pixel_labels: bool = True


@dataclass
class EvalData:
    """What one evaluation run needs: train normals for synthesis, a held-out test set."""

    category: str
    train_normals: list[LabeledImage]
    test_normals: list[LabeledImage]
    test_defects: list[LabeledImage]
    train_pool_size: int  # normals available for training before --train-size picked from them
    # Real defects handed to the generators that can learn from them (--few-shot); never tested on.
    shots: list[LabeledImage] = field(default_factory=list)

    @property
    def defect_classes(self) -> list[str]:
        return sorted({item.defect for item in self.test_defects})

    @property
    def test_set(self) -> list[LabeledImage]:
        return self.test_normals + self.test_defects

    @property
    def image_level_classes(self) -> list[str]:
        """Defect classes tested with image-level labels only (no masks)."""
        return sorted({it.defect for it in self.test_defects if not it.pixel_labels})


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    pil = Image.fromarray(image, mode="RGB").resize((size, size), Image.Resampling.BILINEAR,
                                                    reducing_gap=None)
    return np.asarray(pil, dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask (bool, or grey 0-255 as a soft mask file holds) brought to ``size``: resampled as
    grey and cut at ``MASK_THRESHOLD`` (a line thinner than the scale factor can vanish)."""
    grey = mask.astype(np.uint8) * 255 if mask.dtype == bool else mask.astype(np.uint8)
    if grey.shape[:2] != (size, size):
        grey = np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR))
    return grey >= MASK_THRESHOLD


def load_mask(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as pil:
        return resize_mask(np.asarray(pil.convert("L")), size)


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


@dataclass
class Skipped:
    """A file a lenient read left out, and why (for the report)."""

    path: str
    reason: str


def is_mvtec_category(root: Path) -> bool:
    """An MVTec-AD category folder: ``test/<defect>/`` beside ``ground_truth/<defect>/``."""
    return (Path(root) / "test").is_dir() and (Path(root) / "ground_truth").is_dir()


def _labeled_defect(path: Path, mask_path: Path | None, defect: str, size: int,
                    skipped: list[Skipped] | None, nonempty: bool,
                    image_level: bool = False) -> LabeledImage | None:
    """One photo with its mask, or with ``image_level`` without one (a defective photo with no
    pixel labels); a problem raises, or is listed in ``skipped`` when one is given."""
    problem = None
    if image_level:
        mask_path = None
    elif mask_path is None or not mask_path.is_file():
        problem = (f"without a mask: {mask_path.name} is missing" if mask_path else
                   "without a mask beside it (NAME.png next to NAME.jpg, or NAME_mask.png)")
    if problem is None:
        try:
            image = resize_image(load_rgb(path), size)
            mask = (load_mask(mask_path, size) if mask_path is not None
                    else np.zeros((size, size), dtype=bool))
        except (OSError, ValueError) as exc:  # unreadable, truncated, not an image, too large
            problem = f"unreadable ({type(exc).__name__}: {exc})"
        else:
            if nonempty and not mask.any():
                problem = f"its mask {mask_path.name} is empty" if mask_path else "it has no mask"
            else:
                return LabeledImage(image, mask, defect, str(path),
                                    pixel_labels=mask_path is not None)
    if skipped is None:
        raise FileNotFoundError(f"defect image {path}: {problem}")
    skipped.append(Skipped(str(path), problem))
    return None


def load_defect_folder(root: Path, size: int, exclude: Sequence[Path] = (),
                       skipped: list[Skipped] | None = None, nonempty: bool = False,
                       image_labels: bool = False) -> list[LabeledImage]:
    """Real defect photos with their masks, in either layout: one sub-folder per defect class
    with each mask beside its photo, or an MVTec-AD category folder (``test/<defect>`` and
    ``ground_truth/<defect>/NAME_mask.png``). ``appliance eval`` and ``appliance retrain`` read
    defects through this one function.

    ``exclude`` names folders to skip (the normal folder, when it sits among the classes). A photo
    without a usable mask raises, unless ``skipped`` is given: then it is left out and listed
    there with the reason. ``nonempty`` refuses masks without a defect pixel (an image-level
    label is enough for evaluation, not for a trajectory that goes to the real mask).
    ``image_labels``: a class where no photo has a mask is read with image-level labels only
    (``pixel_labels=False``); a class where some photos have masks still needs them all.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    skip_dirs = {Path(e).resolve() for e in exclude}
    if is_mvtec_category(root):
        classes = [(d, lambda p, d=d: root / "ground_truth" / d.name / f"{p.stem}_mask.png")
                   for d in sorted((root / "test").iterdir()) if d.is_dir() and d.name != GOOD]
    elif _is_single_class(root):
        classes = [(root, mask_path_for)]
    else:
        classes = [(d, mask_path_for) for d in sorted(root.iterdir())
                   if d.is_dir() and not d.name.startswith(".")]
    items: list[LabeledImage] = []
    for folder, mask_of in classes:
        if folder.resolve() in skip_dirs or any(folder.resolve() in s.parents for s in skip_dirs):
            continue
        defect = defect_class_name(folder.name)
        if defect in (GOOD, "free"):
            continue
        paths = find_images(folder)
        image_level = False
        if paths and not any((m := mask_of(p)) is not None and m.is_file() for p in paths):
            if not image_labels and skipped is None:
                raise FileNotFoundError(
                    f"{folder}: none of its {len(paths)} defect photos has a mask (NAME.png next "
                    "to NAME.jpg, NAME_mask.png, or ground_truth/<defect>/NAME_mask.png in an "
                    "MVTec-AD folder); appliance eval --image-labels tests such a type on "
                    "image-level labels only")
            image_level = image_labels
        for path in paths:
            item = _labeled_defect(path, mask_of(path), defect, size, skipped, nonempty,
                                   image_level)
            if item is not None:
                items.append(item)
    if not items:
        raise FileNotFoundError(
            f"no defect photos{'' if image_labels else ' with masks'} under {root}: expected one "
            "folder per defect type with "
            "each photo's mask beside it (NAME.png next to NAME.jpg, or NAME_mask.png), or an "
            "MVTec-AD category folder (test/<defect>/, ground_truth/<defect>/NAME_mask.png)")
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


def take_shots(defects: Sequence[LabeledImage], k: int, seed: int
               ) -> tuple[list[LabeledImage], list[LabeledImage]]:
    """(shots, test): ``k`` real defects of every type for the generators, the rest for testing.

    Every type keeps at least one test image, so a type with ``n <= k`` images gives ``n - 1``.
    Deterministic for a seed: files are sorted first so the listing order never matters, and
    each type draws from its own stream so one type's image count never moves another's draw.
    """
    if k < 0:
        raise ValueError("the number of shots per defect type cannot be negative")
    unmasked = sorted({it.defect for it in defects if not it.pixel_labels})
    if k and unmasked:
        raise ValueError(f"--few-shot calibrates on the shots' masks, and these defect types have "
                         f"none: {', '.join(unmasked)}; run zero-shot, or give their photos masks")
    by_type: dict[str, list[LabeledImage]] = {}
    for item in sorted(defects, key=lambda it: it.source):
        by_type.setdefault(item.defect, []).append(item)
    shots: list[LabeledImage] = []
    for defect in sorted(by_type):
        items = by_type[defect]
        rng = np.random.default_rng([seed, zlib.crc32(defect.encode())])
        picked = rng.choice(len(items), min(k, len(items) - 1), replace=False)
        shots += [items[i] for i in sorted(picked)]
    taken = {id(s) for s in shots}
    return shots, [it for it in defects if id(it) not in taken]


def load_folders(normal_dir: Path, defects_dir: Path, size: int, seed: int, train_size: int,
                 category: str, test_fraction: float = 0.2, few_shot: int = 0,
                 image_labels: bool = False) -> EvalData:
    """The normal-folder + defect-folder layout (magnetic tile). ``few_shot``: see
    ``take_shots``; ``image_labels``: see ``load_defect_folder``."""
    train_paths, test_paths = split_normals(find_images(normal_dir), seed, test_fraction)
    shots, test_defects = take_shots(load_defect_folder(defects_dir, size, exclude=[normal_dir],
                                                        image_labels=image_labels), few_shot, seed)
    return EvalData(
        category=category,
        train_normals=load_normals(train_paths[:train_size], size),
        test_normals=load_normals(test_paths, size),
        test_defects=test_defects,
        train_pool_size=len(train_paths),
        shots=shots,
    )


def load_mvtec_category(category_dir: Path, size: int, seed: int, train_size: int,
                        category: str | None = None, few_shot: int = 0,
                        image_labels: bool = False) -> EvalData:
    """An MVTec-AD category: its own train/test split of normals is kept (the standard protocol);
    ``seed`` only decides which ``train_size`` of the train normals are used (and, with
    ``few_shot``, which real defects become shots: see ``take_shots``)."""
    root = Path(category_dir)
    train_paths = find_images(root / "train" / "good")
    order = np.random.default_rng(seed).permutation(len(train_paths))
    chosen = [train_paths[i] for i in order[:train_size]]
    test_good = find_images(root / "test" / "good") if (root / "test" / "good").is_dir() else []
    shots, test_defects = take_shots(load_defect_folder(root, size, image_labels=image_labels),
                                     few_shot, seed)
    if not test_good:
        raise FileNotFoundError(f"{root}/test/good is empty: image-level metrics need normals")
    return EvalData(category=category or normalize_name(root.name),
                    train_normals=load_normals(chosen, size),
                    test_normals=load_normals(test_good, size),
                    test_defects=test_defects, train_pool_size=len(train_paths), shots=shots)
