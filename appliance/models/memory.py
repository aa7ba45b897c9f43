"""A GPU memory budget for the engine: estimate what the chosen models need, change settings to fit.

Everything here is an estimate from the manifest (weight file sizes and ``settings``) and a few
constants, not a measurement on the GPU. "GB" means GiB (2**30 bytes), as in
``bench/gpu_pipeline.py`` and nvidia-smi. The peak is modelled as

    CUDA context + everything resident + 1.1 x the largest torch working set

because the agent loop calls one model at a time and torch's caching allocator reuses one
model's freed activations for the next (the 10 % is for fragmentation). onnxruntime and llama.cpp
keep their own arenas, so their working memory counts as resident.

Constants (bf16/fp16 unless said; ``bench/gpu_pipeline.py`` has the published configs):

* KV cache of Qwen3-VL 4B and 8B: 36 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes = 144 KiB
  per token (published config.json; both sizes share these numbers).
* Prefill activations of one Qwen3-VL decoder layer: 96 KiB per token; measured on CPU as peak
  RSS of a one-layer full-width model (~190 KiB/token in fp32, halved for bf16).
* Prompt tokens per call (the benchmark's TokenPlan: a 3-attempt episode, 640x640 images at
  ~402 tokens each): policy 6,150, prompt generation 850, quality evaluation 1,300; plus, for
  the cache at the end of decoding, the longest reply: ``max_new_tokens`` or the role's budget
  (reasoning + close + action + end, ``appliance.vlm.budget``), whichever is larger.
* Kept prefixes (transformers with ``prefix_cache``, ``appliance.vlm.prefix_cache``): up to
  ``max_batch`` prefixes (system prompt, tools block and the first picture) stay resident, each
  ~2,400 tokens of KV (the system prompt and the tools block ~1.9k tokens by character count at
  ~3.8 characters per token, a 640x640 picture ~400), rounded up: not measured on a real tokenizer.
* NF4 (bitsandbytes, double quantization): 0.516 bytes per quantized weight (4 bits plus an
  8-bit scale per 64 weights and an fp32 scale per 256 scales). What is quantized is counted, not
  assumed (``nf4_linear_share``): the model is built from its own ``config.json`` on torch's meta
  device (no weights, no download) and the weights of every ``nn.Linear`` that transformers
  would convert are counted, by transformers' own rule (``should_convert_module`` with the
  appliance's skip list ``NF4_SKIP_MODULES``, the vision tower and ``lm_head``, plus the model's
  ``_keep_in_fp32_modules``). The rest (embeddings, norms, biases, the vision tower, the output
  head) stays in the compute dtype. For Qwen3-VL-4B the published config gives 81.9 % quantized
  (the vision tower is 9.4 % and the tied embedding 8.8 %), so NF4 is ~0.39 x the bf16 size.
  Without a config.json at hand (an entry not yet pulled) or without transformers,
  ``NF4_LINEAR_SHARE_FALLBACK``, that 4B figure, is used; ``tests/test_memory_plan.py``
  recomputes it from the published config.
* Diffusion, per painted pixel (the denoiser runs the whole batch at once; the VAE decodes one
  image at a time because the backend enables VAE slicing):
  SDXL's VAE config sets force_upcast, so it decodes in fp32 at ~3,900 B/px; its UNet needs
  ~512 B/px for the two CFG samples (the fp32 figure, kept as margin); the Flux VAE decodes in
  bf16 at ~1,950 B/px and its transformer needs ~384 B/px (96 KiB per 16x16 px token). All are
  CPU peak-RSS measurements of the published architectures in fp32 at 256-512 px, scaled by
  area; stable-diffusion.cpp reports a similar 2.5 GB fp16 VAE buffer at 1024 px.
* MetaUAS at 256 px: 80 MiB per image pair (CPU measurement, fp32), 16 pairs per call.
* llama.cpp: the f16 KV cache for all of ``n_ctx`` is allocated at load, plus ~0.5 GiB of
  compute buffers; 36 layers (Qwen3-VL 4B/8B) share the model weights and cache evenly.
* CUDA context, cuBLAS/cuDNN handles and onnxruntime's CUDA provider: 1 GiB.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath

from appliance.models.manifest import FileEntry, ModelEntry
from appliance.vlm.budget import ROLE_BUDGETS, role_budget
from appliance.vlm.transformers_runtime import NF4_SKIP_MODULES

GIB = 1024 ** 3
KIB = 1024
CUDA_CONTEXT = 1.0 * GIB
FRAGMENTATION = 1.10
QWEN_KV_PER_TOKEN = 144 * KIB
QWEN_ACT_PER_TOKEN = 96 * KIB
PROMPT_TOKENS = {"policy": 6150, "prompt_gen": 850, "quality_eval": 1300}
PREFIX_TOKENS = 2400
NF4_BYTES = 0.516
# NF4_SKIP_MODULES: what the runtime's NF4 loader keeps in 16 bit (appliance.vlm.transformers_runtime).

# nf4_linear_share of the published Qwen3-VL-4B config.json: used when no config.json is at hand.
NF4_LINEAR_SHARE_FALLBACK = 0.819
DENOISER_B_PER_PX = {"sdxl-inpaint": 512, "flux-fill": 384}
VAE_B_PER_PX = {"sdxl-inpaint": 3900, "flux-fill": 1950}
DENOISERS = ("unet", "transformer")
METAUAS_PAIR, METAUAS_BATCH = 80 * 1024 ** 2, 16
LLAMA_LAYERS, LLAMA_COMPUTE = 36, 0.5 * GIB
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1,
               "F8_E5M2": 1, "float32": 4, "float16": 2, "bfloat16": 2}
WEIGHTS = {"transformers": (".safetensors", ".bin"), "diffusers": (".safetensors", ".bin"),
           "gguf": (".gguf",), "onnx": (".onnx", ".onnx.data", ".onnx_data")}


def setting(config_class, settings: Mapping, name: str):
    """``settings[name]`` or the backend's own default for it."""
    if name in settings:
        return settings[name]
    default = next(f for f in fields(config_class) if f.name == name)
    return default.default if default.default is not MISSING else default.default_factory()


def weight_files(entry: ModelEntry, settings: Mapping) -> list[FileEntry]:
    """The files the backend loads: weights of the chosen variant, safetensors before .bin."""
    suffixes = WEIGHTS.get(entry.format, ())
    files = [f for f in entry.files if f.path.endswith(suffixes)]
    if entry.format == "diffusers":  # components live in sub-folders; a root file is a copy
        files = [f for f in files if "/" in f.path]
    if entry.format == "gguf" and (named := {settings.get("model"), settings.get("mmproj")} - {None}):
        files = [f for f in files if f.path in named]
    variant = settings.get("variant")
    chosen = []
    for folder in sorted({str(PurePosixPath(f.path).parent) for f in files}):
        group = [f for f in files if str(PurePosixPath(f.path).parent) == folder]
        tagged = [f for f in group if _variant(f.path) == variant]
        group = tagged or group
        for suffix in suffixes:  # the first format present wins (safetensors over .bin)
            if same := [f for f in group if f.path.endswith(suffix)]:
                chosen += same if suffix != ".onnx" else group
                break
    return chosen


def _variant(path: str) -> str | None:
    parts = PurePosixPath(path).name.split(".")
    return next((p for p in parts[1:-1] if p in ("fp16", "bf16", "fp32")), None)


def stored_bytes_per_weight(entry: FileEntry, folder: Path | None) -> float:
    """From the safetensors header when the file is at hand, else its variant tag, else 2."""
    path = folder / entry.path if folder else None
    if path is not None and path.suffix == ".safetensors" and path.is_file():
        with path.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        sizes = [(t["data_offsets"][1] - t["data_offsets"][0], DTYPE_BYTES.get(t["dtype"], 2))
                 for k, t in header.items() if k != "__metadata__"]
        count = sum(n / b for n, b in sizes)
        return sum(n for n, _ in sizes) / count if count else 2.0
    return {"fp32": 4.0}.get(_variant(entry.path) or "", 2.0)


def qwen_per_token(folder: Path | None) -> tuple[float, float]:
    """(KV cache, prefill activation) bytes per token: from the model's own config.json when it
    is at hand (layers x KV heads x head size), else Qwen3-VL-4B's published figures."""
    path = folder / "config.json" if folder else None
    if path is None or not path.is_file():
        return QWEN_KV_PER_TOKEN, QWEN_ACT_PER_TOKEN
    text = json.loads(path.read_text()).get("text_config", {})
    try:
        layers, heads = text["num_hidden_layers"], text["num_key_value_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        hidden = text["hidden_size"]
    except KeyError:
        return QWEN_KV_PER_TOKEN, QWEN_ACT_PER_TOKEN
    # The activation figure was measured on one 2,560-wide layer; it scales with the width.
    return layers * heads * head_dim * 2 * 2, QWEN_ACT_PER_TOKEN * hidden / 2560


def nf4_linear_share(folder: Path | None) -> float:
    """Share of the model's parameters that NF4 loading quantizes, from ``folder/config.json``.

    Counted on the model built from that config (``nf4_linear_share_of_config``); without the
    file, with an unreadable one, or where the installed transformers cannot build it as
    Qwen3-VL (or lacks the helpers), ``NF4_LINEAR_SHARE_FALLBACK`` (Qwen3-VL-4B's figure)."""
    path = folder / "config.json" if folder else None
    if path is None or not path.is_file():
        return NF4_LINEAR_SHARE_FALLBACK
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return NF4_LINEAR_SHARE_FALLBACK
    try:
        return nf4_linear_share_of_config(json.dumps(config, sort_keys=True))
    except (ImportError, ValueError, KeyError, TypeError, AttributeError):
        return NF4_LINEAR_SHARE_FALLBACK


@functools.lru_cache(maxsize=32)
def nf4_linear_share_of_config(config_json: str) -> float:
    """Quantized weights / all parameters of the Qwen3-VL described by ``config_json`` (a
    config.json's text), as transformers' bitsandbytes 4-bit loading with ``NF4_SKIP_MODULES``
    converts it: built on the meta device, so it takes no memory and well under a second after
    the imports. Cached per config text."""
    import torch
    from torch import nn
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = Qwen3VLConfig.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    # transformers' bitsandbytes quantizer skips llm_int8_skip_modules plus _keep_in_fp32_modules
    # and converts only modules whose type is exactly nn.Linear; a converted layer's bias stays
    # in 16 bit. parameters() counts a tied embedding/lm_head once, as the weight files store it.
    skip = list(NF4_SKIP_MODULES) + sorted(getattr(model, "_keep_in_fp32_modules", None) or ())
    quantized = sum(module.weight.numel() for name, module in model.named_modules()
                    if type(module) is nn.Linear and should_convert_module(name, skip))
    total = sum(p.numel() for p in model.parameters())
    return quantized / total


@dataclass
class ModelEstimate:
    name: str
    roles: tuple[str, ...]
    backend: str
    resident: float  # bytes on the GPU between calls
    working: float  # bytes added while it runs (torch models; 0 for the others)
    known: bool  # every weight file's size is in the manifest
    overrides: dict = field(default_factory=dict)


def estimate(entry: ModelEntry, roles: tuple[str, ...], overrides: Mapping | None = None,
             folder: Path | None = None) -> ModelEstimate:
    """GPU bytes of one model with its manifest settings plus ``overrides``."""
    from appliance.tools.image_gen.diffusers_inpaint import KINDS, InpaintSettings
    from appliance.vlm.llamacpp_runtime import LlamaCppVLMConfig
    from appliance.vlm.transformers_runtime import TransformersVLMConfig

    overrides = dict(overrides or {})
    settings = {**entry.settings, **overrides}
    files = weight_files(entry, settings)
    known = bool(files) and all(f.size is not None for f in files)
    stored = {f.path: (f.size or 0, stored_bytes_per_weight(f, folder)) for f in files}
    backend = entry.backends[roles[0]]
    resident = working = 0.0
    if entry.format == "transformers":
        params = sum(size / per for size, per in stored.values())
        run = DTYPE_BYTES.get(setting(TransformersVLMConfig, settings, "dtype"), 2)
        if setting(TransformersVLMConfig, settings, "quantization") == "nf4":
            share = nf4_linear_share(folder)
            resident = params * (share * NF4_BYTES + (1 - share) * run)
        else:
            resident = params * run
        batch = setting(TransformersVLMConfig, settings, "max_batch")
        # A reply is capped by max_new_tokens without a budget and by its role's budget with one
        # (appliance.vlm.budget; <think> and the forced close are 4 tokens on Qwen, 5 counted).
        new = max([setting(TransformersVLMConfig, settings, "max_new_tokens")] + [
            role_budget(role, settings.get("roles", {}).get(role)).max_new_tokens(5)
            for role in roles if role in ROLE_BUDGETS])
        prompt = max(PROMPT_TOKENS.get(role, 0) for role in roles)
        kv, act = qwen_per_token(folder)
        working = batch * max(prompt * (kv + act), (prompt + new) * kv)
        if setting(TransformersVLMConfig, settings, "prefix_cache"):
            resident += batch * PREFIX_TOKENS * kv  # the kept prefixes (appliance.vlm.prefix_cache)
    elif entry.format == "diffusers":
        kind = KINDS.get(backend)
        config = InpaintSettings(**{**(asdict(kind.defaults) if kind else {}), **settings})
        run = DTYPE_BYTES.get(config.dtype or (kind.gpu_dtype if kind else "float16"), 2)
        parts: dict[str, float] = {}
        for path, (size, per) in stored.items():
            part = path.split("/")[0]
            parts[part] = parts.get(part, 0.0) + size / per * run
        pixels = config.max_batch * config.resolution ** 2
        # The VAE decodes one image at a time (the backend enables VAE slicing).
        act = {p: (pixels * DENOISER_B_PER_PX.get(backend, 512) if p in DENOISERS else
                   config.resolution ** 2 * VAE_B_PER_PX.get(backend, 3900) if p == "vae" else 0)
               for p in parts}
        if config.offload:  # model CPU offload: only the running component is on the GPU
            working = max((parts[p] + act[p] for p in parts), default=0.0)
        else:
            resident, working = sum(parts.values()), max(act.values(), default=0.0)
    elif entry.format == "gguf":
        layers = setting(LlamaCppVLMConfig, settings, "n_gpu_layers")
        share = 1.0 if layers < 0 else min(layers, LLAMA_LAYERS) / LLAMA_LAYERS
        vision = setting(LlamaCppVLMConfig, settings, "use_gpu_for_vision")
        mmproj = sum(s for p, (s, _) in stored.items() if "mmproj" in p.lower())
        model = sum(s for s, _ in stored.values()) - mmproj
        cache = setting(LlamaCppVLMConfig, settings, "n_ctx") * QWEN_KV_PER_TOKEN
        resident = share * (model + cache) + (mmproj if vision else 0) + LLAMA_COMPUTE
    elif entry.format == "onnx":
        side = settings.get("input_size", 256)
        resident = sum(s for s, _ in stored.values()) + METAUAS_BATCH * METAUAS_PAIR * (side / 256) ** 2
    return ModelEstimate(entry.name, roles, backend, resident, working, known, overrides)


def peak(models: list[ModelEstimate]) -> float:
    if not models:
        return 0.0
    return (CUDA_CONTEXT + sum(m.resident for m in models)
            + FRAGMENTATION * max((m.working for m in models), default=0.0))


def gb(value: float) -> str:
    return f"{value / GIB:.1f} GB"


@dataclass
class MemoryPlan:
    budget_gb: float
    before: list[ModelEstimate]  # with the manifest's settings
    after: list[ModelEstimate]  # with the plan's overrides
    fits: bool
    message: str
    before_gb: float = field(init=False)  # estimated peaks
    after_gb: float = field(init=False)

    def __post_init__(self) -> None:
        self.before_gb, self.after_gb = peak(self.before) / GIB, peak(self.after) / GIB

    @property
    def overrides(self) -> dict[str, dict]:
        """{entry name: {setting: value}} to lay over each entry's manifest ``settings``."""
        return {m.name: dict(m.overrides) for m in self.after if m.overrides}

    def settings(self, entry: ModelEntry) -> dict:
        return {**entry.settings, **self.overrides.get(entry.name, {})}

    def lines(self) -> list[str]:
        rows = [f"GPU memory: {self.after_gb:.1f} of {self.budget_gb:.1f} GB (before changes "
                + f"{self.before_gb:.1f} GB) - {self.message}"]
        for old, new in zip(self.before, self.after):
            now = f"{gb(old.resident)} + {gb(old.working)} while running"
            if new.overrides:
                changes = ", ".join(f"{k}={v}" for k, v in new.overrides.items())
                now += f" -> {gb(new.resident)} + {gb(new.working)}: {changes}"
            size = "" if new.known else " (weight sizes unknown: not counted)"
            rows.append(f"  {new.name:<24} {'+'.join(new.roles):<28} {now}{size}")
        return rows

    def as_dict(self) -> dict:
        """For JSON logs: byte counts in GB, rounded."""
        def row(m: ModelEstimate) -> dict:
            return {**asdict(m), "resident": round(m.resident / GIB, 2),
                    "working": round(m.working / GIB, 2)}

        return {"budget_gb": self.budget_gb, "before_gb": round(self.before_gb, 2),
                "after_gb": round(self.after_gb, 2), "fits": self.fits, "message": self.message,
                "before": [row(m) for m in self.before], "after": [row(m) for m in self.after]}


def plan_memory(models: Mapping[str, ModelEntry], budget_gb: float, device: str = "cuda",
                models_dir: Path | None = None) -> MemoryPlan:
    """What to change so the models serving ``models`` (role -> entry) fit in ``budget_gb``.

    Changes, in this order, each only while the total is over budget: (1) diffusion pipelines
    to model CPU offload; (2) transformers VLMs to NF4, largest first; (3) halve ``max_batch``
    of the model with the largest working set (diffusion or VLM), down to 1; (4) llama.cpp
    models keep fewer layers on the GPU (``n_gpu_layers``: by far the slowest, so last).
    ``models_dir`` (optional) lets the estimate read dtypes from the safetensors headers.
    """
    from appliance.tools.image_gen.diffusers_inpaint import InpaintSettings
    from appliance.vlm.llamacpp_runtime import LlamaCppVLMConfig
    from appliance.vlm.transformers_runtime import TransformersVLMConfig

    if device == "cpu" or not models:
        return MemoryPlan(budget_gb, [], [], True, "no model runs on a GPU")
    roles: dict[str, list[str]] = {}
    entries: dict[str, ModelEntry] = {}
    for role, entry in models.items():  # one estimate per entry: shared weights load once
        roles.setdefault(entry.name, []).append(role)
        entries[entry.name] = entry
    configs = {"diffusers": InpaintSettings, "transformers": TransformersVLMConfig,
               "gguf": LlamaCppVLMConfig}

    def change(name: str, **overrides) -> None:
        folder = Path(models_dir) / name if models_dir else None
        old = plan[name].overrides if name in plan else {}
        plan[name] = estimate(entries[name], tuple(roles[name]), {**old, **overrides}, folder)

    def value(name: str, key: str):
        return setting(configs[entries[name].format],
                       {**entries[name].settings, **plan[name].overrides}, key)

    def over() -> bool:
        return peak(list(plan.values())) > budget_gb * GIB

    def of_format(fmt: str) -> list[str]:
        return sorted((n for n in entries if entries[n].format == fmt),
                      key=lambda n: -(plan[n].resident + plan[n].working))

    plan: dict[str, ModelEstimate] = {}
    for name in entries:
        change(name)
    before = list(plan.values())
    for name in of_format("diffusers"):
        if over() and not value(name, "offload"):
            change(name, offload=True)
    for name in of_format("transformers"):
        if over() and value(name, "quantization") == "none":
            change(name, quantization="nf4")
    while over() and (batched := [n for n in entries if entries[n].format in
                                  ("diffusers", "transformers") and value(n, "max_batch") > 1]):
        name = max(batched, key=lambda n: plan[n].working)
        change(name, max_batch=value(name, "max_batch") // 2)
    for name in of_format("gguf"):
        layers = value(name, "n_gpu_layers")
        layers = LLAMA_LAYERS if layers < 0 else min(layers, LLAMA_LAYERS)
        while over() and layers > 0:
            layers -= 1
            change(name, n_gpu_layers=layers)
    after = list(plan.values())
    if not over():
        message = "fits" + (" after the changes below" if any(m.overrides for m in after) else "")
    else:
        top = sorted(after, key=lambda m: -(m.resident + m.working))[:3]
        message = (f"does not fit in {budget_gb:.1f} GB even after every change (needs about "
                   f"{peak(after) / GIB:.1f} GB); biggest: " + ", ".join(
                       f"{m.name} ({gb(m.resident)} resident + {gb(m.working)} while running)"
                       for m in top))
    return MemoryPlan(budget_gb, before, after, not over(), message)
