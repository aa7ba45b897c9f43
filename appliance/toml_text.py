"""Writing TOML values (the standard library reads TOML but does not write it).

Used for the files the appliance writes for people to read and edit: the effective
configuration (`appliance config show`) and the models manifest.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePath
from typing import Any


def toml_key(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else json.dumps(key)


def toml_value(value: Any) -> str:
    """``value`` as a TOML value; raises ValueError for what TOML cannot hold (None)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if value is None:
        raise ValueError("TOML has no null; leave the key out")
    raise ValueError(f"cannot write {type(value).__name__} to TOML")
