"""The policy's LoRA adapters per part category: promoted by ``appliance retrain``, used by
every later batch, and rolled back on request.

    MODELS/adapters/<category>/<hash>/      a peft adapter folder + figures.json, and
                                            adapter.gguf: the same LoRA for llama.cpp, when
                                            it converts (a LoRA-only adapter)
    MODELS/adapters/<category>/active.json  {"active": hash or null, "history": [older hashes]}

An adapter's folder is named by the sha256 of its files (first 16 hex digits), so the hash in a
sample's provenance names exactly the weights that made it. ``active.json`` is replaced
atomically: a crash leaves the previous choice or the new one, never a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from appliance.imaging import write_atomic
from appliance.names import Name, path_under
from appliance.vlm.llamacpp_runtime import ADAPTER_GGUF

ACTIVE = "active.json"


class AdapterError(RuntimeError):
    pass


@dataclass(frozen=True)
class ActiveAdapter:
    category: str
    hash: str
    path: Path
    figures: dict  # what the promotion gate measured


# Made from the adapter's own files after it is stored: not part of what its hash names.
DERIVED = ("figures.json", ADAPTER_GGUF)


def adapter_hash(folder: Path) -> str:
    """sha256 over the adapter's files (names and bytes, sorted), first 16 hex digits."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name not in DERIVED):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _category_dir(models_dir: Path, category: str) -> Path:
    return path_under(Path(models_dir) / "adapters", Name(category, "category"))


def _state(models_dir: Path, category: str) -> dict:
    path = _category_dir(models_dir, category) / ACTIVE
    if not path.is_file():
        return {"active": None, "history": []}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} is unreadable ({exc}); restore it or remove it to run the "
                           "base policy") from None
    return {"active": state.get("active"), "history": list(state.get("history", []))}


def _write_state(models_dir: Path, category: str, state: dict) -> None:
    folder = _category_dir(models_dir, category)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / ACTIVE, (json.dumps(state, indent=1) + "\n").encode())


def active_adapter(models_dir: Path, category: str) -> ActiveAdapter | None:
    state = _state(models_dir, category)
    if not state["active"]:
        return None
    path = _category_dir(models_dir, category) / state["active"]
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"the active adapter {path} is missing; run `appliance retrain "
                           f"--rollback --category {category}`")
    figures_file = path / "figures.json"
    figures = json.loads(figures_file.read_text()) if figures_file.is_file() else {}
    return ActiveAdapter(Name(category, "category"), state["active"], path, figures)


def active_adapters(models_dir: Path) -> dict[str, ActiveAdapter]:
    root = Path(models_dir) / "adapters"
    if not root.is_dir():
        return {}
    found = {}
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        adapter = active_adapter(models_dir, folder.name)
        if adapter is not None:
            found[adapter.category] = adapter
    return found


def store_adapter(models_dir: Path, category: str, adapter_dir: Path, figures: dict) -> str:
    """Copy an adapter under its hash (idempotent); returns the hash. Not yet active."""
    digest = adapter_hash(adapter_dir)
    target = _category_dir(models_dir, category) / digest
    if not (target / "adapter_config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=target.parent))
        shutil.copytree(adapter_dir, scratch, dirs_exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        scratch.rename(target)
    write_atomic(target / "figures.json", (json.dumps(figures, indent=1) + "\n").encode())
    return digest


def promote(models_dir: Path, category: str, digest: str) -> None:
    """Make a stored adapter the category's active one; the previous goes on the history."""
    if not (_category_dir(models_dir, category) / digest / "adapter_config.json").is_file():
        raise AdapterError(f"no stored adapter {digest} for {category}")
    state = _state(models_dir, category)
    if state["active"] == digest:
        return
    history = state["history"] + ([state["active"]] if state["active"] else [])
    _write_state(models_dir, category, {"active": digest, "history": history})


def rollback(models_dir: Path, category: str) -> str | None:
    """Return to the adapter active before the current one (None: the base policy); returns it."""
    state = _state(models_dir, category)
    if state["active"] is None:
        raise AdapterError(f"no adapter is active for {category}: nothing to roll back")
    history = state["history"]
    previous = history.pop() if history else None
    _write_state(models_dir, category, {"active": previous, "history": history})
    return previous


def add_llamacpp_lora(models_dir: Path, category: str, digest: str, base_hf_dir: Path) -> str | None:
    """Write a stored adapter's llama.cpp LoRA (``adapter.gguf``) beside it, so the llama.cpp
    runtime can use it too; None when it is there, else why it cannot be (the adapter stays
    usable on transformers either way)."""
    from appliance.models.gguf_convert import ConversionError, convert_lora

    folder = _category_dir(models_dir, category) / digest
    if (folder / ADAPTER_GGUF).is_file():
        return None
    try:
        convert_lora(folder, base_hf_dir, folder / ADAPTER_GGUF)
    except ConversionError as exc:
        return str(exc).splitlines()[0]
    return None
