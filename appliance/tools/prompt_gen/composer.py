"""PG on CPU: a local-edit instruction composed from the knowledge base, and its refinement.

A prompt is a short instruction with labelled parts, in this order::

    Edit only one region of the <category>. Where: <location> Add a <defect> defect.
    Look: <appearance> Size: <size> [Strength: ...] [Extent: ...] [Shape: ...] [Edges: ...]
    [Placement: ...] [Type: ...] Leave everything else — background, lighting, the rest of the
    part — exactly as it is.

Where/Look/Size carry the knowledge base's own words: the procedural renderer reads location
words (edge, corner, center...), size words (small, large...) and severity words (subtle,
pronounced...) out of them. The bracketed parts are added only by :func:`refine_prompt` in
reaction to the judge; the first prompt never claims a severity the knowledge base does not
give. The labels make a prompt parseable again, so each refinement replaces conflicting words
instead of piling up contradictions ("subtle" next to "pronounced").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from appliance.names import normalize_name
from appliance.tools.interfaces import (
    Issue,
    Knowledge,
    KnowledgeEntry,
    KnowledgeRetriever,
    PromptRequest,
)
from appliance.tools.knowledge.base import KnowledgeBase, load_knowledge_base, material_for

KEEP_SENTENCE = ("Leave everything else — background, lighting, the rest of the part — "
                 "exactly as it is.")

# Severity. Refinement moves along these levels; 0 means "whatever the knowledge base says".
STRENGTH_PHRASES = {-1: "subtle, low-contrast", 1: "clearly visible, pronounced",
                    2: "strongly pronounced, high-contrast"}
# When the level points one way, words of the other way in the knowledge text are swapped for
# their counterpart, so the prompt never says both.
WEAK_TO_STRONG = {"barely visible": "clearly visible", "low-contrast": "high-contrast",
                  "low contrast": "high contrast", "subtle": "pronounced",
                  "faint": "clearly visible", "slight": "marked"}
STRONG_TO_WEAK = {"clearly visible": "faint", "high-contrast": "low-contrast",
                  "high contrast": "low contrast", "pronounced": "subtle",
                  "prominent": "subtle", "conspicuous": "subtle", "marked": "slight"}
WEAK_WORDS = tuple(WEAK_TO_STRONG)
STRONG_WORDS = tuple(STRONG_TO_WEAK)

# Size: a ladder of words; synonyms in knowledge text map onto a rung. ("little" is left out on
# purpose: "a little darker" is not a size.)
SIZE_LADDER = ("tiny", "small", "medium", "large", "very large")
_SIZE_SYNONYMS = {"very large": 4, "huge": 4, "tiny": 0, "minute": 0, "small": 1,
                  "medium": 2, "moderate": 2, "large": 3, "big": 3, "sizeable": 3}
SMALL_WORDS = ("tiny", "minute", "small")
LARGE_WORDS = ("very large", "huge", "large", "big", "sizeable")

SHAPE_SINGLE = "a single compact patch, all in one place"
SHAPE_COUNTED = "exactly the number of pieces the description gives, each one clearly separate"
EDGES_SOFT = "soft edges blending into the surrounding material"
# Clauses (between semicolons) that invite several pieces; dropped when the judge saw scatter.
_MULTIPLE_RE = re.compile(
    r"\b(sometimes|several|multiple|a few|two or three|clusters?|scattered|many|groups?)\b", re.I)

_MOD_LABELS = ("Strength", "Extent", "Shape", "Edges", "Placement", "Type")
_MOD_RE = re.compile(r"(?:^|\s)(" + "|".join(_MOD_LABELS) + r"): ([^.]*)\.")
_HEAD_RE = re.compile(
    r"^Edit only one region of the (?P<category>[^.]+)\. Where: (?P<where>.+?) "
    r"Add an? (?P<defect>.+?) defect\. Look: (?P<look>.+?)(?: Size: (?P<size>.+?))?$", re.S)


def _words_re(words: Sequence[str]) -> re.Pattern:
    # Longest first so that "very large" wins over "large"; word boundaries keep "slightly" intact.
    ordered = sorted(words, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in ordered) + r")\b", re.I)


_WEAK_RE = _words_re(WEAK_WORDS)
_STRONG_RE = _words_re(STRONG_WORDS)
_SIZE_RE = _words_re(tuple(_SIZE_SYNONYMS))
_SMALL_RE = _words_re(SMALL_WORDS)
_LARGE_RE = _words_re(LARGE_WORDS)
_PERCENT_RE = re.compile(r"\d+(?:\.\d+)?(?=(?:[^;%.]|\.\d)*?\s*(?:percent|%))")


def _readable(name: str) -> str:
    return normalize_name(name).replace("_", " ")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."


def _keep_case(original: str, new: str) -> str:
    return new[:1].upper() + new[1:] if original[:1].isupper() else new


def _swap(pattern: re.Pattern, table: dict[str, str], text: str) -> str:
    return pattern.sub(lambda m: _keep_case(m.group(0), table[m.group(0).lower()]), text)


@dataclass
class PromptParts:
    """A prompt taken apart; ``render()`` puts it back together."""

    category: str = ""  # readable; empty for a free-form prompt
    defect: str = ""
    where: str = ""
    look: str = ""
    size: str = ""
    free: str = ""  # the body of a prompt not written by this module, kept as is
    strength: int = 0  # key of STRENGTH_PHRASES, 0 = as the knowledge base says
    extent: int | None = None  # rung of SIZE_LADDER set by refinement
    shape: str = ""
    edges: str = ""
    placement: str = ""
    type_note: str = ""

    def render(self) -> str:
        if self.category:
            parts = [f"Edit only one region of the {self.category}.", f"Where: {_sentence(self.where)}",
                     f"Add {_article(self.defect)} {self.defect} defect.",
                     f"Look: {_sentence(self.look)}"]
            if self.size:
                parts.append(f"Size: {_sentence(self.size)}")
        else:
            parts = [_sentence(self.free)] if self.free.strip() else []
        if self.strength:
            parts.append(f"Strength: {STRENGTH_PHRASES[self.strength]}.")
        if self.extent is not None:
            word = SIZE_LADDER[self.extent]
            parts.append(f"Extent: {word}, compact." if self.extent <= 1 else f"Extent: {word}.")
        for label, value in (("Shape", self.shape), ("Edges", self.edges),
                             ("Placement", self.placement), ("Type", self.type_note)):
            if value:
                parts.append(f"{label}: {value}.")
        parts.append(KEEP_SENTENCE)
        return " ".join(parts)

    @classmethod
    def parse(cls, prompt: str) -> PromptParts:
        """Any prompt parses: ours into its parts, anything else into ``free`` plus modifiers."""
        parts = cls()
        text = " ".join(prompt.split())
        for label, value in _MOD_RE.findall(text):
            value = value.strip()
            if label == "Strength":
                parts.strength = next((k for k, v in STRENGTH_PHRASES.items() if v == value), 0)
            elif label == "Extent":
                parts.extent = _rung(value)
            elif label == "Shape":
                parts.shape = value
            elif label == "Edges":
                parts.edges = value
            elif label == "Placement":
                parts.placement = value
            else:
                parts.type_note = value
        body = _MOD_RE.sub("", text).replace(KEEP_SENTENCE, "").strip()
        match = _HEAD_RE.match(body)
        if match:
            parts.category, parts.defect = match["category"], match["defect"]
            parts.where, parts.look, parts.size = match["where"], match["look"], match["size"] or ""
        else:
            parts.free = body
        return parts


def _rung(text: str) -> int | None:
    match = _SIZE_RE.search(text)
    return _SIZE_SYNONYMS[match.group(0).lower()] if match else None


def compose_prompt(category: str, defect: str, entry: KnowledgeEntry | None) -> str:
    """The first prompt for (category, defect), in the words of ``entry`` when there is one."""
    name = _readable(defect)
    if entry is None:
        parts = PromptParts(
            category=_readable(category), defect=name,
            where="on the surface of the part itself, inside its outline, where such a flaw can "
                  "physically occur.",
            # Not repeating the defect name here: refinement rewrites size and severity words
            # in this text, and a name like "broken large" must stay intact.
            look="the usual look of this kind of flaw on such a part, in the part's own material "
                 "and lighting.")
    else:
        parts = PromptParts(category=_readable(category), defect=name, where=entry.location,
                            look=entry.appearance, size=entry.size)
    return parts.render()


def _scale_percentages(text: str, factor: float) -> str:
    def scaled(match: re.Match) -> str:
        value = min(90.0, max(0.5, float(match.group(0)) * factor))
        return f"{value:.0f}" if value >= 2 else f"{value:.1f}".rstrip("0").rstrip(".")

    return _PERCENT_RE.sub(scaled, text)


def _drop_multiple(text: str) -> str:
    clauses = text.split(";")
    kept = [c for c in clauses if not _MULTIPLE_RE.search(c)] or clauses[:1]
    return _sentence(";".join(kept).strip()) if kept != clauses else text


def _harmonise(text: str, parts: PromptParts, sizes: bool = True) -> str:
    """Make knowledge text agree with the decided strength, size, shape and edges.

    ``sizes`` is off for the location: its size words describe the part ("near the centre of
    large walls"), not the defect.
    """
    if parts.strength > 0:
        text = _swap(_WEAK_RE, WEAK_TO_STRONG, text)
    elif parts.strength < 0:
        text = _swap(_STRONG_RE, STRONG_TO_WEAK, text)
    if parts.extent is not None and sizes:
        word = SIZE_LADDER[parts.extent]
        text = _SIZE_RE.sub(lambda m: _keep_case(m.group(0), word), text)
    if parts.shape:
        text = _drop_multiple(text)
    if parts.edges:
        text = re.sub(r"\b(sharp|hard|crisp)-edged\b", "soft-edged", text, flags=re.I)
        text = re.sub(r"\b(sharp|hard|crisp)( edges?)\b", r"soft\2", text, flags=re.I)
        text = re.sub(r"\b(edges? (?:are|is)) (sharp|hard|crisp)\b", r"\1 soft", text, flags=re.I)
    return text


def refine_prompt(prompt: str, issues: Sequence[str], knowledge: Knowledge | None = None) -> str:
    """Rewrite ``prompt`` to answer the judge's ``Issue`` codes, optionally with new knowledge.

    Knowledge replaces the location and appearance with the top entry's words (and fills in a
    missing size); the issues then set strength, extent, shape, edges and placement; finally the
    knowledge text is made to agree with them. Unknown issue codes are ignored.
    """
    parts = PromptParts.parse(prompt)
    entry = knowledge.entries[0] if knowledge and knowledge.entries else None
    if entry is not None:
        if not parts.category:  # a free-form prompt: rebuild it around the retrieved entry
            parts = replace(parts, category=_readable(entry.subject),
                            defect=_readable(entry.defect), free="")
        parts.where, parts.look = entry.location, entry.appearance
        parts.size = parts.size or entry.size
    subject = parts.category or "part"
    current_rung = parts.extent if parts.extent is not None else _rung(parts.size or parts.free)
    for issue in issues:
        if issue == Issue.TOO_FAINT:
            parts.strength = 2 if parts.strength >= 1 else 1
        elif issue == Issue.TOO_STRONG:
            parts.strength = 1 if parts.strength == 2 else -1
        elif issue == Issue.NO_CHANGE:
            parts.strength = max(parts.strength, 1)
            current_rung = max(current_rung if current_rung is not None else 2, 2)
            parts.extent = current_rung
        elif issue == Issue.TOO_SMALL:
            current_rung = min(4, max(3, (current_rung if current_rung is not None else 2) + 1))
            parts.extent = current_rung
            parts.size = _scale_percentages(parts.size, 2.0)
        elif issue == Issue.TOO_LARGE:
            current_rung = max(0, min(1, (current_rung if current_rung is not None else 2) - 1))
            parts.extent = current_rung
            parts.size = _scale_percentages(parts.size, 0.5)
        elif issue == Issue.OFF_OBJECT:
            if entry is not None:
                parts.where = entry.location
            parts.placement = (f"on the {subject} itself, well inside its outline, "
                               f"never on the background")
        elif issue == Issue.SCATTERED:
            parts.shape = SHAPE_SINGLE
        elif issue == Issue.WRONG_COUNT:
            parts.shape = SHAPE_COUNTED
        elif issue == Issue.HARD_SEAMS:
            parts.edges = EDGES_SOFT
        elif issue == Issue.WRONG_TYPE:
            name = parts.defect or "the requested defect"
            parts.type_note = f"it must read unmistakably as {name}, not as another kind of flaw"
    parts.where = _harmonise(parts.where, parts, sizes=False)
    parts.look = _harmonise(parts.look, parts)
    parts.size = _harmonise(parts.size, parts)
    parts.free = _harmonise(parts.free, parts)
    return parts.render()


def severity_conflicts(prompt: str, defect: str = "") -> list[str]:
    """Contradictions a prompt must never hold: weak and strong words, small and large words.

    The defect's own name is left out ("broken large" is a type, not a size claim), and so is
    the location for sizes (it may speak of the part's "large walls").
    """
    where = PromptParts.parse(prompt).where

    def without(text: str, part: str, flags: int = 0) -> str:
        return re.sub(re.escape(part), " ", text, flags=flags) if part else text

    text = without(prompt, _readable(defect) if defect else "", re.I)
    problems = []
    weak, strong = _WEAK_RE.findall(text), _STRONG_RE.findall(text)
    if weak and strong:
        problems.append(f"severity: {sorted(set(weak))} vs {sorted(set(strong))}")
    text = without(without(prompt, where), _readable(defect) if defect else "", re.I)
    small, large = _SMALL_RE.findall(text), _LARGE_RE.findall(text)
    if small and large:
        problems.append(f"size: {sorted(set(small))} vs {sorted(set(large))}")
    return problems


class KnowledgePromptGenerator:
    """PromptGenerator that needs no model: the knowledge base entry, in our own sentence."""

    name = "knowledge"

    def __init__(self, knowledge_base: KnowledgeBase | Path | str | None = None,
                 retriever: KnowledgeRetriever | None = None) -> None:
        if isinstance(knowledge_base, KnowledgeBase):
            self.kb = knowledge_base
        else:
            self.kb = load_knowledge_base(Path(knowledge_base) if knowledge_base else None)
        self.retriever = retriever

    def entry_for(self, category: str, defect: str) -> KnowledgeEntry | None:
        """The exact entry (category's, else its material's), else the retrieved nearest one."""
        entry = self.kb.entry(category, defect)
        if entry is None:
            material = material_for(self.kb, category)
            entry = self.kb.entry(material, defect) if material else None
        if entry is None and self.retriever is not None:
            found = self.retriever.retrieve(category, defect, k=1)
            entry = found.entries[0] if found.entries else None
        return entry

    def generate_prompts(self, requests: Sequence[PromptRequest]) -> list[str]:
        return [compose_prompt(r.category, r.defect, self.entry_for(r.category, r.defect))
                for r in requests]
