"""Smooth random fields for irregular outlines, mottling and DRAEM-style anomaly masks.

No Perlin package is installed with the appliance, so gradient noise is a compact vectorised
numpy version of the usual algorithm (quintic fade, random unit gradients on a lattice).
"""

from __future__ import annotations

import cv2
import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_2d(shape: tuple[int, int], res: tuple[int, int],
              rng: np.random.Generator) -> np.ndarray:
    """Gradient noise of ``shape`` with ``res`` lattice cells along (y, x); values ~[-0.7, 0.7]."""
    height, width = shape
    res_y, res_x = max(int(res[0]), 1), max(int(res[1]), 1)
    angles = rng.uniform(0.0, 2.0 * np.pi, (res_y + 1, res_x + 1))
    grad_y, grad_x = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)

    ys = (np.arange(height, dtype=np.float32) + 0.5) * (res_y / height)
    xs = (np.arange(width, dtype=np.float32) + 0.5) * (res_x / width)
    y0, x0 = ys.astype(np.int64), xs.astype(np.int64)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        index = np.ix_(y0 + dy, x0 + dx)
        return grad_y[index] * (fy - dy) + grad_x[index] * (fx - dx)

    wy, wx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1.0 - wx) + corner(0, 1) * wx
    bottom = corner(1, 0) * (1.0 - wx) + corner(1, 1) * wx
    return top * (1.0 - wy) + bottom * wy


def fractal_noise(shape: tuple[int, int], rng: np.random.Generator, base_cells: float = 2.0,
                  octaves: int = 4, persistence: float = 0.5, max_side: int = 128) -> np.ndarray:
    """Sum of Perlin octaves in about [-1, 1]; ``base_cells`` lattice cells along the longer side.

    Computed at most ``max_side`` pixels along the longer side and upsampled: the finest octave
    is still several pixels per cell there, so nothing visible is lost and it stays fast.
    """
    height, width = shape
    longer = max(height, width)
    factor = min(1.0, max_side / longer)
    work = (max(2, int(round(height * factor))), max(2, int(round(width * factor))))
    total = np.zeros(work, dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        cells = base_cells * (2 ** octave)
        res = (max(1, int(np.ceil(cells * height / longer))),
               max(1, int(np.ceil(cells * width / longer))))
        total += amplitude * perlin_2d(work, res, rng)
        norm += amplitude
        amplitude *= persistence
    total = np.clip(total / (0.45 * norm), -1.0, 1.0)
    if work != (height, width):
        total = cv2.resize(total, (width, height), interpolation=cv2.INTER_LINEAR)
    return total


def value_noise(shape: tuple[int, int], rng: np.random.Generator, cell_px: float) -> np.ndarray:
    """Fast smooth noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    height, width = shape
    grid = (max(2, int(np.ceil(height / max(cell_px, 1.0))) + 2),
            max(2, int(np.ceil(width / max(cell_px, 1.0))) + 2))
    coarse = rng.uniform(-1.0, 1.0, grid).astype(np.float32)
    return np.clip(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC), -1.0, 1.0)


def draem_perlin_noise(shape: tuple[int, int], rng: np.random.Generator, min_scale: int = 0,
                       max_scale: int = 6, max_side: int = 256) -> np.ndarray:
    """DRAEM's noise: Perlin at a random scale 2^min..2^(max-1) per axis, randomly rotated.

    DRAEM scales its noise by sqrt(2) to span about [-1, 1]; we keep that convention so that a
    0.5 threshold covers the same share of the area. At most 32 cells across, the noise is smooth
    enough to be computed on at most ``max_side`` pixels and upsampled.
    """
    height, width = shape
    scale_y = 2 ** int(rng.integers(min_scale, max_scale))
    scale_x = 2 ** int(rng.integers(min_scale, max_scale))
    angle = float(rng.uniform(-90.0, 90.0))
    factor = min(1.0, max_side / max(height, width))
    work_h, work_w = max(int(round(height * factor)), 2), max(int(round(width * factor)), 2)
    # Noise on a padded square so that rotation leaves no empty corners.
    side = int(np.ceil(np.hypot(work_h, work_w))) + 2
    noise = np.sqrt(2.0) * perlin_2d((side, side), (scale_y, scale_x), rng)
    rotation = cv2.getRotationMatrix2D((side / 2.0, side / 2.0), angle, 1.0)
    noise = cv2.warpAffine(noise, rotation, (side, side), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT)
    top, left = (side - work_h) // 2, (side - work_w) // 2
    noise = np.ascontiguousarray(noise[top:top + work_h, left:left + work_w])
    if (work_h, work_w) != (height, width):
        noise = cv2.resize(noise, (width, height), interpolation=cv2.INTER_LINEAR)
    return noise


def draem_perlin_mask(shape: tuple[int, int], rng: np.random.Generator, min_scale: int = 0,
                      max_scale: int = 6, threshold: float = 0.5) -> np.ndarray:
    """DRAEM's anomaly mask: its Perlin noise thresholded at 0.5."""
    return draem_perlin_noise(shape, rng, min_scale, max_scale) > threshold
