"""Reading, writing and comparing images: the one place that touches pixels on disk.

Inside the appliance an image is a ``uint8`` RGB array (H, W, 3) and a mask a ``bool`` array
(H, W). Grayscale sources are expanded to three equal channels and written back as grayscale.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Pillow's own bomb guard is a warning below 2x this; we refuse explicitly above it.
MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# A pixel counts as changed when any channel moved by more than this many grey levels. It is
# the definition shared by the mask tool, the judge and the tests.
CHANGE_THRESHOLD = 8
# A defect whose ``change_peak`` is below this many grey levels is not seen as one: the judge
# refuses it as too faint, and a renderer's faintest defect stays above it.
VISIBLE_PEAK = 14.0


class ImageReadError(ValueError):
    """The file is not a usable image; the message says why, for the quarantine note."""


def read_plain_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of an input file that is a plain file of at most ``max_bytes``: never follows a
    symbolic link, never blocks on a pipe swapped in after a check. ImageReadError otherwise;
    PermissionError passes through (the caller decides whether the file may still change)."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise ImageReadError(f"{kind}; copy the file itself instead")
    if info.st_size > max_bytes:
        raise ImageReadError(f"file is {info.st_size / 1e6:.1f} MB, above the limit of "
                             f"{max_bytes / 1e6:g} MB")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ImageReadError("not a regular file")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageReadError(f"file grew above the limit of {max_bytes / 1e6:g} MB while read")
    return data


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_rgb(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Load any common image file as uint8 RGB, honouring EXIF orientation."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise ImageReadError(
                    f"{image.width}x{image.height} pixels is above the limit of {max_pixels}")
            image = ImageOps.exif_transpose(image)
            return to_rgb_array(image)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image: {exc}") from exc


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode to uint8 RGB: 16-bit scaled down, alpha composited on black, palette expanded."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-9)
        gray = ((array - array.min()) / span * 255.0 + 0.5).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def is_grayscale(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[..., 0], image[..., 1])
                and np.array_equal(image[..., 1], image[..., 2]))


def to_pil(image: np.ndarray, grayscale: bool | None = None) -> Image.Image:
    """An RGB array as a PIL image; grayscale content becomes mode L."""
    if grayscale is None:
        grayscale = is_grayscale(image)
    if grayscale:
        return Image.fromarray(np.ascontiguousarray(image[..., 0]), mode="L")
    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")


def mask_to_pil(mask: np.ndarray) -> Image.Image:
    """A bool mask as the 8-bit 0/255 image anomalib reads."""
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# zlib levels, measured on 256 px photos (2 cores): the default 6 takes 14.8 ms, level 3 6.2 ms
# for the same size (43 kB), level 1 4.4 ms for 17 % more. The dataset's own images, kept for
# good, get 3; working copies (trajectory images, contact-sheet thumbnails) get 1.
DATASET_PNG_LEVEL = 3
WORKING_PNG_LEVEL = 1


def png_bytes(image: Image.Image, level: int = DATASET_PNG_LEVEL) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def save_png_atomic(path: Path, image: Image.Image, level: int = DATASET_PNG_LEVEL) -> None:
    write_atomic(path, png_bytes(image, level))


def link_atomic(source: Path, path: Path) -> bool:
    """``path`` as a second name of the file ``source`` (a hard link, made under a temporary
    name and renamed, so atomic like ``write_atomic``); False where the file system has no hard
    links, and the caller writes the bytes instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(source, tmp)
    except OSError:
        return False
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return True


def change_peak(change: np.ndarray, where: np.ndarray) -> float:
    """How strongly a defect stands out: the 90th percentile of its change (a ``change_map``)
    over its pixels ``where``, 0 where there are none. The judge, the priors from real defects
    and the renderers all measure it so."""
    values = change[where]
    return float(np.percentile(values, 90)) if values.size else 0.0


def change_map(normal: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """Per-pixel largest absolute channel difference, uint8 (H, W).

    cv2.absdiff is exact for uint8, and a pairwise maximum beats a numpy reduction over a
    length-3 axis by about 20x: this runs on every judge and mask call.
    """
    if normal.shape != edited.shape:
        raise ValueError(f"shape mismatch: {normal.shape} vs {edited.shape}")
    import cv2

    diff = cv2.absdiff(np.ascontiguousarray(normal), np.ascontiguousarray(edited))
    if diff.ndim == 2:
        return diff
    return np.maximum(np.maximum(diff[..., 0], diff[..., 1]), diff[..., 2])


def changed_pixels(normal: np.ndarray, edited: np.ndarray,
                   threshold: int = CHANGE_THRESHOLD) -> np.ndarray:
    """Bool (H, W): where the edit visibly changed the image."""
    return change_map(normal, edited) > threshold


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)
