"""Make the dataset folder and the store agree again after a crash, a kill or a full disk.

Two levels:

- ``repair_writes`` runs every time a process takes the dataset lock. Rows still ``writing``
  belong to a writer that died holding the lock: complete files are adopted, anything less is
  deleted and the episode goes back to the queue. It touches only those rows' own files.
- ``reconcile`` runs once at process start: it also deletes temporary files, re-queues episodes
  of dead processes, marks samples whose files a person deleted as ``removed``, moves files no
  row explains to ``.appliance/orphans/`` (never deleting what it cannot account for), imports
  a dataset written before the store existed, and rewrites ``manifest.jsonl``, ``normals.jsonl``
  and ``rejected.jsonl`` from the store if they disagree with it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from appliance.storage.exports import read_jsonl, sync_exports
from appliance.storage.layout import (
    MANIFEST,
    NORMALS,
    NOT_CATEGORIES,
    NUMBERED,
    NUMBERED_MASK,
    REJECTED,
    STATE_DIR,
    TEMP_NAME,
)
from appliance.storage.repair import ReconcileReport, _unlink, repair_writes
from appliance.storage.store import JobStore

log = logging.getLogger(__name__)


def reconcile(store: JobStore, max_tries: int = 3) -> ReconcileReport:
    """Bring files and rows into agreement; the caller holds the dataset lock."""
    if not store.lock.held:
        raise RuntimeError("reconcile needs the dataset lock")
    report = store.last_repair or ReconcileReport()  # what taking the lock already repaired
    store.last_repair = None
    root = store.root
    if _store_is_empty(store):
        report.imported = import_existing(store)
    for path in _walk_files(root):
        if TEMP_NAME.match(path.name):
            _unlink(path)
            report.temp_removed.append(str(path.relative_to(root)))
    repair_writes(store, report)
    report.requeued, report.failed = store.requeue_orphaned(max_tries)
    _mark_missing(store, report)
    _move_orphans(store, report)
    report.exports_rewritten = sorted(set(report.exports_rewritten + sync_exports(store)))
    for line in report.lines():
        log.info("reconcile: %s", line)
    return report


def _walk_files(root: Path):
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (Path(folder) == root and d == STATE_DIR)]
        for name in files:
            yield Path(folder) / name


def _store_is_empty(store: JobStore) -> bool:
    return not any(store.db.execute(f"select 1 from {table} limit 1").fetchone()
                   for table in ("normals", "episodes", "samples"))


def _mark_missing(store: JobStore, report: ReconcileReport) -> None:
    """A sample a person deleted (image or mask) is a rejection: removed, not redone."""
    root = store.root
    for row in store.samples(status="ok"):
        if (root / row["image"]).exists() and (root / row["mask"]).exists():
            continue
        store.drop_sample(row["id"], episode_status="removed")
        report.missing.append(row["image"])  # what remains of it becomes an orphan below


def _move_orphans(store: JobStore, report: ReconcileReport) -> None:
    root = store.root
    known = {row["path"] for row in store.normals("ok")}
    trajectories = set()
    for row in store.samples("ok"):
        known.update((row["image"], row["mask"]))
        trajectories.add(row["trajectory"])
    candidates: list[Path] = []
    for category in category_dirs(root):
        for good in (category / "train" / "good", category / "test" / "good"):
            if good.is_dir():
                candidates += [p for p in good.iterdir() if NUMBERED.match(p.name)]
        for kind, pattern in (("test", NUMBERED), ("ground_truth", NUMBERED_MASK)):
            base = category / kind
            if not base.is_dir():
                continue
            for defect in base.iterdir():
                if defect.is_dir() and defect.name != "good":
                    candidates += [p for p in defect.iterdir() if pattern.match(p.name)]
    base = root / "trajectories"
    if base.is_dir():
        for folder in base.glob("*/*/*"):
            if folder.is_dir() and NUMBERED.match(folder.name + ".png"):
                candidates.append(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in candidates:
        relative = str(path.relative_to(root))
        if relative in known or relative in trajectories:
            continue
        target = store.state_dir / "orphans" / stamp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        report.orphans.append(relative)
        log.warning("reconcile: %s is not in the store; moved to %s", relative, target)


def category_dirs(root: Path) -> list[Path]:
    return [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
            and p.name not in NOT_CATEGORIES
            and any((p / sub).is_dir() for sub in ("train", "test", "ground_truth"))]


# A dataset that has manifests but no store (written before the store existed, or a lost db) ------

def import_existing(store: JobStore) -> int:
    root = store.root
    imported = 0
    for record in read_jsonl(root / NORMALS):
        path = record.get("path", "")
        match = NUMBERED.match(Path(path).name)
        if not match or not (root / path).exists() or store.normal(record["source_sha256"],
                                                                   record["category"]):
            continue
        with store.transaction():
            taken = store.db.execute("select 1 from normals where category = ? and number = ?",
                                     [record["category"], int(match.group(1))]).fetchone()
            if taken:
                continue
            store.db["normals"].insert({
                "sha256": record["source_sha256"], "category": record["category"],
                "number": int(match.group(1)), "path": path, "source": record.get("source", ""),
                "split": record.get("split", "train"), "status": "ok", "created": time.time()})
        imported += 1
    for record in read_jsonl(root / MANIFEST):
        match = NUMBERED.match(Path(record.get("image", "")).name)
        if not match or "key" not in record or store.episode_by_key(record["key"]):
            continue
        if not ((root / record["image"]).exists() and (root / record["mask"]).exists()):
            continue
        with store.transaction():
            taken = store.db.execute(
                "select 1 from samples where category = ? and defect = ? and number = ?",
                [record["category"], record["defect"], int(match.group(1))]).fetchone()
            if taken:
                continue
            episode_id = store.db["episodes"].insert({
                "key": record["key"], "sha256": record["source_sha256"],
                "category": record["category"], "defect": record["defect"],
                "seed": record["seed"], "status": "accepted", "attempts": 1,
                "finished_at": time.time(), "seconds": record.get("seconds")}).last_pk
            store.db["samples"].insert({
                "episode_id": episode_id, "key": record["key"], "category": record["category"],
                "defect": record["defect"], "number": int(match.group(1)),
                "image": record["image"], "mask": record["mask"],
                "trajectory": record["trajectory"], "record": json.dumps(record),
                "status": "ok", "created": time.time()})
        imported += 1
    for record in read_jsonl(root / REJECTED):
        if "key" not in record or store.episode_by_key(record["key"]):
            continue
        with store.transaction():
            store.db["episodes"].insert({
                "key": record["key"], "sha256": record.get("source_sha256", ""),
                "category": record.get("category", ""), "defect": record.get("defect", ""),
                "seed": record.get("seed", 0), "status": record.get("status", "rejected"),
                "attempts": 1, "finished_at": time.time(), "result": json.dumps(record)})
        imported += 1
    return imported
