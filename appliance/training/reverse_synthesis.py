"""Reverse synthesis: a real defect photo back to its normal counterpart.

Alg. 2 starts from a real defect and needs the same part without it, pixel-aligned, so that
the trajectory can go normal -> defect with the real mask. The masked region (grown a little, so
the defect's soft edge goes too) is filled in one of three ways:

- by the engine's diffusion inpainter when it has one (SDXL inpainting, Flux Fill;
  ``reverse_synthesize_with``), asked for the part's intact surface: the paper's way, and the
  one that invents plausible texture for large defects;
- from its surroundings by OpenCV's Telea inpainting (``reverse_synthesize``): for the
  textured, mostly flat surfaces of industrial parts this leaves a plausible normal surface,
  and it needs no model on a CPU box;
- from the plant's own normal photos (``appliance retrain --normal DIR``,
  ``reverse_synthesize_from``): the normal photo that agrees best with the defect photo outside
  the region lends its pixels at the same place, brightness-matched to the region's rim and
  feathered in. With parts shot by a fixed camera, as on a line, that is the real surface.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from appliance.tools.interfaces import SurfaceRestorer

# How far the hole reaches beyond the mask: real masks are drawn tight, and a defect's halo
# (shadow, discolouration) left behind would teach the policy that "normal" has it.
GROW_PIXELS = 3
INPAINT_RADIUS = 5


def reverse_synthesize(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (uint8 RGB) with the region of ``mask`` (bool) filled as normal surface."""
    import cv2

    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    if not mask.any():
        return image.copy()
    hole = _hole(mask).astype(np.uint8) * 255
    filled = cv2.inpaint(np.ascontiguousarray(image[..., ::-1]), hole, INPAINT_RADIUS,
                         cv2.INPAINT_TELEA)
    return np.ascontiguousarray(filled[..., ::-1])


def reverse_synthesize_with(image: np.ndarray, mask: np.ndarray, restorer: SurfaceRestorer,
                            category: str, seed: int) -> np.ndarray:
    """``image`` with the region of ``mask`` painted as intact surface by ``restorer``."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    if not mask.any():
        return image.copy()
    return restorer.restore(image, _hole(mask), category, seed)


MATCH_SIDE = 64  # photos are compared at this size: position and brightness, not texture
FEATHER_PIXELS = 2
RIM_PIXELS = 6  # the ring around the hole whose brightness the lent pixels are matched to


def _hole(mask: np.ndarray) -> np.ndarray:
    import cv2

    kernel = np.ones((2 * GROW_PIXELS + 1, 2 * GROW_PIXELS + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8) * 255, kernel) > 0


def best_normal(image: np.ndarray, mask: np.ndarray, normals: Sequence[np.ndarray]) -> int:
    """Index of the normal photo (same size as ``image``) closest to ``image`` outside the
    grown mask: mean absolute grey difference at ``MATCH_SIDE`` pixels."""
    import cv2

    if not normals:
        raise ValueError("no normal photo to match")
    height, width = mask.shape
    scale = MATCH_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))

    def small(picture: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(np.ascontiguousarray(picture), cv2.COLOR_RGB2GRAY)
        return cv2.resize(grey, size, interpolation=cv2.INTER_AREA).astype(np.float32)

    outside = cv2.resize((~_hole(mask)).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    target = small(image)
    scores = []
    for normal in normals:
        if normal.shape != image.shape:
            raise ValueError(f"normal photo {normal.shape} and defect photo {image.shape} differ "
                             "in size")
        scores.append(float(np.abs(small(normal) - target)[outside].mean()) if outside.any()
                      else 0.0)
    return int(np.argmin(scores))


def reverse_synthesize_from(image: np.ndarray, mask: np.ndarray,
                            normals: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """``image`` with the region of ``mask`` taken from the best-matching normal photo;
    (the normal counterpart, the index of the photo it borrowed from)."""
    import cv2

    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    index = best_normal(image, mask, normals)
    if not mask.any():
        return image.copy(), index
    hole = _hole(mask)
    kernel = np.ones((2 * RIM_PIXELS + 1, 2 * RIM_PIXELS + 1), np.uint8)
    rim = (cv2.dilate(hole.astype(np.uint8), kernel) > 0) & ~hole
    lent = normals[index].astype(np.float32)
    if rim.any():  # the same brightness as the defect photo around the hole, per channel
        lent += image[rim].astype(np.float32).mean(axis=0) - lent[rim].mean(axis=0)
    alpha = cv2.GaussianBlur(hole.astype(np.float32), (0, 0), FEATHER_PIXELS)
    alpha = np.maximum(alpha, hole)[..., None]  # fully replaced inside, feathered outside
    mixed = alpha * lent + (1.0 - alpha) * image.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8), index


def partial_defect(normal: np.ndarray, defect: np.ndarray, mask: np.ndarray,
                   strength: float) -> np.ndarray:
    """The real defect at ``strength`` (0-1) of its contrast over the normal counterpart: an
    earlier, weaker attempt of a multi-step trajectory, on the same spot as the real one."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError("strength must be between 0 and 1")
    blended = normal.astype(np.float32) + strength * (defect.astype(np.float32) - normal.astype(np.float32))
    out = normal.copy()
    out[mask] = np.clip(np.rint(blended[mask]), 0, 255).astype(np.uint8)
    return out
