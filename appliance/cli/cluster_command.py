"""``appliance cluster``: make the shared token, start or join the Ray cluster, stop it.

Episodes then run over the cluster with ``appliance batch --cluster HOST:PORT`` or with
``cluster.address`` in the configuration (the service). See docs/cluster.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from appliance.cluster.auth import ClusterError, make_token
from appliance.config import CONFIG_ENV, Config, ConfigError, load_config


def _config(config_file: Path | None) -> Config:
    try:
        return load_config(config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


_config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help=f"Config file (default: ${CONFIG_ENV}, else /etc/appliance/config.toml).")


@click.group("cluster")
def cluster_group() -> None:
    """Run one batch over several boxes on Ray (the cluster extra; docs/cluster.md).

    On the box that keeps the dataset (the head): `appliance cluster token`, then
    `appliance cluster start`. Copy the token file to every other box, then on each:
    `appliance cluster start --join HEAD:PORT`. Every Ray process runs with token
    authentication; none starts without the token.
    """


@cluster_group.command("token")
@_config_option
@click.option("--force", is_flag=True, help="Replace an existing token (every box then needs "
                                            "the new file).")
def token_command(config_file: Path | None, force: bool) -> None:
    """Write a new random token to the config's cluster.token_file (mode 0600)."""
    config = _config(config_file)
    try:
        path = make_token(config.cluster_token_file, force=force)
    except (ClusterError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"token written to {path}; copy it (mode 0600) to the same path on every box")


@cluster_group.command("start")
@_config_option
@click.option("--join", metavar="HOST:PORT", default=None,
              help="Join the head at HOST:PORT as a worker node (default: start the head).")
@click.option("--num-cpus", type=click.IntRange(0, 4096), default=None,
              help="CPUs Ray may use on this box (default: all). 0 on a head that should only "
                   "keep the dataset.")
@click.option("--num-gpus", type=click.IntRange(0, 64), default=None,
              help="GPUs Ray may use on this box (default: all it finds).")
@click.option("--block", is_flag=True, help="Stay in the foreground (for a systemd unit).")
def start_command(config_file: Path | None, join: str | None, num_cpus: int | None,
                  num_gpus: int | None, block: bool) -> None:
    """Start this box's Ray node: the head, or a worker node with --join."""
    from appliance.cluster.launch import start_command as ray_start

    config = _config(config_file)
    try:
        args, env = ray_start(config, join, num_cpus, num_gpus, block)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(" ".join(args), err=True)
    sys.exit(subprocess.run(args, env=env).returncode)


@cluster_group.command("stop")
def stop_command() -> None:
    """Stop every Ray process of this box (its node leaves the cluster)."""
    from appliance.cluster.launch import stop_command as ray_stop

    try:
        args = ray_stop()
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(subprocess.run(args).returncode)
