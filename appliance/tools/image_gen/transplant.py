"""Transplant: carry a real defect from the calibration bank onto a normal photo.

What moves is the defect's *deviation from its own surroundings*: the crop minus the surface
inpainted under its mask (``calibration.background_estimate``). Added onto the target, that
deviation takes the target's colour and shading with it, so a pit cut from a bright tile
stays a pit on a dark one; it is scaled by the ratio of the two surfaces' brightness (a
surface twice as bright shows a defect's shading twice as strongly) and by a random gain.
Before that the defect is flipped, rotated, scaled and warped elastically, its mask moving
with its pixels, and its edge is feathered by a one-pixel blur.

The mask returned is exactly the visibly changed pixels (holes inside a defect's footprint
filled), as for the procedural renderers: pixels outside it are the input's, bit for bit.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from appliance.imaging import CHANGE_THRESHOLD, change_map
from appliance.tools.image_gen.calibration import LUMA, BankCrop, background_estimate
from appliance.tools.image_gen.placement import foreground_bbox
from appliance.tools.interfaces import Box
from appliance.tools.object_map import fill_holes

SCALE_RANGE = (0.5, 2.0)  # never stretch a real defect further than this
FREE_SCALE = (0.8, 1.25)  # log-uniform, when no size is asked for
GAIN_RANGE = (0.8, 1.2)
BRIGHTNESS_RATIO = (0.6, 1.6)
MIN_ON_PART = 0.95  # share of a placed defect's mask that must lie on the part
PLACEMENT_TRIES = 40
BORDER_PX = 2
POSITION_JITTER = 0.08  # of the part's size, around a real defect's place
SIZE_PREFERENCE = 0.35  # log-size distance at which a crop's chance falls by e
LINE_ELONGATION = 3.0  # from this length-to-width ratio a defect is a line: scaled lengthwise only
FEATHER_SIGMA = 0.8


def _affine(shape: tuple[int, int], angle: float, scale: float, flip: bool,
            axis_deg: float = 0.0, across: float | None = None
            ) -> tuple[np.ndarray, tuple[int, int]]:
    """Matrix taking crop pixels to a fresh canvas that holds the whole turned crop, and its size.

    The crop is mirrored (``flip``), scaled by ``scale`` along its axis ``axis_deg`` and by
    ``across`` (default: ``scale`` too) across it, then turned by ``angle``.
    """
    height, width = shape
    to_centre = np.array([[1, 0, -width / 2.0], [0, 1, -height / 2.0], [0, 0, 1]])
    mirror = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    a = math.radians(axis_deg)
    along_x = np.array([[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0], [0, 0, 1]])
    stretch = np.diag([scale, scale if across is None else across, 1.0])
    t = math.radians(angle)
    turn = np.array([[math.cos(t), math.sin(t), 0], [-math.sin(t), math.cos(t), 0], [0, 0, 1]])
    matrix = (turn @ stretch @ along_x @ mirror @ to_centre)[:2]
    corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], np.float64)
    moved = corners @ matrix.T
    low = np.floor(moved.min(axis=0))
    size = np.ceil(moved.max(axis=0) - low).astype(int) + 1
    matrix[:, 2] -= low
    return matrix, (int(size[1]), int(size[0]))


def _elastic(shape: tuple[int, int], major_px: float, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """A smooth displacement field of a few percent of the defect's length (remap maps)."""
    height, width = shape
    sigma = max(2.0, 0.15 * major_px)
    amplitude = max(0.7, 0.04 * major_px)
    fields = []
    for _ in range(2):
        noise = cv2.GaussianBlur(rng.uniform(-1, 1, shape).astype(np.float32), (0, 0), sigma)
        peak = float(np.abs(noise).max()) or 1.0
        fields.append(noise / peak * amplitude)
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return grid_x + fields[0], grid_y + fields[1]


def _axis(mask: np.ndarray, flip: bool) -> tuple[float, float]:
    """(direction of the defect's long axis in degrees, as seen after mirroring; elongation)."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    if points is None or len(points) < 3:
        return 0.0, 1.0
    if flip:
        points = points.copy()
        points[..., 0] = mask.shape[1] - 1 - points[..., 0]
    (_, _), (w, h), angle = cv2.minAreaRect(points)
    if h > w:  # minAreaRect's angle is that of the side it calls width
        angle += 90.0
    # Image y points down: the rotation that brings this axis onto x is the angle itself.
    return float(angle), float(max(w, h) / max(min(w, h), 1.0))


def warp_crop(crop: BankCrop, scale: float, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray, dict]:
    """The crop's deviation from its surroundings (float (h, w, 3)) and its mask, turned, mirrored,
    scaled and warped; with what was drawn and the brightness of the crop's own surface
    (``surface_level``) under the defect."""
    background = background_estimate(crop.image, crop.mask).astype(np.float32)
    delta = crop.image.astype(np.float32) - background
    delta[~cv2.dilate(crop.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)] = 0.0
    angle = float(rng.uniform(0.0, 360.0))
    flip = bool(rng.random() < 0.5)
    # A longer crack or scratch is not a wider one: a line-like defect grows along its length
    # and keeps its real width.
    axis_deg, elongation = _axis(crop.mask, flip)
    across = 1.0 if elongation >= LINE_ELONGATION else None
    matrix, size = _affine(crop.mask.shape, angle, scale, flip, axis_deg, across)
    out_size = (size[1], size[0])
    delta = cv2.warpAffine(delta, matrix, out_size, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    coverage = cv2.warpAffine(crop.mask.astype(np.float32), matrix, out_size, flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    map_x, map_y = _elastic(size, crop.major_px * scale, rng)
    delta = cv2.remap(delta, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    coverage = cv2.remap(coverage, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    level = float((background @ LUMA)[crop.mask].mean())
    return delta, coverage >= 0.5, {"angle_deg": round(angle, 1), "mirrored": flip,
                                   "scale": round(scale, 3), "surface_level": round(level, 2)}


def _fit(delta: np.ndarray, mask: np.ndarray, shape: tuple[int, int], rng: np.random.Generator
         ) -> tuple[np.ndarray, np.ndarray]:
    """A defect larger than the frame (a crack across the whole part, turned) keeps a random
    frame-sized window of itself: it runs off the edges, as the real one did."""
    height, width = shape[0] - 2 * BORDER_PX, shape[1] - 2 * BORDER_PX
    mh, mw = mask.shape
    if mh <= height and mw <= width:
        return delta, mask
    y = int(rng.integers(0, max(mh - height, 0) + 1))
    x = int(rng.integers(0, max(mw - width, 0) + 1))
    window = (slice(y, y + min(mh, height)), slice(x, x + min(mw, width)))
    return delta[window], mask[window]


def _place(mask: np.ndarray, foreground: np.ndarray, taken: np.ndarray, region: Box | None,
           rng: np.random.Generator, positions: Sequence[Sequence[float]] = ()
           ) -> tuple[int, int] | None:
    """Top-left corner for ``mask`` on the part (inside ``region`` when given), or None.

    ``positions``: where on the part (0-1 of its bounding box) the real defects sat; the first
    half of the tries start near one of them, the rest anywhere on the part.
    """
    height, width = foreground.shape
    mh, mw = mask.shape
    allowed = foreground & ~taken
    if region is not None:
        inside = np.zeros_like(allowed)
        inside[region.y0:region.y1, region.x0:region.x1] = True
        allowed = allowed & inside if (allowed & inside).any() else allowed
    ys, xs = np.nonzero(allowed)
    if ys.size == 0:
        return None
    area = int(mask.sum())
    box = foreground_bbox(foreground)
    for attempt in range(PLACEMENT_TRIES):
        if positions and region is None and attempt < PLACEMENT_TRIES // 2:
            u, v = positions[int(rng.integers(len(positions)))]
            cx = box.x0 + u * box.width + rng.normal(0.0, POSITION_JITTER * box.width)
            cy = box.y0 + v * box.height + rng.normal(0.0, POSITION_JITTER * box.height)
        else:
            pick = int(rng.integers(ys.size))
            cx, cy = xs[pick], ys[pick]
        y = int(np.clip(round(cy) - mh // 2, BORDER_PX, max(height - mh - BORDER_PX, BORDER_PX)))
        x = int(np.clip(round(cx) - mw // 2, BORDER_PX, max(width - mw - BORDER_PX, BORDER_PX)))
        window = (slice(y, y + mh), slice(x, x + mw))
        if (foreground[window] & mask).sum() >= MIN_ON_PART * area and not (taken[window] & mask).any():
            return y, x
    return None


def _choose(crops: Sequence[BankCrop], size_px: float | None, rng: np.random.Generator) -> int:
    """A bank crop: with a size asked for, preferably one already about that size (the less a
    real defect is stretched, the more it looks like itself)."""
    if size_px is None:
        return int(rng.integers(len(crops)))
    gaps = np.array([abs(math.log(size_px / max(c.major_px, 1.0))) for c in crops])
    weights = np.exp(-gaps / SIZE_PREFERENCE)
    return int(rng.choice(len(crops), p=weights / weights.sum()))


def transplant(image: np.ndarray, foreground: np.ndarray, crops: Sequence[BankCrop], count: int,
               rng: np.random.Generator, size_px: float | None = None, region: Box | None = None,
               gray: bool = False, positions: Sequence[Sequence[float]] = ()
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Paste ``count`` real defects drawn from ``crops``; returns (edited, exact mask, details).

    ``size_px``: the major extent to scale each defect to (within ``SCALE_RANGE`` of its own);
    None keeps its own size give or take 25 %. ``positions``: the real defects' places on the
    part (``DefectPriors.positions``), preferred when no ``region`` is given.
    """
    if not crops:
        raise ValueError("transplant needs at least one bank crop")
    foreground = foreground.astype(bool)
    out = image.astype(np.float32)
    footprint = np.zeros(foreground.shape, dtype=bool)
    instances = []
    for _ in range(max(1, count)):
        index = _choose(crops, size_px, rng)
        crop = crops[index]
        if size_px is not None:
            scale = size_px / max(crop.major_px, 1.0)
        else:
            scale = math.exp(rng.uniform(math.log(FREE_SCALE[0]), math.log(FREE_SCALE[1])))
        scale = float(np.clip(scale, *SCALE_RANGE))
        delta, mask, drawn = warp_crop(crop, scale, rng)
        delta, mask = _fit(delta, mask, foreground.shape, rng)
        if not mask.any():
            continue
        corner = _place(mask, foreground, footprint, region, rng, positions)
        if corner is None:
            instances.append({"source": crop.source, "skipped": "no room on the part"})
            continue
        y, x = corner
        window = (slice(y, y + mask.shape[0]), slice(x, x + mask.shape[1]))
        target_level = float((out[window] @ LUMA)[mask].mean())
        crop_level = drawn.pop("surface_level")
        ratio = float(np.clip(target_level / max(crop_level, 1.0), *BRIGHTNESS_RATIO))
        gain = ratio * float(rng.uniform(*GAIN_RANGE))
        alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), FEATHER_SIGMA)
        alpha = np.maximum(alpha, 0.5 * mask)  # the defect's own pixels keep most of it
        change = delta * (gain * alpha)[..., None]
        if gray:
            change = np.repeat((change @ LUMA)[..., None], 3, axis=2)
        out[window] += change
        footprint[window] |= mask
        instances.append({"source": crop.source, "bank_index": index, "at": [x, y],
                          "size_px": round(crop.major_px * scale, 1), "gain": round(gain, 3),
                          **drawn})
    edited = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    edited[~foreground] = image[~foreground]
    visible = change_map(image, edited) > CHANGE_THRESHOLD
    grown = cv2.dilate(footprint.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    mask = (visible | (fill_holes(visible) & footprint)) & grown & foreground
    edited[~mask] = image[~mask]
    return edited, mask, {"family": "transplant", "instances": instances}
