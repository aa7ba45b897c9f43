"""Held-out episodes: how a policy does on the plant's defects it was never trained on.

The policy runs unguided, from each held-out defect's normal counterpart, through the engine's
own environment and tools (the same loop as a batch); the rewards (``rewards.py``) score each
episode. The promotion gate compares these figures between adapters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import mean, median
from typing import Sequence

import numpy as np

from appliance.agent.environment import AgentEnvironment
from appliance.agent.episode import EpisodeSpec
from appliance.agent.policy import Policy
from appliance.training.rewards import RewardBreakdown, rewards
from appliance.training.trajectories import DefectExample, task_environment


@dataclass
class HeldoutFigures:
    episodes: int
    complete: float  # share of episodes that followed the protocol to an answer
    accepted: float  # share that ended with an accepted, masked image
    reward: float  # mean total reward
    task: float
    reflection: float
    behaviour: float

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def real_area_medians(examples: Sequence[DefectExample]) -> dict[str, float]:
    """Median mask area (share of the image) per defect type of the plant's real defects."""
    areas: dict[str, list[float]] = {}
    for example in examples:
        areas.setdefault(example.defect.defect, []).append(float(example.defect.mask.mean()))
    return {defect: median(values) for defect, values in areas.items()}


def heldout_specs(examples: Sequence[DefectExample], category: str, seed: int,
                  repeats: int = 1) -> list[EpisodeSpec]:
    return [EpisodeSpec(image=example.normal, category=category, defect=example.defect.defect,
                        seed=int(np.random.SeedSequence([seed, index, r, 0x4E]).generate_state(1)[0]),
                        source=example.defect.source)
            for r in range(repeats) for index, example in enumerate(examples)]


def run_heldout(environment: AgentEnvironment, policy: Policy,
                examples: Sequence[DefectExample], category: str, seed: int, repeats: int,
                real_areas: dict[str, float], progress=None
                ) -> tuple[HeldoutFigures, list[RewardBreakdown]]:
    """``repeats`` episodes of each held-out defect, run together in that defect's environment
    (``task_environment``: its instruction states the real defect's size, as in training)."""
    results = []
    specs = heldout_specs(examples, category, seed, repeats)
    for index, example in enumerate(examples):
        mine = specs[index::len(examples)]
        results += task_environment(environment, example).run(mine, policy)
        if progress is not None:
            progress.update(len(mine))
    scored = rewards(results, environment.config, real_areas)
    figures = HeldoutFigures(
        episodes=len(results), complete=mean(r.complete for r in scored) if scored else 0.0,
        accepted=mean(e.accepted for e in results) if results else 0.0,
        reward=mean(r.total for r in scored) if scored else 0.0,
        task=mean(r.task for r in scored) if scored else 0.0,
        reflection=mean(r.reflection for r in scored) if scored else 0.0,
        behaviour=mean(r.behaviour for r in scored) if scored else 0.0)
    return figures, scored
