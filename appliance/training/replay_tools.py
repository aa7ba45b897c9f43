"""Tools that answer with known pictures, for building expert trajectories from real defects.

In Alg. 2 the image generator's results are given in advance (earlier, weaker attempts, then the
real defect photo) and mask generation is "hard-coded" to the real mask (``RealMaskGenerator``,
which still reports it as the engine's mask tool would). Everything else in an
expert episode (prompt generation, the judge, knowledge retrieval, the rules, the messages) is
the environment's own, so the trajectory is exactly what a batch episode would record; only the
instruction's Size part states the real defect's length (``RealSizePromptGenerator``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from appliance.tools.image_gen.calibration import defect_pieces, major_axis
from appliance.tools.image_gen.placement import object_extent
from appliance.tools.interfaces import (Box, EditRequest, EditResult, MaskGenerator, MaskRequest,
                                        MaskResult, PromptGenerator, PromptRequest, ToolFailure)
from appliance.tools.object_map import find_object
from appliance.tools.prompt_gen.composer import PromptParts


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


class RealSizePromptGenerator:
    """The environment's own prompt generator, with the Size part stating the real defect's
    length: an expert trajectory's instruction describes the defect it ends with, so the judge,
    which checks a defect against the size its instruction asks for, can accept the real one."""

    def __init__(self, base: PromptGenerator, image: np.ndarray, mask: np.ndarray) -> None:
        self.base = base
        self.name = base.name
        # Measured as the judge measures it: the longest defect of the mask, pieces joined.
        length = max((major_axis(piece) for piece in defect_pieces(mask)), default=major_axis(mask))
        share = length / object_extent(find_object(image))
        low, high = (max(1, round(100 * share * f)) for f in (0.8, 1.2))
        self.size = f"{low} to {high} percent of the part's width in length"

    def generate_prompts(self, requests: Sequence[PromptRequest]) -> list:
        prompts = self.base.generate_prompts(requests)
        return [p if isinstance(p, ToolFailure) else self._sized(p) for p in prompts]

    def _sized(self, prompt: str) -> str:
        parts = PromptParts.parse(prompt)
        if parts.category:
            parts.size = self.size
            return parts.render()
        return f"{prompt.rstrip()} Size: {self.size}."


class RealMaskGenerator:
    """The real mask (the real defect's ground truth), reported the way the engine's own mask
    tool reports the same edit: its confidence and method for the real photo against the normal
    counterpart, with the real mask as its hint.

    A replayed tool that always answered "confidence 1.0, method real-mask", which no live mask
    tool ever says, put a cue in every trajectory that no batch episode has: the tiny test policy
    learned to write its final answer only after that exact reply, and garbled the answer after
    every live one (``"status": "final_image_index"``; probability of the right token 0.99 after
    the replayed reply, 0.01 after the same reply with a live confidence)."""

    name = "real-mask"

    def __init__(self, base: MaskGenerator, mask: np.ndarray) -> None:
        self.base = base
        self.mask = mask

    def generate_masks(self, requests: Sequence[MaskRequest]) -> list[MaskResult]:
        live = self.base.generate_masks([replace(r, hint=self.mask) for r in requests])
        return [MaskResult(self.mask.copy(), result.confidence, result.threshold, result.method)
                for result in live]
