"""Option parsing shared by several commands."""

from __future__ import annotations

import click


def parse_backends(values: tuple[str, ...]) -> dict[str, str]:
    overrides = {}
    for value in values:
        role, sep, backend = value.partition("=")
        if not sep or not role.strip() or not backend.strip():
            raise click.BadParameter(f"{value!r} is not ROLE=BACKEND (e.g. policy=qwen-llamacpp)",
                                     param_hint="--backend")
        overrides[role.strip().replace("-", "_")] = backend.strip()
    return overrides
