"""The generators the evaluation compares: ours (the full agent loop) and the baselines.

Every generator turns the same train normals into at most one synthetic anomaly each. Ours
keeps only the samples its judge accepted, as the product's dataset writer does; an image
whose episode was rejected gets another episode with a fresh seed, up to ``max_rounds``. The
baselines have no judge: every sample counts. With ``--few-shot K`` the generators that can
learn from real defects (ours, copypaste) get the K shots per defect type; the others ignore
them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from appliance.evaluation.baselines import (CopyPasteGenerator, CutPasteGenerator, DraemGenerator,
                                            Progress, TrainingSample)

if TYPE_CHECKING:
    from appliance.evaluation.data import LabeledImage

BASELINES = ("draem", "cutpaste", "cutpaste-patch", "cutpaste-scar", "copypaste")
KNOWN = ("ours",) + BASELINES
NEEDS_SHOTS = ("copypaste",)
ROUND_SEED_STRIDE = 100_003


class Generator(Protocol):
    name: str

    def generate(self, images: Sequence[np.ndarray], seed: int,
                 progress: Progress | None = None) -> list[TrainingSample]: ...


class OursGenerator:
    """The agent loop over whatever engine is configured (the CPU engine by default).

    ``shots``: the few-shot real defects (empty zero-shot). The engine is calibrated on them as
    ``appliance retrain`` would calibrate it (priors and a bank of the shots), for this run only.
    """

    name = "ours"

    def __init__(self, category: str, defects: Sequence[str], engine: Any = None,
                 shots: Sequence["LabeledImage"] = ()) -> None:
        if not defects:
            raise ValueError("ours needs the defect types to synthesize")
        self.category = category
        self.defects = list(defects)
        self.engine = engine
        self.shots = list(shots)
        self.calibration_used: dict | str | None = None

    def _engine(self) -> Any:
        if self.engine is None:
            from appliance.engine import build_engine

            self.engine = build_engine()
        return self.engine

    def calibration(self) -> Any:
        """The profile the shots make (None zero-shot), as ``appliance retrain`` builds it."""
        if not self.shots:
            return None
        from appliance.tools.image_gen.calibration import build_profile

        return build_profile(self.category, [(s.image, s.mask, s.defect, s.source)
                                             for s in self.shots])

    def generate(self, images: Sequence[np.ndarray], seed: int,
                 progress: Progress | None = None) -> list[TrainingSample]:
        from appliance.agent.runner import synthesize

        engine = self._engine()
        # Zero-shot measures the engine as shipped, never a profile the box happens to have
        # promoted; few-shot measures it calibrated on the shots alone.
        calibrations = getattr(engine, "calibrations", None)
        profile = self.calibration()
        if calibrations is None and profile is not None:
            raise ValueError("this engine cannot be calibrated; run ours zero-shot")
        previous = calibrations.get(self.category) if calibrations is not None else None
        _set_profile(calibrations, self.category, profile)
        # What ours ran with, for the report (the engine's own is restored afterwards).
        self.calibration_used = (profile.summary() | {"from": f"{len(self.shots)} shots"}
                                 if profile is not None else "none (zero-shot)")
        try:
            results = synthesize(list(images), self.category, self.defects, seed, engine=engine,
                                 progress=progress)
        finally:
            _set_profile(calibrations, self.category, previous)
        return [TrainingSample(np.asarray(r.image, dtype=np.uint8), np.asarray(r.mask, dtype=bool),
                               r.defect, bool(r.accepted), int(r.source_index), r.verdicts)
                for r in results]


def _set_profile(calibrations: Any, category: str, profile: Any) -> None:
    if calibrations is None:
        return
    if profile is None:
        calibrations.drop(category)
    else:
        calibrations.use(profile)


def make_generator(name: str, category: str, defects: Sequence[str], engine: Any = None,
                   shots: Sequence["LabeledImage"] = ()) -> Generator:
    """``shots``: the few-shot real defects, for the generators that use them (ours, copypaste)."""
    if name == "ours":
        return OursGenerator(category, defects, engine, shots)
    if name == "copypaste":
        return CopyPasteGenerator(shots)
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

    @property
    def acceptance_by_defect(self) -> dict[str, float]:
        """Accepted over attempted per defect type. Only episodes that made a sample say which
        type they were, so an episode that made nothing is not counted here."""
        made: dict[str, list[bool]] = {}
        for sample in self.attempted:
            made.setdefault(sample.defect, []).append(sample.accepted)
        return {defect: sum(flags) / len(flags) for defect, flags in sorted(made.items())}

    @property
    def judge_pass_by_defect(self) -> dict[str, dict[str, float]]:
        """Per defect type, the judge's own verdicts: the share of first attempts it passed and
        of all attempts (an episode accepted on its third try had two attempts refused)."""
        first: dict[str, list[bool]] = {}
        every: dict[str, list[bool]] = {}
        for sample in self.attempted:
            if sample.verdicts:
                first.setdefault(sample.defect, []).append(sample.verdicts[0])
                every.setdefault(sample.defect, []).extend(sample.verdicts)
        return {defect: {"first_attempt": sum(first[defect]) / len(first[defect]),
                         "all_attempts": sum(flags) / len(flags), "attempts": len(flags)}
                for defect, flags in sorted(every.items())}


def generate_training_set(generator: Generator, images: Sequence[np.ndarray], seed: int,
                          max_rounds: int = 3, progress: bool = False) -> GeneratedSet:
    """Run ``generator`` over ``images``; re-run rejected images with a new seed, up to
    ``max_rounds`` in all. ``source_index`` of the kept samples refers to ``images``.
    ``progress``: a bar over the images on stderr (tqdm leaves it off where stderr is no tty)."""
    kept: dict[int, TrainingSample] = {}
    attempted: list[TrainingSample] = []
    pending = list(range(len(images)))
    episodes, rounds = 0, 0
    start = time.perf_counter()
    bar = tqdm(total=len(images), desc=f"[{generator.name}] synthesizing", unit="image",
               disable=None if progress else True, leave=False, dynamic_ncols=True)
    while pending and rounds < max_rounds:
        if rounds:  # the rejected images run again
            bar.total += len(pending)
            bar.refresh()
        # Later rounds use seeds far from any other run's, so no two rounds share a stream.
        batch = generator.generate([images[i] for i in pending], seed + ROUND_SEED_STRIDE * rounds,
                                   progress=bar.update)
        episodes += len(pending)
        rounds += 1
        for sample in batch:
            sample.source_index = pending[sample.source_index]
            attempted.append(sample)
            if sample.accepted and sample.mask.any() and sample.source_index not in kept:
                kept[sample.source_index] = sample
        pending = [i for i in pending if i not in kept]
    bar.close()
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
    # Per pixel-labelled test photo, positive and negative pixels per score bin (what the
    # bootstrap resamples); None where no test photo has a mask.
    pixel_counts: tuple[np.ndarray, np.ndarray] | None = None
