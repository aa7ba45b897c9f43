"""Where the part is in a photo: foreground versus background, or a full-frame texture.

Industrial inspection photos are of two kinds: a part on a fairly plain background (a bottle, a
screw, a capsule) or a close-up where the surface fills the frame (carpet, tile, wood). Defects
must land on the part, so the renderers, the placement module and the judge all ask this module
first. The background is modelled from a band along the image border, because that is where the
background is in nearly every inspection setup; whatever differs clearly from it is the part.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# The analysis runs on a copy whose longer side is this long: the outline of a part does not need
# more, and it keeps the call in a few milliseconds at 512 px and up.
WORK_SIDE = 128
# Border band used to model the background, as a fraction of the shorter side of the work copy.
BORDER_FRACTION = 0.05
# A pixel is background-like when it is within this colour distance of the border median; the
# floor keeps JPEG noise and soft shading of a plain background from becoming "part".
MIN_COLOR_DISTANCE = 18.0
# The border is a plain background when at least this share of it is background-like; the
# rest may be the part itself where it runs out of the frame.
MIN_BORDER_HOMOGENEITY = 0.60
# Foreground covering more than this share of the frame (or less than the minimum) means there is
# no separable part: treat the whole frame as surface.
MAX_FOREGROUND_SHARE = 0.85
MIN_FOREGROUND_SHARE = 0.01
# Components smaller than this share of the largest one are clutter, not part.
MIN_COMPONENT_SHARE = 0.10
# The part's median distance from the background model must be this many tolerances.
MIN_SEPARATION = 2.5
# A region covering this share of two opposite frame edges, and (almost) none of the other two,
# runs through the frame: a band of the surface (a highlight, a seam), not a part on a background.
THROUGH_EDGE_SHARE = 0.08


@dataclass
class ObjectMap:
    """The part's pixels in a photo; for a texture close-up the whole frame."""

    foreground: np.ndarray  # bool (H, W)
    is_texture: bool
    background_color: tuple[int, int, int]

    @property
    def area_ratio(self) -> float:
        return float(self.foreground.mean()) if self.foreground.size else 0.0

    def boundary_band(self, width_px: int) -> np.ndarray:
        """Foreground pixels within ``width_px`` of the part's outline.

        For a texture there is no outline inside the frame, so the band runs along the frame
        border instead (edge defects such as chips sit there on a close-up).
        """
        height, width = self.foreground.shape
        width_px = max(int(width_px), 1)
        if self.is_texture:
            band = np.zeros((height, width), dtype=bool)
            band[:width_px, :] = True
            band[-width_px:, :] = True
            band[:, :width_px] = True
            band[:, -width_px:] = True
            return band
        # Distance of each part pixel to the nearest non-part pixel. Where the part runs out of
        # the frame the frame edge is not its outline: OpenCV does not count outside the image as
        # background.
        distance = cv2.distanceTransform(self.foreground.astype(np.uint8), cv2.DIST_L2, 3)
        return self.foreground & (distance <= width_px)


def find_object(image: np.ndarray) -> ObjectMap:
    """Separate the part from a plain background, or report a full-frame texture."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB array (H, W, 3), got shape {image.shape}")
    height, width = image.shape[:2]
    # A light blur so that fine surface grain and JPEG blocks do not count as colour change.
    small = cv2.GaussianBlur(_downscale(image).astype(np.float32), (3, 3), 0)
    border = _border_mask(small.shape[:2])
    model, inliers = _background_model(small, border)
    distance = np.linalg.norm(small - model, axis=2)

    # The tolerance follows how much the background itself varies (grain, noise), with a floor.
    spread = float(np.percentile(distance[inliers], 75)) if inliers.any() else np.inf
    tolerance = max(MIN_COLOR_DISTANCE, 2.5 * spread)
    homogeneity = float(np.mean(distance[border] <= tolerance))
    reference = small[inliers] if inliers.any() else small[border]
    median = np.median(reference, axis=0)
    color = (int(round(median[0])), int(round(median[1])), int(round(median[2])))
    whole = ObjectMap(np.ones((height, width), dtype=bool), True, color)
    if homogeneity < MIN_BORDER_HOMOGENEITY:
        return whole

    raw = distance > tolerance
    foreground = _clean(raw)
    share = float(foreground.mean())
    if share > MAX_FOREGROUND_SHARE or share < MIN_FOREGROUND_SHARE:
        return whole
    # A part stands out from its background by far more than the background varies; a surface
    # close-up only has brighter and darker patches of the same material.
    level = float(np.median(distance[raw & foreground]))
    if level < MIN_SEPARATION * tolerance:
        return whole

    if _runs_through_frame(foreground):
        return whole

    full = _upscale(foreground, distance, max(tolerance, 0.5 * level), (height, width))
    if not full.any():
        return whole
    return ObjectMap(full, False, color)


def _background_model(small: np.ndarray, border: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel quadratic fit of the border colours over the frame, and its inlier pixels.

    A plain background is rarely flat: lights leave gradients and vignetting. A smooth surface
    fitted to the border absorbs them. The fit starts from the median border colour and only
    ever uses the border pixels close to the current model, so a part that touches the border
    (less than half of it) does not pull the model.
    """
    height, width = small.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    x = xx / width - 0.5
    y = yy / height - 0.5
    basis = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=-1)
    model = np.broadcast_to(np.median(small[border], axis=0), small.shape).astype(np.float32)
    residual = np.linalg.norm(small - model, axis=2)
    # The median residual is a spread estimate that outliers below half the border cannot move.
    inliers = border & (residual <= max(3.0 * float(np.median(residual[border])), 6.0))
    for _ in range(3):
        if inliers.sum() < basis.shape[-1] * 4:
            break
        # Normal equations of a 6-parameter fit: far cheaper than a general least-squares solver.
        rows = basis[inliers].astype(np.float64)
        coef = np.linalg.solve(rows.T @ rows + 1e-6 * np.eye(rows.shape[1]),
                               rows.T @ small[inliers].astype(np.float64))
        model = basis @ coef.astype(np.float32)
        residual = np.linalg.norm(small - model, axis=2)
        spread = float(np.percentile(residual[inliers], 75))
        inliers = border & (residual <= max(3.0 * spread, 6.0))
    return model, inliers


def _runs_through_frame(foreground: np.ndarray) -> bool:
    top, bottom = foreground[0].mean(), foreground[-1].mean()
    left, right = foreground[:, 0].mean(), foreground[:, -1].mean()
    vertical = min(top, bottom) >= THROUGH_EDGE_SHARE and max(left, right) < 0.02
    horizontal = min(left, right) >= THROUGH_EDGE_SHARE and max(top, bottom) < 0.02
    return bool(vertical or horizontal)


def _upscale(foreground: np.ndarray, distance: np.ndarray, edge_threshold: float,
             shape: tuple[int, int]) -> np.ndarray:
    """The work-copy mask at full size, with the outline placed at half the part's contrast.

    A low threshold on a blurred edge puts the outline outside the part, by a work pixel or more;
    re-deciding a band of two work pixels either side of the outline at the midpoint between
    background and part removes that bias, on the smoothly interpolated distance, while the
    inside of the part (which may have background-coloured details) stays as found. The band is
    found on the work copy, so the cost at full size is two resizes whatever the image size.
    """
    height, width = shape
    mask = foreground.astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    # Erosion treats outside the frame as part, so a part running out of the frame keeps its
    # pixels along the frame edge.
    inside = cv2.resize(cv2.erode(mask, kernel), (width, height),
                        interpolation=cv2.INTER_NEAREST).astype(bool)
    near = cv2.resize(cv2.dilate(mask, kernel), (width, height),
                      interpolation=cv2.INTER_NEAREST).astype(bool)
    if distance.shape != (height, width):
        distance = cv2.resize(distance, (width, height), interpolation=cv2.INTER_LINEAR)
    return inside | (near & ~inside & (distance > edge_threshold))


def _downscale(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    scale = WORK_SIDE / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(int(round(width * scale)), 8), max(int(round(height * scale)), 8))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _border_mask(shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    band = max(2, int(round(BORDER_FRACTION * min(height, width))))
    mask = np.zeros(shape, dtype=bool)
    mask[:band, :] = True
    mask[-band:, :] = True
    mask[:, :band] = True
    mask[:, -band:] = True
    return mask


def _clean(raw: np.ndarray) -> np.ndarray:
    """Open away specks, close small gaps, keep the significant components, fill holes."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    mask = cv2.morphologyEx(raw.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE,
                            cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return np.zeros(raw.shape, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= MIN_COMPONENT_SHARE * areas.max()) + 1
    return fill_holes(np.isin(labels, keep))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes: flood the background from outside, whatever it did not reach is in."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    return (padded | (1 - flood)).astype(bool)[1:-1, 1:-1]
