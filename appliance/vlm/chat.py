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


@dataclass
class ChatRequest:
    """One conversation to continue with one assistant message."""

    messages: list[dict]  # role + content parts {"type": "text", "text"} / {"type": "image"}
    images: list[Image.Image]  # the pictures of the image parts, in order of appearance
    # Decode exactly this text instead of letting the model choose (tests and selftest drive a
    # random-weight model through the real generation loop this way); None: the model decides.
    forced: str | None = None
    seed: int = 0


class VLMRuntime(Protocol):
    """A loaded vision-language model that continues conversations, many at a time."""

    name: str  # backend and model, recorded in provenance

    def chat(self, requests: Sequence[ChatRequest], *, max_new_tokens: int | None = None,
             adapter: str | None = None) -> list[str]:
        """The raw assistant text for each request (special tokens removed).

        ``adapter`` names a LoRA adapter loaded into the runtime; None runs the base weights,
        which lets the policy's fine-tuned adapter and the untuned PG/QE judge share one model.
        """
        ...

    def close(self) -> None: ...


def pil_image(image: np.ndarray) -> Image.Image:
    """An environment image (uint8 RGB array) as the RGB picture the processors expect."""
    return Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8, copy=False), "RGB")


def to_chat_request(messages: Sequence[dict], images: Sequence[np.ndarray], seed: int = 0) -> ChatRequest:
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
    return ChatRequest(converted, pictures, seed=seed)


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


def finish_text(text: str) -> str:
    """Tidy a decoded assistant message for the protocol parser.

    Thinking checkpoints open ``<think>`` in the generation prompt, so the decoded text starts
    inside the block and only closes it; put the opening tag back so the block parses.
    """
    text = text.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()
    head, closing, _ = text.partition("</think>")
    if closing and "<think>" not in head:
        text = "<think>" + text
    return text


def guided_name(backend: str, guide: object | None) -> str:
    return backend if guide is None else f"{backend} (guided by {getattr(guide, 'name', 'a script')})"


_THINK_BLOCK = re.compile(r"<(think|thinking)>.*?</\1>", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Drop reasoning blocks, including an unopened one closed by a bare ``</think>``."""
    text = _THINK_BLOCK.sub("", text)
    for closing in ("</think>", "</thinking>"):
        if closing in text:
            text = text.rsplit(closing, 1)[1]
    return text


class GuidedRuntime:
    """Wraps a runtime so that ``script(request)`` decides what it must decode (None: free).

    For tests and selftest of the VLM tools: the real model still runs every step.
    """

    def __init__(self, runtime: VLMRuntime, script: Callable[[ChatRequest], str | None]) -> None:
        self.runtime = runtime
        self.script = script
        self.name = runtime.name

    def chat(self, requests: Sequence[ChatRequest], *, max_new_tokens: int | None = None,
             adapter: str | None = None) -> list[str]:
        forced = [replace(r, forced=self.script(r)) for r in requests]
        return self.runtime.chat(forced, max_new_tokens=max_new_tokens, adapter=adapter)

    def close(self) -> None:
        self.runtime.close()
