"""Option parsing shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click

from appliance.names import InvalidName, Name


def parse_backends(values: tuple[str, ...]) -> dict[str, str]:
    overrides = {}
    for value in values:
        role, sep, backend = value.partition("=")
        if not sep or not role.strip() or not backend.strip():
            raise click.BadParameter(f"{value!r} is not ROLE=BACKEND (e.g. policy=qwen-llamacpp)",
                                     param_hint="--backend")
        overrides[role.strip().replace("-", "_")] = backend.strip()
    return overrides


class NameParam(click.ParamType):
    """A category or defect name on the command line: the same validated ``Name`` as everywhere."""

    def __init__(self, kind: str):
        self.kind = kind
        self.name = kind

    def convert(self, value, param, ctx) -> Name:
        if isinstance(value, Name):
            return value
        try:
            return Name(value, self.kind)
        except InvalidName as exc:
            self.fail(str(exc), param, ctx)


CATEGORY = NameParam("category")
DEFECT = NameParam("defect")


def cluster_options(what: str):
    """``--cluster`` and ``--token-file`` for a command that can run ``what`` on a Ray cluster."""
    def decorate(command):
        command = click.option(
            "--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
            help="The cluster's token file (default: the config's cluster.token_file).")(command)
        return click.option(
            "--cluster", "cluster_address", metavar="HOST:PORT", default=None,
            help=f"Run {what} on the Ray cluster whose head is at HOST:PORT (this box must be "
                 "one of its nodes: `appliance cluster start`). Default: the config's "
                 "cluster.address, else this box alone. See docs/cluster.md.")(command)
    return decorate


def cluster_settings(address: str | None, token_file: Path | None):
    """The cluster the flags or the configuration name (``ClusterSettings``), else None."""
    from appliance.cluster.settings import ClusterSettings
    from appliance.config import ConfigError, load_config

    try:
        return ClusterSettings.from_config(load_config(), address, token_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
