"""KR: knowledge retrieval over ``knowledge_base/`` with FAISS and a sentence embedder.

The index holds several rows per knowledge entry: the entry's full text (appearance, location,
size) and one short "<name> on <subject> (<material>)" row per defect name and alias, so that a
terse query such as "pore on magnetic tile" meets a row of the same shape. An entry's similarity
is the best of its rows.

The index is small (a few hundred rows), so a flat inner-product index over L2-normalised
vectors is exact and fast. It is built once and cached on disk, keyed by the knowledge base
digest and the embedder fingerprint: editing a knowledge file or swapping the model changes the
key and the next retriever rebuilds it; an unchanged setup loads it without embedding anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from appliance.imaging import write_atomic
from appliance.knowledge import KnowledgeBase, load_knowledge_base, normalize_name
from appliance.tools.embedder import SentenceEmbedder, load_embedder, model_fingerprint
from appliance.tools.interfaces import Knowledge, KnowledgeEntry

# Bump when the row texts or the file layout change, so that old caches are not reused.
INDEX_FORMAT = 1

# Ranking = cosine similarity (at most 1) plus these boosts. They encode what the caller already
# told us exactly and what semantic similarity alone gets wrong:
EXACT_BOOST = 1.0  # kb.entry(category, defect) found it by name or alias: it always ranks first
SUBJECT_BOOST = 0.15  # the entry is about the asked category: prefer it over look-alikes elsewhere
MATERIAL_BOOST = 0.08  # the entry is about the category's material: the fallback for new parts
NAME_BOOST = 0.10  # the asked defect is one of the entry's names, on whatever subject


def default_cache_dir() -> Path:
    """``$APPLIANCE_CACHE``, else ``~/.cache/appliance``."""
    env = os.environ.get("APPLIANCE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "appliance"


def _readable(name: str) -> str:
    # The tokenizer splits snake_case into odd pieces; embed names the way people write them.
    return name.replace("_", " ")


def index_rows(kb: KnowledgeBase) -> tuple[list[str], list[int]]:
    """The texts to embed and, for each, the index of the entry it belongs to."""
    texts: list[str] = []
    owners: list[int] = []
    for position, entry in enumerate(kb.entries):
        full = _readable(entry.text())
        if entry.aliases:
            full += " Also called: " + ", ".join(_readable(a) for a in entry.aliases) + "."
        texts.append(full)
        owners.append(position)
        for name in entry.names():
            texts.append(f"{_readable(name)} on {_readable(entry.subject)} ({entry.material})")
            owners.append(position)
    return texts, owners


@dataclass
class IndexStats:
    source: str  # "built" (embedded now) or "cache" (loaded from disk)
    seconds: float  # wall time to build or load, model loading excluded
    rows: int
    path: str


class FaissKnowledgeRetriever:
    """KnowledgeRetriever backed by a cached FAISS index; see the module docstring."""

    name = "faiss-minilm"

    def __init__(self, knowledge_base: KnowledgeBase | Path | str | None = None, *,
                 cache_dir: Path | str | None = None, model_path: Path | str | None = None,
                 model_name: str | None = None,
                 embedder: SentenceEmbedder | None = None) -> None:
        if isinstance(knowledge_base, KnowledgeBase):
            self.kb = knowledge_base
        else:
            self.kb = load_knowledge_base(Path(knowledge_base) if knowledge_base else None)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._model_path = model_path
        self._model_name = model_name
        self._embedder = embedder
        self._index: faiss.Index | None = None
        self._owners: list[int] = []
        self.stats: IndexStats | None = None

    # --- index ---------------------------------------------------------------------------

    @property
    def embedder(self) -> SentenceEmbedder:
        if self._embedder is None:
            self._embedder = load_embedder(self._model_path, self._model_name)
        return self._embedder

    def _fingerprint(self) -> str:
        if self._embedder is not None:
            return self._embedder.info.fingerprint
        return model_fingerprint(self._model_path)

    def index_path(self) -> Path:
        key = hashlib.sha256(
            f"{INDEX_FORMAT}|{self.kb.digest}|{self._fingerprint()}".encode()).hexdigest()[:24]
        return self.cache_dir / "knowledge_index" / f"kr-{key}.faiss"

    def load(self) -> IndexStats:
        """Load the cached index, or build and cache it; idempotent."""
        if self.stats is not None:
            return self.stats
        path = self.index_path()
        texts, owners = index_rows(self.kb)
        start = time.perf_counter()
        index = self._read_cached(path, owners)
        source = "cache"
        if index is None:
            self.embedder  # load the model first so that the timing below is the build alone
            start = time.perf_counter()
            index = self._build(path, texts, owners)
            source = "built"
        self._index, self._owners = index, owners
        self.stats = IndexStats(source=source, seconds=time.perf_counter() - start,
                                rows=index.ntotal, path=str(path))
        return self.stats

    def _entry_ids(self, owners: list[int]) -> list[str]:
        return [self.kb.entries[i].id for i in owners]

    def _read_cached(self, path: Path, owners: list[int]) -> faiss.Index | None:
        meta_path = path.with_suffix(".json")
        if not (path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            index = faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError):
            return None  # unreadable or half-copied cache: rebuilding is always safe
        if meta.get("rows") != self._entry_ids(owners) or index.ntotal != len(owners):
            return None
        return index

    def _build(self, path: Path, texts: list[str], owners: list[int]) -> faiss.Index:
        vectors = self.embedder.encode(texts)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        meta = {"format": INDEX_FORMAT, "kb_root": str(self.kb.root), "kb_digest": self.kb.digest,
                "embedder": self.embedder.info.as_dict(), "rows": self._entry_ids(owners)}
        # Both files are written whole under temporary names and renamed into place, so a reader
        # (or a crash) never sees a torn index; the metadata is checked against the rows on load.
        write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
        write_atomic(path, faiss.serialize_index(index).tobytes())
        return index

    # --- queries -------------------------------------------------------------------------

    def material_for(self, category: str, material: str | None = None) -> str | None:
        """The material to fall back on: given, from the category's file, or named in it."""
        if material:
            subject = self.kb.subject(material)
            return subject.name if subject else normalize_name(material)
        known = self.kb.material_of(category)
        if known:
            return known
        # An unknown part named after its material ("steel bracket", "rubber seal").
        words = normalize_name(category).split("_")
        for subject in self.kb.subjects.values():
            if subject.kind != "material":
                continue
            for name in [subject.name, *subject.aliases]:
                name_words = normalize_name(name).split("_")
                if any(words[i:i + len(name_words)] == name_words for i in range(len(words))):
                    return subject.name
        return None

    def query_text(self, category: str, defect: str, material: str | None) -> str:
        text = f"{_readable(normalize_name(defect))} on {_readable(normalize_name(category))}"
        return f"{text} ({_readable(material)})" if material else text

    def retrieve(self, category: str, defect: str, k: int = 3, *,
                 material: str | None = None) -> Knowledge:
        """The ``k`` best entries for (category, defect); ``scores`` are the ranking scores."""
        self.load()
        assert self._index is not None
        material = self.material_for(category, material)
        query = self.query_text(category, defect, material)
        similarity = self._entry_similarity(query)
        subject = self.kb.subject(category)
        exact = self.kb.entry(category, defect)
        if exact is None and material:
            exact = self.kb.entry(material, defect)
        wanted = normalize_name(defect)
        scored = []
        for position, entry in enumerate(self.kb.entries):
            score = float(similarity[position])
            if exact is not None and entry.id == exact.id:
                score += EXACT_BOOST
            if subject is not None and entry.subject == subject.name:
                score += SUBJECT_BOOST
            elif material and entry.subject == material:
                score += MATERIAL_BOOST
            if wanted in entry.names():
                score += NAME_BOOST
            scored.append((score, position))
        scored.sort(key=lambda item: (-item[0], item[1]))
        top = scored[:max(0, k)]
        return Knowledge(query=query, entries=[self.kb.entries[p] for _, p in top],
                         scores=[round(s, 4) for s, _ in top])

    def _entry_similarity(self, query: str) -> np.ndarray:
        """Cosine similarity of the query to each entry: the best of the entry's rows."""
        assert self._index is not None
        vector = self.embedder.encode([query])
        sims, rows = self._index.search(vector, self._index.ntotal)
        best = np.full(len(self.kb.entries), -1.0, dtype=np.float32)
        owners = np.asarray(self._owners)[rows[0]]
        np.maximum.at(best, owners, sims[0])
        return best

    def provenance(self) -> dict:
        """What to record in a trajectory: which model, which knowledge, which index."""
        stats = self.load()
        return {"tool": self.name, "embedder": self.embedder.info.as_dict(),
                "kb_digest": self.kb.digest, "index": stats.path, "index_source": stats.source}


def describe(entry: KnowledgeEntry) -> str:
    """One paragraph for the policy's context: what the entry says, with its id."""
    return f"[{entry.id}] {_readable(entry.text())}"
