"""Engines are configurations of backends; this is the one place backends register.

Each role (policy and the five tools) maps backend names to factories. An engine is chosen by
config (or, later, by what is installed in ``models/``), and it is always printed and recorded.
Factories import their backend lazily so that a CPU box never imports a GPU library it lacks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from appliance.agent.environment import AgentEnvironment, EnvConfig, Toolbox
from appliance.knowledge import KnowledgeBase, load_knowledge_base
from appliance.policies.base import Policy

log = logging.getLogger(__name__)

ROLES = ("policy", "prompt_gen", "image_gen", "quality_eval", "knowledge", "mask_gen")


@dataclass
class EngineConfig:
    """Which backend plays each role; ``cpu`` is the embedded default that needs no weights."""

    name: str = "cpu"
    policy: str = "scripted"
    prompt_gen: str = "knowledge"
    image_gen: str = "procedural"
    quality_eval: str = "heuristic"
    knowledge: str = "faiss-minilm"
    mask_gen: str = "difference"
    knowledge_base: Path | None = None  # None: $APPLIANCE_KNOWLEDGE_BASE or the bundled folder
    cache_dir: Path | None = None  # None: $APPLIANCE_CACHE or ~/.cache/appliance
    models_dir: Path | None = None  # None: $APPLIANCE_MODELS or the default (models/manifest.py)
    env: EnvConfig = field(default_factory=EnvConfig)
    # The GPU memory the models must fit in (GiB); None: all of the GPU. See plan_gpu_memory.
    gpu_memory_gb: float | None = None
    # Per installed model (manifest name), settings that replace the manifest's: what the
    # memory plan changed (offload, NF4, smaller batches).
    model_settings: dict[str, dict] = field(default_factory=dict)

    def backend_names(self) -> dict[str, str]:
        return {role: getattr(self, role) for role in ROLES}


@dataclass
class BuildContext:
    config: EngineConfig
    knowledge_base: KnowledgeBase
    cache_dir: Path


Factory = Callable[[BuildContext], Any]


def _scripted_policy(ctx: BuildContext) -> Policy:
    from appliance.policies.scripted import ScriptedPolicy

    return ScriptedPolicy()


def _knowledge_prompt_gen(ctx: BuildContext):
    from appliance.tools.prompt_gen import KnowledgePromptGenerator

    return KnowledgePromptGenerator(ctx.knowledge_base)


def _procedural_image_gen(ctx: BuildContext):
    from appliance.tools.image_gen.procedural import ProceduralImageGenerator

    return ProceduralImageGenerator(ctx.knowledge_base)


def _heuristic_quality_eval(ctx: BuildContext):
    from appliance.tools.quality_eval import HeuristicQualityEvaluator

    return HeuristicQualityEvaluator(knowledge_base=ctx.knowledge_base)


def _faiss_knowledge(ctx: BuildContext):
    from appliance.tools.knowledge_retrieval import FaissKnowledgeRetriever

    return FaissKnowledgeRetriever(ctx.knowledge_base, cache_dir=ctx.cache_dir)


def _difference_mask_gen(ctx: BuildContext):
    from appliance.tools.mask_gen import DifferenceMaskGenerator

    return DifferenceMaskGenerator()


def _installed_model(ctx: BuildContext, role: str, backend: str):
    """(manifest entry, folder) of the installed model serving ``backend`` in ``role``."""
    from appliance.models.manifest import ManifestError, model_for

    try:
        entry, folder = model_for(ctx.config.models_dir, role, backend)
    except (FileNotFoundError, ManifestError) as exc:
        raise EngineError(f"{role} backend {backend!r}: {exc}") from exc
    changed = ctx.config.model_settings.get(entry.name)
    if changed:
        entry = replace(entry, settings={**entry.settings, **changed})
    return entry, folder


# A tiny random-weight model cannot follow the protocol; its manifest entry says
# ``guide = "scripted"`` and the model is then made to write, token by token, what the built-in
# CPU backend of its role would (forced decoding through the real model code). Real models
# never carry it; a guided backend names its guide wherever it is recorded.
GUIDES = ("scripted",)


def _settings_and_guide(entry) -> tuple[dict, bool]:
    settings = dict(entry.settings)
    guide = settings.pop("guide", None)
    if guide is not None and guide not in GUIDES:
        raise EngineError(f"{entry.name}: unknown guide {guide!r} in its settings "
                          f"(known: {', '.join(GUIDES)})")
    return settings, guide is not None


def _diffusers_image_gen(ctx: BuildContext, backend: str):
    from appliance.tools.image_gen.diffusers_inpaint import DiffusersInpaintGenerator

    entry, folder = _installed_model(ctx, "image_gen", backend)
    return DiffusersInpaintGenerator(folder, backend, entry.settings, ctx.knowledge_base,
                                     model_id=f"{entry.repo}@{entry.revision[:12]}")


def _sdxl_inpaint_image_gen(ctx: BuildContext):
    return _diffusers_image_gen(ctx, "sdxl-inpaint")


def _flux_fill_image_gen(ctx: BuildContext):
    return _diffusers_image_gen(ctx, "flux-fill")


def _metauas_mask_gen(ctx: BuildContext):
    from appliance.tools.mask_gen_metauas import MetaUASMaskGenerator

    entry, folder = _installed_model(ctx, "mask_gen", "metauas-onnx")
    onnx = [f.path for f in entry.files if f.path.endswith(".onnx")]
    if len(onnx) != 1:
        raise EngineError(f"{entry.name}: expected one .onnx file, found {onnx}")
    return MetaUASMaskGenerator(folder / onnx[0], threshold=float(entry.settings.get("threshold", 0.5)))


def _qwen_transformers_policy(ctx: BuildContext) -> Policy:
    from appliance.policies.qwen_transformers import QwenTransformersPolicy, transformers_config

    entry, folder = _installed_model(ctx, "policy", "qwen-transformers")
    settings, guided = _settings_and_guide(entry)
    config, adapter_dir = transformers_config(folder, settings)
    return QwenTransformersPolicy(config, adapter_dir=adapter_dir,
                                  guide=_scripted_policy(ctx) if guided else None)


def _qwen_llamacpp_policy(ctx: BuildContext) -> Policy:
    from appliance.policies.qwen_llamacpp import QwenLlamaCppPolicy, llamacpp_config

    entry, folder = _installed_model(ctx, "policy", "qwen-llamacpp")
    settings, guided = _settings_and_guide(entry)
    return QwenLlamaCppPolicy(llamacpp_config(folder, settings),
                              guide=_scripted_policy(ctx) if guided else None)


@dataclass
class _ResidentVLM:
    runtime: Any
    max_new_tokens: int
    guided: bool


def _vlm_runtime(ctx: BuildContext, role: str) -> _ResidentVLM:
    """The resident VLM serving PG or QE; the same weights as the policy load only once."""
    entry, folder = _installed_model(ctx, role, "vlm")
    settings, guided = _settings_and_guide(entry)
    settings.pop("adapter", None)  # PG and QE run the base weights
    if entry.format == "gguf":
        from appliance.policies.qwen_llamacpp import llamacpp_config, llamacpp_runtime

        config = llamacpp_config(folder, settings)
        return _ResidentVLM(llamacpp_runtime(config), config.max_new_tokens, guided)
    from appliance.policies.qwen_transformers import transformers_config, transformers_runtime

    config, _ = transformers_config(folder, settings)
    return _ResidentVLM(transformers_runtime(config), config.max_new_tokens, guided)


def _vlm_prompt_gen(ctx: BuildContext):
    from appliance.tools.vlm_prompt_gen import VLMPromptGenerator

    vlm = _vlm_runtime(ctx, "prompt_gen")
    return VLMPromptGenerator(vlm.runtime, ctx.knowledge_base, fallback=_knowledge_prompt_gen(ctx),
                              max_new_tokens=min(512, vlm.max_new_tokens),
                              guide=_knowledge_prompt_gen(ctx) if vlm.guided else None)


def _vlm_quality_eval(ctx: BuildContext):
    from appliance.tools.vlm_quality_eval import VLMQualityEvaluator

    vlm = _vlm_runtime(ctx, "quality_eval")
    return VLMQualityEvaluator(vlm.runtime, fallback=_heuristic_quality_eval(ctx),
                               max_new_tokens=min(768, vlm.max_new_tokens),
                               guide=_heuristic_quality_eval(ctx) if vlm.guided else None)


BACKENDS: dict[str, dict[str, Factory]] = {
    "policy": {"scripted": _scripted_policy, "qwen-transformers": _qwen_transformers_policy,
               "qwen-llamacpp": _qwen_llamacpp_policy},
    "prompt_gen": {"knowledge": _knowledge_prompt_gen, "vlm": _vlm_prompt_gen},
    "image_gen": {"procedural": _procedural_image_gen, "sdxl-inpaint": _sdxl_inpaint_image_gen,
                  "flux-fill": _flux_fill_image_gen},
    "quality_eval": {"heuristic": _heuristic_quality_eval, "vlm": _vlm_quality_eval},
    "knowledge": {"faiss-minilm": _faiss_knowledge},
    "mask_gen": {"difference": _difference_mask_gen, "metauas-onnx": _metauas_mask_gen},
}

ENGINES: dict[str, EngineConfig] = {"cpu": EngineConfig()}


class EngineError(ValueError):
    """The configuration names a backend that does not exist or cannot load."""


def resolve_engine_config(name: str = "auto", *, models_dir: Path | None = None,
                          overrides: dict[str, str] | None = None
                          ) -> tuple[EngineConfig, dict[str, str]]:
    """The engine ``name`` names, with single roles replaced by ``overrides``, and why each
    backend was chosen.

    ``auto`` takes the backends the models installed in ``models_dir`` make (the CPU defaults
    for roles no installed model serves); any other name is an entry of ``ENGINES``.
    """
    if name == "auto":
        from appliance.models.manifest import select_engine

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


def default_cache_dir() -> Path:
    env = os.environ.get("APPLIANCE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "appliance"


@dataclass
class Engine:
    config: EngineConfig
    policy: Policy
    tools: Toolbox
    environment: AgentEnvironment
    knowledge_base: KnowledgeBase
    memory: Any = None  # the GPU memory plan it was built with (appliance.models.memory)

    def describe(self) -> dict:
        """What runs, for the console and for every manifest line."""
        return {"engine": self.config.name, "policy": self.policy.name, **self.tools.backends(),
                "knowledge_base_digest": self.knowledge_base.digest[:16],
                "env": asdict(self.config.env)}

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
    ctx = BuildContext(config, knowledge_base, cache_dir)
    built = {role: BACKENDS[role][name](ctx) for role, name in config.backend_names().items()}
    tools = Toolbox(prompt_gen=built["prompt_gen"], image_gen=built["image_gen"],
                    quality_eval=built["quality_eval"], knowledge=built["knowledge"],
                    mask_gen=built["mask_gen"])
    return Engine(config=config, policy=built["policy"], tools=tools,
                  environment=AgentEnvironment(tools, config.env), knowledge_base=knowledge_base,
                  memory=memory)
