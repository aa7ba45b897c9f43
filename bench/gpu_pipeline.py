#!/usr/bin/env python
"""GPU engine benchmark on full-size architectures with random weights (nothing downloaded).

Builds, from their published configurations written below, and loads through the appliance's
own loaders:
* Qwen3-VL-4B (policy, and a second copy for prompt generation and judging unless
  ``--shared-vlm``): random weights saved as a model folder (with the tiny kit's tokenizer and
  processor files) and loaded by ``QwenTransformersRuntime``, the appliance's runtime, so NF4
  skips exactly what the product skips (``llm_int8_skip_modules``: the vision tower, lm_head);
* SDXL inpainting (UNet with 9 input channels, both CLIP text encoders, the SDXL VAE) and/or Flux
  Fill (the 12B transformer with 384 input channels, T5-XXL, CLIP-L, the Flux VAE), each built in
  memory and handed to the appliance's ``DiffusersInpaintGenerator`` through its own loading code
  (``_load``: dtype, VAE slicing as the product sets it, offload, device; only ``from_pretrained``
  is answered from memory), then run through its placement, crop and blend;
* MetaUAS at 256 px exported to ONNX by ``appliance.models.metauas_export`` and run by the
  appliance's ``MetaUASMaskGenerator`` (CUDA provider when onnxruntime-gpu is installed);
* FAISS knowledge retrieval as shipped (0 s when its embedder is not installed).

It times the model calls an episode makes (policy turns with growing context, PG, IG, QE, KR,
MG) at batch 1 and at ``--batch``, then reports seconds per episode at 1, 2 and 3 image
generation attempts and episodes per hour when ``--batch`` episodes step together (one batched
call per tool). Random weights decode forced token counts (``min_new_tokens =
max_new_tokens``), so the timing matches a real model writing that much. Every stage (building,
warm-up, each tool at each batch size) prints its wall time and peak memory: torch's peak
allocated and reserved GPU memory (reset per stage) and the device's use (onnxruntime included),
or on CPU the process's peak RSS (reset per stage where Linux allows). Each engine also prints
the peak that ``appliance/models/memory.py`` plans for the same models and settings.

Budget: one generator finishes in under 8 minutes on one H100/H200, so a lent device session
can run it. For that, by default only ``--policy-samples`` (3) of the 12 distinct policy
contexts are measured and the others interpolated linearly in prompt tokens (``0`` measures
every one); ``--budget-minutes`` (8 per generator, counted from the start) stops taking new
measurements when spent, and what was skipped is reported as not measured.

    python bench/gpu_pipeline.py --ig sdxl --out bench/results/h200-sdxl.json
    python bench/gpu_pipeline.py --tiny      # the same stages on tiny configs on CPU, ~30 s

Refuses to run without CUDA unless ``--tiny`` (tiny random-weight models from the test kit:
checks the script, measures nothing that means anything).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import appliance  # noqa: E402,F401  (offline mode before any HF import)

GB = 1024 ** 3
MB = 1024 ** 2
KINDS_IN_ORDER = ("ig", "policy", "pg", "qe", "kr", "mg")

# --- published configurations ----------------------------------------------------------------

# Qwen/Qwen3-VL-4B-Instruct and -Thinking share this architecture (config.json of the release).
QWEN3_VL_4B = {
    "text_config": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, hidden_act="silu", rms_norm_eps=1e-6,
                        max_position_embeddings=262144, attention_bias=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                        bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True),
    "vision_config": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                          patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                          out_hidden_size=2560, num_position_embeddings=2304,
                          deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu_pytorch_tanh"),
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": True,
}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json with 9 input channels (inpainting).
SDXL_UNET = dict(
    in_channels=9, out_channels=4, sample_size=128, layers_per_block=2,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, use_linear_projection=True, norm_num_groups=32)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                scaling_factor=0.13025, force_upcast=True)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                      prediction_type="epsilon")
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
              num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
              projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                 num_hidden_layers=32, max_position_embeddings=77, hidden_act="gelu",
                 projection_dim=1280, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# black-forest-labs/FLUX.1-Fill-dev transformer/config.json.
FLUX_FILL_TRANSFORMER = dict(patch_size=1, in_channels=384, out_channels=64, num_layers=19,
                             num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                             joint_attention_dim=4096, pooled_projection_dim=768,
                             guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(SDXL_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.1159, scaling_factor=0.3611)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                      base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
              is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)


@dataclass
class TokenPlan:
    """Realistic token counts of one episode (our prompts, Qwen's 32x32 px per visual token)."""

    system: int = 1100  # system prompt with the five tool schemas
    task: int = 80
    policy_out: int = 250  # a thought plus a tool call
    tool_response: int = 60
    qe_response: int = 150  # scores + review, as the policy sees it
    kr_response: int = 350  # three knowledge entries
    pg_in: int = 450
    pg_out: int = 90
    qe_in: int = 500
    qe_out: int = 180
    image_side: int = 640  # pixels per side after the processor's resize (max_pixels 640x640)
    ig_side: int = 1024  # the photo's size

    @classmethod
    def tiny(cls) -> "TokenPlan":
        return cls(system=60, task=10, policy_out=8, tool_response=6, qe_response=8,
                   kr_response=12, pg_in=20, pg_out=6, qe_in=20, qe_out=8, image_side=64,
                   ig_side=128)


@dataclass(frozen=True)
class Call:
    kind: str  # policy, pg, qe, ig, mg, kr
    context: int = 0  # text tokens in the prompt
    images: int = 0
    new_tokens: int = 0


def episode_calls(attempts: int, plan: TokenPlan) -> list[Call]:
    """The model calls of one episode with ``attempts`` image generations (Algorithm 1 order)."""
    calls: list[Call] = []
    context, images = plan.system + plan.task, 1

    def turn() -> None:
        nonlocal context
        calls.append(Call("policy", context, images, plan.policy_out))
        context += plan.policy_out

    turn()
    calls.append(Call("pg", plan.pg_in, 1, plan.pg_out))
    context += plan.tool_response
    for attempt in range(1, attempts + 1):
        if attempt == 2:  # the first rejection sends the policy to knowledge retrieval
            turn()
            calls.append(Call("kr"))
            context += plan.kr_response
        turn()
        calls.append(Call("ig"))
        context += plan.tool_response
        images += 1
        turn()
        calls.append(Call("qe", plan.qe_in, 2, plan.qe_out))
        context += plan.qe_response
    turn()
    calls.append(Call("mg"))
    context += plan.tool_response
    turn()  # the answer
    return calls


# --- stages: wall time and peak memory ------------------------------------------------------


class Stages:
    """``with stages("name"):`` times a stage and records its peak memory; prints one line."""

    def __init__(self, device: str, on_row=None) -> None:
        self.device = device
        self.rows: list[dict] = []
        self.on_row = on_row  # called after every stage (the JSON is rewritten)

    @contextlib.contextmanager
    def __call__(self, name: str):
        reset_peak(self.device)
        row: dict = {"stage": name}
        started = time.perf_counter()
        try:
            yield row
        finally:
            row["seconds"] = round(time.perf_counter() - started, 3)
            row.update(peak_memory(self.device))
            self.rows.append(row)
            print(stage_line(row), flush=True)
            if self.on_row:
                self.on_row()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: str) -> dict:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / GB, 2),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GB, 2),
                "device_used_gb": round((total - free) / GB, 2)}
    try:
        status = Path("/proc/self/status").read_text()
        hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
        return {"peak_rss_mb": round(hwm / 1024)}
    except (OSError, StopIteration):  # not Linux: the peak since the start
        return {"peak_rss_mb_since_start": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def stage_line(row: dict) -> str:
    if "peak_allocated_gb" in row:
        memory = (f"peak {row['peak_allocated_gb']:.2f} GB allocated, {row['peak_reserved_gb']:.2f} GB "
                  f"reserved; device {row['device_used_gb']:.2f} GB used")
    elif "peak_rss_mb" in row:
        memory = f"peak RSS {row['peak_rss_mb']} MB"
    else:
        memory = f"peak RSS {row['peak_rss_mb_since_start']} MB (since start)"
    skipped = f"   not measured (time budget): {row['skipped']}" if row.get("skipped") else ""
    return f"stage  {row['stage']:<30} {row['seconds']:>8.2f} s   {memory}{skipped}"


# --- building ---------------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class DefaultDtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        import torch

        self.saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        import torch

        torch.set_default_dtype(self.saved)


def write_qwen_folder(folder: Path, tiny: bool, device: str) -> int:
    """A random-weight Qwen3-VL model folder the appliance's runtime loads; returns parameters.

    Full size: the published Qwen3-VL-4B config, built on ``device`` in bf16 (fast random
    initialisation) and saved. Tokenizer, image processor and chat template are the tiny kit's
    (the bench feeds token ids itself; only the runtime's loading needs them)."""
    import torch
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from appliance.models.tiny_kit import TINY_MAX_PIXELS, TINY_MIN_PIXELS, build_tokenizer, tiny_config
    from appliance.vlm.chat_template import QWEN3_VL_CHAT_TEMPLATE

    tokenizer = build_tokenizer()
    if tiny:
        config = tiny_config(tokenizer)
    else:
        # The published sizes with the special-token ids of the tokenizer saved beside them: the
        # retraining bench tokenizes real chat text, whose image pads must be the config's.
        ids = tokenizer.convert_tokens_to_ids
        assert len(tokenizer) <= QWEN3_VL_4B["text_config"]["vocab_size"]
        config = Qwen3VLConfig(**{
            **QWEN3_VL_4B,
            "text_config": {**QWEN3_VL_4B["text_config"], "eos_token_id": ids("<|im_end|>"),
                            "pad_token_id": ids("<|endoftext|>")},
            "image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"),
            "vision_end_token_id": ids("<|vision_end|>")})
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device), DefaultDtype(dtype):
        model = Qwen3VLForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    tokenizer.save_pretrained(folder)
    # Qwen3-VL's published preprocessor (the runtime caps it at max_pixels = 640 x 640).
    size = ({"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS} if tiny else
            {"shortest_edge": 65536, "longest_edge": 16777216})
    Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, size=size,
                             image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE, encoding="utf-8")
    return params


def load_qwen(folder: Path, quant: str, device: str):
    """The appliance's own runtime on that folder (NF4 with the product's skip list)."""
    from appliance.vlm.transformers_runtime import QwenTransformersRuntime, TransformersVLMConfig

    config = TransformersVLMConfig(folder, quantization="nf4" if quant == "nf4" else "none",
                                   device=device, do_sample=False)
    return QwenTransformersRuntime(config)


def quantized_share(model) -> float | None:
    """Weights in bitsandbytes 4-bit layers / all parameters, counted on the loaded model."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not layers:
        return 0.0
    packed = {id(m.weight) for m in layers}
    quantized = sum(m.in_features * m.out_features for m in layers)
    return quantized / (quantized + sum(p.numel() for p in model.parameters() if id(p) not in packed))


def vlm_entry(folder: Path, name: str, roles: tuple[str, ...], quant: str, batch: int,
              max_new_tokens: int):
    """A manifest entry for the saved folder, as the planner sees an installed model."""
    from appliance.models.manifest import FileEntry, ModelEntry

    files = tuple(FileEntry(p.name, "0" * 64, p.stat().st_size) for p in sorted(folder.iterdir())
                  if p.suffix in (".safetensors", ".json"))
    return ModelEntry(name=name, repo="local/bench", revision="random", licence="Apache-2.0",
                      format="transformers", backends={role: "qwen-transformers" for role in roles},
                      files=files, settings={"quantization": "nf4" if quant == "nf4" else "none",
                                             "max_batch": batch, "max_new_tokens": max_new_tokens})


def big_clip_tokenizer(vocab_size: int = 49408):
    """CLIP BPE over the byte symbols, padded with filler entries to the real vocabulary size."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    while len(vocab) < vocab_size - 2:
        vocab[f"<fill{len(vocab)}>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # SDXL/Flux pad every prompt to 77 tokens, so the encoder cost equals the real tokenizer's.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def big_t5_tokenizer(size: int = 32000):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(c), -3.0) for c in range(32, 127)]
    pieces += [(f"\u2581fill{i}", -9.0) for i in range(size - len(pieces))]
    # Flux pads the T5 prompt to max_sequence_length (512): cost as with the real tokenizer.
    return T5Tokenizer(vocab=pieces, extra_ids=100)


def build_sdxl(device: str):
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device), DefaultDtype(torch.float16):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    tokenizer = big_clip_tokenizer()
    return StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)


def build_flux(device: str):
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device(device), DefaultDtype(torch.bfloat16):
        transformer = FluxTransformer2DModel(**FLUX_FILL_TRANSFORMER)
        vae = AutoencoderKL(**FLUX_VAE)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    return FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
                            text_encoder=text, tokenizer=big_clip_tokenizer(), text_encoder_2=t5,
                            tokenizer_2=big_t5_tokenizer(), transformer=transformer)


def product_generator(pipeline, backend: str, settings: dict, knowledge_base, device: str,
                      workdir: Path):
    """The appliance's ``DiffusersInpaintGenerator`` on an in-memory pipeline, loaded by the
    product's own code: its ``_load`` sets the dtype, VAE slicing, offload and device exactly as
    for an installed model; only the pipeline class's ``from_pretrained`` answers from memory.
    Returns the generator and the keyword arguments ``_load`` asked ``from_pretrained`` for."""
    from appliance.tools.image_gen.diffusers_inpaint import DiffusersInpaintGenerator

    folder = workdir / backend
    pipeline.save_config(folder)  # model_index.json: the constructor checks for it
    cls = type(pipeline)
    asked: dict = {}
    own = cls.__dict__.get("from_pretrained")

    def from_pretrained(klass, path, **kwargs):
        asked.update(kwargs)
        return pipeline

    cls.from_pretrained = classmethod(from_pretrained)
    try:
        generator = DiffusersInpaintGenerator(folder, backend, settings, knowledge_base,
                                              device=device, model_id=f"random:{backend}")
    finally:
        if own is None:
            del cls.from_pretrained
        else:
            cls.from_pretrained = own
    return generator, asked


def build_ig(name: str, device: str, tiny: bool, workdir: Path, settings: dict, knowledge_base):
    """The pipeline (full size: built in memory on ``device``; tiny: the test kit's folder read
    back) wrapped by ``product_generator``, the appliance's loading code, in both cases."""
    import diffusers

    from appliance.tools.image_gen.diffusers_inpaint import KINDS

    backend = {"sdxl": "sdxl-inpaint", "flux": "flux-fill"}[name]
    if tiny:
        from appliance.models.tiny_diffusion import (
            TINY_SETTINGS,
            build_tiny_flux_fill,
            build_tiny_sdxl_inpaint,
        )

        folder = (build_tiny_sdxl_inpaint if name == "sdxl" else build_tiny_flux_fill)(workdir / name)
        pipeline = getattr(diffusers, KINDS[backend].pipeline).from_pretrained(folder)
        settings = {**TINY_SETTINGS, **settings}
    else:
        pipeline = (build_sdxl if name == "sdxl" else build_flux)(device)
    generator, asked = product_generator(pipeline, backend, settings, knowledge_base, device, workdir)
    if asked.get("torch_dtype") != pipeline.dtype:
        raise SystemExit(f"{backend}: the appliance would load it in {asked.get('torch_dtype')}, "
                         f"the bench built it in {pipeline.dtype}; settings {settings}")
    return generator


def ig_entry(generator, name: str):
    """A manifest entry for the pipeline, as the planner sees an installed model (component
    sizes from the parameters, since nothing is on disk)."""
    import torch

    from appliance.models.manifest import FileEntry, ModelEntry

    files = []
    for part, module in generator.pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            size = sum(p.numel() * p.element_size() for p in module.parameters())
            tag = ".fp32" if next(module.parameters()).element_size() == 4 else ""  # 2 B if untagged
            files.append(FileEntry(f"{part}/diffusion_pytorch_model{tag}.safetensors", "0" * 64, size))
    settings = {k: v for k, v in asdict(generator.settings).items()
                if k in ("resolution", "max_batch", "offload", "dtype")}
    return ModelEntry(name=f"random-{name}", repo="local/bench", revision="random",
                      licence="-", format="diffusers", backends={"image_gen": generator.name},
                      files=tuple(files), settings=settings)


def build_mg(device: str, tiny: bool, workdir: Path, batch: int):
    from appliance.models.metauas_export import MetaUASConfig, export_checkpoint
    from appliance.tools.mask_gen.metauas import MetaUASMaskGenerator

    config = MetaUASConfig.tiny() if tiny else MetaUASConfig()
    report = export_checkpoint(workdir / "metauas.onnx", None, config)
    return MetaUASMaskGenerator(report.path, device="cpu" if tiny else device, max_batch=batch), report.path


def build_kr():
    """FAISS retrieval as shipped, or None (counted as 0 s) when its embedder is not installed."""
    from appliance.engine import default_cache_dir
    from appliance.tools.knowledge.base import load_knowledge_base

    knowledge_base = load_knowledge_base()
    try:
        from appliance.tools.knowledge.retrieval import FaissKnowledgeRetriever

        kr = FaissKnowledgeRetriever(knowledge_base, cache_dir=default_cache_dir())
        kr.retrieve("magnetic_tile", "crack")  # builds or loads the index, loads the embedder
    except Exception as exc:  # noqa: BLE001 - KR is CPU-side and cheap; report and go on
        print(f"knowledge retrieval unavailable ({exc}); counted as 0 s", file=sys.stderr)
        kr = None
    return knowledge_base, kr


# --- measuring --------------------------------------------------------------------------------


def image_tokens(model, side: int) -> int:
    vision = model.config.vision_config
    return (side // vision.patch_size // vision.spatial_merge_size) ** 2


def prompt_tokens(call: Call, per_image: int) -> int:
    return call.context + call.images * (per_image + 2)  # + vision start and end


def vlm_inputs(model, batch: int, context: int, images: int, side: int, device: str):
    import torch

    config = model.config
    patch = config.vision_config.patch_size
    grid = side // patch
    per_image = image_tokens(model, side)
    generator = torch.Generator().manual_seed(0)
    high = min(config.text_config.vocab_size - 300, 150000)
    rows = []
    for _ in range(batch):
        ids: list[int] = []
        for _ in range(images):
            ids += [config.vision_start_token_id] + [config.image_token_id] * per_image + \
                   [config.vision_end_token_id]
        ids += torch.randint(10, high, (context,), generator=generator).tolist()
        rows.append(ids)
    input_ids = torch.tensor(rows, device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if images:
        depth = 3 * config.vision_config.temporal_patch_size * patch * patch
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        inputs["pixel_values"] = torch.randn(batch * images * grid * grid, depth, generator=generator
                                             ).to(device=device, dtype=dtype)
        inputs["image_grid_thw"] = torch.tensor([[1, grid, grid]] * (batch * images), device=device)
    return inputs


def time_vlm(model, call: Call, batch: int, plan: TokenPlan, device: str) -> float:
    import torch

    inputs = vlm_inputs(model, batch, call.context, call.images, plan.image_side, device)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=call.new_tokens, min_new_tokens=call.new_tokens,
                       do_sample=False, pad_token_id=0)
    sync(device)
    return time.perf_counter() - started


def photo(side: int):
    """A real texture (scikit-image's brick photo) at the benchmark's photo size."""
    import cv2
    import numpy as np
    from skimage import data

    gray = cv2.resize(data.brick(), (side, side), interpolation=cv2.INTER_CUBIC)
    return np.repeat(gray[..., None], 3, axis=2)


@dataclass
class Harness:
    policy: object  # the runtimes' models
    pgqe: object
    ig: object
    mg: object
    kr: object
    plan: TokenPlan
    device: str
    cache: dict = field(default_factory=dict)  # (call, batch) -> measured seconds
    interpolated: dict = field(default_factory=dict)  # (call, batch) -> interpolated seconds

    def seconds(self, call: Call, batch: int) -> float | None:
        """Measured or interpolated seconds; None when neither (the budget ran out)."""
        key = (call, batch)
        return self.cache.get(key, self.interpolated.get(key))

    def measure(self, call: Call, batch: int) -> float:
        key = (call, batch)
        if key not in self.cache:
            self.cache[key] = self._measure(call, batch)
        return self.cache[key]

    def interpolate(self, calls: list[Call], batch: int) -> None:
        """Policy calls not measured: linear in prompt tokens between the measured neighbours."""
        per_image = image_tokens(self.policy, self.plan.image_side)
        known = sorted((prompt_tokens(c, per_image), s) for (c, b), s in self.cache.items()
                       if c.kind == "policy" and b == batch)
        if not known:
            return
        for call in calls:
            if (call, batch) in self.cache:
                continue
            x = prompt_tokens(call, per_image)
            if len(known) == 1:
                self.interpolated[(call, batch)] = known[0][1]
                continue
            # The measured points on either side (the two nearest ones beyond either end).
            above = min(max(bisect.bisect_right([k[0] for k in known], x), 1), len(known) - 1)
            (x0, y0), (x1, y1) = known[above - 1], known[above]
            self.interpolated[(call, batch)] = y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1)

    def _measure(self, call: Call, batch: int) -> float:
        from appliance.tools.interfaces import EditRequest, MaskRequest

        if call.kind in ("policy", "pg", "qe"):
            model = self.policy if call.kind == "policy" else self.pgqe
            return time_vlm(model, call, batch, self.plan, self.device)
        image = photo(self.plan.ig_side)
        if call.kind == "ig":
            requests = [EditRequest(image, "magnetic_tile", "crack",
                                    "a thin dark crack running diagonally across the tile", seed=i)
                        for i in range(batch)]
            sync(self.device)
            started = time.perf_counter()
            results = self.ig.generate(requests)
            sync(self.device)
            self.edited = results[0].image
            return time.perf_counter() - started
        if call.kind == "mg":
            edited = getattr(self, "edited", image)
            started = time.perf_counter()
            self.mg.generate_masks([MaskRequest(image, edited) for _ in range(batch)])
            return time.perf_counter() - started
        if call.kind == "kr":
            if self.kr is None:
                return 0.0
            started = time.perf_counter()
            for _ in range(batch):  # the retriever answers one query at a time (CPU, FAISS)
                self.kr.retrieve("magnetic_tile", "crack")
            return time.perf_counter() - started
        raise ValueError(call.kind)

    def warm_up(self) -> None:
        for call in (Call("policy", 32, 1, 4), Call("pg", 32, 1, 4), Call("ig"), Call("mg"),
                     Call("kr")):
            self._measure(call, 1)


def distinct_calls(plan: TokenPlan) -> list[Call]:
    seen: dict[Call, None] = {}
    for attempts in (1, 2, 3):
        for call in episode_calls(attempts, plan):
            seen.setdefault(call)
    return list(seen)


def sampled(calls: list[Call], count: int) -> list[Call]:
    """``count`` calls spread over the range (first and last included); all when count <= 0."""
    if count <= 0 or count >= len(calls):
        return calls
    if count == 1:
        return [calls[-1]]
    return [calls[round(i * (len(calls) - 1) / (count - 1))] for i in range(count)]


def measure_engine(harness: Harness, batch: int, stages: Stages, name: str, deadline: float,
                   policy_samples: int) -> None:
    """Every distinct call at batch 1 then at ``batch``, one stage per tool and batch size."""
    calls = distinct_calls(harness.plan)
    per_image = image_tokens(harness.policy, harness.plan.image_side)
    policy = sorted((c for c in calls if c.kind == "policy"), key=lambda c: prompt_tokens(c, per_image))
    chosen = set(sampled(policy, policy_samples))
    with stages(f"{name}: warm-up"):
        harness.warm_up()
    for size in sorted({1, batch}):
        for kind in KINDS_IN_ORDER:
            todo = [c for c in calls if c.kind == kind and (kind != "policy" or c in chosen)]
            with stages(f"{name}: {kind} b={size}") as row:
                for call in todo:
                    if time.monotonic() > deadline:
                        row["skipped"] = row.get("skipped", 0) + 1
                        continue
                    harness.measure(call, size)
        harness.interpolate(policy, size)


def episode_rows(harness: Harness, batch: int) -> dict:
    rows = {}
    for attempts in (1, 2, 3):
        calls = episode_calls(attempts, harness.plan)
        single = [harness.seconds(c, 1) for c in calls]
        batched = [harness.seconds(c, batch) for c in calls]
        row: dict = {"calls": len(calls), "policy_turns": sum(c.kind == "policy" for c in calls)}
        if None not in single:
            by_kind: dict[str, float] = {}
            for c, s in zip(calls, single):
                by_kind[c.kind] = by_kind.get(c.kind, 0.0) + s
            row["seconds_per_episode_batch1"] = round(sum(single), 2)
            row["seconds_per_episode_batch1_by_tool"] = {k: round(v, 2) for k, v in by_kind.items()}
        if None not in batched:
            row[f"seconds_per_step_sequence_batch{batch}"] = round(sum(batched), 2)
            row["seconds_per_episode_batched"] = round(sum(batched) / batch, 2)
            row["episodes_per_hour_batched"] = round(3600 * batch / sum(batched), 1)
        rows[attempts] = row
    return rows


def call_table(harness: Harness) -> dict:
    def key(item):
        (call, size), _ = item
        return (KINDS_IN_ORDER.index(call.kind), size, call.context, call.images)

    table = {}
    for source, values in (("", harness.cache), ("~", harness.interpolated)):
        for (c, b), s in sorted(values.items(), key=key):
            table[f"{source}{c.kind}(ctx={c.context},img={c.images},out={c.new_tokens})@b{b}"] = round(s, 3)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Budget: one generator in under 8 minutes on one H100/H200 (e.g. --ig sdxl on a lent "
               "device session): by default only --policy-samples policy contexts are measured and "
               "the rest interpolated, and --budget-minutes stops new measurements once spent.")
    parser.add_argument("--ig", choices=("sdxl", "flux"), nargs="+", default=["sdxl"],
                        help="Image generators, one engine each (default: sdxl, the catalogue's).")
    parser.add_argument("--batch", type=int, default=None,
                        help="Episodes stepping together (default 8; 2 with --tiny).")
    parser.add_argument("--vlm-quant", choices=("nf4", "bf16"), default="nf4",
                        help="bf16 = no quantization (the runtime's compute dtype: bf16 on a GPU).")
    parser.add_argument("--shared-vlm", action="store_true",
                        help="One Qwen3-VL-4B for policy, PG and QE (default: two copies).")
    parser.add_argument("--offload", action="store_true",
                        help="Diffusion pipelines with model CPU offload (what the plan does at 24 GB).")
    parser.add_argument("--policy-samples", type=int, default=3,
                        help="Policy contexts measured per batch size, the others interpolated in "
                             "prompt tokens (default 3 of 12; 0 = measure every one).")
    parser.add_argument("--budget-minutes", type=float, default=8.0,
                        help="Wall time per generator, from the start; later calls are reported as "
                             "not measured (default 8).")
    parser.add_argument("--out", type=Path, default=None,
                        help="Write the results as JSON here (rewritten after every stage).")
    parser.add_argument("--tiny", action="store_true",
                        help="Tiny random-weight models from the test kit on CPU: runs every stage "
                             "in well under a minute; checks this script, measures nothing real.")
    args = parser.parse_args(argv)
    begun = time.monotonic()

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("bench/gpu_pipeline.py needs a CUDA GPU: torch.cuda.is_available() is False on this "
              "machine (torch " + torch.__version__ + "). Run it on the GPU box, or pass --tiny to "
              "check the script on CPU with tiny models.", file=sys.stderr)
        return 2
    from appliance.models import memory

    device = "cpu" if args.tiny else "cuda"
    batch = args.batch or (2 if args.tiny else 8)
    plan = TokenPlan.tiny() if args.tiny else TokenPlan()
    workdir = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "batch": batch, "vlm_quant": args.vlm_quant,
        "shared_vlm": args.shared_vlm, "offload": args.offload, "tiny": args.tiny,
        "policy_samples": args.policy_samples, "budget_minutes": args.budget_minutes,
        "token_plan": asdict(plan), "vlm": {}, "engines": {}}

    def save() -> None:
        report["stages"] = stages.rows
        report["total_seconds"] = round(time.monotonic() - begun, 1)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")

    stages = Stages(device, on_row=save)
    print(f"device: {report['device']}; torch {torch.__version__}; batch {batch}; VLM {args.vlm_quant}"
          f"{' shared' if args.shared_vlm else ' x2'}; generators {', '.join(args.ig)}", flush=True)
    try:
        with stages("build KR"):
            knowledge_base, kr = build_kr()
        folder = workdir / "qwen3-vl"
        with stages("write VLM folder") as row:
            params = write_qwen_folder(folder, args.tiny, device)
            row["parameters"] = params
        copies = {"policy": ("policy",), "pgqe": ("prompt_gen", "quality_eval")}
        if args.shared_vlm:
            copies = {"policy": ("policy", "prompt_gen", "quality_eval")}
        runtimes, estimates = {}, []
        new_tokens = max(plan.policy_out, plan.pg_out, plan.qe_out)
        for copy, roles in copies.items():
            before = torch.cuda.memory_allocated() if device == "cuda" else 0
            with stages(f"load VLM {copy} ({args.vlm_quant})"):
                runtimes[copy] = load_qwen(folder, args.vlm_quant, device)
            estimate = memory.estimate(vlm_entry(folder, f"qwen-{copy}", roles, args.vlm_quant, batch,
                                                 new_tokens), roles, folder=folder)
            estimates.append(estimate)
            loaded = quantized_share(runtimes[copy].model)
            report["vlm"][copy] = {
                "parameters": params, "nf4_share_derived": round(memory.nf4_linear_share(folder), 5),
                "nf4_share_loaded": None if loaded is None else round(loaded, 5),
                "resident_planned_gb": round(estimate.resident / GB, 2),
                "resident_measured_gb": round((torch.cuda.memory_allocated() - before) / GB, 2)
                if device == "cuda" else None}
        vlm = report["vlm"]["policy"]
        measured = vlm["resident_measured_gb"]
        print(f"  Qwen3-VL: {params:,} parameters; NF4 share counted on the config "
              f"(memory.nf4_linear_share) {memory.nf4_linear_share(folder):.2%}, on the loaded model "
              f"{'-' if loaded is None else f'{loaded:.2%}'}; resident per copy: planned "
              f"{gib(estimates[0].resident)}" + ("" if measured is None else
                                                 f", measured {measured:.2f} GB"), flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        with stages("export MG"):
            mg, onnx_path = build_mg(device, args.tiny, workdir, batch)
        report["metauas_providers"] = mg.providers
        estimates.append(memory.estimate(mg_entry(onnx_path), ("mask_gen",)))
        for number, name in enumerate(args.ig, start=1):
            deadline = begun + number * args.budget_minutes * 60
            settings = {"max_batch": batch, "offload": args.offload}
            if device == "cuda":
                torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated() if device == "cuda" else 0
            with stages(f"build IG {name}"):
                ig = build_ig(name, device, args.tiny, workdir, settings, knowledge_base)
            vae = ig.pipeline.vae
            engine: dict = {"vae": {"slicing": bool(getattr(vae, "use_slicing", False)),
                                    "tiling": bool(getattr(vae, "use_tiling", False)),
                                    "dtype": str(vae.dtype)},
                            "settings": asdict(ig.settings),
                            "resident_measured_gb": round((torch.cuda.memory_allocated() - before) / GB, 2)
                            if device == "cuda" else None}
            report["engines"][name] = engine
            print(f"  {ig.name}: {ig.settings.resolution} px, {ig.settings.steps} steps, "
                  f"max_batch {ig.settings.max_batch}, offload {ig.settings.offload}; VAE slicing "
                  f"{'on' if engine['vae']['slicing'] else 'off'}, tiling "
                  f"{'on' if engine['vae']['tiling'] else 'off'} (as the appliance loads it)", flush=True)
            harness = Harness(runtimes["policy"].model, runtimes.get("pgqe", runtimes["policy"]).model,
                              ig, mg, kr, plan, device)
            first = len(stages.rows)
            measure_engine(harness, batch, stages, name, deadline, args.policy_samples)
            rows = episode_rows(harness, batch)
            mine = stages.rows[first:]
            planned = memory.peak([*estimates, memory.estimate(ig_entry(ig, name), ("image_gen",))])
            engine.update({"episodes": rows, "calls": call_table(harness),
                           "not_measured": sum(r.get("skipped", 0) for r in mine),
                           "peak_planned_gb": round(planned / GB, 2)})
            if device == "cuda":
                engine["peak_reserved_gb"] = max(r["peak_reserved_gb"] for r in mine)
                engine["peak_device_used_gb"] = max(r["device_used_gb"] for r in mine)
                engine["under_24gb"] = engine["peak_device_used_gb"] < 24
            print_engine(name, rows, engine, batch)
            save()
            ig.close()
            del ig, harness
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    save()
    print(f"total {time.monotonic() - begun:.0f} s" + (f"; results written to {args.out}" if args.out else ""))
    return 0


def gib(value: float) -> str:
    return f"{value / GB:.2f} GB" if value >= 0.01 * GB else f"{value / MB:.1f} MB"


def mg_entry(path: Path):
    from appliance.models.manifest import FileEntry, ModelEntry

    files = tuple(FileEntry(p.name, "0" * 64, p.stat().st_size) for p in path.parent.iterdir()
                  if p.name.startswith(path.name))
    return ModelEntry(name="random-metauas", repo="local/bench", revision="random", licence="-",
                      format="onnx", backends={"mask_gen": "metauas-onnx"}, files=files)


def print_engine(name: str, rows: dict, engine: dict, batch: int) -> None:
    print(f"\n== engine with {name} ==")
    print(f"{'IG attempts':>11s} {'s/episode (b=1)':>16s} {f's/episode (b={batch})':>18s} "
          f"{'episodes/hour':>14s}")

    def cell(row: dict, key: str, width: int, digits: int = 2) -> str:
        return f"{row[key]:>{width}.{digits}f}" if key in row else f"{'not measured':>{width}s}"

    for attempts, row in rows.items():
        print(f"{attempts:>11d} {cell(row, 'seconds_per_episode_batch1', 16)} "
              f"{cell(row, 'seconds_per_episode_batched', 18)} "
              f"{cell(row, 'episodes_per_hour_batched', 14, 1)}")
        if "seconds_per_episode_batch1_by_tool" in row:
            print("            batch 1 by tool: " + ", ".join(
                f"{k} {v:.2f}" for k, v in row["seconds_per_episode_batch1_by_tool"].items()))
    if engine.get("not_measured"):
        print(f"{engine['not_measured']} calls not measured: the time budget ran out")
    planned = f"planned peak (appliance/models/memory.py) {engine['peak_planned_gb']:.1f} GB"
    if "peak_reserved_gb" in engine:
        print(f"peak GPU memory: {engine['peak_reserved_gb']} GB reserved by torch, "
              f"{engine['peak_device_used_gb']} GB used on the device (onnxruntime and the CUDA "
              f"context included); {planned}")
    else:
        print(planned + " (for a GPU; this run is on CPU)")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
