"""The time window in which episodes run, and ``--until HH:MM`` deadlines."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta

from appliance.config import parse_window


@dataclass(frozen=True)
class Window:
    """``start``-``end`` every day (wrapping midnight when end < start); None: always open."""

    start: time | None = None
    end: time | None = None

    @classmethod
    def parse(cls, text: str) -> "Window":
        span = parse_window(text)
        return cls() if span is None else cls(*span)

    @property
    def always(self) -> bool:
        return self.start is None

    def contains(self, now: datetime) -> bool:
        if self.start is None or self.end is None:
            return True
        t = now.time()
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def closes_at(self, now: datetime) -> datetime | None:
        """When the window that is open at ``now`` closes (None when always open or closed)."""
        if self.end is None or not self.contains(now):
            return None
        return next_time(self.end, now)

    def opens_at(self, now: datetime) -> datetime | None:
        if self.start is None:
            return None
        return now if self.contains(now) else next_time(self.start, now)

    def __str__(self) -> str:
        if self.start is None or self.end is None:
            return "always"
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def next_time(at: time, now: datetime) -> datetime:
    """The first moment after ``now`` when the clock reads ``at``."""
    candidate = now.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + timedelta(days=1)


def parse_until(text: str, now: datetime) -> datetime:
    """``--until 06:00``: the next 06:00 after now. ValueError for anything else."""
    try:
        at = datetime.strptime(text.strip(), "%H:%M").time()
    except ValueError:
        raise ValueError(f"--until must be HH:MM (24-hour clock), not {text!r}") from None
    return next_time(at, now)
