"""Defect masks from MetaUAS (one-prompt change segmentation) through onnxruntime.

The normal photo is the prompt and the edited photo the query. Both are resized to the model's
input size (256 for the published checkpoint, read from the graph) the way upstream resizes
(bilinear, corners aligned, no anti-aliasing), a whole batch of pairs runs as one
``session.run``, and the anomaly probability is brought back to the photo's size and
thresholded (0.5, as AnomalyAgent does).

The model proposes and the pixels dispose: the edit tools change nothing outside the defect, so
a mask pixel far from any visible change cannot be the defect and is dropped, and a model mask
that misses most of what changed is not trusted. In both cases, and when the model finds
nothing, the difference generator (``tools/mask_gen.py``) answers instead and the result's
``method`` says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from appliance.imaging import CHANGE_THRESHOLD, change_map, mask_iou
from appliance.tools.interfaces import MaskRequest, MaskResult
from appliance.tools.mask_gen.difference import DifferenceMaskGenerator
from appliance.tools.object_map import fill_holes

DEFAULT_THRESHOLD = 0.5
# A model mask must lie mostly on changed pixels (within SUPPORT_RADIUS of one) ...
MIN_PRECISION = 0.5
# ... and cover at least this share of the difference generator's mask.
MIN_RECALL = 0.25
# How far from a visible change a mask pixel may be, as a share of the image diagonal (the model
# works at 256 px, so its outline is a few photo pixels off on large photos).
SUPPORT_RADIUS = 0.01
MIN_SPECK_PIXELS = 6
MIN_COMPONENT_SHARE = 0.02


def onnx_providers(device: str | None = None) -> list[str]:
    """CUDA when onnxruntime-gpu is installed and not told otherwise, always CPU as the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class MetaUASMaskGenerator:
    """MaskGenerator running a MetaUAS ONNX graph, with the difference generator as fallback."""

    name = "metauas-onnx"

    def __init__(self, model_path: Path, threshold: float = DEFAULT_THRESHOLD,
                 device: str | None = None, max_batch: int = 16, threads: int | None = None,
                 min_precision: float = MIN_PRECISION, min_recall: float = MIN_RECALL):
        import onnxruntime as ort

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"MetaUAS ONNX model not found: {self.model_path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.model_path), options,
                                            providers=onnx_providers(device))
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        if set(inputs) != {"prompt", "query"}:
            raise ValueError(f"{self.model_path} is not a MetaUAS export (inputs {sorted(inputs)})")
        size = inputs["query"][-1]
        if not isinstance(size, int):
            raise ValueError(f"{self.model_path}: the spatial size must be fixed, got {size!r}")
        self.size = size
        self.threshold = threshold
        self.max_batch = max(1, max_batch)
        self.min_precision = min_precision
        self.min_recall = min_recall
        self.fallback = DifferenceMaskGenerator()

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def probabilities(self, normals: Sequence[np.ndarray], edited: Sequence[np.ndarray]) -> np.ndarray:
        """Anomaly probability (N, S, S) for each (normal, edited) pair, batched."""
        out = []
        for start in range(0, len(normals), self.max_batch):
            prompt = np.stack([self._tensor(i) for i in normals[start:start + self.max_batch]])
            query = np.stack([self._tensor(i) for i in edited[start:start + self.max_batch]])
            (anomaly,) = self.session.run(["anomaly"], {"prompt": prompt, "query": query})
            out.append(anomaly[:, 0])
        return np.concatenate(out) if out else np.zeros((0, self.size, self.size), np.float32)

    def generate_masks(self, requests: Sequence[MaskRequest]) -> list[MaskResult]:
        if not requests:
            return []
        probs = self.probabilities([r.normal for r in requests], [r.edited for r in requests])
        return [self._decide(request, prob) for request, prob in zip(requests, probs)]

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]

    # -- per request --------------------------------------------------------------------------

    def _tensor(self, image: np.ndarray) -> np.ndarray:
        resized = resize_like_upstream(image.astype(np.float32) / 255.0, self.size)
        return np.ascontiguousarray(resized.transpose(2, 0, 1))

    def _decide(self, request: MaskRequest, prob: np.ndarray) -> MaskResult:
        height, width = request.normal.shape[:2]
        full = cv2.resize(prob.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        proposed = clean_mask(full > self.threshold)
        changed = change_map(request.normal, request.edited) > CHANGE_THRESHOLD
        reference = self.fallback.generate_one(request)
        if not changed.any():
            return self._fall_back(reference, "no visible change")
        if not proposed.any():
            return self._fall_back(reference, "empty model mask")
        radius = max(2, int(round(SUPPORT_RADIUS * np.hypot(height, width))))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        support = cv2.dilate(changed.astype(np.uint8), kernel).astype(bool)
        if request.hint is not None:
            support &= cv2.dilate(np.asarray(request.hint, np.uint8), kernel).astype(bool)
        precision = float((proposed & support).sum() / proposed.sum())
        mask = clean_mask(proposed & support)
        recall = float((mask & reference.mask).sum() / max(reference.mask.sum(), 1))
        if precision < self.min_precision:
            return self._fall_back(reference, f"model mask off the change (precision {precision:.2f})")
        if reference.mask.any() and recall < self.min_recall:
            return self._fall_back(reference, f"model mask misses the change (recall {recall:.2f})")
        if not mask.any():
            return self._fall_back(reference, "empty after clipping to the change")
        return MaskResult(mask, mask_iou(mask, changed), self.threshold, "metauas")

    @staticmethod
    def _fall_back(reference: MaskResult, reason: str) -> MaskResult:
        return MaskResult(reference.mask, reference.confidence, reference.threshold,
                          f"{reference.method} (metauas fallback: {reason})")


def resize_like_upstream(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize to size x size with the corner pixels aligned and no anti-aliasing.

    That is what upstream feeds its network (``kornia.augmentation.Resize((S, S))`` in
    gaobb/MetaUAS app.py and utils/geometry.py; kornia 0.6.3 defaults to bilinear with
    ``align_corners=True``), so the model sees photos resampled the way it was evaluated.
    """
    height, width = image.shape[:2]
    ys, xs = np.linspace(0, height - 1, size), np.linspace(0, width - 1, size)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
    wy = (ys - y0).astype(np.float32).reshape(-1, 1, *([1] * (image.ndim - 2)))
    wx = (xs - x0).astype(np.float32).reshape(1, -1, *([1] * (image.ndim - 2)))
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def clean_mask(raw: np.ndarray) -> np.ndarray:
    """Close small gaps, drop specks, fill holes (the model's map is smooth but noisy at 0.5)."""
    if not raw.any():
        return raw.copy()
    closed = cv2.morphologyEx(raw.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    if count <= 1:
        return np.zeros(raw.shape, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    floor = max(MIN_SPECK_PIXELS, MIN_COMPONENT_SHARE * float(areas.max()))
    keep = np.flatnonzero(areas >= floor) + 1
    return fill_holes(np.isin(labels, keep))
