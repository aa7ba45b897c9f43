"""What every renderer shares: the working window, geometry helpers, and the mask contract.

A renderer paints into a float copy of a small window around its region and returns it. The
common ``finalize`` step then enforces what the rest of the product relies on: pixels outside the
mask are bit-identical to the input, the mask is inside the object, and the mask is the set of
pixels that actually changed (so IoU with ``changed_pixels`` stays high, >= 0.9 by construction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy import ndimage

from appliance.imaging import CHANGE_THRESHOLD
from appliance.tools.image_gen.noise import fractal_noise, value_noise
from appliance.tools.interfaces import Box

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Pixels whose change is at most this many levels are put back exactly; above it they join the
# mask. Starting below CHANGE_THRESHOLD keeps the step at the mask border small (invisible)
# while the IoU target picks the final value (see ``finalize``).
LOWEST_REVERT_LEVEL = 3
TARGET_IOU = 0.9
SUPERSAMPLE = 4  # strokes are drawn 4x larger and averaged down: anti-aliased coverage


@dataclass
class Canvas:
    """The window a renderer paints in; all coordinates are window pixels."""

    image: np.ndarray  # the whole current image, uint8 RGB (source of patches from elsewhere)
    foreground: np.ndarray  # the whole object mask, bool
    window: Box  # the window in image coordinates
    region: Box  # the defect's box in window coordinates
    base: np.ndarray  # float32 (h, w, 3) copy of the window
    fg: np.ndarray  # bool (h, w) object mask in the window
    gray: bool  # grayscale input: the result must stay grayscale
    light_deg: float  # direction the light comes from, image coordinates (y down)
    is_texture: bool
    background_color: tuple[int, int, int] | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape[0], self.base.shape[1]

    @property
    def center(self) -> tuple[float, float]:
        r = self.region
        return (r.x0 + r.x1 - 1) / 2.0, (r.y0 + r.y1 - 1) / 2.0

    @property
    def light(self) -> tuple[float, float]:
        """Unit vector (x, y) pointing toward the light."""
        angle = math.radians(self.light_deg)
        return math.cos(angle), math.sin(angle)

    def luma(self) -> np.ndarray:
        return self.base @ LUMA

    def surface_level(self) -> float:
        """Median brightness of the object inside the region: decides which polarity shows."""
        r = self.region
        patch = self.luma()[r.y0:r.y1, r.x0:r.x1][self.fg[r.y0:r.y1, r.x0:r.x1]]
        return float(np.median(patch)) if patch.size else float(np.median(self.luma()))

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) pixel coordinates, broadcastable to (h, w)."""
        height, width = self.shape
        return (np.arange(width, dtype=np.float32)[None, :],
                np.arange(height, dtype=np.float32)[:, None])

    def frame(self, theta_deg: float, center: tuple[float, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """(u, v): coordinates along and across the direction ``theta_deg`` from the centre."""
        cx, cy = center if center is not None else self.center
        x, y = self.grid()
        c, s = math.cos(math.radians(theta_deg)), math.sin(math.radians(theta_deg))
        dx, dy = x - cx, y - cy
        return dx * c + dy * s, -dx * s + dy * c

    def ellipse_axes(self, elongation: float, theta_deg: float) -> tuple[float, float]:
        """Semi-axes (a, b), b = a / elongation, of the largest such ellipse inside the region."""
        e = max(elongation, 1.0)
        c, s = abs(math.cos(math.radians(theta_deg))), abs(math.sin(math.radians(theta_deg)))
        half_w, half_h = self.region.width / 2.0, self.region.height / 2.0
        a = min(half_w / max(math.hypot(c, s / e), 1e-6), half_h / max(math.hypot(s, c / e), 1e-6))
        return max(a, 1.5), max(a / e, 1.0)

    def line_length(self, theta_deg: float, thickness: float = 0.0) -> float:
        """Length of the longest strip at ``theta_deg`` through the region's centre that fits."""
        c, s = abs(math.cos(math.radians(theta_deg))), abs(math.sin(math.radians(theta_deg)))
        limits = []
        if c > 1e-3:
            limits.append((self.region.width - thickness * s) / c)
        if s > 1e-3:
            limits.append((self.region.height - thickness * c) / s)
        return max(min(limits), 4.0)

    def ellipse_radius(self, a: float, b: float, theta_deg: float,
                       center: tuple[float, float] | None = None) -> np.ndarray:
        """Normalised elliptic radius: 1 on the ellipse outline."""
        u, v = self.frame(theta_deg, center)
        return np.sqrt((u / a) ** 2 + (v / b) ** 2)


@dataclass
class Rendered:
    image: np.ndarray  # float32 (h, w, 3): the edited window
    # Where the defect is meant to be: small gaps of the change inside it join the mask (a dent's
    # shading crosses zero inside the dent; that line is still part of the dent).
    support: np.ndarray | None = None
    details: dict = field(default_factory=dict)
    median_filter: int = 0  # NSA smooths its change mask with a median filter of this size
    # The object's pixels as the renderer refined them (a bite must take the part's last pixel
    # column too, which a coarse foreground mask can miss); None = the canvas foreground.
    object_pixels: np.ndarray | None = None


def make_canvas(image: np.ndarray, foreground: np.ndarray, box: Box, gray: bool, light_deg: float,
                is_texture: bool, background_color: tuple[int, int, int] | None,
                margin: float = 0.35) -> Canvas:
    """The window around ``box`` with room for soft edges, rims and displaced texture."""
    height, width = foreground.shape
    pad = int(round(max(box.width, box.height) * margin)) + 6
    window = Box(max(box.x0 - pad, 0), max(box.y0 - pad, 0),
                 min(box.x1 + pad, width), min(box.y1 + pad, height))
    region = Box(box.x0 - window.x0, box.y0 - window.y0, box.x1 - window.x0, box.y1 - window.y0)
    crop = image[window.y0:window.y1, window.x0:window.x1]
    return Canvas(image=image, foreground=foreground, window=window, region=region,
                  base=crop.astype(np.float32),
                  fg=foreground[window.y0:window.y1, window.x0:window.x1],
                  gray=gray, light_deg=light_deg, is_texture=is_texture,
                  background_color=background_color)


def finalize(canvas: Canvas, rendered: Rendered, original: np.ndarray | None = None,
             prior: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Round the edit, keep it on the object, and make the mask exactly the changed pixels.

    ``original`` is the untouched input under the window and ``prior`` the mask of instances
    already painted there (both default to "nothing painted yet"): change is always measured
    against the input, so several overlapping instances still give one exact mask.
    """
    current = np.rint(canvas.base).astype(np.uint8)
    original = current if original is None else original
    prior = np.zeros(canvas.shape, dtype=bool) if prior is None else prior
    on_object = canvas.fg if rendered.object_pixels is None else rendered.object_pixels
    out = rendered.image
    if canvas.gray:
        out = np.repeat((out @ LUMA)[..., None], 3, axis=2)
    edited = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    edited[~on_object] = current[~on_object]
    diff = np.abs(edited.astype(np.int16) - original.astype(np.int16)).max(axis=2)
    strong = diff > CHANGE_THRESHOLD
    support = None if rendered.support is None else rendered.support & on_object

    # Gaps in the change inside the defect's own footprint (a dent's shading crosses zero) are
    # part of the defect: fill them once, on the visible change.
    gaps = np.zeros_like(strong)
    if support is not None and strong.any():
        closed = cv2.morphologyEx(strong.astype(np.uint8), cv2.MORPH_CLOSE,
                                  np.ones((3, 3), np.uint8)).astype(bool)
        gaps = (closed | ndimage.binary_fill_holes(strong)) & support & ~strong

    # Try the lowest revert level first (smallest step at the mask border), with the footprint's
    # gaps filled, then without them; the last resort (mask == strong) is exact.
    options = [(lvl, gaps) for lvl in range(LOWEST_REVERT_LEVEL, CHANGE_THRESHOLD + 1)]
    if gaps.any():
        options += [(lvl, None) for lvl in range(LOWEST_REVERT_LEVEL, CHANGE_THRESHOLD + 1)]
    mask, level = strong, CHANGE_THRESHOLD
    for level, fill in options:
        candidate = diff > level
        if fill is not None:
            candidate = candidate | fill
        if rendered.median_filter and candidate.any():
            candidate = cv2.medianBlur(candidate.astype(np.uint8) * 255,
                                       rendered.median_filter) > 127
            candidate &= on_object
        kept = int((strong & candidate).sum())
        if kept >= TARGET_IOU * int(candidate.sum()):
            mask = candidate
            break
    else:
        mask, level = strong, CHANGE_THRESHOLD
    # Outside this instance's mask: earlier instances stay as painted, the rest is the input.
    result = np.where(mask[..., None], edited, np.where(prior[..., None], current, original))
    return result, mask | prior, {"revert_level": level}


# --- shapes ------------------------------------------------------------------------------------


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def irregular_radius(canvas: Canvas, radius: np.ndarray, roughness: float, a: float,
                     rng: np.random.Generator, amount: float = 0.35) -> np.ndarray:
    """Perturb an elliptic radius field so the outline wobbles; more with ``roughness``.

    The wobble only pulls the outline inward, so the shape never leaves its region's ellipse
    (a box given by the policy or by placement is a promise about where the defect is).
    """
    # Lattice cells about the size of the defect, so the wobble has a few lobes around it.
    longer = max(canvas.shape)
    cells = max(2.0, 2.5 * longer / max(2.0 * a, 1.0))
    noise = fractal_noise(canvas.shape, rng, base_cells=cells, octaves=3, persistence=0.55,
                          max_side=64)
    return radius * (1.0 + amount * (0.25 + roughness) * (noise + 1.0) / 2.0)


def mottle(canvas: Canvas, rng: np.random.Generator, cell_px: float) -> np.ndarray:
    """Smooth noise in [-1, 1] over the window."""
    return value_noise(canvas.shape, rng, cell_px)


def along_profile(n: int, rng: np.random.Generator, knots: int = 6) -> np.ndarray:
    """A smooth random 1-D profile in [0, 1] of length ``n`` (variation along a stroke)."""
    xs = np.linspace(0.0, 1.0, knots)
    values = rng.random(knots)
    return np.interp(np.linspace(0.0, 1.0, max(n, 2)), xs, values)


def taper(n: int, power: float = 0.5, floor: float = 0.25, open_start: bool = False) -> np.ndarray:
    """Width profile that thins toward both ends of a stroke, or only toward its last point
    when ``open_start`` (a crack is widest where it opens, at the edge it ran in from)."""
    t = np.linspace(0.0, 1.0, max(n, 2))
    shape = np.cos(0.5 * np.pi * t) if open_start else np.sin(np.pi * t)
    return floor + (1.0 - floor) * shape ** power


# --- strokes -----------------------------------------------------------------------------------


def bezier(points: np.ndarray, n: int) -> np.ndarray:
    """Points on the Bezier curve with control ``points`` (k, 2)."""
    t = np.linspace(0.0, 1.0, max(n, 2))[:, None]
    degree = len(points) - 1
    curve = np.zeros((t.shape[0], 2))
    for i, point in enumerate(points):
        weight = math.comb(degree, i) * t ** i * (1.0 - t) ** (degree - i)
        curve += weight * point[None, :]
    return curve


def midpoint_path(start: np.ndarray, end: np.ndarray, roughness: float, segment_px: float,
                  rng: np.random.Generator, decay: float = 1.0) -> np.ndarray:
    """A jagged fractal polyline from ``start`` to ``end`` (midpoint displacement).

    Each level displaces the midpoints by a share of their segment's length, ``decay`` times
    the previous level's share: 1 is self-similar (the path gets ever more tortuous the finer it
    is cut), below 1 keeps the fine jags while the path as a whole stays roughly straight.
    """
    points = np.stack([start, end]).astype(np.float64)
    scale = 0.1 + 0.25 * roughness
    while np.linalg.norm(points[1] - points[0]) > segment_px:
        delta = points[1:] - points[:-1]
        lengths = np.linalg.norm(delta, axis=1, keepdims=True)
        normal = np.stack([-delta[:, 1], delta[:, 0]], axis=1) / np.maximum(lengths, 1e-9)
        offsets = rng.normal(0.0, 1.0, (len(delta), 1)) * scale * lengths
        mids = (points[:-1] + points[1:]) / 2.0 + normal * offsets
        merged = np.empty((len(points) + len(mids), 2))
        merged[0::2], merged[1::2] = points, mids
        points = merged
        scale *= decay
    return points


def stroke_coverage(shape: tuple[int, int], strokes: list[tuple[np.ndarray, np.ndarray]],
                    values: list[np.ndarray] | None = None) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of polylines with per-point widths (pixels).

    ``values`` optionally gives per-point intensities in [0, 1] (drawn as grey levels), so a
    stroke can fade along its length. Drawing happens at SUPERSAMPLE x inside the strokes' bounds.
    """
    height, width = shape
    all_points = np.concatenate([points for points, _ in strokes])
    pad = max(float(max(w.max() for _, w in strokes)), 1.0) + 2.0
    x0 = int(max(math.floor(all_points[:, 0].min() - pad), 0))
    y0 = int(max(math.floor(all_points[:, 1].min() - pad), 0))
    x1 = int(min(math.ceil(all_points[:, 0].max() + pad) + 1, width))
    y1 = int(min(math.ceil(all_points[:, 1].max() + pad) + 1, height))
    coverage = np.zeros(shape, dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return coverage
    ss = SUPERSAMPLE
    big = np.zeros(((y1 - y0) * ss, (x1 - x0) * ss), dtype=np.uint8)
    shift = 4  # cv2 fixed point: coordinates in 1/16 pixel
    for index, (points, widths) in enumerate(strokes):
        # Pixel centres sit at +0.5 in the supersampled grid.
        scaled = ((points - [x0, y0]) * ss + (ss - 1) / 2.0) * (1 << shift)
        scaled = np.rint(scaled).astype(np.int64)
        level = None if values is None else values[index]
        for i in range(len(points) - 1):
            thickness = max(int(round(0.5 * (widths[i] + widths[i + 1]) * ss)), 1)
            grey = 255 if level is None else int(round(255 * float(level[i])))
            if grey <= 0:
                continue
            cv2.line(big, (int(scaled[i, 0]), int(scaled[i, 1])),
                     (int(scaled[i + 1, 0]), int(scaled[i + 1, 1])), grey, thickness,
                     cv2.LINE_AA, shift)
    small = cv2.resize(big, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    coverage[y0:y1, x0:x1] = small.astype(np.float32) / 255.0
    return coverage


def polygon_coverage(shape: tuple[int, int], polygons: list[np.ndarray],
                     levels: list[float] | None = None) -> np.ndarray:
    """Anti-aliased coverage of filled polygons (window pixel coordinates)."""
    height, width = shape
    ss, shift = SUPERSAMPLE, 4
    big = np.zeros((height * ss, width * ss), dtype=np.uint8)
    for index, polygon in enumerate(polygons):
        scaled = np.rint((polygon * ss + (ss - 1) / 2.0) * (1 << shift)).astype(np.int32)
        grey = 255 if levels is None else int(round(255 * levels[index]))
        cv2.fillPoly(big, [scaled.reshape(-1, 1, 2)], grey, cv2.LINE_AA, shift)
    return cv2.resize(big, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def blob_polygon(cx: float, cy: float, a: float, b: float, theta_deg: float, vertices: int,
                 jitter: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular closed polygon around an ellipse: angular chips, particles, bites."""
    angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, vertices))
    radii = 1.0 + jitter * rng.uniform(-1.0, 1.0, vertices)
    px, py = a * radii * np.cos(angles), b * radii * np.sin(angles)
    c, s = math.cos(math.radians(theta_deg)), math.sin(math.radians(theta_deg))
    return np.stack([cx + px * c - py * s, cy + px * s + py * c], axis=1)


# --- colour --------------------------------------------------------------------------------------


def darken(base: np.ndarray, amount: np.ndarray, floor_levels: float = 0.0) -> np.ndarray:
    """Multiply down by ``amount`` (0-1 per pixel) plus an absolute push for dark surfaces."""
    amount = amount[..., None]
    return np.clip(base * (1.0 - amount) - amount * floor_levels, 0.0, 255.0)


def brighten(base: np.ndarray, amount: np.ndarray, floor_levels: float = 0.0) -> np.ndarray:
    """Screen toward white by ``amount`` plus an absolute lift for bright surfaces."""
    amount = amount[..., None]
    return np.clip(base + (255.0 - base) * amount + amount * floor_levels, 0.0, 255.0)


def choose_polarity(canvas: Canvas, requested: str | None, rng: np.random.Generator,
                    bright_share: float = 0.5) -> str:
    """The prompt's polarity, else one that can show on this surface (no white on white)."""
    if requested in ("dark", "bright"):
        return requested
    level = canvas.surface_level()
    if level > 190:
        return "dark"
    if level < 60:
        return "bright"
    return "bright" if rng.random() < bright_share else "dark"


def tint_factor(color: tuple[int, int, int]) -> np.ndarray:
    """A colour as per-channel multipliers that darken toward its hue."""
    return np.asarray(color, dtype=np.float32) / 255.0


def source_center(canvas: Canvas, half_w: float, half_h: float, rng: np.random.Generator,
                  tries: int = 40) -> tuple[float, float]:
    """A centre elsewhere on the object (image coordinates) for a patch of the given half size.

    It must lie on the object, keep the patch inside the frame, and not overlap the target.
    """
    height, width = canvas.foreground.shape
    tx = canvas.window.x0 + canvas.center[0]
    ty = canvas.window.y0 + canvas.center[1]
    lo_x, hi_x = half_w + 1, width - half_w - 2
    lo_y, hi_y = half_h + 1, height - half_h - 2
    best, best_score = (tx, ty), -1.0
    for _ in range(tries):
        x = rng.uniform(lo_x, hi_x) if hi_x > lo_x else width / 2.0
        y = rng.uniform(lo_y, hi_y) if hi_y > lo_y else height / 2.0
        if not canvas.foreground[int(y), int(x)]:
            continue
        # Corners and edges of the patch on the object too, and far enough from the target.
        probe = [(x + dx * half_w * 0.9, y + dy * half_h * 0.9)
                 for dx in (-1, 0, 1) for dy in (-1, 0, 1)]
        on = np.mean([canvas.foreground[min(max(int(py), 0), height - 1),
                                        min(max(int(px), 0), width - 1)] for px, py in probe])
        apart = min(math.hypot(x - tx, y - ty) / max(half_w + half_h, 1.0), 1.0)
        score = on + apart
        if score > best_score:
            best, best_score = (x, y), score
        if on >= 1.0 and apart >= 1.0:
            break
    return best


# --- connectivity --------------------------------------------------------------------------------

_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=np.uint8)


def _visible_change(canvas: Canvas, out: np.ndarray) -> np.ndarray:
    """The change ``finalize`` will see, in grey levels per pixel (before the mask is cut)."""
    if canvas.gray:
        out = np.repeat((out @ LUMA)[..., None], 3, axis=2)
    edited = np.clip(np.rint(out), 0, 255)
    return np.abs(edited - np.rint(canvas.base)).max(axis=2)


def connect_line(canvas: Canvas, out: np.ndarray) -> np.ndarray:
    """Make a thin defect's visible change one 4-connected piece; returns the new window.

    A one-pixel line drawn diagonally changes pixels that touch only at their corners, and the
    hair-thin tips of a stroke break into specks where their coverage drops under the change
    threshold: the mask of one crack would then be many pieces. Here diagonal-only contacts are
    bridged by darkening one of the two shared neighbours like its diagonal pair, then only the
    largest piece (the trunk with its attached branches) and the soft fringe touching it keep
    their change; detached specks are put back.
    """
    out = out.copy()
    on = canvas.fg
    for _ in range(2):
        strong = (_visible_change(canvas, out) > CHANGE_THRESHOLD) & on
        bridged = False
        for dx in (1, -1):
            # p and its lower-left/right neighbour q are strong, the two pixels beside both not.
            p = np.zeros_like(strong)
            q_of_p = np.roll(np.roll(strong, -1, axis=0), -dx, axis=1)
            side_a = np.roll(strong, -dx, axis=1)  # p's horizontal neighbour
            side_b = np.roll(strong, -1, axis=0)  # p's vertical neighbour
            p[:-1, :] = (strong & q_of_p & ~side_a & ~side_b)[:-1, :]
            if dx == 1:
                p[:, -1] = False
            else:
                p[:, 0] = False
            ys, xs = np.nonzero(p)
            if ys.size == 0:
                continue
            bridged = True
            # Bridge through the vertical neighbour (the horizontal one where that is off the
            # object), giving it the stronger change of the diagonal pair.
            qy, qx = ys + 1, xs + dx
            ok = on[ys + 1, xs]
            by, bx = np.where(ok, ys + 1, ys), np.where(ok, xs, xs + dx)
            delta_p = out[ys, xs] - canvas.base[ys, xs]
            delta_q = out[qy, qx] - canvas.base[qy, qx]
            stronger = (np.abs(delta_p).max(axis=1) >= np.abs(delta_q).max(axis=1))[:, None]
            delta = np.where(stronger, delta_p, delta_q)
            out[by, bx] = np.clip(canvas.base[by, bx] + delta, 0.0, 255.0)
        if not bridged:
            break
    strong = (_visible_change(canvas, out) > CHANGE_THRESHOLD) & on
    count, labels, stats, _ = cv2.connectedComponentsWithStats(strong.astype(np.uint8),
                                                               connectivity=4)
    if count <= 1:
        return out  # nothing visible yet: the judge, not this step, says "too faint"
    kept = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    zone = cv2.dilate(kept.astype(np.uint8), _CROSS).astype(bool)
    out[~zone] = canvas.base[~zone]
    return out
