"""The GRPO reward (paper eq. 3-6), as plain batched functions of finished episodes.

Each function takes the episodes of one batch and returns one float per episode, like the
functions in ``trl/rewards``; ``rewards`` weighs them. All read only what the environment
recorded (judge reports, tool sequence, errors, turns), so a reward can be recomputed from a saved
trajectory's ``episode.json`` at any time.

- task (eq. 4): the judge's score of the final image, 0-1 (``score / 10``), for an episode that
  ends with an accepted, masked image; times how plausible the mask's size is against the plant's
  real defects of that type: ``exp(-|ln(area / median real area)|)`` (1 at the median, 0.5 at
  twice or half of it). No accepted image: 0.
- reflection (eq. 5 plus the decision it should drive): half the summed score improvements
  between consecutive judged attempts, ``sum max(0, S_m - S_{m-1}) / 10`` (capped at 1), half the
  share of judge verdicts followed by the right move: another image_gen (knowledge retrieval
  first allowed) after a rejection while attempts are left, mask_gen after a pass.
- behaviour (eq. 6): the share of assistant messages the environment accepted (format and tool
  order: every error recorded is one message refused), plus 0.2 when knowledge was retrieved after
  a rejection scoring below the environment's threshold (minus 0.2 when it was needed and not
  retrieved), minus 0.1 per turn beyond the longest expert path (PG, 3 x (IG, QE), KR, MG, answer:
  10 turns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from appliance.agent import schemas
from appliance.agent.episode import EnvConfig, EpisodeResult

WEIGHTS = {"task": 1.0, "reflection": 0.5, "behaviour": 0.5}  # alpha, beta, gamma of eq. 3
EXPERT_MAX_TURNS = 10


def area_plausibility(area: float, median_area: float | None) -> float:
    if median_area is None or median_area <= 0:
        return 1.0
    if area <= 0:
        return 0.0
    return math.exp(-abs(math.log(area / median_area)))


def task_reward(episodes: Sequence[EpisodeResult], real_areas: Mapping[str, float] | None = None
                ) -> list[float]:
    out = []
    for episode in episodes:
        if not episode.accepted or episode.report is None or episode.mask is None:
            out.append(0.0)
            continue
        median = (real_areas or {}).get(episode.spec.defect)
        out.append(episode.report.score / 10 * area_plausibility(episode.mask.area_ratio, median))
    return out


def _verdict_moves(episode: EpisodeResult, max_image_gen: int) -> list[bool]:
    """For each judge verdict, whether the next tool was the right one."""
    sequence = episode.tool_sequence
    judged = [a for a in episode.attempts if a.report is not None]
    moves, verdict = [], 0
    for position, tool in enumerate(sequence):
        if tool != schemas.QUALITY_EVAL or verdict >= len(judged):
            continue
        attempt = judged[verdict]
        verdict += 1
        following = [t for t in sequence[position + 1:] if t != schemas.KNOWLEDGE_RETRIEVAL]
        nxt = following[0] if following else None
        if attempt.passed:
            moves.append(nxt == schemas.MASK_GEN)
        elif len(episode.attempts) < max_image_gen or nxt == schemas.IMAGE_GEN:
            moves.append(nxt == schemas.IMAGE_GEN)
        else:  # rejected with no attempt left: masking the best one is right
            moves.append(nxt == schemas.MASK_GEN)
    return moves


def reflection_reward(episodes: Sequence[EpisodeResult], max_image_gen: int = 3) -> list[float]:
    out = []
    for episode in episodes:
        scores = [a.report.score for a in episode.attempts if a.report is not None]
        if not scores:
            out.append(0.0)
            continue
        gain = sum(max(0, b - a) for a, b in zip(scores, scores[1:])) / 10
        moves = _verdict_moves(episode, max_image_gen)
        right = sum(moves) / len(moves) if moves else 0.0
        out.append(0.5 * min(1.0, gain) + 0.5 * right)
    return out


def behaviour_reward(episodes: Sequence[EpisodeResult], knowledge_threshold: int = 7
                     ) -> list[float]:
    out = []
    for episode in episodes:
        turns = max(episode.turns, 1)
        accepted_share = max(0.0, (turns - len(episode.errors)) / turns)
        low = [a for a in episode.attempts
               if a.report is not None and not a.passed and a.report.score < knowledge_threshold]
        retrieved = schemas.KNOWLEDGE_RETRIEVAL in episode.tool_sequence
        knowledge = 0.0
        if low:
            knowledge = 0.2 if retrieved else -0.2
        length = 0.1 * max(0, episode.turns - EXPERT_MAX_TURNS)
        out.append(accepted_share + knowledge - length)
    return out


@dataclass
class RewardBreakdown:
    task: float
    reflection: float
    behaviour: float
    total: float
    complete: bool  # the episode followed the protocol to an answer


def rewards(episodes: Sequence[EpisodeResult], config: EnvConfig,
            real_areas: Mapping[str, float] | None = None) -> list[RewardBreakdown]:
    task = task_reward(episodes, real_areas)
    reflection = reflection_reward(episodes, config.max_image_gen)
    behaviour = behaviour_reward(episodes, config.knowledge_threshold)
    return [RewardBreakdown(t, r, b, WEIGHTS["task"] * t + WEIGHTS["reflection"] * r
                            + WEIGHTS["behaviour"] * b, e.end_reason == "answered")
            for t, r, b, e in zip(task, reflection, behaviour, episodes)]
