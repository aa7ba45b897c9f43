"""Dent / bump / uneven surface: a smooth height change seen only through its shading."""

from __future__ import annotations

import numpy as np

from appliance.imaging import VISIBLE_PEAK, change_peak
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
    support = np.abs(height) > 0.08
    # On a dark or busy surface the shading of a shallow dent can fall below what anyone would
    # see as a defect; even a faint one is drawn at least a little above that (the change is
    # proportional to the strength, so one rescale meets it).
    least = VISIBLE_PEAK * (1.25 + 0.75 * params.severity)
    out = _shaded(canvas.base, strength, shade, height)
    shown = change_peak(np.abs(out - canvas.base).max(axis=2), support)
    if 0.0 < shown < least:
        strength *= least / shown
        out = _shaded(canvas.base, strength, shade, height)
    return Rendered(out, support=support,
                    details={"kind": "bump" if sign > 0 else "dent",
                             "radius_px": [round(a, 1), round(b, 1)],
                             "shading": round(strength, 3)})


def _shaded(base: np.ndarray, strength: float, shade: np.ndarray, height: np.ndarray
            ) -> np.ndarray:
    # A dent also collects a little shadow in its floor (and a bump a little light on top).
    gain = 1.0 + strength * shade + 0.3 * strength * height
    return np.clip(base * gain[..., None], 0, 255)
