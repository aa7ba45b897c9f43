"""Reading and writing the files people edit (TOML) and the records we keep (JSON), one way each.

* ``load_toml`` / ``parse_toml``: the one strict TOML reader. A file must be UTF-8 and valid TOML;
  the error names the file (and tomllib's line and column). What the keys may be is the caller's
  schema.
* ``toml_value`` / ``dumps_toml``: TOML written by tomli-w, never by hand.
* ``json_default``: the one ``default=`` for ``json.dumps`` (numpy scalars and arrays, paths).
"""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePath
from typing import Any, Callable

import tomli_w

ErrorFactory = Callable[[str], Exception]


class TomlError(ValueError):
    """A TOML file cannot be read; the message names the file."""


def parse_toml(text: str, where: str, error: ErrorFactory = TomlError) -> dict[str, Any]:
    """``text`` as a TOML table; ``error(message)`` is raised when it is not valid TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{where}: not valid TOML: {exc}") from None
    except RecursionError:  # thousands of nested arrays or tables
        raise error(f"{where}: not valid TOML: nested too deeply") from None


def load_toml(path: Path, error: ErrorFactory = TomlError, where: str | None = None) -> dict[str, Any]:
    """The TOML file at ``path`` as a table; a missing, unreadable, non-UTF-8 or invalid file
    raises ``error(message)`` with ``where`` (default: the path) leading the message."""
    where = where or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{where}: no such file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not valid TOML: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{where}: cannot read: {exc.strerror or exc}") from None
    return parse_toml(text, where, error)


def _plain(value: Any) -> Any:
    """Paths as strings and tuples as lists, all the way down; None is refused (TOML has no null)."""
    if value is None:
        raise ValueError("TOML has no null; leave the key out")
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    return value


def dumps_toml(data: dict[str, Any]) -> str:
    """A TOML document; keys whose value is None are left out."""
    try:
        return tomli_w.dumps(_plain(data))
    except TypeError as exc:
        raise ValueError(f"cannot write to TOML: {exc}") from exc


def toml_value(value: Any) -> str:
    """One value (not a table) as it appears right of ``key =``, for a line that carries a comment."""
    if isinstance(value, dict):
        raise ValueError("a table is not a one-line value; write it with dumps_toml")
    text = dumps_toml({"v": _plain(value)})
    if not text.startswith("v = "):
        raise ValueError(f"cannot write {value!r} as a one-line TOML value")
    return text[len("v = "):].rstrip("\n")


def json_default(value: Any) -> Any:
    """For ``json.dumps(..., default=json_default)``: numpy values as plain numbers and lists,
    paths as strings; anything else is refused, as json does."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
