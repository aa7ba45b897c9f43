"""The five tools of the agent as small typed interfaces.

Every tool takes a *list* of requests and returns a list of results in the same order, so that a
GPU backend can batch many episodes into one model call; CPU backends simply loop. Images cross
these interfaces as ``uint8`` RGB arrays of shape (H, W, 3); masks as ``bool`` arrays (H, W).
An item a tool ran for but could not answer is a ``ToolFailure`` in place of its result: the
environment reports it to that episode's policy as the tool's error, and the other items go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Box:
    """A pixel box, ``x1``/``y1`` exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


# --- PG: prompt generation -------------------------------------------------------------------


@dataclass
class PromptRequest:
    image: np.ndarray
    category: str
    defect: str


class PromptGenerator(Protocol):
    name: str

    def generate_prompts(self, requests: Sequence[PromptRequest]) -> list[str]:
        """One local-edit instruction per request."""
        ...


# --- IG: image generation ---------------------------------------------------------------------


@dataclass
class EditRequest:
    image: np.ndarray
    category: str
    defect: str
    prompt: str
    seed: int
    # Optional placement box chosen by the policy (a grounding VLM); None lets the backend
    # place the defect with the placement module.
    region: Box | None = None


@dataclass
class EditResult:
    image: np.ndarray
    region: Box
    # The exact defect footprint when the backend knows it (procedural renderers do);
    # diffusion backends leave it None and mask generation works from the pixels.
    mask: np.ndarray | None
    # The synthesis parameters actually used, recorded in the trajectory for provenance.
    params: dict = field(default_factory=dict)


class ImageGenerator(Protocol):
    name: str

    def generate(self, requests: Sequence[EditRequest]) -> list[EditResult]: ...


class SurfaceRestorer(Protocol):
    """An image generator that can also paint a region back to intact surface (a diffusion
    inpainter): ``appliance retrain`` turns real defect photos into their normal counterparts
    with it."""

    def restore(self, image: np.ndarray, hole: np.ndarray, category: str, seed: int) -> np.ndarray: ...


# --- QE: quality evaluation -------------------------------------------------------------------


class Issue:
    """Machine-readable problems a judge can report; the scripted policy reacts to these."""

    NO_CHANGE = "no_change"
    TOO_FAINT = "too_faint"
    TOO_STRONG = "too_strong"
    TOO_SMALL = "too_small"
    TOO_LARGE = "too_large"
    OFF_OBJECT = "off_object"
    SCATTERED = "scattered"
    HARD_SEAMS = "hard_seams"
    WRONG_TYPE = "wrong_type"
    WRONG_COUNT = "wrong_count"  # more or fewer separate defects than asked for

    ALL = (NO_CHANGE, TOO_FAINT, TOO_STRONG, TOO_SMALL, TOO_LARGE, OFF_OBJECT, SCATTERED,
           HARD_SEAMS, WRONG_TYPE, WRONG_COUNT)


@dataclass
class QualityRequest:
    normal: np.ndarray
    edited: np.ndarray
    category: str
    defect: str
    # The instruction the edit was made from: a judge checks that the defect is what was asked
    # for (a "large" defect that covers a speck is a failure). Empty: not known.
    instruction: str = ""


@dataclass
class QualityReport:
    location_score: int  # 0-5: is the defect where it can physically occur, on the object
    quality_score: int  # 0-5: does it look real (texture, scale, contrast, integration)
    review: str  # written for a person (and for the policy's next prompt)
    issues: list[str] = field(default_factory=list)  # values from ``Issue``
    measurements: dict = field(default_factory=dict)

    @property
    def score(self) -> int:
        return self.location_score + self.quality_score


class QualityEvaluator(Protocol):
    name: str

    def evaluate(self, requests: Sequence[QualityRequest]) -> list[QualityReport]: ...


# --- KR: knowledge retrieval ------------------------------------------------------------------


@dataclass(frozen=True)
class KnowledgeEntry:
    """One (category or material, defect) entry of ``knowledge_base/``."""

    id: str  # "<file stem>/<defect>", stable across rebuilds
    subject: str  # the category or material the entry is about, e.g. "bottle", "metal"
    kind: str  # "category" or "material"
    material: str
    defect: str
    renderer: str  # procedural renderer family, see tools/image_gen/renderers.py
    appearance: str
    location: str
    size: str
    source: str  # path of the file, relative to the knowledge base root
    aliases: tuple[str, ...] = ()  # other names of the same defect, normalized

    def names(self) -> tuple[str, ...]:
        return (self.defect,) + self.aliases

    def text(self) -> str:
        """The text that is embedded and shown to the policy."""
        return (f"{self.defect} on {self.subject} ({self.material}). Appearance: {self.appearance} "
                f"Typical location: {self.location} Typical size: {self.size}")


@dataclass
class Knowledge:
    query: str
    entries: list[KnowledgeEntry]
    scores: list[float]


class KnowledgeRetriever(Protocol):
    name: str

    def retrieve(self, category: str, defect: str, k: int = 3) -> Knowledge: ...


# --- MG: mask generation ----------------------------------------------------------------------


@dataclass
class MaskRequest:
    normal: np.ndarray
    edited: np.ndarray
    # The generator's own footprint when it has one; a hint, refined against the pixels.
    hint: np.ndarray | None = None


@dataclass
class MaskResult:
    mask: np.ndarray  # bool (H, W)
    confidence: float  # 0-1: how well the mask explains the change
    threshold: float
    method: str

    @property
    def area_ratio(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


class MaskGenerator(Protocol):
    name: str

    def generate_masks(self, requests: Sequence[MaskRequest]) -> list[MaskResult]: ...


class ToolFailure(Exception):
    """A tool could not answer for one item (e.g. a model's reply held no usable answer); the
    message says what was wrong, for the policy to read."""


@runtime_checkable
class Closeable(Protocol):
    def close(self) -> None: ...
