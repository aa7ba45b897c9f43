"""Dent / bump / uneven surface: a smooth height change seen only through its shading.

A shallow dent collects a little shadow over its whole floor (a bump a little light), and its
walls are lit unevenly: the wall facing the light a little less dark, the other a little more.
The change is therefore one soft patch over the dent's footprint, modulated by the light, rather
than a bare light/shadow dipole: a dipole's two lobes meet at a line of no change and fade out
well inside the outline, so the visible (and masked) dent would be a small fraction of the size
asked for.
"""

from __future__ import annotations

import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import (Canvas, Rendered, irregular_radius, mottle,
                                                      smoothstep)

# The floor is flat out to this share of the radius; the wall rises softly from there to the rim.
FLOOR_RADIUS = 0.6
RIM_RADIUS = 1.0
# How much the light's direction brightens one wall and darkens the other, against the floor's
# own tone; below 1, so the change never crosses zero inside the dent (no gap in its footprint).
WALL_SHADING = 0.45


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    a, b = canvas.ellipse_axes(params.elongation, theta)
    radius = irregular_radius(canvas, canvas.ellipse_radius(a, b, theta), params.roughness, a,
                              rng, amount=0.15)
    # Dents (down) are more common than bumps (up); a bright prompt suggests a raised spot.
    sign = 1.0 if params.polarity == "bright" else (-1.0 if params.polarity == "dark"
                                                    else (-1.0 if rng.random() < 0.7 else 1.0))
    depth = 1.0 - smoothstep(FLOOR_RADIUS, RIM_RADIUS, radius)
    depth = depth * (0.85 + 0.15 * mottle(canvas, rng, max(a, 4.0)))
    height = sign * depth

    gy, gx = np.gradient(height)
    lx, ly = canvas.light
    # Lambert shading of a shallow slope, normal ~ (-gx, -gy, 1): brighter where the surface
    # tilts toward the light.
    slope = -(gx * lx + gy * ly)
    peak = float(np.abs(slope).max()) or 1.0
    shade = slope / peak
    # The floor's tone in grey levels: just visible when faint (above the change threshold over
    # most of the footprint), plainly visible when severe.
    tone = 16.0 + 30.0 * params.severity
    change = tone * depth * (sign + WALL_SHADING * shade)
    out = np.clip(canvas.base + change[..., None], 0, 255)
    support = depth > 0.08
    return Rendered(out, support=support,
                    details={"kind": "bump" if sign > 0 else "dent",
                             "radius_px": [round(a, 1), round(b, 1)],
                             "tone_levels": round(tone, 1)})
