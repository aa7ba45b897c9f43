"""`appliance batch` on the GPU engine, end to end on CPU: the tiny random-weight model kit is
installed as a bundle with `appliance models install`, and the real command line picks the
engine from it (`--engine auto`) and writes a dataset with each policy backend.

The kit's Qwen3-VL entries say ``guide = "scripted"``: random weights cannot follow the protocol,
so the real processor, model and generation loop are made to write what the built-in backends
decide (forced decoding), and every record says so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, REQUIRED_EXTRAS, require_module
from PIL import Image

from appliance.dataset.check import check_dataset
from appliance.imaging import changed_pixels, load_rgb

for _name in ("diffusers", "onnxruntime", "transformers"):
    require_module(_name)

# The GGUF converter is vendored (third_party/llama_cpp_convert): llama-cpp-python is all
# the llama.cpp backend needs. It is the optional gguf extra, except in a run that requires it
# (.ci/run sets APPLIANCE_TEST_EXTRAS=test,gguf): there a missing llama_cpp fails.
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
if not HAVE_LLAMA and "gguf" in REQUIRED_EXTRAS:
    pytest.fail("llama_cpp is not importable but this run requires the gguf extra "
                "(APPLIANCE_TEST_EXTRAS; .ci/run builds it): reinstall with "
                "EXTRAS=test,gguf ./install.sh", pytrace=False)


def appliance(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory, tile_paths):
    """A box with the tiny kit installed from a bundle and an inbox of two tile photos."""
    from appliance.models.tiny_models import build_tiny_models

    root = tmp_path_factory.mktemp("gpu-engine")
    parts = ["qwen", "sdxl", "flux", "metauas"] + (["gguf"] if HAVE_LLAMA else [])
    build_tiny_models(root / "bundle", parts=parts)
    env = {**os.environ, "APPLIANCE_MODELS": str(root / "models"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    installed = appliance("models", "install", str(root / "bundle"), env=env)
    assert installed.returncode == 0, installed.stderr
    inbox = root / "inbox" / "magnetic_tile"
    inbox.mkdir(parents=True)
    for path in tile_paths[:2]:
        shutil.copy(path, inbox / path.name)
    return root, env


CASES = [
    pytest.param((), "qwen-transformers", "sdxl-inpaint", id="transformers-sdxl"),
    pytest.param(("--backend", "policy=qwen-llamacpp", "--backend", "image_gen=flux-fill"),
                 "qwen-llamacpp", "flux-fill", id="llamacpp-flux",
                 marks=pytest.mark.skipif(
                     not HAVE_LLAMA,
                     reason="llama_cpp: the optional 'gguf' extra is not installed "
                            "(EXTRAS=test,gguf ./install.sh)")),
]


@pytest.mark.parametrize("options, policy, image_gen", CASES)
def test_batch_writes_a_dataset_on_the_tiny_gpu_engine(site, options, policy, image_gen):
    root, env = site
    out = root / f"dataset-{policy}"
    command = ("batch", str(root / "inbox"), "--out", str(out), "--defect", "crack",
               "--no-progress", *options)
    done = appliance(*command, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # The engine and the reason for each backend are printed before the run.
    assert f"engine auto: policy={policy}, prompt_gen=vlm, image_gen={image_gen}" in done.stderr
    assert "guided by scripted (random-weight test model" in done.stderr
    assert "samples written    2" in done.stdout

    report = check_dataset(out)
    assert report.ok, report.problems
    assert report.samples == 2 and report.normals == 2
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for record in records:
        assert record["engine"] == "auto"
        assert record["policy"] == f"{policy} (guided by scripted)"
        assert record["backends"] == {
            "prompt_gen": "vlm (guided by knowledge)", "image_gen": image_gen,
            "quality_eval": "vlm (guided by heuristic)", "knowledge_retrieval": "faiss-minilm",
            "mask_gen": "metauas-onnx"}
        episode = json.loads((out / record["trajectory"] / "episode.json").read_text())
        final = next(a for a in episode["attempts"] if a["image_index"] == episode["final_image_index"])
        assert final["params"]["backend"] == image_gen  # painted by the diffusion pipeline
        assert episode["tool_sequence"][0] == "prompt_gen" and episode["tool_sequence"][-1] == "mask_gen"
        # The judge's grade went through the model's decoded JSON, not the fallback.
        assert "fallback" not in final["report"]["measurements"]
        assert final["report"]["measurements"]["judge"].startswith("transformers:qwen3-vl-tiny")
        # Pixels changed only inside the painted crop, and the mask covers the change.
        source = load_rgb(next((root / "inbox").rglob(Path(record["source"]).name)))
        image = np.asarray(Image.open(out / record["image"]).convert("RGB"))
        mask = np.asarray(Image.open(out / record["mask"])) > 0
        changed = changed_pixels(source, image)
        x0, y0, x1, y1 = final["params"]["crop"]
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        assert changed.any() and not outside.any()
        assert (mask & changed).sum() >= 0.5 * changed.sum()
    # Re-running the same batch writes nothing twice.
    again = appliance(*command, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "skipped, already done: 2" in again.stdout
    assert check_dataset(out).samples == 2


def test_models_list_says_which_engine_runs_and_why(site):
    root, env = site
    listed = appliance("models", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "engine that will run: auto" in listed.stdout
    policy = next(line for line in listed.stdout.splitlines() if line.strip().startswith("policy"))
    assert "qwen-transformers" in policy and "qwen3-vl-tiny is installed" in policy
    assert "guided by scripted" in policy


def test_unknown_backend_override_is_refused(site):
    root, env = site
    done = appliance("batch", str(root / "inbox"), "--out", str(root / "never"),
                     "--backend", "policy=gpt-9", env=env)
    assert done.returncode == 2
    assert "unknown policy backend 'gpt-9'" in done.stderr
    done = appliance("batch", str(root / "inbox"), "--out", str(root / "never"),
                     "--backend", "policy", env=env)
    assert done.returncode == 2 and "is not ROLE=BACKEND" in done.stderr
    assert not (root / "never").exists()


def test_gpu_memory_plan_is_shown_and_applied(site):
    from dataclasses import replace

    import torch

    from appliance.engine import build_engine, plan_gpu_memory, resolve_engine_config

    root, env = site
    listed = appliance("models", "list", "--gpu-memory", "24", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "GPU memory:" in listed.stdout and "of 24.0 GB" in listed.stdout and "- fits" in listed.stdout
    assert "qwen3-vl-tiny            policy+prompt_gen+quality_eval" in listed.stdout
    config, _ = resolve_engine_config("auto", models_dir=root / "models")
    too_small = plan_gpu_memory(replace(config, gpu_memory_gb=1.0), device="cuda")
    assert not too_small.fits and "does not fit in 1.0 GB" in too_small.message
    # Whatever the plan changes reaches the backend through the engine's model settings.
    config = replace(config, model_settings={"sdxl-inpaint-tiny": {"steps": 1, "max_batch": 1}})
    engine = build_engine(config)
    try:
        assert engine.tools.image_gen.settings.steps == 1
        assert engine.tools.image_gen.settings.max_batch == 1
        assert engine.memory is not None
        if torch.cuda.is_available():  # the plan estimates each installed model on the GPU
            assert engine.memory.before
        else:  # a CPU-only box: nothing to plan
            assert engine.memory.before == []
    finally:
        engine.close()
