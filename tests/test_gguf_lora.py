"""A retrained policy's LoRA adapter as a llama.cpp LoRA: converted with llama.cpp's own
converter (vendored), loaded beside the shared base weights, and it changes what the model
writes; switching back to the base weights gives the base's answer again."""

from __future__ import annotations

import json
import shutil

import pytest
from _tiny_qwen import tiny_qwen_gguf, tiny_qwen_hf
from conftest import require_module

from appliance.models.gguf_convert import ConversionError, convert_lora
from appliance.vlm.chat import ChatRequest


def _peft_adapter(hf_dir, folder, modules_to_save=None):
    """A real peft LoRA on the language model's attention, with random (non-zero) B, so that
    it changes the output from the first token."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
                        modules_to_save=modules_to_save)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    require_module("peft")
    hf_dir = tiny_qwen_hf(tmp_path_factory)
    return hf_dir, _peft_adapter(hf_dir, tmp_path_factory.mktemp("lora") / "adapter")


def test_the_lora_converts_loads_and_changes_the_output(tmp_path_factory, adapter):
    require_module("llama_cpp", extra="gguf")
    from appliance.vlm.llamacpp_runtime import ADAPTER_GGUF, LlamaCppVLMConfig, QwenLlamaCppRuntime

    hf_dir, adapter_dir = adapter
    gguf = convert_lora(adapter_dir, hf_dir, adapter_dir / ADAPTER_GGUF)
    assert gguf.is_file() and not list(adapter_dir.glob(".*.tmp-*"))
    import sys

    from appliance.models.gguf_convert import converter_dir
    sys.path.insert(0, str(converter_dir() / "gguf_py"))
    try:
        from gguf import GGUFReader
        reader = GGUFReader(str(gguf))
        names = [t.name for t in reader.tensors]
        kind = bytes(reader.fields["general.type"].parts[-1]).decode()
    finally:
        sys.path.remove(str(converter_dir() / "gguf_py"))
        for module in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
            del sys.modules[module]
    assert kind == "adapter"
    assert any(n.endswith("attn_q.weight.lora_a") for n in names)
    assert len(names) == 2 * 4 * 2  # two layers, four projections, A and B

    model, mmproj = tiny_qwen_gguf(tmp_path_factory)
    runtime = QwenLlamaCppRuntime(LlamaCppVLMConfig(model, mmproj, n_ctx=4096, max_new_tokens=12,
                                                    do_sample=False))
    try:
        request = ChatRequest([{"role": "user", "content": [
            {"type": "text", "text": "Which defect would you add to this part?"}]}], [])
        [base] = runtime.chat([request])
        name = runtime.load_adapter(adapter_dir, name="gear@test")
        assert runtime.load_adapter(adapter_dir, name="gear@test") == name  # once only
        [tuned] = runtime.chat([request], adapter=name)
        [again] = runtime.chat([request])
        [tuned_again] = runtime.chat([request], adapter=name)
        assert base.text and tuned.text != base.text
        assert again.text == base.text and tuned_again.text == tuned.text
        with pytest.raises(KeyError, match="not loaded"):
            runtime.chat([request], adapter="other")
        empty = adapter_dir.parent / "no-gguf"
        empty.mkdir()
        with pytest.raises(FileNotFoundError, match="adapter.gguf"):
            runtime.load_adapter(empty)
    finally:
        runtime.close()


def test_an_adapter_with_whole_trained_matrices_is_refused_with_the_reason(tmp_path, adapter):
    hf_dir, adapter_dir = adapter
    copy = tmp_path / "adapter"
    shutil.copytree(adapter_dir, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["modules_to_save"] = ["lm_head", "embed_tokens"]
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="lm_head, embed_tokens in full"):
        convert_lora(copy, hf_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    with pytest.raises(ConversionError, match="not a peft adapter"):
        convert_lora(tmp_path, hf_dir, tmp_path / "out.gguf")
