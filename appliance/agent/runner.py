"""Running many episodes through one engine: lockstep chunks, for batches and for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from appliance.agent.environment import AgentEnvironment
from appliance.agent.episode import EpisodeResult, EpisodeSpec
from appliance.agent.policy import Policy


class Runs(Protocol):
    """What running episodes needs of an engine (``appliance.engine.Engine`` is one)."""

    environment: AgentEnvironment
    policy: Policy


def run_episodes(engine: Runs, specs: Iterable[EpisodeSpec], chunk: int = 8) -> Iterator[EpisodeResult]:
    """Yield results in order; ``chunk`` episodes step together (one batched call per tool)."""
    batch: list[EpisodeSpec] = []
    for spec in specs:
        batch.append(spec)
        if len(batch) == chunk:
            yield from engine.environment.run(batch, engine.policy)
            batch = []
    if batch:
        yield from engine.environment.run(batch, engine.policy)


@dataclass
class SyntheticSample:
    image: np.ndarray
    mask: np.ndarray
    defect: str
    accepted: bool
    source_index: int
    # The judge's verdict on every image_gen attempt of the episode, in order.
    verdicts: tuple[bool, ...] = ()


def synthesize(images: Sequence[np.ndarray], category: str, defects: Sequence[str], seed: int,
               engine: Runs, progress: Callable[[int], object] | None = None) -> list[SyntheticSample]:
    """One episode per image (defects in rotation), the full agent loop; for evaluation.

    Returns every episode that produced a mask, accepted or not, with ``accepted`` telling which.
    ``progress(1)`` is called after every episode (a progress bar's ``update``).
    """
    specs = [EpisodeSpec(image=image, category=category, defect=defects[i % len(defects)],
                         seed=seed * 1_000_003 + i, source=f"#{i}")
             for i, image in enumerate(images)]
    samples = []
    for index, result in enumerate(run_episodes(engine, specs)):
        if result.final_image is not None and result.mask is not None:
            verdicts = tuple(bool(a.passed) for a in result.attempts if a.passed is not None)
            samples.append(SyntheticSample(result.final_image, result.mask.mask,
                                           result.spec.defect, result.accepted, index, verdicts))
        if progress is not None:
            progress(1)
    return samples
