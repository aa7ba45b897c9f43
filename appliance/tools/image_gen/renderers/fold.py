"""Fold / wrinkle / crease: a soft ridge across the surface.

The ridge is a height profile across a gently bent line, fading out at both ends. It is shown by
its shading (one flank toward the light, one away) and by the texture being gathered toward the
ridge, as cloth or foil is when it folds.
"""

from __future__ import annotations

import cv2
import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import Canvas, Rendered, smoothstep


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    half_width = max(min(canvas.region.width, canvas.region.height) * 0.18, 2.5)
    length = canvas.line_length(theta, thickness=2.0 * half_width) * 0.95
    u, v = canvas.frame(theta)
    bend = float(rng.normal(0.0, 0.06)) * length
    t = np.clip(2.0 * u / max(length, 1.0), -1.0, 1.0)
    across = v - bend * (1.0 - t * t)
    along = smoothstep(1.0, 0.55, np.abs(2.0 * u / max(length, 1.0)))
    height = along * np.exp(-(across / half_width) ** 2)

    # Texture gathered toward the ridge: near it, sample from farther out across it. The shift
    # is odd in ``across`` and vanishes away from the ridge, so the surroundings stay put.
    gather = (0.5 + 0.8 * params.severity) * half_width
    shift = gather * (across / half_width) * np.exp(-(across / half_width) ** 2) * along
    c, s = np.cos(np.radians(theta)), np.sin(np.radians(theta))
    x, y = canvas.grid()
    map_x = (x - s * shift).astype(np.float32)
    map_y = (y + c * shift).astype(np.float32)
    warped = cv2.remap(canvas.base, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    # Shading of the ridge's slope across its direction.
    slope_across = -2.0 * across / (half_width ** 2) * height
    lx, ly = canvas.light
    light_across = -s * lx + c * ly
    # Light running almost along the ridge would leave it unseen; real lighting is never a
    # single ray, so a flank keeps at least half the shading it would get lit from across.
    light_across = float(np.copysign(max(abs(light_across), 0.5), light_across))
    shade = -slope_across * light_across * half_width / 0.86  # ~[-1, 1]
    strength = 0.1 + 0.35 * params.severity
    gain = 1.0 + strength * np.clip(shade, -1.0, 1.0) + 0.08 * strength * height
    out = np.clip(warped * gain[..., None], 0, 255)
    return Rendered(out, support=height > 0.15,
                    details={"length_px": round(length, 1), "half_width_px": round(half_width, 1),
                             "bend_px": round(bend, 1), "shading": round(strength, 3)})
