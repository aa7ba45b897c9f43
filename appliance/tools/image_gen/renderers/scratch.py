"""Scratch: a thin, gently curved, anti-aliased line that catches the light or lies in shadow."""

from __future__ import annotations

import math

import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import (Canvas, Rendered, along_profile, bezier,
                                                      brighten, choose_polarity, connect_line,
                                                      darken, stroke_coverage, taper)


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    length = canvas.line_length(theta, thickness=2.0) * 0.96
    cx, cy = canvas.center
    direction = np.array([math.cos(math.radians(theta)), math.sin(math.radians(theta))])
    normal = np.array([-direction[1], direction[0]])
    start = np.array([cx, cy]) - direction * length / 2.0
    end = np.array([cx, cy]) + direction * length / 2.0
    # A hand- or tool-made scratch bows a little; the sag stays inside the region's thickness.
    sag = rng.normal(0.0, 1.0, 2) * 0.05 * length
    controls = np.stack([start, start + (end - start) / 3.0 + normal * sag[0],
                         start + 2.0 * (end - start) / 3.0 + normal * sag[1], end])
    n = max(int(length / 2.0), 12)
    path = bezier(controls, n)

    width = float(np.clip(0.7 + length / 150.0, 0.7, 2.2) * (0.8 + 0.4 * rng.random()))
    if params.width_px is not None:
        width = max(params.width_px - 0.5, 0.7)  # the anti-aliased fringe adds about a pixel
    widths = width * taper(n, power=0.35, floor=0.3)
    # Scratches skip: the depth, and so the contrast, wanders along the stroke.
    strength = 0.45 + 0.55 * along_profile(n, rng, knots=max(4, n // 12))
    coverage = stroke_coverage(canvas.shape, [(path, widths)], [strength])

    polarity = choose_polarity(canvas, params.polarity, rng, bright_share=0.6)
    amount = (0.18 + 0.62 * params.severity) * coverage
    if polarity == "bright":
        out = brighten(canvas.base, amount, floor_levels=12.0)
        # The groove's far wall is in shadow: a faint dark line beside the bright one.
        lx, ly = canvas.light
        shift = (int(round(-lx)), int(round(-ly)))
        shadow = np.clip(np.roll(coverage, shift, axis=(1, 0)) - coverage, 0.0, 1.0)
        out = darken(out, 0.25 * params.severity * shadow)
    else:
        out = darken(canvas.base, amount, floor_levels=10.0)
    out = connect_line(canvas, out)  # one scratch, one piece (see ``connect_line``)
    return Rendered(out,
                    details={"polarity": polarity, "width_px": round(width, 2),
                             "length_px": round(float(length), 1)})
