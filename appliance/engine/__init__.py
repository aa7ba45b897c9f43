"""The engine: which backend plays each role (policy and the five tools), assembled in one place.

``registry``: the backends and their factories, the one place a backend registers.
``selection``: which backend plays each role, from what is installed or from configuration.
``build``: the GPU memory plan, then every backend and the environment that runs them.
"""

from appliance.engine.build import Engine, build_engine, plan_gpu_memory, promoted_versions
from appliance.engine.registry import (
                                       BACKENDS,
                                       ENGINES,
                                       GUIDES,
                                       ROLES,
                                       BuildContext,
                                       EngineConfig,
                                       EngineError,
)
from appliance.engine.selection import (
                                       EngineChoice,
                                       RoleChoice,
                                       model_roles,
                                       resolve_engine_config,
                                       select_engine,
)
from appliance.tools.knowledge.retrieval import default_cache_dir

__all__ = ["BACKENDS", "ENGINES", "GUIDES", "ROLES", "BuildContext", "Engine", "EngineChoice",
           "EngineConfig", "EngineError", "RoleChoice", "build_engine", "default_cache_dir",
           "model_roles", "plan_gpu_memory", "promoted_versions", "resolve_engine_config", "select_engine"]
