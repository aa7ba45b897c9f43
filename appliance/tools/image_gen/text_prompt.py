"""Text-encoder prompts for the diffusion backends, fitted to each encoder's token window.

PG writes an instruction for an editor: 150-400 tokens of "edit only one region ... Where: ...
Add a crack defect. Look: ... Size: ... Leave everything else ... exactly as it is." A CLIP
encoder reads 77 tokens and the library cuts the rest, so CLIP would see mostly the framing and
often not the defect. An inpainting model needs none of the framing (the mask already confines
the edit) and reads a caption best. So the instruction is taken apart into short phrases, the
framing is dropped, the phrases are ranked by how much they say about the *look* of the defect,
and each encoder gets a caption that leads with the part and the defect and then holds as many
ranked phrases as its window allows, cut at a phrase or word boundary. Token counts come from the
pipeline's own tokenizers, so what is sent is exactly what the encoder reads.

Ranking (stable, so the instruction's own order holds within a rank):

0. severity set by refinement, the appearance section, free-text clauses that describe the look
1. extent, edges, shape, size, and free-text clauses about anything else
2. the location ("Where"; free-text clauses about position only): the mask decides where

Placement and type notes are dropped: they steer the placement module and the judge, not the
painter, and their negations ("never on the background") pull the wrong words into CLIP.

SDXL has two CLIP encoders: the first gets the caption, the second (which also gives the pooled
embedding) the lead again and then what the first could not hold. Flux's T5 reads up to
``max_sequence_length`` tokens: it gets every ranked phrase, as sentences.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from appliance.tools.prompt_gen.composer import SIZE_LADDER, STRENGTH_PHRASES, PromptParts

# Function words: a cut phrase must not end on one, and they say nothing on their own.
STOPWORDS = frozenset((
    "a", "an", "the", "and", "or", "of", "to", "with", "from", "in", "on", "at", "by", "for", "its",
    "it", "is", "are", "as", "into", "than", "but", "that", "which", "this", "these", "those",
    "their", "be", "about", "like", "over", "under", "between", "through", "across", "toward",
    "towards", "so", "where", "while"))
# Words that add nothing beside the lead ("close-up photo of a tile with a crack defect").
GENERIC = frozenset(("defect", "flaw", "add", "photo", "image", "picture", "close", "up", "one",
                     "region", "area", "part", "single", "only"))

# Framing that an inpainting model cannot use.
_LEAD_IN = re.compile(r"^(?:in|on) (?:this|the) (?:photo|image|picture)\b[^,:;]*[,:;]?\s*",
                      re.IGNORECASE)
_ONLY = re.compile(r"^(?:please\s+)?(?:change|edit|modify|alter)\s+only\s+", re.IGNORECASE)
_VERB = re.compile(r"^(?:please\s+)?(?:add|create|draw|paint|introduce|insert|render|generate)\s+",
                   re.IGNORECASE)
# "Keep the rest as it is" statements; the clause is cut where the statement starts.
_KEEP = re.compile(r"\b(?:everything|anything|all|nothing) else\b|\bas (?:it is|they are|it was|"
                   r"they were|before)\b|\bunchanged\b|\buntouched\b|\bunaltered\b", re.IGNORECASE)
# Where such a statement starts: "..., and leave ...", "... while keeping ...", "The rest ...".
_KEEP_OPENER = re.compile(
    r"(?:^|[,;]\s*|\s+(?:and|while|but|so that|that|which)\s+)(?:leav|keep|preserv|do not|don't|"
    r"without|with (?:everything|all|nothing|the rest)|everything|anything|all else|nothing|"
    r"the rest)|\s(?:leav|keep|preserv|without)", re.IGNORECASE)
_SEPARATOR = re.compile(r"[,;]\s*|\s+(?:and|while|but)\s+", re.IGNORECASE)
# Clause boundaries: sentence ends, semicolons and colons followed by a space ("1.5" stays whole).
_CLAUSE_END = re.compile(r"(?<=[.!?;:])\s+")

_LOOK = re.compile(
    r"\b(?:dark\w*|light\w*|bright\w*|pale|dull|black|white|gr[ae]y\w*|brown\w*|rust\w*|red\w*|"
    r"yellow\w*|orange|green\w*|blue\w*|metallic|shiny|glossy|matte|glint\w*|reflect\w*|thin|thick|"
    r"fine|wide|narrow|jagged|irregular|rough|smooth|sharp|soft|blurr?\w*|crisp|faint|subtle|"
    r"visible|pronounced|contrast\w*|textur\w*|grain\w*|lines?|streaks?|cracks?|scratch\w*|"
    r"grooves?|pits?|pores?|holes?|dents?|bumps?|blisters?|stains?|spots?|specks?|patch\w*|chips?|"
    r"flakes?|discolou?r\w*|colou?r\w*|shadows?|highlights?|deep|shallow|raised|sunken|"
    r"branch\w*|round|oval|elongated|circular|cavity|notch\w*|fracture\w*)\b", re.IGNORECASE)
_LOCATION = re.compile(
    r"\b(?:near|along|around|close to|next to|towards?|upper|lower|top|bottom|left|right|"
    r"cent(?:er|re)|middle|corners?|sides?|borders?|rim|located|positioned|placed|region|area|"
    r"anywhere|where)\b", re.IGNORECASE)


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a pipeline: its tokenizer and how many tokens it reads."""

    tokenizer: Any
    limit: int  # special tokens included, as the pipeline counts them
    sentences: bool = False  # T5 reads sentences; CLIP reads a comma-separated caption

    def count(self, text: str) -> int:
        # max_length keeps transformers from warning about long inputs while we measure.
        return len(self.tokenizer(text, truncation=True, max_length=self.limit + 1)["input_ids"])

    def fits(self, text: str) -> bool:
        return self.count(text) <= self.limit


@dataclass(frozen=True)
class EncoderPrompts:
    prompt: str  # the first encoder's (CLIP)
    prompt_2: str  # the second encoder's (SDXL: second CLIP; Flux: T5)


def pipeline_encoders(pipeline, t5_length: int | None = None) -> tuple[TextEncoder, TextEncoder]:
    """(first, second) text encoder of an SDXL or Flux pipeline.

    ``t5_length`` marks the second encoder as Flux's T5, read up to that many tokens (the
    pipeline's ``max_sequence_length``); otherwise it is a CLIP with its tokenizer's window.
    """
    second_tokenizer = pipeline.tokenizer_2
    first_tokenizer = pipeline.tokenizer
    if first_tokenizer is None:  # an SDXL refiner-style pipeline has only the second
        first_tokenizer = second_tokenizer
    first = TextEncoder(first_tokenizer, int(first_tokenizer.model_max_length))
    if t5_length is not None:
        return first, TextEncoder(second_tokenizer, int(t5_length), sentences=True)
    return first, TextEncoder(second_tokenizer, int(second_tokenizer.model_max_length))


def fit_prompts(instruction: str, category: str, defect: str, first: TextEncoder,
                second: TextEncoder) -> EncoderPrompts:
    """The prompts for both encoders, each within its window, most useful words first."""
    leads = lead_variants(category, defect)
    phrases = ranked_phrases(instruction, category, defect)
    prompt, rest = fill(leads, phrases, first)
    if second.sentences or not rest:
        prompt_2, _ = fill(leads, phrases, second)
    else:
        prompt_2, _ = fill(leads, rest, second)
    return EncoderPrompts(prompt, prompt_2)


def fit_caption(text: str, *encoders: TextEncoder) -> str:
    """A comma-separated caption (a negative prompt) cut to fit every one of ``encoders``."""
    phrases = [p.strip() for p in text.split(",") if p.strip()]
    for encoder in encoders:
        caption = TextEncoder(encoder.tokenizer, encoder.limit)  # keep it a caption, even for T5
        phrases = [p.strip() for p in fill([], phrases, caption)[0].split(",") if p.strip()]
    return ", ".join(phrases)


def lead_variants(category: str, defect: str) -> list[str]:
    """What the image shows, longest first: the longest that fits leads the prompt."""
    part, flaw = _readable(category), _readable(defect)
    if not part and not flaw:
        return []
    if not part:
        return [f"close-up photo of {_article(flaw)} {flaw} defect", f"{flaw} defect", flaw]
    if not flaw:
        return [f"close-up photo of {_article(part)} {part}", part]
    return [f"close-up photo of {_article(part)} {part} with {_article(flaw)} {flaw} defect",
            f"{part} with {_article(flaw)} {flaw} defect", f"{flaw} defect, {part}",
            f"{flaw}, {part}", flaw]


def ranked_phrases(instruction: str, category: str = "", defect: str = "") -> list[str]:
    """The instruction's content as short phrases, most important first, framing dropped."""
    parts = PromptParts.parse(instruction)
    ranked: list[tuple[int, str]] = []
    if parts.strength:
        ranked.append((0, STRENGTH_PHRASES[parts.strength]))
    if parts.category:  # our own sections: their labels say what they are
        ranked += [(0, c) for c in _clauses(parts.look)]
    else:  # free text (a VLM's): judge each clause by its words
        flaw_words = set(_words(_readable(defect)))
        for clause in _clauses(parts.free):
            words = set(_words(clause))
            if _LOOK.search(clause) or words & flaw_words:
                ranked.append((0, clause))
            elif _LOCATION.search(clause):
                ranked.append((2, clause))
            else:
                ranked.append((1, clause))
    if parts.extent is not None:
        ranked.append((1, f"{SIZE_LADDER[parts.extent]} size"))
    ranked += [(1, c) for c in (parts.edges, parts.shape) if c]
    ranked += [(1, c) for c in _clauses(parts.size)]
    ranked += [(2, c) for c in _clauses(parts.where)]
    lead = set(_words(" ".join(lead_variants(category or parts.category, defect or parts.defect))))
    kept = [(rank, phrase) for rank, phrase in ranked if not _says_nothing_new(phrase, lead)]
    return [phrase for _, phrase in sorted(kept, key=lambda item: item[0])]


def fill(leads: list[str], phrases: list[str], encoder: TextEncoder) -> tuple[str, list[str]]:
    """The longest lead that fits, then phrases in order until the window is full.

    The first phrase that does not fit whole is cut at a word boundary. Returns the prompt and
    the phrases left out (the cut phrase's tail first), for a second encoder to carry on.
    """
    starts = (_join("", lead, encoder) for lead in leads)
    text = next((start for start in starts if encoder.fits(start)), "")
    for index, phrase in enumerate(phrases):
        candidate = _join(text, phrase, encoder)
        if encoder.fits(candidate):
            text = candidate
            continue
        words = phrase.split()
        # Binary search for the longest word prefix that fits; every accepted prefix was counted.
        low, high = 0, len(words)
        while low < high:
            middle = (low + high + 1) // 2
            head = _trim(words[:middle])
            if head and encoder.fits(_join(text, " ".join(head), encoder)):
                low = middle
            else:
                high = middle - 1
        head = _trim(words[:low])
        if head:
            text = _join(text, " ".join(head), encoder)
        tail = " ".join(words[len(head):])
        left = ([tail] if tail else []) + phrases[index + 1:]
        return text, left
    return text, []


# -- text helpers --------------------------------------------------------------------------------


def _plain(text: str) -> str:
    # Dashes as commas: T5's vocabulary has no em dash, and CLIP reads it as noise.
    text = text.replace("\u2014", ", ").replace("\u2013", "-")
    return " ".join(text.split())


def _clauses(text: str) -> list[str]:
    """Sentences and their ;/: parts, without framing or "keep the rest" statements."""
    clauses = []
    for piece in _CLAUSE_END.split(_plain(text)):
        piece = piece.strip().rstrip(".!?;:, ").strip()
        piece = _ONLY.sub("", _LEAD_IN.sub("", piece))
        keep = _KEEP.search(piece)
        if keep:
            # Cut where the keep statement starts: at its opening words, else at the last
            # separator before it, else the whole clause is the statement.
            starts = ([m.start() for m in _KEEP_OPENER.finditer(piece, 0, keep.end())]
                      or [m.start() for m in _SEPARATOR.finditer(piece, 0, keep.start())] or [0])
            piece = piece[:starts[-1]]
        piece = _VERB.sub("", piece.strip().rstrip(",;: "))
        if _words(piece):
            clauses.append(piece)
    return clauses


def _says_nothing_new(phrase: str, lead_words: set[str]) -> bool:
    return all(w in lead_words or w in STOPWORDS or w in GENERIC for w in _words(phrase))


def _join(text: str, phrase: str, encoder: TextEncoder) -> str:
    phrase = phrase.strip().rstrip(".!?;:, ")
    if not encoder.sentences and re.match(r"[A-Z][a-z]", phrase):
        phrase = phrase[0].lower() + phrase[1:]  # a caption continues; "PCB" stays as it is
    if encoder.sentences:
        sentence = phrase[:1].upper() + phrase[1:] + "."
        return f"{text} {sentence}" if text else sentence
    return f"{text}, {phrase}" if text else phrase


def _trim(words: list[str]) -> list[str]:
    """A cut phrase ends on a content word, not on "a", "the" or a comma."""
    words = list(words)
    while words:
        last = words[-1].rstrip(".,;:!?")
        if last and last.lower() not in STOPWORDS:
            words[-1] = last
            break
        words.pop()
    return words


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _readable(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"
