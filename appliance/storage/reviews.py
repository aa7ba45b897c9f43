"""A person's decisions on samples: approve or reject, with who, when and why.

Rows are only ever added (table ``reviews``, migration ``m003``); a sample's state is its newest
row, and the older ones are its history. Every decision is one transaction of the job store, so
a decision the page confirmed survives a crash or a power cut, and a bulk decision is all or
nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from appliance.storage.store import JobStore

DECISIONS = ("approved", "rejected")
# The short list the page offers; free text is allowed too.
REASONS = ("not realistic", "wrong place on the part", "mask does not fit the defect",
           "not this defect type", "too large", "too small", "seam or artefact visible",
           "duplicate")
MAX_REASON = 500
MAX_REVIEWER = 64


class ReviewError(ValueError):
    """A decision that cannot be recorded (unknown sample, bad decision, unprintable text)."""


@dataclass(frozen=True)
class ReviewCounts:
    approved: int
    rejected: int
    unreviewed: int

    def as_dict(self) -> dict[str, int]:
        return {"approved": self.approved, "rejected": self.rejected,
                "unreviewed": self.unreviewed}


def _text(value: str | None, what: str, limit: int, required: bool) -> str:
    text = " ".join((value or "").split())  # newlines and runs of spaces become one space
    if required and not text:
        raise ReviewError(f"{what} is empty")
    if len(text) > limit:
        raise ReviewError(f"{what} is longer than {limit} characters")
    if not text.isprintable():
        raise ReviewError(f"{what} holds characters that do not print")
    return text


class ReviewLog:
    """The ``reviews`` table of one job store."""

    def __init__(self, store: JobStore):
        self.store = store
        self.db = store.db

    def decide(self, sample_ids: list[int], decision: str, reviewer: str,
               reason: str | None = None) -> int:
        """Record one decision for each sample, all in one transaction; returns how many.
        A rejection needs a reason; unknown or unwritten samples refuse the whole call."""
        if decision not in DECISIONS:
            raise ReviewError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
        reviewer = _text(reviewer, "reviewer", MAX_REVIEWER, required=True)
        reason = _text(reason, "reason", MAX_REASON, required=decision == "rejected")
        ids = sorted({int(i) for i in sample_ids})
        if not ids:
            raise ReviewError("no sample given")
        now = time.time()
        with self.store.transaction():
            marks = ",".join("?" * len(ids))
            keys = dict(self.db.execute(
                f"select id, key from samples where status = 'ok' and id in ({marks})", ids))
            unknown = [i for i in ids if i not in keys]
            if unknown:
                raise ReviewError(f"no written sample with id {', '.join(map(str, unknown[:5]))}")
            self.db["reviews"].insert_all(
                [{"sample_id": i, "key": keys[i], "decision": decision, "reason": reason,
                  "reviewer": reviewer, "decided_at": now} for i in ids])
        return len(ids)

    def latest(self) -> dict[int, dict]:
        """sample id -> its newest decision."""
        # Joined on the episode key too: a sample id SQLite hands out again after a sample was
        # removed must not inherit the removed sample's decision.
        rows = self.db.query(
            "select r.* from reviews r join (select sample_id, max(id) as id from reviews "
            "group by sample_id) newest on r.id = newest.id "
            "join samples s on s.id = r.sample_id and s.key = r.key")
        return {row["sample_id"]: row for row in rows}

    def history(self, sample_id: int) -> list[dict]:
        return list(self.db.query(
            "select r.* from reviews r join samples s on s.id = r.sample_id and s.key = r.key "
            "where r.sample_id = ? order by r.id", [sample_id]))

    def counts(self) -> ReviewCounts:
        """Over the dataset's written samples (decisions on removed samples do not count)."""
        written = {row[0] for row in self.db.execute("select id from samples where status = 'ok'")}
        states = {i: row["decision"] for i, row in self.latest().items() if i in written}
        approved = sum(1 for d in states.values() if d == "approved")
        rejected = sum(1 for d in states.values() if d == "rejected")
        return ReviewCounts(approved, rejected, len(written) - approved - rejected)
