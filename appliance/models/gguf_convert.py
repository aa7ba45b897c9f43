"""HF Qwen3-VL folder -> llama.cpp GGUF language model + mmproj, and a peft LoRA adapter of it ->
a llama.cpp LoRA GGUF, with llama.cpp's own converters.

The converter and its matching gguf-py are vendored from llama.cpp outside the package, in
``third_party/llama_cpp_convert/`` (MIT; its README says what was taken and PATCHES.md what we
changed), found there beside the checkout or at ``$APPLIANCE_LLAMA_CPP_CONVERT``. They expect
``conversion`` and ``gguf`` as top-level modules, so the conversion runs in a child Python with
those paths first, exactly as upstream's ``convert_hf_to_gguf.py`` arranges them; the caller's
own imports are never touched.

llama.cpp recognises a BPE pre-tokenizer by hashing how it splits a test string. A home-made
tokenizer (the tiny kit's) hashes to nothing it knows, so ``pre_tokenizer`` names the split rule
explicitly; the tiny kit uses Qwen2's exact regex, which llama.cpp calls "qwen2". Pass None to
keep upstream's detection (real checkpoints).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

OutType = Literal["f32", "f16", "bf16", "q8_0"]
VENDOR_ENV = "APPLIANCE_LLAMA_CPP_CONVERT"
ARCHITECTURE = "Qwen3VLForConditionalGeneration"


class ConversionError(RuntimeError):
    pass


def converter_dir() -> Path:
    """The vendored converter: ``$APPLIANCE_LLAMA_CPP_CONVERT``, else the checkout's third_party/."""
    folder = Path(os.environ.get(VENDOR_ENV) or
                  Path(__file__).resolve().parents[2] / "third_party" / "llama_cpp_convert")
    if not (folder / "conversion" / "__init__.py").is_file():
        raise ConversionError(f"llama.cpp's converter is not at {folder}: GGUF conversion runs from "
                              f"a checkout of the appliance (third_party/llama_cpp_convert) or "
                              f"from the folder ${VENDOR_ENV} names")
    return folder


def convert_qwen3vl(hf_dir: Path, out_dir: Path, outtype: OutType = "f16",
                    pre_tokenizer: str | None = "qwen2", timeout: float = 1800) -> tuple[Path, Path]:
    """Write ``model-<outtype>.gguf`` and ``mmproj-<outtype>.gguf`` into ``out_dir``."""
    hf_dir, out_dir = Path(hf_dir).resolve(), Path(out_dir).resolve()
    converter_dir()  # fail here, with a clear message, rather than in the child
    out_dir.mkdir(parents=True, exist_ok=True)
    model, mmproj = out_dir / f"model-{outtype}.gguf", out_dir / f"mmproj-{outtype}.gguf"
    command = [sys.executable, "-m", "appliance.models.gguf_convert", str(hf_dir), str(out_dir),
               "--outtype", outtype, "--pre-tokenizer", pre_tokenizer or ""]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not model.is_file() or not mmproj.is_file():
        raise ConversionError(f"GGUF conversion of {hf_dir} failed (exit {done.returncode}):\n"
                              f"{done.stderr[-4000:]}")
    return model, mmproj


def _convert_in_this_process(hf_dir: Path, out_dir: Path, outtype: str, pre_tokenizer: str) -> None:
    """The child's work: upstream's ``convert_hf_to_gguf.main`` for one text and one mmproj file."""
    vendor = converter_dir()
    sys.path[:0] = [str(vendor / "gguf_py"), str(vendor)]
    import gguf
    import torch
    from conversion import ModelType, get_model_class

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    with torch.inference_mode():
        for model_type, name in ((ModelType.TEXT, "model"), (ModelType.MMPROJ, "mmproj")):
            model_class = get_model_class(ARCHITECTURE, mmproj=model_type == ModelType.MMPROJ)
            if pre_tokenizer:
                model_class.get_vocab_base_pre = lambda self, tokenizer: pre_tokenizer
            converter = model_class(hf_dir, file_types[outtype], out_dir / f"{name}-{outtype}.gguf",
                                    eager=True)
            converter.write()


def convert_lora(adapter_dir: Path, base_hf_dir: Path, out_path: Path, outtype: OutType = "f16",
                 timeout: float = 1800) -> Path:
    """A peft LoRA adapter of the Qwen3-VL policy as a llama.cpp LoRA GGUF (``out_path``),
    with llama.cpp's ``convert_lora_to_gguf.py`` run whole in a child Python. ``base_hf_dir``:
    the base model's folder (only its config is read). Written under a temporary name and
    renamed, so ``out_path`` is complete or absent."""
    import json

    adapter_dir, base_hf_dir = Path(adapter_dir).resolve(), Path(base_hf_dir).resolve()
    out_path = Path(out_path).resolve()
    vendor = converter_dir()
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{adapter_dir} is not a peft adapter: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{adapter_dir}: only LoRA adapters convert, not {config['peft_type']}")
    if config.get("modules_to_save"):
        # A llama.cpp LoRA file holds low-rank pairs only; whole trained matrices do not fit.
        raise ConversionError(
            f"{adapter_dir} also trains {', '.join(config['modules_to_save'])} in full "
            "(modules_to_save); a llama.cpp LoRA cannot carry whole matrices, so this adapter "
            "runs on the transformers runtime only")
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(vendor / "gguf_py"), str(vendor),
                                          os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(vendor / "convert_lora_to_gguf.py"), "--base", str(base_hf_dir),
               "--outfile", str(tmp), "--outtype", outtype, str(adapter_dir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0 or not tmp.is_file():
            raise ConversionError(f"LoRA GGUF conversion of {adapter_dir} failed "
                                  f"(exit {done.returncode}):\n{done.stderr[-4000:]}")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--pre-tokenizer", default="qwen2")
    args = parser.parse_args()
    _convert_in_this_process(args.hf_dir, args.out_dir, args.outtype, args.pre_tokenizer)
