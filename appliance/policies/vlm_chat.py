"""What every local VLM backend shares: the chat request, the runtime interface, the conversion
of the environment's messages into the chat template's form, and the policy built on top.

The environment stores content parts ``{"type": "text"}`` and ``{"type": "image", "image_index":
N}`` (N indexes ``state.images``) and answers tools with role ``tool``. The Qwen3-VL template
wants ``{"type": "image"}`` placeholders, with the actual pictures handed to the processor in the
order the placeholders appear, and renders ``tool`` messages as ``<tool_response>`` blocks of a
user turn. Both runtimes (transformers, llama.cpp) take the same ``ChatRequest``, so the
environment sees the same messages in and the same protocol out whichever one runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from appliance.agent.environment import EpisodeState
    from appliance.policies.base import Policy


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


def episode_seed(state: "EpisodeState") -> int:
    """A per-turn sampling seed, so an episode replays identically from its spec seed."""
    return int(np.random.SeedSequence([state.spec.seed, state.turns, 0x51A]).generate_state(1)[0])


class VLMPolicy:
    """A policy that asks a VLM runtime for the next assistant message of every episode.

    ``guide`` (another policy, usually the scripted one) forces the model to write that policy's
    message token by token: the way a random-weight test model walks a whole episode through the
    real processor, model and generation loop.
    """

    def __init__(self, runtime: VLMRuntime, backend: str, *, adapter: str | None = None,
                 max_new_tokens: int = 1024, guide: "Policy | None" = None) -> None:
        self.runtime = runtime
        self.backend = backend
        self.adapter = adapter
        self.max_new_tokens = max_new_tokens
        self.guide = guide

    @property
    def name(self) -> str:
        """The backend, and the guide when there is one: a guided run must never pass for a
        model's own decisions in a manifest or a log."""
        return guided_name(self.backend, self.guide)

    def requests(self, states: Sequence["EpisodeState"]) -> list[ChatRequest]:
        return [to_chat_request(s.messages, s.images, seed=episode_seed(s)) for s in states]

    def act(self, states: Sequence["EpisodeState"]) -> list[str]:
        requests = self.requests(states)
        if self.guide is not None:
            requests = [replace(r, forced=text) for r, text in zip(requests, self.guide.act(states))]
        texts = self.runtime.chat(requests, max_new_tokens=self.max_new_tokens, adapter=self.adapter)
        return [finish_text(text) for text in texts]

    def close(self) -> None:
        release_runtime(self.runtime)


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


# --- One resident copy of each model -----------------------------------------------------------
# The policy, PG and QE may all name the same weights; they share one loaded runtime, counted
# by users and closed when the last one is released.

_LOCK = threading.Lock()
_RUNTIMES: dict[tuple, VLMRuntime] = {}
_USERS: dict[int, int] = {}


def shared_runtime(key: tuple, load: Callable[[], VLMRuntime]) -> VLMRuntime:
    """The runtime loaded under ``key``, loading it on first use."""
    with _LOCK:
        runtime = _RUNTIMES.get(key)
        if runtime is None:
            runtime = load()
            _RUNTIMES[key] = runtime
        _USERS[id(runtime)] = _USERS.get(id(runtime), 0) + 1
        return runtime


def release_runtime(runtime: VLMRuntime) -> None:
    """Drop one user of a shared runtime; the last one closes it. Unshared runtimes stay open."""
    with _LOCK:
        if id(runtime) not in _USERS:
            return
        _USERS[id(runtime)] -= 1
        if _USERS[id(runtime)] > 0:
            return
        del _USERS[id(runtime)]
        for key, value in list(_RUNTIMES.items()):
            if value is runtime:
                del _RUNTIMES[key]
    runtime.close()


def loaded_runtimes() -> list[str]:
    with _LOCK:
        return [runtime.name for runtime in _RUNTIMES.values()]
