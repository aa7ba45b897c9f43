"""Where a defect goes: on the object, where that kind of defect physically occurs.

Chips and breaks sit on the outline; "edge" and "corner" prompts hug the boundary band; "center"
stays near the centroid; "top"/"bottom"/"left"/"right" pick that part of the object; anything else
lands anywhere on the object, far enough inside that the whole defect fits. Nothing is ever
placed in the background. A full-frame texture has no outline, so the frame is the object and edge
words lean toward the frame border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.interfaces import Box

# Thin, line-like defects: their box is a rotated strip, not an ellipse.
LINE_FAMILIES = frozenset({"scratch", "crack", "fold", "cut", "cutpaste_scar"})
# Defects that exist only where the part meets the background.
OUTLINE_FAMILIES = frozenset({"missing"})
MIN_MAJOR_PX = {"line": 10.0, "blob": 5.0}


class ObjectLike(Protocol):
    """What placement needs from ``appliance.tools.object_map.ObjectMap``."""

    foreground: np.ndarray
    is_texture: bool
    background_color: tuple[int, int, int]

    def boundary_band(self, width_px: int) -> np.ndarray: ...


@dataclass
class Placement:
    boxes: list[Box]  # one per instance; the first is the main one
    center: tuple[float, float]  # (x, y) of the main instance
    orientation_deg: float | None  # the outline's direction when the defect should follow it
    anchor: str  # how the centre was chosen, e.g. "edge", "anywhere", "relaxed:center"
    axes: tuple[float, float] = (0.0, 0.0)  # (major, minor) in pixels
    notes: dict = field(default_factory=dict)

    @property
    def box(self) -> Box:
        return self.boxes[0]


def foreground_bbox(foreground: np.ndarray) -> Box:
    ys = np.flatnonzero(foreground.any(axis=1))
    xs = np.flatnonzero(foreground.any(axis=0))
    if ys.size == 0:
        return Box(0, 0, foreground.shape[1], foreground.shape[0])
    return Box(int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)


def object_extent(object_map: ObjectLike) -> float:
    """The object's characteristic length: geometric mean of its bounding-box sides."""
    box = foreground_bbox(object_map.foreground)
    return math.sqrt(max(box.width, 1) * max(box.height, 1))


def defect_axes(params: EditParams, family: str, extent: float) -> tuple[float, float]:
    """(major, minor) extent of one defect instance in pixels."""
    kind = "line" if family in LINE_FAMILIES else "blob"
    cap = 0.95 if kind == "line" else 0.8
    major = float(np.clip(params.size * extent, MIN_MAJOR_PX[kind], max(cap * extent, 6.0)))
    if family == "scratch":
        minor = max(3.0, 0.04 * major)
    elif family == "crack":
        minor = max(5.0, 0.15 * major)
    elif family == "cut":
        minor = max(5.0, 0.08 * major)
    elif family == "fold":
        minor = max(8.0, 0.25 * major)
    elif family == "cutpaste_scar":
        minor = float(np.clip(major / max(params.elongation * 2.0, 3.0), 2.0, 16.0))
    elif family == "contamination" and params.form == "fibre":
        minor = max(4.0, 0.4 * major)
    else:
        minor = major / max(params.elongation, 1.0)
    return major, max(minor, 2.0)


def half_extent(family: str, major: float, minor: float, theta_deg: float) -> tuple[float, float]:
    """Half width and height of the axis-aligned box around the rotated defect."""
    c, s = abs(math.cos(math.radians(theta_deg))), abs(math.sin(math.radians(theta_deg)))
    if family in LINE_FAMILIES:
        return (major * c + minor * s) / 2.0, (major * s + minor * c) / 2.0
    a, b = major / 2.0, minor / 2.0
    return math.hypot(a * c, b * s), math.hypot(a * s, b * c)


def box_around(cx: float, cy: float, hx: float, hy: float, shape: tuple[int, ...]) -> Box:
    height, width = shape[:2]
    x0, y0 = int(math.floor(cx - hx)), int(math.floor(cy - hy))
    x1, y1 = int(math.ceil(cx + hx)) + 1, int(math.ceil(cy + hy)) + 1
    return Box(max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))


def inside_distance(object_map: ObjectLike) -> np.ndarray:
    """Distance of each pixel to the object's outline (0 off the object); the frame counts."""
    if object_map.is_texture:
        height, width = object_map.foreground.shape
        ys = np.minimum(np.arange(height), np.arange(height)[::-1])[:, None] + 1
        xs = np.minimum(np.arange(width), np.arange(width)[::-1])[None, :] + 1
        return np.minimum(ys, xs).astype(np.float32)
    return distance_inside(object_map.foreground)


def distance_inside(mask: np.ndarray) -> np.ndarray:
    """Distance of each pixel of ``mask`` to the nearest pixel outside it (0 outside). Padded,
    so the frame counts as outside: OpenCV would otherwise take beyond the frame for more mask."""
    padded = np.pad(mask.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]


def _side_mask(side: str, foreground: np.ndarray) -> np.ndarray:
    """The third of the object toward ``side``."""
    box = foreground_bbox(foreground)
    mask = np.zeros(foreground.shape, dtype=bool)
    if side == "top":
        mask[box.y0:box.y0 + max(box.height // 3, 1), :] = True
    elif side == "bottom":
        mask[box.y1 - max(box.height // 3, 1):box.y1, :] = True
    elif side == "left":
        mask[:, box.x0:box.x0 + max(box.width // 3, 1)] = True
    elif side == "right":
        mask[:, box.x1 - max(box.width // 3, 1):box.x1] = True
    return mask & foreground


def _facing_mask(side: str, inside: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Ring pixels whose nearest outline lies toward ``side``: the "top edge", not the top third."""
    gy, gx = np.gradient(cv2.GaussianBlur(inside.astype(np.float32), (0, 0), 2.0))
    # The inside distance grows away from the outline, so the outline lies against its gradient.
    # Near a corner's bisector two outlines are equally near and the smoothed gradient weakens:
    # those pixels face no single side.
    clear = np.hypot(gx, gy) > 0.85
    vertical = clear & (np.abs(gy) > np.abs(gx))
    horizontal = clear & (np.abs(gx) > np.abs(gy))
    toward = {"top": vertical & (gy > 0), "bottom": vertical & (gy < 0),
              "left": horizontal & (gx > 0), "right": horizontal & (gx < 0)}[side]
    return ring & toward


def _corner_mask(object_map: ObjectLike, ring: np.ndarray, extent: float) -> np.ndarray:
    """Ring pixels where the object is most convex (little of the disc around them is part)."""
    if not ring.any():
        return ring
    if object_map.is_texture:
        height, width = ring.shape
        reach = max(int(0.2 * min(height, width)), 2)
        corners = np.zeros_like(ring)
        for ys in (slice(0, reach), slice(height - reach, height)):
            for xs in (slice(0, reach), slice(width - reach, width)):
                corners[ys, xs] = True
        return ring & corners
    kernel = max(int(0.15 * extent) | 1, 5)
    share = cv2.blur(object_map.foreground.astype(np.float32), (kernel, kernel))
    cutoff = np.percentile(share[ring], 12)
    return ring & (share <= cutoff)


def _near_centroid(foreground: np.ndarray, allowed: np.ndarray, extent: float) -> np.ndarray:
    ys, xs = np.nonzero(foreground)
    cy, cx = ys.mean(), xs.mean()
    yy, xx = np.nonzero(allowed)
    if yy.size == 0:
        return allowed
    distance = np.hypot(yy - cy, xx - cx)
    # The centroid of a ring-shaped part is off the part: take the closest part pixels then.
    limit = max(0.12 * extent, float(np.percentile(distance, 3)))
    near = np.zeros_like(allowed)
    keep = distance <= limit
    near[yy[keep], xx[keep]] = True
    return near


def _runs_inward(params: EditParams, family: str) -> bool:
    """A line that starts at the outline and runs into the part ("a crack running in from the
    edge"), rather than one lying along the outline."""
    return (family in LINE_FAMILIES and params.edge_mode == "inward"
            and "orientation_deg" not in params.specified)


def _candidates(object_map: ObjectLike, params: EditParams, family: str, inside: np.ndarray,
                half: tuple[float, float], major: float, minor: float,
                extent: float) -> tuple[np.ndarray, str]:
    """Allowed centre pixels, relaxing the wish step by step when it cannot be met."""
    fg = object_map.foreground
    location, side = params.location, params.side
    fit = max(min(half), 1.0)  # keep the defect's short half inside the object at least
    band = max(3.0, 0.05 * extent)
    wishes: list[tuple[str, np.ndarray]] = []

    if family in OUTLINE_FAMILIES and not object_map.is_texture:
        outline = fg & (inside <= 2.0)
        if location == "corner":
            wishes.append(("corner", _corner_mask(object_map, outline, extent)))
        place_side = side or (location if location in ("top", "bottom", "left", "right") else None)
        if place_side:
            facing = _facing_mask(place_side, inside, fg & (inside <= 3.0))
            wishes.append((f"edge:{place_side}", facing & outline))
        wishes.append(("edge", outline))
    else:
        if location in ("edge", "corner"):
            # A chip near the edge of a full-frame face: wholly inside the frame, so that its
            # box is not cut short by the border (the photo does not show where the part ends).
            inner = minor / 2.0 + 1.0 if family not in OUTLINE_FAMILIES else max(half) + 1.0
            if _runs_inward(params, family):
                # The centre half a length in, so that the line starts at the outline.
                inner, band = 0.45 * major, 3.0
            ring = fg & (inside >= inner) & (inside <= inner + band)
            if location == "corner":
                corner = _corner_mask(object_map, ring, extent)
                if side:
                    wishes.append((f"corner:{side}", corner & _side_mask(side, fg)))
                wishes.append(("corner", corner))
            if side:
                wishes.append((f"edge:{side}", _facing_mask(side, inside, ring)))
            wishes.append(("edge", ring))
        elif location == "center":
            wishes.append(("center", _near_centroid(fg, fg & (inside >= fit), extent)))
        elif location in ("top", "bottom", "left", "right"):
            wishes.append((location, _side_mask(location, fg) & (inside >= fit)))
    # Anywhere on the object, as far inside as the defect needs, then less.
    wishes.append(("anywhere", fg & (inside >= max(half))))
    wishes.append(("anywhere", fg & (inside >= fit)))
    wishes.append(("anywhere", fg & (inside >= min(fit, 2.0))))
    wishes.append(("anywhere", fg))

    first = wishes[0][0]
    for name, allowed in wishes:
        if allowed.any():
            return allowed, (name if name == first else f"relaxed:{name}")
    return np.ones_like(fg), "frame"


def _tangent_deg(object_map: ObjectLike, inside: np.ndarray, cx: float, cy: float,
                 reach: float) -> float:
    """Direction of the outline nearest to (cx, cy): the main axis of the outline pixels
    within ``reach`` of the nearest one (robust near corners, unlike a distance gradient)."""
    height, width = inside.shape
    x, y = int(round(min(max(cx, 0), width - 1))), int(round(min(max(cy, 0), height - 1)))
    r = int(math.ceil(float(inside[y, x]) + reach + 2))
    y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, height), max(x - r, 0), min(x + r + 1, width)
    outline = (inside[y0:y1, x0:x1] <= 1.0) & object_map.foreground[y0:y1, x0:x1]
    ys, xs = np.nonzero(outline)
    if ys.size < 2:
        return 0.0
    ys, xs = ys + y0, xs + x0
    nearest = int(np.argmin(np.hypot(xs - cx, ys - cy)))
    close = np.hypot(xs - xs[nearest], ys - ys[nearest]) <= reach
    points = np.stack([xs[close], ys[close]], axis=1).astype(np.float64)
    if len(points) < 2:
        return 0.0
    points -= points.mean(axis=0)
    _, vectors = np.linalg.eigh(points.T @ points)
    major = vectors[:, -1]
    return math.degrees(math.atan2(major[1], major[0])) % 180.0


def cluster_centres(object_map: ObjectLike, family: str,
                    inside: np.ndarray | None = None) -> np.ndarray:
    """Where further instances of a defect may be centred: the outline for bites, else the part."""
    inside = inside_distance(object_map) if inside is None else inside
    if family in OUTLINE_FAMILIES and not object_map.is_texture:
        allowed = object_map.foreground & (inside <= 2.0)
    else:
        allowed = object_map.foreground & (inside >= 2.0)
    return allowed if allowed.any() else object_map.foreground


def instance_boxes(primary: Box, count: int, allowed: np.ndarray,
                   rng: np.random.Generator) -> list[Box]:
    """The main box plus ``count - 1`` same-size boxes close to it, centred on ``allowed``."""
    boxes = [primary]
    if count <= 1:
        return boxes
    shape = allowed.shape
    hx, hy = primary.width / 2.0, primary.height / 2.0
    cx, cy = primary.x0 + hx, primary.y0 + hy
    reach = 2.5 * max(hx, hy) + 4.0
    near_box = box_around(cx, cy, reach, reach, shape)
    ys, xs = np.nonzero(allowed[near_box.y0:near_box.y1, near_box.x0:near_box.x1])
    ys, xs = ys + near_box.y0, xs + near_box.x0
    near = np.hypot(xs - cx, ys - cy)
    pool = np.flatnonzero((near <= reach) & (near >= 0.8 * min(hx, hy)))
    for _ in range(count - 1):
        if pool.size == 0:
            break
        pick = pool[int(rng.integers(pool.size))]
        boxes.append(box_around(float(xs[pick]), float(ys[pick]), hx, hy, shape))
    return boxes


def instances_within(region: Box, count: int, allowed: np.ndarray,
                     rng: np.random.Generator) -> list[Box]:
    """``count`` boxes that share a given region (a policy's box is a promise about where the
    defect is, so several pieces split it rather than spilling out of it)."""
    if count <= 1:
        return [region]
    scale = 1.1 / math.sqrt(count)
    hx, hy = max(region.width * scale / 2.0, 2.0), max(region.height * scale / 2.0, 2.0)
    inner = Box(int(math.ceil(region.x0 + hx)), int(math.ceil(region.y0 + hy)),
                int(math.floor(region.x1 - hx)) + 1, int(math.floor(region.y1 - hy)) + 1)
    if inner.width < 1 or inner.height < 1:
        return [region]
    ys, xs = np.nonzero(allowed[inner.y0:inner.y1, inner.x0:inner.x1])
    if ys.size == 0:
        return [region]
    picks = rng.choice(ys.size, size=min(count, ys.size), replace=False)
    return [box_around(float(xs[i] + inner.x0), float(ys[i] + inner.y0), hx, hy, allowed.shape)
            for i in picks]


def place(object_map: ObjectLike, params: EditParams, family: str, image_shape: tuple[int, ...],
          rng: np.random.Generator) -> Placement:
    """Choose where every instance of the defect goes."""
    extent = object_extent(object_map)
    major, minor = defect_axes(params, family, extent)
    theta = params.orientation_deg if params.orientation_deg is not None else 0.0
    half = half_extent(family, major, minor, theta)
    inside = inside_distance(object_map)
    allowed, anchor = _candidates(object_map, params, family, inside, half, major, minor, extent)

    ys, xs = np.nonzero(allowed)
    pick = int(rng.integers(ys.size))
    cx, cy = float(xs[pick]), float(ys[pick])

    orientation = None
    follows_edge = any(part in ("edge", "corner") for part in anchor.split(":"))
    if (family in LINE_FAMILIES and follows_edge
            and "orientation_deg" not in params.specified):
        # Edge cracks, frays and scratches run along the outline unless told otherwise.
        orientation = _tangent_deg(object_map, inside, cx, cy, max(6.0, 0.25 * major))
        if _runs_inward(params, family):
            orientation = (orientation + 90.0) % 180.0
        half = half_extent(family, major, minor, orientation)

    primary = box_around(cx, cy, half[0], half[1], image_shape)
    boxes = instance_boxes(primary, params.count, cluster_centres(object_map, family, inside), rng)
    return Placement(boxes=boxes, center=(cx, cy), orientation_deg=orientation, anchor=anchor,
                     axes=(round(major, 2), round(minor, 2)),
                     notes={"extent_px": round(extent, 2)})


def choose_region(object_map: ObjectLike, params: EditParams, family: str,
                  image_shape: tuple[int, ...], rng: np.random.Generator) -> Box:
    """The box of the main defect instance (see ``place`` for all instances)."""
    return place(object_map, params, family, image_shape, rng).box


@dataclass
class MaskObjectMap:
    """An object map built from a bare foreground mask (same attributes as ``ObjectMap``)."""

    foreground: np.ndarray
    is_texture: bool
    background_color: tuple[int, int, int]

    def boundary_band(self, width_px: int) -> np.ndarray:
        return self.foreground & (inside_distance(self) <= max(int(width_px), 1))

    @classmethod
    def from_mask(cls, image: np.ndarray, foreground: np.ndarray) -> "MaskObjectMap":
        foreground = foreground.astype(bool)
        is_texture = bool(foreground.all())
        # A sparse sample is plenty for a median colour and keeps this at well under a ms.
        pixels = image[::4, ::4][~foreground[::4, ::4]] if not is_texture else None
        if pixels is None or len(pixels) == 0:
            pixels = image[::4, ::4].reshape(-1, 3)
        color = tuple(int(c) for c in np.median(pixels, axis=0))
        return cls(foreground, is_texture, color)  # type: ignore[arg-type]
