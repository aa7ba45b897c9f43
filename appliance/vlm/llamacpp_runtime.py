"""Qwen3-VL through llama-cpp-python: a GGUF language model plus its mmproj vision projector.

For CPU boxes and small GPUs. The conversation is rendered with the same Qwen3-VL chat template
as the transformers backend (the one embedded in the GGUF, or ours), and llama.cpp's multimodal
library (mtmd) puts each picture where the template has its placeholder, wrapped in Qwen's
vision start/end tokens, so the model reads the same token sequence either way.

Build llama-cpp-python with ``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir
llama-cpp-python``: a native build enables AMX on recent Xeons and quantized models then crash.
llama.cpp decodes one conversation at a time; requests of a batch run one after another.
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from appliance.vlm.chat import ChatRequest, template_messages
from appliance.vlm.chat_template import QWEN3_VL_CHAT_TEMPLATE
from appliance.vlm.resident import shared_runtime


@dataclass(frozen=True)
class LlamaCppVLMConfig:
    model_path: Path  # the language model GGUF
    mmproj_path: Path  # the vision projector GGUF
    n_ctx: int = 16384  # the system prompt alone is ~2k tokens; each picture adds its tokens
    n_gpu_layers: int = -1  # all layers on the GPU when llama.cpp was built with one; else CPU
    n_threads: int | None = None  # None: llama.cpp's default
    n_batch: int = 512
    chat_template: str | None = None  # None: the GGUF's own template, else the vendored one
    max_new_tokens: int = 1024
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    use_gpu_for_vision: bool = True


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


def openai_messages(request: ChatRequest) -> list[dict]:
    """The request in the OpenAI-style form llama-cpp-python takes: pictures as data URIs."""
    images = iter(request.images)
    messages = []
    for message in template_messages(request.messages):
        if isinstance(message["content"], str):
            messages.append(message)
            continue
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": image_data_uri(next(images))}})
            else:
                parts.append(part)
        messages.append({"role": message["role"], "content": parts})
    return messages


def chat_handler_class():
    from llama_cpp.llama_chat_format import MTMDChatHandler

    class Qwen3VLChatHandler(MTMDChatHandler):
        """MTMD with two changes: pictures are also read from tool messages (the environment
        returns edited images there), and the template can be set explicitly."""

        def __init__(self, clip_model_path: str, chat_template: str | None = None, **kwargs):
            super().__init__(clip_model_path=clip_model_path, **kwargs)
            self.chat_template = chat_template

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
                                       verbose=False, use_gpu=config.use_gpu_for_vision)
        self.llm = Llama(model_path=str(config.model_path), chat_handler=handler,
                         n_ctx=config.n_ctx, n_gpu_layers=config.n_gpu_layers,
                         n_threads=config.n_threads, n_batch=config.n_batch, verbose=False)
        self.end_id = self._token_id("<|im_end|>", fallback=self.llm.token_eos())
        self._lock = threading.Lock()
        self.name = f"llama-cpp:{Path(config.model_path).name}"

    def _token_id(self, text: str, fallback: int) -> int:
        ids = self.llm.tokenize(text.encode(), add_bos=False, special=True)
        return ids[0] if len(ids) == 1 else fallback

    def chat(self, requests: Sequence[ChatRequest], *, max_new_tokens: int | None = None,
             adapter: str | None = None) -> list[str]:
        if adapter is not None:
            raise ValueError("the llama.cpp backend runs without LoRA adapters; merge the adapter "
                             "into the GGUF or use the transformers backend")
        return [self._one(r, max_new_tokens or self.config.max_new_tokens) for r in requests]

    def _one(self, request: ChatRequest, max_new_tokens: int) -> str:
        from llama_cpp import LogitsProcessorList

        processors = None
        if request.forced is not None:
            target = self.llm.tokenize(request.forced.encode("utf-8"), add_bos=False, special=True)
            processors = LogitsProcessorList([ForcedTokens(list(target), self.end_id)])
            max_new_tokens = max(max_new_tokens, len(target) + 1)
        with self._lock:
            response = self.llm.create_chat_completion(
                messages=openai_messages(request), max_tokens=max_new_tokens,
                temperature=self.config.temperature, top_p=self.config.top_p,
                top_k=self.config.top_k, min_p=0.0, repeat_penalty=1.0, seed=request.seed,
                logits_processor=processors, stop=["<|im_end|>"])
        return response["choices"][0]["message"]["content"] or ""

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()  # avoids a noisy __del__ at interpreter exit


def llamacpp_runtime(config: LlamaCppVLMConfig) -> QwenLlamaCppRuntime:
    key = ("llama-cpp", replace(config, model_path=Path(config.model_path).resolve(),
                                mmproj_path=Path(config.mmproj_path).resolve(), max_new_tokens=0))
    return shared_runtime(key, lambda: QwenLlamaCppRuntime(config))
