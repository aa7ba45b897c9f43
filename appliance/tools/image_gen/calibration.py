"""A category's calibration: what the plant's real defects look like, measured once.

Built by ``appliance retrain`` on a CPU engine from the plant's real defect photos and masks,
a profile holds, per defect type:

- **priors** measured on the real masks and pixels: the size of each defect (its major extent
  against the part's extent, the unit ``EditParams.size`` uses), its area against the part,
  how elongated it is, how many there are per photo, how strongly it stands out from its own
  surroundings (the change a judge would measure) and whether it is darker or brighter;
- a **bank** of the real defects cut out with their masks, which ``transplant`` carries onto
  normal photos.

A defect's look (contrast, polarity, its bank crop) is measured against the surface *under*
it, estimated from the pixels around it. That estimate holds near the defect's rim only: inside
a wide patch (a fray or an unevenness over a third of the tile) it is a smear without the
surface's grain, and the "defect" measured against it is the surface itself, its grain and its
printing. A real defect counts only whole, its size with its look: one that reaches further
than ``MAX_REACH_SHARE`` of the photo from its rim is counted in ``unmeasured`` and adds nothing
else, and a type with no other defect is left to the knowledge base's defaults. (Drawing such a
type's real sizes with the renderers' guessed look made wide regions unlike any real defect: on
the magnetic tiles, 5-shot, a detector trained on them learned less than with no calibration.)

The procedural renderer reads a prompt's size words relative to the knowledge base's usual size
for the type (the usual words give the plant's median; "larger" moves up the plant's own sizes,
"smaller" down) and the judge checks sizes and contrasts against the same figures, so "large",
"small" or "faint" mean what they mean on this plant.

On disk (``save``/``load``)::

    profile.json                  category, format version, priors, bank index
    bank/<defect>/<n>.png         a real defect with a margin of its surroundings
    bank/<defect>/<n>_mask.png    its mask, the same size
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from appliance.imaging import (CHANGE_THRESHOLD, change_map, change_peak, load_rgb, png_bytes,
                               write_atomic)
from appliance.names import Name, path_under
from appliance.tools.image_gen.placement import distance_inside, foreground_bbox, object_extent
from appliance.tools.image_gen.prompt_params import EditParams, parse_prompt
from appliance.tools.object_map import ObjectMap, find_object

PROFILE_FILE = "profile.json"
FORMAT_VERSION = 1
# Pieces of a mask closer than this share of the photo's side are one defect: a crack with a
# break in it is one crack, not two (8 px at 256 px).
JOIN_SHARE = 0.03
MIN_PIECE_PX = 8
CROP_MARGIN_PX = 6
# A real defect with less of its mask than this on the part found means the finder was fooled.
MIN_MASK_ON_PART = 0.5
# How far inside a defect (share of the photo's shorter side; 8 px at 256 px) the surface under
# it can be estimated from its rim (see the module's docstring).
MAX_REACH_SHARE = 0.03
# The size scale of the prompt words (``prompt_params._SIZE_WORDS``: tiny 0.02 ... very large
# 0.70), read as a rank from 0 to 1 on a log axis.
WORD_SIZE_RANGE = (0.02, 0.70)
# How far a profile's real defects are trusted over the uncalibrated engine: a profile of n
# defects decides n / (n + PRIOR_WEIGHT) of each attribute's draws, the knowledge base's defaults
# the rest. This is the predictive rule of a Dirichlet process whose base is the zero-shot engine
# and whose weight is worth PRIOR_WEIGHT real defects: five shots move the engine half way, a
# hundred nearly all the way, and a few photos cannot pin every defect to where those few lay.
PRIOR_WEIGHT = 5.0
# A rendered defect's contrast is matched to the plant's when it is off by more than this
# factor; the scale is kept within CONTRAST_SCALE so a renderer's shading keeps its shape.
CONTRAST_SLACK = 1.15
CONTRAST_SCALE = (0.3, 3.0)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class BankCrop:
    """One real defect: its pixels with a margin of surroundings, and its mask."""

    image: np.ndarray  # uint8 RGB (h, w, 3)
    mask: np.ndarray  # bool (h, w)
    source: str  # the photo it was cut from

    @property
    def major_px(self) -> float:
        return major_axis(self.mask)


@dataclass
class DefectPriors:
    """Per-defect-type measurements of the real defects (each list sorted)."""

    sizes: list[float] = field(default_factory=list)  # major extent / part extent, per defect
    areas: list[float] = field(default_factory=list)  # all defects' area / part area, per photo
    elongations: list[float] = field(default_factory=list)  # major / minor axis, per defect
    peaks: list[float] = field(default_factory=list)  # 90th pct change vs surroundings, grey lvls
    counts: list[int] = field(default_factory=list)  # defects per photo
    dark_share: float = 0.5  # share of defects darker than their surroundings
    # Each defect's centre within the part's bounding box, (x, y) in 0-1: an edge defect stays
    # at an edge, a centre defect in the middle.
    positions: list[list[float]] = field(default_factory=list)

    def quantile(self, name: str, rank: float) -> float:
        values = getattr(self, name)
        return float(np.quantile(values, float(np.clip(rank, 0.0, 1.0))))

    def trust(self) -> float:
        """The share of draws the real defects decide (see ``PRIOR_WEIGHT``)."""
        return len(self.sizes) / (len(self.sizes) + PRIOR_WEIGHT)

    def sample_count(self, rng: np.random.Generator) -> int:
        return int(self.counts[int(rng.integers(len(self.counts)))]) if self.counts else 1

    def as_dict(self) -> dict:
        return {"sizes": self.sizes, "areas": self.areas, "elongations": self.elongations,
                "peaks": self.peaks, "counts": self.counts, "dark_share": self.dark_share,
                "positions": self.positions}

    def summary(self) -> dict:
        """Medians and ranges, for reports."""
        def span(values: list) -> list[float]:
            return [round(float(np.quantile(values, q)), 4) for q in (0.05, 0.5, 0.95)] if values else []
        return {"defects": len(self.sizes), "photos": len(self.counts),
                "size_p05_p50_p95": span(self.sizes), "area_p05_p50_p95": span(self.areas),
                "peak_p05_p50_p95": span(self.peaks), "count_p50": span(self.counts)[1:2],
                "dark_share": round(self.dark_share, 3)}


@dataclass
class CalibrationProfile:
    category: str
    priors: dict[str, DefectPriors]
    bank: dict[str, list[BankCrop]]
    digest: str | None = None  # the stored profile's hash (set by the store that loaded it)
    # Real defects per type too wide to measure (see the module's docstring), for the reports.
    unmeasured: dict[str, int] = field(default_factory=dict)

    def for_defect(self, defect: str) -> tuple[DefectPriors | None, list[BankCrop]]:
        return self.priors.get(defect), self.bank.get(defect, [])

    def summary(self) -> dict:
        return {"category": self.category, "digest": self.digest,
                "defects": {d: p.summary() | {"bank": len(self.bank.get(d, []))}
                            for d, p in sorted(self.priors.items())},
                "unmeasured": dict(sorted(self.unmeasured.items()))}

    def save(self, folder: Path) -> None:
        """Write the profile into ``folder`` (which the caller makes fresh)."""
        folder = Path(folder)
        index: dict[str, list[dict]] = {}
        for defect, crops in sorted(self.bank.items()):
            target = path_under(folder / "bank", Name(defect, "defect"))
            target.mkdir(parents=True, exist_ok=True)
            index[defect] = []
            for n, crop in enumerate(crops):
                write_atomic(target / f"{n:03d}.png", png_bytes(Image.fromarray(crop.image)))
                write_atomic(target / f"{n:03d}_mask.png",
                             png_bytes(Image.fromarray(crop.mask.astype(np.uint8) * 255)))
                index[defect].append({"file": f"{n:03d}.png", "source": crop.source})
        body = {"format": FORMAT_VERSION, "category": self.category,
                "priors": {d: p.as_dict() for d, p in sorted(self.priors.items())},
                "bank": index, "unmeasured": self.unmeasured}
        write_atomic(folder / PROFILE_FILE, (json.dumps(body, indent=1) + "\n").encode())

    @classmethod
    def load(cls, folder: Path, digest: str | None = None) -> "CalibrationProfile":
        folder = Path(folder)
        body = json.loads((folder / PROFILE_FILE).read_text(encoding="utf-8"))
        if body.get("format") != FORMAT_VERSION:
            raise ValueError(f"{folder / PROFILE_FILE}: format {body.get('format')!r}, this "
                             f"version reads {FORMAT_VERSION}")
        priors = {d: DefectPriors(**p) for d, p in body["priors"].items()}
        bank = {}
        for defect, entries in body["bank"].items():
            base = path_under(folder / "bank", Name(defect, "defect"))
            crops = []
            for entry in entries:
                image = load_rgb(base / entry["file"])
                mask_file = base / entry["file"].replace(".png", "_mask.png")
                with Image.open(mask_file) as pil:
                    mask = np.asarray(pil.convert("L")) >= 128
                crops.append(BankCrop(image, mask, entry["source"]))
            bank[defect] = crops
        return cls(body["category"], priors, bank, digest, body.get("unmeasured", {}))


def size_rank(size: float) -> float:
    """Where a prompt's size (``EditParams.size``) sits on the words' scale, 0 to 1."""
    low, high = WORD_SIZE_RANGE
    return float(np.clip((math.log(max(size, 1e-6)) - math.log(low))
                         / (math.log(high) - math.log(low)), 0.0, 1.0))


def axes(mask: np.ndarray) -> tuple[float, float]:
    """(length, width) of the mask's smallest enclosing rectangle, at least 1 px; (0, 0) empty."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    if points is None:
        return 0.0, 0.0
    (_, _), (w, h), _ = cv2.minAreaRect(points)
    return float(max(w, h, 1.0)), float(max(min(w, h), 1.0))


def major_axis(mask: np.ndarray) -> float:
    return axes(mask)[0]


def defect_pieces(mask: np.ndarray, frame: tuple[int, ...] | None = None) -> list[np.ndarray]:
    """The separate defects of a mask: pieces closer than ``JOIN_SHARE`` joined, specks dropped
    (``MIN_PIECE_PX`` at 256 px, fewer on smaller photos). ``frame``: the photo's shape when
    ``mask`` is a crop of it."""
    frame = tuple(frame or mask.shape)[:2]
    join = max(3, int(round(JOIN_SHARE * min(frame))) | 1)
    joined = cv2.dilate(mask.astype(np.uint8),
                        cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (join, join)))
    count, labels = cv2.connectedComponents(joined, connectivity=8)
    pieces = [(labels == n) & mask for n in range(1, count)]
    smallest = max(2, round(MIN_PIECE_PX * frame[0] * frame[1] / 256 ** 2))
    return [p for p in pieces if int(p.sum()) >= smallest]


def background_estimate(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The surface as it would be without the defect: the masked pixels inpainted from around."""
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8))
    return cv2.inpaint(np.ascontiguousarray(image), grown, 5, cv2.INPAINT_TELEA)


def _crop(image: np.ndarray, mask: np.ndarray, source: str) -> BankCrop:
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    y0, y1 = max(int(ys.min()) - CROP_MARGIN_PX, 0), min(int(ys.max()) + 1 + CROP_MARGIN_PX, height)
    x0, x1 = max(int(xs.min()) - CROP_MARGIN_PX, 0), min(int(xs.max()) + 1 + CROP_MARGIN_PX, width)
    return BankCrop(image[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].copy(), source)


def inner_reach(mask: np.ndarray) -> float:
    """How far (px) the mask's innermost pixel lies from the nearest pixel outside it; the
    photo's edge counts as rim, so a defect the frame cuts is judged by the part inside it."""
    return float(distance_inside(mask).max()) if mask.any() else 0.0


def part_around(image: np.ndarray, mask: np.ndarray) -> ObjectMap:
    """The part a real defect lies on. A real defect is on its part: when most of the mask falls
    off the part found, the finder took the defect itself for the edge of a part (a large dark
    break on a tile close-up), and the whole frame is the surface."""
    part = find_object(image)
    if float(part.foreground[mask].mean()) < MIN_MASK_ON_PART:
        return ObjectMap(np.ones(mask.shape, dtype=bool), True, part.background_color)
    return part


def build_profile(category: str,
                  examples: Sequence[tuple[np.ndarray, np.ndarray, str, str]]) -> CalibrationProfile:
    """Measure ``examples`` (image uint8 RGB, mask bool, defect type, source name) into a profile."""
    priors: dict[str, DefectPriors] = {}
    bank: dict[str, list[BankCrop]] = {}
    dark: dict[str, list[bool]] = {}
    unmeasured: dict[str, int] = {}
    for image, mask, defect, source in examples:
        mask = np.asarray(mask, dtype=bool)
        if not mask.any():
            continue
        p = priors.setdefault(defect, DefectPriors())
        part = part_around(image, mask)
        foreground = part.foreground
        extent_box = foreground_bbox(foreground)
        extent = object_extent(part)
        part_area = float(max(int(foreground.sum()), 1))
        delta = image.astype(np.float32) - background_estimate(image, mask).astype(np.float32)
        change = np.abs(delta).max(axis=2)
        luma_delta = delta @ LUMA
        pieces = defect_pieces(mask)
        if not pieces:
            continue
        p.counts.append(len(pieces))
        p.areas.append(float(sum(int(piece.sum()) for piece in pieces)) / part_area)
        for piece in pieces:
            if inner_reach(piece) > MAX_REACH_SHARE * min(mask.shape):
                unmeasured[defect] = unmeasured.get(defect, 0) + 1
                continue
            major, minor = axes(piece)
            p.sizes.append(major / extent)
            ys, xs = np.nonzero(piece)
            p.positions.append([round((float(xs.mean()) - extent_box.x0) / max(extent_box.width, 1), 4),
                                round((float(ys.mean()) - extent_box.y0) / max(extent_box.height, 1), 4)])
            p.elongations.append(major / minor)
            p.peaks.append(change_peak(change, piece))
            dark.setdefault(defect, []).append(float(luma_delta[piece].mean()) < 0)
            bank.setdefault(defect, []).append(_crop(image, piece, source))
    for defect, p in priors.items():
        for name in ("sizes", "areas", "elongations", "peaks", "counts"):
            setattr(p, name, sorted(getattr(p, name)))
        flags = dark.get(defect, [])
        p.dark_share = float(np.mean(flags)) if flags else 0.5
    empty = [d for d, p in priors.items() if not p.sizes]
    for defect in empty:
        del priors[defect]
    if not priors:
        raise ValueError("no usable real defect to calibrate on: every mask is empty, a speck "
                         f"(under {MIN_PIECE_PX} px at 256 px) or too wide to measure (reaching "
                         f"over {MAX_REACH_SHARE:.0%} of the photo's side from its rim)")
    return CalibrationProfile(category, priors, bank, unmeasured=unmeasured)


def visible_floor(priors: DefectPriors) -> float:
    """The faintest change that still reads as this plant's defect: half the real 5th percentile,
    never below what counts as a change at all."""
    return max(0.5 * priors.quantile("peaks", 0.05), CHANGE_THRESHOLD + 1.0)


def typical_size(size_text: str | None) -> float | None:
    """The size a knowledge-base description gives a defect type ("long and thin: one third
    to most of the tile width"), on the prompt words' scale; None when it names none."""
    if not size_text:
        return None
    params = parse_prompt(size_text, np.random.default_rng(0))
    return params.size if "size" in params.specified else None


def plant_size(priors: DefectPriors, asked: float, typical: float | None) -> float:
    """The plant's size for a size a prompt asks for.

    The words are read relative to what is typical for the type: asking for the size the
    knowledge base describes gives the plant's median, asking for more or less moves up or down
    the plant's own sizes by as many ranks as the words move on their scale. Without a typical
    size the words' scale is read as ranks directly.
    """
    rank = size_rank(asked)
    if typical is not None:
        rank = 0.5 + rank - size_rank(typical)
    return priors.quantile("sizes", rank)


def calibrated_params(params: EditParams, priors: DefectPriors, rng: np.random.Generator,
                      typical: float | None = None) -> EditParams:
    """``params`` with size, count, elongation and polarity taken from the plant's defects.

    A size the prompt names becomes the plant's size at the rank it asks for (``plant_size``);
    an open size, count, elongation or polarity is drawn from the real ones. Each attribute
    follows the plant with probability ``priors.trust()`` and keeps the prompt's (uncalibrated)
    value otherwise; the draws are made in a fixed order whatever is used.
    """
    specified = set(params.specified)
    follow = rng.random(4) < priors.trust()  # size, count, elongation, polarity
    rank = rng.random(3)
    changes: dict = {}
    if follow[0]:
        changes["size"] = (plant_size(priors, params.size, typical) if "size" in specified
                           else priors.quantile("sizes", float(rank[0])))
    if follow[1] and "count" not in specified:
        changes["count"] = max(1, priors.sample_count(rng))
    if follow[2] and "elongation" not in specified and priors.elongations:
        changes["elongation"] = max(1.0, priors.quantile("elongations", float(rank[1])))
    if follow[3] and "polarity" not in specified and params.color is None:
        changes["polarity"] = "dark" if rank[2] < priors.dark_share else "bright"
    return replace(params, **changes)


def plant_peak(priors: DefectPriors, severity: float) -> float:
    """The change a defect of this ``severity`` (0-1, ``EditParams.severity``) shows on this
    plant: the real defects' peak at that rank, so "faint" is a faint one of theirs."""
    return max(priors.quantile("peaks", severity), visible_floor(priors))


def match_contrast(original: np.ndarray, edited: np.ndarray, mask: np.ndarray,
                   target_peak: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Scale a rendered defect's change so its peak (90th percentile of the change over the
    mask, as the calibration measures real defects) becomes ``target_peak``.

    Pixels outside the mask stay as they are. Scaling up only strengthens what the mask holds;
    scaling down, pixels whose change falls to the change threshold or below are put back
    exactly and leave the mask, so the mask stays the renderers' contract (the changed pixels,
    IoU >= 0.9). A scale that would erase most of the defect is not applied.
    """
    diff = change_map(original, edited)
    peak = change_peak(diff, mask)
    info = {"target_peak": round(float(target_peak), 2), "peak": round(peak, 2), "scale": 1.0}
    if peak <= 0.0 or 1.0 / CONTRAST_SLACK <= target_peak / peak <= CONTRAST_SLACK:
        return edited, mask, info
    scale = float(np.clip(target_peak / peak, *CONTRAST_SCALE))
    base = original.astype(np.float32)
    scaled = np.clip(np.rint(base + scale * (edited.astype(np.float32) - base)), 0, 255)
    result = np.where(mask[..., None], scaled.astype(np.uint8), edited)
    kept = mask & (change_map(original, result) > CHANGE_THRESHOLD) if scale < 1.0 else mask
    if int(kept.sum()) < 0.5 * int(mask.sum()):
        return edited, mask, info | {"skipped": "the scaled change would leave under half the defect"}
    result[mask & ~kept] = original[mask & ~kept]
    # A dark defect on a dark surface cannot get darker than black: the peak reached is recorded.
    reached = change_peak(change_map(original, result), kept)
    return result, kept, info | {"scale": round(scale, 3), "peak_after": round(reached, 2)}


class Calibrations:
    """The calibration profile each category uses (none: the uncalibrated defaults).

    The engine fills it with the promoted profiles when it is built; ``use`` puts another
    profile in place for its category (the evaluation's few-shot run).
    """

    def __init__(self, profiles: dict[str, CalibrationProfile] | None = None) -> None:
        self._profiles: dict[str, CalibrationProfile] = dict(profiles or {})

    def get(self, category: str) -> CalibrationProfile | None:
        return self._profiles.get(category)

    def use(self, profile: CalibrationProfile) -> None:
        self._profiles[profile.category] = profile

    def drop(self, category: str) -> None:
        self._profiles.pop(category, None)

    def digests(self) -> dict[str, str]:
        """Category -> hash of the profile it uses (for provenance)."""
        return {c: p.digest or "unstored" for c, p in sorted(self._profiles.items())}
