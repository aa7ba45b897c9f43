"""A heuristic judge of synthetic defects, built on measurements of the edit.

A vision-language judge looks at the edited image and says whether the defect is on the part and
looks real. Without one, the appliance can still measure most of what such a judge checks: where
the pixels changed (on the part or in the background), whether the change is one local defect or
spread everywhere, how big it is relative to the part, how visible it is against the surface's own
texture, and whether its outline is the hard straight seam of a pasted patch. Each measurement
maps to an ``Issue`` and to penalties on two 0-5 scores by the rules below; the review is written
from the same numbers so that a person (or the policy's next prompt) sees why.

Scoring rules
-------------
location_score, from the share of changed pixels on the part (``on_object``):
    >= 0.95 -> 5, >= 0.85 -> 4, >= 0.70 -> 3, >= 0.50 -> 2, >= 0.25 -> 1, else 0;
    capped at 2 when the change is not local (SCATTERED or TOO_LARGE): a change everywhere has no
    location. Below 0.70 the report carries OFF_OBJECT.
quality_score starts at 5:
    capped at 1 by TOO_SMALL, TOO_LARGE or SCATTERED (not a visible local defect at all),
    capped at 2 by TOO_FAINT, TOO_STRONG or HARD_SEAMS (a defect, but it does not look real),
    minus 1 for each borderline measurement (weak contrast, large size, hard edges, a change
    split into many pieces).
NO_CHANGE gives 0 and 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from appliance.imaging import CHANGE_THRESHOLD, change_map
from appliance.tools.interfaces import Issue, QualityReport, QualityRequest
from appliance.tools.object_map import ObjectMap, fill_holes, find_object


@dataclass(frozen=True)
class Limits:
    """The thresholds of the rules, in one place so a deployment can tune them."""

    # Smallest visible defect: this many pixels, or this share of the frame, whichever is larger.
    min_pixels: int = 24
    min_frame_share: float = 0.0003
    # Changed area relative to the part's area.
    large_share: float = 0.12  # borderline above this
    max_share: float = 0.25  # not a local defect above this
    # Mean change in the changed region, in grey levels, and relative to the texture spread.
    faint_level: float = 12.0
    weak_level: float = 18.0
    faint_ratio: float = 0.8
    weak_ratio: float = 1.5
    strong_level: float = 150.0
    strong_ratio: float = 25.0
    # Locality: share of changed pixels in the three largest regions.
    scattered_top3: float = 0.5
    split_top3: float = 0.85
    # Seams: change at the outline relative to the region's mean change (1 = hard cut), share of
    # the outline on long straight runs, and how much stronger the outline's gradient is than
    # in the normal image.
    hard_edge: float = 0.7
    straight_share: float = 0.6
    seam_gradient: float = 1.5
    # Texture spread floor, so that a perfectly smooth surface does not make any change "glaring".
    min_spread: float = 2.0


LIMITS = Limits()


class HeuristicQualityEvaluator:
    """QualityEvaluator from pixel measurements; no model, a few milliseconds per request."""

    name = "heuristic"

    def __init__(self, limits: Limits = LIMITS) -> None:
        self.limits = limits

    def evaluate(self, requests: Sequence[QualityRequest]) -> list[QualityReport]:
        return [self.evaluate_one(request) for request in requests]

    def evaluate_one(self, request: QualityRequest,
                     object_map: ObjectMap | None = None) -> QualityReport:
        """Judge one edit; pass ``object_map`` when the caller already has it for this image."""
        if object_map is None:
            object_map = find_object(request.normal)
        m = measure(request.normal, request.edited, object_map, self.limits)
        return score(m, object_map.is_texture, self.limits)


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

    # Regions: close small gaps so that one crack with a break is one region, then fill holes.
    closed = cv2.morphologyEx(changed.astype(np.uint8), cv2.MORPH_CLOSE,
                              cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    changed_per_label = np.bincount(labels[changed], minlength=n_labels)[1:]
    order = np.argsort(changed_per_label)[::-1]
    m["regions"] = float(n_labels - 1)
    m["top3_share"] = float(changed_per_label[order[:3]].sum() / count)
    main_labels = order[:3][changed_per_label[order[:3]] > 0] + 1
    region = fill_holes(np.isin(labels, main_labels))
    region_area = float(region.sum())
    m["region_pixels"] = region_area
    m["region_density"] = float(changed[region].sum() / max(region_area, 1.0))

    # Visibility: mean change over the region against the fine texture of the surface around it.
    m["mean_change"] = float(diff[region].mean())
    grey = cv2.cvtColor(normal, cv2.COLOR_RGB2GRAY).astype(np.float32)
    detail = grey - cv2.GaussianBlur(grey, (0, 0), 3.0)
    radius = int(np.clip(np.sqrt(region_area) / 2, 5, 25))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    ring = cv2.dilate(region.astype(np.uint8), kernel).astype(bool) & ~region
    if ring.sum() < 20:
        ring = np.ones_like(region)
    m["texture_spread"] = float(max(detail[ring].std(), limits.min_spread))
    m["contrast_ratio"] = m["mean_change"] / m["texture_spread"]

    m.update(_seam_measurements(normal, edited, diff, region, labels, main_labels))
    return m


def _seam_measurements(normal: np.ndarray, edited: np.ndarray, diff: np.ndarray,
                       region: np.ndarray, labels: np.ndarray,
                       main_labels: np.ndarray) -> dict[str, float]:
    """How hard and how straight the outline of the change is.

    A pasted patch changes the image as much at its outline as in its middle, along straight
    sides; a real defect fades out or follows an irregular path. Thin regions (lines, scratches)
    are left out of the straightness measure: a straight scratch is straight by nature.
    """
    region_u8 = region.astype(np.uint8)
    inner = region & ~cv2.erode(region_u8, np.ones((3, 3), np.uint8)).astype(bool)
    mean_change = float(diff[region].mean()) if region.any() else 0.0
    hardness = float(diff[inner].mean() / mean_change) if inner.any() and mean_change else 0.0

    grey_n = cv2.cvtColor(normal, cv2.COLOR_RGB2GRAY).astype(np.float32)
    grey_e = cv2.cvtColor(edited, cv2.COLOR_RGB2GRAY).astype(np.float32)
    outline = cv2.dilate(region_u8, np.ones((3, 3), np.uint8)).astype(bool) & ~cv2.erode(
        region_u8, np.ones((3, 3), np.uint8)).astype(bool)
    gradient_ratio = _gradient(grey_e)[outline].mean() / max(_gradient(grey_n)[outline].mean(), 1.0)

    straight = 0.0
    perimeter_total = 0.0
    for label in main_labels:
        component = (labels == label).astype(np.uint8)
        contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if not contours:
            continue
        contour = max(contours, key=cv2.contourArea)
        (_, _), (w, h), _ = cv2.minAreaRect(contour)
        perimeter = cv2.arcLength(contour, True)
        if min(w, h) < 8 or perimeter <= 0:
            continue
        polygon = cv2.approxPolyDP(contour, 1.5, True)[:, 0, :].astype(np.float32)
        sides = np.linalg.norm(np.roll(polygon, -1, axis=0) - polygon, axis=1)
        long_side = max(12.0, 0.1 * perimeter)
        straight += float(sides[sides >= long_side].sum())
        perimeter_total += perimeter
    return {
        "edge_hardness": hardness,
        "seam_gradient_ratio": float(gradient_ratio),
        "straight_outline_share": straight / perimeter_total if perimeter_total else 0.0,
    }


def _gradient(grey: np.ndarray) -> np.ndarray:
    return cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3),
                         cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3))


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
    measurements["min_area"] = m["min_area"] = min_area
    if m["changed_pixels"] < min_area:
        issues.append(Issue.TOO_SMALL)
    if m["size_share"] > limits.max_share:
        issues.append(Issue.TOO_LARGE)
    elif m["size_share"] > limits.large_share:
        penalties.append("large")
    if m["top3_share"] < limits.scattered_top3:
        issues.append(Issue.SCATTERED)
    elif m["top3_share"] < limits.split_top3:
        penalties.append("split")
    if m["on_object"] < 0.70:
        issues.append(Issue.OFF_OBJECT)

    level, ratio = m["mean_change"], m["contrast_ratio"]
    if level < limits.faint_level or ratio < limits.faint_ratio:
        issues.append(Issue.TOO_FAINT)
    elif level < limits.weak_level or ratio < limits.weak_ratio:
        penalties.append("weak")
    if level > limits.strong_level and ratio > limits.strong_ratio:
        issues.append(Issue.TOO_STRONG)

    hard = m["edge_hardness"] > limits.hard_edge
    if (hard and m["straight_outline_share"] > limits.straight_share
            and m["seam_gradient_ratio"] > limits.seam_gradient):
        issues.append(Issue.HARD_SEAMS)
    elif hard:
        penalties.append("hard_edge")

    location = _location_score(m["on_object"])
    if Issue.SCATTERED in issues or Issue.TOO_LARGE in issues:
        location = min(location, 2)

    quality = 5 - len(penalties)
    if {Issue.TOO_SMALL, Issue.TOO_LARGE, Issue.SCATTERED} & set(issues):
        quality = min(quality, 1)
    if {Issue.TOO_FAINT, Issue.TOO_STRONG, Issue.HARD_SEAMS} & set(issues):
        quality = min(quality, 2)
    quality = max(quality, 0)
    measurements["penalties"] = float(len(penalties))
    return QualityReport(location_score=location, quality_score=quality,
                         review=_review(m, issues, penalties, is_texture),
                         issues=issues, measurements=measurements)


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
    if Issue.SCATTERED in issues:
        where = (f"The change is scattered: {piece_text}, the three largest holding only "
                 f"{100 * m['top3_share']:.0f} % of the changed pixels")
    elif Issue.OFF_OBJECT in issues:
        where = (f"The change misses the {surface}: only {share:.0f} % of the changed pixels "
                 f"are on it ({piece_text})")
    else:
        where = f"The change sits on the {surface} ({share:.0f} % of changed pixels, {piece_text})"
    sentences = [where + "."]

    size = (f"It covers {m['changed_pixels']:.0f} px, {100 * m['size_share']:.2f} % of the "
            f"{surface}")
    if Issue.TOO_SMALL in issues:
        size += f", too small to see (below {m['min_area']:.0f} px)"
    elif Issue.TOO_LARGE in issues:
        size += ", far too large for a local defect"
    elif "large" in penalties:
        size += ", which is large for a local defect"
    sentences.append(size + ".")

    contrast = (f"{m['mean_change']:.1f} grey levels of change against a local texture spread "
                f"of {m['texture_spread']:.1f} (ratio {m['contrast_ratio']:.1f})")
    if Issue.TOO_FAINT in issues:
        sentences.append(f"It is too faint: {contrast}.")
    elif Issue.TOO_STRONG in issues:
        sentences.append(f"It is glaringly strong: {contrast}.")
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
