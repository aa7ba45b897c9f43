"""What every local VLM runtime shares: the chat request, the runtime interface, and the
conversion of the environment's messages into the chat template's form.

The environment stores content parts ``{"type": "text"}`` and ``{"type": "image", "image_index":
N}`` (N indexes ``state.images``) and answers tools with role ``tool``. The Qwen3-VL template
wants ``{"type": "image"}`` placeholders, with the actual pictures handed to the processor in the
order the placeholders appear, and renders ``tool`` messages as ``<tool_response>`` blocks of a
user turn. Both runtimes (transformers, llama.cpp) take the same ``ChatRequest``, so the
environment sees the same messages in and the same protocol out whichever one runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from appliance.vlm.budget import Budget, BudgetUse


@dataclass
class ChatRequest:
    """One conversation to continue with one assistant message."""

    messages: list[dict]  # role + content parts {"type": "text", "text"} / {"type": "image"}
    images: list[Image.Image]  # the pictures of the image parts, in order of appearance
    # Decode exactly this text instead of letting the model choose (tests and selftest drive a
    # random-weight model through the real generation loop this way); None: the model decides.
    forced: str | None = None
    seed: int = 0
    # OpenAI-style function schemas the chat template renders into the system turn (Qwen3-VL's
    # native tool block); None: no tools.
    tools: list[dict] | None = None


@dataclass
class ChatReply:
    """One assistant reply: its text (special tokens removed; a reasoning block the prompt
    opened gets its ``<think>`` back) and what it spent of its budget."""

    text: str
    use: BudgetUse
    # Set when no reply could be made (the conversation no longer fits the model's context).
    error: str | None = None


class VLMRuntime(Protocol):
    """A loaded vision-language model that continues conversations, many at a time."""

    name: str  # backend and model, recorded in provenance

    def chat(self, requests: Sequence[ChatRequest], *, max_new_tokens: int | None = None,
             budget: Budget | None = None, adapter: str | None = None,
             sampling: dict | None = None) -> list[ChatReply]:
        """One reply per request.

        ``budget`` bounds the reasoning and then the action (``appliance.vlm.budget``); without
        one, a reply is only capped at ``max_new_tokens`` (default: the runtime's). ``sampling``
        overrides the runtime's sampling settings for this call (``appliance.vlm.sampling``).
        ``adapter`` names a LoRA adapter loaded into the runtime; None runs the base weights,
        which lets the policy's fine-tuned adapter and the untuned PG/QE judge share one model.
        """
        ...

    def close(self) -> None: ...


def fit_pixels(image: Image.Image, min_pixels: int | None, max_pixels: int | None,
               factor: int = 32) -> Image.Image:
    """``image`` resized as Qwen's image processors do: sides multiples of ``factor`` (one
    visual token per 32x32 pixels on Qwen3-VL), area within [min_pixels, max_pixels], aspect
    ratio kept. For runtimes whose vision encoder does not resize by itself (llama.cpp)."""
    width, height = image.size
    new_w = max(factor, round(width / factor) * factor)
    new_h = max(factor, round(height / factor) * factor)
    if max_pixels is not None and new_w * new_h > max_pixels:
        scale = (width * height / max_pixels) ** 0.5
        new_w = max(factor, int(width / scale / factor) * factor)
        new_h = max(factor, int(height / scale / factor) * factor)
    elif min_pixels is not None and new_w * new_h < min_pixels:
        scale = (min_pixels / (width * height)) ** 0.5
        new_w = -(-int(width * scale) // factor) * factor
        new_h = -(-int(height * scale) // factor) * factor
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def pil_image(image: np.ndarray) -> Image.Image:
    """An environment image (uint8 RGB array) as the RGB picture the processors expect."""
    return Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False), "RGB")


def to_chat_request(messages: Sequence[dict], images: Sequence[np.ndarray], seed: int = 0,
                    tools: list[dict] | None = None) -> ChatRequest:
    """Convert the environment's messages; image parts resolve against ``images`` (1-based)."""
    converted: list[dict] = []
    pictures: list[Image.Image] = []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] == "image":
                index = part["image_index"]
                if not 1 <= index <= len(images):
                    raise ValueError(f"message refers to image {index}, but the episode has "
                                     f"{len(images)} image(s)")
                parts.append({"type": "image"})
                pictures.append(pil_image(images[index - 1]))
            else:
                raise ValueError(f"unknown content part type {part['type']!r}")
        converted.append({"role": message["role"], "content": parts})
    return ChatRequest(converted, pictures, seed=seed, tools=tools)


def template_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages as the chat template is given them: a text-only message as one plain string.

    Every Qwen template accepts a string; not every one (the Thinking checkpoints' templates
    split the reasoning out of an assistant message) reads a list of text parts the same way.
    """
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list) and all(part["type"] == "text" for part in content):
            content = "".join(part["text"] for part in content)
        out.append({"role": message["role"], "content": content})
    return out


OPENS_REASONING = re.compile(r"<think>\s*\Z")


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether a rendered generation prompt ends inside an opened ``<think>`` block (Qwen3
    Thinking templates end the prompt that way)."""
    return bool(OPENS_REASONING.search(prompt))


def finish_text(text: str, prompt_opened_reasoning: bool = False) -> str:
    """Tidy a decoded assistant message for the protocol parser.

    Thinking checkpoints open ``<think>`` in the generation prompt, so the decoded text starts
    inside the block: put the opening tag back, so that a closed block parses as reasoning and
    an unclosed one reads as unfinished reasoning rather than as an action.
    """
    text = text.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()
    head, closing, _ = text.partition("</think>")
    if (closing or prompt_opened_reasoning) and "<think>" not in head:
        text = "<think>\n" + text
    return text


def guided_name(backend: str, guide: object | None) -> str:
    return backend if guide is None else f"{backend} (guided by {getattr(guide, 'name', 'a script')})"


_OPEN = re.compile(r"<think(?:ing)?>")
_CLOSE = re.compile(r"</think(?:ing)?>")


@dataclass(frozen=True)
class Reasoning:
    """A reply split at its reasoning: the reasoning text, what follows it, and whether the
    reasoning block was closed (a reply with no reasoning block at all counts as closed)."""

    text: str
    rest: str
    finished: bool


def split_reasoning(text: str) -> Reasoning:
    """Split a reply into its reasoning and the text after the last ``</think>``.

    Text with an opening ``<think>`` but no closing tag is unfinished reasoning (a budget or the
    token limit cut it off): no action may be read from it.
    """
    closes = list(_CLOSE.finditer(text))
    if closes:
        last = closes[-1]
        reasoning = " ".join(_CLOSE.sub(" ", _OPEN.sub("", text[:last.start()])).split())
        rest = text[last.end():]
        reopened = _OPEN.search(rest)
        if reopened:  # a new reasoning block after the last close, never closed
            more = " ".join(rest[reopened.end():].split())
            return Reasoning(f"{reasoning} {more}".strip(), "", False)
        return Reasoning(reasoning, rest, True)
    opened = _OPEN.search(text)
    if opened:
        return Reasoning(" ".join(text[opened.end():].split()), "", False)
    return Reasoning("", text, True)


_MARKUP = re.compile(r"</?(?:think|thinking|tool_call|answer|tool_response)>|<\|[a-z_]+\|>")


def quote_reply(text: str, limit: int = 200) -> str:
    """The end of a model reply, quoted for an error message another model will read: protocol
    tags removed (they would read as its own reasoning or calls), whitespace collapsed."""
    plain = " ".join(_MARKUP.sub(" ", text).split())
    return repr(plain[-limit:])


def final_answer(text: str) -> str | None:
    """The part of a reply after its reasoning; None while the reasoning is unfinished."""
    reasoning = split_reasoning(text)
    return reasoning.rest if reasoning.finished else None


class GuidedRuntime:
    """Wraps a runtime so that ``script(request)`` decides what it must decode (None: free).

    For tests and selftest of the VLM tools: the real model still runs every step.
    """

    def __init__(self, runtime: VLMRuntime, script: Callable[[ChatRequest], str | None]) -> None:
        self.runtime = runtime
        self.script = script
        self.name = runtime.name

    def chat(self, requests: Sequence[ChatRequest], **options) -> list[ChatReply]:
        forced = [replace(r, forced=self.script(r)) for r in requests]
        return self.runtime.chat(forced, **options)

    def close(self) -> None:
        self.runtime.close()
