"""Reverse synthesis: a real defect photo back to its normal counterpart.

Alg. 2 starts from a real defect and needs the same part without it, pixel-aligned, so that
the trajectory can go normal -> defect with the real mask. The masked region (grown a little, so
the defect's soft edge goes too) is filled from its surroundings by OpenCV's Telea inpainting:
for the textured, mostly flat surfaces of industrial parts this leaves a plausible normal
surface, and it needs no model on a CPU box.
"""

from __future__ import annotations

import numpy as np

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
    kernel = np.ones((2 * GROW_PIXELS + 1, 2 * GROW_PIXELS + 1), np.uint8)
    hole = cv2.dilate(mask.astype(np.uint8) * 255, kernel)
    filled = cv2.inpaint(np.ascontiguousarray(image[..., ::-1]), hole, INPAINT_RADIUS,
                         cv2.INPAINT_TELEA)
    return np.ascontiguousarray(filled[..., ::-1])


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
