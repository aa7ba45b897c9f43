"""Discoloration: a smooth shift of hue or brightness over an irregular patch, no hard edge."""

from __future__ import annotations

import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import (LUMA, Canvas, Rendered, irregular_radius,
                                                      mottle, smoothstep)

# Hue casts when the prompt names no colour: yellowing, browning, bluish tarnish, reddish heat.
CASTS = ((1.08, 1.0, 0.78), (1.06, 0.92, 0.8), (0.88, 0.95, 1.12), (1.1, 0.9, 0.88))


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    a, b = canvas.ellipse_axes(params.elongation, theta)
    radius = irregular_radius(canvas, canvas.ellipse_radius(a, b, theta), params.roughness, a,
                              rng, amount=0.5)
    alpha = smoothstep(1.0, 0.45, radius) * (0.85 + 0.15 * mottle(canvas, rng, max(a / 2.0, 4.0)))
    strength = 0.12 + 0.4 * params.severity
    base = canvas.base
    cast_pick = int(rng.integers(len(CASTS)))
    direction_pick = float(rng.random())

    if params.polarity is not None or canvas.gray:
        brighter = params.polarity == "bright" or (params.polarity is None and direction_pick < 0.5)
    else:
        brighter = None  # a hue shift keeps the brightness
    out = base
    if params.color is not None and not canvas.gray:
        # Recolour toward the named colour at the same brightness.
        color = np.asarray(params.color, dtype=np.float32)
        recolored = (base @ LUMA)[..., None] * color / max(float(color @ LUMA), 1.0)
        out = out + (alpha * strength * 1.6)[..., None] * (recolored - out)
    elif brighter is None:
        cast = np.asarray(CASTS[cast_pick], dtype=np.float32)
        cast = 1.0 + (cast - 1.0) * (strength / 0.3)
        out = out * (1.0 + alpha[..., None] * (cast - 1.0))
    if brighter is True:
        out = out + (255.0 - out) * (alpha * strength)[..., None] + (alpha * 6.0)[..., None]
    elif brighter is False:
        out = out * (1.0 - alpha * strength)[..., None] - (alpha * 6.0)[..., None]
    support = radius < 0.9
    return Rendered(np.clip(out, 0, 255), support=support,
                    details={"strength": round(strength, 3),
                             "shift": "color" if params.color is not None and not canvas.gray
                             else ("brighter" if brighter else "darker" if brighter is False
                                   else f"cast{cast_pick}")})
