"""``appliance eval``: how much do synthetic defects teach a detector about real ones?"""

from __future__ import annotations

import os
from pathlib import Path

import click

from appliance.cli.options import CATEGORY


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _generators(value: str) -> tuple[str, ...]:
    from appliance.evaluation.generators import KNOWN

    names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in KNOWN]
    if unknown or not names:
        raise click.BadParameter(f"unknown generator(s) {', '.join(unknown) or '(none)'}; "
                                 f"known: {', '.join(KNOWN)}", param_hint="--generators")
    return tuple(dict.fromkeys(names))


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
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--generators", "generators", default="ours,draem,cutpaste", show_default=True,
              help="Comma-separated: ours, draem, cutpaste, cutpaste-patch, cutpaste-scar.")
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
def eval_command(normal_dir: Path | None, defects_dir: Path | None, category_dir: Path | None,
                 out: Path, category: str | None, seed: int, device: str, generators: str,
                 train_size: int, epochs: int, size: int, threads: int | None, engine: str,
                 no_generation_metrics: bool) -> None:
    """Train the same small UNet on each generator's synthetic defects and test it on REAL ones.

    Prints one table (pixel/image AUROC, AP, F1-max, generation measurements, speed) with
    every generator side by side and the ratio of ours to the best baseline; writes it to
    OUT/report.json and OUT/report.md with PR curves and example predictions as PNG.

    \b
    Example (magnetic tile layout):
      appliance eval --normal MT/MT_Free --defects MT --out eval-out
    """
    from appliance.evaluation.report import format_table
    from appliance.evaluation.runner import EvalConfig, evaluate_folders, evaluate_mvtec
    from appliance.evaluation.train import TrainConfig
    from appliance.names import normalize_name

    if category_dir is None and (normal_dir is None or defects_dir is None):
        raise click.UsageError("give --normal and --defects, or --category-dir")
    if category_dir is not None and (normal_dir is not None or defects_dir is not None):
        raise click.UsageError("--category-dir replaces --normal/--defects; give one or the other")
    if size % 16:
        raise click.BadParameter("must be a multiple of 16", param_hint="--size")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException("--device cuda: no CUDA device is available here")
    names = _generators(generators)
    built_engine = None
    if "ours" in names:
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
    config = EvalConfig(size=size, seed=seed, generators=names, train_size=train_size,
                        generation_metrics=not no_generation_metrics,
                        train=TrainConfig(epochs=epochs, device=device,
                                          threads=threads or _default_threads()))
    def log(line: str) -> None:
        click.echo(line, err=True)  # progress on stderr; the table alone goes to stdout

    try:
        if category_dir is not None:
            report = evaluate_mvtec(category_dir, out, category and normalize_name(category),
                                    config, built_engine, log)
        else:
            assert normal_dir is not None and defects_dir is not None
            name = normalize_name(category or Path(normal_dir).resolve().parent.name)
            report = evaluate_folders(normal_dir, defects_dir, out, name, config, built_engine, log)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        close = getattr(built_engine, "close", None)
        if close is not None:
            close()
    click.echo(format_table(report))
    click.echo(f"written: {out / 'report.md'}, {out / 'report.json'}, {out / 'pr_curves.png'}, "
               f"{out / 'examples.png'}, {out / 'training_samples.png'}", err=True)
