"""The defect knowledge base: our own short, factual entries, one TOML file per subject.

Layout (see ``knowledge_base/README.md``)::

    knowledge_base/categories/bottle.toml   # a product category (MVTec-AD, VisA, ...)
    knowledge_base/materials/metal.toml     # a generic material, the fallback for new parts

A file names its subject, its material, and one ``[defect.<name>]`` table per defect type with
``renderer``, ``appearance``, ``location`` and ``size`` (all required) and optional ``aliases``.
Loading validates every file and names the file and key at fault.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from appliance.names import normalize_name
from appliance.serialization import load_toml
from appliance.tools.interfaces import KnowledgeEntry
from appliance.tools.knowledge.families import FAMILIES, family_for_defect

_FILE_KEYS = {"subject", "kind", "material", "aliases", "description", "defects", "defect"}
_DEFECT_KEYS = {"renderer", "appearance", "location", "size", "aliases"}
_KINDS = {"category", "material"}


class KnowledgeBaseError(ValueError):
    """A knowledge base file is malformed; the message names the file and the key."""


def default_root() -> Path:
    """``$APPLIANCE_KNOWLEDGE_BASE``, else the ``knowledge_base/`` folder beside the package."""
    env = os.environ.get("APPLIANCE_KNOWLEDGE_BASE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "knowledge_base"


@dataclass
class Subject:
    name: str
    kind: str
    material: str
    aliases: list[str]
    description: str
    defects: list[str]  # the defect types this subject has, in the file's order
    source: str


@dataclass
class KnowledgeBase:
    root: Path
    entries: list[KnowledgeEntry]
    subjects: dict[tuple[str, str], Subject] = field(default_factory=dict)  # (kind, name)
    digest: str = ""  # sha256 over all files: the retrieval index is rebuilt when it changes

    def subject(self, name: str, kind: str | None = None) -> Subject | None:
        """The subject file for a name or alias; a category wins over a material of that name."""
        key = normalize_name(name)
        kinds = [kind] if kind else ["category", "material"]
        for wanted in kinds:
            if (wanted, key) in self.subjects:
                return self.subjects[(wanted, key)]
        for wanted in kinds:
            for (subject_kind, _), subject in self.subjects.items():
                if subject_kind == wanted and key in (normalize_name(a) for a in subject.aliases):
                    return subject
        return None

    def defects_for(self, category: str) -> list[str]:
        """The defect types listed for a category (empty when the category is unknown)."""
        subject = self.subject(category, kind="category")
        return list(subject.defects) if subject else []

    def material_of(self, category: str) -> str | None:
        subject = self.subject(category)
        return subject.material if subject else None

    def entry(self, category: str, defect: str) -> KnowledgeEntry | None:
        """Exact lookup: the category's own entry, else its material's entry, else None."""
        wanted = normalize_name(defect)
        subject = self.subject(category)
        if subject is None:
            return None
        candidates = [(subject.kind, subject.name), ("material", subject.material)]
        for kind, name in candidates:
            for entry in self.entries:
                if entry.kind == kind and entry.subject == name and wanted in entry.names():
                    return entry
        return None

    def renderer_for(self, category: str, defect: str) -> str:
        entry = self.entry(category, defect)
        return entry.renderer if entry else family_for_defect(defect)


def _require_str(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise KnowledgeBaseError(f"{where}: '{key}' must be a non-empty string")
    return value.strip()


def _parse_file(path: Path, root: Path) -> tuple[Subject, list[KnowledgeEntry]]:
    rel = str(path.relative_to(root))
    data = load_toml(path, KnowledgeBaseError, where=rel)
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise KnowledgeBaseError(f"{rel}: unknown key(s) {sorted(unknown)}")
    name = normalize_name(_require_str(data, "subject", rel))
    kind = _require_str(data, "kind", rel)
    if kind not in _KINDS:
        raise KnowledgeBaseError(f"{rel}: 'kind' must be one of {sorted(_KINDS)}, not {kind!r}")
    material = normalize_name(_require_str(data, "material", rel))
    defects_table = data.get("defect")
    if not isinstance(defects_table, dict) or not defects_table:
        raise KnowledgeBaseError(f"{rel}: needs at least one [defect.<name>] table")
    entries = []
    for raw_name, spec in defects_table.items():
        where = f"{rel} [defect.{raw_name}]"
        if not isinstance(spec, dict):
            raise KnowledgeBaseError(f"{where}: must be a table")
        unknown = set(spec) - _DEFECT_KEYS
        if unknown:
            raise KnowledgeBaseError(f"{where}: unknown key(s) {sorted(unknown)}")
        renderer = _require_str(spec, "renderer", where)
        if renderer not in FAMILIES:
            raise KnowledgeBaseError(f"{where}: renderer {renderer!r} is not one of {FAMILIES}")
        defect = normalize_name(raw_name)
        entry = KnowledgeEntry(
            id=f"{path.stem}/{defect}", subject=name, kind=kind, material=material,
            defect=defect, renderer=renderer,
            appearance=_require_str(spec, "appearance", where),
            location=_require_str(spec, "location", where),
            size=_require_str(spec, "size", where), source=rel,
            aliases=tuple(normalize_name(a) for a in spec.get("aliases", [])),
        )
        entries.append(entry)
    listed = [normalize_name(d) for d in data.get("defects", [e.defect for e in entries])]
    missing = [d for d in listed if d not in {e.defect for e in entries}]
    if missing:
        raise KnowledgeBaseError(f"{rel}: 'defects' lists {missing} without a [defect.*] table")
    subject = Subject(name=name, kind=kind, material=material,
                      aliases=[str(a) for a in data.get("aliases", [])],
                      description=str(data.get("description", "")), defects=listed, source=rel)
    return subject, entries


def load_knowledge_base(root: Path | None = None) -> KnowledgeBase:
    """Read and validate every ``*.toml`` under ``root``."""
    root = Path(root) if root else default_root()
    return _load_cached(root.resolve(), _tree_digest(root))


def _tree_digest(root: Path) -> str:
    if not root.is_dir():
        raise KnowledgeBaseError(f"knowledge base folder {root} does not exist")
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.toml")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=4)
def _load_cached(root: Path, digest: str) -> KnowledgeBase:
    entries: list[KnowledgeEntry] = []
    subjects: dict[tuple[str, str], Subject] = {}
    for path in sorted(root.rglob("*.toml")):
        subject, file_entries = _parse_file(path, root)
        key = (subject.kind, subject.name)
        if key in subjects:
            raise KnowledgeBaseError(
                f"{subject.source}: {subject.kind} {subject.name!r} already defined in "
                f"{subjects[key].source}")
        subjects[key] = subject
        entries.extend(file_entries)
    if not entries:
        raise KnowledgeBaseError(f"knowledge base {root} has no entries")
    return KnowledgeBase(root=root, entries=entries, subjects=subjects, digest=digest)


def material_for(kb: KnowledgeBase, category: str, material: str | None = None) -> str | None:
    """The material to fall back on: given, from the category's file, or named in the category.

    A part the knowledge base has never seen is often named after its material ("steel
    bracket", "rubber seal"); a material file's name or alias among its words counts.
    """
    if material:
        subject = kb.subject(material)
        return subject.name if subject else normalize_name(material)
    known = kb.material_of(category)
    if known:
        return known
    words = normalize_name(category).split("_")
    for subject in kb.subjects.values():
        if subject.kind != "material":
            continue
        for name in [subject.name, *subject.aliases]:
            name_words = normalize_name(name).split("_")
            if any(words[i:i + len(name_words)] == name_words for i in range(len(words))):
                return subject.name
    return None
