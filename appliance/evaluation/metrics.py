"""Detection metrics: AUROC, average precision and F1-max, from one sort of the scores.

They follow scikit-learn's definitions exactly (the tests compare against it where it is
installed, and against hand-computed values everywhere): ties in the score form one threshold,
AUROC is the trapezoid area under the ROC curve, AP is the step-wise sum
``sum_k (R_k - R_{k-1}) P_k`` without interpolation, and F1-max is the best ``2PR / (P + R)``
over all thresholds. A pixel evaluation has tens of millions of scores, so the curve is built
once and all three numbers are read from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Curve:
    """Cumulative counts at each distinct threshold, from the highest score down."""

    tps: np.ndarray  # true positives at score >= threshold
    fps: np.ndarray  # false positives at score >= threshold
    thresholds: np.ndarray

    @property
    def positives(self) -> int:
        return int(self.tps[-1]) if self.tps.size else 0

    @property
    def negatives(self) -> int:
        return int(self.fps[-1]) if self.fps.size else 0

    def precision(self) -> np.ndarray:
        return self.tps / np.maximum(self.tps + self.fps, 1)

    def recall(self) -> np.ndarray:
        return self.tps / max(self.positives, 1)


@dataclass(frozen=True)
class DetectionScores:
    auroc: float
    ap: float
    f1_max: float
    f1_threshold: float  # the score threshold where F1 peaks
    positives: int
    negatives: int

    def as_dict(self) -> dict:
        return {"auroc": self.auroc, "ap": self.ap, "f1_max": self.f1_max,
                "f1_threshold": self.f1_threshold, "positives": self.positives,
                "negatives": self.negatives}


def binary_curve(labels: np.ndarray, scores: np.ndarray) -> Curve:
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.shape[0]} labels for {scores.shape[0]} scores")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    # Sorting positives and negatives apart and counting with searchsorted is exact and several
    # times faster than one argsort of tens of millions of pixel scores.
    positives = np.sort(scores[labels])
    negatives = np.sort(scores[~labels])
    # Every distinct score is one threshold (a tie is one step of the curve), highest first.
    thresholds = np.unique(np.concatenate([positives, negatives]))[::-1]
    tps = positives.size - np.searchsorted(positives, thresholds, side="left")
    fps = negatives.size - np.searchsorted(negatives, thresholds, side="left")
    return Curve(tps=tps.astype(np.int64), fps=fps.astype(np.int64), thresholds=thresholds)


def auroc_from_curve(curve: Curve) -> float:
    if curve.positives == 0 or curve.negatives == 0:
        return float("nan")
    tpr = np.r_[0.0, curve.tps / curve.positives]
    fpr = np.r_[0.0, curve.fps / curve.negatives]
    return float(np.trapezoid(tpr, fpr))


def ap_from_curve(curve: Curve) -> float:
    if curve.positives == 0:
        return float("nan")
    recall = np.r_[0.0, curve.recall()]
    return float(np.sum(np.diff(recall) * curve.precision()))


def f1_from_curve(curve: Curve) -> tuple[float, float]:
    if curve.positives == 0:
        return float("nan"), float("nan")
    precision, recall = curve.precision(), curve.recall()
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                   where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(curve.thresholds[best])


def detection_scores(labels: np.ndarray, scores: np.ndarray) -> DetectionScores:
    curve = binary_curve(labels, scores)
    f1, threshold = f1_from_curve(curve)
    return DetectionScores(auroc=auroc_from_curve(curve), ap=ap_from_curve(curve), f1_max=f1,
                           f1_threshold=threshold, positives=curve.positives,
                           negatives=curve.negatives)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return auroc_from_curve(binary_curve(labels, scores))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    return ap_from_curve(binary_curve(labels, scores))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    return f1_from_curve(binary_curve(labels, scores))[0]


def binned_counts(labels: np.ndarray, scores: np.ndarray, bins: int = 2048
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per image (the first axis), how many positive and how many negative pixels fall in each
    score bin, low scores first: two (N, B) arrays. The bins lie at quantiles of the positive
    scores (and, four times coarser, of the negative ones), so few thresholds that matter are
    merged. Summing rows over any multiset of images gives that multiset's curve at the bin
    edges without sorting again, which is what resampling the images (a bootstrap) needs."""
    n = scores.shape[0]
    flat = np.asarray(scores, dtype=np.float64).reshape(n, -1)
    positive = np.asarray(labels).reshape(n, -1).astype(bool)
    # AP is the mean precision at the positives, so they get most of the edges: where a
    # positive shares a bin with negatives scored above it, AP comes out low.
    inner = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edges = np.unique(np.concatenate(
        [np.quantile(part, inner[::step])
         for part, step in ((flat[positive], 1), (flat[~positive], 4)) if part.size]))
    width = edges.size + 1
    cell = np.searchsorted(edges, flat, side="right") + width * np.arange(n)[:, None]
    return (np.bincount(cell[positive], minlength=n * width).reshape(n, width),
            np.bincount(cell[~positive], minlength=n * width).reshape(n, width))


def binned_average_precision(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """AP from counts per score bin (the last axis, low scores first, as ``binned_counts``);
    leading axes are separate curves. A bin is one threshold, so ties within it count as one
    step, as ``average_precision`` counts equal scores. NaN where there is no positive."""
    tps = np.cumsum(positives[..., ::-1], axis=-1)
    fps = np.cumsum(negatives[..., ::-1], axis=-1)
    total = tps[..., -1:]
    precision = tps / np.maximum(tps + fps, 1)
    recall_steps = np.diff(tps, axis=-1, prepend=0) / np.maximum(total, 1)
    return np.where(total[..., 0] > 0, np.sum(recall_steps * precision, axis=-1), np.nan)


def pr_points(labels: np.ndarray, scores: np.ndarray, max_points: int = 400
              ) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) for plotting, thinned to at most ``max_points`` points."""
    curve = binary_curve(labels, scores)
    recall, precision = np.r_[0.0, curve.recall()], np.r_[1.0, curve.precision()]
    if recall.size > max_points:
        keep = np.unique(np.linspace(0, recall.size - 1, max_points).round().astype(int))
        recall, precision = recall[keep], precision[keep]
    return recall, precision


def image_score(anomaly_map: np.ndarray, window: int) -> float:
    """An image's anomaly score: the maximum of its locally averaged map (as DRAEM does), so a
    single hot pixel counts less than a coherent defect-sized blob."""
    window = max(1, int(window))
    return float(ndimage.uniform_filter(anomaly_map.astype(np.float32), size=window,
                                        mode="nearest").max())
