"""``appliance retrain``: the plant's real defects train the policy."""

from __future__ import annotations

import os
from pathlib import Path

import click

from appliance.cli.options import CATEGORY, cluster_options, cluster_settings, parse_backends


def _bar(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="item", dynamic_ncols=True)


def _stages(stage: str, config) -> tuple[str, ...]:
    """The stages ``--stage`` runs on this engine; a clear refusal for what it cannot."""
    policy_stages = {"trajectories": ("trajectories",), "sft": ("trajectories", "sft", "gate"),
                     "grpo": ("trajectories", "sft", "grpo"),
                     "all": ("trajectories", "sft", "grpo", "gate")}
    calibratable = config.image_gen == "procedural"
    if stage == "calibrate" or (stage == "all" and config.policy == "scripted"):
        if not calibratable:
            raise click.UsageError(
                f"calibration tunes the CPU engine's procedural image generator; this engine's "
                f"is {config.image_gen!r}, and its policy {config.policy!r} has no weights to "
                "train" if stage == "all" else
                f"calibration tunes the CPU engine's procedural image generator; this engine's "
                f"is {config.image_gen!r}")
        return ("calibrate",)
    if config.policy == "scripted" and stage != "trajectories":
        raise click.UsageError(f"--stage {stage} trains the Qwen3-VL policy, and this engine's "
                               "policy is the scripted one: install a Qwen3-VL bundle, or use "
                               "--stage calibrate")
    return policy_stages[stage]


@click.command("retrain")
@click.argument("defects", required=False,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--category", required=True, type=CATEGORY,
              help="The part category the defects belong to (as the batch names it).")
@click.option("--normal", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None,
              help="Normal photos of the same part: each defect's normal counterpart takes the "
                   "best-matching one's pixels under the mask (else the region is inpainted).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: ./retrain-CATEGORY). --resume continues the run there.")
@click.option("--stage", type=click.Choice(["calibrate", "trajectories", "sft", "grpo", "all"]),
              default="all", show_default=True,
              help="How far to go: calibrate (the CPU engine's calibration profile only); "
                   "trajectories (build them only); sft (trajectories, SFT, then the gate on "
                   "the SFT adapter); grpo (trajectories, SFT, GRPO, no gate yet: --resume with "
                   "--stage all judges it later); all (on the CPU engine: calibrate; with a "
                   "Qwen3-VL policy: trajectories, SFT, GRPO, the gate).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out after a crash or a stop: finished stages are kept, "
                   "training continues from its last checkpoint.")
@click.option("--steps", default=400, show_default=True, type=click.IntRange(1, 1_000_000),
              help="SFT optimizer steps.")
@click.option("--learning-rate", default=5e-3, show_default=True,
              type=click.FloatRange(0, 1, min_open=True), help="SFT learning rate.")
@click.option("--lora-rank", default=32, show_default=True, type=click.IntRange(1, 1024))
@click.option("--grpo-steps", default=20, show_default=True, type=click.IntRange(1, 100_000),
              help="GRPO optimizer steps (each runs G episodes per task).")
@click.option("--grpo-save-every", default=5, show_default=True, type=click.IntRange(1, 100_000),
              help="GRPO checkpoint every N steps (what --resume continues from after a crash).")
@click.option("--generations", default=8, show_default=True, type=click.IntRange(2, 64),
              help="G: rollouts per task in a GRPO group.")
@click.option("--grpo-tasks", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Tasks (training photos) per GRPO step: the step's gradient averages their "
                   "groups, G x this many episodes a step.")
@click.option("--grpo-learning-rate", default=2e-4, show_default=True,
              type=click.FloatRange(0, 1, min_open=True))
@click.option("--beta", default=0.04, show_default=True, type=click.FloatRange(0, 10),
              help="Weight of the KL to the SFT adapter in GRPO.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0.05, 2),
              help="Sampling temperature of the GRPO rollouts (the paper's 1.0).")
@click.option("--heldout-runs", default=2, show_default=True, type=click.IntRange(1, 100),
              help="Episodes per held-out photo in the gate (other seeds); in the CPU "
                   "engine's calibration check, per training photo (100 to 300 in all).")
@click.option("--holdout", default=0.2, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of each defect type never trained on; the promotion gate runs on it.")
@click.option("--margin", default=0.02, show_default=True, type=float,
              help="Held-out reward the new adapter must gain over the active one to be promoted.")
@click.option("--calibration-margin", default=0.05, show_default=True,
              type=click.FloatRange(-1, 1),
              help="Share by which a new calibration profile must raise the held-out pixel AP "
                   "of a detector trained on the engine's samples to be promoted (0: at least "
                   "as high; -1: promote whatever the check measures, if 5 or more samples "
                   "were accepted).")
@click.option("--calibration-confidence", default=0.8, show_default=True,
              type=click.FloatRange(0, 1),
              help="Share of the check's resamples (held-out photos and detector seeds drawn "
                   "again, 2000 times) in which the profile must reach --calibration-margin: "
                   "with few held-out photos a gain can be luck of which ones were held out "
                   "(0: decide on the measured gain alone).")
@click.option("--size", default=256, show_default=True, type=click.IntRange(64, 2048),
              help="Square side the photos are brought to.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--engine", default="auto", show_default=True,
              help="Engine whose tools build and judge the episodes ('auto': the installed models).")
@click.option("--backend", "backends", multiple=True, metavar="ROLE=BACKEND",
              help="Use this backend for one role (repeatable), as for `appliance batch`.")
@click.option("--nice", "niceness", default=10, show_default=True, type=click.IntRange(0, 19),
              help="Lower this command's CPU priority by this much, so that the service's "
                   "batches on the same cores go first; it costs nothing when the cores are "
                   "otherwise idle (0: normal priority; a GPU's work is not affected).")
@click.option("--rollback", is_flag=True,
              help="Make the adapter active before the current one active again (the base "
                   "policy when there was none) and exit.")
@click.option("--calibration", "calibration", is_flag=True,
              help="With --rollback: roll back the CPU engine's calibration profile instead "
                   "of the adapter.")
@cluster_options("GRPO's rollouts (the gradients stay on this box)")
def retrain_command(defects: Path | None, category: str, normal: Path | None, out: Path | None, stage: str,
                    resume: bool, steps: int, learning_rate: float, lora_rank: int,
                    grpo_steps: int, grpo_save_every: int, generations: int, grpo_tasks: int,
                    grpo_learning_rate: float, beta: float,
                    temperature: float, heldout_runs: int, holdout: float, margin: float,
                    calibration_margin: float, calibration_confidence: float, size: int,
                    seed: int, engine: str, backends: tuple[str, ...], niceness: int,
                    rollback: bool, calibration: bool,
                    cluster_address: str | None, token_file: Path | None) -> None:
    """Adapt the engine to this plant from its real defect photos: the Qwen3-VL policy (LoRA
    SFT and GRPO), or on the CPU engine its calibration profile.

    DEFECTS holds the photos with their masks, in the layouts `appliance eval --defects` reads:
    one folder per defect type with each photo's mask beside it (NAME.png next to NAME.jpg, or
    NAME_mask.png), or an MVTec-AD category folder. Files without a usable mask are left out
    and listed in the report.

    \b
    Stages (see docs/retraining.md):
      0. on the CPU engine: calibration: priors and a bank of the real defects that the
         procedural generator and the judge use; promoted only if a detector trained on
         what the engine then makes finds the held-out defects better (--calibration-margin)
      1. expert trajectories from the real defects (reverse synthesis, 1-3 image_gen steps,
         the real judge, prompt generator and knowledge base, the real mask)
      2. LoRA SFT of the policy on them (TRL SFTTrainer; QLoRA on a GPU, fp32 on CPU)
      3. LoRA GRPO from the SFT adapter (TRL GRPOTrainer), G episodes per task through the
         same environment the batch runs, rewarded for task, reflection and behaviour
      4. the gate: held-out defects, never trained on, run as episodes with the active
         adapter and with the new one; the new one becomes active only if it gains --margin
    Writes RUN/report.md and RUN/report.json.

    \b
    Example:
      appliance retrain plant-defects/ --category magnetic_tile
      appliance retrain --rollback --category magnetic_tile
    """
    from appliance.engine import EngineError, resolve_engine_config
    from appliance.training.retrain import run_retrain
    from appliance.training.run import RetrainError, RetrainOptions
    from appliance.training.grpo import GRPOSettings
    from appliance.training.sft import SFTSettings

    try:
        config, _ = resolve_engine_config(engine, overrides=parse_backends(backends))
    except EngineError as exc:
        raise click.BadParameter(str(exc), param_hint="--engine/--backend") from exc
    name = category
    if calibration and not rollback:
        raise click.UsageError("--calibration goes with --rollback (calibrating is --stage "
                               "calibrate)")
    if rollback:
        from appliance.models.adapters import ADAPTERS
        from appliance.models.calibrations import CALIBRATIONS
        from appliance.models.manifest import default_models_dir
        from appliance.models.shelf import ShelfError

        shelf = CALIBRATIONS if calibration else ADAPTERS
        try:
            previous = shelf.rollback(config.models_dir or default_models_dir(), name)
        except ShelfError as exc:
            raise click.ClickException(str(exc)) from exc
        fallback = "the uncalibrated engine runs" if calibration else "the base policy runs"
        click.echo(f"{name}: {shelf.noun} {previous} is active again" if previous else
                   f"{name}: no {shelf.noun} is active; {fallback}")
        return
    if defects is None:
        raise click.UsageError("give the DEFECTS folder (or --rollback)")
    stages = _stages(stage, config)
    options = RetrainOptions(
        defects=defects.resolve(), category=name,
        normal=normal.resolve() if normal is not None else None, out=(out or Path(f"retrain-{name}")).resolve(),
        stages=stages, seed=seed, size=size, holdout=holdout, margin=margin,
        calibration_margin=calibration_margin, calibration_confidence=calibration_confidence,
        heldout_repeats=heldout_runs,
        sft=SFTSettings(steps=steps, learning_rate=learning_rate, lora_rank=lora_rank,
                        lora_alpha=2 * lora_rank, seed=seed),
        grpo=GRPOSettings(steps=grpo_steps, save_every=grpo_save_every, generations=generations,
                          tasks_per_step=grpo_tasks, learning_rate=grpo_learning_rate, beta=beta,
                          temperature=temperature, seed=seed),
        cluster=cluster_settings(cluster_address, token_file))

    def say(line: str) -> None:
        click.echo(line, err=True)

    # Retraining is maintenance: on a box whose service runs the night's batches on the same
    # few cores, the batches keep their pace and retraining takes what is left.
    os.nice(niceness)
    try:
        run_retrain(options, config, resume=resume, say=say, progress=_bar)
    except RetrainError as exc:
        raise click.ClickException(str(exc)) from exc
    report = options.out / "report.md"
    click.echo(report.read_text(encoding="utf-8"))
    click.echo(f"written: {report}, {options.out / 'report.json'}", err=True)

