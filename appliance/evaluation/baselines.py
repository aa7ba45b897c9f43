"""The baselines: the classic zero-shot anomaly synthesis methods, implemented as their papers
describe, and a naive few-shot copy-paste of real defects.

- DRAEM (Zavrtanik et al., ICCV 2021): a Perlin noise mask (scales 2^0..2^5 per axis, rotated,
  thresholded at 0.5) cuts a region out of an *anomaly source* image that went through three
  random photometric/geometric augmentations; it is blended in with opacity
  ``1 - beta``, ``beta ~ U[0, 0.8)``. DRAEM draws its sources from the DTD texture dataset.
  DTD cannot be downloaded on this air-gapped box, so the sources here are the images that
  ship inside the scikit-image wheel (three CC0 textures - brick, grass, gravel - and a dozen
  natural photos), each used through a random crop so a small pool still gives varied content.
- CutPaste (Li et al., CVPR 2021): a rectangle of 2-15 % of the image area with aspect ratio
  in [0.3, 1/0.3] is cut, colour-jittered and pasted at a random place; the mask is the pasted
  box. CutPaste-scar: a thin strip (2-16 x 10-25 px at 256 px) rotated by up to 45 degrees;
  the mask is the strip's footprint.
- Copy-paste (few-shot only, the naive use of real defects): the K real defects per type that
  ``--few-shot K`` hands over are cut out with their masks' bounding boxes; each normal gets one
  of them, flipped at random, pasted at a uniformly random place and alpha-blended through its
  mask feathered by a small Gaussian. No colour matching, scaling or rotation: it measures what
  the real defects are worth when simply copied, the floor a calibrated generator must beat.

The Perlin noise is the project's own (``tools/image_gen/noise.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from appliance.tools.image_gen.noise import draem_perlin_mask

if TYPE_CHECKING:
    from appliance.evaluation.data import LabeledImage

# scikit-image's bundled images that load with no network (the others are fetched at run time).
TEXTURE_SOURCES = ("brick", "grass", "gravel", "camera", "coins", "moon", "astronaut", "coffee",
                   "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                   "cell", "page", "text")


@dataclass
class TrainingSample:
    """One synthetic anomaly with its mask; the same shape as the agent runner's samples."""

    image: np.ndarray  # uint8 RGB
    mask: np.ndarray  # bool
    defect: str
    accepted: bool
    source_index: int  # which of the input normal images it was made from
    verdicts: tuple[bool, ...] = ()  # the judge's verdict per attempt (ours only)


# Told how many more images are done (tqdm's ``update`` is one).
Progress = Callable[[int], object]


def _sample_rng(seed: int, index: int) -> np.random.Generator:
    # One stream per (seed, image): a sample never depends on how many came before it.
    return np.random.default_rng([seed, index])


def _each_image(images: Sequence[np.ndarray], seed: int,
                make: Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray, str]],
                progress: Progress | None) -> list[TrainingSample]:
    """One anomaly per image, ``make(image, rng) -> (image, mask, defect)``; baselines have no
    judge, so every sample is accepted."""
    samples = []
    for index, image in enumerate(images):
        out, mask, defect = make(image, _sample_rng(seed, index))
        samples.append(TrainingSample(out, mask, defect, True, index))
        if progress is not None:
            progress(1)
    return samples


# --- DRAEM -------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def texture_sources() -> tuple[np.ndarray, ...]:
    import skimage.data

    sources = []
    for name in TEXTURE_SOURCES:
        image = np.asarray(getattr(skimage.data, name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        sources.append(np.ascontiguousarray(image[..., :3].astype(np.uint8)))
    return tuple(sources)


def _random_source(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    source = texture_sources()[int(rng.integers(len(TEXTURE_SOURCES)))]
    side = min(source.shape[:2])
    crop = int(side * rng.uniform(0.5, 1.0))
    y = int(rng.integers(0, source.shape[0] - crop + 1))
    x = int(rng.integers(0, source.shape[1] - crop + 1))
    patch = source[y:y + crop, x:x + crop]
    return cv2.resize(patch, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def _pil_op(op: Callable[[Image.Image], Image.Image]) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda image, rng: np.asarray(op(Image.fromarray(image)), dtype=np.uint8)


def _gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gammas = rng.uniform(0.5, 2.0, 3)  # per channel, as DRAEM's GammaContrast(per_channel=True)
    return (255.0 * (image / 255.0) ** gammas).astype(np.uint8)


def _brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ycc = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    ycc[..., 0] = ycc[..., 0] * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
    return cv2.cvtColor(np.clip(ycc, 0, 255).astype(np.uint8), cv2.COLOR_YCrCb2RGB)


def _sharpness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(image)).enhance(rng.uniform(0.0, 2.0)))


def _hue_saturation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
    hue_shift, sat_shift = rng.uniform(-50, 50, 2)
    hsv[..., 0] = np.mod(hsv[..., 0] + hue_shift * 180.0 / 255.0, 180.0)
    hsv[..., 1] = np.clip(hsv[..., 1] + sat_shift, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        return image
    return np.asarray(ImageOps.solarize(Image.fromarray(image), int(rng.integers(32, 129))))


def _posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.posterize(Image.fromarray(image), int(rng.integers(1, 9))))


def _autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.autocontrast(Image.fromarray(image), cutoff=float(rng.uniform(0, 20))))


def _rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), float(rng.uniform(-45, 45)), 1.0)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# DRAEM's ten source augmentations (its imgaug list), three of them drawn per sample.
DRAEM_AUGMENTATIONS = (
    _gamma, _brightness, _sharpness, _hue_saturation, _solarize, _posterize,
    _pil_op(ImageOps.invert), _autocontrast, _pil_op(ImageOps.equalize), _rotate,
)


def draem_anomaly(image: np.ndarray, rng: np.random.Generator, max_tries: int = 20
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One DRAEM synthetic anomaly: (image, mask). The noise is redrawn until the mask is
    non-empty (DRAEM would return the normal image instead; here every sample is an anomaly)."""
    shape = image.shape[:2]
    for _ in range(max_tries):
        mask = draem_perlin_mask(shape, rng)
        if mask.any():
            break
    source = _random_source(shape, rng)
    for index in rng.choice(len(DRAEM_AUGMENTATIONS), 3, replace=False):
        source = DRAEM_AUGMENTATIONS[int(index)](source, rng)
    beta = rng.uniform(0.0, 0.8)
    m = mask[..., None].astype(np.float32)
    base = image.astype(np.float32)
    blended = base * (1.0 - m) + (1.0 - beta) * source.astype(np.float32) * m + beta * base * m
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8), mask


class DraemGenerator:
    name = "draem"

    def generate(self, images: Sequence[np.ndarray], seed: int,
                 progress: Progress | None = None) -> list[TrainingSample]:
        return _each_image(images, seed, lambda image, rng: (*draem_anomaly(image, rng), "perlin"),
                           progress)


# --- CutPaste ----------------------------------------------------------------------------------


def color_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter of +-10 %, in random order (the
    CutPaste paper's ColorJitter(0.1, 0.1, 0.1, 0.1))."""
    pil = Image.fromarray(patch)
    ops = ["brightness", "contrast", "saturation", "hue"]
    for op in rng.permutation(ops):
        if op == "hue":
            hsv = np.asarray(pil.convert("HSV")).copy()
            shift = int(round(rng.uniform(-strength, strength) * 255))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
            pil = Image.fromarray(hsv, mode="HSV").convert("RGB")
            continue
        enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                    "saturation": ImageEnhance.Color}[op]
        pil = enhancer(pil).enhance(rng.uniform(1 - strength, 1 + strength))
    return np.asarray(pil, dtype=np.uint8)


def cutpaste_patch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    area = rng.uniform(0.02, 0.15) * height * width
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
    cut_w = int(np.clip(round(np.sqrt(area * aspect)), 1, width - 1))
    cut_h = int(np.clip(round(np.sqrt(area / aspect)), 1, height - 1))
    fy, fx = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
    patch = color_jitter(image[fy:fy + cut_h, fx:fx + cut_w], rng)
    ty, tx = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
    out = image.copy()
    out[ty:ty + cut_h, tx:tx + cut_w] = patch
    mask = np.zeros((height, width), dtype=bool)
    mask[ty:ty + cut_h, tx:tx + cut_w] = True
    return out, mask


def cutpaste_scar(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    scale = min(height, width) / 256.0  # the paper's pixel ranges are for 256 px images
    cut_w = max(1, int(round(rng.uniform(2, 16) * scale)))
    cut_h = max(2, int(round(rng.uniform(10, 25) * scale)))
    cut_w, cut_h = min(cut_w, width - 1), min(cut_h, height - 1)
    fy, fx = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
    patch = Image.fromarray(color_jitter(image[fy:fy + cut_h, fx:fx + cut_w], rng))
    angle = float(rng.uniform(-45, 45))
    rotated = patch.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    alpha = Image.new("L", patch.size, 255).rotate(angle, resample=Image.Resampling.BILINEAR,
                                                   expand=True)
    alpha_np = np.asarray(alpha) >= 128
    ph, pw = alpha_np.shape
    ty, tx = int(rng.integers(0, height - ph + 1)), int(rng.integers(0, width - pw + 1))
    out = image.copy()
    region = out[ty:ty + ph, tx:tx + pw]
    region[alpha_np] = np.asarray(rotated, dtype=np.uint8)[alpha_np]
    mask = np.zeros((height, width), dtype=bool)
    mask[ty:ty + ph, tx:tx + pw] = alpha_np
    return out, mask


class CutPasteGenerator:
    """``variant``: "patch", "scar", or "mixed" (half of each, as CutPaste's 3-way training)."""

    def __init__(self, variant: str = "mixed") -> None:
        if variant not in ("patch", "scar", "mixed"):
            raise ValueError(f"unknown CutPaste variant {variant!r}")
        self.variant = variant
        self.name = "cutpaste" if variant == "mixed" else f"cutpaste-{variant}"

    def generate(self, images: Sequence[np.ndarray], seed: int,
                 progress: Progress | None = None) -> list[TrainingSample]:
        def make(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
            kind = self.variant if self.variant != "mixed" else ("patch", "scar")[int(rng.integers(2))]
            return (*(cutpaste_patch if kind == "patch" else cutpaste_scar)(image, rng), kind)

        return _each_image(images, seed, make, progress)


# --- Copy-paste of real defects (few-shot) -------------------------------------------------------

FEATHER_SIGMA = 0.7  # px: softens the pasted edge without fading one-pixel-wide cracks much


@dataclass
class DefectCut:
    """A real defect cut out of its photo by its mask's bounding box."""

    pixels: np.ndarray  # uint8 RGB, the box
    mask: np.ndarray  # bool, the defect inside the box
    defect: str


def cut_defect(image: np.ndarray, mask: np.ndarray, defect: str) -> DefectCut:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("an empty mask has no defect to cut out")
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return DefectCut(image[box].copy(), mask[box].copy(), defect)


def copypaste_anomaly(image: np.ndarray, cut: DefectCut, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``cut`` pasted onto ``image`` at a uniformly random place: (image, mask)."""
    pixels, shape = cut.pixels, cut.mask
    if rng.random() < 0.5:
        pixels, shape = pixels[:, ::-1], shape[:, ::-1]
    if rng.random() < 0.5:
        pixels, shape = pixels[::-1], shape[::-1]
    height, width = image.shape[:2]
    cut_h, cut_w = shape.shape
    if cut_h > height or cut_w > width:
        raise ValueError(f"a {cut_w}x{cut_h} defect does not fit a {width}x{height} image")
    ty, tx = int(rng.integers(0, height - cut_h + 1)), int(rng.integers(0, width - cut_w + 1))
    # Feathered inwards only (zero border, then cut to the mask): the label must cover every
    # pixel that changed, or the detector is taught that a changed pixel is normal.
    alpha = cv2.GaussianBlur(shape.astype(np.float32), (0, 0), FEATHER_SIGMA,
                             borderType=cv2.BORDER_CONSTANT) * shape
    alpha = alpha[..., None]
    out = image.copy()
    region = out[ty:ty + cut_h, tx:tx + cut_w].astype(np.float32)
    blended = region * (1.0 - alpha) + pixels.astype(np.float32) * alpha
    out[ty:ty + cut_h, tx:tx + cut_w] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[ty:ty + cut_h, tx:tx + cut_w] = shape
    return out, mask


class CopyPasteGenerator:
    """Pastes the few-shot real defects (``shots``), one per normal, picked at random."""

    name = "copypaste"

    def __init__(self, shots: Sequence["LabeledImage"]) -> None:
        self.cuts = [cut_defect(s.image, s.mask, s.defect) for s in shots if s.mask.any()]
        if not self.cuts:
            raise ValueError("copypaste pastes real defects and was given none with a non-empty "
                             "mask: run with --few-shot K (K >= 1), on defect types with at "
                             "least two photos each (one always stays for testing) whose masks "
                             "survive the resize to --size")

    def generate(self, images: Sequence[np.ndarray], seed: int,
                 progress: Progress | None = None) -> list[TrainingSample]:
        def make(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
            cut = self.cuts[int(rng.integers(len(self.cuts)))]
            return (*copypaste_anomaly(image, cut, rng), cut.defect)

        return _each_image(images, seed, make, progress)
