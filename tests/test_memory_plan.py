"""The GPU memory planner on the real catalogue (with the published weight sizes) and the tiny kit."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import require_module

from appliance.models.manifest import (
    FileEntry,
    ModelEntry,
    catalogue_path,
    load_manifest,
)
from appliance.models.memory import (
    GIB,
    NF4_BYTES,
    NF4_LINEAR_SHARE_FALLBACK,
    NF4_SKIP_MODULES,
    estimate,
    nf4_linear_share,
    plan_memory,
    weight_files,
)

# Weight files as the pull lists them (sizes of the Hub releases, rounded to the MB).
QWEN_4B = {"config.json": 5_000, "model.safetensors.index.json": 60_000,
           "model-00001-of-00002.safetensors": 4_967_000_000,
           "model-00002-of-00002.safetensors": 3_908_000_000}
SIZES = {
    "qwen3-vl-4b-thinking": QWEN_4B,
    "qwen3-vl-4b-instruct": QWEN_4B,
    "sdxl-inpainting-0.1": {
        "model_index.json": 700, "unet/config.json": 1_800,
        "unet/diffusion_pytorch_model.fp16.safetensors": 5_135_000_000,
        "text_encoder/model.fp16.safetensors": 246_000_000,
        "text_encoder_2/model.fp16.safetensors": 1_389_000_000,
        "vae/diffusion_pytorch_model.fp16.safetensors": 167_000_000},
    "flux1-fill-dev": {
        "model_index.json": 600,
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors": 9_983_000_000,
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors": 9_949_000_000,
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors": 3_870_000_000,
        "text_encoder_2/model-00001-of-00002.safetensors": 4_995_000_000,
        "text_encoder_2/model-00002-of-00002.safetensors": 4_530_000_000,
        "text_encoder/model.safetensors": 246_000_000,
        "vae/diffusion_pytorch_model.safetensors": 168_000_000},
    "metauas-256": {"metauas.onnx": 88_000_000, "weights/metauas-256.ckpt": 88_500_000},
}


def with_sizes(entry: ModelEntry, sizes: dict[str, int]) -> ModelEntry:
    return replace(entry, files=tuple(FileEntry(p, "0" * 64, s) for p, s in sizes.items()))


@pytest.fixture(scope="module")
def catalogue() -> dict[str, ModelEntry]:
    """The repository's default model set, as a pulled bundle would describe it."""
    return {e.name: with_sizes(e, SIZES[e.name]) for e in load_manifest(catalogue_path()).models}


def engine(catalogue, image_gen="sdxl-inpainting-0.1", **vlm_settings) -> dict[str, ModelEntry]:
    """role -> entry as select_engine picks them from the catalogue."""
    policy, judge = (replace(catalogue[n], settings={**catalogue[n].settings, **vlm_settings})
                     for n in ("qwen3-vl-4b-thinking", "qwen3-vl-4b-instruct"))
    return {"policy": policy, "prompt_gen": judge, "quality_eval": judge,
            "image_gen": catalogue[image_gen], "mask_gen": catalogue["metauas-256"]}


def test_default_set_fits_24gb_by_offloading_sdxl(catalogue):
    plan = plan_memory(engine(catalogue), 24)
    assert plan.fits and plan.after_gb <= 24 < plan.before_gb
    # The VLMs are NF4 in the catalogue already; offloading SDXL's idle components is enough
    # now that its fp32 VAE decodes one image at a time.
    assert plan.overrides == {"sdxl-inpainting-0.1": {"offload": True}}
    assert plan.settings(catalogue["sdxl-inpainting-0.1"])["offload"] is True
    assert len(plan.lines()) == 1 + 4 and "offload=True" in plan.lines()[3]


def test_bf16_vlms_become_nf4_at_24gb(catalogue):
    plan = plan_memory(engine(catalogue, quantization="none"), 24)
    assert plan.fits
    assert plan.overrides["qwen3-vl-4b-thinking"] == {"quantization": "nf4"}
    assert plan.overrides["qwen3-vl-4b-instruct"] == {"quantization": "nf4"}
    before, after = plan.before[0].resident / GIB, plan.after[0].resident / GIB
    assert 8.0 < before < 8.5  # 8.9 GB of bf16 files
    # No config.json in a catalogue entry that is not pulled: the published 4B share (81.9 %)
    # of NF4 weights, the vision tower, lm_head, embeddings and norms in bf16.
    share = NF4_LINEAR_SHARE_FALLBACK
    assert after / before == pytest.approx(share * NF4_BYTES / 2 + (1 - share))
    assert 0.38 < after / before < 0.40


def test_at_80gb_nothing_changes(catalogue):
    for image_gen in ("sdxl-inpainting-0.1", "flux1-fill-dev"):
        plan = plan_memory(engine(catalogue, image_gen), 80)
        assert plan.fits and plan.overrides == {} and plan.before_gb == plan.after_gb
        assert plan.message == "fits"


def test_flux_is_offloaded_when_its_weights_do_not_fit(catalogue):
    plan = plan_memory(engine(catalogue, "flux1-fill-dev"), 48)
    assert plan.fits and plan.overrides == {"flux1-fill-dev": {"offload": True}}
    flux = plan.after[2]
    assert flux.resident == 0 and flux.working / GIB > 22  # the transformer while it runs


def test_flux_cannot_fit_24gb_and_says_why(catalogue):
    # Offloaded, Flux still needs its 22 GB transformer on the GPU while it denoises.
    plan = plan_memory(engine(catalogue, "flux1-fill-dev"), 24)
    assert not plan.fits and plan.after_gb > 24
    assert "does not fit in 24.0 GB" in plan.message
    assert plan.message.index("flux1-fill-dev") < plan.message.index("qwen3-vl-4b")


def test_impossible_budget_names_the_biggest_consumers(catalogue):
    plan = plan_memory(engine(catalogue), 4)
    assert not plan.fits
    for name in ("sdxl-inpainting-0.1", "qwen3-vl-4b-thinking", "qwen3-vl-4b-instruct"):
        assert name in plan.message
    assert plan.as_dict()["fits"] is False
    json.dumps(plan.as_dict())


def test_a_shared_vlm_is_counted_once(catalogue):
    shared = replace(catalogue["qwen3-vl-4b-thinking"], backends={
        "policy": "qwen-transformers", "prompt_gen": "vlm", "quality_eval": "vlm"})
    models = {"policy": shared, "prompt_gen": shared, "quality_eval": shared}
    plan = plan_memory(models, 80)
    assert [m.roles for m in plan.before] == [("policy", "prompt_gen", "quality_eval")]
    twin = replace(shared, name="qwen3-vl-4b-copy")
    two = plan_memory({**models, "prompt_gen": twin, "quality_eval": twin}, 80)
    one_copy = plan.before[0].resident / GIB
    assert two.before_gb - plan.before_gb == pytest.approx(one_copy, rel=1e-6)


def test_cpu_engines_have_an_empty_plan(catalogue):
    for plan in (plan_memory({}, 1), plan_memory(engine(catalogue), 1, device="cpu")):
        assert plan.fits and plan.overrides == {} and plan.after_gb == 0
        assert len(plan.lines()) == 1


def gguf_entry() -> ModelEntry:
    return ModelEntry(
        name="qwen3-vl-4b-gguf", repo="Qwen/Qwen3-VL-4B-Instruct-GGUF", revision="main",
        licence="Apache-2.0", format="gguf", backends={"policy": "qwen-llamacpp"},
        files=(FileEntry("Qwen3VL-4B-Instruct-Q4_K_M.gguf", "0" * 64, 2_497_000_000),
               FileEntry("mmproj-Qwen3VL-4B-Instruct-F16.gguf", "0" * 64, 836_000_000)),
        settings={"model": "Qwen3VL-4B-Instruct-Q4_K_M.gguf",
                  "mmproj": "mmproj-Qwen3VL-4B-Instruct-F16.gguf"})


def test_llamacpp_layers_leave_the_gpu_last(catalogue):
    models = {"policy": gguf_entry(), "image_gen": catalogue["sdxl-inpainting-0.1"]}
    roomy = plan_memory(models, 16)
    assert roomy.fits and "qwen3-vl-4b-gguf" not in roomy.overrides  # offload SDXL first
    tight = plan_memory(models, 9)
    assert tight.fits
    layers = tight.overrides["qwen3-vl-4b-gguf"]["n_gpu_layers"]
    assert 0 < layers < 36
    assert tight.overrides["sdxl-inpainting-0.1"] == {"offload": True, "max_batch": 1}


def test_the_overrides_are_settings_the_backends_accept(catalogue, tmp_path):
    from appliance.tools.image_gen.diffusers_inpaint import KINDS
    from appliance.vlm.llamacpp_runtime import llamacpp_config
    from appliance.vlm.transformers_runtime import transformers_config

    models = {**engine(catalogue, quantization="none"), "policy": gguf_entry()}
    checked = set()
    for budget in (24, 12, 6, 1):
        plan = plan_memory(models, budget)
        for entry in {e.name: e for e in models.values()}.values():
            settings = plan.settings(entry)
            if entry.format == "transformers":
                config, _ = transformers_config(tmp_path, settings)
                assert config.quantization == settings["quantization"]
            elif entry.format == "gguf":
                config = llamacpp_config(tmp_path, settings)
                assert config.n_gpu_layers == settings.get("n_gpu_layers", -1)
            elif entry.format == "diffusers":
                config = replace(KINDS[entry.backends["image_gen"]].defaults, **settings)
                assert config.offload == settings.get("offload", False)
            checked |= set(plan.overrides.get(entry.name, {}))
    assert checked == {"offload", "max_batch", "quantization", "n_gpu_layers"}


def test_weight_files_are_the_loaded_variant_only(catalogue):
    sdxl = catalogue["sdxl-inpainting-0.1"]
    sizes = {**SIZES["sdxl-inpainting-0.1"],
             "unet/diffusion_pytorch_model.safetensors": 10_270_000_000,  # the fp32 copy
             "sd_xl_inpainting.safetensors": 6_900_000_000}  # a single-file copy at the root
    both = with_sizes(sdxl, sizes)
    assert sum(f.size for f in weight_files(both, both.settings)) == sum(
        s for p, s in SIZES["sdxl-inpainting-0.1"].items() if p.endswith(".safetensors"))
    fp32 = weight_files(both, {})  # no variant: the untagged fp32 UNet is what loads
    assert "unet/diffusion_pytorch_model.safetensors" in {f.path for f in fp32}
    onnx = catalogue["metauas-256"]  # the torch checkpoint beside the export is not loaded
    assert [f.path for f in weight_files(onnx, onnx.settings)] == ["metauas.onnx"]


def test_unpulled_catalogue_entries_are_marked_unknown():
    entries = {e.name: e for e in load_manifest(catalogue_path()).models}
    plan = plan_memory({"policy": entries["qwen3-vl-4b-thinking"]}, 24)
    assert not plan.after[0].known and "unknown" in plan.lines()[1]


# --- the real tiny kit: estimates come from the files on disk ----------------------------------


@pytest.fixture(scope="module")
def tiny_kit(tmp_path_factory):
    from appliance.models.tiny_models import build_tiny_models

    folder = tmp_path_factory.mktemp("tiny-kit")
    manifest = build_tiny_models(folder, parts=["qwen", "sdxl", "metauas"])
    return folder, {e.name: e for e in manifest.models}


def test_tiny_kit_estimates_come_from_its_files(tiny_kit):
    from appliance.engine import plan_gpu_memory, resolve_engine_config

    folder, entries = tiny_kit
    config, _ = resolve_engine_config("auto", models_dir=folder)
    plan = plan_gpu_memory(replace(config, gpu_memory_gb=24), device="cuda")
    assert {m.name for m in plan.before} == {"qwen3-vl-tiny", "sdxl-inpaint-tiny", "metauas-tiny"}
    assert plan.fits and plan.overrides == {}
    by_name = {m.name: m for m in plan.before}
    assert by_name["qwen3-vl-tiny"].roles == ("policy", "prompt_gen", "quality_eval")
    # The tiny weights are stored in fp32 (read from the safetensors headers) and run in 16 bit.
    for name, fmt in (("qwen3-vl-tiny", "transformers"), ("sdxl-inpaint-tiny", "diffusers")):
        on_disk = sum(p.stat().st_size for p in (folder / name).rglob("*.safetensors")
                      if fmt != "diffusers" or p.parent != folder / name)
        stored = sum(f.size for f in weight_files(entries[name], entries[name].settings))
        assert stored == on_disk
        assert by_name[name].resident == pytest.approx(on_disk / 2, rel=0.02)
    onnx = sum(p.stat().st_size for p in (folder / "metauas-tiny").glob("*.onnx*"))
    tiny_uas = estimate(entries["metauas-tiny"], ("mask_gen",))
    assert tiny_uas.known and tiny_uas.resident > onnx
    bigger = replace(entries["metauas-tiny"], files=tuple(
        replace(f, size=f.size * 10) for f in entries["metauas-tiny"].files))
    assert estimate(bigger, ("mask_gen",)).resident - tiny_uas.resident == pytest.approx(9 * onnx)
    assert Path(folder / "manifest.toml").is_file()


# --- the NF4 share, counted on the architecture ------------------------------------------------

# Qwen/Qwen3-VL-4B-Instruct's config.json as published (-Thinking has the same architecture).
QWEN3_VL_4B_CONFIG = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
        "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 9728,
        "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_interleaved": True,
                                                 "mrope_section": [24, 20, 20],
                                                 "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True,
        "vocab_size": 151936},
    "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02,
        "intermediate_size": 4096, "model_type": "qwen3_vl", "num_heads": 16,
        "num_position_embeddings": 2304, "out_hidden_size": 2560, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}
# A tiny Qwen3-VL: 2 text layers 64 wide (MLP 128), a 2-block vision tower 64 wide, untied head.
TINY_CONFIG = {
    "model_type": "qwen3_vl", "image_token_id": 2040, "video_token_id": 2041,
    "vision_start_token_id": 2042, "vision_end_token_id": 2043, "tie_word_embeddings": False,
    "text_config": {"vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
                    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                    "head_dim": 32, "max_position_embeddings": 8192, "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                        "mrope_section": [6, 5, 5], "mrope_interleaved": True}},
    "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                      "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "out_hidden_size": 64, "num_position_embeddings": 16,
                      "deepstack_visual_indexes": [0]},
}


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_nf4_share_of_a_tiny_qwen3vl_is_the_hand_count(tmp_path):
    hidden, mlp, layers, vocab = 64, 128, 2, 2048
    # Quantized: the language model's q, k, v, o (2 heads x 32 = 64 wide) and gate, up, down.
    quantized = layers * (4 * hidden * hidden + 3 * hidden * mlp)
    text = (vocab * hidden  # embed_tokens
            + layers * (2 * 32 + 2 * hidden)  # q_norm, k_norm, the two RMSNorms
            + hidden  # final norm
            + hidden * vocab)  # lm_head (untied; skipped)
    block = (2 * 2 * hidden  # two LayerNorms, weight and bias
             + 3 * hidden * hidden + 3 * hidden  # qkv
             + hidden * hidden + hidden  # proj
             + hidden * mlp + mlp + mlp * hidden + hidden)  # the MLP
    merged = hidden * 2 * 2  # 2x2 patches merged: 256
    merger = 2 * hidden + merged * merged + merged + merged * hidden + hidden
    deepstack = 2 * merged + merged * merged + merged + merged * hidden + hidden  # post-shuffle norm
    vision = (hidden * 3 * 2 * 16 * 16 + hidden  # Conv3d patch embedding
              + 16 * hidden  # position embedding
              + 2 * block + merger + deepstack)
    total = quantized + text + vision
    assert total == 675_968
    assert nf4_linear_share(write_config(tmp_path, TINY_CONFIG)) == pytest.approx(quantized / total)


def test_nf4_share_of_the_published_qwen3_vl_4b(tmp_path):
    from appliance.models.memory import nf4_linear_share_of_config

    share = nf4_linear_share(write_config(tmp_path, QWEN3_VL_4B_CONFIG))
    assert share == pytest.approx(0.8187, abs=1e-4)  # not the 91 % once assumed
    # The fallback for entries without a config.json is this very figure.
    assert round(share, 3) == NF4_LINEAR_SHARE_FALLBACK
    assert nf4_linear_share_of_config.cache_info().currsize >= 1
    # The config describes the published weights: 8.875 GB of bf16 files, one tied embedding.
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_dict(QWEN3_VL_4B_CONFIG))
    params = sum(p.numel() for p in model.parameters())
    assert params * 2 == pytest.approx(sum(v for k, v in QWEN_4B.items()
                                           if k.endswith(".safetensors")), rel=1e-3)


def test_nf4_share_falls_back_without_a_usable_config(tmp_path):
    assert nf4_linear_share(None) == NF4_LINEAR_SHARE_FALLBACK
    assert nf4_linear_share(tmp_path / "absent") == NF4_LINEAR_SHARE_FALLBACK
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    assert nf4_linear_share(tmp_path) == NF4_LINEAR_SHARE_FALLBACK


def test_the_share_is_what_the_runtime_quantizes(tiny_kit):
    """Load the tiny kit's Qwen3-VL the way the appliance does (NF4 through bitsandbytes) and
    count: the estimate's share and skip list are the loader's."""
    bnb = require_module("bitsandbytes")
    require_module("accelerate")
    from appliance.vlm.transformers_runtime import QwenTransformersRuntime, TransformersVLMConfig

    folder, entries = tiny_kit
    hf = folder / "qwen3-vl-tiny"
    runtime = QwenTransformersRuntime(TransformersVLMConfig(hf, quantization="nf4", device="cpu"))
    try:
        model = runtime.model
        skip = model.config.quantization_config.llm_int8_skip_modules
        quantized = sum(m.in_features * m.out_features for m in model.modules()
                        if isinstance(m, bnb.nn.Linear4bit))
        packed = {id(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
        others = sum(p.numel() for p in model.parameters() if id(p) not in packed)
    finally:
        runtime.close()
    assert list(skip) == list(NF4_SKIP_MODULES)
    share = nf4_linear_share(hf)
    assert share == pytest.approx(quantized / (quantized + others), rel=1e-9)
    entry = replace(entries["qwen3-vl-tiny"], settings={**entries["qwen3-vl-tiny"].settings,
                                                         "quantization": "nf4"})
    params = sum(f.size for f in weight_files(entry, entry.settings)) / 4  # stored in fp32
    assert estimate(entry, ("policy",), folder=hf).resident == pytest.approx(
        params * (share * NF4_BYTES + (1 - share) * 2), rel=1e-3)


def test_kept_prefixes_are_counted_when_the_transformers_prefix_cache_is_on():
    from appliance.models.memory import PREFIX_TOKENS, QWEN_KV_PER_TOKEN, estimate

    entry = next(e for e in load_manifest(catalogue_path()).models if e.format == "transformers")
    entry = with_sizes(entry, SIZES[entry.name])
    role = tuple(entry.backends)
    off = estimate(entry, role, {"prefix_cache": False, "max_batch": 4})
    on = estimate(entry, role, {"prefix_cache": True, "max_batch": 4})
    assert on.resident - off.resident == pytest.approx(4 * PREFIX_TOKENS * QWEN_KV_PER_TOKEN)
    assert on.working == off.working
