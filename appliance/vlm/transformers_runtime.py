"""Qwen3-VL through transformers: bf16 on a GPU or bitsandbytes 4-bit NF4, optional LoRA.

Loads once from a local folder (``HF_HUB_OFFLINE=1`` is set by ``import appliance``) and answers
many conversations per call with left-padded batched generation. torchvision is not available on
the appliance, so the processor is image-only: Qwen3-VL's processor without its video slot, with
the PIL image processor.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from appliance.vlm.chat import ChatRequest, template_messages
from appliance.vlm.chat_template import load_chat_template
from appliance.vlm.resident import shared_runtime

if TYPE_CHECKING:
    import torch


Quantization = Literal["none", "nf4"]


@dataclass(frozen=True)
class TransformersVLMConfig:
    model_dir: Path
    quantization: Quantization = "none"  # "nf4": bitsandbytes 4-bit, double-quantized
    device: str = "auto"  # "auto" (cuda when available), "cuda", "cuda:1", "cpu"
    dtype: str = "auto"  # "auto" (bfloat16 on cuda, float32 on cpu), "bfloat16", "float16", "float32"
    # Pixels per image after resizing; bounds the visual tokens (one per 32x32 px on Qwen3-VL).
    # max_pixels only lowers the checkpoint's own limit; None keeps the checkpoint's limits.
    min_pixels: int | None = None
    max_pixels: int | None = 640 * 640
    max_new_tokens: int = 1024
    max_batch: int = 8  # conversations per generate() call
    do_sample: bool = True  # Qwen advises against greedy decoding for its thinking models
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    attn_implementation: str = "sdpa"


def transformers_config(model_dir: Path, settings: dict) -> tuple[TransformersVLMConfig, Path | None]:
    """Config and LoRA adapter folder from a models-manifest entry's ``settings`` table.

    Keys are the config's fields plus ``adapter`` (a folder, relative to the model's or absolute);
    an unknown key is an error, so a typo never silently runs the defaults.
    """
    settings = dict(settings)
    adapter = settings.pop("adapter", None)
    allowed = {f.name for f in fields(TransformersVLMConfig)} - {"model_dir"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise ValueError(f"unknown transformers VLM setting(s) {unknown}; allowed: "
                         f"{sorted(allowed | {'adapter'})}")
    model_dir = Path(model_dir)
    adapter_dir = None if adapter in (None, "") else model_dir / Path(adapter)  # absolute stays absolute
    return TransformersVLMConfig(model_dir, **settings), adapter_dir


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> "torch.dtype":
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def image_only_processor_class():
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3-VL's processor without the video processor, which needs torchvision."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer,
                             video_processor=None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen3VLProcessor


def load_processor(model_dir: Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """Tokenizer (left padding, for batched generation), PIL image processor and template."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
    if min_pixels is not None or max_pixels is not None:
        size = dict(image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:  # a cap: never above the checkpoint's own limit
            size["longest_edge"] = max(min(max_pixels, size.get("longest_edge", max_pixels)),
                                       size.get("shortest_edge", 0))
        image_processor.size = size
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=load_chat_template(model_dir))


def forced_logits_processor(targets: Sequence[list[int] | None], prompt_length: int, end_id: int):
    """Makes row b decode ``targets[b]`` then ``end_id``; rows with None decode freely."""
    import torch
    from transformers import LogitsProcessor

    class ForcedContinuation(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            step = input_ids.shape[1] - prompt_length
            for row, target in enumerate(targets):
                if target is None:
                    continue
                token = target[step] if step < len(target) else end_id
                scores[row] = torch.finfo(scores.dtype).min
                scores[row, token] = 0.0
            return scores

    return ForcedContinuation()


class QwenTransformersRuntime:
    """A resident Qwen3-VL model answering batches of chat requests."""

    def __init__(self, config: TransformersVLMConfig) -> None:
        from transformers import Qwen3VLForConditionalGeneration

        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        model_dir = Path(config.model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no transformers model folder at {model_dir} (config.json missing)")
        self.processor = load_processor(model_dir, config.min_pixels, config.max_pixels)
        self.tokenizer = self.processor.tokenizer
        kwargs: dict = {"dtype": self.dtype, "local_files_only": True,
                        "attn_implementation": config.attn_implementation}
        if config.quantization == "nf4":
            from transformers import BitsAndBytesConfig

            # The vision tower and the output head are small and sensitive: keep them in 16 bit.
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=self.dtype, llm_int8_skip_modules=["model.visual", "lm_head"])
            kwargs["device_map"] = {"": self.device}
        elif config.quantization != "none":
            raise ValueError(f"unknown quantization {config.quantization!r}; use 'none' or 'nf4'")
        model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, **kwargs)
        if config.quantization == "none":
            model = model.to(self.device)
        self.model = model.eval()
        self.adapters: dict[str, Path] = {}
        self._lock = threading.Lock()  # one generate() at a time; adapters switch per call
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        # A turn ends at <|im_end|>; base checkpoints may also end a text with <|endoftext|>.
        self.stop_ids = [self.end_id] + [i for i in [self.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
                                         if isinstance(i, int) and i != self.tokenizer.unk_token_id]
        self.name = f"transformers:{model_dir.name}:{config.quantization}"

    # Adapters ----------------------------------------------------------------------------------

    def load_adapter(self, adapter_dir: Path, name: str | None = None) -> str:
        """Attach a LoRA adapter (a peft folder); returns the name to pass to ``chat``."""
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter at {adapter_dir} (adapter_config.json missing)")
        name = name or adapter_dir.name
        with self._lock:
            if self.adapters.get(name) == adapter_dir:
                return name
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter_dir), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name).eval()
            self.adapters[name] = adapter_dir
        return name

    # Generation --------------------------------------------------------------------------------

    def render(self, request: ChatRequest) -> str:
        return self.processor.apply_chat_template(template_messages(request.messages),
                                                  tokenize=False, add_generation_prompt=True)

    def chat(self, requests: Sequence[ChatRequest], *, max_new_tokens: int | None = None,
             adapter: str | None = None) -> list[str]:
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded; loaded: {sorted(self.adapters)}")
        texts: list[str] = []
        step = max(1, self.config.max_batch)
        for start in range(0, len(requests), step):
            texts.extend(self._generate(requests[start:start + step],
                                        max_new_tokens or self.config.max_new_tokens, adapter))
        return texts

    def _generate(self, requests: Sequence[ChatRequest], max_new_tokens: int,
                  adapter: str | None) -> list[str]:
        import contextlib

        import torch
        from transformers import LogitsProcessorList

        prompts = [self.render(r) for r in requests]
        images = [image for r in requests for image in r.images]
        inputs = self.processor(text=prompts, images=images or None, padding=True,
                                return_tensors="pt").to(self.device)
        prompt_length = inputs["input_ids"].shape[1]
        processors = LogitsProcessorList()
        targets = [self.tokenizer(r.forced, add_special_tokens=False)["input_ids"]
                   if r.forced is not None else None for r in requests]
        if any(t is not None for t in targets):
            longest = max(len(t) for t in targets if t is not None)
            max_new_tokens = max(max_new_tokens, longest + 1)
            processors.append(forced_logits_processor(targets, prompt_length, self.end_id))
        sampling = {"do_sample": True, "temperature": self.config.temperature,
                    "top_p": self.config.top_p, "top_k": self.config.top_k} \
            if self.config.do_sample else {"do_sample": False}
        # One seed per batch (generate() samples from torch's global generator, shared by the
        # rows): reproducible for a given batch composition, which a fixed episode order gives.
        seed = int(np.random.SeedSequence([r.seed for r in requests]).generate_state(1)[0])
        with self._lock, torch.inference_mode():
            with self._adapter_scope(adapter) if self.adapters else contextlib.nullcontext():
                torch.manual_seed(seed)
                output = self.model.generate(
                    **inputs, max_new_tokens=max_new_tokens, logits_processor=processors,
                    eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
                    **sampling)
        new_tokens = output[:, prompt_length:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)

    def _adapter_scope(self, adapter: str | None):
        import contextlib

        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def close(self) -> None:
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def transformers_runtime(config: TransformersVLMConfig) -> QwenTransformersRuntime:
    """The resident runtime for these weights, shared by every backend that names them."""
    # Every setting but the per-call token budget shapes the loaded runtime.
    key = ("transformers", replace(config, model_dir=Path(config.model_dir).resolve(), max_new_tokens=0))
    return shared_runtime(key, lambda: QwenTransformersRuntime(config))
