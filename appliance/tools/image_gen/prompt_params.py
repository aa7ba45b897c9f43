"""From the words of an editing prompt to the numbers a procedural renderer needs.

A prompt such as "a faint, thin diagonal scratch near the top edge" pins some attributes and
leaves the rest open. Open attributes are drawn from ``rng`` over a wide natural range: that is
deliberate, because it lets a vague first attempt come out too faint or too big and a later,
more specific prompt correct it, which is the loop the agent learns.

Every attribute draws its random numbers in a fixed order whether or not the prompt names it, so
two prompts that differ in one word and share a seed differ in that attribute only.

Prompts written by the knowledge-base prompt generator have labelled parts ("Where: ... Look:
... Size: ... Strength: ... Extent: ..."). Each attribute is read from the part that speaks of
it: places from Where, sizes from Size/Extent, appearance from the rest. That keeps "the bright
outer ring" of a location or the "large" in a defect's name from being read as the defect's own
look or size. Free-form prompts are read as a whole.

A percentage is read as the defect's linear size, whatever it is a share of. Reading "15 to 40
percent of the face" as an area share (a patch about half the face across) was tried and
measured: the large soft patches taught the evaluation's detector the wrong cue (magnetic tile
pixel AP 0.090 -> 0.065; `appliance eval`, seed 0). ``percent_is_area`` still tells the judge
which defect types the knowledge base calls large by nature.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

LOCATIONS = ("edge", "corner", "center", "top", "bottom", "left", "right")
SIDES = ("top", "bottom", "left", "right")
POLARITIES = ("dark", "bright")
FORMS = ("fibre", "speck")
EDGE_MODES = ("along", "inward")

# Unspecified ranges: wide on purpose (see the module note).
SIZE_RANGE = (0.03, 0.45)  # log-uniform
SEVERITY_RANGE = (0.1, 0.95)
ELONGATION_RANGE = (1.0, 2.5)  # log-uniform
ROUGHNESS_RANGE = (0.2, 0.8)
# "sometimes several pores": the plural is taken this often.
SOMETIMES_SHARE = 0.35

# (pattern, value): the first pattern that matches wins, so longer phrases come first.
_SIZE_WORDS: tuple[tuple[str, tuple[float, float]], ...] = (
    (r"very (small|little|short)|tiny|minute|miniature|pinpoint|pin-?head", (0.02, 0.05)),
    (r"very (large|big|long)|huge|broad|extensive|wide area|whole|most of", (0.40, 0.70)),
    (r"small|little|short|smaller|compact", (0.05, 0.12)),
    (r"large|big|long|larger|bigger|longer|sizeable", (0.25, 0.45)),
    (r"medium|moderate[- ]sized|mid[- ]sized|average[- ]sized|moderate", (0.12, 0.25)),
)
_SEVERITY_WORDS: tuple[tuple[str, tuple[float, float]], ...] = (
    (r"very (faint|subtle|light|slight)|barely visible|hardly visible|almost invisible",
     (0.05, 0.15)),
    (r"(strongly|very|extremely|highly) (pronounced|visible|strong|marked|conspicuous)|"
     r"high[- ]contrast|glaring|stark", (0.85, 1.0)),
    (r"clearly visible|pronounced|strong|heavy|severe|deep|distinct|obvious|conspicuous|"
     r"prominent|marked|stronger|intense|more visible", (0.65, 0.85)),
    (r"faint|subtle|slight|weak|mild|fainter|low[- ]contrast|less visible|shallow|"
     r"light(?![- ]?(colou?red|grey|gray|brown|blue|green|yellow|tone|toned))", (0.15, 0.35)),
    (r"moderate|noticeable|visible|medium[- ]contrast", (0.40, 0.60)),
)
_ORIENTATION_WORDS: tuple[tuple[str, str], ...] = (
    (r"diagonal(ly)?|oblique(ly)?|slanted|slanting", "diagonal"),
    (r"horizontal(ly)?|sideways|(from )?(left|right)[- ]to[- ](the )?(right|left)", "horizontal"),
    (r"vertical(ly)?|(from )?(top|bottom)[- ]to[- ](the )?(bottom|top)|upright", "vertical"),
)
_LOCATION_WORDS: tuple[tuple[str, str], ...] = (
    (r"corners?", "corner"),
    (r"edges?|rim|border|outline|periphery|perimeter|boundary|margin|contour", "edge"),
    (r"cent(er|re)|middle|central(ly)?", "center"),
)
_SIDE_WORDS: tuple[tuple[str, str], ...] = (
    (r"top|upper", "top"),
    (r"bottom|lower(?! (contrast|intensity|severity))", "bottom"),
    (r"left", "left"),
    (r"right(?![- ]angle)", "right"),
)
_EDGE_MODE_WORDS: tuple[tuple[str, str], ...] = (
    (r"(running|growing|starting|reaching|extending|spreading|coming) (in(ward)?|out)? ?from|"
     r"runn?(ing|s)? inwards?|toward(s)? the (center|centre|middle)|into the (face|part|surface)",
     "inward"),
    (r"along|hugging|following|parallel to", "along"),
)
_DARK = r"dark|darker|black|blackish|shadowed|shadowy|shadow|dim|dull|duller"
_BRIGHT = (r"bright|brighter|white|whitish|shiny|glossy|glossier|specular|reflective|pale|paler|"
           r"light[- ]?colou?red|light[- ]toned|lighter|glinting|glints?")
_COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    (r"rust(y|-coloured|-colored)?", (155, 80, 35)),
    (r"(dark )?brown(ish)?|coffee|tan", (110, 72, 42)),
    (r"red(dish)?", (170, 50, 40)),
    (r"orange", (210, 120, 40)),
    (r"yellow(ish)?|amber", (205, 180, 70)),
    (r"green(ish)?", (70, 140, 70)),
    (r"blue|bluish", (60, 90, 170)),
    (r"purple|violet", (120, 60, 140)),
    (r"beige|cream", (200, 180, 140)),
    (r"copper(y|-coloured|-colored)?", (184, 115, 60)),
    (r"black(ish)?", (25, 25, 25)),
    (r"white|whitish", (235, 235, 235)),
    (r"gr[ae]y(ish)?|silver", (128, 128, 128)),
)
# Counting words count only when they qualify the defect's pieces ("two pits", "a few specks"),
# not "one to four pixels wide" or "one of the three cores".
_PIECES = (r"(?:\w+[ -]){0,2}?(?:scratch(?:es)?|cracks?|pits?|pores?|holes?|blowholes?|dents?|"
           r"bumps?|stains?|spots?|specks?|particles?|fib(?:re|er)s?|threads?|hairs?|chips?|"
           r"marks?|blobs?|defects?|dots?|bubbles?|cuts?|tears?|folds?|wrinkles?|lines?|flaws?|"
           r"inclusions?|patch(?:es)?|drops?|droplets?|splinters?|strands?|clumps?|pieces?|"
           r"grains?|flecks?|smears?|blotch(?:es)?|scuffs?|nicks?|notch(?:es)?|dimples?|"
           r"craters?|voids?|bites?|streaks?|of them|together|close together)\b")
_COUNT_WORDS: tuple[tuple[str, tuple[int, int]], ...] = (
    (r"(a )?cluster of|many|multiple|numerous|group of|scattered|lots of", (4, 7)),
    (r"two or three|2 or 3", (2, 3)),
    (r"one or two|1 or 2", (1, 2)),
    (r"a few|few|several", (3, 4)),
    (r"three|triple", (3, 3)),
    (r"two|pair of|couple of|double|twin", (2, 2)),
    (r"single|one|lone|an isolated|solitary", (1, 1)),
)
_ELONGATION_WORDS: tuple[tuple[str, tuple[float, float]], ...] = (
    (r"elongated|thin|narrow|streak|line|linear|strip|stripe|slender|long", (3.0, 6.0)),
    (r"oval|oblong|elliptical", (1.5, 2.5)),
    (r"round(ish)?|circular|dot|spot|compact|blob", (1.0, 1.2)),
)
_ROUGHNESS_WORDS: tuple[tuple[str, tuple[float, float]], ...] = (
    (r"jagged|rough|irregular|ragged|frayed|torn|splintered|crumbly|fuzzy", (0.65, 0.95)),
    (r"smooth|clean|regular|neat|soft[- ]edged|crisp", (0.05, 0.30)),
)
_FORM_WORDS: tuple[tuple[str, str], ...] = (
    (r"fib(re|er)s?|hairs?|threads?|filaments?|lint|strands?|wires?", "fibre"),
    (r"specks?|particles?|dust|dirt|grains?|debris|dots?|crumbs?|flecks?|grit|shavings?", "speck"),
)
# Location words count only in a locative phrase ("near the edge", "the top corner", "edge of"),
# so that appearance text such as "its edges are sharp" does not move the defect; and not in a
# phrase that keeps the defect away from the place ("well inside its outline").
_LOCATIVE_BEFORE = re.compile(
    r"\b(at|on|near|along|by|from|to|towards?|around|in|into|across|hugging|following|touching|"
    r"over|within|through)\b(\s+[\w-]+){0,3}\s*$")
_LOCATIVE_AFTER = re.compile(
    r"^[- ]?(edges?|corners?|sides?|half|part|portion|area|region|end|face|of)\b")
_AWAY_BEFORE = re.compile(
    r"\b(inside|within|away from|far from|clear of|not (at|on|near)|never (at|on|near)|"
    r"except)\b(\s+[\w-]+){0,2}\s*$")
# Colour and brightness words describing the surroundings ("on the white wax", "across the
# glossy shell") say nothing about the defect.
_CONTEXT_BEFORE = re.compile(
    r"\b(on|against|across|over|of|in|into|onto|from|than|through|beside|around|under|"
    r"surrounding|the surrounding)\s+(the|a|an|its|their)?\s*([\w-]+,?\s+){0,1}$")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*(?:(?:-|to)\s*(\d+(?:\.\d+)?)\s*)?(?:%|percent|per cent)")
# What a percentage is a share of. "4 percent of the tile width" is a length; "30 percent of the
# face" is an area, whose linear extent is only about its square root (a patch over a third of
# the face is about 60 % of the face across). The words of the "of" phrase decide; a bare object
# ("of the part", "of one kernel") means its area, as does an area word before the number
# ("covering 30 percent", "most of the pill area, 60 to 100 percent").
_LENGTH_WORDS = (r"width|wide|widths|length|lengths|long|height|high|tall|diameter|across|edges?|"
                 r"sides?|circumference|perimeter|outline|border|rim|radius|thickness|thick|"
                 r"diagonal|span|spanning|along")
_AREA_WORDS = (r"area|areas|face|faces|surface|surfaces|image|frame|region|cross-section|"
               r"covering|covers?|covered|whole|entire")
_OF_PHRASE = re.compile(r"^\s*of\s+((?:(?!with\b|and\b|in\b|on\b|at\b|near\b|where\b)"
                        r"[\w'-]+\s*){1,4})")
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
_NUMBER = r"\d+(?:\.\d+)?|one|two|three|four|five|six"
# The width of a line-like defect in pixels: "one to three pixels wide", "a few pixels wide".
_WIDTH_PX = re.compile(rf"\b(?:({_NUMBER})(?:\s*(?:-|to|or)\s*({_NUMBER}))?|(a few|several))"
                       r"\s*(?:pixels?|px)\s+(?:wide|across|thick)\b")
FEW_PIXELS = (2.5, 4.5)
_CLAUSE_END = re.compile(r"[;.,:]|\bwith\b")
_LABELS = ("Where", "Look", "Size", "Strength", "Extent", "Shape", "Edges", "Placement", "Type")
_LABEL_RE = re.compile(r"\b(" + "|".join(_LABELS) + r"):")
# Sentences of the prompt generator's frame, which carry no attribute of the defect.
_FRAME_RE = re.compile(r"edit only one region of the [^.]*\.|add an? [^.]*? defect\.|"
                       r"leave everything else[^.]*\.", re.I)


def percent_is_area(text: str, percent: re.Match) -> bool:
    """Whether the percentage ``percent`` found in ``text`` is a share of an area."""
    after = text[percent.end():]
    clause = after[:_CLAUSE_END.search(after).start()] if _CLAUSE_END.search(after) else after
    of_phrase = _OF_PHRASE.match(clause)
    if of_phrase:
        words = of_phrase.group(1)
        if re.search(rf"\b(?:{_LENGTH_WORDS})\b", words):
            return False
        return True  # "of the face", "of the part", "of one kernel"
    if re.search(rf"\b(?:{_LENGTH_WORDS})\b", clause):
        return False
    before = re.split(r"[;.:]", text[:percent.start()])[-1]
    if re.search(rf"\b(?:{_LENGTH_WORDS})\b", before.split(",")[-1]):
        return False
    return bool(re.search(rf"\b(?:{_AREA_WORDS})\b", before))


def expected_area_share(size_text: str) -> float | None:
    """The largest share of the part's area a size description allows ("15 to 40 percent of
    the face" -> 0.4); None when it gives no area percentage."""
    percent = _PERCENT.search(size_text)
    if percent is None or not percent_is_area(size_text, percent):
        return None
    return max(float(g) for g in percent.groups() if g) / 100.0



@dataclass
class EditParams:
    """What to render. ``specified`` names the attributes that came from the prompt's words."""

    size: float  # the defect's major extent relative to the object's extent, 0-1
    severity: float  # visibility: contrast of the defect against the surface, 0-1
    orientation_deg: float | None  # direction of the major axis, 0 = horizontal, 90 = vertical
    location: str | None  # one of LOCATIONS; None = anywhere on the object
    elongation: float  # major/minor axis ratio of blob-like defects, >= 1
    polarity: str | None  # "dark", "bright", or None for the renderer's physical default
    color: tuple[int, int, int] | None  # a tint named in the prompt
    count: int  # how many instances (close together, as such defects occur)
    roughness: float  # irregularity of the outline, 0 = smooth, 1 = jagged
    side: str | None = None  # a side qualifying an edge/corner location ("top edge")
    form: str | None = None  # "fibre" or "speck" for contamination
    edge_mode: str | None = None  # at an edge: "along" it or running "inward" from it
    specified: list[str] = field(default_factory=list)
    matched: dict[str, str] = field(default_factory=dict)  # attribute -> the words that set it
    # The width in pixels of a line-like defect when the prompt gives it ("one to three pixels
    # wide"); None lets the renderer choose from the length.
    width_px: float | None = None
    # The range the prompt's size words allow (``size`` was drawn from it); None: not named.
    size_band: tuple[float, float] | None = None
    # How many pieces the prompt's words allow ("two or three pores" -> (2, 3); "sometimes two
    # or three" -> (1, 3), whatever ``count`` this draw took); None: not named.
    count_band: tuple[int, int] | None = None


@dataclass
class _Texts:
    """The prompt split by what each part may tell."""

    where: str
    look: str
    size: str
    strength: str
    extent: str


def _split(prompt: str) -> _Texts:
    text = " ".join(prompt.lower().replace("_", " ").split())
    if not _LABEL_RE.search(prompt.replace("_", " ")):
        text = _FRAME_RE.sub(" ", text)
        return _Texts(text, text, text, "", "")
    sections: dict[str, list[str]] = {label.lower(): [] for label in _LABELS}
    pieces = _LABEL_RE.split(" ".join(prompt.replace("_", " ").split()))
    free = [pieces[0]]
    for label, body in zip(pieces[1::2], pieces[2::2]):
        sections[label.lower()].append(body)
    free_text = _FRAME_RE.sub(" ", " ".join(free)).lower()

    def joined(*labels: str) -> str:
        body = " ".join(" ".join(sections[label]) for label in labels)
        return " ".join(_FRAME_RE.sub(" ", body).lower().split())

    look = " ".join([free_text, joined("look", "shape", "edges", "type")])
    return _Texts(where=joined("where", "placement"), look=" ".join(look.split()),
                  size=joined("size"), strength=joined("strength"), extent=joined("extent"))


def _find(patterns, text: str):
    """The first (pattern, value) whose pattern occurs as whole words, with the matched text."""
    for pattern, value in patterns:
        found = re.search(rf"\b(?:{pattern})\b", text)
        if found:
            return value, found.group(0)
    return None, None


def _find_first(patterns, text: str):
    """The earliest word of any pattern: the first description is usually the defect's own."""
    best = None
    for pattern, value in patterns:
        found = re.search(rf"\b(?:{pattern})\b", text)
        if found and (best is None or found.start() < best[1].start()):
            best = (value, found)
    return (best[0], best[1].group(0)) if best else (None, None)


# What lies between two places offered as alternatives: "edge or corner", "edge or a corner".
_ALTERNATIVE = re.compile(r"\s*(,\s*)?(or|and/or)\s+((at|on|near|along|by|in|from)\s+)?"
                          r"((an?|the|its|one)\s+)?")


def _find_located(patterns, text: str, choice: float = 0.0):
    """Like ``_find`` but only for matches in a locative phrase that does not keep away.

    Places offered as alternatives ("on an edge or a corner") are each as likely: ``choice``
    (a uniform draw) picks one; otherwise the first pattern that matches wins."""
    located, words = [], []  # the first locative match of each pattern; every match
    for pattern, value in patterns:
        for found in re.finditer(rf"\b(?:{pattern})\b", text):
            words.append((value, found))
            before, after = text[:found.start()], text[found.end():]
            if _AWAY_BEFORE.search(before):
                continue
            if ((_LOCATIVE_BEFORE.search(before) or _LOCATIVE_AFTER.match(after))
                    and all(v != value for v, _ in located)):
                located.append((value, found))
    if not located:
        return None, None
    # Alternatives: the places joined by "or" to the first one said ("from an edge or a corner").
    words.sort(key=lambda item: item[1].start())
    first = min(located, key=lambda item: item[1].start())
    options = [first]
    for value, found in words[words.index(first) + 1:]:
        if not _ALTERNATIVE.fullmatch(text[options[-1][1].end():found.start()]):
            break
        if all(v != value for v, _ in options):
            options.append((value, found))
    value, found = (options[min(int(choice * len(options)), len(options) - 1)]
                    if len(options) > 1 else located[0])
    return value, found.group(0)


def _find_own(pattern: str, text: str):
    """The first match that describes the defect itself, not the surface around it."""
    for found in re.finditer(rf"\b(?:{pattern})\b", text):
        if not _CONTEXT_BEFORE.search(text[:found.start()]):
            return found
    return None


def _find_count(text: str):
    """(band, words, sometimes) for a count word that qualifies the defect's pieces."""
    for pattern, band in _COUNT_WORDS:
        for found in re.finditer(rf"\b(?:{pattern})\s+{_PIECES}", text):
            before = text[:found.start()]
            sometimes = bool(re.search(r"\b(sometimes|occasionally|now and then|at times)\s*$",
                                       before))
            return band, found.group(0), sometimes
    return None, None, False


def _number(text: str) -> float:
    return float(_NUMBER_WORDS.get(text, text) if text in _NUMBER_WORDS else text)


def _in_band(band: tuple[float, float], u: float) -> float:
    return band[0] + (band[1] - band[0]) * u


def _log_uniform(low: float, high: float, u: float) -> float:
    return math.exp(math.log(low) + (math.log(high) - math.log(low)) * u)


def parse_prompt(prompt: str, rng: np.random.Generator) -> EditParams:
    """Read size, severity, orientation, location, polarity, colour, count and shape words."""
    texts = _split(prompt)
    everything = " ".join((texts.where, texts.look, texts.size, texts.strength, texts.extent))
    # One uniform draw per attribute, always in this order (see the module note).
    u = dict(zip(("size", "severity", "orientation", "elongation", "count", "roughness",
                  "diagonal", "jitter", "form", "sometimes", "width", "alternative"), rng.random(12)))
    specified: list[str] = []
    matched: dict[str, str] = {}

    def note(name: str, words: str) -> None:
        specified.append(name)
        matched[name] = words

    # Size: a percentage is the most precise (refinement rescales it), then a refinement's
    # Extent word, then size words.
    size_text = texts.size if texts.size or texts.extent else texts.look
    extent_band, extent_words = _find(_SIZE_WORDS, texts.extent)
    percent = _PERCENT.search(size_text)
    band, words = _find(_SIZE_WORDS, size_text)
    size_band = None
    if percent:
        low = float(percent.group(1)) / 100.0
        high = float(percent.group(2)) / 100.0 if percent.group(2) else low
        size_band = (min(low, high), max(low, high))
        note("size", percent.group(0))
    elif extent_band:
        size_band = extent_band
        note("size", extent_words)
    elif band:
        size_band = band
        note("size", words)
    size = _in_band(size_band, u["size"]) if size_band else _log_uniform(*SIZE_RANGE, u["size"])

    width_px = None
    width = _WIDTH_PX.search(" ".join((texts.size, texts.extent, texts.look)))
    if width:
        if width.group(3):
            band = FEW_PIXELS
        else:
            low = _number(width.group(1))
            high = _number(width.group(2)) if width.group(2) else low
            band = (min(low, high), max(low, high))
        width_px = round(float(_in_band(band, u["width"])), 2)
        note("width_px", width.group(0))

    band, words = _find(_SEVERITY_WORDS, texts.strength)
    if not band:
        band, words = _find(_SEVERITY_WORDS, texts.look)
    if band:
        severity = _in_band(band, u["severity"])
        note("severity", words)
    else:
        severity = _in_band(SEVERITY_RANGE, u["severity"])

    direction, orientation_words = _find(_ORIENTATION_WORDS, everything)
    jitter = (u["jitter"] - 0.5) * 12.0  # hand-drawn, never ruler-exact
    if direction == "horizontal":
        orientation = jitter % 180.0
    elif direction == "vertical":
        orientation = 90.0 + jitter
    elif direction == "diagonal":
        orientation = (45.0 if u["diagonal"] < 0.5 else 135.0) + jitter
    else:
        orientation = u["orientation"] * 180.0
    where = texts.where
    if direction:
        note("orientation_deg", orientation_words)
        # "from top to bottom" is a direction, not a place.
        for pattern, _ in _ORIENTATION_WORDS:
            where = re.sub(rf"\b(?:{pattern})\b", " ", where)

    location, words = _find_located(_LOCATION_WORDS, where, u["alternative"])
    side, side_words = _find_located(_SIDE_WORDS, where)
    if location:
        note("location", words)
        if side:
            note("side", side_words)
    elif side:
        location, side = side, None
        note("location", side_words)
    edge_mode = None
    if location in ("edge", "corner"):
        edge_mode, mode_words = _find(_EDGE_MODE_WORDS, where)
        if edge_mode:
            note("edge_mode", mode_words)

    polarity = None
    dark, bright = _find_own(_DARK, texts.look), _find_own(_BRIGHT, texts.look)
    if dark or bright:
        # The first mention is the main appearance ("a dark pit with a bright rim").
        first = min((m for m in (dark, bright) if m), key=lambda m: m.start())
        polarity = "dark" if first is dark else "bright"
        note("polarity", first.group(0))

    color = None
    for pattern, value in _COLORS:
        found = _find_own(pattern, texts.look)
        if found:
            color = value
            note("color", found.group(0))
            break

    count_band, words, sometimes = _find_count(" ".join((texts.look, texts.size)))
    allowed_count = (1, count_band[1]) if count_band and sometimes else count_band
    if count_band and sometimes and u["sometimes"] >= SOMETIMES_SHARE:
        count_band = (1, 1)  # "sometimes two or three": this time, one
    if count_band:
        count = int(math.floor(_in_band((count_band[0], count_band[1] + 0.999), u["count"])))
        count = int(np.clip(count, count_band[0], count_band[1]))
        note("count", words)
    else:
        # A description in the singular ("A thin, dark line ...") is one defect: the judge
        # calls far-apart instances scattered. Otherwise, now and then a few close together.
        singular = re.match(r"\s*(a|an|one)\b", texts.look, re.IGNORECASE)
        count = 1 if singular or u["count"] < 0.7 else (2 if u["count"] < 0.9 else 3)

    band, words = _find_first(_ELONGATION_WORDS, " ".join((texts.look, texts.size)))
    if band:
        elongation = _in_band(band, u["elongation"])
        note("elongation", words)
    else:
        elongation = _log_uniform(*ELONGATION_RANGE, u["elongation"])
    size = float(np.clip(size, 0.01, 0.95))

    band, words = _find_first(_ROUGHNESS_WORDS, texts.look)
    if band:
        roughness = _in_band(band, u["roughness"])
        note("roughness", words)
    else:
        roughness = _in_band(ROUGHNESS_RANGE, u["roughness"])

    form, words = _find_first(_FORM_WORDS, texts.look)
    if form:
        note("form", words)
    else:
        form = "fibre" if u["form"] < 0.35 else "speck"

    return EditParams(
        size=round(size, 4), severity=round(float(severity), 4),
        orientation_deg=round(float(orientation), 2), location=location,
        elongation=round(float(elongation), 3), polarity=polarity, color=color, count=count,
        roughness=round(float(roughness), 3), side=side, form=form, edge_mode=edge_mode,
        width_px=width_px, size_band=size_band, count_band=allowed_count, specified=specified,
        matched=matched)
