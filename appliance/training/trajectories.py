"""Stage 1 of retraining (Alg. 2): expert trajectories from the plant's real defects.

For each real defect photo with its mask: its normal counterpart by reverse synthesis, then an
episode of the one environment from that normal photo to the real defect. The expert (the
scripted policy, Alg. 1) calls the real prompt generator, judge and knowledge base; the image
generator answers with weaker versions of the real defect for the earlier attempts and with the
real photo for the last one, and mask generation with the real mask (reported with the engine's
mask tool's confidence and method, so no reply differs from a live one). A trajectory with N image
generation steps is kept only when the real judge rejected the N - 1 earlier attempts and
accepted the real defect, so every kept trajectory is what the environment would record for a
policy that retried exactly as the paper's Single/Dual/Triple-Generation trajectories do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from appliance.agent.environment import AgentEnvironment
from appliance.agent.episode import EpisodeResult, EpisodeSpec
from appliance.dataset.trajectory import save_trajectory
from appliance.evaluation.data import LabeledImage
from appliance.imaging import write_atomic
from appliance.policies.scripted import ScriptedPolicy
from appliance.tools.interfaces import SurfaceRestorer
from appliance.training.replay_tools import (RealMaskGenerator, RealSizePromptGenerator,
                                             ReplayImageGenerator)
from appliance.training.reverse_synthesis import (partial_defect, reverse_synthesize,
                                                  reverse_synthesize_from, reverse_synthesize_with)

# Contrast of each attempt relative to the real defect, per number of image_gen steps: the
# earlier attempts are the real defect too faint, as a first simple prompt often gives. Where the
# judge still accepts an earlier attempt, the next, fainter schedule is tried: a judge that sees a
# defect at 30 % of its contrast must be shown a fainter miss, else the trajectory is lost.
STRENGTHS: dict[int, tuple[tuple[float, ...], ...]] = {
    1: ((1.0,),),
    2: ((0.3, 1.0), (0.1, 1.0), (0.03, 1.0)),
    3: ((0.12, 0.4, 1.0), (0.05, 0.15, 1.0), (0.02, 0.06, 1.0)),
}


@dataclass
class DefectExample:
    """A real defect with its normal counterpart, as the run directory keeps it."""

    id: str  # "<defect>/<stem>", unique within a run
    defect: LabeledImage
    normal: np.ndarray


@dataclass
class TrajectoryOutcome:
    example_id: str
    steps: int
    kept: bool
    reason: str  # why it was not kept; "" when kept
    folder: str = ""  # relative to the run directory, when kept


def split_examples(items: Sequence[LabeledImage], seed: int, holdout_fraction: float
                   ) -> tuple[list[int], list[int]]:
    """Indices of (train, held-out) items: per defect type, a seeded share held out, at least
    one where the type has two or more photos; never trained on."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError("holdout_fraction must be in [0, 1)")
    rng = np.random.default_rng(seed)
    train, heldout = [], []
    for defect in sorted({i.defect for i in items}):
        members = sorted((k for k, i in enumerate(items) if i.defect == defect),
                         key=lambda k: items[k].source)
        order = [members[j] for j in rng.permutation(len(members))]
        n = 0 if len(members) < 2 or holdout_fraction == 0 else \
            min(len(members) - 1, max(1, round(len(members) * holdout_fraction)))
        heldout += order[:n]
        train += order[n:]
    return sorted(train), sorted(heldout)


def counterpart_method(normals: Sequence[np.ndarray], restorer: SurfaceRestorer | None) -> str:
    """How ``example_from`` makes normal counterparts, in words for the run's log and report."""
    if normals:
        return "borrowed from the best-matching --normal photo"
    if restorer is not None:
        return f"painted by the engine's inpainter ({getattr(restorer, 'name', 'diffusion')})"
    return "inpainted from the surroundings (OpenCV Telea; the engine has no diffusion inpainter)"


def example_from(item: LabeledImage, stem: str, normals: Sequence[np.ndarray] = (),
                 restorer: SurfaceRestorer | None = None, category: str = "",
                 seed: int = 0) -> DefectExample:
    """The defect with its normal counterpart: from the best-matching normal photo when there
    are some (``--normal``), else painted by the engine's diffusion inpainter when it has one,
    else inpainted from the surroundings."""
    if normals:
        normal = reverse_synthesize_from(item.image, item.mask, normals)[0]
    elif restorer is not None:
        normal = reverse_synthesize_with(item.image, item.mask, restorer, category, seed)
    else:
        normal = reverse_synthesize(item.image, item.mask)
    return DefectExample(f"{item.defect}/{stem}", item, normal)


def expert_episode(environment: AgentEnvironment, example: DefectExample, category: str,
                   steps: int, seed: int, schedule: int = 0) -> EpisodeResult:
    """One episode of the expert from the normal counterpart to the real defect in ``steps``
    image_gen attempts, the earlier ones at the contrasts of ``STRENGTHS[steps][schedule]``; the
    environment, judge, prompt generator and knowledge are the engine's."""
    if steps not in STRENGTHS:
        raise ValueError(f"steps must be one of {sorted(STRENGTHS)}")
    if steps > environment.config.max_image_gen:
        raise ValueError(f"{steps} steps exceed the environment's {environment.config.max_image_gen} "
                         "image_gen attempts")
    real = example.defect
    pictures = [partial_defect(example.normal, real.image, real.mask, s)
                for s in STRENGTHS[steps][schedule]]
    task = task_environment(environment, example)
    tools = replace(task.tools, image_gen=ReplayImageGenerator(pictures, real.mask, real.source),
                    mask_gen=RealMaskGenerator(task.tools.mask_gen, real.mask))
    spec = EpisodeSpec(image=example.normal, category=category, defect=real.defect, seed=seed,
                       source=real.source)
    return AgentEnvironment(tools, environment.config).run([spec], ScriptedPolicy())[0]


def task_environment(environment: AgentEnvironment, example: DefectExample) -> AgentEnvironment:
    """The environment for episodes whose task is one real defect (expert trajectories, GRPO
    rollouts, the gate's held-out episodes): its instruction states that defect's size, so the
    instruction, the judge's size check and the task reward's area prior all ask for the same
    thing. A task without a real mask keeps the environment as it is."""
    if not example.defect.mask.any():
        return environment
    prompt_gen = RealSizePromptGenerator(environment.tools.prompt_gen, example.defect.image,
                                         example.defect.mask)
    return AgentEnvironment(replace(environment.tools, prompt_gen=prompt_gen), environment.config)


WEAKENED_ACCEPTED = "the judge accepted a weakened earlier attempt"


def judge_problem(result: EpisodeResult, steps: int) -> str:
    """Why an expert episode is not the N-step trajectory it was meant to be ("" if it is)."""
    tries = len(result.attempts)
    if tries < steps:
        first = next((a for a in result.attempts if a.passed), None)
        return (f"{WEAKENED_ACCEPTED} (image {first.image_index}, the faintest tried)"
                if first else f"the episode ended after {tries} of {steps} attempts: "
                f"{result.end_reason}")
    final = result.attempts[steps - 1] if tries >= steps else None
    if final is None or not final.passed:
        issues = ", ".join(final.report.issues) if final is not None and final.report else "?"
        return f"the judge rejected the real defect ({issues})"
    if not result.accepted:
        return f"the episode did not end accepted: {result.end_reason}"
    return ""


def episode_seed(seed: int, index: int, steps: int) -> int:
    return int(np.random.SeedSequence([seed, index, steps, 0xA1]).generate_state(1)[0])


def build_trajectories(environment: AgentEnvironment, examples: Sequence[DefectExample],
                       category: str, out_dir: Path, seed: int, steps: Iterable[int] = (1, 2, 3),
                       progress=None) -> list[TrajectoryOutcome]:
    """Every example at every number of steps; kept trajectories are written under ``out_dir``
    (``<defect>/<stem>-n<N>/`` in the batch's trajectory format) and listed in
    ``out_dir/index.jsonl``. Returns what happened to each, kept or not."""
    out_dir = Path(out_dir)
    outcomes: list[TrajectoryOutcome] = []
    steps = tuple(steps)
    for index, example in enumerate(examples):
        for n in steps:
            for schedule in range(len(STRENGTHS[n])):
                result = expert_episode(environment, example, category, n,
                                        episode_seed(seed, index, n), schedule)
                problem = judge_problem(result, n)
                if not problem.startswith(WEAKENED_ACCEPTED):
                    break
            if problem:
                outcomes.append(TrajectoryOutcome(example.id, n, False, problem))
            else:
                folder = f"{example.id}-n{n}"
                save_trajectory(result, out_dir / folder)
                outcomes.append(TrajectoryOutcome(example.id, n, True, "", folder))
            if progress is not None:
                progress.update(1)
    lines = [json.dumps({"example": o.example_id, "steps": o.steps, "kept": o.kept,
                         "reason": o.reason, "folder": o.folder}) for o in outcomes]
    write_atomic(out_dir / "index.jsonl", ("\n".join(lines) + "\n").encode())
    return outcomes
