"""The job store: the single source of truth for inputs, episodes and samples.

SQLite in WAL mode through sqlite-utils, kept beside the dataset in ``DATASET/.appliance/``::

    jobs.db          inputs, normals, episodes, samples, batches, control (see migrations.py)
    dataset.lock     held while anything is written into the dataset folder
    owners/          one held lock file per process that is running episodes
    orphans/         files found in the dataset that no row explains, moved aside

The write protocol for anything in the dataset (see ``DatasetWriter``): reserve a row with
status ``writing`` (this allocates its number in the same transaction), write each file to a
temporary name, fsync, rename, then flip the row to ``ok``. So every final file name belongs to
a row, a number is never handed out twice, and a crash leaves only ``writing`` rows whose files
are either complete (adopted) or not (removed, the episode re-queued). Work is idempotent by the
episode key (input sha256, category, defect, seed).
"""

from __future__ import annotations

import errno
import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlite_utils

from appliance.names import Name
from appliance.serialization import json_default
from appliance.storage.layout import DB_NAME, STATE_DIR
from appliance.storage.locks import FileLock, Owner, owner_alive
from appliance.storage.migrations import migrate
from appliance.storage.repair import repair_writes

# An episode in one of these states is finished: it is never run again.
FINISHED = ("accepted", "rejected", "failed", "removed")
PENDING = ("queued", "running", "writing")


class DiskFullError(RuntimeError):
    """No space left for the dataset or the store; nothing half-written was left behind."""


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # SQLite reports SQLITE_FULL as "database or disk is full".
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()


@dataclass(frozen=True)
class EpisodePlan:
    key: str
    sha256: str
    category: str
    defect: str
    sample: int
    seed: int


class JobStore:
    """One connection to the store of one dataset; cheap to open, safe across processes."""

    def __init__(self, root: Path, timeout: float = 60.0):
        self.root = Path(root)
        self.state_dir = self.root / STATE_DIR
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / DB_NAME
        conn = sqlite3.connect(str(self.path), timeout=timeout, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.enable_wal()
        # WAL + FULL: a committed row survives a power cut, not only a process crash.
        self.db.execute("PRAGMA synchronous=FULL")
        self.migrations_run = migrate(self.db, self.transaction)
        self.lock = FileLock(self.state_dir / "dataset.lock")
        self._owner: Owner | None = None
        # On taking the dataset lock, first settle what a writer that died holding it left.
        self.repair_on_lock = True
        self.last_repair = None  # what the last repair on taking the lock did (for reports)

    @classmethod
    def for_dataset(cls, root: Path) -> "JobStore":
        return cls(root)

    def close(self) -> None:
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        self.db.conn.close()

    # Transactions and locks ---------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE``: take the write lock first, so two writers never deadlock."""
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def dataset_lock(self, timeout: float | None = 600.0) -> Iterator[None]:
        """Hold the dataset lock; the outermost holder first repairs what a crash left."""
        first = self.lock.acquire(timeout=timeout)
        try:
            if first and self.repair_on_lock:
                self.last_repair = repair_writes(self)
            yield
        finally:
            self.lock.release()

    @property
    def owners_dir(self) -> Path:
        return self.state_dir / "owners"

    @property
    def owner(self) -> str:
        """This process's owner token (created, and its lock taken, on first use)."""
        if self._owner is None:
            self._owner = Owner(self.owners_dir)
        return self._owner.token

    # Inputs and normals -------------------------------------------------------------------------

    def add_input(self, sha256: str, size: int, width: int, height: int, source: str,
                  original_size: tuple[int, int] | None = None) -> bool:
        """Record an input file's content; returns False when it was already known."""
        ow, oh = original_size or (width, height)
        with self.transaction():
            if self.db.execute("select 1 from inputs where sha256 = ?", [sha256]).fetchone():
                return False
            self.db["inputs"].insert({"sha256": sha256, "size": size, "width": width,
                                      "height": height, "original_width": ow,
                                      "original_height": oh, "first_source": source,
                                      "first_seen": time.time()})
        return True

    def normal(self, sha256: str, category: str) -> dict | None:
        rows = list(self.db.query("select * from normals where sha256 = ? and category = ?",
                                  [sha256, category]))
        return rows[0] if rows else None

    def reserve_normal(self, sha256: str, category: str, source: str,
                       place: Callable[[int], tuple[str, str]],
                       is_free: Callable[[int], bool] = lambda n: True) -> tuple[dict, bool]:
        """The normal row for (sha256, category), reserving a number if new; (row, created).

        ``place(number)`` gives the photo's (path, split): "train" for a synthesis source,
        "test" for one held back in test/good. ``is_free(number)`` lets the caller skip numbers
        whose file exists without a row (put there by hand): such a file is never overwritten.
        """
        with self.transaction():
            existing = self.normal(sha256, category)
            if existing is not None:
                return existing, False
            top = self.db.execute("select max(number) from normals where category = ?",
                                  [category]).fetchone()[0]
            number = _next_free(-1 if top is None else top, is_free)
            path, split = place(number)
            row = {"sha256": sha256, "category": category, "number": number, "path": path,
                   "split": split, "source": source, "status": "writing", "created": time.time()}
            row["id"] = self.db["normals"].insert(row).last_pk
        return row, True

    def commit_normal(self, normal_id: int) -> None:
        with self.transaction():
            self.db.execute("update normals set status = 'ok' where id = ?", [normal_id])

    def drop_normal(self, normal_id: int) -> None:
        with self.transaction():
            self.db.execute("delete from normals where id = ?", [normal_id])

    def normals(self, status: str = "ok", split: str | None = None) -> list[dict]:
        sql, args = "select * from normals where status = ?", [status]
        if split is not None:
            sql, args = sql + " and split = ?", [status, split]
        return list(self.db.query(sql + " order by id", args))

    # Episodes -----------------------------------------------------------------------------------

    def enqueue(self, plans: list[EpisodePlan]) -> tuple[int, list[str]]:
        """Queue the plans not seen before; returns (added, keys already finished).
        InvalidName, before anything is queued, if a category or defect could not be a folder."""
        for plan in plans:
            Name(plan.category, "category")
            Name(plan.defect, "defect")
        added, finished = 0, []
        now = time.time()
        with self.transaction():
            for plan in plans:
                row = self.db.execute("select status from episodes where key = ?",
                                      [plan.key]).fetchone()
                if row is not None:
                    if row[0] in FINISHED:
                        finished.append(plan.key)
                    continue
                self.db["episodes"].insert({
                    "key": plan.key, "sha256": plan.sha256, "category": plan.category,
                    "defect": plan.defect, "sample": plan.sample, "seed": plan.seed,
                    "status": "queued", "attempts": 0, "queued_at": now})
                added += 1
        return added, finished

    def episode(self, episode_id: int) -> dict | None:
        rows = list(self.db.query("select * from episodes where id = ?", [episode_id]))
        return rows[0] if rows else None

    def episode_by_key(self, key: str) -> dict | None:
        rows = list(self.db.query("select * from episodes where key = ?", [key]))
        return rows[0] if rows else None

    def claim(self, limit: int) -> list[dict]:
        """Take up to ``limit`` queued episodes for this process (oldest first)."""
        owner = self.owner
        with self.transaction():
            rows = list(self.db.query(
                "select * from episodes where status = 'queued' order by queued_at, id limit ?",
                [limit]))
            if rows:
                ids = [r["id"] for r in rows]
                marks = ",".join("?" * len(ids))
                self.db.execute(
                    f"update episodes set status = 'running', attempts = attempts + 1, "
                    f"started_at = ?, owner = ? where id in ({marks})", [time.time(), owner, *ids])
        for row in rows:
            row["attempts"] += 1
        return rows

    def release(self, ids: list[int], error: str | None = None, count_try: bool = False) -> None:
        """Put claimed episodes back in the queue (at its end), e.g. after a full disk."""
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        undo = 0 if count_try else 1
        with self.transaction():
            self.db.execute(
                f"update episodes set status = 'queued', owner = null, queued_at = ?, "
                f"attempts = max(attempts - ?, 0), error = coalesce(?, error) "
                f"where id in ({marks}) and status in ('queued', 'running', 'writing')",
                [time.time(), undo, error, *ids])

    def release_mine(self) -> int:
        """Re-queue episodes this process left running (a call that failed before writing)."""
        if self._owner is None:
            return 0
        with self.transaction():
            cursor = self.db.execute(
                "update episodes set status = 'queued', owner = null, queued_at = ?, "
                "attempts = max(attempts - 1, 0) where status = 'running' and owner = ?",
                [time.time(), self._owner.token])
        return cursor.rowcount

    def retry_or_fail(self, ids: list[int], error: str, max_tries: int) -> list[int]:
        """After an error: back to the queue, or ``failed`` once tried ``max_tries`` times."""
        failed = []
        with self.transaction():
            for episode_id in ids:
                row = self.episode(episode_id)
                if row is None or row["status"] not in ("running", "writing"):
                    continue
                if row["attempts"] >= max_tries:
                    self._finish(episode_id, "failed", error=error,
                                 result=self._failure_record(row, error))
                    failed.append(episode_id)
                else:
                    self.db.execute("update episodes set status = 'queued', owner = null, "
                                    "queued_at = ?, error = ? where id = ?",
                                    [time.time(), error, episode_id])
        return failed

    def requeue_orphaned(self, max_tries: int) -> tuple[int, int]:
        """Episodes left ``running`` by a dead process: re-queued, or failed after max_tries.

        An episode that keeps killing its process (a poison input) must not loop forever under
        ``Restart=on-failure``; a re-queued one goes to the end of the queue so that one crash
        does not hit the same episodes again and again.
        """
        owners = [r[0] for r in self.db.execute(
            "select distinct owner from episodes where status = 'running'").fetchall()]
        requeued = failed = 0
        for owner in owners:
            if owner is not None and owner_alive(self.owners_dir, owner):
                continue
            with self.transaction():
                rows = list(self.db.query("select * from episodes where status = 'running' and "
                                          "owner is ?", [owner]))
                for row in rows:
                    if row["attempts"] >= max_tries:
                        error = f"interrupted {row['attempts']} times: the process died while running it"
                        self._finish(row["id"], "failed", error=error,
                                     result=self._failure_record(row, error))
                        failed += 1
                    else:
                        self.db.execute("update episodes set status = 'queued', owner = null, "
                                        "queued_at = ? where id = ?", [time.time(), row["id"]])
                        requeued += 1
        return requeued, failed

    def episodes_with_status(self, statuses: tuple[str, ...], category: str | None = None,
                             defect: str | None = None) -> list[dict]:
        where = [f"status in ({','.join('?' * len(statuses))})"]
        args: list[Any] = list(statuses)
        for column, value in (("category", category), ("defect", defect)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        return list(self.db.query(f"select * from episodes where {' and '.join(where)} order by id",
                                  args))

    def requeue_finished(self, statuses: tuple[str, ...] = ("failed",),
                         category: str | None = None, defect: str | None = None) -> list[dict]:
        """Put finished episodes that wrote nothing back in the queue with a fresh try count
        (after the cause was fixed: a model installed, a disk freed, thresholds changed).

        Returns the rows as they were. Accepted episodes never go back: that would duplicate
        samples. The jsonl views are marked for a rewrite, so the episodes leave rejected.jsonl.
        """
        allowed = {"failed", "rejected"}
        if not statuses or not set(statuses) <= allowed:
            raise ValueError(f"only {sorted(allowed)} episodes can be retried, not {statuses}")
        with self.transaction():
            rows = self.episodes_with_status(statuses, category, defect)
            now = time.time()
            for row in rows:
                self.db.execute("update episodes set status = 'queued', attempts = 0, owner = null, "
                                "queued_at = ?, finished_at = null, error = null, result = null "
                                "where id = ?", [now, row["id"]])
            if rows:
                self.set("exports_dirty", True)
        return rows

    def finish(self, episode_id: int, status: str, result: dict | None = None,
               seconds: float | None = None, batch: str | None = None,
               error: str | None = None) -> None:
        with self.transaction():
            self._finish(episode_id, status, result, seconds, batch, error)

    def _finish(self, episode_id: int, status: str, result: dict | None = None,
                seconds: float | None = None, batch: str | None = None,
                error: str | None = None) -> None:
        self.db.execute(
            "update episodes set status = ?, finished_at = ?, seconds = coalesce(?, seconds), "
            "batch = coalesce(?, batch), error = coalesce(?, error), owner = null, "
            "result = coalesce(?, result) where id = ?",
            [status, time.time(), seconds, batch, error,
             None if result is None else json.dumps(result, ensure_ascii=False), episode_id])

    @staticmethod
    def _failure_record(row: dict, error: str) -> dict:
        return {"key": row["key"], "category": row["category"], "defect": row["defect"],
                "seed": row["seed"], "source_sha256": row["sha256"], "status": "failed",
                "reason": error, "errors": [error], "turns": 0, "scores": []}

    def finished_keys(self) -> set[str]:
        marks = ",".join("?" * len(FINISHED))
        return {r[0] for r in self.db.execute(
            f"select key from episodes where status in ({marks})", FINISHED).fetchall()}

    def rejected_records(self) -> list[dict]:
        """Results of finished episodes that wrote nothing, in the order they finished."""
        return [json.loads(r[0]) for r in self.db.execute(
            "select result from episodes where status in ('rejected', 'failed') and result is "
            "not null order by finished_at, id").fetchall()]

    # Samples ------------------------------------------------------------------------------------

    def reserve_sample(self, episode_id: int, key: str, category: str, defect: str,
                       record_for: Callable[[int], dict],
                       is_free: Callable[[int], bool] = lambda n: True) -> dict:
        """Allocate the next number for (category, defect) and record the sample as ``writing``.

        ``record_for(number)`` builds the manifest record (it needs the file names).
        """
        with self.transaction():
            top = self.db.execute("select max(number) from samples where category = ? and "
                                  "defect = ?", [category, defect]).fetchone()[0]
            number = _next_free(-1 if top is None else top, is_free)
            record = record_for(number)
            row = {"episode_id": episode_id, "key": key, "category": category, "defect": defect,
                   "number": number, "image": record["image"], "mask": record["mask"],
                   "trajectory": record["trajectory"],
                   "record": json.dumps(record, ensure_ascii=False, default=json_default),
                   "status": "writing", "created": time.time()}
            row["id"] = self.db["samples"].insert(row).last_pk
            self.db.execute("update episodes set status = 'writing' where id = ?", [episode_id])
        return row

    def commit_sample(self, sample_id: int, batch: str | None = None) -> None:
        with self.transaction():
            row = self.db.execute("select episode_id, record from samples where id = ?",
                                  [sample_id]).fetchone()
            self.db.execute("update samples set status = 'ok', batch = coalesce(?, batch) "
                            "where id = ?", [batch, sample_id])
            seconds = json.loads(row[1]).get("seconds")
            self._finish(row[0], "accepted", seconds=seconds, batch=batch)

    def drop_sample(self, sample_id: int, episode_status: str = "queued") -> None:
        """Forget a sample row; its episode goes back to the queue (or to ``removed``)."""
        with self.transaction():
            row = self.db.execute("select episode_id from samples where id = ?",
                                  [sample_id]).fetchone()
            self.db.execute("delete from samples where id = ?", [sample_id])
            if row is None:
                return
            if episode_status == "queued":
                self.db.execute("update episodes set status = 'queued', owner = null, "
                                "queued_at = ? where id = ?", [time.time(), row[0]])
            else:
                self._finish(row[0], episode_status)

    def samples(self, status: str = "ok", batch: str | None = None) -> list[dict]:
        sql = "select * from samples where status = ?"
        args: list[Any] = [status]
        if batch is not None:
            sql += " and batch = ?"
            args.append(batch)
        return list(self.db.query(sql + " order by id", args))

    # Batches, control values and counts ---------------------------------------------------------

    def begin_batch(self, command: str) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        with self.transaction():
            batch_id, n = stamp, 1
            while self.db.execute("select 1 from batches where id = ?", [batch_id]).fetchone():
                n += 1
                batch_id = f"{stamp}-{n}"
            self.db["batches"].insert({"id": batch_id, "command": command,
                                       "started_at": time.time()})
        return batch_id

    def end_batch(self, batch_id: str, summary: dict) -> None:
        with self.transaction():
            self.db.execute("update batches set finished_at = ?, summary = ? where id = ?",
                            [time.time(), json.dumps(summary, default=json_default), batch_id])

    # Tries at taking inbox files --------------------------------------------------------------

    def begin_intake_try(self, key: str, file: str) -> dict:
        """Count one more try at an inbox file before it is made (so a crash counts); returns
        its row, with the error of the try before."""
        now = time.time()
        with self.transaction():
            self.db.execute(
                "insert into intake_tries (key, file, tries, first_try, last_try) "
                "values (?, ?, 1, ?, ?) on conflict(key) do update set "
                "tries = tries + 1, last_try = excluded.last_try, file = excluded.file",
                [key, file, now, now])
        return self.db["intake_tries"].get(key)

    def end_intake_try(self, key: str, error: str | None = None, counted: bool = True) -> None:
        """The try ended: with an ``error`` it stays counted; a try that ``counted=False`` (the
        file was not ready yet) is taken back; otherwise the file is settled and forgotten."""
        with self.transaction():
            if error is not None:
                self.db.execute("update intake_tries set error = ? where key = ?",
                                [error[:2000], key])
            elif not counted:
                self.db.execute("update intake_tries set tries = tries - 1 where key = ?", [key])
                self.db.execute("delete from intake_tries where key = ? and tries <= 0", [key])
            else:
                self.db.execute("delete from intake_tries where key = ?", [key])

    def forget_intake_tries(self, keep: set[str]) -> int:
        """Drop the counts of files no longer in the inbox (moved, deleted); returns how many."""
        gone = [row[0] for row in self.db.execute("select key from intake_tries")
                if row[0] not in keep]
        if gone:
            with self.transaction():
                self.db.conn.executemany("delete from intake_tries where key = ?",
                                    [[key] for key in gone])
        return len(gone)

    def intake_failures(self) -> list[dict]:
        """Inbox files whose last try failed, most tried first (for ``appliance status``)."""
        return list(self.db.query("select file, tries, error, last_try from intake_tries "
                                  "where error is not null order by tries desc, last_try"))

    def set(self, key: str, value: Any) -> None:
        with self.transaction():
            self.db["control"].insert({"key": key, "value": json.dumps(value),
                                       "updated": time.time()}, replace=True)

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("select value from control where key = ?", [key]).fetchone()
        return default if row is None else json.loads(row[0])

    def get_with_time(self, key: str) -> tuple[Any, float | None]:
        row = self.db.execute("select value, updated from control where key = ?",
                              [key]).fetchone()
        return (None, None) if row is None else (json.loads(row[0]), row[1])

    @property
    def paused(self) -> bool:
        return bool(self.get("paused", False))

    def counts(self) -> dict[str, int]:
        counts = {status: 0 for status in (*PENDING, *FINISHED)}
        for status, n in self.db.execute("select status, count(*) from episodes group by status"):
            counts[status] = n
        return counts

    def recent_finished(self, since: float) -> list[dict]:
        return list(self.db.query("select status, seconds, started_at, finished_at from episodes "
                                  "where finished_at >= ? order by finished_at", [since]))


def _next_free(top: int, is_free: Callable[[int], bool]) -> int:
    number = top + 1
    while not is_free(number):
        number += 1
    return number

