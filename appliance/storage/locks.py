"""File locks that the kernel releases when their process dies, even by ``kill -9``.

- The *dataset lock* serialises every write into the dataset folder (normals, samples, manifest
  lines, contact sheets) and the repairs done on acquiring it. It is held for milliseconds at
  a time, so the watcher and the nightly run can share one dataset.
- An *owner lock* is held by each process for its whole life while it runs episodes. An
  episode marked ``running`` by an owner whose lock can be taken is an orphan of a dead process
  and goes back to the queue; a PID check could not tell a reused PID from the original.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path


class LockTimeout(TimeoutError):
    """The lock stayed held by another process for longer than the caller would wait."""


class FileLock:
    """An exclusive ``flock``; re-entrant within one process (nested ``with`` blocks)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Take the lock; returns True when this call took it (not a nested re-entry)."""
        if self._depth:
            self._depth += 1
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockTimeout(f"{self.path} is held by another process") from None
                time.sleep(poll)
        self._fd = fd
        self._depth = 1
        return True

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Owner:
    """This process's identity for claimed episodes, kept alive by a held lock file."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.token = f"{os.getpid()}-{time.time_ns()}"
        self._lock = FileLock(self.folder / f"{self.token}.lock")
        self._lock.acquire(timeout=0)

    def close(self) -> None:
        self._lock.release()
        try:
            self._lock.path.unlink()
        except FileNotFoundError:
            pass


def owner_alive(folder: Path, token: str) -> bool:
    """True while the process that created ``token`` is running (it still holds its lock)."""
    path = Path(folder) / f"{token}.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # closing drops the lock we may just have taken
    try:
        path.unlink()  # its process is gone: the file is litter
    except FileNotFoundError:
        pass
    return False
