"""CutPaste scar: a thin strip cut from elsewhere on the same part, jittered, rotated, pasted."""

from __future__ import annotations

import math

import cv2
import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import Canvas, Rendered, source_center


def _jitter(patch: np.ndarray, params: EditParams, gray: bool,
            rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    strength = 0.1 + 0.4 * params.severity
    sign = {"bright": 1.0, "dark": -1.0}.get(params.polarity or "", float(rng.choice([-1.0, 1.0])))
    brightness = 1.0 + sign * strength * rng.uniform(0.6, 1.0)
    contrast = 1.0 + rng.uniform(-0.5, 0.5) * strength
    mean = patch.mean(axis=(0, 1), keepdims=True)
    out = (patch - mean) * contrast + mean * brightness
    details = {"brightness": round(brightness, 3), "contrast": round(contrast, 3)}
    if not gray:
        rgb = np.clip(out, 0, 255).astype(np.uint8)
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
        hue_shift = rng.uniform(-1.0, 1.0) * 15.0 * strength  # OpenCV hue is 0-180
        saturation = 1.0 + rng.uniform(-0.5, 0.5) * strength
        hsv[..., 0] = (hsv[..., 0] + hue_shift) % 180.0
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
        details.update({"hue_shift": round(hue_shift, 2), "saturation": round(saturation, 3)})
    return np.clip(out, 0, 255), details


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    # CutPaste scars are 2 to 16 px wide; a strip-shaped region says how wide exactly.
    short, long = sorted((canvas.region.width, canvas.region.height))
    thickness = float(np.clip(short * (0.8 if long > 1.5 * short else 1.0), 2.0, 16.0))
    length = canvas.line_length(theta, thickness)
    thickness = min(thickness, max(length / 2.0, 2.0))
    half_l, half_t = length / 2.0, thickness / 2.0

    # Window pixel -> strip frame (u, v) -> source pixel, as one affine map for warpAffine.
    sx, sy = source_center(canvas, half_l, half_l, rng)
    phi = math.radians(float(rng.uniform(0.0, 360.0)))
    t = math.radians(theta)
    cx, cy = canvas.center
    rot_target = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    rot_source = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
    linear = rot_source @ rot_target
    offset = np.array([sx, sy]) - linear @ np.array([canvas.window.x0 + cx, canvas.window.y0 + cy])
    # warpAffine with WARP_INVERSE_MAP maps destination (image coords) to source; shift to window.
    window_origin = np.array([canvas.window.x0, canvas.window.y0])
    to_source = np.hstack([linear, (offset + linear @ window_origin)[:, None]])
    height, width = canvas.shape
    patch = cv2.warpAffine(canvas.image.astype(np.float32), to_source, (width, height),
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REFLECT)
    patch, jitter = _jitter(patch, params, canvas.gray, rng)

    u, v = canvas.frame(theta)
    coverage = (np.clip(half_l - np.abs(u) + 0.5, 0.0, 1.0) *
                np.clip(half_t - np.abs(v) + 0.5, 0.0, 1.0))[..., None]
    out = canvas.base * (1.0 - coverage) + patch * coverage
    return Rendered(out, support=coverage[..., 0] > 0.5,
                    details={"length_px": round(length, 1), "thickness_px": round(thickness, 1),
                             "source_xy": [round(sx, 1), round(sy, 1)], **jitter})
