"""bench/gpu_pipeline.py: its --tiny mode runs every stage on CPU as a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import require_module

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu_pipeline.py"
STAGE = re.compile(r"^stage  (.+?)\s+(\d+\.\d+) s   peak RSS (\d+) MB")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_pipeline", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    for name in ("transformers", "diffusers", "onnxruntime", "bitsandbytes", "accelerate"):
        require_module(name)
    out = tmp_path_factory.mktemp("gpu-bench") / "tiny.json"
    done = subprocess.run([sys.executable, str(BENCH), "--tiny", "--ig", "sdxl", "flux",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text(encoding="utf-8"))


def test_tiny_mode_prints_every_stage_with_time_and_peak_memory(tiny_run):
    stdout, report = tiny_run
    stages = {m.group(1): (float(m.group(2)), int(m.group(3)))
              for m in map(STAGE.match, stdout.splitlines()) if m}
    expected = {"build KR", "write VLM folder", "load VLM policy (nf4)", "load VLM pgqe (nf4)",
                "export MG"}
    for name in ("sdxl", "flux"):
        expected |= {f"build IG {name}", f"{name}: warm-up"}
        expected |= {f"{name}: {kind} b={size}" for kind in ("ig", "policy", "pg", "qe", "kr", "mg")
                     for size in (1, 2)}
    assert expected <= set(stages), sorted(expected - set(stages))
    assert all(seconds >= 0 and rss > 0 for seconds, rss in stages.values())
    assert [row["stage"] for row in report["stages"]] == [m for m in stages]
    assert "not measured" not in stdout
    for name in ("sdxl", "flux"):
        assert f"== engine with {name} ==" in stdout
        engine = report["engines"][name]
        # Loaded by the appliance's own code: VAE slicing as the product sets it.
        assert engine["vae"]["slicing"] is True
        for attempts in ("1", "2", "3"):
            row = engine["episodes"][attempts]
            assert row["seconds_per_episode_batch1"] > 0 and row["episodes_per_hour_batched"] > 0
        # 3 of the 12 policy contexts measured per batch size, the other 9 interpolated.
        policy = [k for k in engine["calls"] if k.lstrip("~").startswith("policy(")]
        assert len(policy) == 24 and sum(k.startswith("~") for k in policy) == 18
        assert engine["peak_planned_gb"] > 1.0  # the plan's CUDA context at least


def test_tiny_mode_loads_the_vlm_as_the_appliance_does(tiny_run):
    """NF4 through the appliance's runtime: the share of quantized weights counted on the loaded
    model is the one the memory plan derives from the config."""
    _, report = tiny_run
    for copy in ("policy", "pgqe"):
        vlm = report["vlm"][copy]
        assert 0 < vlm["nf4_share_loaded"] < 1
        assert vlm["nf4_share_loaded"] == pytest.approx(vlm["nf4_share_derived"], abs=1e-4)


def test_policy_calls_between_measurements_are_interpolated():
    bench = load_bench()
    vision = SimpleNamespace(patch_size=16, spatial_merge_size=2)
    model = SimpleNamespace(config=SimpleNamespace(vision_config=vision))
    plan = bench.TokenPlan()
    harness = bench.Harness(model, model, None, None, None, plan, "cpu")
    policy = sorted((c for c in bench.distinct_calls(plan) if c.kind == "policy"),
                    key=lambda c: bench.prompt_tokens(c, 400))
    chosen = bench.sampled(policy, 3)
    assert chosen[0] == policy[0] and chosen[-1] == policy[-1] and len(chosen) == 3
    for call in chosen:  # 2 ms per prompt token plus 5 s of decoding
        harness.cache[(call, 1)] = 5.0 + 0.002 * bench.prompt_tokens(call, 400)
    harness.interpolate(policy, 1)
    assert len(harness.interpolated) == len(policy) - 3
    for call in policy:
        assert harness.seconds(call, 1) == pytest.approx(5.0 + 0.002 * bench.prompt_tokens(call, 400))
    assert harness.seconds(policy[0], 8) is None  # batch 8 was not measured
    rows = bench.episode_rows(harness, 8)
    assert "seconds_per_episode_batch1" not in rows[1]  # no IG/MG/... timing: not measured


def test_without_cuda_it_refuses_unless_tiny():
    torch = require_module("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    done = subprocess.run([sys.executable, str(BENCH)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "--tiny" in done.stderr


TRAIN_BENCH = ROOT / "bench" / "train_gpu.py"


def test_train_bench_runs_one_sft_and_one_grpo_step_in_tiny_mode(tmp_path):
    """bench/train_gpu.py through the retrain code on the tiny model (the GPU run measures the
    full-size one): one SFT step, one GRPO step with G = 8, figures in the JSON."""
    for name in ("transformers", "trl", "peft"):
        require_module(name)
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, str(TRAIN_BENCH), "--tiny", "--reasoning", "16",
                           "--action", "16", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text(encoding="utf-8"))
    assert figures["tiny"] is True and figures["generations"] == 8
    assert figures["sft"]["seconds_per_step"] > 0 and figures["grpo"]["seconds_per_step"] > 0
    assert "SFT step" in done.stdout and "GRPO step (G = 8)" in done.stdout


def test_train_bench_refuses_without_cuda_unless_tiny():
    torch = require_module("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    done = subprocess.run([sys.executable, str(TRAIN_BENCH)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "--tiny" in done.stdout
