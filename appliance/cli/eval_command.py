"""``appliance eval``: how much do synthetic defects teach a detector about real ones?"""

from __future__ import annotations

from pathlib import Path

import click

from appliance.cli.options import CATEGORY


def _generators(value: str) -> tuple[str, ...]:
    from appliance.evaluation.generators import KNOWN

    names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in KNOWN]
    if unknown or not names:
        raise click.BadParameter(f"unknown generator(s) {', '.join(unknown) or '(none)'}; "
                                 f"known: {', '.join(KNOWN)}", param_hint="--generators")
    return tuple(dict.fromkeys(names))


def _seeds(value: str) -> tuple[int, ...]:
    seeds = []
    for part in value.split(","):
        try:
            seed = int(part.strip())
        except ValueError:
            raise click.BadParameter(f"{part.strip()!r} is not a whole number; give "
                                     "comma-separated seeds such as 0,1,2",
                                     param_hint="--seeds") from None
        if seed < 0:
            raise click.BadParameter(f"seeds are 0 or more, not {seed}", param_hint="--seeds")
        if seed in seeds:
            raise click.BadParameter(f"seed {seed} is given twice", param_hint="--seeds")
        seeds.append(seed)
    return tuple(seeds)


@click.command("eval")
@click.option("--normal", "normal_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of normal (defect-free) photos; searched recursively.")
@click.option("--defects", "defects_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with one sub-folder of real defect photos per defect class, each photo "
                   "with its mask beside it (NAME.png next to NAME.jpg, or NAME_mask.png).")
@click.option("--category-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Instead of --normal/--defects: an MVTec-AD category folder "
                   "(train/good, test/<defect>, ground_truth/<defect>).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for report.json, report.md and the PNG figures.")
@click.option("--category", default=None, type=CATEGORY,
              help="Part category for our engine (default: the name of the folder above "
                   "--normal, or the --category-dir folder name).")
@click.option("--seed", default=None, type=click.IntRange(0),
              help="Seed of a single run [0]: the normal split, the few-shot draw, synthesis "
                   "and training.")
@click.option("--seeds", "seeds_text", default=None, metavar="N,N,...",
              help="Run the whole comparison once per seed (e.g. 0,1,2) into OUT/seed-N/, and "
                   "write OUT/report.json and report.md with each metric's mean, sample standard "
                   "deviation and per-seed values. Not with --seed.")
@click.option("--few-shot", "few_shot", default=0, show_default=True, type=click.IntRange(0),
              metavar="K",
              help="Take K real defects of every type out of the test set (drawn with the seed) "
                   "and give them to the generators that can use them (ours, copypaste); a type "
                   "with K or fewer images keeps one for testing. 0: zero-shot.")
@click.option("--detector-seeds", default=1, show_default=True, type=click.IntRange(1, 20),
              metavar="N",
              help="Train N detectors per generator (seeds SEED .. SEED+N-1) and report their "
                   "mean; the bootstrap range then covers the luck of training too. One "
                   "training is a noisy measure: on the magnetic tiles five detectors trained on the "
                   "same samples scored pixel AP 0.084 to 0.119 (sample std 13 % of the mean). "
                   "Costs N times the training time.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--generators", "generators", default=None,
              help="Comma-separated: ours, draem, cutpaste, cutpaste-patch, cutpaste-scar, "
                   "copypaste (needs --few-shot). Default: ours,draem,cutpaste, and copypaste "
                   "too with --few-shot.")
@click.option("--train-size", default=300, show_default=True, type=click.IntRange(1, 100_000),
              help="Train normals to synthesize from (one anomaly each).")
@click.option("--epochs", default=15, show_default=True, type=click.IntRange(1, 1000))
@click.option("--size", default=256, show_default=True, type=click.IntRange(32, 2048),
              help="Square side every image is resized to (a multiple of 16).")
@click.option("--threads", default=None, type=click.IntRange(1, 256),
              help="CPU threads for torch (default: the CPUs this process may use).")
@click.option("--engine", default="cpu", show_default=True,
              help="Engine that plays 'ours': cpu, or auto (the installed models' engine).")
@click.option("--no-generation-metrics", is_flag=True,
              help="Skip the feature-space diversity / realism measurements.")
@click.option("--no-progress", is_flag=True,
              help="No progress bars (synthesis, UNet training) on stderr.")
@click.option("--image-labels", is_flag=True,
              help="Test a defect type whose photos have no masks at all on image-level labels: "
                   "image metrics only, left out of the pixel metrics (image AUROC is the "
                   "headline when no type has masks). Without it such a type is an error. "
                   "Not with --few-shot for such a type (calibration needs masks).")
def eval_command(normal_dir: Path | None, defects_dir: Path | None, category_dir: Path | None,
                 out: Path, category: str | None, seed: int | None, seeds_text: str | None,
                 few_shot: int, detector_seeds: int, device: str, generators: str | None,
                 train_size: int, epochs: int,
                 size: int, threads: int | None, engine: str, no_generation_metrics: bool,
                 no_progress: bool, image_labels: bool) -> None:
    """Train the same small UNet on each generator's synthetic defects and test it on REAL ones.

    Prints one table (pixel/image AUROC, AP, F1-max, generation measurements, speed) with
    every generator side by side and the ratio of ours to the best baseline; writes it to
    OUT/report.json and OUT/report.md with PR curves and example predictions as PNG.

    Zero-shot by default: no generator sees a real defect. --few-shot K gives K real defects
    per type to the generators that can learn from them (ours, and the copy-paste baseline that
    pastes them at random places) and tests on the rest. --seeds repeats the whole comparison
    per seed (OUT/seed-N/) and reports mean and spread; the headline is the ratio of the mean
    pixel AP of ours to the best baseline's (image AUROC where no real defect has a mask).

    \b
    Examples (magnetic tile layout):
      appliance eval --normal MT/MT_Free --defects MT --out eval-out
      appliance eval --normal MT/MT_Free --defects MT --few-shot 5 --seeds 0,1,2 --out eval-5shot
    """
    from appliance.evaluation.generators import NEEDS_SHOTS
    from appliance.evaluation.report import format_table
    from appliance.evaluation.runner import EvalConfig, evaluate_folders, evaluate_mvtec
    from appliance.evaluation.train import TrainConfig, available_cpus
    from appliance.names import normalize_name

    if category_dir is None and (normal_dir is None or defects_dir is None):
        raise click.UsageError("give --normal and --defects, or --category-dir")
    if category_dir is not None and (normal_dir is not None or defects_dir is not None):
        raise click.UsageError("--category-dir replaces --normal/--defects; give one or the other")
    if size % 16:
        raise click.BadParameter("must be a multiple of 16", param_hint="--size")
    if seed is not None and seeds_text is not None:
        raise click.UsageError("--seed runs one seed and --seeds several: give one or the other")
    seeds = _seeds(seeds_text) if seeds_text is not None else ()
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException("--device cuda: no CUDA device is available here")
    names = _generators(generators) if generators else ()
    needs_shots = [n for n in names if n in NEEDS_SHOTS]
    if needs_shots and not few_shot:
        raise click.UsageError(f"{', '.join(needs_shots)} pastes real defects, so it needs some: "
                               "add --few-shot K (K >= 1)")
    built_engine = None
    if not names or "ours" in names:
        from appliance.engine import EngineError, build_engine, resolve_engine_config

        try:
            config, _ = resolve_engine_config(engine)
        except EngineError as exc:
            raise click.BadParameter(str(exc), param_hint="--engine") from exc
        try:
            built_engine = build_engine(config)
        except EngineError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo("engine " + ", ".join(f"{k}={v}" for k, v in built_engine.describe().items()
                                         if k != "env"), err=True)
    config = EvalConfig(size=size, seed=seed or 0, generators=names, train_size=train_size,
                        generation_metrics=not no_generation_metrics, few_shot=few_shot,
                        image_labels=image_labels, detector_seeds=detector_seeds,
                        progress=not no_progress,
                        train=TrainConfig(epochs=epochs, device=device,
                                          threads=threads or available_cpus()))
    def log(line: str) -> None:
        click.echo(line, err=True)  # progress on stderr; the table alone goes to stdout

    try:
        if category_dir is not None:
            report = evaluate_mvtec(category_dir, out, category and normalize_name(category),
                                    config, built_engine, log, seeds)
        else:
            assert normal_dir is not None and defects_dir is not None
            name = normalize_name(category or Path(normal_dir).resolve().parent.name)
            report = evaluate_folders(normal_dir, defects_dir, out, name, config, built_engine,
                                      log, seeds)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        close = getattr(built_engine, "close", None)
        if close is not None:
            close()
    click.echo(format_table(report))
    if seeds:
        click.echo(f"written: {out / 'report.md'}, {out / 'report.json'} (over the seeds) and "
                   f"one report with figures per seed in {out / 'seed-N'}", err=True)
    else:
        click.echo(f"written: {out / 'report.md'}, {out / 'report.json'}, {out / 'pr_curves.png'}, "
                   f"{out / 'examples.png'}, {out / 'training_samples.png'}", err=True)
