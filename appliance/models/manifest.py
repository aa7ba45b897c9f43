"""The model manifest: what each model is, which files it has, and which engine that makes.

One TOML format serves three places:

* the catalogue in the repository (``models/manifest.toml``): the default model set, with
  ``sha256 = "unknown-until-pull"`` where the hash cannot be known offline;
* a bundle (``appliance models pull --to BUNDLE``): the same entries, revision pinned to a
  commit and every file's sha256 and size filled in;
* an installed models folder (``$APPLIANCE_MODELS``): the bundle's manifest plus the files.

Each ``[[models]]`` entry names the backends it serves per role (``backends = { image_gen =
"sdxl-inpaint" }``); which installed entry plays each role is the engine's choice
(``appliance.engine.selection``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.serialization import dumps_toml, load_toml, parse_toml

MANIFEST_NAME = "manifest.toml"
UNKNOWN = "unknown-until-pull"
SCHEMA = 1
ROLES = ("policy", "prompt_gen", "image_gen", "quality_eval", "knowledge", "mask_gen")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

# Python packages a backend needs besides the base install (checked without importing them) ...
BACKEND_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "sdxl-inpaint": ("torch", "diffusers", "transformers"),
    "flux-fill": ("torch", "diffusers", "transformers"),
    "metauas-onnx": ("onnxruntime",),
    "qwen-transformers": ("torch", "transformers"),
    "qwen-llamacpp": ("llama_cpp",),
}
# ... or, for backends that run several formats (the "vlm" PG/QE), what the model's format needs.
FORMAT_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "transformers": ("torch", "transformers"),
    "gguf": ("llama_cpp",),
    "diffusers": ("torch", "diffusers", "transformers"),
    "onnx": ("onnxruntime",),
}


class ManifestError(ValueError):
    """The manifest is malformed or unsafe; the message names the file, entry and field."""


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the model's folder, "/"-separated
    sha256: str  # 64 lower-case hex digits, or UNKNOWN in the catalogue
    size: int | None  # bytes; None when unknown

    @property
    def known(self) -> bool:
        return self.sha256 != UNKNOWN and self.size is not None


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the folder under the models directory; unique
    repo: str  # Hugging Face repository id
    revision: str  # a branch in the catalogue, a commit sha in bundles
    licence: str
    format: str  # "diffusers", "transformers", "gguf", "onnx", ...
    backends: dict[str, str]  # role -> backend name
    files: tuple[FileEntry, ...]
    repo_type: str = "model"
    include: tuple[str, ...] = ()  # patterns the pull downloads (default: the listed files)
    export: str | None = None  # a conversion the pull runs, e.g. "metauas-onnx"
    settings: dict = field(default_factory=dict)  # passed to the backend
    source: dict = field(default_factory=dict)  # provenance filled in by the pull
    notes: str = ""

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.backends)

    @property
    def verifiable(self) -> bool:
        return bool(self.files) and all(f.known for f in self.files)

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)


@dataclass
class Manifest:
    models: list[ModelEntry]
    bundle: dict = field(default_factory=dict)  # who made it and when (bundles, installs)
    path: Path | None = None

    def entry(self, name: str) -> ModelEntry | None:
        return next((m for m in self.models if m.name == name), None)

    def for_role(self, role: str) -> list[ModelEntry]:
        return [m for m in self.models if role in m.backends]


# --- parsing -----------------------------------------------------------------------------------


def load_manifest(path: Path) -> Manifest:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest")
    return parse_manifest(load_toml(path, ManifestError), where=str(path), path=path)


def parse_manifest(data: dict, where: str = "manifest", path: Path | None = None) -> Manifest:
    schema = data.get("schema", SCHEMA)
    if schema != SCHEMA:
        raise ManifestError(f"{where}: schema {schema!r} is not supported (expected {SCHEMA})")
    raw_models = data.get("models", [])
    if not isinstance(raw_models, list):
        raise ManifestError(f"{where}: 'models' must be an array of tables ([[models]])")
    models = [_parse_model(m, f"{where}: models[{i}]") for i, m in enumerate(raw_models)]
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ManifestError(f"{where}: duplicate model names {duplicates}")
    bundle = data.get("bundle", {})
    if not isinstance(bundle, dict):
        raise ManifestError(f"{where}: 'bundle' must be a table")
    return Manifest(models, bundle, path)


def _text(data: dict, key: str, where: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: '{key}' must be a non-empty string")
    return value


def _parse_model(data: Any, where: str) -> ModelEntry:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: must be a table")
    name = _text(data, "name", where)
    where = f"{where} ({name})"
    if not _NAME.match(name):
        raise ManifestError(f"{where}: 'name' must be a plain folder name (letters, digits, . _ -)")
    backends = data.get("backends")
    if not isinstance(backends, dict) or not backends:
        raise ManifestError(f"{where}: 'backends' must map roles to backend names")
    for role, backend in backends.items():
        if role not in ROLES:
            raise ManifestError(f"{where}: unknown role {role!r}; roles: {', '.join(ROLES)}")
        if not isinstance(backend, str) or not backend:
            raise ManifestError(f"{where}: backend for {role} must be a name")
    raw_files = data.get("files", [])
    if not isinstance(raw_files, list):
        raise ManifestError(f"{where}: 'files' must be an array of tables ([[models.files]])")
    files = tuple(_parse_file(f, f"{where}: files[{i}]") for i, f in enumerate(raw_files))
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        raise ManifestError(f"{where}: a file is listed twice")
    include = data.get("include", [])
    if not isinstance(include, list) or not all(isinstance(p, str) for p in include):
        raise ManifestError(f"{where}: 'include' must be a list of patterns")
    for key in ("settings", "source"):
        if not isinstance(data.get(key, {}), dict):
            raise ManifestError(f"{where}: '{key}' must be a table")
    export = data.get("export")
    if export is not None and not isinstance(export, str):
        raise ManifestError(f"{where}: 'export' must be a name")
    return ModelEntry(
        name=name, repo=_text(data, "repo", where), revision=_text(data, "revision", where),
        licence=_text(data, "licence", where), format=_text(data, "format", where),
        backends=dict(backends), files=files,
        repo_type=_text(data, "repo_type", where, "model"), include=tuple(include),
        export=export, settings=dict(data.get("settings", {})),
        source=dict(data.get("source", {})), notes=str(data.get("notes", "")))


def safe_relative_path(path: str, where: str) -> str:
    """Refuse absolute paths, '..', backslashes and empty parts: a bundle writes nowhere else."""
    pure = PurePosixPath(path)
    if (not path or "\\" in path or pure.is_absolute() or any(p in ("", ".", "..") for p in
                                                               path.split("/"))):
        raise ManifestError(f"{where}: unsafe file path {path!r}")
    return str(pure)


def _parse_file(data: Any, where: str) -> FileEntry:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: must be a table")
    path = safe_relative_path(_text(data, "path", where), where)
    sha256 = _text(data, "sha256", where).lower()
    if sha256 != UNKNOWN and not _SHA256.match(sha256):
        raise ManifestError(f"{where} ({path}): sha256 must be 64 hex digits or {UNKNOWN!r}")
    size = data.get("size", UNKNOWN)
    if size == UNKNOWN:
        size = None
    elif not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where} ({path}): size must be a byte count or {UNKNOWN!r}")
    return FileEntry(path, sha256, size)


# --- writing -----------------------------------------------------------------------------------


def dumps_manifest(manifest: Manifest, header: str = "") -> str:
    document: dict[str, Any] = {"schema": SCHEMA}
    if manifest.bundle:
        document["bundle"] = manifest.bundle
    document["models"] = []
    for model in manifest.models:
        table: dict[str, Any] = {key: getattr(model, key) for key in
                                 ("name", "repo", "repo_type", "revision", "licence", "format")}
        table["backends"] = model.backends
        for key in ("include", "export", "settings", "source", "notes"):
            if getattr(model, key):
                table[key] = getattr(model, key)
        table["files"] = [{"path": f.path, "sha256": f.sha256,
                           "size": f.size if f.size is not None else UNKNOWN} for f in model.files]
        document["models"].append(table)
    try:
        text = dumps_toml(document)
    except ValueError as exc:
        raise ManifestError(str(exc)) from exc
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + text


def write_manifest(manifest: Manifest, folder: Path, header: str = "") -> Path:
    from appliance.imaging import write_atomic

    path = Path(folder) / MANIFEST_NAME
    text = dumps_manifest(manifest, header)
    parse_manifest(parse_toml(text, "generated manifest", ManifestError),
                   where="generated manifest")  # never write what we can't read
    write_atomic(path, text.encode("utf-8"))
    return path


# --- what is installed -------------------------------------------------------------------------


def default_models_dir() -> Path:
    env = os.environ.get("APPLIANCE_MODELS")
    return Path(env) if env else Path.home() / ".local" / "share" / "appliance" / "models"


def catalogue_path() -> Path:
    """The repository's default model set."""
    return Path(__file__).resolve().parents[2] / "models" / MANIFEST_NAME


@dataclass
class ModelStatus:
    entry: ModelEntry
    installed: bool
    reason: str  # why not, or "installed"


def check_installed(entry: ModelEntry, models_dir: Path) -> ModelStatus:
    """A quick check (presence and sizes, no hashing: ``verify`` does that)."""
    if not entry.verifiable:
        return ModelStatus(entry, False, "its manifest has no sha256 for every file")
    folder = Path(models_dir) / entry.name
    for item in entry.files:
        path = folder / item.path
        if not path.is_file():
            return ModelStatus(entry, False, f"missing {item.path}")
        if path.stat().st_size != item.size:
            return ModelStatus(entry, False, f"{item.path} has the wrong size")
    return ModelStatus(entry, True, "installed")


def load_installed(models_dir: Path | None = None) -> Manifest | None:
    """The installed manifest, or None when nothing is installed."""
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    if not (models_dir / MANIFEST_NAME).is_file():
        return None
    return load_manifest(models_dir / MANIFEST_NAME)


def missing_packages(backend: str, fmt: str | None = None) -> list[str]:
    """Packages ``backend`` (serving a model of format ``fmt``) needs that are not installed."""
    needed = BACKEND_REQUIREMENTS.get(backend) or FORMAT_REQUIREMENTS.get(fmt or "", ())
    return [name for name in needed if importlib.util.find_spec(name) is None]


def model_for(models_dir: Path | None, role: str, backend: str) -> tuple[ModelEntry, Path]:
    """The installed entry serving ``backend`` in ``role`` and its folder (for the factories)."""
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    manifest = load_installed(models_dir)
    if manifest is None:
        raise FileNotFoundError(f"no models installed in {models_dir} (no {MANIFEST_NAME}); "
                                "see `appliance models install`")
    for entry in manifest.for_role(role):
        if entry.backends[role] == backend:
            status = check_installed(entry, models_dir)
            if not status.installed:
                raise FileNotFoundError(f"{entry.name} in {models_dir}: {status.reason}")
            return entry, models_dir / entry.name
    raise FileNotFoundError(f"no installed model in {models_dir} serves {role} with {backend!r}")
