"""The ``appliance`` command line."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import click

import appliance  # noqa: F401  (forces offline mode before any HF import)
from appliance.cli.options import CATEGORY, DEFECT, cluster_options, cluster_settings, parse_backends
from appliance.config import MAX_PER_IMAGE, TEST_GOOD_SHARE
from appliance.engine import EngineConfig, EngineError, resolve_engine_config


def _engine_config(engine: str, knowledge_base: Path | None, max_attempts: int | None,
                   backends: tuple[str, ...] = (), gpu_memory: float | None = None,
                   quiet: bool = False) -> EngineConfig:
    """The engine to build, with the reason for each backend and the GPU memory plan printed
    to stderr."""
    from appliance.engine import model_roles, plan_gpu_memory

    try:
        base, reasons = resolve_engine_config(engine, overrides=parse_backends(backends))
    except EngineError as exc:
        raise click.BadParameter(str(exc), param_hint="--engine/--backend") from exc
    env = replace(base.env, max_image_gen=max_attempts or base.env.max_image_gen)
    config = replace(base, env=env, knowledge_base=knowledge_base or base.knowledge_base,
                     gpu_memory_gb=gpu_memory)
    if not quiet:
        for role, backend in config.backend_names().items():
            click.echo(f"  {role:13s} {backend:18s} {reasons[role]}", err=True)
        plan = plan_gpu_memory(config) if model_roles(config) else None
        if plan is not None and plan.before:
            for line in plan.lines():
                click.echo(line, err=True)
    return config


def _engine_options(command):
    command = click.option("--engine", default="auto", show_default=True,
                           help="Set of backends: 'auto' (from the installed models in "
                                "$APPLIANCE_MODELS; the CPU engine when none are) or 'cpu'.")(command)
    command = click.option("--backend", "backends", multiple=True, metavar="ROLE=BACKEND",
                           help="Use this backend for one role, e.g. policy=qwen-llamacpp or "
                                "image_gen=flux-fill (repeatable; see `appliance models list`)."
                           )(command)
    command = click.option("--knowledge-base", type=click.Path(path_type=Path, file_okay=False),
                           default=None, help="Knowledge base folder (default: the bundled one, "
                                              "or $APPLIANCE_KNOWLEDGE_BASE).")(command)
    command = click.option("--max-attempts", type=click.IntRange(1, 10), default=None,
                           help="Image generation attempts per episode (default 3).")(command)
    command = click.option("--gpu-memory", type=click.FloatRange(1, 1024), default=None,
                           metavar="GB", help="GPU memory the models must fit in (default: all "
                           "of the GPU); settings change to fit (offload, 4-bit, smaller batches)."
                           )(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(appliance.__version__, prog_name="appliance")
def cli() -> None:
    """Synthesize realistic industrial defect images with pixel masks, fully offline.

    Typical use: put photos of normal parts in INBOX/<category>/ and run
    `appliance batch INBOX --out DATASET`. The output is an MVTec-AD style dataset with a
    manifest.jsonl and an index.html contact sheet.
    """


def _print_engine(describe: dict) -> None:
    parts = ", ".join(f"{k}={v}" for k, v in describe.items() if k not in ("env", "engine"))
    click.echo(f"engine {describe['engine']}: {parts}", err=True)


def _message_text(message: dict) -> str:
    texts = [p["text"] for p in message["content"] if p["type"] == "text"]
    images = [f"[image {p['image_index']}]" for p in message["content"]
              if p["type"] == "image" and "image_index" in p]
    return " ".join(texts + images)


def print_trajectory(messages: list[dict], width: int = 100) -> None:
    """The conversation for a person: one block per message, the system prompt left out."""
    for message in messages[1:]:
        role = message["role"] if message["role"] != "tool" else f"tool:{message.get('name', '')}"
        body = _message_text(message)
        click.secho(f"--- {role}", fg={"user": "cyan", "assistant": "green"}.get(message["role"], "yellow"))
        for line in body.splitlines():
            click.echo(textwrap.fill(line, width=width, subsequent_indent="    ") if line else "")


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--category", required=True, type=CATEGORY,
              help="Part category, e.g. bottle, magnetic_tile.")
@click.option("--defect", required=True, type=DEFECT,
              help="Defect type, e.g. crack, scratch, broken_large.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for defect.png, mask.png and the trajectory.")
@click.option("--seed", default=0, show_default=True, type=int)
@_engine_options
def synth(image: Path, category: str, defect: str, out: Path, seed: int, engine: str,
          backends: tuple[str, ...], knowledge_base: Path | None, max_attempts: int | None,
          gpu_memory: float | None) -> None:
    """Run one episode on IMAGE and print its trajectory."""
    from appliance.agent.episode import EpisodeSpec
    from appliance.dataset.trajectory import save_trajectory
    from appliance.engine import build_engine
    from appliance.imaging import ImageReadError, load_rgb, mask_to_pil, save_png_atomic, sha256_file, to_pil
    try:
        normal = load_rgb(image)
    except ImageReadError as exc:
        raise click.ClickException(f"{image}: {exc}") from exc
    try:
        built = build_engine(_engine_config(engine, knowledge_base, max_attempts, backends,
                                            gpu_memory))
    except EngineError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_engine(built.describe())
    spec = EpisodeSpec(image=normal, category=category, defect=defect,
                       seed=seed, source=str(image), source_sha256=sha256_file(image))
    result = built.environment.run([spec], built.policy)[0]
    print_trajectory(result.messages)
    out.mkdir(parents=True, exist_ok=True)
    save_trajectory(result, out / "trajectory")
    if result.final_image is not None and result.mask is not None:
        save_png_atomic(out / "defect.png", to_pil(result.final_image))
        save_png_atomic(out / "mask.png", mask_to_pil(result.mask.mask))
    click.echo(f"\nstatus {result.status} ({result.end_reason}); {result.turns} turns, "
               f"{len(result.attempts)} image_gen attempt(s), {result.seconds:.2f} s; "
               f"written to {out}")
    if result.status == "failed":
        sys.exit(1)


@cli.command()
@click.argument("inbox", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder (created; re-running adds only missing samples).")
@click.option("--per-image", default=1, show_default=True, type=click.IntRange(1, MAX_PER_IMAGE),
              help="Samples per (image, defect type), unless a category's spec.toml says otherwise.")
@click.option("--defect", "defects", multiple=True, type=DEFECT,
              help="Only these defect types (repeatable); default: spec.toml or the knowledge base.")
@click.option("--seed", default=0, show_default=True, type=int, help="Base seed of the run.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes, each with the engine resident.")
@click.option("--chunk", default=4, show_default=True, type=click.IntRange(1, 256),
              help="Episodes that step together (one batched call per tool).")
@click.option("--test-good-share", default=TEST_GOOD_SHARE, show_default=True,
              type=click.FloatRange(0.0, 0.9),
              help="Share of the normal photos held back in <category>/test/good (never edited), "
                   "so that anomalib's image-level metrics have normal test images.")
@cluster_options("the episodes (this box keeps the dataset)")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs and services).")
@click.option("--profile", is_flag=True,
              help="Profile the run (cProfile) and print its 20 costliest functions to stderr.")
@_engine_options
def batch(inbox: Path, out: Path, per_image: int, defects: tuple[str, ...], seed: int,
          workers: int, chunk: int, test_good_share: float, cluster_address: str | None,
          token_file: Path | None, no_progress: bool, profile: bool,
          engine: str,
          backends: tuple[str, ...],
          knowledge_base: Path | None, max_attempts: int | None, gpu_memory: float | None) -> None:
    """Turn INBOX/<category>/* photos of normal parts into a labeled defect dataset.

    Each category folder may hold a spec.toml (defects = [...], per_image = N,
    material = "..."). Defect types default to the knowledge base's list for the category.
    """
    from tqdm import tqdm

    from appliance.batch import InboxError, RunnerUnavailable, run_batch
    from appliance.storage import DiskFullError

    config = _engine_config(engine, knowledge_base, max_attempts, backends, gpu_memory)
    from appliance.engine import model_roles

    runner = _cluster_runner(config, cluster_address, token_file)
    if workers > 1 and model_roles(config) and runner is None:
        click.echo(f"note: each of the {workers} workers loads its own copy of the models "
                   "(the memory plan counts one); on one GPU, use --workers 1 and batch with "
                   "--chunk", err=True)
    click.echo(f"engine {config.name}: " + ", ".join(
        f"{k}={v}" for k, v in config.backend_names().items()), err=True)
    bar = None

    def progress(done: int, total: int, summary) -> None:
        nonlocal bar
        if no_progress:
            return
        if bar is None:
            bar = tqdm(total=total, unit="episode", desc="synthesizing", dynamic_ncols=True)
        bar.update(done - bar.n)
        bar.set_postfix(written=summary.written, accepted=f"{100 * summary.accepted_rate:.0f}%")

    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        summary = run_batch(inbox, out, config, per_image=per_image, seed=seed, workers=workers,
                            defects=[d for d in defects] or None, chunk=chunk, progress=progress,
                            test_good_share=test_good_share, runner=runner)
    except (InboxError, EngineError, DiskFullError, RunnerUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if bar is not None:
            bar.close()
        if profiler is not None:
            import pstats

            profiler.disable()
            click.echo("\nprofile (own time, then cumulative, top 20):", err=True)
            stats = pstats.Stats(profiler, stream=sys.stderr)
            stats.sort_stats("tottime").print_stats(20)
            stats.sort_stats("cumulative").print_stats(20)
    for line in summary.lines():
        click.echo(line)
    click.echo(f"dataset            {out}  (contact sheet: {out / 'index.html'})")


def _cluster_runner(config: EngineConfig, address: str | None, token_file: Path | None):
    """The cluster runner when a cluster is named (flag or config), else None (this box)."""
    from appliance.cluster.auth import ClusterError

    settings = cluster_settings(address, token_file)
    if settings is None:
        return None
    if importlib.util.find_spec("ray") is None:
        raise click.ClickException("running on a cluster needs Ray, which is not installed: "
                                   "install the cluster extra (pip install '.[cluster]')")
    from appliance.cluster.runner import ClusterRunner

    click.echo(f"cluster {settings.address}: starting engines on its nodes", err=True)
    try:
        runner = ClusterRunner(config, settings,
                               say=lambda line: click.echo(f"cluster: {line}", err=True))
    except (ClusterError, EngineError) as exc:
        raise click.ClickException(str(exc)) from exc
    for node in runner.nodes().values():
        click.echo(f"  node {node['name']}: {node['engines']} engine(s), {node['state']}", err=True)
    return runner


@cli.group()
def dataset() -> None:
    """Inspect a written dataset."""


@dataset.command("check")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
def dataset_check(root: Path) -> None:
    """Check that every sample of ROOT is complete and readable, and say what made it.

    Exits 1 when a sample is broken (missing or unpaired files, empty or non-binary masks,
    unreadable trajectories, files not in manifest.jsonl) or when there are no samples.
    """
    from appliance.dataset.check import check_dataset

    report = check_dataset(root)
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        raise SystemExit(1)


@cli.group()
def knowledge() -> None:
    """Inspect the defect knowledge base."""


@knowledge.command("list")
@click.argument("category", required=False)
@click.option("--knowledge-base", type=click.Path(path_type=Path, file_okay=False), default=None)
def knowledge_list(category: str | None, knowledge_base: Path | None) -> None:
    """List categories and materials, or the defect types of CATEGORY."""
    from appliance.tools.knowledge.base import KnowledgeBaseError, load_knowledge_base

    try:
        kb = load_knowledge_base(knowledge_base)
    except KnowledgeBaseError as exc:
        raise click.ClickException(str(exc)) from exc
    if category is None:
        for subject in sorted(kb.subjects.values(), key=lambda s: (s.kind, s.name)):
            click.echo(f"{subject.kind:9s} {subject.name:16s} {subject.material:10s} "
                       f"{', '.join(subject.defects)}")
        return
    subject = kb.subject(category)
    if subject is None:
        raise click.ClickException(f"{category!r} is not in the knowledge base")
    for entry in kb.entries:
        if entry.subject == subject.name:
            click.echo(f"{entry.defect} [{entry.renderer}]\n  {entry.appearance}\n"
                       f"  where: {entry.location}\n  size: {entry.size}")


@knowledge.command("search")
@click.argument("category")
@click.argument("defect")
@click.option("-k", default=3, show_default=True, type=click.IntRange(1, 20))
def knowledge_search(category: str, defect: str, k: int) -> None:
    """Retrieve the entries the agent would get for CATEGORY and DEFECT."""
    from appliance.engine import build_engine

    built = build_engine()
    found = built.tools.knowledge.retrieve(category, defect, k=k)
    for entry, score in zip(found.entries, found.scores):
        click.echo(f"{score:6.3f}  {entry.id}  ({entry.renderer})\n        {entry.appearance}")


def _register_commands() -> None:
    """Commands that live in their own modules register here."""
    from appliance.cli.cluster_command import cluster_group
    from appliance.cli.eval_command import eval_command
    from appliance.cli.retrain_command import retrain_command
    from appliance.cli.review_command import export_command, review_command
    from appliance.cli.models_command import models_group
    from appliance.cli.selftest_command import selftest_command
    from appliance.cli.service_commands import register as register_service_commands

    cli.add_command(cluster_group, name="cluster")
    cli.add_command(eval_command, name="eval")
    cli.add_command(retrain_command, name="retrain")
    cli.add_command(review_command, name="review")
    cli.add_command(export_command, name="export")
    cli.add_command(models_group, name="models")
    cli.add_command(selftest_command, name="selftest")
    register_service_commands(cli)


_register_commands()


def main() -> None:  # pragma: no cover - console entry point
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
