"""Stain (oil, liquid, glue, water, burn): a translucent tinted blob with soft irregular edges.

Dark stains multiply the surface down toward their tint (light is absorbed, texture shows
through); drying liquids leave a slightly darker ring at the edge; bright stains (glue, dried
residue) screen the surface toward a pale tint.
"""

from __future__ import annotations

import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import (Canvas, Rendered, irregular_radius, mottle,
                                                      smoothstep, tint_factor)

# Tints of common stains when the prompt names none: oil, rust, dried liquid, soot.
PALETTE = ((70, 52, 35), (150, 85, 40), (175, 150, 90), (60, 60, 60))


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    a, b = canvas.ellipse_axes(params.elongation, theta)
    radius = irregular_radius(canvas, canvas.ellipse_radius(a, b, theta), params.roughness, a,
                              rng, amount=0.45)
    softness = 0.15 + 0.2 * (1.0 - params.roughness)
    alpha = smoothstep(1.0, 1.0 - softness, radius)
    alpha *= 0.8 + 0.2 * mottle(canvas, rng, max(a / 3.0, 3.0))
    ring_strength = float(rng.uniform(0.0, 0.6))
    ring = ring_strength * np.exp(-((radius - (1.0 - softness * 0.6)) / 0.08) ** 2)
    opacity = 0.3 + 0.6 * params.severity
    alpha = np.clip(opacity * (alpha + ring * alpha.max()), 0.0, 1.0) * (radius < 1.05)

    palette_pick = int(rng.integers(len(PALETTE)))
    color = params.color if params.color is not None else PALETTE[palette_pick]
    base = canvas.base
    if params.polarity == "bright":
        target = np.asarray(params.color or (232, 228, 214), dtype=np.float32)
        out = base + alpha[..., None] * 0.75 * (target - base)
        out = np.maximum(out, base + alpha[..., None] * 10.0)
    else:
        tint = tint_factor(color)
        # Multiply toward the tint; the absolute term keeps dark surfaces from swallowing it.
        out = base * (1.0 - alpha[..., None] * (1.0 - tint)) - alpha[..., None] * 10.0
    support = radius < 1.0
    return Rendered(np.clip(out, 0, 255), support=support,
                    details={"tint": list(color), "opacity": round(opacity, 3),
                             "ring": round(ring_strength, 2),
                             "radius_px": [round(a, 1), round(b, 1)]})
