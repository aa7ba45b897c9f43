"""Finding complete files in the inbox by polling.

Polling works everywhere, NFS and CIFS shares included, where inotify sees nothing. A file is
taken once its (size, mtime, inode) has been the same for ``stable_polls`` scans and its mtime is
at least ``settle_seconds`` old: a copy still in progress keeps changing one of them. Names that
copy tools use while writing (``.part``, ``~``, hidden ``.name.XXXX`` of rsync, ...) are never
taken, and a file the intake asked to wait for is looked at again only once it changes or it
is old enough to be judged.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.batch import SPEC_FILE

# Suffixes of files that copy tools and browsers write before renaming to the final name.
IN_PROGRESS_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".filepart",
                        ".download", ".!qb", ".swp", "~")


@dataclass
class _Seen:
    signature: tuple
    polls: int
    mtime: float


def _signature(info: os.stat_result) -> tuple:
    return (info.st_size, info.st_mtime_ns, info.st_ino, stat.S_IFMT(info.st_mode))


def ignored_name(name: str) -> bool:
    lower = name.lower()
    return (name.startswith(".") or name == SPEC_FILE or lower.endswith(IN_PROGRESS_SUFFIXES))


class InboxScanner:
    """Remembers what each poll saw and reports the entries that are ready to take."""

    def __init__(self, inbox: Path, stable_polls: int = 2, settle_seconds: float = 5.0,
                 recheck_seconds: float = 60.0):
        self.inbox = Path(inbox)
        self.stable_polls = stable_polls
        self.settle_seconds = settle_seconds
        self.recheck_seconds = recheck_seconds
        self._seen: dict[str, _Seen] = {}
        self._deferred: dict[str, tuple] = {}  # path -> signature when the intake said "wait"

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        """Every candidate under the inbox (not following symlinks), sorted by name."""
        found = []
        stack = [self.inbox]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as listing:
                    items = list(listing)
            except OSError:
                continue  # vanished or unreadable folder: the next poll sees it again
            for entry in items:
                if ignored_name(entry.name):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    stack.append(Path(entry.path))
                else:
                    found.append((Path(entry.path), info))
        return sorted(found, key=lambda item: os.fsencode(item[0]))

    def poll(self, now: float | None = None) -> list[Path]:
        """One scan; returns the entries that are complete (and were not deferred)."""
        now = time.time() if now is None else now
        ready, current = [], {}
        for path, info in self.entries():
            key = os.fsdecode(path)
            signature = _signature(info)
            previous = self._seen.get(key)
            polls = previous.polls + 1 if previous and previous.signature == signature else 1
            current[key] = _Seen(signature, polls, info.st_mtime)
            deferred = self._deferred.get(key)
            if deferred is not None:
                if deferred == signature and now - info.st_mtime < self.recheck_seconds:
                    continue
                del self._deferred[key]
            regular = stat.S_ISREG(info.st_mode)
            if not regular or (polls >= self.stable_polls
                               and now - info.st_mtime >= self.settle_seconds):
                ready.append(path)
        self._seen = current
        self._deferred = {k: v for k, v in self._deferred.items() if k in current}
        return ready

    def defer(self, path: Path) -> None:
        """The intake could not judge the file yet: skip it until it changes or ages."""
        key = os.fsdecode(path)
        seen = self._seen.get(key)
        if seen is not None:
            self._deferred[key] = seen.signature

    def forget(self, path: Path) -> None:
        self._seen.pop(os.fsdecode(path), None)
        self._deferred.pop(os.fsdecode(path), None)

    def pending(self) -> int:
        """Entries seen but not yet taken (copies in progress, deferred files)."""
        return len(self._seen)
