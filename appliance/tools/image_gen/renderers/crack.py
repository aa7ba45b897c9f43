"""Crack: a jagged, branching dark fracture whose width varies and thins to nothing at its tips;
one that runs in from an edge is widest where it opens, at the edge, and thins to its inner tip."""

from __future__ import annotations

import math

import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import (Canvas, Rendered, along_profile,
                                                      connect_line, darken, midpoint_path,
                                                      mottle, stroke_coverage, taper)


# Per-level decay of the path's displacement (see ``midpoint_path``).
PATH_DECAY = 0.7


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    theta = float(params.orientation_deg or 0.0)
    length = canvas.line_length(theta, thickness=canvas.region.height * 0.1) * 0.95
    cx, cy = canvas.center
    direction = np.array([math.cos(math.radians(theta)), math.sin(math.radians(theta))])
    start = np.array([cx, cy]) - direction * length / 2.0
    end = np.array([cx, cy]) + direction * length / 2.0
    roughness = 0.3 + 0.7 * params.roughness
    # One that runs in from the edge opens there: it starts at the end nearer the outline.
    from_edge = params.edge_mode == "inward" and params.location in ("edge", "corner")
    if from_edge and outline_distance(canvas, end) < outline_distance(canvas, start):
        start, end = end, start
    # Jagged in the small but roughly straight as a whole: the displacement decays with scale.
    main = midpoint_path(start, end, roughness * 0.6, segment_px=3.0, rng=rng, decay=PATH_DECAY)

    if params.width_px is not None:
        # The asked width is what one sees (and masks): the stroke's anti-aliased fringe adds
        # about a pixel.
        width = max(params.width_px - 0.5, 0.8)
    else:
        width = float(np.clip(0.9 + length / 70.0, 0.9, 3.2)) * (0.6 + 0.5 * params.severity)
    n = len(main)
    widths = (width * taper(n, power=0.6, floor=0.2, open_start=from_edge)
              * (0.6 + 0.4 * along_profile(n, rng, 8)))
    strokes = [(main, widths)]

    # Side branches leave the main line at a sharp angle and die out quickly.
    branch_count = int(rng.integers(0, 2 + min(int(length // 40), 3)))
    for _ in range(branch_count):
        at = int(rng.integers(int(0.15 * n), max(int(0.85 * n), int(0.15 * n) + 1)))
        local = main[min(at + 1, n - 1)] - main[max(at - 1, 0)]
        heading = math.atan2(local[1], local[0]) + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0)
        span = length * rng.uniform(0.12, 0.35)
        tip = main[at] + span * np.array([math.cos(heading), math.sin(heading)])
        branch = midpoint_path(main[at], tip, roughness * 0.7, segment_px=3.0, rng=rng,
                               decay=PATH_DECAY)
        bw = widths[at] * 0.7 * np.linspace(1.0, 0.15, len(branch))
        strokes.append((branch, bw))

    coverage = stroke_coverage(canvas.shape, strokes)
    depth = (0.35 + 0.55 * params.severity) * (0.85 + 0.15 * mottle(canvas, rng, 12.0))
    out = darken(canvas.base, np.clip(coverage * depth, 0.0, 1.0),
                 floor_levels=12.0 + 18.0 * params.severity)
    # One crack is one piece: branches meet the trunk, and specks off the tips go.
    out = connect_line(canvas, out)
    return Rendered(out, details={"width_px": round(width, 2), "length_px": round(length, 1),
                                  "branches": branch_count, "from_edge": from_edge})


def outline_distance(canvas: Canvas, point: np.ndarray) -> float:
    """How far a window point lies from the part's outline; the photo's border counts as one."""
    x, y = float(point[0]), float(point[1])
    height, width = canvas.image.shape[:2]
    wx, wy = x + canvas.window.x0, y + canvas.window.y0
    distance = min(wx, wy, width - 1 - wx, height - 1 - wy)
    ys, xs = np.nonzero(~canvas.fg)
    if ys.size:
        distance = min(distance, float(np.min(np.hypot(xs - x, ys - y))))
    return distance
