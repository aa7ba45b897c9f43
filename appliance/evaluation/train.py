"""Training the segmentation UNet on one generator's samples, and predicting anomaly maps.

The budget (epochs, batch, learning rate, width, crop, share of clean normals) is one
``TrainConfig`` shared by every generator of a run. Half of the training examples, drawn per
example and per epoch, are the clean normal the anomaly was made from (DRAEM trains its
segmentation network the same way), so the detector also learns what "nothing to report" looks
like. The draws come from the run's seed, so every generator gets the same normal/anomaly
pattern.

Training runs on half-size crops (an anomaly's crop always contains part of its defect) and
prediction on whole images: the network is fully convolutional, and a crop costs a quarter of
a whole image, so a CPU budget buys four times as many steps.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from appliance.evaluation.unet import SmallUNet, focal_loss


def available_cpus() -> int:
    """The CPUs this process may run on (a container or taskset can allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def best_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 16
    lr: float = 2e-3
    width: int = 16
    normal_fraction: float = 0.5
    crop_fraction: float = 0.5  # training crop side / image side; 1 trains on whole images
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    # None: bfloat16 autocast where the hardware does it natively (CUDA, AVX512-BF16 CPUs).
    bf16: bool | None = None

    def use_bf16(self) -> bool:
        if self.bf16 is not None:
            return self.bf16
        if self.device.startswith("cuda"):
            return True
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())

    def as_dict(self) -> dict:
        return asdict(self) | {"bf16": self.use_bf16()}


@dataclass
class TrainLog:
    seconds: float = 0.0
    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)


def set_determinism(seed: int, threads: int, device: str) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))
    if device.startswith("cuda"):
        # cuBLAS needs a fixed workspace for reproducible matrix products.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        # Warn rather than fail: an op without a deterministic CUDA kernel should not kill a run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN to expose reads of uninitialised
    # memory; our ops never do that, and the fills cost a quarter of a small training step.
    torch.utils.deterministic.fill_uninitialized_memory = False


def to_batch(images: Sequence[np.ndarray], device: str) -> torch.Tensor:
    array = np.stack(images).astype(np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    return tensor.to(device).contiguous(memory_format=torch.channels_last)


def _autocast(config: TrainConfig):
    device_type = "cuda" if config.device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.use_bf16())


def crop_side(size: int, fraction: float) -> int:
    """The training crop: ``fraction`` of the side, rounded down to the UNet's multiple of 16."""
    side = int(size * fraction) // 16 * 16
    return side if 16 <= side <= size else size


def _crop_origin(mask: np.ndarray | None, size: int, crop: int, draws: torch.Generator
                 ) -> tuple[int, int]:
    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=draws))

    if mask is None or not mask.any():
        return draw(size - crop + 1), draw(size - crop + 1)
    # A window around a random defect pixel, at a random offset inside the window.
    ys, xs = np.nonzero(mask)
    pick = draw(len(ys))
    y0 = int(np.clip(ys[pick] - draw(crop), 0, size - crop))
    x0 = int(np.clip(xs[pick] - draw(crop), 0, size - crop))
    return y0, x0


def train_unet(anomalies: Sequence[np.ndarray], masks: Sequence[np.ndarray],
               normals: Sequence[np.ndarray], config: TrainConfig, progress: bool = False,
               label: str = "UNet") -> tuple[SmallUNet, TrainLog]:
    """``anomalies[i]`` was made from ``normals[i]``; ``masks[i]`` marks its defect.

    ``progress``: a bar over the optimizer steps on stderr, named ``label``, with the epoch's
    running loss and tqdm's time estimate (tqdm leaves it off where stderr is no tty).
    """
    if not (len(anomalies) == len(masks) == len(normals)) or not anomalies:
        raise ValueError("need one mask and one source normal per anomaly, and at least one")
    set_determinism(config.seed, config.threads, config.device)
    model = SmallUNet(width=config.width).to(config.device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps_per_epoch = -(-len(anomalies) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                   total_steps=total_steps, pct_start=0.15)
    draws = torch.Generator().manual_seed(config.seed)
    empty = np.zeros_like(masks[0], dtype=bool)
    size = masks[0].shape[0]
    crop = crop_side(size, config.crop_fraction)
    log = TrainLog()
    bar = tqdm(total=total_steps, desc=f"{label} training", unit="step",
               disable=None if progress else True, leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(anomalies), generator=draws).tolist()
        use_normal = (torch.rand(len(anomalies), generator=draws) < config.normal_fraction).tolist()
        losses = []
        for first in range(0, len(order), config.batch_size):
            chosen = order[first:first + config.batch_size]
            images, targets = [], []
            for i in chosen:
                image, target = (normals[i], empty) if use_normal[i] else (anomalies[i], masks[i])
                y0, x0 = _crop_origin(None if use_normal[i] else target, size, crop, draws)
                images.append(image[y0:y0 + crop, x0:x0 + crop])
                targets.append(target[y0:y0 + crop, x0:x0 + crop])
            x = to_batch(images, config.device)
            y = torch.from_numpy(np.stack(targets).astype(np.float32))[:, None].to(config.device)
            with _autocast(config):
                logits = model(x)
            loss = focal_loss(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            log.steps += 1
            bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{np.mean(losses):.4f}",
                            refresh=False)
            bar.update(1)
        log.epoch_losses.append(float(np.mean(losses)))
    bar.close()
    log.seconds = time.perf_counter() - start
    model.eval()
    return model, log


@torch.no_grad()
def predict(model: SmallUNet, images: Sequence[np.ndarray], config: TrainConfig,
            batch_size: int = 32) -> np.ndarray:
    """Anomaly probability maps, float32 (N, H, W) in [0, 1]."""
    model.eval()
    maps = []
    for first in range(0, len(images), batch_size):
        x = to_batch(images[first:first + batch_size], config.device)
        with _autocast(config):
            logits = model(x)
        maps.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy())
    return np.concatenate(maps).astype(np.float32)
