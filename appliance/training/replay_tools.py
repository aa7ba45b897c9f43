"""Tools that answer with known pictures, for building expert trajectories from real defects.

In Alg. 2 the image generator's results are given in advance (earlier, weaker attempts, then the
real defect photo) and mask generation is "hard-coded" to the real mask. Everything else in an
expert episode (prompt generation, the judge, knowledge retrieval, the rules, the messages) is
the environment's own, so the trajectory is exactly what a batch episode would record.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from appliance.tools.interfaces import Box, EditRequest, EditResult, MaskRequest, MaskResult


def _box_of(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return Box(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


class ReplayImageGenerator:
    """Answers the n-th ``image_gen`` call of its one episode with the n-th given picture."""

    name = "replay-real-defect"

    def __init__(self, pictures: Sequence[np.ndarray], mask: np.ndarray, source: str) -> None:
        if not pictures:
            raise ValueError("at least one picture is needed")
        self.pictures = list(pictures)
        self.mask = mask
        self.source = source
        self.calls = 0

    def generate(self, requests: Sequence[EditRequest]) -> list[EditResult]:
        results = []
        for _ in requests:
            step = min(self.calls, len(self.pictures) - 1)
            self.calls += 1
            results.append(EditResult(
                image=self.pictures[step], region=_box_of(self.mask), mask=self.mask.copy(),
                params={"replayed": self.source, "step": step + 1, "of": len(self.pictures)}))
        return results


class RealMaskGenerator:
    """The real mask, whatever the pixels say (the real defect's ground truth)."""

    name = "real-mask"

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def generate_masks(self, requests: Sequence[MaskRequest]) -> list[MaskResult]:
        return [MaskResult(self.mask.copy(), confidence=1.0, threshold=0.5, method="real-mask")
                for _ in requests]
