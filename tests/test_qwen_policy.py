"""The Qwen3-VL policy backends on a tiny random-weight model built from a config.

A random model cannot follow the protocol, so the episode tests force it to write the scripted
policy's messages token by token (the processor, vision tower, language model and generation
loop all run); the trajectory must then be exactly the scripted policy's own. Batching, 4-bit
loading, LoRA adapters and the message conversion are checked on their own.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from _tiny_qwen import tiny_qwen_gguf, tiny_qwen_hf
from conftest import require_module

from appliance.agent.environment import AgentEnvironment
from appliance.agent.episode import EnvConfig, EpisodeSpec
from appliance.agent.protocol import format_tool_call, parse_assistant_message
from appliance.policies.scripted import ScriptedPolicy
from appliance.vlm.budget import Budget
from appliance.vlm.chat import finish_text, fit_pixels, template_messages, to_chat_request


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_qwen_hf(tmp_path_factory)


@pytest.fixture(scope="module")
def runtime(hf_dir):
    from appliance.vlm.transformers_runtime import QwenTransformersRuntime, TransformersVLMConfig

    loaded = QwenTransformersRuntime(TransformersVLMConfig(hf_dir, do_sample=False, max_new_tokens=8))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def specs(texture_image):
    from skimage import data

    grass = np.repeat(data.grass()[:160, :192, None], 3, axis=2)
    return [EpisodeSpec(texture_image[:192, :192], "magnetic_tile", "crack", seed=3),
            EpisodeSpec(grass, "magnetic_tile", "crack", seed=4)]


def _environment(engine) -> AgentEnvironment:
    return AgentEnvironment(engine.tools, EnvConfig(max_image_gen=2))


def _texts(result) -> list[tuple[str, str]]:
    return [(m["role"], "".join(p.get("text", "") for p in m["content"])) for m in result.messages]


# --- the message conversion -------------------------------------------------------------------


def test_environment_messages_become_template_messages_with_their_pictures():
    normal = np.zeros((40, 50, 3), np.uint8)
    edited = np.full((40, 50, 3), 200, np.uint8)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "rules"}]},
        {"role": "user", "content": [{"type": "image", "image_index": 1},
                                     {"type": "text", "text": "task"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<thinking>a</thinking>"}]},
        {"role": "tool", "name": "image_gen", "content": [
            {"type": "text", "text": "[Tool Response from image_gen]\n{}"},
            {"type": "image", "image_index": 2}]},
    ]
    request = to_chat_request(messages, [normal, edited], seed=5)
    assert [m["role"] for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "task"}]
    assert request.messages[3]["content"][1] == {"type": "image"}
    # Pictures in order of appearance, as RGB of the right size and content.
    assert [np.asarray(p).mean() for p in request.images] == [0, 200]
    assert all(p.mode == "RGB" and p.size == (50, 40) for p in request.images)
    # What the template gets: text-only messages as plain strings, pictures as parts.
    rendered = template_messages(request.messages)
    assert rendered[2] == {"role": "assistant", "content": "<thinking>a</thinking>"}
    assert rendered[3]["content"][1] == {"type": "image"}
    with pytest.raises(ValueError, match="image 3"):
        to_chat_request(messages + [{"role": "tool", "name": "x", "content": [
            {"type": "image", "image_index": 3}]}], [normal, edited])


def test_the_template_renders_tool_responses_and_one_placeholder_per_picture(runtime, specs):
    environment_messages = [
        {"role": "system", "content": [{"type": "text", "text": "rules"}]},
        {"role": "user", "content": [{"type": "image", "image_index": 1},
                                     {"type": "text", "text": "task"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "<thinking>a</thinking>"}]},
        {"role": "tool", "name": "image_gen", "content": [
            {"type": "text", "text": "[Tool Response from image_gen]\n{}"},
            {"type": "image", "image_index": 2}]},
    ]
    request = to_chat_request(environment_messages, [specs[0].image, specs[1].image])
    text = runtime.render(request)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert "<|im_start|>user\n<tool_response>\n[Tool Response from image_gen]" in text
    assert text.endswith("<|im_start|>assistant\n")
    inputs = runtime.processor(text=[text], images=request.images, return_tensors="pt")
    pad = runtime.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = runtime.processor.image_processor.merge_size ** 2
    assert int((inputs["input_ids"] == pad).sum()) == int(inputs["image_grid_thw"].prod(-1).sum()) // merge


def test_the_vendored_template_is_trls_qwen3_vl_template_byte_for_byte():
    trl = require_module("trl")
    from pathlib import Path

    from appliance.vlm.chat_template import QWEN3_VL_CHAT_TEMPLATE

    shipped = Path(trl.__file__).parent / "chat_templates" / "qwen3_vl.jinja"
    assert shipped.is_file(), (f"trl {trl.__version__} no longer ships {shipped}: find where it keeps "
                               "the Qwen3-VL template now and compare appliance/vlm/chat_template.py")
    assert QWEN3_VL_CHAT_TEMPLATE == shipped.read_text(encoding="utf-8")


def test_thinking_output_gets_its_opening_tag_back():
    # Thinking checkpoints open <think> in the prompt: the reply only closes it.
    text = finish_text("I should call prompt_gen.</think>\n<tool_call>{\"name\": \"prompt_gen\", "
                       "\"arguments\": {\"image\": 1}}</tool_call><|im_end|>")
    parsed = parse_assistant_message(text)
    assert parsed.thinking == "I should call prompt_gen."
    assert parsed.action.name == "prompt_gen"
    assert finish_text("<think>a</think> b") == "<think>a</think> b"


# --- generation -------------------------------------------------------------------------------


def test_batched_generation_matches_one_at_a_time(runtime, specs):
    """Left padding must not change what a conversation decodes to."""
    short = to_chat_request([{"role": "user", "content": [
        {"type": "image", "image_index": 1}, {"type": "text", "text": "crack?"}]}], [specs[0].image])
    long = to_chat_request([
        {"role": "system", "content": [{"type": "text", "text": "You grade defects. " * 20}]},
        {"role": "user", "content": [{"type": "image", "image_index": 1},
                                     {"type": "text", "text": "Where would a crack go?"}]}],
        [specs[1].image])
    together = [r.text for r in runtime.chat([short, long], max_new_tokens=6)]
    alone = [runtime.chat([short], max_new_tokens=6)[0].text,
             runtime.chat([long], max_new_tokens=6)[0].text]
    assert together == alone
    assert all(text for text in together)


def test_forced_decoding_writes_exactly_the_target(runtime, specs):
    request = to_chat_request([{"role": "user", "content": [
        {"type": "image", "image_index": 1}, {"type": "text", "text": "go"}]}], [specs[0].image])
    target = format_tool_call("I start with the instruction.", "prompt_gen",
                              {"image": 1, "item_name": "magnetic_tile", "anomaly_type": "crack"})
    free, forced = runtime.chat([request, replace(request, forced=target)], max_new_tokens=4)
    assert forced.text == target
    assert free.text != target


def test_transformers_policy_replays_the_scripted_episode_exactly(hf_dir, engine, specs):
    from appliance.policies.vlm import QwenTransformersPolicy
    from appliance.vlm.transformers_runtime import TransformersVLMConfig

    environment = _environment(engine)
    expected = environment.run(specs, ScriptedPolicy())
    policy = QwenTransformersPolicy(TransformersVLMConfig(hf_dir, max_new_tokens=16),
                                    guide=ScriptedPolicy())
    try:
        results = environment.run(specs, policy)
    finally:
        policy.close()
    for got, want in zip(results, expected):
        assert got.status == want.status and got.status in ("accepted", "rejected")
        assert got.errors == []
        assert got.tool_sequence == want.tool_sequence
        assert got.tool_sequence[0] == "prompt_gen" and got.tool_sequence[-1] == "mask_gen"
        assert _texts(got) == _texts(want)
        assert got.policy == "qwen-transformers (guided by scripted)"


def test_llamacpp_policy_replays_the_scripted_episode_exactly(tmp_path_factory, engine, specs):
    from appliance.policies.vlm import QwenLlamaCppPolicy
    from appliance.vlm.llamacpp_runtime import LlamaCppVLMConfig, image_data_uri

    model, mmproj = tiny_qwen_gguf(tmp_path_factory)
    environment = _environment(engine)
    expected = environment.run(specs[:1], ScriptedPolicy())
    policy = QwenLlamaCppPolicy(LlamaCppVLMConfig(model, mmproj, n_ctx=8192, max_new_tokens=16),
                                guide=ScriptedPolicy())
    try:
        result = environment.run(specs[:1], policy)[0]
        # Unguided, the random model still answers through the multimodal handler, including
        # pictures that arrive in tool messages.
        state = environment.reset(specs[0])
        state.images.append(specs[1].image)
        state.messages.append({"role": "tool", "name": "image_gen", "content": [
            {"type": "text", "text": "[Tool Response from image_gen]\n{}"},
            {"type": "image", "image_index": 2}]})
        policy.guide = None
        policy.budget = Budget(0, 5)
        handler = policy.runtime.llm.chat_handler
        loaded = []

        def recording_load_image(url, _load=handler.load_image):
            loaded.append(url)
            return _load(url)

        handler.load_image = recording_load_image
        try:
            first = policy.act([state])
        finally:
            del handler.load_image
        # Both pictures reached the handler (resized to the pixel cap): the photo and the one
        # from the tool message.
        [request] = policy.requests([state])
        config = policy.runtime.config
        assert loaded == [image_data_uri(fit_pixels(image, config.min_pixels, config.max_pixels))
                          for image in request.images]
        assert len(loaded) == 2
        # Seeded per turn from the spec seed: an episode replays identically.
        assert first == policy.act([state])
    finally:
        policy.close()
    assert result.errors == [] and result.status == expected[0].status
    assert _texts(result) == _texts(expected[0])
    assert result.policy == "qwen-llamacpp (guided by scripted)"


# --- 4-bit and LoRA ---------------------------------------------------------------------------


def test_nf4_loading_quantizes_the_language_model_only(hf_dir, specs):
    bnb = require_module("bitsandbytes")
    require_module("accelerate")

    from appliance.vlm.transformers_runtime import QwenTransformersRuntime, TransformersVLMConfig

    quantized = QwenTransformersRuntime(TransformersVLMConfig(hf_dir, quantization="nf4",
                                                              do_sample=False))
    try:
        names = [n for n, m in quantized.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert any("language_model" in n for n in names)
        assert not any("visual" in n or "lm_head" in n for n in names)
        request = to_chat_request([{"role": "user", "content": [
            {"type": "image", "image_index": 1}, {"type": "text", "text": "go"}]}], [specs[0].image])
        target = "<think>4-bit works.</think>\n<answer>{\"status\": \"failed\"}</answer>"
        assert quantized.chat([replace(request, forced=target)])[0].text == target
    finally:
        quantized.close()


def test_lora_adapter_changes_the_policy_and_not_the_shared_base(hf_dir, tmp_path, specs):
    require_module("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    from appliance.policies.vlm import QwenTransformersPolicy
    from appliance.vlm.resident import loaded_runtimes
    from appliance.vlm.transformers_runtime import TransformersVLMConfig

    base = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir)
    # Random (not identity) LoRA weights, so the adapter visibly changes the output.
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, init_lora_weights=False,
                                           target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    config = TransformersVLMConfig(hf_dir, do_sample=False, max_new_tokens=6)
    policy = QwenTransformersPolicy(config, adapter_dir=tmp_path / "adapter")
    request = to_chat_request([{"role": "user", "content": [
        {"type": "image", "image_index": 1}, {"type": "text", "text": "go"}]}], [specs[0].image])
    try:
        with_adapter = policy.runtime.chat([request], adapter=policy.adapter)[0].text
        without = policy.runtime.chat([request])[0].text  # what PG/QE on the same weights get
        assert policy.adapter == "adapter"
        assert with_adapter != without
        assert len(loaded_runtimes()) == 1
    finally:
        policy.close()
    assert loaded_runtimes() == []


def test_engine_builds_vlm_backends_from_an_installed_models_folder(hf_dir, engine, specs, tmp_path):
    """Policy, PG and QE named on one manifest entry share one resident model."""
    from appliance.engine import EngineConfig, build_engine
    from appliance.models.bundle import describe_folder
    from appliance.models.manifest import Manifest, ModelEntry, write_manifest
    from appliance.vlm.resident import loaded_runtimes

    entry = ModelEntry(name=hf_dir.name, repo="local/tiny", revision="tiny", licence="MIT",
                       format="transformers", files=describe_folder(hf_dir),
                       backends={"policy": "qwen-transformers", "prompt_gen": "vlm",
                                 "quality_eval": "vlm"},
                       settings={"quantization": "none", "max_new_tokens": 8})
    write_manifest(Manifest([entry]), hf_dir.parent)
    config = replace(EngineConfig(), name="tiny-vlm", policy="qwen-transformers",
                     prompt_gen="vlm", quality_eval="vlm", models_dir=hf_dir.parent)
    built = build_engine(config)
    try:
        assert len(loaded_runtimes()) == 1
        assert built.tools.prompt_gen.runtime is built.policy.runtime is built.tools.quality_eval.runtime
        assert built.describe()["policy"] == "qwen-transformers"
    finally:
        built.close()
    assert loaded_runtimes() == []
    with pytest.raises(ValueError, match="unknown transformers VLM setting"):
        from appliance.vlm.transformers_runtime import transformers_config

        transformers_config(hf_dir, {"quantisation": "nf4"})
