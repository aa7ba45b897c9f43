"""Option parsing shared by several commands."""

from __future__ import annotations

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
