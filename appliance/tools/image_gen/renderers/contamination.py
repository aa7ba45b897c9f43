"""Contamination: foreign specks and dust in a loose cluster, or a stray fibre lying on the part."""

from __future__ import annotations

import math

import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import (Canvas, Rendered, blob_polygon,
                                                      choose_polarity, polygon_coverage,
                                                      stroke_coverage)

DARK_DIRT = ((40, 36, 32), (70, 55, 40), (25, 25, 25))
LIGHT_DUST = ((225, 222, 215), (200, 195, 185))


def _specks(canvas: Canvas, params: EditParams,
            rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    theta = float(params.orientation_deg or 0.0)
    a, b = canvas.ellipse_axes(params.elongation, theta)
    cx, cy = canvas.center
    scale = float(np.clip((a + b) / 18.0, 0.6, 2.5))
    count = int(np.clip(3 + (a * b) / (10.0 * scale * scale) * rng.uniform(0.3, 1.0), 3, 30))
    c, s = math.cos(math.radians(theta)), math.sin(math.radians(theta))
    polygons, levels = [], []
    for _ in range(count):
        # Gaussian cluster: dense in the middle, a few strays toward the rim.
        u, v = np.clip(rng.normal(0.0, 0.38, 2), -0.95, 0.95)
        px, py = cx + a * u * c - b * v * s, cy + a * u * s + b * v * c
        size = scale * rng.uniform(0.5, 1.6)
        polygons.append(blob_polygon(px, py, size, size * rng.uniform(0.5, 1.0),
                                     float(rng.uniform(0, 180)), int(rng.integers(7, 12)), 0.25,
                                     rng))
        levels.append(float(rng.uniform(0.7, 1.0)))
    coverage = polygon_coverage(canvas.shape, polygons, levels)
    return coverage, {"form": "speck", "particles": count, "particle_px": round(2 * scale, 2)}


def _fibre(canvas: Canvas, params: EditParams,
           rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    theta = float(params.orientation_deg or 0.0)
    length = canvas.line_length(theta) * 0.9
    n = max(int(length / 1.5), 12)
    step = length / n
    # A fibre curls: its heading drifts as a smoothed random walk.
    turn = np.convolve(rng.normal(0.0, 0.25, n), np.ones(5) / 5.0, mode="same")
    heading = math.radians(theta) + np.cumsum(turn) - np.cumsum(turn).mean()
    path = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], axis=1) * step, axis=0)
    path -= (path.max(axis=0) + path.min(axis=0)) / 2.0
    # Squeeze into the region if the curl made it larger.
    span = np.maximum(path.max(axis=0) - path.min(axis=0), 1e-6)
    room = np.array([canvas.region.width, canvas.region.height], dtype=float) * 0.95
    path *= min(1.0, float(np.min(room / span)))
    path += np.array(canvas.center)
    width = float(rng.uniform(0.7, 1.4))
    coverage = stroke_coverage(canvas.shape, [(path, np.full(n, width))],
                               [0.75 + 0.25 * np.abs(np.sin(np.linspace(0, 3, n)))])
    return coverage, {"form": "fibre", "length_px": round(length, 1), "width_px": round(width, 2)}


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    if params.form == "fibre":
        coverage, details = _fibre(canvas, params, rng)
    else:
        coverage, details = _specks(canvas, params, rng)
    polarity = choose_polarity(canvas, params.polarity, rng, bright_share=0.25)
    palette = LIGHT_DUST if polarity == "bright" else DARK_DIRT
    color = params.color or palette[int(rng.integers(len(palette)))]
    opacity = 0.5 + 0.5 * params.severity
    alpha = np.clip(coverage * opacity, 0.0, 1.0)[..., None]
    out = canvas.base * (1.0 - alpha) + alpha * np.asarray(color, dtype=np.float32)
    details.update({"color": list(color), "opacity": round(opacity, 3), "polarity": polarity})
    return Rendered(out, details=details)
