"""NSA-style anomaly: a patch from another place of the part, Poisson-blended into the region.

Seamless cloning keeps the patch's gradients and the surroundings' boundary values, so the
result has no hard seam; the mask is where the pixels really changed, median-filtered as in NSA.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import (Canvas, Rendered, irregular_radius,
                                                      source_center)


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    a, b = canvas.ellipse_axes(params.elongation, theta)
    radius = irregular_radius(canvas, canvas.ellipse_radius(a, b, theta), params.roughness, a,
                              rng, amount=0.2)
    height, width = canvas.shape
    patch_mask = (radius <= 1.0).astype(np.uint8) * 255
    # seamlessClone needs a one-pixel frame of destination around the mask.
    patch_mask[[0, -1], :] = 0
    patch_mask[:, [0, -1]] = 0

    # The source, resampled into the window's frame: scaled, rotated, maybe mirrored.
    sx, sy = source_center(canvas, a, a, rng)
    scale = float(rng.uniform(0.75, 1.3))
    angle = float(rng.choice([0.0, 90.0, 180.0, 270.0]) + rng.uniform(-20.0, 20.0))
    cx, cy = canvas.center
    c, s = math.cos(math.radians(angle)) / scale, math.sin(math.radians(angle)) / scale
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    linear = np.array([[c * mirror, -s], [s * mirror, c]])
    offset = np.array([sx, sy]) - linear @ np.array([cx, cy])
    to_source = np.hstack([linear, offset[:, None]]).astype(np.float64)
    source = cv2.warpAffine(canvas.image, to_source, (width, height),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REFLECT).astype(np.float32)
    # Stronger prompts exaggerate the borrowed texture's contrast, which is what survives cloning.
    gain = 1.0 + 1.6 * params.severity
    mean = source.mean(axis=(0, 1), keepdims=True)
    # Amplify structure, not sensor noise: the finest detail is kept as it is.
    smooth = cv2.GaussianBlur(source, (0, 0), 1.2)
    source = (smooth - mean) * gain + mean + (source - smooth)
    # NSA also varies intensity; a smooth swell of brightness is a gradient, so it survives the
    # cloning and keeps the anomaly visible on plain surfaces too.
    random_sign = float(rng.choice([-1.0, 1.0]))
    swell_sign = {"bright": 1.0, "dark": -1.0}.get(params.polarity or "", random_sign)
    swell = swell_sign * (10.0 + 35.0 * params.severity) * np.exp(-2.0 * radius ** 2)
    source = np.clip(source + swell[..., None], 0, 255).astype(np.uint8)

    destination = np.clip(np.rint(canvas.base), 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(patch_mask)
    if ys.size == 0:
        return Rendered(canvas.base.copy(), details={"skipped": "empty patch"})
    # cv2 centres the mask's bounding box at ``center``.
    center = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
    try:
        cloned = cv2.seamlessClone(source, destination, patch_mask, center, cv2.NORMAL_CLONE)
        blend = "poisson"
    except cv2.error:
        # OpenCV refuses some tiny or border-hugging masks; a feathered paste stands in.
        alpha = cv2.GaussianBlur(patch_mask.astype(np.float32) / 255.0, (0, 0), 1.0)[..., None]
        cloned = destination * (1.0 - alpha) + source * alpha
        blend = "feathered"
    return Rendered(cloned.astype(np.float32), support=patch_mask > 0, median_filter=5,
                    details={"source_xy": [round(sx, 1), round(sy, 1)], "scale": round(scale, 3),
                             "angle": round(angle, 1), "mirror": mirror < 0,
                             "gain": round(gain, 3), "swell": swell_sign, "blend": blend})
