"""Engines are configurations of backends; this is the one place backends register.

Each role (policy and the five tools) maps backend names to factories (``BACKENDS``). Factories
import their backend lazily so that a CPU box never imports a GPU library it lacks. Which
backend plays each role is ``selection``'s business; ``build`` constructs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from appliance.agent.episode import EnvConfig
from appliance.agent.policy import Policy
from appliance.models.manifest import ROLES
from appliance.tools.image_gen.calibration import Calibrations
from appliance.tools.knowledge.base import KnowledgeBase


class EngineError(ValueError):
    """The configuration names a backend that does not exist or cannot load."""


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
    calibrations: Calibrations = field(default_factory=Calibrations)


Factory = Callable[[BuildContext], Any]


def _scripted_policy(ctx: BuildContext) -> Policy:
    from appliance.policies.scripted import ScriptedPolicy

    return ScriptedPolicy()


def _knowledge_prompt_gen(ctx: BuildContext):
    from appliance.tools.prompt_gen.composer import KnowledgePromptGenerator

    return KnowledgePromptGenerator(ctx.knowledge_base)


def _procedural_image_gen(ctx: BuildContext):
    from appliance.tools.image_gen.procedural import ProceduralImageGenerator

    return ProceduralImageGenerator(ctx.knowledge_base, ctx.calibrations)


def _heuristic_quality_eval(ctx: BuildContext):
    from appliance.tools.quality_eval.heuristic import HeuristicQualityEvaluator

    return HeuristicQualityEvaluator(knowledge_base=ctx.knowledge_base,
                                     calibrations=ctx.calibrations)


def _faiss_knowledge(ctx: BuildContext):
    from appliance.tools.knowledge.retrieval import FaissKnowledgeRetriever

    return FaissKnowledgeRetriever(ctx.knowledge_base, cache_dir=ctx.cache_dir)


def _difference_mask_gen(ctx: BuildContext):
    from appliance.tools.mask_gen.difference import DifferenceMaskGenerator

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


def settings_and_guide(entry) -> tuple[dict, bool]:
    settings = dict(entry.settings)
    settings.pop("roles", None)  # read per role by role_options
    settings.pop("training", None)  # read by `appliance retrain`
    guide = settings.pop("guide", None)
    if guide is not None and guide not in GUIDES:
        raise EngineError(f"{entry.name}: unknown guide {guide!r} in its settings "
                          f"(known: {', '.join(GUIDES)})")
    return settings, guide is not None


def role_options(entry, role: str):
    """The role's reasoning budget and sampling overrides: ``appliance.vlm.budget.role_budget``
    and the fields of ``Sampling`` from the entry's ``settings.roles.<role>`` table."""
    from appliance.vlm.budget import BUDGET_KEYS, role_budget
    from appliance.vlm.sampling import Sampling

    table = dict(entry.settings.get("roles", {}).get(role, {}))
    try:
        budget = role_budget(role, table)
        sampling = {k: v for k, v in table.items() if k not in BUDGET_KEYS}
        Sampling().updated(sampling)  # refuses unknown keys and values, naming the allowed ones
    except (TypeError, ValueError) as exc:
        raise EngineError(f"{entry.name}: settings.roles.{role}: {exc} (keys: reasoning_budget, "
                          "action_budget and the sampling settings)") from None
    return budget, sampling


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
    from appliance.tools.mask_gen.metauas import MetaUASMaskGenerator

    entry, folder = _installed_model(ctx, "mask_gen", "metauas-onnx")
    onnx = [f.path for f in entry.files if f.path.endswith(".onnx")]
    if len(onnx) != 1:
        raise EngineError(f"{entry.name}: expected one .onnx file, found {onnx}")
    return MetaUASMaskGenerator(folder / onnx[0], threshold=float(entry.settings.get("threshold", 0.5)))


def _qwen_transformers_policy(ctx: BuildContext) -> Policy:
    from appliance.policies.vlm import QwenTransformersPolicy
    from appliance.vlm.transformers_runtime import transformers_config

    entry, folder = _installed_model(ctx, "policy", "qwen-transformers")
    settings, guided = settings_and_guide(entry)
    config, adapter_dir = transformers_config(folder, settings)
    budget, sampling = role_options(entry, "policy")
    return QwenTransformersPolicy(config, adapter_dir=adapter_dir,
                                  category_adapters=_promoted_adapters(ctx),
                                  budget=budget, sampling=sampling,
                                  guide=_scripted_policy(ctx) if guided else None)


def _qwen_llamacpp_policy(ctx: BuildContext) -> Policy:
    from appliance.policies.vlm import QwenLlamaCppPolicy
    from appliance.vlm.llamacpp_runtime import llamacpp_config

    entry, folder = _installed_model(ctx, "policy", "qwen-llamacpp")
    settings, guided = settings_and_guide(entry)
    budget, sampling = role_options(entry, "policy")
    return QwenLlamaCppPolicy(llamacpp_config(folder, settings),
                              category_adapters=_promoted_adapters(ctx), budget=budget,
                              sampling=sampling, guide=_scripted_policy(ctx) if guided else None)


def _promoted_adapters(ctx: BuildContext) -> dict[str, Path]:
    """category -> the adapter folder `appliance retrain` promoted for it."""
    from appliance.models.adapters import AdapterError, active_adapters
    from appliance.models.manifest import default_models_dir

    try:
        return {c: a.path for c, a in active_adapters(
            ctx.config.models_dir or default_models_dir()).items()}
    except AdapterError as exc:
        raise EngineError(str(exc)) from None


# The backends that read a calibration profile; other engines never load one.
CALIBRATED_BACKENDS = {"image_gen": "procedural", "quality_eval": "heuristic"}


def promoted_calibrations(config: EngineConfig) -> Calibrations:
    """The calibration profiles `appliance retrain` promoted, by category."""
    from appliance.models.calibrations import active_profiles
    from appliance.models.manifest import default_models_dir
    from appliance.models.shelf import ShelfError

    if all(getattr(config, role) != name for role, name in CALIBRATED_BACKENDS.items()):
        return Calibrations()
    models_dir = config.models_dir or default_models_dir()
    try:
        return Calibrations(active_profiles(models_dir))
    except (ShelfError, OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineError(f"a promoted calibration profile under {Path(models_dir) / 'calibration'} "
                          f"cannot be read ({type(exc).__name__}: {exc}); roll it back with "
                          "`appliance retrain --rollback --calibration --category C`") from None


@dataclass
class _ResidentVLM:
    runtime: Any
    guided: bool
    budget: Any  # appliance.vlm.budget.Budget of the role
    sampling: dict


def _vlm_runtime(ctx: BuildContext, role: str) -> _ResidentVLM:
    """The resident VLM serving PG or QE; the same weights as the policy load only once."""
    entry, folder = _installed_model(ctx, role, "vlm")
    settings, guided = settings_and_guide(entry)
    settings.pop("adapter", None)  # PG and QE run the base weights
    budget, sampling = role_options(entry, role)
    if entry.format == "gguf":
        from appliance.vlm.llamacpp_runtime import llamacpp_config, llamacpp_runtime

        return _ResidentVLM(llamacpp_runtime(llamacpp_config(folder, settings)), guided, budget,
                            sampling)
    from appliance.vlm.transformers_runtime import transformers_config, transformers_runtime

    config, _ = transformers_config(folder, settings)
    return _ResidentVLM(transformers_runtime(config), guided, budget, sampling)


def _vlm_prompt_gen(ctx: BuildContext):
    from appliance.tools.prompt_gen.vlm import VLMPromptGenerator

    vlm = _vlm_runtime(ctx, "prompt_gen")
    return VLMPromptGenerator(vlm.runtime, ctx.knowledge_base, fallback=_knowledge_prompt_gen(ctx),
                              budget=vlm.budget, sampling=vlm.sampling,
                              guide=_knowledge_prompt_gen(ctx) if vlm.guided else None)


def _vlm_quality_eval(ctx: BuildContext):
    from appliance.tools.quality_eval.vlm import VLMQualityEvaluator

    vlm = _vlm_runtime(ctx, "quality_eval")
    return VLMQualityEvaluator(vlm.runtime, fallback=_heuristic_quality_eval(ctx),
                               budget=vlm.budget, sampling=vlm.sampling,
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
