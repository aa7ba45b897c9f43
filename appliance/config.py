"""The appliance's one configuration file (TOML), validated before anything runs.

Where it is read from: ``--config PATH``, else ``$APPLIANCE_CONFIG``, else
``/etc/appliance/config.toml`` if it exists, else the built-in defaults. Every key is optional;
an unknown key, a wrong type or a value out of range is an error that names the key and its
line, e.g. ``config.toml:7: engine.chunks: unknown key (allowed: chunk, max_attempts, ...)``.
Relative paths are taken from ``paths.root`` (default ``$APPLIANCE_HOME``, else
``/var/lib/appliance``). ``appliance config show`` prints the effective configuration.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import time as clock
from pathlib import Path
from typing import Any

from appliance.names import InvalidName, Name, unique_names
from appliance.serialization import parse_toml, toml_value

CONFIG_ENV = "APPLIANCE_CONFIG"
HOME_ENV = "APPLIANCE_HOME"
DEFAULT_CONFIG_PATH = Path("/etc/appliance/config.toml")
DEFAULT_ROOT = Path("/var/lib/appliance")
WINDOW_PATTERN = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")


class ConfigError(ValueError):
    """The configuration cannot be used; ``errors`` lists every problem found, key by key."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid configuration:\n  " + "\n  ".join(errors))


def _opt(default: Any, help: str, **rules: Any) -> Any:
    """A config field: its default, a one-line help (shown by ``config show``) and its rules."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class PathsSection:
    root: Path | None = _opt(None, "base for the relative paths below (default $APPLIANCE_HOME "
                                   "or /var/lib/appliance)")
    inbox: Path = _opt(Path("inbox"), "watched folder: inbox/<category>/<photos>")
    done: Path = _opt(Path("done"), "inputs are moved here once queued")
    quarantine: Path = _opt(Path("quarantine"), "bad inputs, each with NAME.reason.txt")
    dataset: Path = _opt(Path("dataset"), "the output dataset; its job store is dataset/.appliance/")
    models: Path = _opt(Path("models"), "installed model files and their manifest")
    cache: Path = _opt(Path("cache"), "caches (retrieval index)")
    knowledge_base: Path | None = _opt(None, "knowledge base folder (default: the bundled one)")


@dataclass
class EngineSection:
    name: str = _opt("auto", "engine: \"auto\" (backends from the installed models, the CPU "
                             "engine when none are; see `appliance models list`) or \"cpu\"")
    policy: str | None = _opt(None, "override the engine's policy backend")
    prompt_gen: str | None = _opt(None, "override the prompt generation backend")
    image_gen: str | None = _opt(None, "override the image generation backend")
    quality_eval: str | None = _opt(None, "override the quality evaluation backend")
    knowledge: str | None = _opt(None, "override the knowledge retrieval backend")
    mask_gen: str | None = _opt(None, "override the mask generation backend")
    max_attempts: int = _opt(3, "image generation attempts per episode", min=1, max=10)
    gpu_memory_gb: float | None = _opt(None, "GPU memory the models must fit in, GiB (default: "
                                             "all of the GPU); settings change to fit", min=1,
                                       max=1024)
    workers: int = _opt(1, "worker processes, each with the engine resident", min=1, max=64)
    chunk: int = _opt(4, "episodes that step together (one batched call per tool)", min=1, max=256)
    seed: int = _opt(0, "base seed; episode seeds derive from it and the photo's content", min=0,
                     max=2**31 - 1)


@dataclass
class ThresholdsSection:
    min_location: int = _opt(3, "acceptance bar on the judge's 0-5 location score", min=0, max=5)
    min_quality: int = _opt(3, "acceptance bar on the judge's 0-5 quality score", min=0, max=5)
    knowledge_threshold: int = _opt(7, "a rejected attempt below this 0-10 score retrieves "
                                       "knowledge first", min=0, max=10)
    max_turns: int = _opt(12, "assistant messages per episode", min=4, max=64)


@dataclass
class IntakeSection:
    poll_seconds: float = _opt(2.0, "how often the inbox is scanned", min=0.05, max=3600)
    stable_polls: int = _opt(2, "polls with unchanged size and mtime before a file is taken",
                             min=1, max=100)
    settle_seconds: float = _opt(5.0, "a file must also be this old (mtime) before it is taken",
                                 min=0, max=3600)
    quarantine_after_seconds: float = _opt(
        60.0, "an unreadable file is only quarantined once unchanged this long (it may still be "
              "copying)", min=0, max=86400)
    max_file_mb: float = _opt(512.0, "larger files are quarantined unread", min=0.001,
                              max=16_000)
    max_pixels: int = _opt(64_000_000, "decompression-bomb guard: refuse images above this",
                           min=1, max=1_000_000_000)
    min_side: int = _opt(32, "refuse images with a side shorter than this", min=1)
    max_side: int = _opt(4096, "images with a longer side are downscaled (or refused)", min=16)
    oversize: str = _opt("downscale", "what to do above max_side", choices=("downscale", "reject"))


@dataclass
class ScheduleSection:
    window: str = _opt("always", "when episodes run: \"always\" or \"HH:MM-HH:MM\" (may wrap "
                                 "midnight, e.g. \"22:00-06:00\")")
    watcher_processes: bool = _opt(True, "the watcher also runs queued episodes inside the "
                                         "window (else only `appliance run` does)")


@dataclass
class ServiceSection:
    max_tries: int = _opt(3, "an episode started this often without finishing (crash, engine "
                             "error) is marked failed", min=1, max=100)
    min_free_mb: float = _opt(500.0, "below this much free disk space no new work starts",
                              min=0, max=10_000_000)
    disk_backoff_seconds: float = _opt(300.0, "wait after a full disk before trying again",
                                       min=0.01, max=86400)


@dataclass
class ClusterSection:
    """Running episodes on a Ray cluster of boxes (the optional ``cluster`` extra); see
    docs/cluster.md. Without an address the box runs alone and Ray is never imported."""

    address: str | None = _opt(None, "Ray cluster to run episodes on: HOST:PORT of its head "
                                     "(default: none, this box alone)")
    token_file: Path = _opt(Path("cluster-token"), "the cluster's shared secret (Ray token "
                                                   "authentication); `appliance cluster token` "
                                                   "makes one")
    node_ip: str | None = _opt(None, "the address Ray binds to on this box (default: Ray's "
                                     "choice); `appliance cluster start` uses it")
    port: int = _opt(6379, "the head's Ray port, which every box connects to", min=1024,
                     max=65535)
    cpus_per_engine: float = _opt(1.0, "CPUs each engine (one Ray actor, models loaded once) "
                                       "holds; a node runs as many engines as fit", min=0.0,
                                  max=1024)
    gpus_per_engine: float = _opt(0.0, "GPUs each engine holds (1: one engine per GPU)",
                                  min=0.0, max=64)
    chunks_per_engine: int = _opt(2, "chunks in flight per engine: keeps each engine busy "
                                     "while the head writes, and bounds the head's memory",
                                  min=1, max=16)
    dashboard: bool = _opt(False, "start Ray's dashboard with `appliance cluster start` (one "
                                  "more open port)")


# Work one photo may ask for: at most MAX_DEFECTS x MAX_PER_IMAGE episodes, so a spec dropped
# into the inbox can never make intake allocate without bound.
MAX_PER_IMAGE = 100
MAX_DEFECTS = 32
# MVTec AD holds back about this share of normal photos per category for testing.
TEST_GOOD_SHARE = 0.1


@dataclass
class DefaultsSection:
    per_image: int = _opt(1, "samples per (photo, defect type)", min=1, max=MAX_PER_IMAGE)
    defects: list[str] = _opt([], "defect types for every category (default: the knowledge "
                                  "base's list for the category)", name="defect",
                              max_items=MAX_DEFECTS)
    test_good_share: float = _opt(TEST_GOOD_SHARE, "share of the normal photos held back in <category>/test/"
                                       "good, never edited, so that a detector's image-level "
                                       "metrics have normal test images", min=0.0, max=0.9)


@dataclass
class CategorySection:
    """A ``[categories.NAME]`` table of the config, and a category's ``spec.toml`` in the inbox:
    one schema, one set of bounds, wherever a spec is read."""

    defects: list[str] = _opt([], "defect types for this category", name="defect",
                              max_items=MAX_DEFECTS)
    per_image: int | None = _opt(None, "samples per (photo, defect type)", min=1,
                                 max=MAX_PER_IMAGE)
    material: str | None = _opt(None, "material, for a part the knowledge base does not know",
                                name="material")


@dataclass
class Config:
    paths: PathsSection = field(default_factory=PathsSection)
    engine: EngineSection = field(default_factory=EngineSection)
    thresholds: ThresholdsSection = field(default_factory=ThresholdsSection)
    intake: IntakeSection = field(default_factory=IntakeSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    service: ServiceSection = field(default_factory=ServiceSection)
    defaults: DefaultsSection = field(default_factory=DefaultsSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    categories: dict[str, CategorySection] = field(default_factory=dict)
    source: Path | None = None  # the file it came from; None for built-in defaults

    # Derived values -----------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        if self.paths.root is not None:
            return self.paths.root
        return Path(os.environ.get(HOME_ENV) or DEFAULT_ROOT)

    def path(self, name: str) -> Path:
        """An absolute path from the [paths] table."""
        value = getattr(self.paths, name)
        return value if value.is_absolute() else self.root / value

    @property
    def inbox(self) -> Path:
        return self.path("inbox")

    @property
    def dataset(self) -> Path:
        return self.path("dataset")

    @property
    def cluster_token_file(self) -> Path:
        token = self.cluster.token_file
        return token if token.is_absolute() else self.root / token

    def engine_config(self):
        """The EngineConfig this file asks for (engine, backend overrides, thresholds)."""
        from appliance.engine import ROLES, resolve_engine_config

        overrides = {role: getattr(self.engine, role) for role in ROLES
                     if getattr(self.engine, role)}
        base, _ = resolve_engine_config(self.engine.name, models_dir=self.path("models"),
                                        overrides=overrides)
        env = replace(base.env, max_image_gen=self.engine.max_attempts,
                      min_location=self.thresholds.min_location,
                      min_quality=self.thresholds.min_quality,
                      knowledge_threshold=self.thresholds.knowledge_threshold,
                      max_turns=self.thresholds.max_turns)
        knowledge_base = self.paths.knowledge_base
        if knowledge_base is not None and not knowledge_base.is_absolute():
            knowledge_base = self.root / knowledge_base
        return replace(base, env=env, cache_dir=self.path("cache"),
                       gpu_memory_gb=self.engine.gpu_memory_gb,
                       knowledge_base=knowledge_base or base.knowledge_base)

    def category_spec(self, category: str) -> CategorySection | None:
        return self.categories.get(category)


# Loading ------------------------------------------------------------------------------------------

def config_path(explicit: Path | str | None = None) -> Path | None:
    """The file to read: explicit, $APPLIANCE_CONFIG, /etc/appliance/config.toml, or none."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_config(path: Path | str | None = None) -> Config:
    """Read and validate the configuration; raises ConfigError listing every problem."""
    path = config_path(path)
    if path is None:
        return Config()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file (set ${CONFIG_ENV} or --config)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    return parse_config(text, Path(path))


def parse_config(text: str, source: Path | None = None) -> Config:
    name = str(source) if source else "<config>"
    data = parse_toml(text, name, lambda message: ConfigError([message]))
    errors: list[str] = []

    def error(dotted: str, message: str) -> None:
        line = _line_of(text, dotted)
        where = f"{name}:{line}" if line else name
        errors.append(f"{where}: {dotted}: {message}")

    config = _build(Config, data, "", error)
    config.source = Path(source).resolve() if source else None
    if config.paths.root is not None and not config.paths.root.is_absolute() and source:
        config.paths.root = (Path(source).resolve().parent / config.paths.root).resolve()
    _check_semantics(config, error)
    if errors:
        raise ConfigError(errors)
    return config


def parse_category_spec(text: str, source: Path) -> CategorySection:
    """A category's ``spec.toml`` in the inbox: the same schema, and the same bounds, as a
    ``[categories.NAME]`` table of the configuration."""
    data = parse_toml(text, str(source), lambda message: ConfigError([message]))
    errors: list[str] = []

    def error(dotted: str, message: str) -> None:
        line = _line_of(text, dotted)
        errors.append(f"{source}:{line}: {dotted}: {message}" if line else f"{source}: {dotted}: {message}")

    spec = _build(CategorySection, data, "", error)
    if errors:
        raise ConfigError(errors)
    return spec


def _build(cls: type, data: Any, prefix: str, error) -> Any:
    """A dataclass from a TOML table, checking every key and value against the hints."""
    if not isinstance(data, dict):
        error(prefix.rstrip("."), f"must be a table, not {_kind(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.name != "source"}
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            error(dotted, f"unknown key (allowed: {', '.join(sorted(known))})")
            continue
        converted = _convert(hints[key], value, dotted, known[key].metadata, error)
        if converted is not _INVALID:
            values[key] = converted
    return cls(**values)


_INVALID = object()


def _convert(hint: Any, value: Any, dotted: str, rules: dict, error) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = False
    if origin in (typing.Union, types.UnionType):  # X | None: TOML has no null; "" unsets it
        optional = True
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if is_dataclass(hint):
        return _build(hint, value, dotted + ".", error)
    if origin is dict:  # [categories.NAME] tables
        if not isinstance(value, dict):
            error(dotted, f"must be a table, not {_kind(value)}")
            return _INVALID
        try:
            names = unique_names(value, "category")
        except InvalidName as exc:
            error(dotted, str(exc))
            return _INVALID
        return {name: _build(args[1], v, f"{dotted}.{k}.", error)
                for name, (k, v) in zip(names, value.items())}
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            error(dotted, "must be a list of non-empty strings")
            return _INVALID
        limit = rules.get("max_items")
        if limit is not None and len(value) > limit:
            error(dotted, f"has {len(value)} items; at most {limit}")
            return _INVALID
        try:
            return [str(n) for n in unique_names(value, rules.get("name", "category"))]
        except InvalidName as exc:
            error(dotted, str(exc))
            return _INVALID
    if hint is bool:
        if not isinstance(value, bool):
            error(dotted, f"must be true or false, not {_kind(value)}")
            return _INVALID
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                hint is int and not isinstance(value, int)):
            error(dotted, f"must be {'an integer' if hint is int else 'a number'}, not {_kind(value)}")
            return _INVALID
        if not math.isfinite(value):
            error(dotted, f"must be a finite number, not {value}")
            return _INVALID
        low, high = rules.get("min"), rules.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"between {low} and {high}" if high is not None else f"at least {low}"
            error(dotted, f"must be {span}, not {value}")
            return _INVALID
        return hint(value)
    if hint is str or hint is Path:
        if not isinstance(value, str):
            error(dotted, f"must be a string, not {_kind(value)}")
            return _INVALID
        choices = rules.get("choices")
        if choices and value not in choices:
            error(dotted, f"must be one of {', '.join(choices)}, not {value!r}")
            return _INVALID
        if value == "":
            if optional:
                return None
            error(dotted, "must not be empty")
            return _INVALID
        if rules.get("name"):
            try:
                return str(Name(value, rules["name"]))
            except InvalidName as exc:
                error(dotted, str(exc))
                return _INVALID
        return Path(value).expanduser() if hint is Path else value
    raise TypeError(f"unsupported config type {hint!r} for {dotted}")  # pragma: no cover


def _check_semantics(config: Config, error) -> None:
    """Rules that involve more than one value, or the installed backends."""
    from appliance.engine import BACKENDS, ENGINES, ROLES

    if config.engine.name != "auto" and config.engine.name not in ENGINES:
        error("engine.name", f"unknown engine {config.engine.name!r} "
                             f"(available: auto, {', '.join(sorted(ENGINES))})")
    for role in ROLES:
        name = getattr(config.engine, role)
        if name and name not in BACKENDS[role]:
            error(f"engine.{role}", f"unknown backend {name!r} "
                                    f"(available: {', '.join(sorted(BACKENDS[role]))})")
    try:
        parse_window(config.schedule.window)
    except ValueError as exc:
        error("schedule.window", str(exc))
    _check_paths(config, error)
    if config.intake.min_side > config.intake.max_side:
        error("intake.min_side", f"must not exceed intake.max_side ({config.intake.max_side})")
    address = config.cluster.address
    if address is not None and not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", address):
        error("cluster.address", f"must be HOST:PORT of the cluster's head, not {address!r}")
    for name, spec in config.categories.items():
        if not spec.defects and not spec.material:
            error(f"categories.{name}", "needs defects = [...] or material = \"...\"")


# Folders the appliance must never write into (nor be rooted at): the system's own.
SYSTEM_FOLDERS = tuple(Path(p) for p in (
    "/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
    "/root", "/run", "/sbin", "/sys", "/usr", "/var", "/var/lib", "/var/log", "/home", "/tmp",
    "/opt", "/srv", "/mnt", "/media"))
# Folders that may lie inside a system folder's tree but not *be* one, e.g. /var/lib/appliance.
_SYSTEM_TREES = tuple(Path(p) for p in ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32",
                                          "/lib64", "/libx32", "/proc", "/sbin", "/sys", "/usr"))
# The folders the service writes and moves files between: none may lie inside another.
SEPARATE = ("inbox", "done", "quarantine", "dataset")


def _check_paths(config: Config, error) -> None:
    """Paths are absolute once resolved against the root, never '..', never a system folder,
    and the inbox, done/, quarantine/ and the dataset (with its store) are kept apart: a
    dataset inside the inbox would be taken in as input, a done/ inside it taken twice."""
    raw = {f.name: getattr(config.paths, f.name) for f in fields(PathsSection)}
    for name, value in raw.items():
        if value is not None and ".." in Path(value).parts:
            error(f"paths.{name}", f"must not contain '..' ({value}); write the folder itself")
    root = config.root
    if not root.is_absolute():
        error("paths.root", f"must be an absolute path, not {root}")
        return
    resolved = {}
    for name in [f.name for f in fields(PathsSection) if f.name not in ("root", "knowledge_base")]:
        path = config.path(name)
        resolved[name] = path.resolve()  # a link must not join what the names keep apart
        if _is_system(path):
            error(f"paths.{name}", f"{path} is a system folder (or inside one); use a folder of "
                                  f"its own such as /var/lib/appliance/{name}")
    if _is_system(root):
        error("paths.root", f"{root} is a system folder; use a folder of its own such as "
                            f"{DEFAULT_ROOT}")
    for first in SEPARATE:
        for second in SEPARATE:
            a, b = resolved[first], resolved[second]
            if first < second and a == b:
                error(f"paths.{second}", f"is the same folder as paths.{first} ({a})")
            elif first != second and b != a and b.is_relative_to(a):
                error(f"paths.{second}", f"{b} lies inside paths.{first} ({a}); keep them apart")
    for name in ("models", "cache"):
        if resolved[name].is_relative_to(resolved["inbox"]):
            error(f"paths.{name}", f"{resolved[name]} lies inside the inbox; keep them apart")


def _is_system(path: Path) -> bool:
    """A system folder or inside one, as written or once symbolic links are resolved."""
    return any(p in SYSTEM_FOLDERS or any(p.is_relative_to(t) for t in _SYSTEM_TREES)
               for p in {path, path.resolve()})


def check_writable(config: Config) -> list[str]:
    """The folders the service writes, created if missing; a problem per folder that cannot be
    written (checked where the service runs, not where the config is only read)."""
    problems = []
    for name in (*SEPARATE, "cache"):
        path = config.path(name)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problems.append(f"paths.{name}: cannot create {path}: {exc.strerror or exc}")
            continue
        if not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"paths.{name}: {path} is not writable by this user "
                            f"(uid {os.geteuid()})")
    return problems


def parse_window(text: str) -> tuple[clock, clock] | None:
    """``"always"`` -> None; ``"22:00-06:00"`` -> (start, end); ValueError otherwise."""
    if text.strip().lower() == "always":
        return None
    match = WINDOW_PATTERN.match(text.strip())
    if not match:
        raise ValueError(f"must be \"always\" or \"HH:MM-HH:MM\", not {text!r}")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        raise ValueError(f"{text!r} is not a valid time range")
    if (h1, m1) == (h2, m2):
        raise ValueError(f"{text!r} is empty: start and end are the same")
    return clock(h1, m1), clock(h2, m2)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _line_of(text: str, dotted: str) -> int | None:
    """The line where a dotted key is set, found by following [table] headers."""
    parts = dotted.split(".")
    table, key = ".".join(parts[:-1]), parts[-1]
    current = ""
    header = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$")
    for number, line in enumerate(text.splitlines(), start=1):
        found = header.match(line)
        if found:
            current = re.sub(r"\s*\.\s*", ".", found.group(1)).replace('"', "")
            if current == dotted:
                return number
            continue
        if current == table and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
            return number
    return None


# Showing ------------------------------------------------------------------------------------------

def render(config: Config) -> str:
    """The effective configuration as TOML, every value resolved and explained."""
    lines = [f"# effective configuration (from {config.source or 'built-in defaults'})"]
    for section in fields(Config):
        if section.name in ("source", "categories"):
            continue
        lines.append(f"\n[{section.name}]")
        value = getattr(config, section.name)
        for item in fields(value):
            current = getattr(value, item.name)
            if section.name == "paths" and item.name != "knowledge_base":
                current = config.root if item.name == "root" else config.path(item.name)
            if current is None:
                lines.append(f"# {item.name} = (not set)  # {item.metadata['help']}")
                continue
            lines.append(f"{item.name} = {toml_value(current)}  # {item.metadata['help']}")
    for name, spec in sorted(config.categories.items()):
        lines.append(f"\n[categories.{name}]")
        for item in fields(spec):
            current = getattr(spec, item.name)
            if current is not None and current != []:
                lines.append(f"{item.name} = {toml_value(current)}")
    return "\n".join(lines) + "\n"


__all__ = ["Config", "ConfigError", "CONFIG_ENV", "HOME_ENV", "config_path", "load_config",
           "parse_config", "parse_window", "render"]
