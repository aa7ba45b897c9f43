"""Building an engine: plan GPU memory for the installed models, then construct every backend
and the environment that runs them."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from appliance.agent.environment import AgentEnvironment, Toolbox
from appliance.agent.policy import Policy
from appliance.engine.registry import (BACKENDS, CALIBRATED_BACKENDS, BuildContext,
                                      EngineConfig, EngineError, promoted_calibrations)
from appliance.engine.selection import model_roles
from appliance.tools.image_gen.calibration import Calibrations
from appliance.tools.knowledge.base import KnowledgeBase, load_knowledge_base
from appliance.tools.knowledge.retrieval import default_cache_dir

log = logging.getLogger(__name__)


def plan_gpu_memory(config: EngineConfig, device: str | None = None):
    """What the installed models of ``config`` need on the GPU, and what to change to fit.

    ``device`` None: CUDA when torch sees it (the plan is empty on a CPU-only box). The budget
    is ``config.gpu_memory_gb``, else the GPU's total memory.
    """
    from appliance.models.manifest import ManifestError, model_for
    from appliance.models.memory import GIB, plan_memory

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    budget = config.gpu_memory_gb
    if budget is None and device.startswith("cuda"):
        import torch

        budget = torch.cuda.mem_get_info()[1] / GIB
    models = {}
    for role, backend in model_roles(config).items():
        try:
            entry, _ = model_for(config.models_dir, role, backend)
        except (FileNotFoundError, ManifestError):
            continue  # build_engine says what is missing
        models[role] = replace(entry, settings={**entry.settings,
                                                **config.model_settings.get(entry.name, {})})
    return plan_memory(models, budget or 0.0, device=device, models_dir=config.models_dir)


@dataclass
class Engine:
    config: EngineConfig
    policy: Policy
    tools: Toolbox
    environment: AgentEnvironment
    knowledge_base: KnowledgeBase
    memory: Any = None  # the GPU memory plan it was built with (appliance.models.memory)
    # The CPU engine's calibration profiles by category (``appliance retrain`` promotes them).
    calibrations: Calibrations = field(default_factory=Calibrations)

    def describe(self) -> dict:
        """What runs, for the console and for every manifest line."""
        described = {"engine": self.config.name, "policy": self.policy.name,
                     **self.tools.backends(),
                     "knowledge_base_digest": self.knowledge_base.digest[:16]}
        if self.calibrations.digests():
            described["calibration"] = self.calibrations.digests()
        return described | {"env": asdict(self.config.env)}

    def close(self) -> None:
        for backend in (self.policy, *vars(self.tools).values()):
            close = getattr(backend, "close", None)
            if callable(close):
                close()


def build_engine(config: EngineConfig | None = None) -> Engine:
    config = config or EngineConfig()
    for role, name in config.backend_names().items():
        if name not in BACKENDS[role]:
            raise EngineError(f"unknown {role} backend {name!r}; available: "
                              f"{', '.join(sorted(BACKENDS[role]))}")
    memory = None
    if model_roles(config):
        memory = plan_gpu_memory(config)
        if not memory.fits:
            raise EngineError(memory.message)
        log.info("GPU memory plan: %s", "; ".join(memory.lines()))
        names = set(config.model_settings) | set(memory.overrides)
        config = replace(config, model_settings={
            name: {**config.model_settings.get(name, {}), **memory.overrides.get(name, {})}
            for name in names})
    knowledge_base = load_knowledge_base(config.knowledge_base)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    calibrations = promoted_calibrations(config)
    ctx = BuildContext(config, knowledge_base, cache_dir, calibrations)
    built = {}
    for role, name in config.backend_names().items():
        try:
            built[role] = BACKENDS[role][name](ctx)
        except EngineError:
            raise
        except (TypeError, ValueError) as exc:  # a setting a backend refuses: say which backend
            raise EngineError(f"{role} backend {name!r}: {exc}") from exc
    tools = Toolbox(prompt_gen=built["prompt_gen"], image_gen=built["image_gen"],
                    quality_eval=built["quality_eval"], knowledge=built["knowledge"],
                    mask_gen=built["mask_gen"])
    return Engine(config=config, policy=built["policy"], tools=tools,
                  environment=AgentEnvironment(tools, config.env), knowledge_base=knowledge_base,
                  memory=memory, calibrations=calibrations)


def promoted_versions(engine_config) -> dict[str, dict[str, str]]:
    """The active adapter and calibration profile hashes per category: what a built engine
    loaded, and what to compare with before the next batch."""
    from appliance.models.adapters import ADAPTERS
    from appliance.models.calibrations import CALIBRATIONS
    from appliance.models.manifest import default_models_dir

    models_dir = engine_config.models_dir or default_models_dir()
    shelves = []
    if engine_config.policy != "scripted":  # the scripted policy has no adapters
        shelves.append(ADAPTERS)
    if any(getattr(engine_config, role) == name for role, name in CALIBRATED_BACKENDS.items()):
        shelves.append(CALIBRATIONS)
    return {shelf.kind: {category: active[0] for category, active in shelf.actives(models_dir).items()}
            for shelf in shelves}
