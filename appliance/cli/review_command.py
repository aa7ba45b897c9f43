"""``appliance review`` (the morning review in a browser) and ``appliance export``."""

from __future__ import annotations

import getpass
from pathlib import Path

import click

from appliance.cli.service_commands import _act_as_owner, _config_option, _load

EXPORT_HELP = ("Write approved samples only (default); --not-rejected also takes samples "
               "nobody has reviewed yet.")


def _dataset(dataset: Path | None, config_file: Path | None) -> Path:
    root = dataset if dataset is not None else _load(config_file).dataset
    if not (root / ".appliance").is_dir():
        raise click.ClickException(f"{root} is not a dataset written by the appliance "
                                   "(it has no .appliance/ job store)")
    return root


def _is_loopback(host: str) -> bool:
    from appliance.review.server import is_loopback_name

    return is_loopback_name(host)


@click.command("review")
@click.argument("dataset", required=False,
                type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --allow-remote.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: any free port).")
@click.option("--allow-remote", is_flag=True,
              help="Allow a --host that other machines can reach (the token still guards it).")
@click.option("--reviewer", default=None,
              help="Name recorded with decisions (default: your login; the page can change it).")
@click.option("--export-to", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for exports made from the page (each one in a new subfolder); "
                   "without it the page has no export button.")
@_config_option
def review_command(dataset: Path | None, host: str, port: int, allow_remote: bool,
                   reviewer: str | None, export_to: Path | None,
                   config_file: Path | None) -> None:
    """Review DATASET's samples in a browser: filter, zoom, approve and reject.

    DATASET defaults to the configured one. Decisions go into the dataset's job store (who,
    when, why) and show in `appliance status`; `appliance export` writes the approved ones.
    Open the URL printed at start: it carries the token every request needs.
    """
    from appliance.review.server import ReviewSettings, new_token, serve

    root = _dataset(dataset, config_file)
    _act_as_owner(root)  # decisions are written into the store as its owner, never as root
    if not _is_loopback(host) and not allow_remote:
        raise click.UsageError(f"--host {host} can be reached from other machines; add "
                               "--allow-remote if that is what you want")
    settings = ReviewSettings(dataset=root, token=new_token(),
                              reviewer=reviewer or getpass.getuser(), export_to=export_to,
                              allow_remote=not _is_loopback(host))
    if settings.allow_remote:
        click.echo(f"WARNING: listening on {host}: anyone on the network with the URL below "
                   "can review this dataset; it is plain HTTP", err=True)

    def announce(url: str) -> None:
        click.echo(f"reviewing {root}\nopen {url}\n(Ctrl-C stops the server)", err=True)
        click.echo(url)

    try:
        serve(settings, host, port, announce)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass


@click.command("export")
@click.argument("dataset", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--approved/--not-rejected", "approved_only", default=True, help=EXPORT_HELP)
def export_command(dataset: Path, out: Path, approved_only: bool) -> None:
    """Write DATASET's reviewed samples to OUT in the MVTec-AD layout.

    OUT gets every normal photo (train/good and test/good), the approved samples renumbered
    from 000 with their masks and trajectories, a manifest, and review_feedback.jsonl: the
    rejected samples with who rejected them and why (negative examples for retraining).
    OUT must not exist or be empty; it appears complete or not at all.
    """
    from appliance.dataset.export import ExportError, export_reviewed

    root = _dataset(dataset, None)
    try:
        report = export_reviewed(root, out, approved_only=approved_only)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from exc
    for line in report.lines():
        click.echo(line)
