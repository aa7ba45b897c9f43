"""The whole tiny model kit in one models folder with a valid manifest.

``build_tiny_models(folder)`` writes random-weight stand-ins for every role of the GPU engine:
Qwen3-VL (transformers folder, and GGUF + mmproj when llama.cpp's converter is available; built by
``tiny_kit.py``), SDXL inpainting and Flux Fill (``tiny_diffusion.py``) and MetaUAS ONNX
(``tiny_metauas.py``). The manifest has every file's sha256, so the folder is an installed models
folder as far as ``appliance models list/verify`` and the engine are concerned, and a bundle as far
as ``appliance models install`` is concerned.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from appliance.models.bundle import describe_folder
from appliance.models.manifest import Manifest, ModelEntry, write_manifest

# Backend names the tiny entries declare; they must match the names registered in engine.py.
QWEN_TRANSFORMERS_POLICY = "qwen-transformers"
QWEN_LLAMA_CPP_POLICY = "qwen-llamacpp"
VLM_PROMPT_GEN = "vlm"
VLM_QUALITY_EVAL = "vlm"

PARTS = ("qwen", "gguf", "sdxl", "flux", "metauas")
# Random weights cannot follow the protocol: the engine makes them write what the built-in
# backends would (see ``GUIDES`` in engine.py), so `appliance batch` runs end to end on the kit.
GUIDE = "scripted"


def _entry(name: str, folder: Path, backends: dict[str, str], fmt: str, settings: dict,
           notes: str) -> ModelEntry:
    return ModelEntry(name=name, repo=f"local/{name}", revision="tiny-random", licence="MIT",
                      format=fmt, backends=backends, files=describe_folder(folder),
                      settings=settings, source={"built_by": "appliance.models.tiny_models"},
                      notes=notes)


# Short budgets: unguided (selftest --real), a random model writes noise to the very end of them.
TINY_ROLES = {role: {"reasoning_budget": 32, "action_budget": 32}
              for role in ("policy", "prompt_gen", "quality_eval")}


# Random weights give near-uniform logits that a LoRA on the attention and MLP projections cannot
# sharpen (the output head's rows are too short): `appliance retrain` also trains the head and
# the embeddings of this model in full. A real checkpoint's bundle has no such setting.
TINY_TRAINING = {"modules_to_save": ["lm_head", "embed_tokens"]}


def _build_qwen(folder: Path, seed: int, gguf: bool) -> list[ModelEntry]:
    """The other half of the kit (``tiny_kit.py``), placed under our folder names."""
    from appliance.models.tiny_kit import build_tiny_kit

    scratch = Path(tempfile.mkdtemp(prefix=".qwen-", dir=folder))
    try:
        kit = build_tiny_kit(scratch, seed=seed, gguf=gguf)
        entries = []
        hf = folder / "qwen3-vl-tiny"
        shutil.move(str(kit.hf_dir), hf)
        entries.append(_entry("qwen3-vl-tiny", hf, {
            "policy": QWEN_TRANSFORMERS_POLICY, "prompt_gen": VLM_PROMPT_GEN,
            "quality_eval": VLM_QUALITY_EVAL}, "transformers",
            {"quantization": "none", "max_new_tokens": 64, "guide": GUIDE, "roles": TINY_ROLES,
             "training": TINY_TRAINING},
            "Random-weight Qwen3-VL: runs the real code; it cannot follow the protocol, so it "
            "is guided (made to write what the CPU backends would)."))
        if kit.gguf is not None and kit.mmproj is not None:
            gguf_dir = folder / "qwen3-vl-tiny-gguf"
            gguf_dir.mkdir()
            shutil.move(str(kit.gguf), gguf_dir / kit.gguf.name)
            shutil.move(str(kit.mmproj), gguf_dir / kit.mmproj.name)
            entries.append(_entry("qwen3-vl-tiny-gguf", gguf_dir,
                                  {"policy": QWEN_LLAMA_CPP_POLICY}, "gguf",
                                  {"model": kit.gguf.name, "mmproj": kit.mmproj.name,
                                   "guide": GUIDE, "roles": TINY_ROLES},
                                  "Random-weight Qwen3-VL as GGUF + mmproj for llama-cpp-python, "
                                  "guided like the transformers copy."))
        return entries
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build_tiny_models(folder: Path, seed: int = 0, parts: Iterable[str] | None = None,
                      progress: Callable[[str], None] | None = None) -> Manifest:
    """Build the kit into ``folder`` (created) and write ``folder/manifest.toml``.

    ``parts`` limits what is built (names in ``PARTS``); by default everything whose libraries
    are installed: diffusers for SDXL/Flux, onnxruntime for MetaUAS, transformers for Qwen and
    llama-cpp-python for the GGUF pair (the converter is vendored: it needs no ``gguf`` package).
    """
    from appliance.models.tiny_diffusion import (TINY_SETTINGS, build_tiny_flux_fill,
                                                 build_tiny_sdxl_inpaint)
    from appliance.models.tiny_metauas import build_tiny_metauas

    say = progress or (lambda _message: None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    have = importlib.util.find_spec
    wanted = set(parts) if parts is not None else {
        p for p, ok in (("qwen", have("transformers")), ("gguf", have("llama_cpp")),
                        ("sdxl", have("diffusers")), ("flux", have("diffusers")),
                        ("metauas", have("onnxruntime"))) if ok}
    unknown = wanted - set(PARTS)
    if unknown:
        raise ValueError(f"unknown tiny kit parts {sorted(unknown)}; parts: {', '.join(PARTS)}")
    entries: list[ModelEntry] = []
    if "qwen" in wanted:
        say("building tiny Qwen3-VL" + (" (+ GGUF)" if "gguf" in wanted else ""))
        try:
            entries += _build_qwen(folder, seed, gguf="gguf" in wanted)
        except ImportError as exc:
            # The Qwen half lives in tiny_kit.py (another module); without it the rest still builds.
            say(f"skipping tiny Qwen3-VL: {exc}")
    if "sdxl" in wanted:
        say("building tiny SDXL inpainting")
        path = build_tiny_sdxl_inpaint(folder / "sdxl-inpaint-tiny", seed)
        entries.append(_entry("sdxl-inpaint-tiny", path, {"image_gen": "sdxl-inpaint"},
                              "diffusers", dict(TINY_SETTINGS), "Random-weight SDXL inpainting."))
    if "flux" in wanted:
        say("building tiny Flux Fill")
        path = build_tiny_flux_fill(folder / "flux-fill-tiny", seed)
        entries.append(_entry("flux-fill-tiny", path, {"image_gen": "flux-fill"}, "diffusers",
                              dict(TINY_SETTINGS), "Random-weight Flux Fill."))
    if "metauas" in wanted:
        say("building tiny MetaUAS ONNX")
        path = build_tiny_metauas(folder / "metauas-tiny", seed=seed).parent
        entries.append(_entry("metauas-tiny", path, {"mask_gen": "metauas-onnx"}, "onnx",
                              {"threshold": 0.5}, "Random-weight MetaUAS-shaped network."))
    manifest = Manifest(entries, bundle={"kind": "tiny-kit", "seed": seed})
    write_manifest(manifest, folder, header="Tiny random-weight model kit for tests and selftest.")
    manifest.path = folder / "manifest.toml"
    return manifest
