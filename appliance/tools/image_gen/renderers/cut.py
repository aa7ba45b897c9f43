"""Cut / tear / slit: a thin dark opening whose two lips are pushed apart."""

from __future__ import annotations

import cv2
import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import Canvas, Rendered, mottle, smoothstep


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    length = canvas.line_length(theta, thickness=4.0) * 0.95
    u, v = canvas.frame(theta)
    bend = float(rng.normal(0.0, 0.04)) * length
    t = np.clip(2.0 * u / max(length, 1.0), -1.0, 1.0)
    # A blade wanders a little; a tear more.
    wander = (0.2 + 0.6 * params.roughness) * mottle(canvas, rng, max(length / 5.0, 4.0))
    across = v - bend * (1.0 - t * t) - wander
    ends = smoothstep(1.0, 0.35, np.abs(t))
    gap = (0.5 + 1.3 * params.severity) * min(1.0, length / 40.0 + 0.4) * ends

    # The lips are pushed apart: each side samples from closer to the cut.
    push = gap * np.sign(across) * np.exp(-np.abs(across) / (3.0 * gap + 1.0))
    c, s = np.cos(np.radians(theta)), np.sin(np.radians(theta))
    x, y = canvas.grid()
    map_x = (x + s * push).astype(np.float32)
    map_y = (y - c * push).astype(np.float32)
    warped = cv2.remap(canvas.base, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    opening = np.clip(gap - np.abs(across) + 0.5, 0.0, 1.0) * (ends > 0.01)
    depth = 0.7 + 0.25 * params.severity
    inside = warped * (1.0 - depth) - 10.0
    out = warped * (1.0 - opening[..., None]) + inside * opening[..., None]
    # One lip faces the light, the other is in the opening's shadow.
    lx, ly = canvas.light
    facing = np.sign(across) * (-s * lx + c * ly)
    lip = np.exp(-((np.abs(across) - gap - 0.8) / 0.9) ** 2) * ends
    out = out * (1.0 + (0.12 + 0.2 * params.severity) * (lip * facing)[..., None])
    return Rendered(np.clip(out, 0, 255), support=None,
                    details={"length_px": round(length, 1),
                             "opening_px": round(float(gap.max()) * 2.0, 2)})
