"""Dent / bump / uneven surface: a smooth height change seen only through its shading."""

from __future__ import annotations

import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import Canvas, Rendered, irregular_radius, mottle


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    a, b = canvas.ellipse_axes(params.elongation, theta)
    radius = irregular_radius(canvas, canvas.ellipse_radius(a, b, theta), params.roughness, a,
                              rng, amount=0.15)
    # Dents (down) are more common than bumps (up); a bright prompt suggests a raised spot.
    sign = 1.0 if params.polarity == "bright" else (-1.0 if params.polarity == "dark"
                                                    else (-1.0 if rng.random() < 0.7 else 1.0))
    height = np.exp(-2.8 * radius ** 2) * (0.85 + 0.15 * mottle(canvas, rng, max(a, 4.0)))
    height = sign * height

    gy, gx = np.gradient(height)
    lx, ly = canvas.light
    # Lambert shading of a shallow slope, normal ~ (-gx, -gy, 1): brighter where the surface
    # tilts toward the light.
    slope = -(gx * lx + gy * ly)
    peak = float(np.abs(slope).max()) or 1.0
    shade = slope / peak
    strength = 0.08 + 0.32 * params.severity
    # A dent also collects a little shadow in its floor (and a bump a little light on top).
    occlusion = 0.3 * strength * height
    gain = 1.0 + strength * shade + occlusion
    out = np.clip(canvas.base * gain[..., None], 0, 255)
    support = np.abs(height) > 0.08
    return Rendered(out, support=support,
                    details={"kind": "bump" if sign > 0 else "dent",
                             "radius_px": [round(a, 1), round(b, 1)],
                             "shading": round(strength, 3)})
