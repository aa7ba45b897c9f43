"""Stage 3 of retraining: LoRA GRPO with rollouts through the one environment.

TRL's ``GRPOTrainer`` does the optimisation: group-normalised advantages over G rollouts per
task, the clipped objective, the KL to the reference and checkpoints. A rollout here is a whole
episode of ``AgentEnvironment``, written by the policy being trained: TRL's own multi-turn paths
cannot do that (``rollout_func`` has no room for the images our tool answers carry inside the
completion, ``environment_factory`` replaces our loop by TRL's). ``EpisodeGRPOTrainer`` is the
smallest adapter: it overrides ``_generate`` (pinned TRL, see constraints.txt) to run the episodes
and hand TRL each one as prompt ids (system + task + normal photo), completion ids (every later
turn), a mask that trains on the policy's own tokens only, and all the episode's images.

The reference is the SFT adapter: the policy starts as ``PeftModel`` of the SFT adapter and TRL
copies it as its frozen "ref" adapter when ``beta`` > 0. Rewards are the batched functions of
``rewards.py``. Tokens a budget forced (a closed reasoning block) are trained as if sampled: a
known approximation. Groups whose rollouts all scored the same are dropped from the loss, as the
paper does (``drop_tied_groups``); TRL alone would keep them in its normaliser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from appliance.agent.environment import AgentEnvironment
from appliance.agent.episode import EpisodeResult, EpisodeSpec
from appliance.agent.schemas import TOOL_SCHEMAS
from appliance.training.rewards import behaviour_reward, reflection_reward, task_reward
from appliance.training.sft import assistant_labels, step_seconds, train_and_save
from appliance.training.trajectories import DefectExample, task_environment
from appliance.vlm.budget import Budget
from appliance.vlm.chat import ChatRequest, to_chat_request
from appliance.vlm.transformers_runtime import render_chat

# TRL computes the log-probabilities at the sampling temperature alone: sample without top-p/k.
ROLLOUT_SAMPLING = {"do_sample": True, "top_p": 1.0, "top_k": 0, "presence_penalty": 0.0}
IGNORE_INDEX = -100


@dataclass
class GRPOSettings:
    steps: int = 20
    generations: int = 8  # G rollouts per task (the paper's 8)
    tasks_per_step: int = 1
    learning_rate: float = 2e-4
    beta: float = 0.04  # KL weight to the SFT adapter
    # The paper samples rollouts at 1.0. A model whose SFT left it uncertain (the tiny test model)
    # writes no valid episode at 1.0, and a group where every rollout scores the same teaches
    # nothing: lower it there.
    temperature: float = 1.0
    save_every: int = 5
    seed: int = 0
    device: str = "cpu"


@dataclass
class EpisodeTokens:
    prompt_ids: list[int]
    completion_ids: list[int]
    mask: list[int]  # 1: written by the policy (trained), 0: tool answers and template text
    images: list


def episode_tokens(processor, result: EpisodeResult) -> EpisodeTokens:
    """An episode as the model read and wrote it, split where the policy's first turn begins."""
    request = to_chat_request(result.messages, result.images, tools=TOOL_SCHEMAS)
    start = ChatRequest(request.messages[:2], request.images[:1], tools=request.tools)
    prompt_text = render_chat(processor, start)
    full_text = render_chat(processor, request, generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the conversation's start differently from "
                         "the prompt the policy was given")
    prompt_ids = processor(text=[prompt_text], images=start.images, return_tensors="pt")["input_ids"]
    full = processor(text=[full_text], images=request.images, return_tensors="pt")["input_ids"]
    labels = assistant_labels(full, processor.tokenizer)[0].tolist()
    ids = full[0].tolist()
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    end = trained[-1] + 1 if trained else len(prompt_ids[0])  # stop at the last <|im_end|>
    begin = prompt_ids.shape[1]
    if ids[:begin] != prompt_ids[0].tolist():
        raise ValueError("the prompt's tokens are not a prefix of the episode's tokens")
    return EpisodeTokens(ids[:begin], ids[begin:end],
                         [int(labels[i] != IGNORE_INDEX) for i in range(begin, end)],
                         list(request.images))


def reward_functions(config, real_areas: dict[str, float]):
    """TRL reward functions (named, batched) over the episodes handed in ``episode``."""

    def task(prompts, completions, episode, **_):
        return task_reward(episode, real_areas)

    def reflection(prompts, completions, episode, **_):
        return reflection_reward(episode, config.max_image_gen)

    def behaviour(prompts, completions, episode, **_):
        return behaviour_reward(episode, config.knowledge_threshold)

    return [task, reflection, behaviour]


class EpisodeRollouts:
    """Runs the G rollouts of a batch's tasks as episodes of the policy being trained."""

    def __init__(self, environment: AgentEnvironment, tasks: Sequence[DefectExample],
                 category: str, runtime_config, budget: Budget, seed: int,
                 temperature: float = 1.0) -> None:
        self.environment = environment
        self.temperature = temperature
        self._runtime = None
        self.tasks = list(tasks)
        self.category = category
        self.runtime_config = runtime_config
        self.budget = budget
        self.seed = seed

    def __call__(self, trainer, inputs: Sequence[dict]) -> tuple:
        runtime = self.runtime(trainer)
        # Seeds from the optimizer step being made, not from a count of calls in this process:
        # a run resumed from a checkpoint then draws the episodes the uninterrupted run drew.
        step = int(trainer.state.global_step) + 1
        # The G rollouts of one task run together, in that task's environment.
        groups: dict[int, list[tuple[int, EpisodeSpec]]] = {}
        for k, row in enumerate(inputs):
            task = self.tasks[int(row["task"])]
            seed = int(np.random.SeedSequence([self.seed, step, k, 0x6290]).generate_state(1)[0])
            groups.setdefault(int(row["task"]), []).append((k, EpisodeSpec(
                image=task.normal, category=self.category, defect=task.defect.defect, seed=seed,
                source=task.defect.source)))
        results: list = [None] * len(inputs)
        ran = self.run_groups(trainer, [(self.tasks[index], [spec for _, spec in group])
                                        for index, group in groups.items()])
        for group, group_results in zip(groups.values(), ran, strict=True):
            for (k, _), result in zip(group, group_results, strict=True):
                results[k] = result
        tokens = [episode_tokens(runtime.processor, r) for r in results]
        texts = [[{"role": "assistant", "content": runtime.tokenizer.decode(t.completion_ids)}]
                 for t in tokens]
        images = [t.images for t in tokens]
        # Images are passed as "tool images" too: that sends TRL's forward pass down its path for
        # pictures inside the completion, where it finds every picture by its pad tokens.
        return ([t.prompt_ids for t in tokens], [t.completion_ids for t in tokens],
                [t.mask for t in tokens], texts, None, {"episode": results}, images, images)

    def runtime(self, trainer):
        """The runtime over the trainer's own weights (the processor loads from disk, once)."""
        from appliance.vlm.transformers_runtime import QwenTransformersRuntime

        if self._runtime is None or self._runtime.model is not trainer.model:
            self._runtime = QwenTransformersRuntime(self.runtime_config, model=trainer.model)
        return self._runtime

    @property
    def sampling(self) -> dict:
        return {**ROLLOUT_SAMPLING, "temperature": self.temperature}

    def policy(self, runtime):
        from appliance.policies.vlm import VLMPolicy

        return VLMPolicy(runtime, "qwen-transformers (GRPO rollout)", budget=self.budget,
                         sampling=self.sampling)

    def run_groups(self, trainer, groups: Sequence[tuple[DefectExample, list[EpisodeSpec]]]
                   ) -> list[list[EpisodeResult]]:
        """Each task's rollouts, here, with the trainer's current weights."""
        policy = self.policy(self.runtime(trainer))
        was_training = trainer.model.training
        trainer.model.eval()
        try:
            return [run_group(self.environment, example, specs, policy)
                    for example, specs in groups]
        finally:
            trainer.model.train(was_training)


def run_group(environment: AgentEnvironment, example: DefectExample, specs: list[EpisodeSpec],
              policy) -> list[EpisodeResult]:
    """One task's G rollouts, together, in that task's environment."""
    return task_environment(environment, example).run(specs, policy)


def freeze_full_modules(model) -> None:
    """Whole modules SFT trained beside the LoRA (a test model's output head and embeddings)
    stay as SFT left them: at a policy-gradient step size they would swamp the LoRA."""
    for name, parameter in model.named_parameters():
        if "modules_to_save" in name:
            parameter.requires_grad_(False)


# Largest |advantage| of a group that counts as tied. With equal rewards TRL's float32 mean is off
# by an ulp, leaving std ~1e-7 and advantages up to ~2.5e-3 after its /(std + 1e-4); a group whose
# rewards really differ by s has advantages near s / (s + 1e-4), above 0.09 for any s above 1e-5.
TIED_ADVANTAGE = 0.05


def drop_tied_groups(output: dict, group_size: int) -> tuple[dict, float]:
    """Take groups whose rollouts all scored the same out of the loss, as the paper does; returns
    the output and the share of groups that tied.

    Their advantages are zero (to rounding), so they add no policy gradient; but TRL still counts
    their tokens in the loss normaliser, diluting the groups that do teach, and keeps their KL
    term. Here their tokens leave the loss mask (``tool_mask``, where our per-token mask travels)
    and the normaliser is recounted. Needs whole groups on this process: one device, as
    retraining runs."""
    advantages = output["advantages"]
    tied = advantages.abs().view(-1, group_size).amax(dim=1) < TIED_ADVANTAGE
    share = float(tied.float().mean())
    if not bool(tied.any()):
        return output, share
    keep = (~tied).repeat_interleave(group_size).unsqueeze(1)
    output["tool_mask"] = output["tool_mask"] * keep.to(output["tool_mask"].dtype)
    output["num_items_in_batch"] = (output["completion_mask"] * output["tool_mask"]).sum()
    return output, share


def _trainer_class():
    from trl import GRPOTrainer

    class EpisodeGRPOTrainer(GRPOTrainer):
        """GRPO whose rollouts are our episodes (see the module docstring)."""

        def __init__(self, *args, rollouts: EpisodeRollouts, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.rollouts = rollouts
            # Set after TRL's checks (it would look for callables): truthy tools route the forward
            # pass through TRL's path for completion images; the schemas are what we render with.
            self.tools = list(TOOL_SCHEMAS)

        def _generate_and_score_completions(self, inputs):
            self._rollout_inputs = inputs  # _generate only receives the prompts
            output = super()._generate_and_score_completions(inputs)
            output, tied = drop_tied_groups(output, self.num_generations)
            # Logged with the step (and kept in checkpoints' trainer state, so a resumed run
            # counts the steps before its crash too).
            self._metrics["train"]["frac_tied_groups"].append(tied)
            return output

        def _generate(self, prompts):
            return self.rollouts(self, self._rollout_inputs)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # Loading the checkpoint's adapter makes its modules_to_save trainable again; the
            # optimizer state saved with it knows only the LoRA's parameters.
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            freeze_full_modules(model or self.model)

    return EpisodeGRPOTrainer


@dataclass
class GRPOResult:
    adapter_dir: Path
    rewards: list[float]  # mean reward of each step's rollouts
    runtime_seconds: float = 0.0  # the trainer's own time per step
    # Steps where every task's rollouts scored alike: no advantage, so the step's loss was zero
    # (the optimizer's momentum from earlier steps may still move the weights).
    tied_steps: int = 0

    @property
    def reward_gain(self) -> float:
        if len(self.rewards) < 2:
            return 0.0
        half = max(1, len(self.rewards) // 2)
        return float(np.mean(self.rewards[-half:]) - np.mean(self.rewards[:half]))


def train_grpo(model_dir: Path, sft_adapter: Path, rollouts: EpisodeRollouts, out_dir: Path,
               settings: GRPOSettings, config, real_areas: dict[str, float]) -> GRPOResult:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from trl import GRPOConfig

    from appliance.training.sft import load_base_model
    from appliance.vlm.transformers_runtime import load_processor

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    out_dir = Path(out_dir)
    runtime_config = rollouts.runtime_config
    processor = load_processor(model_dir, runtime_config.min_pixels, runtime_config.max_pixels)
    model = PeftModel.from_pretrained(load_base_model(model_dir, settings.device), str(sft_adapter),
                                      is_trainable=True)
    freeze_full_modules(model)
    cuda = settings.device == "cuda"
    batch = settings.generations * settings.tasks_per_step
    args = GRPOConfig(
        output_dir=str(out_dir / "checkpoints"), max_steps=settings.steps,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=settings.generations, learning_rate=settings.learning_rate,
        beta=settings.beta, temperature=rollouts.temperature, top_p=1.0,
        num_iterations=1, loss_type="dapo", scale_rewards="group",
        reward_weights=[1.0, 0.5, 0.5], max_completion_length=None,
        logging_steps=1, save_strategy="steps", save_steps=settings.save_every,
        save_total_limit=2, seed=settings.seed, data_seed=settings.seed, use_cpu=not cuda,
        bf16=cuda, gradient_checkpointing=cuda, disable_dropout=True, report_to="none",
        remove_unused_columns=False, use_vllm=False, dataloader_num_workers=0)
    tasks = len(rollouts.tasks)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"task {i}"}],
                                  "task": i} for i in range(tasks)])
    trainer = _trainer_class()(
        model=model, processing_class=processor, args=args, train_dataset=dataset,
        reward_funcs=reward_functions(config, real_areas), rollouts=rollouts)
    with torch.random.fork_rng():
        adapter_dir, rewards = train_and_save(trainer, out_dir, "reward", "rewards.json")
    tied = sum(1 for entry in trainer.state.log_history
               if (entry.get("frac_tied_groups") or 0.0) >= 1.0)
    return GRPOResult(adapter_dir, rewards, step_seconds(trainer), tied)
