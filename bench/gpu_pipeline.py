#!/usr/bin/env python
"""GPU engine benchmark on full-size architectures with random weights (nothing downloaded).

Builds, from their published configurations written below:
* Qwen3-VL-4B (policy, and a second copy for prompt generation and judging unless
  ``--shared-vlm``), bf16 or bitsandbytes 4-bit NF4 (saved and reloaded through
  ``from_pretrained``, the way the appliance loads it);
* SDXL inpainting (UNet with 9 input channels, both CLIP text encoders, the SDXL VAE) in fp16,
  and/or Flux Fill (the 12B transformer with 384 input channels, T5-XXL, CLIP-L, the Flux VAE) in
  bf16, each wrapped in the appliance's own ``DiffusersInpaintGenerator`` (placement, crop,
  blend: the production code path);
* MetaUAS at 256 px exported to ONNX by ``appliance.models.metauas_export`` and run by the
  appliance's ``MetaUASMaskGenerator`` (CUDA provider when onnxruntime-gpu is installed);
* FAISS knowledge retrieval as shipped.

It times every model call an episode makes (policy turns with growing context, PG, IG, QE, KR,
MG) at batch 1 and at ``--batch``, then reports seconds per episode at 1, 2 and 3 image
generation attempts, episodes per hour when ``--batch`` episodes step together (one batched call
per tool), and peak GPU memory. Random weights decode forced token counts
(``min_new_tokens = max_new_tokens``), so the timing matches a real model writing that much.

    python bench/gpu_pipeline.py --ig sdxl --batch 8 --out bench/results/h100.json

Refuses to run without CUDA; ``--tiny`` runs the same code on tiny configs on CPU (to check the
script itself, not to measure anything).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import appliance  # noqa: E402,F401  (offline mode before any HF import)

GB = 1024 ** 3

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
QWEN3_VL_TINY = {
    "text_config": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                        max_position_embeddings=8192,
                        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                         "mrope_section": [6, 5, 5], "mrope_interleaved": True},
                        bos_token_id=None, eos_token_id=2047, tie_word_embeddings=False),
    "vision_config": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                          num_position_embeddings=16, deepstack_visual_indexes=[0]),
    "image_token_id": 2040, "video_token_id": 2041, "vision_start_token_id": 2042,
    "vision_end_token_id": 2043, "tie_word_embeddings": False,
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


def build_qwen(config: dict, quant: str, device: str, workdir: Path, name: str):
    """Random Qwen3-VL; NF4 goes through save_pretrained/from_pretrained like the appliance."""
    import torch
    from transformers import BitsAndBytesConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(**config)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device), DefaultDtype(dtype):
        model = Qwen3VLForConditionalGeneration(cfg)
    params = sum(p.numel() for p in model.parameters())
    if quant == "nf4":
        folder = workdir / name
        model.save_pretrained(folder)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            folder, quantization_config=quantization, device_map=device, dtype=torch.bfloat16)
        shutil.rmtree(folder, ignore_errors=True)
    return model.eval(), params


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


def build_ig(name: str, device: str, tiny: bool, workdir: Path, batch: int, knowledge_base):
    from appliance.tools.image_gen.diffusers_inpaint import KINDS, DiffusersInpaintGenerator

    backend = {"sdxl": "sdxl-inpaint", "flux": "flux-fill"}[name]
    if tiny:
        from appliance.models.tiny_diffusion import (
            TINY_SETTINGS,
            build_tiny_flux_fill,
            build_tiny_sdxl_inpaint,
        )

        builder = build_tiny_sdxl_inpaint if name == "sdxl" else build_tiny_flux_fill
        settings = {**TINY_SETTINGS, "max_batch": batch}
        return DiffusersInpaintGenerator(builder(workdir / name), backend, settings, knowledge_base,
                                         device="cpu")
    pipeline = (build_sdxl if name == "sdxl" else build_flux)(device)
    params = sum(p.numel() for p in pipeline.components["unet" if name == "sdxl"
                                                        else "transformer"].parameters())
    print(f"  {backend}: denoiser {params / 1e9:.2f} B parameters", flush=True)
    dtype = KINDS[backend].gpu_dtype
    settings = {"max_batch": batch}
    return DiffusersInpaintGenerator.from_pipeline(pipeline, backend, settings, knowledge_base,
                                                   model_id=f"random:{backend}", device=device,
                                                   dtype=dtype)


def build_mg(device: str, tiny: bool, workdir: Path, batch: int):
    from appliance.models.metauas_export import MetaUASConfig, export_checkpoint
    from appliance.tools.mask_gen.metauas import MetaUASMaskGenerator

    config = MetaUASConfig.tiny() if tiny else MetaUASConfig()
    report = export_checkpoint(workdir / "metauas.onnx", None, config)
    return MetaUASMaskGenerator(report.path, device="cpu" if tiny else device, max_batch=batch)


# --- measuring --------------------------------------------------------------------------------


def vlm_inputs(model, batch: int, context: int, images: int, side: int, device: str):
    import torch

    config = model.config
    patch = config.vision_config.patch_size
    merge = config.vision_config.spatial_merge_size
    grid = side // patch
    per_image = (grid // merge) ** 2
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
    policy: object
    pgqe: object
    ig: object
    mg: object
    kr: object
    plan: TokenPlan
    device: str
    cache: dict = field(default_factory=dict)

    def seconds(self, call: Call, batch: int) -> float:
        key = (call, batch)
        if key not in self.cache:
            self.cache[key] = self._measure(call, batch)
        return self.cache[key]

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


def memory(device: str) -> dict:
    import torch

    if not device.startswith("cuda"):
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"torch_peak_allocated_gb": round(torch.cuda.max_memory_allocated() / GB, 2),
            "torch_peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GB, 2),
            "device_used_now_gb": round((total - free) / GB, 2), "device_total_gb": round(total / GB, 2)}


def run_engine(harness: Harness, batch: int) -> dict:
    rows = {}
    for attempts in (1, 2, 3):
        calls = episode_calls(attempts, harness.plan)
        single = sum(harness.seconds(c, 1) for c in calls)
        batched = sum(harness.seconds(c, batch) for c in calls)
        by_kind: dict[str, float] = {}
        for c in calls:
            by_kind[c.kind] = by_kind.get(c.kind, 0.0) + harness.seconds(c, 1)
        rows[attempts] = {
            "calls": len(calls), "policy_turns": sum(c.kind == "policy" for c in calls),
            "seconds_per_episode_batch1": round(single, 2),
            "seconds_per_episode_batch1_by_tool": {k: round(v, 2) for k, v in by_kind.items()},
            f"seconds_per_step_sequence_batch{batch}": round(batched, 2),
            "seconds_per_episode_batched": round(batched / batch, 2),
            "episodes_per_hour_batched": round(3600 * batch / batched, 1)}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ig", choices=("sdxl", "flux"), nargs="+", default=["sdxl", "flux"])
    parser.add_argument("--batch", type=int, default=8, help="Episodes stepping together.")
    parser.add_argument("--vlm-quant", choices=("nf4", "bf16"), default="nf4")
    parser.add_argument("--shared-vlm", action="store_true",
                        help="One Qwen3-VL-4B for policy, PG and QE (default: two copies).")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    parser.add_argument("--tiny", action="store_true",
                        help="Tiny configs on CPU: checks this script, measures nothing real.")
    args = parser.parse_args(argv)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("bench/gpu_pipeline.py needs a CUDA GPU: torch.cuda.is_available() is False on this "
              "machine (torch " + torch.__version__ + "). Run it on the GPU box, or pass --tiny to "
              "check the script on CPU with tiny models.", file=sys.stderr)
        return 2
    device = "cpu" if args.tiny else "cuda"
    plan = TokenPlan.tiny() if args.tiny else TokenPlan()
    quant = "bf16" if args.tiny else args.vlm_quant
    workdir = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
                    "torch": torch.__version__, "batch": args.batch, "vlm_quant": quant,
                    "shared_vlm": args.shared_vlm, "tiny": args.tiny, "token_plan": asdict(plan),
                    "engines": {}}
    try:
        from appliance.engine import default_cache_dir
        from appliance.tools.knowledge.base import load_knowledge_base

        knowledge_base = load_knowledge_base()
        try:
            from appliance.tools.knowledge.retrieval import FaissKnowledgeRetriever

            kr = FaissKnowledgeRetriever(knowledge_base, cache_dir=default_cache_dir())
        except Exception as exc:  # noqa: BLE001 - KR is CPU-side and cheap; report and go on
            print(f"knowledge retrieval unavailable ({exc}); counted as 0 s", file=sys.stderr)
            kr = None
        qwen = QWEN3_VL_TINY if args.tiny else QWEN3_VL_4B
        print("building Qwen3-VL policy ...", flush=True)
        started = time.perf_counter()
        policy, params = build_qwen(qwen, quant, device, workdir, "policy")
        print(f"  {params / 1e9:.2f} B parameters, {quant}, {time.perf_counter() - started:.0f} s",
              flush=True)
        pgqe = policy
        if not args.shared_vlm:
            print("building Qwen3-VL for PG/QE ...", flush=True)
            pgqe, _ = build_qwen(qwen, quant, device, workdir, "pgqe")
        print("exporting MetaUAS ...", flush=True)
        mg = build_mg(device, args.tiny, workdir, args.batch)
        report["metauas_providers"] = mg.providers
        report["resident_without_ig"] = memory(device)
        for name in args.ig:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            print(f"building {name} ...", flush=True)
            started = time.perf_counter()
            ig = build_ig(name, device, args.tiny, workdir, args.batch, knowledge_base)
            print(f"  built in {time.perf_counter() - started:.0f} s; measuring", flush=True)
            harness = Harness(policy, pgqe, ig, mg, kr, plan, device)
            harness.warm_up()
            rows = run_engine(harness, args.batch)
            per_call = {f"{c.kind}(ctx={c.context},img={c.images},out={c.new_tokens})@b{b}": round(s, 3)
                        for (c, b), s in sorted(harness.cache.items(), key=lambda kv: (kv[0][0].kind, kv[0][1]))}
            mem = memory(device)
            report["engines"][name] = {"episodes": rows, "calls": per_call, "memory": mem,
                                       "under_24gb": (mem.get("torch_peak_reserved_gb", 0) < 24)
                                       if mem else None}
            print_engine(name, rows, mem, args.batch)
            ig.close()
            del ig, harness
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"results written to {args.out}")
    return 0


def print_engine(name: str, rows: dict, mem: dict, batch: int) -> None:
    print(f"\n== engine with {name} ==")
    print(f"{'IG attempts':>11s} {'s/episode (b=1)':>16s} {f's/episode (b={batch})':>18s} "
          f"{'episodes/hour':>14s}")
    for attempts, row in rows.items():
        print(f"{attempts:>11d} {row['seconds_per_episode_batch1']:>16.2f} "
              f"{row['seconds_per_episode_batched']:>18.2f} {row['episodes_per_hour_batched']:>14.1f}")
        print("            batch 1 by tool: " + ", ".join(
            f"{k} {v:.2f}" for k, v in row["seconds_per_episode_batch1_by_tool"].items()))
    if mem:
        print(f"peak GPU memory: {mem['torch_peak_allocated_gb']} GB allocated, "
              f"{mem['torch_peak_reserved_gb']} GB reserved by torch; device now "
              f"{mem['device_used_now_gb']} / {mem['device_total_gb']} GB (includes onnxruntime)")


if __name__ == "__main__":
    sys.exit(main())
