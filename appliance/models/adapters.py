"""The policy's LoRA adapters per part category: promoted by ``appliance retrain``, used by
every later batch, and rolled back on request.

    MODELS/adapters/<category>/<hash>/      a peft adapter folder + figures.json, and
                                            adapter.gguf: the same LoRA for llama.cpp, when
                                            it converts (a LoRA-only adapter)
    MODELS/adapters/<category>/active.json  {"active": hash or null, "history": [older hashes]}

An adapter's folder is named by the sha256 of its files (first 16 hex digits), so the hash in a
sample's provenance names exactly the weights that made it. ``active.json`` is replaced
atomically: a crash leaves the previous choice or the new one, never a half-written file
(the storage is ``shelf.Shelf``'s, shared with the calibration profiles).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.models.shelf import FIGURES, Shelf, ShelfError
from appliance.names import Name
from appliance.vlm.llamacpp_runtime import ADAPTER_GGUF

# Made from the adapter's own files after it is stored: not part of what its hash names.
DERIVED = (FIGURES, ADAPTER_GGUF)
ADAPTERS = Shelf("adapters", "adapter", "adapter_config.json", DERIVED)
AdapterError = ShelfError


@dataclass(frozen=True)
class ActiveAdapter:
    category: str
    hash: str
    path: Path
    figures: dict  # what the promotion gate measured


def adapter_hash(folder: Path) -> str:
    """sha256 over the adapter's files (names and bytes, sorted), first 16 hex digits."""
    return ADAPTERS.version_hash(folder)


def active_adapter(models_dir: Path, category: str) -> ActiveAdapter | None:
    found = ADAPTERS.active(models_dir, category)
    if found is None:
        return None
    digest, path, figures = found
    return ActiveAdapter(Name(category, "category"), digest, path, figures)


def active_adapters(models_dir: Path) -> dict[str, ActiveAdapter]:
    return {Name(category, "category"): ActiveAdapter(Name(category, "category"), digest, path, figures)
            for category, (digest, path, figures) in ADAPTERS.actives(models_dir).items()}


def store_adapter(models_dir: Path, category: str, adapter_dir: Path, figures: dict) -> str:
    """Copy an adapter under its hash (idempotent); returns the hash. Not yet active."""
    return ADAPTERS.store(models_dir, category, adapter_dir, figures)


def promote(models_dir: Path, category: str, digest: str) -> None:
    """Make a stored adapter the category's active one; the previous goes on the history."""
    ADAPTERS.promote(models_dir, category, digest)


def rollback(models_dir: Path, category: str) -> str | None:
    """Return to the adapter active before the current one (None: the base policy); returns it."""
    return ADAPTERS.rollback(models_dir, category)


def add_llamacpp_lora(models_dir: Path, category: str, digest: str, base_hf_dir: Path) -> str | None:
    """Write a stored adapter's llama.cpp LoRA (``adapter.gguf``) beside it, so the llama.cpp
    runtime can use it too; None when it is there, else why it cannot be (the adapter stays
    usable on transformers either way)."""
    from appliance.models.gguf_convert import ConversionError, convert_lora

    folder = ADAPTERS.category_dir(models_dir, category) / digest
    if (folder / ADAPTER_GGUF).is_file():
        return None
    try:
        convert_lora(folder, base_hf_dir, folder / ADAPTER_GGUF)
    except ConversionError as exc:
        return str(exc).splitlines()[0]
    return None
