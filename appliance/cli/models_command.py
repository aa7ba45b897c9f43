"""``appliance models``: pull a bundle (connected machine), install, verify and list models."""

from __future__ import annotations

from pathlib import Path

import click

MODELS_DIR_HELP = "Installed models folder (default: $APPLIANCE_MODELS or ~/.local/share/appliance/models)."


def _models_dir(value: Path | None) -> Path:
    from appliance.models.manifest import default_models_dir

    return Path(value) if value else default_models_dir()


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


_models_dir_option = click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path),
                                  default=None, help=MODELS_DIR_HELP)


@click.group("models")
def models_group() -> None:
    """Model weights, offline: pull a bundle, install it, verify it, see which engine runs."""


@models_group.command("pull")
@click.option("--to", "bundle", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New folder to write the bundle into (must not exist or be empty).")
@click.option("--catalogue", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Model catalogue (default: the repository's models/manifest.toml).")
@click.option("--only", "only", multiple=True, help="Pull only these entries (repeatable).")
@click.option("--token", envvar="HF_TOKEN", default=None,
              help="Hugging Face token for gated models (default: $HF_TOKEN).")
def pull_command(bundle: Path, catalogue: Path | None, only: tuple[str, ...], token: str | None) -> None:
    """Download the default model set into BUNDLE (run on a connected machine)."""
    from appliance.models.bundle import BundleError, pull
    from appliance.models.manifest import ManifestError, catalogue_path

    try:
        manifest = pull(catalogue or catalogue_path(), bundle, only=list(only) or None, token=token,
                        progress=lambda message: click.echo(message, err=True))
    except (BundleError, ManifestError) as exc:
        raise click.ClickException(str(exc)) from exc
    for entry in manifest.models:
        click.echo(f"{entry.name:24s} {entry.repo}@{entry.revision[:12]}  {len(entry.files)} files, "
                   f"{_size(entry.size)}")
    click.echo(f"bundle written to {bundle}; copy it to the appliance and run "
               f"`appliance models install {bundle}`")


@models_group.command("install")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_models_dir_option
def install_command(bundle: Path, models_dir: Path | None) -> None:
    """Verify every file of BUNDLE and install it atomically (all or nothing)."""
    from appliance.models.bundle import BundleError, install

    target = _models_dir(models_dir)
    try:
        report = install(bundle, target, progress=lambda message: click.echo(message, err=True))
    except BundleError as exc:
        raise click.ClickException(f"{exc}\nnothing was changed in {target}") from exc
    click.echo(f"installed {', '.join(report.installed)} ({report.files} files, "
               f"{_size(report.bytes)}) into {report.models_dir} in {report.seconds:.1f} s")
    if report.kept:
        click.echo(f"kept {', '.join(report.kept)}")


@models_group.command("verify")
@_models_dir_option
def verify_command(models_dir: Path | None) -> None:
    """Re-hash every installed file against the installed manifest."""
    from appliance.models.bundle import verify
    from appliance.models.manifest import load_installed

    target = _models_dir(models_dir)
    manifest = load_installed(target) if (target / "manifest.toml").is_file() else None
    problems = verify(target)
    if manifest is not None:
        bad = {p.model for p in problems}
        for entry in manifest.models:
            state = "FAIL" if entry.name in bad else "ok"
            click.echo(f"{state:4s} {entry.name:24s} {len(entry.files)} files, {_size(entry.size)}")
    for problem in problems:
        click.echo(f"  {problem}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {target}")
    click.echo(f"all files in {target} match their sha256")


@models_group.command("list")
@_models_dir_option
@click.option("--gpu-memory", type=click.FloatRange(1, 1024), default=None, metavar="GB",
              help="Also plan GPU memory for a GPU of this size (works on any machine): what "
                   "each model needs and which settings change to fit.")
def list_command(models_dir: Path | None, gpu_memory: float | None) -> None:
    """Installed models, the roles they satisfy, and which engine will run and why."""
    from dataclasses import replace

    from appliance.engine import model_roles, plan_gpu_memory, select_engine
    from appliance.models.manifest import ManifestError, load_installed

    target = _models_dir(models_dir)
    try:
        manifest = load_installed(target)
    except ManifestError as exc:
        manifest = None
        click.echo(f"the installed manifest is unreadable: {exc}", err=True)
    choice = select_engine(target)
    if manifest is None:
        click.echo(f"no models installed in {target}")
    else:
        click.echo(f"models in {target}:")
        for status in choice.statuses:
            entry = status.entry
            roles = ", ".join(f"{r}={b}" for r, b in entry.backends.items())
            click.echo(f"  {'ok  ' if status.installed else 'MISS'} {entry.name:24s} "
                       f"{_size(entry.size):>9s}  {entry.licence:18s} {roles}")
            if not status.installed:
                click.echo(f"       {status.reason}")
    click.echo(f"engine that will run: {choice.name}")
    for role, pick in choice.roles.items():
        click.echo(f"  {role:13s} {pick.backend:20s} {pick.reason}")
    config = choice.engine_config()
    if model_roles(config):
        plan = plan_gpu_memory(replace(config, gpu_memory_gb=gpu_memory),
                               device="cuda" if gpu_memory else None)
        if plan.before:
            click.echo("\n".join(plan.lines()))
        elif gpu_memory is None:
            click.echo("GPU memory: no GPU here; plan for one with --gpu-memory GB")
