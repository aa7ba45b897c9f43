"""PG on a local vision-language model: one local-edit instruction per (photo, part, defect).

The structure follows the paper's PG tool (the model sees the normal photo, the part name and the
defect type, reasons about where and how such a defect really occurs, and writes a single
localized editing instruction); the wording is ours. When the knowledge base has an entry for the
pair, its description goes in as context. The instruction is read only from the text after the
model's reasoning (``appliance.vlm.chat.final_answer``); an unusable reply, unfinished reasoning
included, falls back to ``fallback``, or without one is that item's ``ToolFailure``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

from appliance.tools.interfaces import KnowledgeEntry, PromptGenerator, PromptRequest
from appliance.tools.knowledge.base import KnowledgeBase
from appliance.tools.interfaces import ToolFailure
from appliance.vlm.budget import ROLE_BUDGETS, Budget
from appliance.vlm.chat import (ChatReply, ChatRequest, VLMRuntime, final_answer, guided_name,
                                pil_image, quote_reply)
from appliance.vlm.resident import release_runtime

SYSTEM_PROMPT = """\
You write image-editing instructions for an industrial defect synthesis station. An inpainting \
model will follow your instruction to add one realistic manufacturing defect to a photo of a \
good part, and a detector will later be trained on the result, so physical realism matters more \
than anything else.

Think it through before writing (keep this reasoning to yourself):
1. What does this defect type mean for this particular part in a real inspection line?
2. On which part of the object does it physically occur? Pick one concrete spot you can see in \
the photo.
3. How does it look there: outline and structure, how it interacts with the material's texture \
and finish, its contrast, its size relative to the part, its severity?

Then write the instruction:
- It is a local edit. Start in the spirit of "In this photo, change only ..." and end by saying \
that everything else stays exactly as it is: background, lighting, geometry, the rest of the \
surface.
- Be concrete about the spot, the look, the size (small and confined unless the defect type \
says otherwise) and how the defect blends into the surrounding material.
- Describe what should be there, not what should be avoided. No artistic or global changes.

Reply with the instruction only: one plain paragraph, no heading, no list, no quotes, no \
explanation."""

USER_TEMPLATE = """\
Normal photo of the part: see the image above.
Part: {category}
Defect type: {defect}
{knowledge}Write the editing instruction for this defect now."""

MIN_WORDS = 6  # shorter replies are not instructions
MAX_CHARS = 1200

_LABEL = re.compile(r"^[\s*#]*(?:final\s+)?(?:image\s+)?(?:editing\s+)?(?:instruction|prompt)[\s*]*:[\s*]*",
                    re.IGNORECASE)


def _readable(name: str) -> str:
    return name.replace("_", " ").strip()


def user_prompt(category: str, defect: str, entry: KnowledgeEntry | None) -> str:
    knowledge = ""
    if entry is not None:
        knowledge = (f"What the plant's knowledge base says about it: {entry.appearance} "
                     f"Typical location: {entry.location} Typical size: {entry.size}\n")
    return USER_TEMPLATE.format(category=_readable(category), defect=_readable(defect),
                                knowledge=knowledge)




def clean_instruction(text: str) -> str | None:
    """The instruction in a model reply, or None when the reply holds no usable one."""
    answer = final_answer(text)
    if answer is None:
        return None
    text = answer.strip()
    text = re.sub(r"^```[a-z]*\s*|\s*```$", "", text).strip()
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        return None
    text = _LABEL.sub("", paragraphs[0])
    text = " ".join(text.split()).strip("\"'“”‘’* ")
    if len(text.split()) < MIN_WORDS:
        return None
    if len(text) > MAX_CHARS:
        cut = text[:MAX_CHARS]
        text = cut[:cut.rfind(". ") + 1] if ". " in cut else cut
    return text


def _unusable(reply: ChatReply) -> str:
    if reply.error:
        return reply.error
    if reply.use.action_budget_hit:
        return "it was cut at the action budget"
    if final_answer(reply.text) is None:
        return "its reasoning was not finished"
    return "too short, or only reasoning"


class VLMPromptGenerator:
    """PromptGenerator on a resident VLM runtime, batched across episodes."""

    def __init__(self, runtime: VLMRuntime, knowledge_base: KnowledgeBase | None = None,
                 fallback: PromptGenerator | None = None,
                 budget: Budget = ROLE_BUDGETS["prompt_gen"], sampling: dict | None = None,
                 guide: PromptGenerator | None = None) -> None:
        self.runtime = runtime
        self.knowledge_base = knowledge_base
        self.fallback = fallback
        self.budget = budget
        self.sampling = sampling or {}
        # A random-weight test model is made to write ``guide``'s instruction token by token
        # (forced decoding): the real processor, model and parsing still run.
        self.guide = guide
        self.fallbacks_used = 0  # how often the model's reply was unusable, for the logs

    @property
    def name(self) -> str:
        return guided_name("vlm", self.guide)

    def request(self, request: PromptRequest) -> ChatRequest:
        entry = self.knowledge_base.entry(request.category, request.defect) \
            if self.knowledge_base is not None else None
        messages = [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [
                {"type": "image"},
                {"type": "text", "text": user_prompt(request.category, request.defect, entry)}]},
        ]
        return ChatRequest(messages, [pil_image(request.image)])

    def generate_prompts(self, requests: Sequence[PromptRequest]) -> list[str | ToolFailure]:
        chats = [self.request(r) for r in requests]
        if self.guide is not None:
            chats = [replace(chat, forced=text)
                     for chat, text in zip(chats, self.guide.generate_prompts(requests))]
        replies = self.runtime.chat(chats, budget=self.budget, sampling=self.sampling)
        # An instruction cut at the budget is half an instruction: not usable either.
        prompts: list[str | ToolFailure | None] = [
            None if reply.error or reply.use.action_budget_hit else clean_instruction(reply.text)
            for reply in replies]
        missing = [i for i, p in enumerate(prompts) if p is None]
        if missing and self.fallback is not None:
            self.fallbacks_used += len(missing)
            for i, text in zip(missing, self.fallback.generate_prompts([requests[i] for i in missing])):
                prompts[i] = text
        elif missing:
            for i in missing:
                prompts[i] = ToolFailure(f"the model wrote no usable instruction "
                                         f"({_unusable(replies[i])}): {quote_reply(replies[i].text)}")
        return prompts

    def close(self) -> None:
        release_runtime(self.runtime)
