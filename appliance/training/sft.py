"""Stage 2 of retraining: LoRA SFT of the policy on the expert trajectories.

TRL's ``SFTTrainer`` with a peft LoRA on the language model only: the vision tower stays frozen,
as in the paper. The loss is on the assistant turns alone. The collator is ours for one reason:
it renders each conversation exactly as the runtime does at inference (the checkpoint's own
template, the five tools through ``tools=``, the same processor and pixel limits), which TRL's
vision collator cannot (it drops ``tools=`` and needs ``{% generation %}`` markers that Qwen's
published templates do not have). On a GPU the base loads in NF4 (QLoRA); on CPU in fp32.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from appliance.agent.schemas import TOOL_SCHEMAS
from appliance.dataset.trajectory import load_trajectory
from appliance.vlm.chat import to_chat_request
from appliance.vlm.transformers_runtime import NF4_SKIP_MODULES, load_processor, render_chat

# Attention and MLP projections of the language model; the vision tower's blocks have other
# names (qkv, proj, linear_fc1/2), so a LoRA here never touches the vision tower.
LANGUAGE_LORA_TARGETS = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|"
                         r"down_proj)")
IGNORE_INDEX = -100


@dataclass
class SFTSettings:
    steps: int = 200
    learning_rate: float = 2e-4  # LoRA's usual rate; the paper's 1e-5 is for full fine-tuning
    lora_rank: int = 16
    lora_alpha: int = 32
    batch_size: int = 1
    gradient_accumulation: int = 1
    save_every: int = 25  # checkpoint steps, for --resume after a crash
    seed: int = 0
    device: str = "cpu"  # "cuda" trains in bf16 on an NF4 base (QLoRA)
    # Modules trained in full beside the LoRA (peft's modules_to_save), from the model bundle's
    # settings.training: a random-weight test model needs its output head trained, a real
    # checkpoint does not.
    modules_to_save: tuple[str, ...] = ()


def assistant_labels(input_ids, tokenizer):
    """Labels that train on assistant turns only: the tokens after ``<|im_start|>assistant\\n``
    up to and including that turn's ``<|im_end|>``; everything else is ignored."""
    import torch

    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, ids in enumerate(input_ids.tolist()):
        i = 0
        while i < len(ids):
            if ids[i] == start and ids[i + 1:i + 1 + len(header)] == header:
                first = i + 1 + len(header)
                last = first
                while last < len(ids) and ids[last] != end:
                    last += 1
                labels[row, first:last + 1] = input_ids[row, first:last + 1]
                i = last
            i += 1
    return labels


class TrajectoryCollator:
    """Rows ``{"trajectory": folder}`` -> model inputs with assistant-only labels."""

    def __init__(self, processor, tools: list[dict] | None = TOOL_SCHEMAS) -> None:
        self.processor = processor
        self.tools = tools

    def __call__(self, rows: Sequence[dict]) -> dict:
        texts, pictures = [], []
        for row in rows:
            messages, images = load_trajectory(Path(row["trajectory"]))
            request = to_chat_request(messages, images, tools=self.tools)
            texts.append(render_chat(self.processor, request, generation_prompt=False))
            pictures += request.images
        batch = self.processor(text=texts, images=pictures or None, padding=True,
                               return_tensors="pt")
        batch["labels"] = assistant_labels(batch["input_ids"], self.processor.tokenizer)
        return dict(batch)


def load_base_model(model_dir: Path, device: str):
    """The policy's base weights for training: NF4 with bf16 compute on CUDA, fp32 on CPU."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    if device == "cuda":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        model = Qwen3VLForConditionalGeneration.from_pretrained(
            model_dir, local_files_only=True, dtype=torch.bfloat16, device_map={"": 0},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=list(NF4_SKIP_MODULES)))
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return Qwen3VLForConditionalGeneration.from_pretrained(model_dir, local_files_only=True,
                                                           dtype=torch.float32)


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete TRL/transformers checkpoint: a ``kill -9`` while one was being
    written leaves a folder without ``trainer_state.json`` (written last), which is skipped."""
    folder = Path(folder)
    complete = [d for d in folder.glob("checkpoint-*")
                if d.name.split("-")[-1].isdigit() and (d / "trainer_state.json").is_file()] \
        if folder.is_dir() else []
    return str(max(complete, key=lambda d: int(d.name.split("-")[-1]))) if complete else None


@dataclass
class SFTResult:
    adapter_dir: Path
    losses: list[float]  # the training loss at every logged step
    runtime_seconds: float = 0.0  # seconds per step, by the trainer's clock

    @property
    def loss_drop(self) -> float:
        """First logged loss over the mean of the last few: how much the imitation was learned."""
        if len(self.losses) < 2:
            return 1.0
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return self.losses[0] / max(sum(tail) / len(tail), 1e-9)


def train_sft(model_dir: Path, trajectories: Sequence[Path], out_dir: Path,
              settings: SFTSettings, min_pixels: int | None = None,
              max_pixels: int | None = None) -> SFTResult:
    """Train a LoRA adapter; checkpoints in ``out_dir/checkpoints`` (resumed from when there),
    the adapter written to ``out_dir/adapter``."""
    import os

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if not trajectories:
        raise ValueError("no trajectories to train on")
    out_dir = Path(out_dir)
    processor = load_processor(model_dir, min_pixels, max_pixels)
    processor.tokenizer.padding_side = "right"  # training: pad after the conversation
    cuda = settings.device == "cuda"
    args = SFTConfig(
        output_dir=str(out_dir / "checkpoints"), max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        learning_rate=settings.learning_rate, lr_scheduler_type="cosine", warmup_steps=
        max(1, settings.steps // 20), weight_decay=0.0, logging_steps=1,
        save_strategy="steps", save_steps=settings.save_every, save_total_limit=2,
        seed=settings.seed, data_seed=settings.seed, use_cpu=not cuda, bf16=cuda,
        gradient_checkpointing=cuda, report_to="none", remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
        dataloader_num_workers=0, disable_tqdm=False)
    lora = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                      target_modules=LANGUAGE_LORA_TARGETS, task_type="CAUSAL_LM",
                      modules_to_save=list(settings.modules_to_save) or None)
    dataset = Dataset.from_list([{"trajectory": str(p)} for p in trajectories])
    trainer = SFTTrainer(model=load_base_model(model_dir, settings.device), args=args,
                         train_dataset=dataset, data_collator=TrajectoryCollator(processor),
                         processing_class=processor.tokenizer, peft_config=lora)
    adapter_dir, losses = train_and_save(trainer, out_dir, "loss", "losses.json")
    return SFTResult(adapter_dir, losses, step_seconds(trainer))


def train_and_save(trainer, out_dir: Path, metric: str, log_name: str) -> tuple[Path, list[float]]:
    """Train (from the newest complete checkpoint in ``out_dir/checkpoints`` when there is one),
    write the adapter to ``out_dir/adapter`` atomically and the logged ``metric`` of every step
    to ``out_dir/log_name``; returns the adapter folder and those values."""
    trainer.train(resume_from_checkpoint=last_checkpoint(out_dir / "checkpoints"))
    values = [entry[metric] for entry in trainer.state.log_history
              if metric in entry and math.isfinite(entry[metric])]
    adapter_dir = out_dir / "adapter"
    save_adapter(trainer.model, adapter_dir)
    (out_dir / log_name).write_text(json.dumps(values))
    return adapter_dir, values


def step_seconds(trainer) -> float:
    """Seconds per optimizer step by the trainer's own clock (meaningful for a run that was not
    resumed: a resumed run's clock covers only its own steps)."""
    summary = next((e for e in reversed(trainer.state.log_history) if "train_runtime" in e), {})
    steps = max(1, trainer.state.global_step)
    return float(summary.get("train_runtime", 0.0)) / steps


def save_adapter(model, adapter_dir: Path) -> None:
    """Write a peft adapter folder atomically: a crash leaves the old one or the new one."""
    import shutil
    import tempfile

    adapter_dir = Path(adapter_dir)
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}-", dir=adapter_dir.parent))
    model.save_pretrained(scratch)
    old = adapter_dir.with_name(f".{adapter_dir.name}.old")
    if adapter_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        adapter_dir.rename(old)
    scratch.rename(adapter_dir)
    shutil.rmtree(old, ignore_errors=True)
