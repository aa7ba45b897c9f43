"""Finding complete files in the inbox by polling.

Polling works everywhere, NFS and CIFS shares included, where inotify sees nothing. A file is
taken once its (size, mtime, inode) has been the same for ``stable_polls`` scans and its mtime is
at least ``settle_seconds`` old: a copy still in progress keeps changing one of them. Names that
copy tools use while writing (``.part``, ``~``, hidden ``.name.XXXX`` of rsync, ...) are never
taken, and a file the intake asked to wait for is looked at again only once it changes or it
is old enough to be judged.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.batch import SPEC_FILE
from appliance.names import printable

log = logging.getLogger(__name__)

# Suffixes of files that copy tools and browsers write before renaming to the final name.
IN_PROGRESS_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".filepart",
                        ".download", ".!qb", ".swp", "~")


@dataclass
class _Seen:
    signature: tuple
    polls: int
    mtime: float
    since: float  # when this poll loop first saw the file as it is now


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
        self._held: dict[str, tuple] = {}  # path -> signature: left alone until it changes
        self.unreadable: set[str] = set()  # folders of the inbox this user cannot list

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        """Every candidate under the inbox (not following symlinks), sorted by name."""
        found = []
        stack = [self.inbox]
        unreadable = set()
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as listing:
                    items = list(listing)
            except PermissionError:
                unreadable.add(os.fsdecode(folder))  # said once in the log and in the status
                continue
            except OSError:
                continue  # vanished folder: the next poll sees it again
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
        for folder in sorted(unreadable - self.unreadable):
            log.error("cannot list inbox folder %s (permission denied): the files in it are "
                      "not taken until the service's group may read it (chmod g+rx)",
                      printable(folder))
        self.unreadable = unreadable
        return sorted(found, key=lambda item: os.fsencode(item[0]))

    def poll(self, now: float | None = None) -> list[Path]:
        """One scan; returns the entries that are complete (and were not deferred)."""
        now = time.time() if now is None else now
        ready, current = [], {}
        for path, info in self.entries():
            key = os.fsdecode(path)
            signature = _signature(info)
            previous = self._seen.get(key)
            same = previous is not None and previous.signature == signature
            polls = previous.polls + 1 if same else 1
            current[key] = _Seen(signature, polls, info.st_mtime, previous.since if same else now)
            if key in self._held:
                if self._held[key] == signature:
                    continue
                del self._held[key]
            deferred = self._deferred.get(key)
            if deferred is not None:
                if deferred == signature and self.age(path, now, current) < self.recheck_seconds:
                    continue
                del self._deferred[key]
            regular = stat.S_ISREG(info.st_mode)
            if not regular or (polls >= self.stable_polls
                               and self.age(path, now, current) >= self.settle_seconds):
                ready.append(path)
        self._seen = current
        self._deferred = {k: v for k, v in self._deferred.items() if k in current}
        self._held = {k: v for k, v in self._held.items() if k in current}
        return ready

    def age(self, path: Path, now: float | None = None,
            seen: dict[str, _Seen] | None = None) -> float:
        """How long the file has been as it is: from its mtime, but never more than since this
        loop first saw it so, when the mtime lies in the future (a writer's clock ahead) — such
        a file would otherwise never be old enough to take."""
        now = time.time() if now is None else now
        entry = (self._seen if seen is None else seen).get(os.fsdecode(path))
        if entry is None:
            return 0.0
        if entry.mtime > now:
            return now - entry.since
        return now - entry.mtime

    def future(self, path: Path, now: float | None = None) -> float:
        """Seconds the file's mtime lies ahead of this machine's clock (0 when it does not)."""
        now = time.time() if now is None else now
        entry = self._seen.get(os.fsdecode(path))
        return max(0.0, entry.mtime - now) if entry else 0.0

    def hold(self, path: Path) -> None:
        """Leave the file alone until it changes (intake gave up and could not move it)."""
        key = os.fsdecode(path)
        seen = self._seen.get(key)
        if seen is not None:
            self._held[key] = seen.signature

    def defer(self, path: Path) -> None:
        """The intake could not judge the file yet: skip it until it changes or ages."""
        key = os.fsdecode(path)
        seen = self._seen.get(key)
        if seen is not None:
            self._deferred[key] = seen.signature

    def forget(self, path: Path) -> None:
        self._seen.pop(os.fsdecode(path), None)
        self._deferred.pop(os.fsdecode(path), None)
        self._held.pop(os.fsdecode(path), None)

    def pending(self) -> int:
        """Entries seen but not yet taken (copies in progress, deferred files)."""
        return len(self._seen)

    def seen(self) -> list[Path]:
        """Every entry the last poll saw."""
        return [Path(key) for key in self._seen]

    def held(self) -> int:
        """Entries left alone until they change."""
        return len(self._held)
