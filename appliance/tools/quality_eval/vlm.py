"""QE on a local vision-language model: the paper's 0-5 location and quality rubric as strict JSON.

The judge sees the normal photo and the edited one and replies with ``location_score``,
``quality_score`` (integers 0-5), a ``review`` and, optionally, ``issues`` from our fixed list.
Replies are parsed leniently from the text after the model's reasoning (the first JSON object
there, scores clamped; unfinished reasoning holds no grade), and a reply without a usable object
is asked for once more; after that ``fallback`` judges, or, without one, the item is a
``ToolFailure`` the policy reads as the judge's error. The wording of the rubric is ours.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Sequence

from appliance.tools.interfaces import (Issue, QualityEvaluator, QualityReport, QualityRequest,
                                        ToolFailure)
from appliance.vlm.budget import ROLE_BUDGETS, Budget
from appliance.vlm.chat import (ChatRequest, VLMRuntime, final_answer, guided_name, pil_image,
                                quote_reply)
from appliance.vlm.resident import release_runtime

SYSTEM_PROMPT = """\
You are the visual inspector of an industrial defect synthesis station. You compare a photo of \
a good part with an edited copy that should now show one realistic defect of a requested type, \
and you grade the edit the way an experienced quality engineer would.

Grade two things, each as an integer from 0 to 5:
- location_score: is the defect on the part itself, on a surface or feature where this defect \
physically occurs, following the part's geometry? Low when it floats in the background, crosses \
unrelated regions, or sits where this defect cannot happen.
- quality_score: would it pass as a real defect? Consider texture, scale, contrast, shading and \
how it blends into the surrounding material. Low for pasted-looking patches, hard seams, cartoon \
shapes, the wrong kind of defect, or no visible change at all.
Scale: 5 indistinguishable from a real sample; 3-4 small flaws but believable; 1-2 clearly \
wrong (misplaced, wrong texture, obvious artefact); 0 the edit failed.

Reply with one JSON object and nothing else:
{"location_score": <0-5>, "quality_score": <0-5>, "review": "<what works, what does not, \
and what to change>", "issues": [<zero or more of: %s>]}""" % ", ".join(f'"{i}"' for i in Issue.ALL)

USER_TEMPLATE = """\
Image 1 is the good part, image 2 the edited copy.
Part: {category}
Requested defect type: {defect}
Grade image 2 now, as the JSON object only."""

RETRY_PROMPT = """\
That reply could not be read as the requested JSON object. Answer again with exactly one JSON \
object with the keys "location_score", "quality_score" (integers 0-5), "review" (a string) and \
"issues" (a list), and no other text."""

# Words in a review that point at one of our issue codes; used when the judge lists no issues.
_ISSUE_WORDS: dict[str, tuple[str, ...]] = {
    Issue.NO_CHANGE: ("no change", "unchanged", "no visible defect", "identical to the", "no defect"),
    Issue.TOO_FAINT: ("faint", "subtle", "barely visible", "hard to see", "too weak", "low contrast"),
    Issue.TOO_STRONG: ("too strong", "exaggerated", "overly dark", "too dark", "too harsh", "too intense"),
    Issue.TOO_SMALL: ("too small", "tiny", "too short"),
    Issue.TOO_LARGE: ("too large", "too big", "oversized", "too long", "covers most"),
    Issue.OFF_OBJECT: ("background", "off the part", "outside the part", "outside the object",
                       "floating", "not on the"),
    Issue.SCATTERED: ("scattered", "fragmented", "several spots", "multiple spots", "disjoint"),
    Issue.HARD_SEAMS: ("seam", "pasted", "hard edge", "sharp border", "sticker", "overlay"),
    Issue.WRONG_TYPE: ("wrong type", "different defect", "does not look like a", "not a real",
                       "resembles a"),
    Issue.WRONG_COUNT: ("wrong number", "too many defects", "too few defects", "more defects than",
                        "fewer defects than"),
}
_NEGATION = re.compile(r"\b(no|not|without|free of|lacks?)\b[\w\s,-]{0,20}$", re.IGNORECASE)


@dataclass
class Judgement:
    location_score: int
    quality_score: int
    review: str
    issues: list[str] | None  # None: the judge gave no list


def user_prompt(category: str, defect: str) -> str:
    return USER_TEMPLATE.format(category=category.replace("_", " "), defect=defect.replace("_", " "))


def first_json_object(text: str) -> dict | None:
    """The first JSON object anywhere in ``text`` (code fences and prose around it are fine)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _score(value) -> int | None:
    if isinstance(value, str):
        found = re.search(r"-?\d+(?:\.\d+)?", value)
        value = float(found.group()) if found else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(min(5, max(0, round(float(value)))))


def parse_judgement(text: str) -> Judgement | None:
    """The judge's reply as scores, review and issues; None when no usable object is in it."""
    answer = final_answer(text)
    obj = first_json_object(answer) if answer is not None else None
    if obj is None:
        return None
    location, quality = _score(obj.get("location_score")), _score(obj.get("quality_score"))
    if location is None or quality is None:
        return None
    review = obj.get("review", "")
    review = review.strip() if isinstance(review, str) else json.dumps(review)
    issues = obj.get("issues")
    if isinstance(issues, list):
        issues = [i for i in (str(x).strip().lower().replace(" ", "_") for x in issues) if i in Issue.ALL]
    else:
        issues = None
    return Judgement(location, quality, review, issues)


def judgement_json(report: QualityReport) -> str:
    """A report written as the reply the judge is asked for."""
    return json.dumps({"location_score": report.location_score,
                       "quality_score": report.quality_score, "review": report.review,
                       "issues": list(report.issues)})


def issues_from_review(review: str) -> list[str]:
    """Issue codes named by the review's wording, skipping negated mentions ("no seams")."""
    lower = review.lower()
    found = []
    for code, words in _ISSUE_WORDS.items():
        for word in words:
            for match in re.finditer(re.escape(word), lower):
                if not _NEGATION.search(lower[max(0, match.start() - 25):match.start()]):
                    found.append(code)
                    break
            if code in found:
                break
    return found


class VLMQualityEvaluator:
    """QualityEvaluator on a resident VLM runtime, batched across episodes."""

    def __init__(self, runtime: VLMRuntime, fallback: QualityEvaluator | None = None,
                 budget: Budget = ROLE_BUDGETS["quality_eval"], sampling: dict | None = None,
                 retries: int = 1, guide: QualityEvaluator | None = None) -> None:
        self.runtime = runtime
        self.fallback = fallback
        self.budget = budget
        self.sampling = sampling or {}
        self.retries = retries
        # A random-weight test model is made to write ``guide``'s grade as the JSON reply
        # (forced decoding): the real processor, model and JSON parsing still run.
        self.guide = guide

    @property
    def name(self) -> str:
        return guided_name("vlm", self.guide)

    def request(self, request: QualityRequest) -> ChatRequest:
        messages = [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [
                {"type": "image"}, {"type": "image"},
                {"type": "text", "text": user_prompt(request.category, request.defect)}]},
        ]
        return ChatRequest(messages, [pil_image(request.normal), pil_image(request.edited)])

    def evaluate(self, requests: Sequence[QualityRequest]) -> list[QualityReport | ToolFailure]:
        chats = [self.request(r) for r in requests]
        if self.guide is not None:
            chats = [replace(chat, forced=judgement_json(report))
                     for chat, report in zip(chats, self.guide.evaluate(requests))]
        replies: list[list[str]] = [[] for _ in requests]
        judgements: list[Judgement | None] = [None] * len(requests)
        errors: dict[int, str] = {}
        pending = list(range(len(requests)))
        for _attempt in range(1 + self.retries):
            if not pending:
                break
            answers = self.runtime.chat([chats[i] for i in pending], budget=self.budget,
                                        sampling=self.sampling)
            for i, answer in zip(pending, answers):
                text = answer.text
                replies[i].append(text)
                if answer.error:  # not run (the conversation does not fit): asking again won't help
                    errors[i] = answer.error
                    continue
                judgements[i] = parse_judgement(text)
                # The retry sees its own unreadable reply and a short correction.
                chats[i] = ChatRequest(chats[i].messages + [
                    {"role": "assistant", "content": [{"type": "text", "text": text}]},
                    {"role": "user", "content": [{"type": "text", "text": RETRY_PROMPT}]}],
                    chats[i].images)
            pending = [i for i in pending if judgements[i] is None and i not in errors]
        unjudged = [i for i in range(len(requests)) if judgements[i] is None]
        fallback_reports = {}
        if unjudged and self.fallback is not None:
            fallback_reports = dict(zip(unjudged, self.fallback.evaluate([requests[i] for i in unjudged])))
        return [self._report(judgements[i], replies[i], fallback_reports.get(i), errors.get(i))
                for i in range(len(requests))]

    def _report(self, judgement: Judgement | None, replies: list[str],
                fallback: QualityReport | None, error: str | None = None) -> QualityReport | ToolFailure:
        measurements = {"judge": self.runtime.name, "replies": len(replies),
                        "raw_reply": replies[-1][:2000] if replies else ""}
        if judgement is None:
            if fallback is not None:
                fallback.measurements = {**fallback.measurements, **measurements,
                                         "fallback": getattr(self.fallback, "name", "fallback")}
                return fallback
            if error:
                return ToolFailure(f"the judge could not run: {error}")
            last = replies[-1] if replies else ""
            why = "its reasoning was not finished" if final_answer(last) is None else \
                "no JSON object with integer location_score and quality_score after the reasoning"
            return ToolFailure(f"the judge's {len(replies)} replies held no grade ({why}); "
                               f"last reply: {quote_reply(last)}")
        issues = judgement.issues if judgement.issues is not None else issues_from_review(judgement.review)
        return QualityReport(judgement.location_score, judgement.quality_score, judgement.review,
                             issues, measurements)

    def close(self) -> None:
        release_runtime(self.runtime)
