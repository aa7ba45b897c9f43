"""Qwen3-VL through llama-cpp-python: a GGUF language model plus its mmproj vision projector.

For CPU boxes and small GPUs. The conversation is rendered with the same Qwen3-VL chat template
as the transformers backend (the one embedded in the GGUF, or ours), and llama.cpp's multimodal
library (mtmd) puts each picture where the template has its placeholder, wrapped in Qwen's
vision start/end tokens, so the model reads the same token sequence either way.

Build llama-cpp-python with ``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir
llama-cpp-python``: a native build enables AMX on recent Xeons and quantized models then crash.
llama.cpp decodes one conversation at a time; requests of a batch run one after another.

Pictures are resized to at most ``max_pixels`` (Qwen's rule: sides multiples of 32, one visual
token per 32x32 pixels) before they reach the vision projector, as the transformers processor
does, and every prompt is measured against ``n_ctx`` before it runs: a conversation that would
not fit loses its oldest edited pictures first (the normal photo and the newest picture stay),
each replaced by a note saying so; one that still does not fit is not run, and the reply says
why (the policy ends that episode with the reason; the batch goes on).
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from appliance.vlm.budget import CLOSE_REASONING, Budget, BudgetTracker, BudgetUse
from appliance.vlm.chat import (ChatReply, ChatRequest, finish_text, fit_pixels,
                                prompt_opens_reasoning, template_messages)
from appliance.vlm.chat_template import QWEN3_VL_CHAT_TEMPLATE
from appliance.vlm.prefix_cache import MtmdPrefixCache, call_with_prefix, image_id
from appliance.vlm.resident import shared_runtime
from appliance.vlm.sampling import resolve_sampling

IMAGE_OMITTED = "[an earlier picture was left out here to fit the model's context]"


def _raise_exception(message: str):
    raise ValueError(message)


ADAPTER_GGUF = "adapter.gguf"  # a stored adapter's llama.cpp LoRA, beside its peft files


@dataclass(frozen=True)
class LlamaCppVLMConfig:
    model_path: Path  # the language model GGUF
    mmproj_path: Path  # the vision projector GGUF
    n_ctx: int = 16384  # the system prompt alone is ~2k tokens; each picture adds its tokens
    n_gpu_layers: int = -1  # all layers on the GPU when llama.cpp was built with one; else CPU
    n_threads: int | None = None  # None: llama.cpp's default
    n_batch: int = 512
    chat_template: str | None = None  # None: the GGUF's own template, else the vendored one
    max_new_tokens: int = 1024  # the cap of a reply without a budget
    # Sampling: None takes generation_config.json beside the GGUF, else Qwen's Thinking defaults
    # (appliance.vlm.sampling); greedy only with do_sample = False.
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    # Pixels per picture after resizing (as the transformers processor's min/max pixels).
    min_pixels: int | None = None
    max_pixels: int | None = 640 * 640
    use_gpu_for_vision: bool = True
    # Keep the KV cache between calls and evaluate only what differs from the last prompt (the
    # system prompt, tools and first picture open every turn): appliance.vlm.prefix_cache.
    prefix_cache: bool = True


def llamacpp_config(folder: Path, settings: dict) -> LlamaCppVLMConfig:
    """Config from a models-manifest entry: ``model`` and ``mmproj`` name the two GGUF files in
    ``folder`` (found by name when absent: the one with "mmproj" in it is the projector); the
    other keys are the config's fields. An unknown key is an error."""
    settings = dict(settings)
    folder = Path(folder)
    model, mmproj = settings.pop("model", None), settings.pop("mmproj", None)
    if model is None or mmproj is None:
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        projectors = [name for name in ggufs if "mmproj" in name.lower()]
        models = [name for name in ggufs if name not in projectors]
        if len(projectors) != 1 or len(models) != 1:
            raise ValueError(f"{folder}: expected one model GGUF and one mmproj GGUF, found "
                             f"{ggufs}; name them with the 'model' and 'mmproj' settings")
        model, mmproj = model or models[0], mmproj or projectors[0]
    allowed = {f.name for f in fields(LlamaCppVLMConfig)} - {"model_path", "mmproj_path"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"unknown llama.cpp VLM setting(s) {unknown}; allowed: "
                         f"{sorted(allowed | {'model', 'mmproj'})}")
    return LlamaCppVLMConfig(folder / model, folder / mmproj, **settings)


def image_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(request: ChatRequest, data_uris: bool = True) -> list[dict]:
    """The request in the OpenAI-style form llama-cpp-python takes: pictures as data URIs
    (``data_uris=False``: an empty URL, to render the template without encoding pictures)."""
    images = iter(request.images)
    messages = []
    for message in template_messages(request.messages):
        if isinstance(message["content"], str):
            messages.append(message)
            continue
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                image = next(images)
                parts.append({"type": "image_url",
                              "image_url": {"url": image_data_uri(image) if data_uris else ""}})
            else:
                parts.append(part)
        messages.append({"role": message["role"], "content": parts})
    return messages


def visual_tokens(image) -> int:
    """Qwen3-VL's visual tokens for a picture: one per 32x32 pixels, plus its start and end."""
    width, height = image.size
    return (width // 32) * (height // 32) + 2


def drop_picture(request: ChatRequest, index: int) -> ChatRequest:
    """The request without its ``index``-th picture (0-based), a note in its place."""
    seen = -1
    messages = []
    for message in request.messages:
        parts = []
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "image":
                seen += 1
                if seen == index:
                    part = {"type": "text", "text": IMAGE_OMITTED}
            parts.append(part)
        messages.append({**message, "content": parts} if isinstance(message["content"], list)
                        else message)
    images = [image for i, image in enumerate(request.images) if i != index]
    return replace(request, messages=messages, images=images)


def chat_handler_class():
    from llama_cpp.llama_chat_format import MTMDChatHandler

    class Qwen3VLChatHandler(MTMDChatHandler):
        """MTMD with three changes: pictures are also read from tool messages (the environment
        returns edited images there), the template can be set explicitly, and the KV cache of
        the prompt's prefix shared with the previous call is kept (``prefix_cache``)."""

        def __init__(self, clip_model_path: str, chat_template: str | None = None,
                     prefix_cache: bool = True, **kwargs):
            super().__init__(clip_model_path=clip_model_path, **kwargs)
            self.chat_template = chat_template
            self.prefix_cache = prefix_cache
            self.prefix_store = MtmdPrefixCache()
            self.last_prefill = None  # PrefillCount of the last call (None: not counted)

        def __call__(self, *, llama, **kwargs):
            response, self.last_prefill = call_with_prefix(
                self, llama, lambda view: super(Qwen3VLChatHandler, self).__call__(llama=view, **kwargs),
                self.prefix_cache, self.prefix_store)
            return response

        def _create_bitmap_from_bytes(self, image_bytes: bytes):
            bitmap = super()._create_bitmap_from_bytes(image_bytes)
            self._mtmd_cpp.mtmd_bitmap_set_id(bitmap, image_id(image_bytes))  # the picture's identity
            return bitmap

        def _get_chat_template(self, llama_model) -> str:
            if self.chat_template:
                return self.chat_template
            embedded = llama_model.metadata.get("tokenizer.chat_template")
            return embedded if isinstance(embedded, str) and embedded else QWEN3_VL_CHAT_TEMPLATE

        @staticmethod
        def get_image_urls(messages) -> list[str]:
            urls = []
            for message in messages:
                content = message.get("content")
                if not isinstance(content, list):
                    continue
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "image_url":
                        url = part["image_url"]
                        urls.append(url["url"] if isinstance(url, dict) else url)
            return urls

    return Qwen3VLChatHandler


class ForcedTokens:
    """A llama-cpp logits processor that makes the model decode ``target`` and then stop."""

    def __init__(self, target: list[int], end_id: int) -> None:
        self.target = target
        self.end_id = end_id
        self.prompt_length: int | None = None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.prompt_length is None:
            self.prompt_length = len(input_ids)
        step = len(input_ids) - self.prompt_length
        token = self.target[step] if step < len(self.target) else self.end_id
        forced = np.full_like(scores, -1e30)
        forced[token] = 0.0
        return forced


class BudgetTokens:
    """A llama-cpp logits processor that keeps a reply within its budget (``BudgetTracker``)."""

    def __init__(self, tracker: BudgetTracker) -> None:
        self.tracker = tracker
        self.prompt_length: int | None = None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self.prompt_length is None:
            self.prompt_length = len(input_ids)
        self.tracker.observe(input_ids[self.prompt_length:].tolist())
        token = self.tracker.forced()
        if token is None:
            return scores
        forced = np.full_like(scores, -1e30)
        forced[token] = 0.0
        return forced


def _quiet_mtmd() -> None:
    """Send mtmd's logs (it prints every prompt and image slice) through llama-cpp-python's
    logger, which shows errors only unless ``verbose``."""
    import ctypes

    from llama_cpp import _logger, mtmd_cpp

    mtmd_cpp.mtmd_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


class QwenLlamaCppRuntime:
    """A resident GGUF Qwen3-VL answering chat requests one after another."""

    def __init__(self, config: LlamaCppVLMConfig) -> None:
        from llama_cpp import Llama

        for path in (config.model_path, config.mmproj_path):
            if not Path(path).is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
        self.config = config
        _quiet_mtmd()
        handler = chat_handler_class()(str(config.mmproj_path), chat_template=config.chat_template,
                                       prefix_cache=config.prefix_cache, verbose=False,
                                       use_gpu=config.use_gpu_for_vision)
        self.llm = Llama(model_path=str(config.model_path), chat_handler=handler,
                         n_ctx=config.n_ctx, n_gpu_layers=config.n_gpu_layers,
                         n_threads=config.n_threads, n_batch=config.n_batch, verbose=False)
        self.end_id = self._token_id("<|im_end|>", fallback=self.llm.token_eos())
        self.markers = {name: self._tokens(text) for name, text in (
            ("open", "<think>"), ("close", "</think>"), ("close_text", CLOSE_REASONING))}
        self.template = handler._get_chat_template(self.llm)
        self._compile_template()
        self.sampling = resolve_sampling(Path(config.model_path).parent, {
            key: getattr(config, key) for key in ("do_sample", "temperature", "top_p", "top_k",
                                                  "presence_penalty")})
        self._lock = threading.Lock()
        self.name = f"llama-cpp:{Path(config.model_path).name}"
        # name -> (llama.cpp LoRA handle, its GGUF); which set is on the context now
        self.adapters: dict[str, tuple[object, Path]] = {}
        self._applied: str | None = None

    def load_adapter(self, adapter_dir: Path, name: str | None = None) -> str:
        """Attach a LoRA adapter: a llama.cpp LoRA GGUF, or a stored adapter's folder holding
        one as ``adapter.gguf`` (``appliance retrain`` writes it beside the peft files). Returns
        the name to pass to ``chat``; the base weights stay shared by every adapter."""
        import llama_cpp

        path = Path(adapter_dir)
        gguf = path / ADAPTER_GGUF if path.is_dir() else path
        if not gguf.is_file():
            raise FileNotFoundError(
                f"no llama.cpp LoRA at {gguf}: the llama.cpp runtime needs the adapter as GGUF "
                "(appliance retrain writes adapter.gguf when the adapter is LoRA-only); use the "
                "transformers runtime for this adapter")
        name = name or path.name
        with self._lock:
            if name in self.adapters and self.adapters[name][1] == gguf.resolve():
                return name
            handle = llama_cpp.llama_adapter_lora_init(self.llm._model.model,
                                                       str(gguf).encode("utf-8"))
            if not handle:
                raise ValueError(f"llama.cpp could not load the LoRA {gguf} (is it an adapter "
                                 f"of {Path(self.config.model_path).name}?)")
            if name in self.adapters:
                self._free(name)
            self.adapters[name] = (handle, gguf.resolve())
        return name

    def _apply(self, adapter: str | None) -> None:
        """Put ``adapter`` (None: none) on the context. The KV cache was computed with the
        previous set, so the prompt cache is dropped when it changes."""
        import ctypes

        import llama_cpp

        if adapter == self._applied:
            return
        if adapter is None:
            result = llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[adapter][0])
            scales = (ctypes.c_float * 1)(1.0)
            result = llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, handles, 1, scales)
        if result:
            raise RuntimeError(f"llama.cpp could not switch to the LoRA adapter {adapter!r}")
        self.llm.chat_handler.prefix_store.forget()
        self.llm.n_tokens = 0
        self._applied = adapter

    def _free(self, name: str) -> None:
        import llama_cpp

        handle, _ = self.adapters.pop(name)
        if self._applied == name:
            self._apply(None)
        llama_cpp.llama_adapter_lora_free(handle)

    def _tokens(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def _token_id(self, text: str, fallback: int) -> int:
        ids = self._tokens(text)
        return ids[0] if len(ids) == 1 else fallback

    # The prompt, as the chat handler will render it -------------------------------------------

    def render(self, request: ChatRequest) -> str:
        """The conversation through the model's chat template, with the tools block, in the
        environment llama-cpp-python's multimodal handler renders it in (same extensions,
        filters and globals), so the two agree on what the model reads."""
        return self._compiled.render(
            messages=openai_messages(request, data_uris=False), tools=request.tools,
            add_generation_prompt=True, bos_token=self._bos, eos_token=self._eos,
            raise_exception=_raise_exception, strftime_now=self._formatter.strftime_now)

    def _compile_template(self):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._formatter = Jinja2ChatFormatter
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True,
            extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols])
        environment.filters["tojson"] = Jinja2ChatFormatter.tojson
        handler = self.llm.chat_handler
        self._bos = handler._decode_token_piece(self.llm.detokenize([self.llm.token_bos()]))
        self._eos = handler._decode_token_piece(self.llm.detokenize([self.llm.token_eos()]))
        self._compiled = environment.from_string(self.template)
        try:  # a template that cannot render fails here, at load, not in the middle of a batch
            self.render(ChatRequest([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                                    [], tools=[]))
        except Exception as exc:  # noqa: BLE001 - any template error
            raise ValueError(f"the chat template of {Path(self.config.model_path).name} cannot "
                             f"be rendered: {type(exc).__name__}: {exc}") from exc

    def prompt_tokens(self, request: ChatRequest) -> int:
        """The context the prompt takes: its text tokens plus each picture's visual tokens."""
        text = self.render(request)
        return len(self._tokens(text)) + sum(visual_tokens(image) for image in request.images)

    def fit_context(self, request: ChatRequest, reply_tokens: int) -> tuple[ChatRequest, int, str | None]:
        """The request with the oldest edited pictures left out until prompt and reply fit
        ``n_ctx``; its prompt size; and, when even that does not fit, why."""
        limit = self.config.n_ctx - reply_tokens
        needed = self.prompt_tokens(request)
        while needed > limit and len(request.images) > 2:
            request = drop_picture(request, 1)  # picture 0 is the normal photo: it stays
            needed = self.prompt_tokens(request)
        if needed > limit:
            return request, needed, (
                f"the conversation needs about {needed} tokens of context even with only the "
                f"normal photo and the latest picture, and n_ctx {self.config.n_ctx} leaves "
                f"{limit} after the reply's {reply_tokens}; raise n_ctx or lower max_pixels")
        return request, needed, None

    def chat(self, requests: Sequence[ChatRequest], *, max_new_tokens: int | None = None,
             budget: Budget | None = None, adapter: str | None = None,
             sampling: dict | None = None) -> list[ChatReply]:
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded; loaded: {sorted(self.adapters)}")
        settings = self.sampling.updated(sampling)
        return [self._one(r, max_new_tokens or self.config.max_new_tokens, budget, settings,
                          adapter) for r in requests]

    def _one(self, request: ChatRequest, max_new_tokens: int, budget: Budget | None,
             sampling, adapter: str | None = None) -> ChatReply:
        from llama_cpp import LogitsProcessorList

        request = replace(request, images=[fit_pixels(image, self.config.min_pixels,
                                                      self.config.max_pixels)
                                           for image in request.images])
        # The template decides whether its generation prompt opens the reasoning; leaving
        # pictures out to fit the context does not change that.
        opened = prompt_opens_reasoning(self.render(request))
        tracker = None
        if request.forced is not None:
            target = self._tokens(request.forced)
            processors = LogitsProcessorList([ForcedTokens(target, self.end_id)])
            max_new_tokens = max(max_new_tokens, len(target) + 1)
        elif budget is not None:
            tracker = BudgetTracker(budget, self.markers["open"], self.markers["close"],
                                    self.markers["close_text"], self.end_id,
                                    reasoning=opened, stop_ids=(self.end_id,))
            processors = LogitsProcessorList([BudgetTokens(tracker)])
            markers = len(self.markers["open"]) + len(self.markers["close_text"])
            max_new_tokens = budget.max_new_tokens(markers)
        else:
            processors = None
        request, needed, problem = self.fit_context(request, max_new_tokens)
        if problem:
            return ChatReply("", BudgetUse(prompt_tokens=needed), error=problem)
        temperature = sampling.temperature if sampling.do_sample else 0.0  # 0: greedy in llama.cpp
        with self._lock:
            self._apply(adapter)
            try:
                response = self.llm.create_chat_completion(
                    messages=openai_messages(request), tools=request.tools,
                    max_tokens=max_new_tokens, temperature=temperature, top_p=sampling.top_p,
                    top_k=sampling.top_k, min_p=0.0, repeat_penalty=1.0,
                    presence_penalty=sampling.presence_penalty, seed=request.seed,
                    logits_processor=processors, stop=["<|im_end|>"])
                count = self.llm.chat_handler.last_prefill
            except ValueError as exc:
                if "exceeds n_ctx" not in str(exc):
                    raise
                return ChatReply("", BudgetUse(prompt_tokens=needed), error=(
                    f"the conversation does not fit the model's context ({exc}); raise n_ctx "
                    "or lower max_pixels"))
        text = response["choices"][0]["message"]["content"] or ""
        usage = response.get("usage") or {}
        use = tracker.use if tracker is not None else BudgetUse(
            action_tokens=int(usage.get("completion_tokens", 0)))
        use.prompt_tokens = int(usage.get("prompt_tokens", needed))
        if count is not None:  # text plus visual tokens, as evaluated (prefix_cache)
            use.prompt_tokens, use.prefill_tokens = count.prompt_tokens, count.prefill_tokens
        else:
            use.prefill_tokens = use.prompt_tokens
        return ChatReply(finish_text(text, opened), use)

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            for name in list(getattr(self, "adapters", {})):
                self._free(name)
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()  # avoids a noisy __del__ at interpreter exit


def llamacpp_runtime(config: LlamaCppVLMConfig) -> QwenLlamaCppRuntime:
    key = ("llama-cpp", replace(config, model_path=Path(config.model_path).resolve(),
                                mmproj_path=Path(config.mmproj_path).resolve(), max_new_tokens=0))
    return shared_runtime(key, lambda: QwenLlamaCppRuntime(config))
