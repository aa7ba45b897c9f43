"""Append-only schema migrations, tracked in the ``_migrations`` table.

A migration is a function registered with ``@migration``; it runs once, in its own transaction,
and its name is recorded with the time it ran. Never edit or reorder a released migration: add
a new one at the end (the same rule as simonw/llm's ``migrations.py``), so that every store on
every box reaches the same schema whatever version it started from.
"""

from __future__ import annotations

import time
from typing import Callable, ContextManager

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(function: Migration) -> Migration:
    MIGRATIONS.append((function.__name__, function))
    return function


def applied(db: sqlite_utils.Database) -> list[str]:
    if "_migrations" not in db.table_names():
        return []
    return [row["name"] for row in db.query("select name from _migrations order by rowid")]


def migrate(db: sqlite_utils.Database, transaction: Callable[[], ContextManager]) -> list[str]:
    """Apply the migrations this store lacks; returns their names."""
    with transaction():
        db["_migrations"].create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
    done = set(applied(db))
    ran = []
    for name, function in MIGRATIONS:
        if name in done:
            continue
        with transaction():
            # Re-check inside the write lock: another process may have just applied it.
            if db.execute("select 1 from _migrations where name = ?", [name]).fetchone():
                continue
            function(db)
            db["_migrations"].insert({"name": name,
                                      "applied_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        ran.append(name)
    return ran


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    # Content of every accepted input file, whatever it was called.
    db["inputs"].create({
        "sha256": str, "size": int, "width": int, "height": int,
        "original_width": int, "original_height": int, "first_source": str, "first_seen": float,
    }, pk="sha256")
    # A normal photo as written to <category>/train/good/NNN.png; episodes read their pixels here.
    db["normals"].create({
        "id": int, "sha256": str, "category": str, "number": int, "path": str, "source": str,
        "status": str, "created": float,
    }, pk="id", not_null={"sha256", "category", "number", "path", "status"})
    db["normals"].create_index(["sha256", "category"], unique=True)
    db["normals"].create_index(["category", "number"], unique=True)
    # One (input, category, defect, seed): the unit of work, idempotent by key.
    db["episodes"].create({
        "id": int, "key": str, "sha256": str, "category": str, "defect": str, "sample": int,
        "seed": int, "status": str, "attempts": int, "queued_at": float, "started_at": float,
        "finished_at": float, "seconds": float, "owner": str, "error": str, "result": str,
        "batch": str,
    }, pk="id", not_null={"key", "sha256", "category", "defect", "seed", "status"},
        defaults={"attempts": 0})
    db["episodes"].create_index(["key"], unique=True)
    db["episodes"].create_index(["status", "queued_at"])
    # A written sample; its number is allocated here, inside the transaction that reserves it.
    db["samples"].create({
        "id": int, "episode_id": int, "key": str, "category": str, "defect": str, "number": int,
        "image": str, "mask": str, "trajectory": str, "record": str, "status": str,
        "batch": str, "created": float,
    }, pk="id", not_null={"episode_id", "key", "category", "defect", "number", "status"})
    db["samples"].create_index(["episode_id"], unique=True)
    db["samples"].create_index(["category", "defect", "number"], unique=True)
    db["batches"].create({"id": str, "command": str, "started_at": float, "finished_at": float,
                          "summary": str}, pk="id")
    # Small shared state: pause flag, last error, heartbeat, engine in use.
    db["control"].create({"key": str, "value": str, "updated": float}, pk="key")


@migration
def m002_intake_tries(db: sqlite_utils.Database) -> None:
    # Tries at taking one inbox file, counted before each try so that a crash counts too;
    # keyed by the file's inbox-relative path as bytes (hex), which need not be UTF-8.
    db["intake_tries"].create({
        "key": str, "file": str, "tries": int, "first_try": float, "last_try": float,
        "error": str,
    }, pk="key", not_null={"key", "file", "tries"}, defaults={"tries": 0})


@migration
def m003_test_good_and_reviews(db: sqlite_utils.Database) -> None:
    # "train": a synthesis source in <category>/train/good; "test": held back in test/good so that
    # anomalib's image-level metrics have normal test images, and never edited.
    db["normals"].add_column("split", str, not_null_default="train")
    # A person's decisions on samples, append-only: the newest row per sample is its state, the
    # older ones say who changed their mind and when.
    db["reviews"].create({
        "id": int, "sample_id": int, "key": str, "decision": str, "reason": str,
        "reviewer": str, "decided_at": float,
    }, pk="id", not_null={"sample_id", "key", "decision", "reviewer", "decided_at"})
    db["reviews"].create_index(["sample_id", "id"])
