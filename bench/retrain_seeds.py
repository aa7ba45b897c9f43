"""The learning loop on the tiny test policy, over seeds: base weights, SFT, GRPO on top of SFT.

    python bench/retrain_seeds.py                       # seeds 0-2, about 9 minutes a seed on 2 cores
    python bench/retrain_seeds.py --seeds 0,1,2,3,4 --json retrain.json

For each seed, in a fresh folder: the tiny random-weight Qwen3-VL kit, then ``appliance retrain``
as a user runs it (a subprocess, ``--stage all``) on the first ``--photos`` crack and blowhole
photos of the magnetic tiles, with the CPU prompt generator and judge. Its gate measures the base
weights, the SFT adapter and the GRPO adapter on the held-out photos of that folder (20 % of each
type, ``--heldout-runs`` episodes each). The SFT and GRPO adapters are then also run on
``--unseen`` other real photos of each type, never in the folder (every fifth of the rest, two
episodes each, the same episode seeds for both adapters): more episodes than the gate has, so a
difference between the adapters is less often one episode's luck.

Printed per seed and as means: the share of episodes that followed the protocol to an answer
("complete") and the mean held-out reward (``appliance/training/rewards.py``), and GRPO's reward
minus SFT's. The figures are in docs/retraining.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TILES = REPO.parent / "shared" / "datasets" / "magnetic-tile"
TYPES = ("MT_Crack", "MT_Blowhole")
CATEGORY = "magnetic_tile"
CPU_TOOLS = ("--backend", "prompt_gen=knowledge", "--backend", "quality_eval=heuristic")


def photo_sets(photos: int, unseen: int) -> dict[str, tuple[list[Path], list[Path]]]:
    """Per type: the photos retrain gets, and the unseen ones (every fifth of the rest)."""
    sets = {}
    for folder in TYPES:
        paths = sorted((TILES / folder / "Imgs").glob("*.jpg"))
        if len(paths) < photos + 5:
            raise SystemExit(f"{TILES / folder / 'Imgs'}: {len(paths)} photos, need {photos + 5}")
        sets[folder] = (paths[:photos], paths[photos:][4::5][:unseen])
    return sets


def copy_defects(paths: list[Path], target: Path) -> None:
    target.mkdir(parents=True)
    for photo in paths:
        shutil.copy(photo, target / photo.name)
        shutil.copy(photo.with_suffix(".png"), target / photo.with_suffix(".png").name)


def tiny_models(folder: Path) -> None:
    """The tiny kit, with the policy's budgets the retrain tests use (room for a whole tool call
    after a cut reasoning)."""
    from appliance.models.manifest import write_manifest
    from appliance.models.tiny_models import build_tiny_models

    manifest = build_tiny_models(folder, parts=["qwen"])
    entries = [replace(e, settings={**e.settings, "roles": {
        **e.settings["roles"], "policy": {"reasoning_budget": 48, "action_budget": 256}}})
        for e in manifest.models]
    write_manifest(replace(manifest, models=entries), folder)


def unseen_figures(models: Path, run: Path, defects: Path, seed: int, labels: list[str]) -> dict:
    """Each adapter's held-out figures on the unseen photos, two episodes a photo."""
    from appliance.engine import EngineConfig
    from appliance.training import stages
    from appliance.training.heldout import real_area_medians, run_heldout
    from appliance.training.run import RetrainOptions, read_defects
    from appliance.training.trajectories import example_from

    options = RetrainOptions(defects=defects, category=CATEGORY, out=run, seed=seed)
    config = replace(EngineConfig(), models_dir=models, prompt_gen="knowledge",
                     quality_eval="heuristic")
    items, _ = read_defects(options)
    context = stages.StageContext(options, CATEGORY, None, items, [], lambda *_: None, None, config)
    examples = [example_from(item, Path(item.source).stem) for item in items]
    areas = real_area_medians(examples)
    out = {}
    for label in labels:
        policy = stages._policy(context, run / label / "adapter", label)
        figures, _ = run_heldout(context.engine.environment, policy, examples, CATEGORY, seed, 2,
                                 areas)
        out[label] = figures.as_dict()
    return out


def one_seed(seed: int, args, sets, scratch: Path) -> dict:
    root = scratch / f"seed-{seed}"
    for folder, (given, unseen) in sets.items():
        copy_defects(given, root / "defects" / folder)
        copy_defects(unseen, root / "unseen" / folder)
    tiny_models(root / "models")
    env = {**os.environ, "APPLIANCE_MODELS": str(root / "models"), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "appliance.cli.main", "retrain", str(root / "defects"),
               "--category", CATEGORY, "--seed", str(seed), "--out", str(root / "run"),
               "--steps", str(args.steps), "--grpo-steps", str(args.grpo_steps),
               "--generations", str(args.generations), "--grpo-tasks", str(args.grpo_tasks),
               "--temperature", str(args.temperature),
               "--grpo-learning-rate", str(args.grpo_learning_rate),
               "--heldout-runs", str(args.heldout_runs), *CPU_TOOLS]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: appliance retrain failed:\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    gate = json.loads((root / "run" / "report.json").read_text())["stages"]["gate"]
    row = {"seed": seed, "retrain_seconds": round(seconds), "base": gate["before"],
           "sft": gate["candidates"]["sft"], "grpo": gate["candidates"]["grpo"]}
    row["unseen"] = unseen_figures(root / "models", root / "run", root / "unseen", seed,
                                   ["sft", "grpo"])
    return row


def cell(figures: dict) -> str:
    return f"{figures['complete']:.0%} / {figures['reward']:.3f}"


def table_line(label, base: dict, sft: dict, grpo: dict, unseen_sft: dict, unseen_grpo: dict) -> str:
    return (f"| {label} | {cell(base)} | {cell(sft)} | {cell(grpo)} | "
            f"{grpo['reward'] - sft['reward']:+.3f} | {cell(unseen_sft)} | {cell(unseen_grpo)} | "
            f"{unseen_grpo['reward'] - unseen_sft['reward']:+.3f} |")


def columns(row: dict) -> list[dict]:
    return [row["base"], row["sft"], row["grpo"], row["unseen"]["sft"], row["unseen"]["grpo"]]


def averaged(figures) -> dict:
    figures = list(figures)
    return {key: statistics.mean(f[key] for f in figures) for key in ("complete", "reward")}


def report(rows: list[dict]) -> str:
    lines = ["| seed | base | SFT | GRPO | GRPO - SFT | unseen SFT | unseen GRPO | GRPO - SFT |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [table_line(r["seed"], *columns(r)) for r in rows]
    lines.append(table_line("mean", *(averaged(c) for c in zip(*map(columns, rows)))))
    above = sum(r["grpo"]["reward"] > r["sft"]["reward"] for r in rows)
    above_unseen = sum(r["unseen"]["grpo"]["reward"] > r["unseen"]["sft"]["reward"] for r in rows)
    reached = sum(r["sft"]["complete"] >= 0.5 for r in rows)
    lines += ["", "cells: protocol-complete / mean reward",
              f"SFT at least 50 % complete on the held-out photos: {reached} of {len(rows)} seeds",
              f"GRPO above SFT: {above} of {len(rows)} seeds held out, {above_unseen} of "
              f"{len(rows)} on the unseen photos"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated retrain seeds")
    parser.add_argument("--photos", type=int, default=8, help="photos per type given to retrain")
    parser.add_argument("--unseen", type=int, default=10, help="unseen photos per type")
    parser.add_argument("--steps", type=int, default=800, help="SFT steps")
    parser.add_argument("--grpo-steps", type=int, default=24)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--grpo-tasks", type=int, default=1, help="tasks per GRPO step")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--grpo-learning-rate", type=float, default=5e-4)
    parser.add_argument("--heldout-runs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = photo_sets(args.photos, args.unseen)
    scratch = Path(tempfile.mkdtemp(prefix="appliance-retrain-bench-"))
    rows = []
    try:
        for seed in seeds:
            started = time.perf_counter()
            rows.append(one_seed(seed, args, sets, scratch))
            # Each seed's row as it comes (a run of five seeds takes an hour).
            print(f"seed {seed} ({time.perf_counter() - started:.0f} s):\n{report(rows[-1:])}\n",
                  file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)},
                                                 "rows": rows}, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(report(rows))


if __name__ == "__main__":
    main()
