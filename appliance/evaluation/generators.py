"""The generators the evaluation compares: ours (the full agent loop) and the baselines.

Every generator turns the same train normals into at most one synthetic anomaly each. Ours
keeps only the samples its judge accepted, as the product's dataset writer does; an image
whose episode was rejected gets another episode with a fresh seed, up to ``max_rounds``. The
baselines have no judge: every sample counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from appliance.evaluation.baselines import CutPasteGenerator, DraemGenerator, TrainingSample

BASELINES = ("draem", "cutpaste", "cutpaste-patch", "cutpaste-scar")
KNOWN = ("ours",) + BASELINES
ROUND_SEED_STRIDE = 100_003


class Generator(Protocol):
    name: str

    def generate(self, images: Sequence[np.ndarray], seed: int) -> list[TrainingSample]: ...


class OursGenerator:
    """The agent loop over whatever engine is configured (the CPU engine by default)."""

    name = "ours"

    def __init__(self, category: str, defects: Sequence[str], engine: Any = None) -> None:
        if not defects:
            raise ValueError("ours needs the defect types to synthesize")
        self.category = category
        self.defects = list(defects)
        self.engine = engine

    def _engine(self) -> Any:
        if self.engine is None:
            from appliance.engine import build_engine

            self.engine = build_engine()
        return self.engine

    def generate(self, images: Sequence[np.ndarray], seed: int) -> list[TrainingSample]:
        from appliance.agent.runner import synthesize

        results = synthesize(list(images), self.category, self.defects, seed, engine=self._engine())
        return [TrainingSample(np.asarray(r.image, dtype=np.uint8), np.asarray(r.mask, dtype=bool),
                               r.defect, bool(r.accepted), int(r.source_index)) for r in results]


def make_generator(name: str, category: str, defects: Sequence[str], engine: Any = None) -> Generator:
    if name == "ours":
        return OursGenerator(category, defects, engine)
    if name == "draem":
        return DraemGenerator()
    if name == "cutpaste":
        return CutPasteGenerator("mixed")
    if name.startswith("cutpaste-"):
        return CutPasteGenerator(name.split("-", 1)[1])
    raise ValueError(f"unknown generator {name!r}; known: {', '.join(KNOWN)}")


@dataclass
class GeneratedSet:
    """A generator's training anomalies and what it took to make them."""

    generator: str
    samples: list[TrainingSample]  # kept for training, at most one per train normal
    attempted: list[TrainingSample] = field(default_factory=list)  # every sample made, for metrics
    episodes: int = 0
    seconds: float = 0.0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted episodes over all episodes run (an episode that made no sample counts too)."""
        return sum(s.accepted for s in self.attempted) / self.episodes if self.episodes else float("nan")


def generate_training_set(generator: Generator, images: Sequence[np.ndarray], seed: int,
                          max_rounds: int = 3) -> GeneratedSet:
    """Run ``generator`` over ``images``; re-run rejected images with a new seed, up to
    ``max_rounds`` in all. ``source_index`` of the kept samples refers to ``images``."""
    kept: dict[int, TrainingSample] = {}
    attempted: list[TrainingSample] = []
    pending = list(range(len(images)))
    episodes, rounds = 0, 0
    start = time.perf_counter()
    while pending and rounds < max_rounds:
        # Later rounds use seeds far from any other run's, so no two rounds share a stream.
        batch = generator.generate([images[i] for i in pending], seed + ROUND_SEED_STRIDE * rounds)
        episodes += len(pending)
        rounds += 1
        for sample in batch:
            sample.source_index = pending[sample.source_index]
            attempted.append(sample)
            if sample.accepted and sample.mask.any() and sample.source_index not in kept:
                kept[sample.source_index] = sample
        pending = [i for i in pending if i not in kept]
    samples = [kept[i] for i in sorted(kept)]
    return GeneratedSet(generator.name, samples, attempted, episodes,
                        time.perf_counter() - start, rounds)


@dataclass
class GeneratorOutcome:
    name: str
    generated: GeneratedSet
    metrics: dict
    per_class: dict
    generation: dict
    timings: dict
    train_losses: list[float]
    pr_pixel: tuple[np.ndarray, np.ndarray]
    pr_image: tuple[np.ndarray, np.ndarray]
    example_maps: np.ndarray  # anomaly maps of the example test images
    train_examples: list[tuple[np.ndarray, np.ndarray]]  # (image as trained on, mask), a few
