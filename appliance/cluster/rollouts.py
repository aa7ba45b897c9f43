"""GRPO rollouts on the cluster's engines; the gradients stay on the training box.

``ClusterRollouts`` is ``training.grpo.EpisodeRollouts`` whose groups run on the cluster: at
every step the trainer's current adapter (peft's own files, a few MB) is put in Ray's object store
once, each task's G rollouts run together on one engine (the same ``EngineActor`` the batches
use, its tools and environment), and the episodes come back for TRL to score and learn from
here. Seeds are made on the training box as before, so a rollout does not depend on where it ran.

``NodeRollouts`` lives in an engine on a node: a copy of the policy bundle (checked like every
bundle of the engine) with the adapter, updated in place when a new step's arrives.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import ray

from appliance.cluster.auth import ClusterError
from appliance.training.grpo import EpisodeRollouts, run_group

ADAPTER = "grpo"
POLICY_BACKEND = "qwen-transformers"


@dataclass
class RolloutSettings:
    bundle: str  # the policy bundle's name: the node must hold the same
    runtime_config: object  # TransformersVLMConfig; its model_dir is the training box's
    budget: object
    sampling: dict


def adapter_files(model) -> dict[str, bytes]:
    """The trainer's current adapter as peft writes it (config and weights)."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, selected_adapters=["default"])
        return {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}


class Engines(Protocol):
    """What the rollouts need of ``runner.ClusterRunner`` (which imports this module's node
    half inside its engines)."""

    def call(self, method: str, *args, episodes: int = 0) -> Future: ...


class ClusterRollouts(EpisodeRollouts):
    def __init__(self, *args, runner: Engines, bundle: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.runner = runner
        self.settings = RolloutSettings(bundle, self.runtime_config, self.budget, self.sampling)

    def run_groups(self, trainer, groups):
        version = int(trainer.state.global_step) + 1
        adapter = ray.put(adapter_files(trainer.model))
        calls = [self.runner.call("rollouts", adapter, version, example, specs, self.settings,
                                  episodes=len(specs)) for example, specs in groups]
        return [call.result() for call in calls]


class NodeRollouts:
    """The policy an engine on a node writes GRPO rollouts with."""

    def __init__(self, config, settings: RolloutSettings):
        from appliance.models.manifest import model_for
        from appliance.policies.vlm import VLMPolicy
        from appliance.vlm.transformers_runtime import QwenTransformersRuntime

        entry, folder = model_for(config.models_dir, "policy", POLICY_BACKEND)
        if entry.name != settings.bundle:
            raise ClusterError(f"the training box trains {settings.bundle}, this node's policy "
                               f"bundle is {entry.name}")
        self.runtime = QwenTransformersRuntime(replace(settings.runtime_config, model_dir=folder))
        self.policy = VLMPolicy(self.runtime, f"{POLICY_BACKEND} (GRPO rollout)", adapter=ADAPTER,
                                budget=settings.budget, sampling=settings.sampling)
        self.version: int | None = None

    def run(self, environment, adapter: dict[str, bytes], version: int, example, specs):
        if version != self.version:
            self._load(adapter, version)
        return run_group(environment, example, specs, self.policy)

    def _load(self, adapter: dict[str, bytes], version: int) -> None:
        if ADAPTER not in self.runtime.adapters:
            # peft attaches an adapter from a folder; the folder goes as soon as it is loaded, so
            # an engine that Ray kills (no atexit there) leaves nothing behind in /tmp.
            with tempfile.TemporaryDirectory(prefix="appliance-grpo-") as folder:
                for name, data in adapter.items():
                    (Path(folder) / name).write_bytes(data)
                self.runtime.load_adapter(Path(folder), name=ADAPTER)
        else:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load

            loaded = set_peft_model_state_dict(self.runtime.model,
                                               load(adapter["adapter_model.safetensors"]),
                                               adapter_name=ADAPTER)
            if loaded.unexpected_keys:  # they would silently keep the old weights
                raise ClusterError(f"the training box's adapter does not fit this node's model: "
                                   f"{loaded.unexpected_keys[:3]}")
            self.runtime.prefixes.clear()  # cached prompt states were computed with old weights
        self.version = version
