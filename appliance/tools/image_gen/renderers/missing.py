"""Missing part / chip / break.

On a part with a background, a bite of the part at its outline is gone: those pixels show the
background (its local colour and grain), and the fresh fracture along the new outline is a thin
darker line. On a full-frame texture there is nothing behind, so the chip is a region of darker,
rough fracture surface made of a few flat facets, with a sharp lit/shadowed edge.
"""

from __future__ import annotations

import cv2
import numpy as np

from appliance.tools.image_gen.prompt_params import EditParams
from appliance.tools.image_gen.renderers.base import (Canvas, Rendered, blob_polygon,
                                                      midpoint_path, mottle, polygon_coverage)


def _bite(canvas: Canvas, params: EditParams, rng: np.random.Generator,
          shrink: float) -> np.ndarray:
    theta = float(params.orientation_deg or 0.0)
    a, b = canvas.ellipse_axes(min(params.elongation, 2.5), theta)
    scale = shrink * (0.75 + 0.25 * params.severity)
    vertices = int(5 + round(6 * params.roughness))
    cx, cy = canvas.center
    corners = blob_polygon(cx, cy, a * scale, b * scale, theta, vertices,
                           0.15 + 0.3 * params.roughness, rng)
    # Fracture outlines are jagged at every scale between the main corners.
    closed = np.vstack([corners, corners[:1]])
    pieces = [midpoint_path(closed[i], closed[i + 1], 0.2 + 0.4 * params.roughness, 2.5, rng)[:-1]
              for i in range(len(corners))]
    return polygon_coverage(canvas.shape, [np.vstack(pieces)])


def _background(canvas: Canvas) -> tuple[np.ndarray | None, float]:
    """Local background colour and grain from the window, else the object map's colour."""
    outside = ~canvas.fg
    if outside.sum() >= 12:
        pixels = canvas.base[outside]
        return np.median(pixels, axis=0), float(min(np.std(pixels @ np.ones(3) / 3.0), 6.0))
    if canvas.background_color is not None and not canvas.is_texture:
        return np.asarray(canvas.background_color, dtype=np.float32), 2.0
    return None, 0.0


def render(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    background, grain = _background(canvas)
    if background is not None and not canvas.is_texture:
        return _bite_off(canvas, params, rng, background, grain)
    return _chip(canvas, params, rng)


def _part_pixels(canvas: Canvas, background: np.ndarray, grain: float) -> np.ndarray:
    """The foreground plus the part's own pixels just outside it (a coarse outline misses them)."""
    near = cv2.dilate(canvas.fg.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    distance = np.abs(canvas.base - background[None, None, :]).max(axis=2)
    return canvas.fg | (near & (distance > max(12.0, 3.0 * grain)))


def _bite_off(canvas: Canvas, params: EditParams, rng: np.random.Generator,
              background: np.ndarray, grain: float) -> Rendered:
    part = _part_pixels(canvas, background, grain)
    bite = _bite(canvas, params, rng, shrink=1.0) * part
    fill = background[None, None, :] + grain * mottle(canvas, rng, 1.5)[..., None]
    out = canvas.base * (1.0 - bite[..., None]) + fill * bite[..., None]
    # The exposed fracture face: a thin darker band just inside the new outline.
    grown = cv2.GaussianBlur(bite, (0, 0), 1.0)
    rim = np.clip(grown * 2.0 - bite, 0.0, 1.0) * part * (1.0 - bite)
    out = out * (1.0 - (0.25 + 0.35 * params.severity) * rim[..., None])
    return Rendered(np.clip(out, 0, 255), support=bite > 0.5, object_pixels=part,
                    details={"mode": "bite",
                             "background": [round(float(c), 1) for c in background]})


def _chip(canvas: Canvas, params: EditParams, rng: np.random.Generator) -> Rendered:
    chip = _bite(canvas, params, rng, shrink=0.9)
    height, width = canvas.shape
    # Facets: nearest of a few random seeds, each tilted its own way to the light.
    cx, cy = canvas.center
    seeds = np.stack([cx + rng.normal(0, canvas.region.width / 4.0, 5),
                      cy + rng.normal(0, canvas.region.height / 4.0, 5)], axis=1)
    x, y = canvas.grid()
    distance = (x[..., None] - seeds[:, 0]) ** 2 + (y[..., None] - seeds[:, 1]) ** 2
    facet = np.argmin(distance, axis=2)
    tilt = rng.uniform(-0.18, 0.18, len(seeds))[facet]
    grain = 0.08 * mottle(canvas, rng, 1.2)
    darkness = 0.3 + 0.35 * params.severity
    fracture = canvas.base * (1.0 - darkness + tilt + grain)[..., None] - 8.0
    out = canvas.base * (1.0 - chip[..., None]) + fracture * chip[..., None]
    # The broken edge: lit where it faces the light, shadowed where it faces away.
    gy, gx = np.gradient(cv2.GaussianBlur(chip, (0, 0), 0.8))
    lx, ly = canvas.light
    facing = -(gx * lx + gy * ly)
    out = out + (60.0 * (0.4 + 0.6 * params.severity) * facing)[..., None]
    return Rendered(np.clip(out, 0, 255), support=chip > 0.5,
                    details={"mode": "chip", "darkness": round(darkness, 3),
                             "facets": int(len(seeds)), "window": [height, width]})
