"""Repairs on every take of the dataset lock: rows still ``writing`` belong to a writer that died
holding the lock; complete files are adopted, anything less is deleted and the episode goes back
to the queue. It touches only those rows' own files.

``store`` arguments are ``appliance.storage.store.JobStore`` objects (the store calls
``repair_writes`` itself, so this module sits below it).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from appliance.storage.exports import sync_exports
from appliance.storage.layout import STATE_DIR

log = logging.getLogger(__name__)


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

def repair_writes(store, report: ReconcileReport | None = None) -> ReconcileReport:
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
