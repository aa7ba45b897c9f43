"""The tiny Qwen3-VL kit, built once per test run and shared by the VLM test files."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require_module

_CACHE: dict = {}


def tiny_qwen_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Qwen3-VL transformers folder (tokenizer, processor, template)."""
    require_module("transformers")
    if "hf" not in _CACHE:
        from appliance.models.tiny_kit import build_tiny_kit

        _CACHE["root"] = tmp_path_factory.mktemp("tiny-qwen")
        _CACHE["hf"] = build_tiny_kit(_CACHE["root"], seed=0, gguf=False).hf_dir
    return _CACHE["hf"]


def tiny_qwen_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same model as GGUF + mmproj, through the vendored llama.cpp converter."""
    require_module("llama_cpp", extra="gguf")
    if "gguf" not in _CACHE:
        from appliance.models.gguf_convert import convert_qwen3vl

        hf = tiny_qwen_hf(tmp_path_factory)
        _CACHE["gguf"] = convert_qwen3vl(hf, _CACHE["root"] / "gguf")
    return _CACHE["gguf"]


def tiny_qwen_thinking_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model whose chat template opens the reasoning block, as Thinking checkpoints do."""
    if "thinking" not in _CACHE:
        import shutil

        from appliance.models.tiny_kit import thinking_template

        folder = tmp_path_factory.mktemp("tiny-qwen-thinking") / "hf"
        shutil.copytree(tiny_qwen_hf(tmp_path_factory), folder)
        (folder / "chat_template.jinja").write_text(thinking_template(), encoding="utf-8")
        _CACHE["thinking"] = folder
    return _CACHE["thinking"]
