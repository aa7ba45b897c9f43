"""The jsonl exports (``manifest.jsonl``, ``normals.jsonl``, ``rejected.jsonl``): views of the
job store, appended as samples commit and rewritten from the store whenever they disagree.

``store`` arguments are ``appliance.storage.store.JobStore`` objects (this module sits below it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from appliance.imaging import write_atomic
from appliance.serialization import json_default
from appliance.storage.layout import MANIFEST, NORMALS, REJECTED


def jsonl_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, default=json_default) + "\n"


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
            "source_sha256": row["sha256"], "split": row.get("split") or "train"}


def export_records(store) -> dict[str, list[dict]]:
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


def sync_exports(store) -> list[str]:
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
