"""Hole / pit / blowhole: a dark cavity, shaded inside by its own wall, with a lighter rim."""

from __future__ import annotations

import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import (Canvas, Rendered, irregular_radius,
                                                      smoothstep, tint_factor)


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    a, b = canvas.ellipse_axes(min(params.elongation, 2.0), theta)
    # The rim needs room outside the cavity: the cavity takes ~80% of the region.
    a, b = a * 0.8, b * 0.8
    # Pores and blowholes are roundish: only a little wobble of the outline.
    radius = irregular_radius(canvas, canvas.ellipse_radius(a, b, theta), params.roughness, a,
                              rng, amount=0.12)
    edge_px = 0.7  # anti-aliasing width of the cavity outline
    inside = np.clip((1.0 - radius) * a / edge_px + 0.5, 0.0, 1.0)

    cx, cy = canvas.center
    x, y = canvas.grid()
    dx, dy = (x - cx) / a, (y - cy) / b
    norm = np.sqrt(dx * dx + dy * dy) + 1e-6
    lx, ly = canvas.light
    # Facing the light: +1 on the side of the wall nearest the light, -1 on the far side.
    toward = (dx * lx + dy * ly) / norm

    depth = 0.4 + 0.5 * params.severity
    r = np.clip(radius, 0.0, 1.0)
    # Inside the cavity: the wall nearest the light lies in its own shadow, the far wall catches
    # light, and the floor is dark in between; it all gets darker with depth.
    wall = r ** 2
    shadow = np.clip(0.65 + 0.35 * (1.0 - wall) + 0.45 * toward * wall, 0.0, 1.0)
    cavity = np.clip(depth * shadow, 0.0, 0.97)

    rim = np.exp(-((radius - 1.0 - 2.0 / a) / max(1.2 / a, 0.08)) ** 2) * (1.0 - inside)
    rim_light = (0.1 + 0.25 * params.severity) * rim * (0.55 - 0.45 * toward)

    base = canvas.base
    if params.polarity == "bright":
        # A bubble or a glinting pit: a lighter core inside a darker ring.
        interior = base + (255.0 - base) * (0.7 * cavity)[..., None] + 10.0 * cavity[..., None]
        out = base + inside[..., None] * (interior - base)
        out = out * (1.0 - 1.5 * rim_light[..., None])
    else:
        floor = 10.0 + 25.0 * params.severity
        interior = base * (1.0 - cavity[..., None]) - floor * (cavity[..., None] / 0.97)
        if params.color is not None:
            interior = interior * (0.5 + 0.5 * tint_factor(params.color))
        out = base + inside[..., None] * (interior - base)
        out = out + (255.0 - out) * rim_light[..., None]
    support = smoothstep(1.3, 1.0, radius) > 0.5
    return Rendered(np.clip(out, 0, 255), support=support,
                    details={"radius_px": [round(a, 1), round(b, 1)],
                             "kind": "bubble" if params.polarity == "bright" else "cavity",
                             "depth": round(float(depth), 3)})
