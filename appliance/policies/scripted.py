"""The embedded default policy: Algorithm 1 with rule-based refinement, no model weights needed.

It decides only from what a VLM policy would see, the conversation: the tool responses' JSON
(scores, issues, retrieved knowledge). Feedback changes the next instruction through
``refine_prompt``; the instruction's words in turn drive the image generator's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from appliance.agent import schemas
from appliance.agent.episode import EpisodeState
from appliance.agent.protocol import (
    ToolCall,
    format_answer,
    format_tool_call,
    parse_assistant_message,
    parse_tool_response,
)
from appliance.tools.interfaces import Issue, Knowledge, KnowledgeEntry
from appliance.tools.prompt_gen.composer import refine_prompt

# Issues that more wording alone rarely fixes: look up how the defect really looks first.
_KNOWLEDGE_ISSUES = {Issue.OFF_OBJECT, Issue.WRONG_TYPE, Issue.HARD_SEAMS, Issue.SCATTERED,
                     Issue.NO_CHANGE}


@dataclass
class _History:
    """What the conversation so far says, read back from its messages."""

    prompt: str | None = None  # the instruction of the latest image_gen call (or prompt_gen's)
    images: list[int] = field(default_factory=list)
    reviews: dict[int, dict] = field(default_factory=dict)  # image index -> quality_eval payload
    knowledge: dict | None = None
    mask: dict | None = None
    last_tool: str | None = None
    last_payload: dict | None = None
    consecutive_errors: int = 0


def _read_history(state: EpisodeState) -> _History:
    history = _History()
    for message in state.messages:
        text = "".join(part.get("text", "") for part in message["content"] if part["type"] == "text")
        if message["role"] == "assistant":
            action = parse_assistant_message(text).action
            if isinstance(action, ToolCall) and action.name == schemas.IMAGE_GEN:
                history.prompt = action.arguments.get("prompt", history.prompt)
            continue
        if message["role"] != "tool":
            continue
        parsed = parse_tool_response(text)
        if parsed is None:
            continue
        name, payload = parsed
        if payload.get("status") == "error":
            history.consecutive_errors += 1
            continue
        history.consecutive_errors = 0
        history.last_tool, history.last_payload = name, payload
        if name == schemas.PROMPT_GEN:
            history.prompt = payload["prompt"]
        elif name == schemas.IMAGE_GEN:
            history.images.append(payload["image_index"])
        elif name == schemas.QUALITY_EVAL:
            history.reviews[payload["anomaly_image"]] = payload
        elif name == schemas.KNOWLEDGE_RETRIEVAL:
            history.knowledge = payload
        elif name == schemas.MASK_GEN:
            history.mask = payload
    return history


def _knowledge_from_payload(payload: dict | None) -> Knowledge | None:
    if not payload or not payload.get("entries"):
        return None
    fields = KnowledgeEntry.__dataclass_fields__
    entries = [KnowledgeEntry(**{k: v for k, v in e.items() if k in fields}) for e in payload["entries"]]
    return Knowledge(payload.get("query", ""), entries, [e.get("relevance", 0.0) for e in payload["entries"]])


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _describe(review: dict) -> str:
    issues = ", ".join(i.replace("_", " ") for i in review.get("issues", [])) or "no listed issue"
    return (f"image {review['anomaly_image']} scored location {review['location_score']}/5 and "
            f"quality {review['quality_score']}/5 ({issues})")


class ScriptedPolicy:
    """PG -> IG -> QE -> (KR) -> refine -> IG ... -> MG -> answer."""

    name = "scripted"

    def act(self, states: Sequence[EpisodeState]) -> list[str]:
        return [self._next(state) for state in states]

    def _next(self, state: EpisodeState) -> str:
        spec = state.spec
        h = _read_history(state)
        task = {"item_name": spec.category, "anomaly_type": spec.defect}
        if h.consecutive_errors >= 3:
            return format_answer("The tools keep refusing my calls; I stop here.",
                                 {"status": "failed", "final_image_index": None,
                                  "mask_generated": False, "summary": "gave up after errors"})
        if h.mask is not None:
            return self._answer(h)
        if h.prompt is None:
            return format_tool_call(
                f"I need a first editing instruction for {_a(spec.defect)} on this {spec.category}.",
                schemas.PROMPT_GEN, {"image": 1, **task})
        if not h.images:
            return format_tool_call("I have the instruction; I edit the normal photo with it.",
                                    schemas.IMAGE_GEN, {"prompt": h.prompt, "target_image": 1})
        latest = h.images[-1]
        if latest not in h.reviews:
            return format_tool_call(f"Image {latest} is ready; the judge should check it.",
                                    schemas.QUALITY_EVAL, {"anomaly_image": latest, **task})
        review = h.reviews[latest]
        if review["passed"]:
            return format_tool_call(
                f"The judge accepted: {_describe(review)}. I make the mask of image {latest}.",
                schemas.MASK_GEN, {"anomaly_image": latest})
        if len(h.images) >= state.config.max_image_gen:
            best = max(h.reviews.values(), key=lambda r: (r["score"], r["anomaly_image"]))
            return format_tool_call(
                f"No attempts are left and none passed; the best was {_describe(best)}. "
                "I mask it so the attempt is recorded.", schemas.MASK_GEN,
                {"anomaly_image": best["anomaly_image"]})
        issues = set(review.get("issues", []))
        wants_knowledge = (bool(issues & _KNOWLEDGE_ISSUES)
                           or review["score"] < state.config.knowledge_threshold)
        if wants_knowledge and h.knowledge is None and h.last_tool == schemas.QUALITY_EVAL:
            return format_tool_call(
                f"Rejected: {_describe(review)}. Before revising I look up how "
                f"{_a(spec.defect)} really looks on {_a(spec.category)}.",
                schemas.KNOWLEDGE_RETRIEVAL, task)
        knowledge = _knowledge_from_payload(h.knowledge)
        revised = refine_prompt(h.prompt, sorted(issues), knowledge)
        # The review and the knowledge are in the context already: the thought names what
        # failed and where the revision comes from, and copies neither (copying long free text
        # is where a small trained policy garbles its messages).
        reason = f"Rejected: {_describe(review)}."
        if knowledge is not None and h.last_tool == schemas.KNOWLEDGE_RETRIEVAL:
            reason += " I follow what the knowledge base says of it."
        return format_tool_call(f"{reason} I revise the instruction accordingly and try again.",
                                schemas.IMAGE_GEN, {"prompt": revised, "target_image": 1})

    def _answer(self, h: _History) -> str:
        # Two keys on purpose: the scores, the mask and the attempts are on record in the
        # episode, and the environment needs only the verdict and the masked image. A policy
        # trained on it copies no free text at the one step that closes the episode (the tiny
        # test policy broke its answers' JSON on a summary; a 4B model would not care).
        index = h.mask["anomaly_image"]
        status = "success" if h.reviews[index]["passed"] else "rejected"
        return format_answer("Mask made; I close the episode.",
                             {"status": status, "final_image_index": index})
