"""What an episode is: its task, its settings, its state while it runs and its result.

An episode is (normal image, category, defect type, seed) -> trajectory -> (defect image, mask).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from appliance.tools.interfaces import EditResult, Knowledge, MaskResult, QualityReport


@dataclass
class EnvConfig:
    max_turns: int = 12  # assistant messages per episode
    max_image_gen: int = 3  # image_gen attempts per episode
    min_location: int = 3  # acceptance bar on the judge's 0-5 location score
    min_quality: int = 3  # acceptance bar on the judge's 0-5 quality score
    # A rejected attempt scoring below this (location + quality, 0-10) calls for knowledge
    # retrieval before the next try; the GRPO behaviour reward uses the same bar.
    knowledge_threshold: int = 7

    def passes(self, report: QualityReport) -> bool:
        return report.location_score >= self.min_location and report.quality_score >= self.min_quality


@dataclass
class EpisodeSpec:
    image: np.ndarray  # the normal photo, uint8 RGB
    category: str
    defect: str
    seed: int
    source: str = ""  # where the normal photo came from (path), for provenance
    source_sha256: str = ""


@dataclass
class Attempt:
    """One image_gen call and what the judge said about it."""

    image_index: int
    prompt: str
    seed: int
    result: EditResult
    report: QualityReport | None = None
    passed: bool | None = None


@dataclass
class EpisodeState:
    spec: EpisodeSpec
    config: EnvConfig
    messages: list[dict]
    images: list[np.ndarray]  # images[i - 1] is image index i in the conversation
    attempts: dict[int, Attempt] = field(default_factory=dict)
    tool_sequence: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    knowledge: Knowledge | None = None
    mask: MaskResult | None = None
    mask_image_index: int | None = None
    answer: dict | None = None
    turns: int = 0
    done: bool = False
    end_reason: str = ""
    tool_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    started: float = field(default_factory=time.perf_counter)
    generation: list[dict] = field(default_factory=list)  # per model-written turn: tokens, budgets

    @property
    def image_gen_count(self) -> int:
        return len(self.attempts)

    def last_report(self) -> tuple[int, QualityReport] | None:
        judged = [(i, a.report) for i, a in self.attempts.items() if a.report is not None]
        return judged[-1] if judged else None


@dataclass
class EpisodeResult:
    spec: EpisodeSpec
    status: str  # "accepted" | "rejected" | "failed"
    end_reason: str
    final_image_index: int | None
    final_image: np.ndarray | None
    mask: MaskResult | None
    report: QualityReport | None
    attempts: list[Attempt]
    messages: list[dict]
    images: list[np.ndarray]
    tool_sequence: list[str]
    errors: list[str]
    turns: int
    seconds: float
    tool_seconds: dict[str, float]
    backends: dict[str, str]
    policy: str
    generation: list[dict] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"
