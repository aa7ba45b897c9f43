"""A heuristic judge of synthetic defects, built on measurements of the edit.

A vision-language judge looks at the edited image and says whether the defect is on the part and
looks real. Without one, the appliance can still measure most of what such a judge checks: where
the pixels changed (on the part or in the background), whether the change is one local defect or
spread everywhere, how big it is relative to the part, how visible it is against the surface's own
texture, and whether its outline is the hard straight seam of a pasted patch. Each measurement
maps to an ``Issue`` and to penalties on two 0-5 scores by the rules below; the review is written
from the same numbers so that a person (or the policy's next prompt) sees why.

Issue rules (numbers from ``Limits``)
-------------------------------------
NO_CHANGE   no pixel moved by more than ``imaging.CHANGE_THRESHOLD`` grey levels.
OFF_OBJECT  under 70 % of the changed pixels lie on the part (the normal image's foreground).
SCATTERED   the three largest regions hold under half of the changed pixels and the changed
            pixels spread over more than 10 % of the part (their convex hull); a tight cluster
            of specks (contamination) is local, noise over the image is not. Also when over
            20 % of the change lies in pieces far from the main group of pieces (gap between
            boxes over 1.5 times the larger piece and over 12 % of the part's size): a second
            defect elsewhere, not one defect.
TOO_SMALL   fewer changed pixels than max(24, 0.03 % of the frame): a speck nobody sees.
TOO_LARGE   changed area above 25 % of the part's area: not a local defect (unless the knowledge
            base says the defect type covers that much: then 1.25 times its largest share).
TOO_FAINT   the change's peak (90th percentile over the changed region) below 14 grey levels,
            or below 0.8 local texture spreads (std of the normal image's fine detail around the
            region). The peak, not the mean: shading defects (dents, folds) are visible by their
            strongest part while most of their area changes little.
TOO_STRONG  mean change above 150 grey levels and above 25 texture spreads: glaring.
HARD_SEAMS  the change is as strong at the region's outline as inside (edge hardness > 0.7),
            over half the outline runs in long straight sides, and the outline's gradient is
            1.5x the normal image's: a pasted patch. Thin regions (lines) are exempt.
Against the instruction and the plant (when known):
SIZE        the instruction names a size ("large", "tiny", "3 percent"): the main change's major
            extent against the part's must be within a third and three times the size the
            words ask for (on a calibrated category, the plant's own size at that rank or the
            words' uncalibrated size, whichever is further out): TOO_SMALL / TOO_LARGE otherwise.
COUNT       the instruction names a count ("two or three pores", "a single crack") or the category
            is calibrated: WRONG_COUNT when the separate defects (pieces joined as the
            calibration joins real ones) number under the asked minimum less half of it, or over
            the asked maximum plus half of it (at least one more; a single defect: two more), or,
            with no count asked, over twice the most the plant's real photos show plus one. The
            slack is for close neighbours that merge, as real ones do in their masks.
PLANT       on a category with a calibration profile (its tolerances widened by the profile's
            trust, n / (n + 5) for n real defects; the figures below are for many defects):
            the changed area against the part below
            a third of the real defects' 5th percentile is TOO_SMALL (and that, not the generic
            minimum, is the smallest visible defect, down to 4 px), above three times their
            95th percentile TOO_LARGE; the peak change under half the real 5th percentile is
            TOO_FAINT, over twice the real 95th percentile TOO_STRONG.
Borderline (a 1-point penalty each): area 12-25 % of the part; peak change under 20 grey levels
or under 1.5 texture spreads; hard edges without straight sides; the three largest regions
holding under 85 % of the change.

Scoring rules
-------------
location_score, from the share of changed pixels on the part (``on_object``):
    >= 0.95 -> 5, >= 0.85 -> 4, >= 0.70 -> 3, >= 0.50 -> 2, >= 0.25 -> 1, else 0;
    capped at 2 when the change is not local (SCATTERED or TOO_LARGE): a change everywhere has no
    location. Below 0.70 the report carries OFF_OBJECT.
quality_score starts at 5:
    capped at 1 by TOO_SMALL, TOO_LARGE, SCATTERED or WRONG_COUNT (not the local defect asked
    for at all),
    capped at 2 by TOO_FAINT, TOO_STRONG or HARD_SEAMS (a defect, but it does not look real),
    minus 1 for each borderline measurement (weak contrast, large size, hard edges, a change
    split into many pieces).
NO_CHANGE gives 0 and 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np
from scipy.sparse.csgraph import connected_components

from appliance.imaging import CHANGE_THRESHOLD, VISIBLE_PEAK, change_map, change_peak
from appliance.tools.image_gen.calibration import (Calibrations, defect_pieces, major_axis,
                                                   plant_size, typical_size, visible_floor)
from appliance.tools.image_gen.placement import object_extent
from appliance.tools.image_gen.prompt_params import expected_area_share, parse_prompt
from appliance.tools.interfaces import Issue, QualityReport, QualityRequest
from appliance.tools.object_map import ObjectMap, fill_holes, find_object

if TYPE_CHECKING:
    from appliance.tools.knowledge.base import KnowledgeBase


@dataclass(frozen=True)
class Limits:
    """The thresholds of the rules, in one place so a deployment can tune them."""

    # Smallest visible defect: this many pixels, or this share of the frame, whichever is larger.
    min_pixels: int = 24
    min_frame_share: float = 0.0003
    # Changed area relative to the part's area.
    large_share: float = 0.12  # borderline above this
    max_share: float = 0.25  # not a local defect above this
    # Peak change (90th percentile) in the changed region, in grey levels and in texture spreads.
    faint_level: float = VISIBLE_PEAK
    weak_level: float = 20.0
    faint_ratio: float = 0.8
    weak_ratio: float = 1.5
    # Mean change in the region, in grey levels and in texture spreads.
    strong_level: float = 150.0
    strong_ratio: float = 25.0
    # Location: share of changed pixels on the part.
    min_on_object: float = 0.70
    # Locality: share of changed pixels in the three largest regions, and the spread of all
    # changed pixels (convex hull) relative to the part.
    scattered_top3: float = 0.5
    split_top3: float = 0.85
    scattered_spread: float = 0.10
    # Pieces far apart: significant pieces (at least this share of the change) are grouped when
    # the gap between their boxes is under ``far_gap`` times the larger piece's size or
    # ``far_gap_extent`` of the part's size; more than ``far_share`` of the change outside the
    # main group is a second defect somewhere else, not one defect (several pores or specks
    # close together stay one group).
    piece_share: float = 0.03
    far_gap: float = 1.5
    far_gap_extent: float = 0.12
    far_share: float = 0.2
    # Seams: change at the outline relative to the region's mean change (1 = hard cut), share of
    # the outline on long straight runs, and how much stronger the outline's gradient is than
    # in the normal image.
    hard_edge: float = 0.7
    straight_share: float = 0.5
    seam_gradient: float = 1.5
    min_interior: float = 0.3  # share of the region that is not outline, for hardness to count
    # Texture spread floor, so that a perfectly smooth surface does not make any change "glaring".
    min_spread: float = 2.0
    # From the instruction and the category's calibration profile (None: not checked): the
    # main change's major extent against the part's, its area against the part, its peak.
    size_range: tuple[float, float] | None = None
    count_range: tuple[int, int] | None = None  # separate defects allowed
    min_area_share: float | None = None
    max_area_share: float | None = None
    min_peak: float | None = None
    max_peak: float | None = None


# How far from what was asked (or from the plant's range) a defect may land: sizes within a
# third and three times; peaks at most twice the real 95th percentile (the faint end is
# ``calibration.visible_floor``: half the real 5th percentile).
SIZE_TOLERANCE = 3.0
SPECK_PX = 4  # below this no calibration makes a change a defect
PEAK_HIGH = 2.0


LIMITS = Limits()


class HeuristicQualityEvaluator:
    """QualityEvaluator from pixel measurements; no model, a few milliseconds per request."""

    name = "heuristic"

    def __init__(self, limits: Limits = LIMITS, knowledge_base: "KnowledgeBase | None" = None,
                 calibrations: Calibrations | None = None) -> None:
        self.limits = limits
        self.knowledge_base = knowledge_base
        self.calibrations = calibrations

    def evaluate(self, requests: Sequence[QualityRequest]) -> list[QualityReport]:
        return [self.evaluate_one(request) for request in requests]

    def limits_for(self, category: str, defect: str) -> Limits:
        """The size limits widened for a defect type the knowledge base says covers a large
        share of the part ("15 to 40 percent of the face"): it must not be called too large for
        being what was asked for."""
        entry = self.knowledge_base.entry(category, defect) if self.knowledge_base else None
        share = expected_area_share(entry.size) if entry is not None else None
        if share is None:
            return self.limits
        return replace(self.limits, large_share=max(self.limits.large_share, share),
                       max_share=max(self.limits.max_share, min(0.9, 1.25 * share)))

    def limits_for_request(self, request: QualityRequest) -> Limits:
        """``limits_for`` narrowed by the category's calibration profile and the instruction."""
        limits = self.limits_for(request.category, request.defect)
        profile = self.calibrations.get(request.category) if self.calibrations else None
        priors = profile.priors.get(request.defect) if profile else None
        if priors is not None:
            # A profile of few defects is a rough measure of the plant: its ranges widen as the
            # engine's draws do (``DefectPriors.trust``), 3x at many defects, 6x at five.
            trust = priors.trust()
            tolerance = SIZE_TOLERANCE / trust
            top_area = priors.quantile("areas", 0.95)
            limits = replace(
                limits, min_area_share=priors.quantile("areas", 0.05) / tolerance,
                max_area_share=tolerance * top_area,
                # A plant whose real defects are large must not see them called "not local".
                large_share=max(limits.large_share, top_area),
                max_share=max(limits.max_share, tolerance * top_area),
                min_peak=max(trust * visible_floor(priors), CHANGE_THRESHOLD + 1.0),
                max_peak=PEAK_HIGH / trust * priors.quantile("peaks", 0.95))
        if priors is not None and priors.counts:
            limits = replace(limits, count_range=(1, 2 * max(priors.counts) + 1))
        if request.instruction:
            asked = parse_prompt(request.instruction, np.random.default_rng(0))
            if asked.count_band is not None:
                limits = replace(limits, count_range=count_range(asked.count_band))
            if asked.size_band is not None:
                low, high = asked.size_band
                if priors is not None:
                    entry = (self.knowledge_base.entry(request.category, request.defect)
                             if self.knowledge_base else None)
                    typical = typical_size(entry.size if entry else None)
                    # The words mean the plant's sizes, or, in the share of draws the profile
                    # does not decide, what they mean uncalibrated: either is what was asked.
                    low = min(low, plant_size(priors, low, typical))
                    high = max(high, plant_size(priors, high, typical))
                limits = replace(limits, size_range=(low / SIZE_TOLERANCE, high * SIZE_TOLERANCE))
        return limits

    def evaluate_one(self, request: QualityRequest,
                     object_map: ObjectMap | None = None) -> QualityReport:
        """Judge one edit; pass ``object_map`` when the caller already has it for this image."""
        if object_map is None:
            object_map = find_object(request.normal)
        limits = self.limits_for_request(request)
        m = measure(request.normal, request.edited, object_map, limits)
        return score(m, object_map.is_texture, limits)


def count_range(band: tuple[int, int]) -> tuple[int, int]:
    """The separate defects a judge accepts for an asked count band (see COUNT above)."""
    low, high = band
    return max(1, low - low // 2), high + (2 if high == 1 else max(1, high // 2))


def measure(normal: np.ndarray, edited: np.ndarray, object_map: ObjectMap,
            limits: Limits = LIMITS) -> dict[str, float]:
    """All numbers the rules use, as plain floats (they go into the trajectory as JSON)."""
    diff = change_map(normal, edited)
    changed = diff > CHANGE_THRESHOLD
    height, width = changed.shape
    frame = float(height * width)
    foreground = object_map.foreground
    object_area = float(max(int(foreground.sum()), 1))
    count = int(changed.sum())
    m: dict[str, float] = {
        "changed_pixels": float(count),
        "changed_frame_share": count / frame,
        "frame_pixels": frame,
        "object_pixels": object_area,
        "max_change": float(diff.max()) if diff.size else 0.0,
    }
    if count == 0:
        return m

    m["on_object"] = float(np.logical_and(changed, foreground).sum() / count)
    m["size_share"] = count / object_area

    # Everything below only looks at the changed area and its surroundings: work on a crop.
    rows, cols = np.nonzero(changed)
    y0, y1, x0, x1 = _expand((rows.min(), rows.max() + 1, cols.min(), cols.max() + 1), 4,
                             changed.shape)
    changed_crop = changed[y0:y1, x0:x1]
    # Regions: close small gaps so that one crack with a break is one region.
    closed = cv2.morphologyEx(changed_crop.astype(np.uint8), cv2.MORPH_CLOSE,
                              cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    changed_per_label = np.bincount(labels[changed_crop], minlength=n_labels)[1:]
    # How far the change spreads: the convex hull of the regions' box corners, against the part.
    x, y, w, h = (stats[1:, i] for i in range(4))
    corners = np.concatenate([np.stack([x, y], 1), np.stack([x + w, y], 1),
                              np.stack([x, y + h], 1), np.stack([x + w, y + h], 1)])
    hull = cv2.convexHull(corners.astype(np.int32))
    m["spread_share"] = float(cv2.contourArea(hull)) / object_area
    m["far_share"] = _far_share(stats[1:], changed_per_label, count,
                                math.sqrt(object_area), limits)
    order = np.argsort(changed_per_label)[::-1][:3]
    m["regions"] = float(n_labels - 1)
    m["top3_share"] = float(changed_per_label[order].sum() / count)
    main_labels = order[changed_per_label[order] > 0] + 1
    region_crop = fill_holes(np.isin(labels, main_labels))
    region_area = float(region_crop.sum())
    # The defect's length as the calibration measures real ones (pieces joined the same way).
    pieces = defect_pieces(changed_crop, frame=changed.shape) or [changed_crop]
    m["pieces"] = float(len(pieces))
    m["major_share"] = max(major_axis(piece) for piece in pieces) / object_extent(object_map)
    m["region_pixels"] = region_area
    m["region_density"] = float(changed_crop[region_crop].sum() / max(region_area, 1.0))

    # The surroundings: a ring as wide as half the region (5 to 25 px) for the texture spread.
    radius = int(np.clip(np.sqrt(region_area) / 2, 5, 25))
    ry0, ry1, rx0, rx1 = _expand((y0, y1, x0, x1), radius + 8, changed.shape)
    region = np.zeros((ry1 - ry0, rx1 - rx0), dtype=bool)
    region[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] = region_crop
    window = (slice(ry0, ry1), slice(rx0, rx1))
    diff_w = diff[window]

    # Visibility: mean change over the region against the fine texture of the surface around it
    # (grey levels minus their local mean, so that shading does not count as texture).
    m["mean_change"] = float(diff_w[region].mean(dtype=np.float64))
    m["peak_change"] = change_peak(diff_w, region)
    grey_n = cv2.cvtColor(normal[window], cv2.COLOR_RGB2GRAY).astype(np.float32)
    grey_e = cv2.cvtColor(edited[window], cv2.COLOR_RGB2GRAY).astype(np.float32)
    detail = grey_n - cv2.GaussianBlur(grey_n, (0, 0), 3.0)
    # Distance to the region in one linear pass; a large elliptic dilation is far slower.
    outside = (~region).astype(np.uint8)
    ring = (cv2.distanceTransform(outside, cv2.DIST_L2, 3) <= radius) & ~region
    if ring.sum() < 20:  # the change covers (nearly) everything: use the whole window
        ring = np.ones_like(region)
    m["texture_spread"] = float(max(detail[ring].std(dtype=np.float64), limits.min_spread))
    m["contrast_ratio"] = m["peak_change"] / m["texture_spread"]

    m.update(_seam_measurements(grey_n, grey_e, diff_w, region, (ry0, rx0), changed.shape))
    return m


def _far_share(stats: np.ndarray, changed_per_label: np.ndarray, count: int, extent: float,
               limits: Limits) -> float:
    """Share of the changed pixels in significant pieces far from the main group of pieces.

    Pieces are grouped by single linkage on the gap between their bounding boxes; the main group
    is the one holding most of the change.
    """
    significant = np.flatnonzero(changed_per_label >= max(limits.piece_share * count,
                                                          float(limits.min_pixels) / 4))
    if significant.size < 2:
        return 0.0
    x, y = stats[significant, 0], stats[significant, 1]
    w, h = stats[significant, 2], stats[significant, 3]
    size = np.maximum(w, h).astype(np.float64)
    gap_x = np.maximum(0, np.maximum(x[:, None], x[None, :])
                       - np.minimum(x[:, None] + w[:, None], x[None, :] + w[None, :]))
    gap_y = np.maximum(0, np.maximum(y[:, None], y[None, :])
                       - np.minimum(y[:, None] + h[:, None], y[None, :] + h[None, :]))
    reach = np.maximum(limits.far_gap * np.maximum(size[:, None], size[None, :]),
                       limits.far_gap_extent * extent)
    linked = np.hypot(gap_x, gap_y) <= reach
    groups, labels = connected_components(linked, directed=False)
    held = np.bincount(labels, weights=changed_per_label[significant], minlength=groups)
    return float((held.sum() - held.max()) / max(count, 1))


def _expand(box: tuple[int, int, int, int], margin: int,
            shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = box
    return (max(int(y0) - margin, 0), min(int(y1) + margin, shape[0]),
            max(int(x0) - margin, 0), min(int(x1) + margin, shape[1]))


def _seam_measurements(grey_n: np.ndarray, grey_e: np.ndarray, diff: np.ndarray,
                       region: np.ndarray, origin: tuple[int, int],
                       frame: tuple[int, int]) -> dict[str, float]:
    """How hard and how straight the outline of the change is, on a window of the image.

    A pasted patch changes the image as much at its outline as in its middle, along straight
    sides; a real defect fades out or follows an irregular path. Thin regions (lines, scratches)
    are left out of the straightness measure, since a straight scratch is straight by nature,
    and so are outline runs along the frame edge, which belong to the frame, not the edit.
    """
    region_u8 = region.astype(np.uint8)
    square = np.ones((3, 3), np.uint8)
    # Erosion treats outside the array as set, so the frame edge is never counted as outline.
    eroded = cv2.erode(region_u8, square).astype(bool)
    inner = region & ~eroded
    # Sums in float64: a float32 sum's last digits follow the memory alignment of the array
    # (numpy's SIMD paths), and the same episode must report the same figures on every box.
    mean_change = float(diff[region].mean(dtype=np.float64)) if region.any() else 0.0
    hardness = (float(diff[inner].mean(dtype=np.float64) / mean_change)
                if inner.any() and mean_change else 0.0)

    outline = cv2.dilate(region_u8, square).astype(bool) & ~eroded
    gradient_ratio = 0.0
    if outline.any():
        gradient_ratio = float(_gradient(grey_e)[outline].mean(dtype=np.float64)
                               / max(float(_gradient(grey_n)[outline].mean(dtype=np.float64)), 1.0))

    straight = 0.0
    perimeter_total = 0.0
    oy, ox = origin
    last_y, last_x = frame[0] - 1, frame[1] - 1
    contours, _ = cv2.findContours(region_u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    for contour in contours:
        (_, _), (w, h), _ = cv2.minAreaRect(contour)
        perimeter = cv2.arcLength(contour, True)
        if min(w, h) < 8 or perimeter <= 0:
            continue
        polygon = cv2.approxPolyDP(contour, 1.0, True)[:, 0, :] + np.array([ox, oy])
        following = np.roll(polygon, -1, axis=0)
        sides = np.linalg.norm((following - polygon).astype(np.float32), axis=1)
        on_frame = (((polygon[:, 0] == 0) & (following[:, 0] == 0))
                    | ((polygon[:, 0] == last_x) & (following[:, 0] == last_x))
                    | ((polygon[:, 1] == 0) & (following[:, 1] == 0))
                    | ((polygon[:, 1] == last_y) & (following[:, 1] == last_y)))
        sides = sides[~on_frame]
        # A side is a straight run when it is long both absolutely and against the outline:
        # a smooth round blob approximated to 1 px only has short chords.
        long_side = max(10.0, 0.15 * perimeter)
        straight += float(sides[sides >= long_side].sum())
        perimeter_total += float(sides.sum())
    return {
        "edge_hardness": hardness,
        "interior_share": float(eroded.sum() / max(int(region.sum()), 1)),
        "seam_gradient_ratio": gradient_ratio,
        "straight_outline_share": straight / perimeter_total if perimeter_total else 0.0,
    }


def _gradient(grey: np.ndarray) -> np.ndarray:
    # In float64: OpenCV's float32 path gives last-digit differences with its thread count, and
    # an episode must be judged the same on a 2-core box and a 64-core one.
    grey = grey.astype(np.float64)
    return cv2.magnitude(cv2.Sobel(grey, cv2.CV_64F, 1, 0, ksize=3),
                         cv2.Sobel(grey, cv2.CV_64F, 0, 1, ksize=3))


def score(m: dict[str, float], is_texture: bool, limits: Limits = LIMITS) -> QualityReport:
    """Turn measurements into the two scores, the issue codes and the review."""
    measurements = {key: float(value) for key, value in m.items()}
    if m["changed_pixels"] == 0:
        return QualityReport(
            location_score=0, quality_score=0, issues=[Issue.NO_CHANGE],
            review=(f"Nothing changed: no pixel moved by more than {CHANGE_THRESHOLD} grey levels "
                    f"(largest change {m['max_change']:.0f})."),
            measurements=measurements)

    issues: list[str] = []
    penalties: list[str] = []
    min_area = max(float(limits.min_pixels), limits.min_frame_share * m["frame_pixels"])
    if limits.min_area_share is not None:
        # The plant's real defects say how small a defect can be and still be one (a pit of a
        # few pixels on a small photo); the generic floor only guards against specks.
        min_area = min(min_area, max(SPECK_PX, limits.min_area_share * m["object_pixels"]))
    measurements["min_area"] = m["min_area"] = min_area
    m["asked"] = 0.0  # 1: too small/large for what was asked
    m["plant_size"] = 0.0  # 1: area outside the plant's real range
    m["plant_contrast"] = 0.0  # 1: peak change outside the plant's real range
    small, large = _against_request(m, limits)
    if m["changed_pixels"] < min_area or small:
        issues.append(Issue.TOO_SMALL)
    if m["size_share"] > limits.max_share or large:
        issues.append(Issue.TOO_LARGE)
    elif m["size_share"] > limits.large_share:
        penalties.append("large")
    apart = m.get("far_share", 0.0) > limits.far_share
    measurements["pieces_apart"] = m["pieces_apart"] = float(apart)
    if apart or (m["top3_share"] < limits.scattered_top3
                 and m["spread_share"] > limits.scattered_spread):
        issues.append(Issue.SCATTERED)
    elif m["top3_share"] < limits.split_top3:
        penalties.append("split")
    if m["on_object"] < limits.min_on_object:
        issues.append(Issue.OFF_OBJECT)
    if limits.count_range is not None and not (
            limits.count_range[0] <= m["pieces"] <= limits.count_range[1]):
        issues.append(Issue.WRONG_COUNT)
        m["count_low"], m["count_high"] = (float(c) for c in limits.count_range)

    peak, ratio = m["peak_change"], m["contrast_ratio"]
    faint_for_plant = limits.min_peak is not None and peak < limits.min_peak
    strong_for_plant = limits.max_peak is not None and peak > limits.max_peak
    if faint_for_plant or strong_for_plant:
        m["plant_contrast"] = 1.0
    for flag in ("asked", "plant_size", "plant_contrast"):
        measurements[flag] = m[flag]
    if peak < limits.faint_level or ratio < limits.faint_ratio or faint_for_plant:
        issues.append(Issue.TOO_FAINT)
    elif peak < limits.weak_level or ratio < limits.weak_ratio:
        penalties.append("weak")
    mean = m["mean_change"]
    if (mean > limits.strong_level and mean / m["texture_spread"] > limits.strong_ratio) \
            or strong_for_plant:
        issues.append(Issue.TOO_STRONG)

    # A thin region (a line) is all outline, so its hardness says nothing about blending.
    hard = m["edge_hardness"] > limits.hard_edge and m["interior_share"] >= limits.min_interior
    if (hard and m["straight_outline_share"] > limits.straight_share
            and m["seam_gradient_ratio"] > limits.seam_gradient):
        issues.append(Issue.HARD_SEAMS)
    elif hard:
        penalties.append("hard_edge")

    location = _location_score(m["on_object"])
    if Issue.SCATTERED in issues or Issue.TOO_LARGE in issues:
        location = min(location, 2)

    quality = 5 - len(penalties)
    if {Issue.TOO_SMALL, Issue.TOO_LARGE, Issue.SCATTERED, Issue.WRONG_COUNT} & set(issues):
        quality = min(quality, 1)
    if {Issue.TOO_FAINT, Issue.TOO_STRONG, Issue.HARD_SEAMS} & set(issues):
        quality = min(quality, 2)
    quality = max(quality, 0)
    measurements["penalties"] = float(len(penalties))
    return QualityReport(location_score=location, quality_score=quality,
                         review=_review(m, issues, penalties, is_texture),
                         issues=issues, measurements=measurements)


def _against_request(m: dict[str, float], limits: Limits) -> tuple[bool, bool]:
    """(too small, too large) for what the instruction asked or the plant's defects measure;
    marks which in ``m``."""
    small = large = False
    if limits.size_range is not None:
        low, high = limits.size_range
        if m["major_share"] < low or m["major_share"] > high:
            m["asked"] = 1.0
            small, large = m["major_share"] < low, m["major_share"] > high
    if limits.min_area_share is not None and m["size_share"] < limits.min_area_share:
        small, m["plant_size"] = True, 1.0
    if limits.max_area_share is not None and m["size_share"] > limits.max_area_share:
        large, m["plant_size"] = True, 1.0
    return small, large


def _location_score(on_object: float) -> int:
    for floor, points in ((0.95, 5), (0.85, 4), (0.70, 3), (0.50, 2), (0.25, 1)):
        if on_object >= floor:
            return points
    return 0


def _review(m: dict[str, float], issues: list[str], penalties: list[str],
            is_texture: bool) -> str:
    """Up to four sentences, each carrying the numbers it is based on."""
    surface = "surface" if is_texture else "part"
    share = 100 * m["on_object"]
    pieces = int(m["regions"])
    piece_text = "one region" if pieces == 1 else f"{pieces} regions"
    if Issue.SCATTERED in issues and m.get("pieces_apart"):
        where = (f"The change is split into pieces far apart: {piece_text}, "
                 f"{100 * m['far_share']:.0f} % of the changed pixels away from the main one")
    elif Issue.SCATTERED in issues:
        where = (f"The change is scattered: {piece_text}, the three largest holding only "
                 f"{100 * m['top3_share']:.0f} % of the changed pixels")
    elif Issue.OFF_OBJECT in issues:
        where = (f"The change misses the {surface}: only {share:.0f} % of the changed pixels "
                 f"are on it ({piece_text})")
    else:
        where = f"The change sits on the {surface} ({share:.0f} % of changed pixels, {piece_text})"
    sentences = [where + "."]
    if Issue.WRONG_COUNT in issues:
        low, high = int(m["count_low"]), int(m["count_high"])
        allowed = str(low) if low == high else f"{low} to {high}"
        sentences.append(f"It shows {int(m['pieces'])} separate defects where {allowed} would "
                         "fit what was asked.")

    size = (f"It covers {m['changed_pixels']:.0f} px, {100 * m['size_share']:.2f} % of the "
            f"{surface}")
    if m.get("asked") and m["major_share"] < 1:
        size += (f"; its length is {100 * m['major_share']:.1f} % of the {surface}'s, "
                 f"{'less' if Issue.TOO_SMALL in issues else 'more'} than the instruction asks")
    if m.get("plant_size") and {Issue.TOO_SMALL, Issue.TOO_LARGE} & set(issues):
        size += ", outside the sizes of this plant's real defects"
    elif Issue.TOO_SMALL in issues:
        size += f", too small to see (below {m['min_area']:.0f} px)"
    elif Issue.TOO_LARGE in issues:
        size += ", far too large for a local defect"
    elif "large" in penalties:
        size += ", which is large for a local defect"
    sentences.append(size + ".")

    contrast = (f"its change peaks at {m['peak_change']:.1f} grey levels (mean "
                f"{m['mean_change']:.1f}) against a local texture spread of "
                f"{m['texture_spread']:.1f} (ratio {m['contrast_ratio']:.1f})")
    plant = " for this plant's real defects" if m.get("plant_contrast") else ""
    if Issue.TOO_FAINT in issues:
        sentences.append(f"It is too faint{plant}: {contrast}.")
    elif Issue.TOO_STRONG in issues:
        sentences.append(f"It is glaringly strong{plant}: {contrast}.")
    elif "weak" in penalties:
        sentences.append(f"It is weak: {contrast}.")
    else:
        sentences.append(f"It is clearly visible: {contrast}.")

    if Issue.HARD_SEAMS in issues:
        sentences.append(
            f"Its outline is a hard straight seam (edge hardness {m['edge_hardness']:.2f}, "
            f"{100 * m['straight_outline_share']:.0f} % of the outline straight, gradient "
            f"{m['seam_gradient_ratio']:.1f}x the normal image): it looks pasted.")
    elif "hard_edge" in penalties:
        sentences.append(f"Its edges are abrupt (edge hardness {m['edge_hardness']:.2f}) rather "
                         "than blended into the surface.")
    return " ".join(sentences)
