"""KR: knowledge retrieval over ``knowledge_base/`` with FAISS and a sentence embedder.

One flat inner-product index over L2-normalised vectors (scores are cosine similarities, exact
search; the index is a few hundred rows) holds two kinds of rows: each entry's full text
(``entry.text()`` plus its aliases), then every distinct defect name and alias once ("blowhole",
"gas hole", "pore", ...). A query is embedded twice: "<defect> on <category> (<material>)"
against the text rows and the bare defect name against the name rows; an entry's similarity
mixes its text row with its best name row. Names are short and shared between entries, so they
cost little to embed, and they are what lets "gas pores" find the blowhole although its
appearance text never says "pore". Boosts for what the caller stated exactly (category,
material, a literal name) then order the candidates; see the constants below.

The index is built once and cached on disk, keyed by the knowledge base digest and the embedder
fingerprint: editing a knowledge file or swapping the model changes the key and the next
retriever rebuilds it; an unchanged setup loads it (about a millisecond) without embedding.
Query vectors are cached beside it under the same key: the build embeds the query of every
(subject, defect) pair the knowledge base lists, a bare defect name is read back from its own
index row, and any other query is embedded once and stored. So a batch asks the model nothing
(importing sentence-transformers and loading MiniLM costs about 15 s on 2 cores); the model is
loaded only for a query never asked before on this box.
A running retriever keeps the knowledge base it was built with; construct a new one to pick up
edits.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appliance.imaging import write_atomic
from appliance.names import normalize_name
from appliance.tools.interfaces import Knowledge, KnowledgeEntry
from appliance.tools.knowledge.base import KnowledgeBase, load_knowledge_base, material_for
from appliance.tools.knowledge.embedder import SentenceEmbedder, load_embedder, model_fingerprint

if TYPE_CHECKING:
    import faiss  # imported where used: the prompt generator imports this module without it

# Bump when the row texts or the file layout change, so that old caches are not reused.
INDEX_FORMAT = 3

# An entry's similarity: this share from its text row, the rest from its best name row. The
# text carries paraphrases of the look ("turned upside down"), the names carry spellings.
TEXT_WEIGHT = 0.6

# Ranking = similarity (at most 1) plus these boosts. They encode what the caller told us
# exactly, which similarity alone can get wrong between near-identical entries of other parts:
EXACT_BOOST = 1.0  # kb.entry(category, defect) found it by name or alias: it always ranks first
SUBJECT_BOOST = 0.15  # the entry is about the asked category
MATERIAL_BOOST = 0.10  # the entry is about the category's material: the fallback for new parts
NAME_BOOST = 0.05  # the asked defect is literally one of the entry's names (any subject)

QUERY_CACHE_SIZE = 4096  # query vectors kept per retriever (1.5 KB each)


def default_cache_dir() -> Path:
    """``$APPLIANCE_CACHE``, else ``~/.cache/appliance``."""
    env = os.environ.get("APPLIANCE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "appliance"


def _readable(name: str) -> str:
    # The tokenizer splits snake_case into odd pieces; embed names the way people write them.
    return name.replace("_", " ")


def entry_text(entry: KnowledgeEntry) -> str:
    """The text row of an entry: ``entry.text()`` plus its aliases."""
    text = _readable(entry.text())
    if entry.aliases:
        text += " Also called: " + ", ".join(_readable(a) for a in entry.aliases) + "."
    return text


def name_rows(kb: KnowledgeBase) -> list[str]:
    """Every distinct defect name and alias in the knowledge base, readable, sorted."""
    return sorted({_readable(name) for entry in kb.entries for name in entry.names()})


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
        self._name_rows: list[list[int]] = []  # per entry, the index rows of its names
        self._name_row: dict[str, int] = {}  # readable name -> its index row
        self._query_cache: dict[str, np.ndarray] = {}
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

    def queries_dir(self) -> Path:
        """Query vectors of this index, one ``.npy`` per query text (named by its hash)."""
        return self.index_path().with_suffix(".queries")

    def index_path(self) -> Path:
        key = hashlib.sha256(
            f"{INDEX_FORMAT}|{self.kb.digest}|{self._fingerprint()}".encode()).hexdigest()[:24]
        return self.cache_dir / "knowledge_index" / f"kr-{key}.faiss"

    def load(self) -> IndexStats:
        """Load the cached index, or build and cache it; idempotent."""
        if self.stats is not None:
            return self.stats
        path = self.index_path()
        texts = [entry_text(entry) for entry in self.kb.entries]
        names = name_rows(self.kb)
        start = time.perf_counter()
        index = self._read_cached(path, names)
        source = "cache"
        if index is None:
            _ = self.embedder  # load the model first: the timing below is the build alone
            start = time.perf_counter()
            index = self._build(path, texts, names)
            source = "built"
        self._index = index
        self._name_row = {name: len(texts) + i for i, name in enumerate(names)}
        row_of = self._name_row
        self._name_rows = [[row_of[_readable(n)] for n in entry.names()]
                           for entry in self.kb.entries]
        self.stats = IndexStats(source=source, seconds=time.perf_counter() - start,
                                rows=index.ntotal, path=str(path))
        return self.stats

    def _meta(self, names: list[str]) -> dict:
        return {"format": INDEX_FORMAT, "entries": [entry.id for entry in self.kb.entries],
                "names": names}

    def _read_cached(self, path: Path, names: list[str]) -> faiss.Index | None:
        meta_path = path.with_suffix(".json")
        if not (path.is_file() and meta_path.is_file()):
            return None
        import faiss

        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            index = faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError):
            return None  # unreadable or half-copied cache: rebuilding is always safe
        expected = self._meta(names)
        if any(meta.get(key) != value for key, value in expected.items()):
            return None
        if index.ntotal != len(expected["entries"]) + len(names):
            return None
        return index

    def _build(self, path: Path, texts: list[str], names: list[str]) -> faiss.Index:
        import faiss

        vectors = self.embedder.encode(texts + names)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        meta = self._meta(names) | {"kb_root": str(self.kb.root), "kb_digest": self.kb.digest,
                                    "embedder": self.embedder.info.as_dict()}
        # Both files are written whole under temporary names and renamed into place, so a reader
        # (or a crash) never sees a torn index; the metadata is checked against the rows on load.
        write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
        write_atomic(path, faiss.serialize_index(index).tobytes())
        # The queries a batch asks, embedded now while the model is loaded anyway.
        queries = self.known_queries()
        for text, vector in zip(queries, self.embedder.encode(queries)):
            self._store_query(path.with_suffix(".queries"), text, vector)
        return index

    def known_queries(self) -> list[str]:
        """The query text of every (subject, defect) pair the knowledge base lists."""
        texts = set()
        for subject in self.kb.subjects.values():
            material = material_for(self.kb, subject.name)
            for defect in subject.defects:
                texts.add(self.query_text(subject.name, defect, material))
        return sorted(texts)

    @staticmethod
    def _query_file(folder: Path, text: str) -> Path:
        return folder / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.npy"

    def _store_query(self, folder: Path, text: str, vector: np.ndarray) -> None:
        import io

        buffer = io.BytesIO()
        np.save(buffer, np.asarray(vector, dtype=np.float32))
        try:
            write_atomic(self._query_file(folder, text), buffer.getvalue())
        except OSError:
            pass  # a cache: a read-only or full disk only means embedding again next time

    def _stored_query(self, text: str) -> np.ndarray | None:
        try:
            vector = np.load(self._query_file(self.queries_dir(), text))
        except (OSError, ValueError):
            return None
        dimension = self._index.d if self._index is not None else None
        return vector if vector.ndim == 1 and vector.shape[0] == dimension else None

    # --- queries -------------------------------------------------------------------------

    def query_text(self, category: str, defect: str, material: str | None) -> str:
        text = f"{_readable(normalize_name(defect))} on {_readable(normalize_name(category))}"
        return f"{text} ({_readable(material)})" if material else text

    def retrieve(self, category: str, defect: str, k: int = 3, *,
                 material: str | None = None) -> Knowledge:
        """The ``k`` best entries for (category, defect); ``scores`` are the ranking scores."""
        self.load()
        assert self._index is not None
        material = material_for(self.kb, category, material)
        query = self.query_text(category, defect, material)
        similarity = self._entry_similarity(query, defect)
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

    def _entry_similarity(self, query: str, defect: str) -> np.ndarray:
        """Per entry: TEXT_WEIGHT * text-row cosine + the rest * best name-row cosine."""
        assert self._index is not None
        vectors = np.stack([self._query_vector(query),
                            self._query_vector(_readable(normalize_name(defect)))])
        total = self._index.ntotal
        sims, rows = self._index.search(vectors, total)
        by_row = np.empty((2, total), dtype=np.float32)  # search() sorts; undo that
        by_row[0, rows[0]] = sims[0]
        by_row[1, rows[1]] = sims[1]
        text_sim = by_row[0, :len(self.kb.entries)]
        name_sim = np.array([by_row[1, entry_rows].max() for entry_rows in self._name_rows])
        return TEXT_WEIGHT * text_sim + (1 - TEXT_WEIGHT) * name_sim

    def _query_vector(self, text: str) -> np.ndarray:
        # Batch runs ask about the same few (category, defect) pairs over and over: memory,
        # then the stored vectors, then the index's own name rows, and only then the model.
        vector = self._query_cache.get(text)
        if vector is None:
            vector = self._stored_query(text)
            if vector is None and text in self._name_row:
                vector = self._index.reconstruct(self._name_row[text])
            if vector is None:
                vector = self.embedder.encode([text])[0]
                self._store_query(self.queries_dir(), text, vector)
            if len(self._query_cache) >= QUERY_CACHE_SIZE:
                self._query_cache.pop(next(iter(self._query_cache)))
            self._query_cache[text] = vector
        return vector

    def provenance(self) -> dict:
        """What to record in a trajectory: which model, which knowledge, which index."""
        stats = self.load()
        try:  # recorded when the index was built: no need to load the model to say which
            embedder = json.loads(Path(stats.path).with_suffix(".json").read_text())["embedder"]
        except (OSError, ValueError, KeyError):
            embedder = self.embedder.info.as_dict()
        return {"tool": self.name, "embedder": embedder,
                "kb_digest": self.kb.digest, "index": stats.path, "index_source": stats.source}

