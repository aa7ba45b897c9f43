"""Versions of one kind of artifact per part category, one of them active, with a history.

    MODELS/<kind>/<category>/<hash>/      one stored version + figures.json
    MODELS/<kind>/<category>/active.json  {"active": hash or null, "history": [older hashes]}

The policy's LoRA adapters (``adapters``) and the CPU engine's calibration profiles
(``calibrations``) are both kept this way. A version's folder is named by the sha256 of its
files (first 16 hex digits), so the hash in a sample's provenance names exactly what made it.
``active.json`` is replaced atomically: a crash leaves the previous choice or the new one,
never a half-written file; a version is copied into a hidden folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance.imaging import fsync_dir, write_atomic
from appliance.names import Name, path_under

ACTIVE = "active.json"
FIGURES = "figures.json"


class ShelfError(RuntimeError):
    pass


@dataclass(frozen=True)
class Shelf:
    kind: str  # the folder under MODELS
    noun: str  # what one version is called in messages
    marker: str  # a file every complete version holds
    derived: tuple[str, ...] = (FIGURES,)  # files made after storing: not part of the hash
    rollback_hint: str = "appliance retrain --rollback --category {category}"

    def version_hash(self, folder: Path) -> str:
        """sha256 over the version's files (names and bytes, sorted), first 16 hex digits."""
        digest = hashlib.sha256()
        for path in sorted(p for p in Path(folder).rglob("*")
                           if p.is_file() and p.name not in self.derived):
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
        return digest.hexdigest()[:16]

    def category_dir(self, models_dir: Path, category: str) -> Path:
        return path_under(Path(models_dir) / self.kind, Name(category, "category"))

    def state(self, models_dir: Path, category: str) -> dict:
        path = self.category_dir(models_dir, category) / ACTIVE
        if not path.is_file():
            return {"active": None, "history": []}
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ShelfError(f"{path} is unreadable ({exc}); restore it, or remove it to run "
                             f"without {self.kind}") from None
        return {"active": state.get("active"), "history": list(state.get("history", []))}

    def _write_state(self, models_dir: Path, category: str, state: dict) -> None:
        folder = self.category_dir(models_dir, category)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / ACTIVE, (json.dumps(state, indent=1) + "\n").encode())

    def active(self, models_dir: Path, category: str) -> tuple[str, Path, dict] | None:
        """(hash, folder, figures) of the category's active version, or None."""
        state = self.state(models_dir, category)
        if not state["active"]:
            return None
        path = self.category_dir(models_dir, category) / state["active"]
        if not (path / self.marker).is_file():
            raise ShelfError(f"the active {self.noun} {path} is missing; run `"
                             + self.rollback_hint.format(category=category) + "`")
        figures_file = path / FIGURES
        figures = json.loads(figures_file.read_text()) if figures_file.is_file() else {}
        return state["active"], path, figures

    def categories(self, models_dir: Path) -> list[str]:
        """The category folders (hidden scratch folders and stray names left out)."""
        root = Path(models_dir) / self.kind
        if not root.is_dir():
            return []
        found = []
        for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            try:
                found.append(Name(folder.name, "category"))
            except ValueError:
                continue
        return found

    def actives(self, models_dir: Path) -> dict[str, tuple[str, Path, dict]]:
        """category -> (hash, folder, figures) for every category with an active version."""
        found = {}
        for category in self.categories(models_dir):
            active = self.active(models_dir, category)
            if active is not None:
                found[category] = active
        return found

    def store(self, models_dir: Path, category: str, folder: Path, figures: dict) -> str:
        """Copy a version under its hash (idempotent); returns the hash. Not yet active."""
        digest = self.version_hash(folder)
        target = self.category_dir(models_dir, category) / digest
        if not (target / self.marker).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=target.parent))
            shutil.copytree(folder, scratch, dirs_exist_ok=True)
            _sync_tree(scratch)  # on disk before any active.json can name it
            shutil.rmtree(target, ignore_errors=True)
            scratch.rename(target)
            fsync_dir(target.parent)
        write_atomic(target / FIGURES, (json.dumps(figures, indent=1) + "\n").encode())
        return digest

    def promote(self, models_dir: Path, category: str, digest: str) -> None:
        """Make a stored version the category's active one; the previous goes on the history."""
        if not (self.category_dir(models_dir, category) / digest / self.marker).is_file():
            raise ShelfError(f"no stored {self.noun} {digest} for {category}")
        state = self.state(models_dir, category)
        if state["active"] == digest:
            return
        history = state["history"] + ([state["active"]] if state["active"] else [])
        self._write_state(models_dir, category, {"active": digest, "history": history})

    def rollback(self, models_dir: Path, category: str) -> str | None:
        """Return to the version active before the current one (None: none); returns it."""
        state = self.state(models_dir, category)
        if state["active"] is None:
            raise ShelfError(f"no {self.noun} is active for {category}: nothing to "
                             "roll back")
        history = state["history"]
        previous = history.pop() if history else None
        self._write_state(models_dir, category, {"active": previous, "history": history})
        return previous


def _sync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for folder in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(folder)
