"""The cluster's shared secret: Ray's token authentication, always on.

Every box of a cluster holds the same token file (mode 0600). Ray reads it through
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``, which we set for Ray's processes and for
this one; we never start or join a cluster without it.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

MIN_TOKEN_CHARS = 32
MAX_TOKEN_BYTES = 4096


class ClusterError(RuntimeError):
    """The cluster cannot be used; the message says what is wrong and what to do."""


def make_token(path: Path, force: bool = False) -> Path:
    """Write a new random token to ``path`` (0600, atomically); refuses to replace one unless
    ``force``: every box of the cluster holds a copy, and a new one locks them all out."""
    path = Path(path)
    if path.exists() and not force:
        raise ClusterError(f"{path} already exists; every box of the cluster uses it. Replace it "
                           f"with --force, then copy the new file to every box")
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(part, path)
    return path


def read_token(path: Path | None) -> str:
    """The token in ``path``; ClusterError saying how to make one when it is missing, empty,
    too short or readable by other users."""
    how = "make one with `appliance cluster token` and copy it to every box of the cluster"
    if path is None:
        raise ClusterError(f"no token file configured (cluster.token_file); {how}")
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ClusterError(f"no cluster token at {path}; {how}") from None
    except OSError as exc:
        raise ClusterError(f"cannot read the cluster token {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_TOKEN_BYTES:
        raise ClusterError(f"{path} is not a token file (a small plain file); {how}")
    if info.st_mode & 0o077:
        raise ClusterError(f"{path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o});"
                           f" run `chmod 600 {path}`")
    token = path.read_text(encoding="utf-8", errors="replace").strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ClusterError(f"the token in {path} has {len(token)} characters, fewer than "
                           f"{MIN_TOKEN_CHARS}; {how}")
    return token


def ray_auth_env(path: Path) -> dict[str, str]:
    """The environment that makes Ray use the token in ``path`` (checked first)."""
    read_token(path)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(Path(path).resolve())}
