"""The stages of ``appliance retrain`` (see ``retrain.py`` for the run directory)."""

from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from appliance.engine import Engine, EngineConfig, EngineError, build_engine
from appliance.evaluation.data import LabeledImage, Skipped
from appliance.imaging import write_atomic
from appliance.tools.interfaces import SurfaceRestorer
from appliance.training.heldout import real_area_medians, run_heldout
from appliance.training.run import RetrainError, RetrainOptions, RunState
from appliance.training.trajectories import (
    DefectExample,
    build_trajectories,
    counterpart_method,
    example_from,
    split_examples,
)

POLICY_BACKEND = "qwen-transformers"


@dataclass
class StageContext:
    options: RetrainOptions
    category: str
    state: RunState
    items: list[LabeledImage]
    skipped: list[Skipped]
    say: Callable[[str], None]
    progress: Callable | None
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    normals: list[np.ndarray] = field(default_factory=list)  # --normal photos, at the defects' size
    counterparts: str = ""  # how the normal counterparts were made (``counterpart_method``)
    _engine: Engine | None = None
    _split: tuple[list[DefectExample], list[DefectExample]] | None = None

    @property
    def out(self) -> Path:
        return Path(self.options.out)

    def bar(self, total: int, label: str):
        return self.progress(total, label) if self.progress else nullcontext(None)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            try:
                self._engine = build_engine(self.engine_config)
            except EngineError as exc:
                raise RetrainError(f"the engine could not be built: {exc}") from None
        return self._engine

    @property
    def split(self) -> tuple[list[DefectExample], list[DefectExample]]:
        """(train, held-out) examples with their reverse-synthesized normal counterparts."""
        if self._split is None:
            train, heldout = split_examples(self.items, self.options.seed, self.options.holdout)
            stems = _unique_stems(self.items)
            restorer = None if self.normals else self.restorer()
            self.counterparts = counterpart_method(self.normals, restorer)
            self.say(f"reverse synthesis: normal counterparts {self.counterparts}")
            with self.bar(len(self.items), "reverse synthesis") as bar:
                examples = []
                for index, (item, stem) in enumerate(zip(self.items, stems)):
                    examples.append(example_from(item, stem, self.normals, restorer,
                                                 self.category, self.options.seed + index))
                    if bar is not None:
                        bar.update(1)
            self._split = [examples[i] for i in train], [examples[i] for i in heldout]
        return self._split

    def restorer(self) -> SurfaceRestorer | None:
        """The engine's image generator when it can paint a region back to intact surface (a
        diffusion inpainter); None on the CPU engine."""
        image_gen = self.engine.tools.image_gen
        return image_gen if callable(getattr(image_gen, "restore", None)) else None


def _unique_stems(items: list[LabeledImage]) -> list[str]:
    seen: Counter = Counter()
    stems = []
    for item in items:
        stem = Path(item.source).stem
        key = (item.defect, stem)
        seen[key] += 1
        stems.append(stem if seen[key] == 1 else f"{stem}-{seen[key]}")
    return stems


# 1. Trajectories ---------------------------------------------------------------------------------

def run_calibrate(ctx: StageContext) -> None:
    from appliance.models.calibrations import CALIBRATIONS, store_profile
    from appliance.models.manifest import default_models_dir
    from appliance.training.calibrate import DETECTOR_SEEDS, calibrate, check_specs

    train, heldout = ctx.split
    if not train or not heldout:
        raise RetrainError("calibration needs photos to measure and held-out photos to check the "
                           "profile on (each defect type needs two or more photos, and --holdout "
                           "above 0)")
    repeats = ctx.options.heldout_repeats
    episodes = len(check_specs(train, ctx.category, ctx.options.seed, repeats))
    with ctx.bar(2 * episodes, "calibration check (current engine, calibrated)") as bar:
        profile, figures = calibrate(ctx.engine, ctx.category, train, heldout, ctx.options.seed,
                                     repeats, ctx.options.calibration_margin, bar,
                                     confidence=ctx.options.calibration_confidence)
    models_dir = ctx.engine_config.models_dir or default_models_dir()
    digest = store_profile(models_dir, profile, {"heldout": figures["after"],
                                                 "baseline": figures["before"],
                                                 "run": str(ctx.out)})
    figures["profile"]["digest"] = digest
    before, after = figures["before"]["pixel_ap"], figures["after"]["pixel_ap"]
    measured = (f"held-out pixel AP of a detector trained on the samples {_figure(before)} -> "
                f"{_figure(after)} (higher on {figures['seeds_higher']} of {len(DETECTOR_SEEDS)} "
                "seeds)")
    if digest == figures["before_profile"]:
        # This run promoted it before it was interrupted (or an earlier run made the same one).
        figures["promote"] = True
        figures["note"] = "already the active profile"
        ctx.say(f"calibrate: profile {digest} is already active for {ctx.category}")
    elif figures["promote"]:
        CALIBRATIONS.promote(models_dir, ctx.category, digest)
        ctx.say(f"calibrate: {measured}; profile {digest} is now active for {ctx.category}")
    else:
        ctx.say(f"calibrate: {measured}, needs {100 * ctx.options.calibration_margin:+.0f} %"
                f"{_luck(figures.get('bootstrap'))}; profile {digest} kept on disk, NOT promoted")
    ctx.state.finish("calibrate", figures)


def run_trajectories(ctx: StageContext) -> None:
    train, heldout = ctx.split
    if not train:
        raise RetrainError("no defect photo is left for training after the held-out split")
    started = time.perf_counter()
    total = len(train) * len(ctx.options.steps)
    with ctx.bar(total, "expert trajectories") as bar:
        outcomes = build_trajectories(ctx.engine.environment, train, ctx.category,
                                      ctx.out / "trajectories", ctx.options.seed,
                                      ctx.options.steps, progress=bar)
    kept = [o for o in outcomes if o.kept]
    figures = {
        "train_photos": len(train), "heldout_photos": len(heldout),
        "heldout": [e.id for e in heldout], "counterparts": ctx.counterparts,
        "built": len(outcomes), "kept": len(kept),
        "kept_by_steps": {str(n): sum(1 for o in kept if o.steps == n) for n in ctx.options.steps},
        "not_kept": dict(Counter(o.reason.split(" (")[0] for o in outcomes if not o.kept)),
        "seconds": round(time.perf_counter() - started, 1),
    }
    ctx.say(f"trajectories: {len(kept)} of {len(outcomes)} kept "
            f"({', '.join(f'N={n}: {c}' for n, c in figures['kept_by_steps'].items())})")
    if not kept:
        raise RetrainError("no expert trajectory could be kept: the judge rejected every real "
                           f"defect or accepted every weakened attempt ({figures['not_kept']})")
    ctx.state.finish("trajectories", figures)


def kept_trajectories(out: Path) -> list[Path]:
    index = Path(out) / "trajectories" / "index.jsonl"
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    return [Path(out) / "trajectories" / r["folder"] for r in rows if r["kept"]]


# 2. SFT ------------------------------------------------------------------------------------------

def policy_model(config: EngineConfig):
    """The installed Qwen3-VL policy (manifest entry, folder) that retraining adapts."""
    from appliance.models.manifest import model_for

    try:
        return model_for(config.models_dir, "policy", POLICY_BACKEND)
    except FileNotFoundError as exc:
        raise RetrainError(f"retraining adapts the Qwen3-VL policy on transformers, and none is "
                           f"usable: {exc}. Install a Qwen3-VL model bundle with "
                           "`appliance models install BUNDLE`.") from None


def _device() -> str:
    from appliance.evaluation.train import best_device  # torch loads only when training

    return best_device()


def run_sft(ctx: StageContext) -> None:
    from appliance.engine.registry import settings_and_guide
    from appliance.models.adapters import adapter_hash
    from appliance.training.sft import train_sft
    from appliance.vlm.transformers_runtime import transformers_config

    if "trajectories" not in ctx.state.finished:
        raise RetrainError("the trajectories stage has not finished; run --stage trajectories "
                           "(or all) first")
    entry, folder = policy_model(ctx.engine_config)
    trajectories = kept_trajectories(ctx.out)
    training = dict(entry.settings.get("training", {}))
    settings = replace(ctx.options.sft, device=_device(),
                       modules_to_save=tuple(training.get("modules_to_save", ())))
    config, _ = transformers_config(folder, settings_and_guide(entry)[0])
    ctx.say(f"sft: {len(trajectories)} trajectories, {settings.steps} steps on {settings.device} "
            f"(LoRA rank {settings.lora_rank}, {entry.name})")
    started = time.perf_counter()
    result = train_sft(folder, trajectories, ctx.out / "sft", settings, config.min_pixels,
                       config.max_pixels)
    figures = {"model": entry.name, "trajectories": len(trajectories), "steps": settings.steps,
               "device": settings.device, "first_loss": round(result.losses[0], 4),
               "last_loss": round(result.losses[-1], 4), "loss_drop": round(result.loss_drop, 2),
               "adapter": adapter_hash(result.adapter_dir),
               "seconds": round(time.perf_counter() - started, 1)}
    ctx.say(f"sft: loss {figures['first_loss']} -> {figures['last_loss']} "
            f"({figures['loss_drop']}x lower)")
    ctx.state.finish("sft", figures)


# 3. GRPO ----------------------------------------------------------------------------------------

def run_grpo(ctx: StageContext) -> None:
    from appliance.engine.registry import role_options, settings_and_guide
    from appliance.models.adapters import adapter_hash
    from appliance.training.grpo import EpisodeRollouts, train_grpo
    from appliance.vlm.transformers_runtime import transformers_config

    if "sft" not in ctx.state.finished:
        raise RetrainError("GRPO starts from the SFT adapter: the sft stage has not finished")
    entry, folder = policy_model(ctx.engine_config)
    config, _ = transformers_config(folder, settings_and_guide(entry)[0])
    budget, _ = role_options(entry, "policy")
    train, heldout = ctx.split
    settings = replace(ctx.options.grpo, device=_device())
    # Rollouts start from the training photos' normal counterparts: held-out ones stay unseen.
    arguments = (ctx.engine.environment, train, ctx.category, config, budget, ctx.options.seed)
    runner = None
    if ctx.options.cluster is None:
        rollouts = EpisodeRollouts(*arguments, temperature=settings.temperature)
    else:
        runner, rollouts = _cluster_rollouts(ctx, arguments, settings.temperature, entry.name)
    ctx.say(f"grpo: {settings.steps} steps, G = {settings.generations} rollouts per task, "
            f"{settings.tasks_per_step} task(s) per step, temperature {settings.temperature}, "
            f"beta {settings.beta}")
    started = time.perf_counter()
    try:
        result = train_grpo(folder, ctx.out / "sft" / "adapter", rollouts, ctx.out / "grpo",
                            settings, ctx.engine.environment.config,
                            real_area_medians(train + heldout))
    finally:
        if runner is not None:
            runner.close()
    figures = {"steps": settings.steps, "generations": settings.generations,
               "tasks_per_step": settings.tasks_per_step, "rewards": [round(r, 4) for r in result.rewards],
               "reward_gain": round(result.reward_gain, 4), "tied_steps": result.tied_steps,
               "adapter": adapter_hash(result.adapter_dir),
               "seconds": round(time.perf_counter() - started, 1)}
    ctx.say(f"grpo: rollout reward {figures['rewards'][:1]} -> {figures['rewards'][-1:]}")
    if result.tied_steps:
        ctx.say(f"grpo: in {result.tied_steps} of {settings.steps} steps every rollout of a task "
                "scored the same, so those steps had nothing to learn from (a policy that never or "
                "always succeeds gives GRPO nothing to compare; see docs/retraining.md)")
    ctx.state.finish("grpo", figures)


def _cluster_rollouts(ctx: StageContext, arguments: tuple, temperature: float, bundle: str):
    """GRPO's rollouts on the engines of the cluster the options name (docs/cluster.md)."""
    try:
        from appliance.cluster.auth import ClusterError
        from appliance.cluster.rollouts import ClusterRollouts
        from appliance.cluster.runner import ClusterRunner
    except ImportError as exc:
        raise RetrainError(f"rollouts on a cluster need Ray ({exc}): install the cluster extra "
                           "(pip install '.[cluster]')") from None
    try:
        runner = ClusterRunner(ctx.engine_config, ctx.options.cluster,
                               say=lambda line: ctx.say(f"cluster: {line}"))
    except (ClusterError, EngineError) as exc:
        raise RetrainError(f"cluster: {exc}") from None
    ctx.say(f"grpo: rollouts on {len(runner.engines)} engine(s) of the cluster at "
            f"{ctx.options.cluster.address}; gradients here")
    return runner, ClusterRollouts(*arguments, temperature=temperature, runner=runner,
                                   bundle=bundle)


# 4. Gate -----------------------------------------------------------------------------------------

def _policy(ctx: StageContext, adapter_dir: Path | None, name: str):
    """The installed policy, unguided, with one adapter (None: the base weights)."""
    from appliance.engine.registry import role_options, settings_and_guide
    from appliance.policies.vlm import VLMPolicy
    from appliance.vlm.transformers_runtime import transformers_config, transformers_runtime

    entry, folder = policy_model(ctx.engine_config)
    config, _ = transformers_config(folder, settings_and_guide(entry)[0])
    runtime = transformers_runtime(config)
    adapter = runtime.load_adapter(adapter_dir, name=name) if adapter_dir is not None else None
    budget, sampling = role_options(entry, "policy")
    return VLMPolicy(runtime, POLICY_BACKEND, adapter=adapter, budget=budget, sampling=sampling)


def measure(ctx: StageContext, adapter_dir: Path | None, label: str) -> dict:
    _, heldout = ctx.split
    if not heldout:
        raise RetrainError("no held-out defect photos (each defect type needs two or more "
                           "photos, and --holdout above 0): the gate cannot measure anything")
    policy = _policy(ctx, adapter_dir, f"{label}@{adapter_dir.name if adapter_dir else 'base'}")
    with ctx.bar(len(heldout) * ctx.options.heldout_repeats, f"held-out episodes ({label})") as bar:
        figures, _ = run_heldout(ctx.engine.environment, policy, heldout, ctx.category,
                                 ctx.options.seed, ctx.options.heldout_repeats,
                                 real_area_medians(ctx.split[0] + heldout), progress=bar)
    return figures.as_dict()


def run_gate(ctx: StageContext) -> None:
    from appliance.models.adapters import (AdapterError, active_adapter, add_llamacpp_lora, promote,
                                           store_adapter)

    trained = [stage for stage in ("sft", "grpo") if stage in ctx.state.finished]
    if not trained:
        raise RetrainError("no trained adapter to judge: the sft stage has not finished")
    models_dir = ctx.engine_config.models_dir
    try:
        active = active_adapter(models_dir, ctx.category)
    except AdapterError as exc:
        raise RetrainError(str(exc)) from None
    before = measure(ctx, active.path if active else None, "active" if active else "base")
    rows = {stage: measure(ctx, ctx.out / stage / "adapter", stage) for stage in trained}
    final = trained[-1]  # GRPO's adapter when that stage ran, else SFT's
    candidate_dir = ctx.out / final / "adapter"
    after = rows[final]
    gain = after["reward"] - before["reward"]
    promoted = gain >= ctx.options.margin
    figures = {"before": before, "before_adapter": active.hash if active else None,
               "candidates": rows, "candidate": final, "after": after, "gain": round(gain, 4),
               "margin": ctx.options.margin, "promoted": promoted}
    digest = store_adapter(models_dir, ctx.category, candidate_dir,
                           {"heldout": after, "baseline": before, "stage": final,
                            "run": str(ctx.out)})
    figures["adapter"] = digest
    # The same LoRA for the llama.cpp runtime; a reason instead when it cannot convert.
    figures["llamacpp_lora"] = add_llamacpp_lora(models_dir, ctx.category, digest,
                                                 policy_model(ctx.engine_config)[1]) or "written"
    if promoted:
        promote(models_dir, ctx.category, digest)
        ctx.say(f"gate: held-out reward {before['reward']:.3f} -> {after['reward']:.3f}; "
                f"adapter {digest} ({final}) is now active for {ctx.category}")
    else:
        ctx.say(f"gate: held-out reward {before['reward']:.3f} -> {after['reward']:.3f} "
                f"(needs +{ctx.options.margin}); adapter {digest} kept on disk, NOT promoted")
    ctx.state.finish("gate", figures)


# Report ------------------------------------------------------------------------------------------

def write_report(ctx: StageContext) -> dict:
    report = {
        "category": ctx.category, "defects": str(ctx.options.defects),
        "photos": len(ctx.items),
        "photos_by_type": dict(sorted(Counter(i.defect for i in ctx.items).items())),
        "skipped": [{"path": s.path, "reason": s.reason} for s in ctx.skipped],
        "stages": ctx.state.finished,
    }
    write_atomic(ctx.out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    write_atomic(ctx.out / "report.md", render_report(report).encode())
    return report


def _figure(value: float | None) -> str:
    """A check's figure; None: not measured (fewer than 5 samples accepted)."""
    return "not measured" if value is None else f"{value:.4f}"


def _change(before: float | None, after: float | None, share: float, better: str,
            worse: str) -> str:
    if before is None or after is None:
        return "not compared (" + ("before" if before is None else "calibrated") + " not measured)"
    return f"{abs(100 * share):.1f} % " + (better if share >= 0 else worse)


def _luck(bootstrap: dict | None) -> str:
    """How often the bootstrap's resamples reached the margin; empty for a run made before the
    check resampled, or where an engine was not measured."""
    if not bootstrap:
        return ""
    low, high = bootstrap["interval_90"]
    interval = ("" if low is None or high is None else
                f", 90 % of them between {100 * low:+.1f} % and {100 * high:+.1f} %")
    return (f", reached in {bootstrap['reached']:.0%} of {bootstrap['resamples']} resamples of the "
            f"held-out photos and seeds ({bootstrap['required']:.0%} required{interval})")


def render_report(report: dict) -> str:
    stages = report["stages"]
    lines = [f"# Retraining report: {report['category']}", "",
             f"- {report['photos']} real defect photo(s) from `{report['defects']}`: "
             + ", ".join(f"{k} {v}" for k, v in report["photos_by_type"].items())]
    if report["skipped"]:
        lines.append(f"- {len(report['skipped'])} file(s) left out:")
        lines += [f"  - `{s['path']}`: {s['reason']}" for s in report["skipped"]]
    if "calibrate" in stages and "pixel_ap_gain" not in stages["calibrate"]:
        # A run finished before the check measured teaching, resumed now: what it decided on.
        c = stages["calibrate"]
        lines += ["", "## Calibration of the CPU engine", "",
                  f"- profile {c['profile']['digest']}: held-out distance to real defects "
                  f"{c['distance_drop']:+.1%} lower, " + ("promoted" if c["promote"] else "refused")
                  + " (decided on that distance, before the check measured what the samples teach)"]
    elif "calibrate" in stages:
        c = stages["calibrate"]
        row = "| {label} | {episodes} | {accepted:.0%} | {ap} | {seeds} | {distance} | {by} |"
        det = c["detector"]
        lines += ["", "## Calibration of the CPU engine", "",
                  f"- profile {c['profile']['digest']} from {c['train_photos']} photos; "
                  f"{c['heldout_photos']} held out",
                  *[f"- {d}: {p['defects']} defects, size p5/p50/p95 {p['size_p05_p50_p95']}, "
                    f"peak change {p['peak_p05_p50_p95']}, {p['bank']} in the bank"
                    for d, p in c["profile"]["defects"].items()],
                  *[f"- {d}: {n} defect(s) too wide to measure, left out"
                    + ("" if d in c["profile"]["defects"] else
                       " (the type keeps the knowledge base's defaults)")
                    for d, n in c["profile"].get("unmeasured", {}).items()], "",
                  "Each engine ran the same episodes from the training photos' normal counterparts; "
                  f"its accepted samples trained `appliance eval`'s UNet ({det['epochs']} epochs, "
                  f"{det['side']} px) once per seed {', '.join(map(str, det['seeds']))}, which then "
                  "predicted the held-out real defect photos.", "",
                  "| engine | episodes | accepted | held-out pixel AP, mean | per seed "
                  "| distance to real | accepted per type |",
                  "|---|---|---|---|---|---|---|",
                  *[row.format(label=label, episodes=f["episodes"], accepted=f["accepted"],
                               ap=_figure(f["pixel_ap"]), distance=_figure(f["distance"]),
                               seeds=", ".join(f"{v:.4f}" for v in f["pixel_ap_by_seed"]) or "-",
                               by=", ".join(f"{d} {v:.0%}" for d, v in
                                            f["acceptance_by_defect"].items()))
                    for label, f in ((f"before ({c['before_profile'] or 'uncalibrated'})",
                                      c["before"]), ("calibrated", c["after"]))], "",
                  ("- pixel AP " + _change(c["before"]["pixel_ap"], c["after"]["pixel_ap"],
                                           c["pixel_ap_gain"], "higher", "lower")
                   + f", higher on {c['seeds_higher']} of {len(det['seeds'])} seeds; "
                   f"{100 * c['margin']:+.0f} % required{_luck(c.get('bootstrap'))}: "
                   + (f"**{c['note']}**" if c.get("note") else
                      "**promoted**" if c["promote"] else "**refused** (kept on disk, not active)")),
                  "- distance to the held-out real defects "
                  + _change(c["before"]["distance"], c["after"]["distance"], c["distance_drop"],
                            "lower", "higher")
                  + " (how alike the defects look; reported, not decided on)"]
    if "trajectories" in stages:
        t = stages["trajectories"]
        lines += ["", "## Expert trajectories", "",
                  f"- {t['train_photos']} photos for training, {t['heldout_photos']} held out",
                  f"- {t['kept']} of {t['built']} trajectories kept: "
                  + ", ".join(f"N={n}: {c}" for n, c in t["kept_by_steps"].items())]
        lines += [f"- not kept, {count}: {reason}" for reason, count in t["not_kept"].items()]
    if "sft" in stages:
        s = stages["sft"]
        lines += ["", "## LoRA SFT", "",
                  f"- {s['steps']} steps on {s['device']} over {s['trajectories']} trajectories "
                  f"({s['model']}), {s['seconds']} s",
                  f"- loss {s['first_loss']} -> {s['last_loss']} ({s['loss_drop']}x lower)",
                  f"- adapter {s['adapter']}"]
    if "grpo" in stages:
        r = stages["grpo"]
        lines += ["", "## LoRA GRPO", "",
                  f"- {r['steps']} steps, G = {r['generations']}, {r['seconds']} s",
                  f"- mean rollout reward per step: {', '.join(f'{x:.3f}' for x in r['rewards'])} "
                  f"(second half minus first half: {r['reward_gain']:+.3f})",
                  f"- steps where every rollout of a task scored the same (nothing to learn from): "
                  f"{r.get('tied_steps', 'not recorded')}",
                  f"- adapter {r['adapter']}"]
    if "gate" in stages:
        g = stages["gate"]
        row = ("| {label} | {episodes} | {complete:.0%} | {accepted:.0%} | {reward:.3f} | "
               "{task:.3f} | {reflection:.3f} | {behaviour:.3f} |")
        lines += ["", "## Held-out gate", "",
                  "| policy | episodes | protocol-complete | accepted | reward | task | "
                  "reflection | behaviour |", "|---|---|---|---|---|---|---|---|",
                  row.format(label=f"before ({g['before_adapter'] or 'base weights'})",
                             **g["before"]),
                  *[row.format(label=f"{stage} adapter" + (f" ({g['adapter']})" if stage ==
                                                               g["candidate"] else ""), **figures)
                    for stage, figures in g["candidates"].items()], "",
                  f"- gain {g['gain']:+.3f} against a required {g['margin']}: "
                  + ("**promoted**" if g["promoted"] else "**refused** (kept on disk, not active)")]
        if "llamacpp_lora" in g:
            lines.append("- llama.cpp LoRA (`adapter.gguf`): " + (
                "written" if g["llamacpp_lora"] == "written"
                else f"not written: {g['llamacpp_lora']}"))
    return "\n".join(lines) + "\n"
