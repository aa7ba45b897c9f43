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
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from appliance.imaging import write_atomic
from appliance.storage.store import STATE_DIR, JobStore, _json_default

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"
NORMALS = "normals.jsonl"
# Folders at the dataset root that are not categories.
NOT_CATEGORIES = {STATE_DIR, "trajectories", "contact_sheet", "batches"}
# ``imaging.write_atomic`` writes ``.NAME.tmp-PID`` before renaming to NAME.
TEMP_NAME = re.compile(r"^\..+\.tmp-\d+$")
NUMBERED = re.compile(r"^(\d{3,})\.png$")
NUMBERED_MASK = re.compile(r"^(\d{3,})_mask\.png$")


@dataclass
class ReconcileReport:
    temp_removed: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    removed_partial: list[str] = field(default_factory=list)
    requeued: int = 0
    failed: int = 0
    missing: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    imported: int = 0
    exports_rewritten: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any([self.temp_removed, self.adopted, self.removed_partial, self.requeued,
                    self.failed, self.missing, self.orphans, self.imported,
                    self.exports_rewritten])

    def lines(self) -> list[str]:
        out = []
        if self.imported:
            out.append(f"imported {self.imported} rows from an existing dataset's manifests")
        if self.temp_removed:
            out.append(f"removed {len(self.temp_removed)} temporary file(s) left by a crash")
        if self.adopted:
            out.append(f"adopted {len(self.adopted)} complete write(s) of a crashed run")
        if self.removed_partial:
            out.append(f"removed {len(self.removed_partial)} incomplete write(s); "
                       f"their episodes are queued again")
        if self.requeued or self.failed:
            out.append(f"re-queued {self.requeued} interrupted episode(s)"
                       + (f", failed {self.failed} interrupted too often" if self.failed else ""))
        if self.missing:
            out.append(f"{len(self.missing)} sample(s) deleted from the dataset by hand: "
                       f"marked removed, not redone")
        if self.orphans:
            out.append(f"moved {len(self.orphans)} unexplained file(s) to {STATE_DIR}/orphans/")
        if self.exports_rewritten:
            out.append(f"rewrote {', '.join(self.exports_rewritten)} from the store")
        return out


# File checks -------------------------------------------------------------------------------------

def png_complete(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not a complete image"
        return False


def json_complete(path: Path) -> bool:
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
        return True
    except Exception:  # noqa: BLE001
        return False


def sample_complete(root: Path, row: dict) -> bool:
    trajectory = root / row["trajectory"]
    return (png_complete(root / row["image"]) and png_complete(root / row["mask"])
            and json_complete(trajectory / "messages.json")
            and json_complete(trajectory / "episode.json"))


def remove_sample_files(root: Path, row: dict) -> None:
    for key in ("image", "mask"):
        _unlink(root / row[key])
        _remove_temps_of(root / row[key])
    shutil.rmtree(root / row["trajectory"], ignore_errors=True)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _remove_temps_of(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        return
    prefix = f".{path.name}.tmp-"
    for entry in folder.iterdir():
        if entry.name.startswith(prefix):
            _unlink(entry)


# Repairs on every lock acquisition ----------------------------------------------------------------

def repair_writes(store: JobStore, report: ReconcileReport | None = None) -> ReconcileReport:
    """Settle rows left ``writing`` by a writer that died holding the dataset lock."""
    report = report or ReconcileReport()
    root = store.root
    changed = False
    for row in store.samples(status="writing"):
        changed = True
        if sample_complete(root, row):
            store.commit_sample(row["id"], batch=row["batch"])
            report.adopted.append(row["image"])
        else:
            remove_sample_files(root, row)
            store.drop_sample(row["id"])
            report.removed_partial.append(row["image"])
    for row in store.normals(status="writing"):
        changed = True
        path = root / row["path"]
        if png_complete(path):
            store.commit_normal(row["id"])
            report.adopted.append(row["path"])
        else:
            _unlink(path)
            _remove_temps_of(path)
            store.drop_normal(row["id"])
            report.removed_partial.append(row["path"])
    if changed or store.get("exports_dirty", False):
        report.exports_rewritten += sync_exports(store)
    if changed:
        log.warning("repaired writes of a crashed process: adopted %d, removed %d",
                    len(report.adopted), len(report.removed_partial))
    return report


# The full pass at start ----------------------------------------------------------------------------

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
    for category in _category_dirs(root):
        good = category / "train" / "good"
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


def _category_dirs(root: Path) -> list[Path]:
    return [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
            and p.name not in NOT_CATEGORIES
            and any((p / sub).is_dir() for sub in ("train", "test", "ground_truth"))]


# Exports: the jsonl files are views of the store ----------------------------------------------------

def jsonl_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, default=_json_default) + "\n"


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(jsonl_line(record))
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: Path, problems: list[str] | None = None) -> list[dict]:
    """The records of a jsonl file (none when it is missing). A line cut short by a crash is
    skipped (the store rewrites the file on the next start) and, with ``problems``, reported."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if problems is not None:
                problems.append(f"{path.name}:{number}: not JSON ({exc.msg})")
    return records


def normal_record(row: dict) -> dict:
    return {"category": row["category"], "path": row["path"], "source": row["source"],
            "source_sha256": row["sha256"]}


def export_records(store: JobStore) -> dict[str, list[dict]]:
    return {
        MANIFEST: [json.loads(row["record"]) for row in store.samples("ok")],
        NORMALS: [normal_record(row) for row in store.normals("ok")],
        REJECTED: store.rejected_records(),
    }


def _identity(name: str, record: dict) -> str:
    if name == NORMALS:
        return f"{record.get('source_sha256')}:{record.get('category')}:{record.get('path')}"
    return str(record.get("key"))


def _file_matches(path: Path, name: str, records: list[dict]) -> bool:
    if not path.exists():
        return not records
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        found = [_identity(name, json.loads(line)) for line in lines]
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return found == [_identity(name, r) for r in records]


def sync_exports(store: JobStore) -> list[str]:
    """Rewrite each jsonl export that differs from the store; returns the names rewritten."""
    rewritten = []
    for name, records in export_records(store).items():
        path = store.root / name
        if _file_matches(path, name, records):
            continue
        write_atomic(path, "".join(jsonl_line(r) for r in records).encode("utf-8"))
        rewritten.append(name)
    store.set("exports_dirty", False)
    return rewritten


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
                "status": "ok", "created": time.time()})
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
