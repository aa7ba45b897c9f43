"""Defect masks from the difference between the normal and the edited image.

A procedural renderer knows its defect's footprint, but that footprint includes soft fringes
where the edit is too faint to see; a diffusion editor knows no footprint at all. Either way the
pixels decide: the mask is where the image visibly changed (``imaging.CHANGE_THRESHOLD``), cleaned
into a few solid regions. With a hint the mask never leaves the hint; without one it is whatever
changed significantly. The confidence says how well the final mask explains the change.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from skimage.filters import threshold_otsu

from appliance.imaging import CHANGE_THRESHOLD, change_map, mask_iou
from appliance.tools.interfaces import MaskRequest, MaskResult
from appliance.tools.object_map import fill_holes

# Without a hint, a change over more than this share of the frame is treated as a global drift
# (a diffusion round trip, a brightness change) and the threshold rises above the drift (Otsu's
# split of the change map or the drift's robust upper bound), so that only the part that changed
# most remains.
DIFFUSE_SHARE = 0.30
# Components smaller than this many pixels, or this share of the largest one, are specks.
MIN_SPECK_PIXELS = 6
MIN_COMPONENT_SHARE = 0.02


class DifferenceMaskGenerator:
    """MaskGenerator from pixel differences, refining the renderer's footprint when given."""

    name = "difference"

    def generate_masks(self, requests: Sequence[MaskRequest]) -> list[MaskResult]:
        return [self.generate_one(request) for request in requests]

    def generate_one(self, request: MaskRequest) -> MaskResult:
        diff = change_map(request.normal, request.edited)
        changed = diff > CHANGE_THRESHOLD
        if request.hint is not None:
            hint = np.asarray(request.hint, dtype=bool)
            if hint.shape != changed.shape:
                raise ValueError(f"hint shape {hint.shape} does not match image {changed.shape}")
            mask = refine_hint(hint, changed)
            return MaskResult(mask, mask_iou(mask, changed), float(CHANGE_THRESHOLD),
                              "hint_refined")
        mask, threshold = mask_from_difference(diff)
        return MaskResult(mask, mask_iou(mask, changed), threshold, "difference")


def refine_hint(hint: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """The hint's pixels that actually changed, gaps closed, specks dropped, holes filled.

    Everything stays inside the hint: the renderer drew nothing outside it, so a change there
    is not this defect. When nothing of the hint changed visibly, the hint itself is returned
    (the defect may be faint, and an empty mask would lose it).
    """
    if not hint.any():
        return hint.copy()
    kept = hint & changed
    if not kept.any():
        return hint.copy()
    mask = _clean(kept) & hint
    return mask if mask.any() else hint.copy()


def mask_from_difference(diff: np.ndarray) -> tuple[np.ndarray, float]:
    """Threshold the change map and clean it; empty only when nothing changed."""
    threshold = float(CHANGE_THRESHOLD)
    raw = diff > threshold
    if not raw.any():
        return raw, threshold
    if raw.mean() > DIFFUSE_SHARE and diff.max() > diff.min():
        split = max(float(threshold_otsu(diff)), _drift_bound(diff))
        if split > threshold and (diff > split).any():
            threshold = split
            raw = diff > threshold
    mask = _clean(raw)
    if not mask.any():
        # Only specks changed: keep them rather than report no change.
        mask = raw
    return mask, threshold


def _drift_bound(diff: np.ndarray) -> float:
    """The top of a global drift: its median plus five robust standard deviations.

    Otsu splits a bimodal map well (drift against a large defect) but puts a unimodal drift's
    own tail above its split; this bound stays above that tail.
    """
    sample = diff[::2, ::2].astype(np.float32)
    median = float(np.median(sample))
    spread = 1.4826 * float(np.median(np.abs(sample - median)))
    return median + 5.0 * spread


def _clean(raw: np.ndarray) -> np.ndarray:
    """Close small gaps, drop specks, fill holes; computed on the bounding box for speed."""
    rows, cols = np.nonzero(raw)
    height, width = raw.shape
    y0, y1 = max(rows.min() - 4, 0), min(rows.max() + 5, height)
    x0, x1 = max(cols.min() - 4, 0), min(cols.max() + 5, width)
    crop = raw[y0:y1, x0:x1].astype(np.uint8)
    # A 3x3 closing joins the broken pieces of a thin line without fattening it; an opening would
    # erase one-pixel scratches, so specks are removed by size instead.
    closed = cv2.morphologyEx(crop, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    closed = _bridge_gaps(closed)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    mask = np.zeros(raw.shape, dtype=bool)
    if count <= 1:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    floor = max(MIN_SPECK_PIXELS, MIN_COMPONENT_SHARE * float(areas.max()))
    keep = np.flatnonzero(areas >= floor) + 1
    if keep.size == 0:
        return mask
    mask[y0:y1, x0:x1] = fill_holes(np.isin(labels, keep))
    return mask


def _bridge_gaps(closed: np.ndarray) -> np.ndarray:
    """Join pieces one pixel apart in any direction (a thin line that broke where it stepped
    diagonally): the unset pixels touching two different pieces are added, and only those. A
    3x3 closing alone joins gaps along a row or column only; a wider closing would also fill the
    acute corners of one jagged piece, which did not change."""
    count, labels = cv2.connectedComponents(closed, connectivity=8)
    if count <= 2:
        return closed
    square = np.ones((3, 3), np.uint8)
    labels = labels.astype(np.float32)
    highest = cv2.dilate(labels, square)
    lowest = -cv2.dilate(np.where(labels > 0, -labels, -np.float32(count)), square)
    between = (labels == 0) & (highest > 0) & (highest != lowest)
    return (closed.astype(bool) | between).astype(np.uint8)
