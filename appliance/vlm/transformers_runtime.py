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

from appliance.vlm.budget import CLOSE_REASONING, Budget, BudgetTracker, BudgetUse
from appliance.vlm.chat import (ChatReply, ChatRequest, finish_text, prompt_opens_reasoning,
                                template_messages)
from appliance.vlm.chat_template import load_chat_template
from appliance.vlm.prefix_cache import PrefixKVStore, cache_layers, prefix_key, stacked_cache
from appliance.vlm.resident import shared_runtime
from appliance.vlm.sampling import resolve_sampling

if TYPE_CHECKING:
    import torch


Quantization = Literal["none", "nf4"]
# NF4 keeps these in 16 bit: the vision tower and the output head are small and sensitive (the GPU
# memory plan counts what is quantized with the same list).
NF4_SKIP_MODULES = ("model.visual", "lm_head")


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
    max_new_tokens: int = 1024  # the cap of a reply without a budget (and the memory plan's)
    max_batch: int = 8  # conversations per generate() call
    # Sampling: None takes the checkpoint's generation_config.json, else Qwen's Thinking
    # defaults (appliance.vlm.sampling); greedy only with do_sample = False.
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    presence_penalty: float | None = None
    attn_implementation: str = "sdpa"
    # Keep the KV cache of the prompt up to the first picture (system prompt, tools, normal
    # photo) and prefill only the rest; only for generate() calls whose rows are unpadded
    # (appliance.vlm.prefix_cache). Up to max_batch prefixes stay on the device (~350 MB each on
    # Qwen3-VL-4B; the memory plan counts them). Off by default: in a batch of episodes the
    # rows are nearly always padded, so reuse seldom applies while the kept prefixes cost
    # memory; turn it on with max_batch = 1 (one episode at a time reuses it every turn).
    prefix_cache: bool = False


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


def render_chat(processor, request: ChatRequest, generation_prompt: bool = True) -> str:
    """The conversation exactly as the model reads it: the checkpoint's chat template with the
    tools block (``request.tools``), and the generation prompt for a reply. Inference and
    training (``appliance.training.sft``) both render through here, so what the policy learns
    is token for token what it is later shown."""
    return processor.apply_chat_template(template_messages(request.messages), tools=request.tools,
                                         tokenize=False, add_generation_prompt=generation_prompt)


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


def steering_processor(targets: Sequence[list[int] | None],
                       trackers: Sequence[BudgetTracker | None], prompt_length: int, end_id: int):
    """Per row: decode ``targets[b]`` then ``end_id`` (forced text), or let the model choose
    within its budget (``trackers[b]`` forces the reasoning close and the end), or decode freely."""
    import torch
    from transformers import LogitsProcessor

    class Steering(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            step = input_ids.shape[1] - prompt_length
            for row, (target, tracker) in enumerate(zip(targets, trackers)):
                if target is not None:
                    token = target[step] if step < len(target) else end_id
                elif tracker is not None:
                    tracker.observe(input_ids[row, prompt_length:].tolist())
                    token = tracker.forced()
                    if token is None:
                        continue
                else:
                    continue
                scores[row] = torch.finfo(scores.dtype).min
                scores[row, token] = 0.0
            return scores

    return Steering()


def presence_penalty_processor(penalty: float, prompt_length: int):
    """Lowers the logits of tokens the reply already holds by ``penalty`` (OpenAI's presence
    penalty, which Qwen recommends for some checkpoints; transformers has none built in)."""
    import torch
    from transformers import LogitsProcessor

    class PresencePenalty(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            generated = input_ids[:, prompt_length:]
            if generated.shape[1]:
                present = torch.zeros_like(scores, dtype=torch.bool)
                present.scatter_(1, generated, True)
                scores = scores - penalty * present.to(scores.dtype)
            return scores

    return PresencePenalty()


def _reply_length(tokens: list[int], stop_ids: Sequence[int], pad_id: int | None) -> int:
    """Tokens of a reply up to and including its stop token (the rest of the row is padding)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return index + 1
    return len([t for t in tokens if t != pad_id])


class QwenTransformersRuntime:
    """A resident Qwen3-VL model answering batches of chat requests."""

    def __init__(self, config: TransformersVLMConfig, model=None) -> None:
        """Loads the model of ``config``; or, given ``model`` (a model being trained, whose
        rollouts must come from its current weights), answers with that one as it is."""
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
                bnb_4bit_compute_dtype=self.dtype, llm_int8_skip_modules=list(NF4_SKIP_MODULES))
            kwargs["device_map"] = {"": self.device}
        elif config.quantization != "none":
            raise ValueError(f"unknown quantization {config.quantization!r}; use 'none' or 'nf4'")
        if model is None:
            model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, **kwargs)
            if config.quantization == "none":
                model = model.to(self.device)
            model = model.eval()
        self.model = model
        self.adapters: dict[str, Path] = {}
        self._lock = threading.Lock()  # one generate() at a time; adapters switch per call
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        # A turn ends at <|im_end|>; base checkpoints may also end a text with <|endoftext|>.
        self.stop_ids = [self.end_id] + [i for i in [self.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
                                         if isinstance(i, int) and i != self.tokenizer.unk_token_id]
        self.sampling = resolve_sampling(model_dir, {
            key: getattr(config, key) for key in ("do_sample", "temperature", "top_p", "top_k",
                                                  "presence_penalty")})
        ids = self.tokenizer.encode
        self.markers = {"open": ids("<think>", add_special_tokens=False),
                        "close": ids("</think>", add_special_tokens=False),
                        "close_text": ids(CLOSE_REASONING, add_special_tokens=False)}
        self.name = f"transformers:{model_dir.name}:{config.quantization}"
        self.prefixes = PrefixKVStore(max(1, config.max_batch))
        self.vision_ids = (self.tokenizer.convert_tokens_to_ids("<|vision_start|>"),
                           self.tokenizer.convert_tokens_to_ids("<|vision_end|>"))

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
            self.prefixes.clear()  # an adapter of the same name may have changed
        return name

    # Generation --------------------------------------------------------------------------------

    def render(self, request: ChatRequest) -> str:
        return render_chat(self.processor, request)

    def chat(self, requests: Sequence[ChatRequest], *, max_new_tokens: int | None = None,
             budget: Budget | None = None, adapter: str | None = None,
             sampling: dict | None = None) -> list[ChatReply]:
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded; loaded: {sorted(self.adapters)}")
        replies: list[ChatReply] = []
        step = max(1, self.config.max_batch)
        for start in range(0, len(requests), step):
            replies.extend(self._generate(requests[start:start + step],
                                          max_new_tokens or self.config.max_new_tokens, budget,
                                          adapter, self.sampling.updated(sampling)))
        return replies

    def _generate(self, requests: Sequence[ChatRequest], max_new_tokens: int,
                  budget: Budget | None, adapter: str | None, sampling) -> list[ChatReply]:
        import contextlib

        import torch
        from transformers import LogitsProcessorList

        prompts = [self.render(r) for r in requests]
        opened = [prompt_opens_reasoning(p) for p in prompts]
        images = [image for r in requests for image in r.images]
        inputs = self.processor(text=prompts, images=images or None, padding=True,
                                return_tensors="pt").to(self.device)
        prompt_length = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        processors = LogitsProcessorList()
        if sampling.do_sample and sampling.presence_penalty:
            processors.append(presence_penalty_processor(sampling.presence_penalty, prompt_length))
        targets = [self.tokenizer(r.forced, add_special_tokens=False)["input_ids"]
                   if r.forced is not None else None for r in requests]
        trackers = [None if budget is None or target is not None else BudgetTracker(
            budget, self.markers["open"], self.markers["close"], self.markers["close_text"],
            self.end_id, reasoning=opens, stop_ids=self.stop_ids)
            for target, opens in zip(targets, opened)]
        if budget is not None:
            markers = len(self.markers["open"]) + len(self.markers["close_text"])
            max_new_tokens = budget.max_new_tokens(markers)
        if any(t is not None for t in targets):
            longest = max(len(t) for t in targets if t is not None)
            max_new_tokens = max(max_new_tokens, longest + 1)
        if any(t is not None for t in targets) or any(trackers):
            processors.append(steering_processor(targets, trackers, prompt_length, self.end_id))
        sampling_args = {"do_sample": True, "temperature": sampling.temperature,
                         "top_p": sampling.top_p, "top_k": sampling.top_k} \
            if sampling.do_sample else {"do_sample": False}
        # One seed per batch (generate() samples from torch's global generator, shared by the
        # rows): reproducible for a given batch composition, which a fixed episode order gives.
        seed = int(np.random.SeedSequence([r.seed for r in requests]).generate_state(1)[0])
        with self._lock, torch.inference_mode():
            with self._adapter_scope(adapter) if self.adapters else contextlib.nullcontext():
                prefix = self._prefix_inputs(inputs, adapter) if self.config.prefix_cache else None
                reused = [0] * len(requests) if prefix is None else prefix[1]
                torch.manual_seed(seed)
                output = self.model.generate(
                    **(inputs if prefix is None else prefix[0]), max_new_tokens=max_new_tokens,
                    logits_processor=processors, eos_token_id=self.stop_ids,
                    pad_token_id=self.tokenizer.pad_token_id, **sampling_args)
        new_tokens = output[:, prompt_length:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False)
        replies = []
        for row, text in enumerate(texts):
            use = trackers[row].use if trackers[row] is not None else BudgetUse(
                action_tokens=_reply_length(new_tokens[row].tolist(), self.stop_ids,
                                            self.tokenizer.pad_token_id))
            use.prompt_tokens = int(prompt_tokens[row])
            use.prefill_tokens = use.prompt_tokens - reused[row]
            replies.append(ChatReply(finish_text(text, opened[row]), use))
        return replies

    def _prefix_inputs(self, inputs, adapter: str | None):
        """``generate`` arguments that start from the KV of each row's prefix (the prompt up to
        its first ``<|vision_end|>``), kept or computed now, and per row the prompt tokens that
        were not prefilled for this call (the prefix when it was kept, else 0); None when the
        batch does not allow it (padded rows, prefixes of different lengths, no picture)."""
        import torch

        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        grid, pixels = inputs.get("image_grid_thw"), inputs.get("pixel_values")
        if grid is None or pixels is None or not bool(mask.all()) or "mm_token_type_ids" not in inputs:
            return None  # padded rows hold their prefixes at different offsets
        start_id, end_id = self.vision_ids
        ends = [(row == end_id).nonzero() for row in input_ids]
        if any(len(e) == 0 for e in ends) or len({int(e[0]) for e in ends}) != 1:
            return None
        length = int(ends[0][0]) + 1
        if length >= input_ids.shape[1]:
            return None
        pictures = (input_ids == start_id).sum(dim=1).tolist()  # per row, in the processor's order
        if sum(pictures) != grid.shape[0]:
            return None
        patch_rows = grid.prod(dim=1).tolist()
        offsets = [0]
        for rows in patch_rows:
            offsets.append(offsets[-1] + rows)
        firsts, image = [], 0
        for count in pictures:
            firsts.append(image)
            image += count
        model = self.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        caches, reused = [], []
        for row, first in enumerate(firsts):
            picture = pixels[offsets[first]:offsets[first + 1]]
            key = prefix_key(input_ids[row, :length].tolist(), picture, adapter)
            layers = self.prefixes.get(key)
            reused.append(0 if layers is None else length)
            if layers is None:
                out = model(input_ids=input_ids[row:row + 1, :length],
                            attention_mask=mask[row:row + 1, :length],
                            mm_token_type_ids=inputs["mm_token_type_ids"][row:row + 1, :length],
                            pixel_values=picture, image_grid_thw=grid[first:first + 1],
                            use_cache=True, logits_to_keep=1)
                layers = cache_layers(out.cache if hasattr(out, "cache") else out.past_key_values)
                self.prefixes.put(key, layers)
            caches.append(layers)
        # The positions of the whole prompt, computed as generate() would without a cache.
        kwargs = {key: inputs[key] for key in ("attention_mask", "image_grid_thw", "mm_token_type_ids")}
        position_ids = base._prepare_position_ids_for_generation(input_ids, dict(kwargs))
        keep = [i for i in range(grid.shape[0]) if i not in set(firsts)]
        rest = dict(inputs)
        rest.pop("pixel_values")
        rest.pop("image_grid_thw")
        if keep:
            rest["pixel_values"] = torch.cat([pixels[offsets[i]:offsets[i + 1]] for i in keep])
            rest["image_grid_thw"] = grid[keep]
        rest["position_ids"] = position_ids
        rest["cache"] = stacked_cache(caches)
        return rest, reused

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
        self.prefixes.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def transformers_runtime(config: TransformersVLMConfig) -> QwenTransformersRuntime:
    """The resident runtime for these weights, shared by every backend that names them."""
    # Every setting but the per-call token budget shapes the loaded runtime.
    key = ("transformers", replace(config, model_dir=Path(config.model_dir).resolve(), max_new_tokens=0))
    return shared_runtime(key, lambda: QwenTransformersRuntime(config))
