"""The Qwen3-VL policy: the next assistant message of every episode, written by a VLM runtime
(transformers or llama.cpp, from ``appliance.vlm``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from appliance.agent.episode import EpisodeState
from appliance.agent.policy import Policy, PolicyReply
from appliance.agent.schemas import TOOL_SCHEMAS
from appliance.vlm.budget import ROLE_BUDGETS, Budget
from appliance.vlm.chat import ChatRequest, VLMRuntime, guided_name, to_chat_request
from appliance.vlm.llamacpp_runtime import LlamaCppVLMConfig, llamacpp_runtime
from appliance.vlm.resident import release_runtime
from appliance.vlm.transformers_runtime import TransformersVLMConfig, transformers_runtime


def episode_seed(state: EpisodeState) -> int:
    """A per-turn sampling seed, so an episode replays identically from its spec seed."""
    return int(np.random.SeedSequence([state.spec.seed, state.turns, 0x51A]).generate_state(1)[0])


class VLMPolicy:
    """A policy that asks a VLM runtime for the next assistant message of every episode.

    ``guide`` (another policy, usually the scripted one) forces the model to write that policy's
    message token by token: the way a random-weight test model walks a whole episode through the
    real processor, model and generation loop.
    """

    def __init__(self, runtime: VLMRuntime, backend: str, *, adapter: str | None = None,
                 category_adapters: dict[str, str] | None = None,
                 budget: Budget = ROLE_BUDGETS["policy"], sampling: dict | None = None,
                 guide: Policy | None = None) -> None:
        self.runtime = runtime
        self.backend = backend
        self.adapter = adapter  # for every category without one of its own
        # category -> the loaded adapter ``appliance retrain`` promoted for it
        self.category_adapters = dict(category_adapters or {})
        self.budget = budget
        self.sampling = sampling or {}
        self.guide = guide

    @property
    def name(self) -> str:
        """The backend, and the guide when there is one: a guided run must never pass for a
        model's own decisions in a manifest or a log."""
        name = guided_name(self.backend, self.guide)
        if self.category_adapters:  # the adapter hashes go into every sample's provenance
            name += " [adapters " + ", ".join(f"{c}={a}" for c, a in
                                              sorted(self.category_adapters.items())) + "]"
        return name

    def requests(self, states: Sequence[EpisodeState]) -> list[ChatRequest]:
        """Each episode's conversation, with the five tools for the template's tool block."""
        return [to_chat_request(s.messages, s.images, seed=episode_seed(s), tools=TOOL_SCHEMAS)
                for s in states]

    def act(self, states: Sequence[EpisodeState]) -> list[PolicyReply]:
        requests = self.requests(states)
        if self.guide is not None:
            scripted = [m.text if isinstance(m, PolicyReply) else m for m in self.guide.act(states)]
            requests = [replace(r, forced=text) for r, text in zip(requests, scripted)]
        replies: list = [None] * len(states)
        groups: dict[str | None, list[int]] = {}
        for row, state in enumerate(states):
            adapter = self.category_adapters.get(state.spec.category, self.adapter)
            groups.setdefault(adapter, []).append(row)
        for adapter, rows in groups.items():
            answered = self.runtime.chat([requests[r] for r in rows], budget=self.budget,
                                         adapter=adapter, sampling=self.sampling)
            for row, reply in zip(rows, answered):
                replies[row] = reply
        return [PolicyReply(reply.text, {**reply.use.as_dict(), "guided": self.guide is not None},
                            abort=reply.error) for reply in replies]

    def close(self) -> None:
        release_runtime(self.runtime)


class QwenTransformersPolicy(VLMPolicy):
    """The Qwen3-VL policy on transformers; ``adapter_dir`` adds a fine-tuned LoRA adapter."""

    def __init__(self, config: TransformersVLMConfig, adapter_dir: Path | None = None, *,
                 category_adapters: dict[str, Path] | None = None,
                 budget: Budget = ROLE_BUDGETS["policy"], sampling: dict | None = None,
                 guide: Policy | None = None) -> None:
        """``category_adapters``: category -> adapter folder (named by its hash), used for that
        category's episodes instead of ``adapter_dir``."""
        runtime = transformers_runtime(config)
        adapter = runtime.load_adapter(adapter_dir) if adapter_dir is not None else None
        loaded = {category: runtime.load_adapter(folder, name=f"{category}@{folder.name}")
                  for category, folder in (category_adapters or {}).items()}
        super().__init__(runtime, "qwen-transformers", adapter=adapter, category_adapters=loaded,
                         budget=budget, sampling=sampling, guide=guide)


class QwenLlamaCppPolicy(VLMPolicy):
    """The Qwen3-VL policy on llama.cpp; ``category_adapters`` as for transformers, each folder
    holding the adapter's llama.cpp LoRA (``adapter.gguf``)."""

    def __init__(self, config: LlamaCppVLMConfig, *, category_adapters: dict[str, Path] | None = None,
                 budget: Budget = ROLE_BUDGETS["policy"], sampling: dict | None = None,
                 guide: Policy | None = None) -> None:
        runtime = llamacpp_runtime(config)
        loaded = {category: runtime.load_adapter(folder, name=f"{category}@{folder.name}")
                  for category, folder in (category_adapters or {}).items()}
        super().__init__(runtime, "qwen-llamacpp", category_adapters=loaded, budget=budget,
                         sampling=sampling, guide=guide)
