"""How much of a pixel-AP comparison the choice of test photos alone could make: a bootstrap.

A detector's pixel AP on a few dozen real defect photos depends a great deal on which photos
they are. Drawing the photos again with replacement, each draw as many as there were, and
recomputing the comparison from the detector's scores shows the spread that choice brings
(nothing is trained again: the scores of each photo are kept as counts per score bin,
``metrics.binned_counts``). Photos are drawn within their group (normal or defective), so every
resample tests the same mix.

Where a generator's detector was trained several times (detector seeds), a resample also draws
those trainings again with replacement: one training is a noisy measure of what a generator
teaches (on the magnetic tiles, changing one pixel of one of 300 training samples by one grey
level moved one run's pixel AP by a fifth), and the spread must show it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from appliance.evaluation.metrics import binned_average_precision

RESAMPLES = 2000

Counts = tuple[np.ndarray, np.ndarray]  # positives, negatives per photo and score bin
# One generator's counts in one run: one Counts per detector trained on its samples.
Trainings = Sequence[Counts]


def resample_weights(groups: Sequence[int], resamples: int, rng: np.random.Generator
                     ) -> np.ndarray:
    """(resamples, photos): how often each photo is drawn in each resample. ``groups`` gives
    each photo's group; a group keeps its size in every resample."""
    groups = np.asarray(groups)
    weights = np.zeros((resamples, groups.size))
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        drawn = rng.integers(0, members.size, (resamples, members.size))
        for row, picks in enumerate(drawn):
            weights[row, members] = np.bincount(picks, minlength=members.size)
    return weights


def resampled_ap(counts: Counts, weights: np.ndarray) -> np.ndarray:
    """Pixel AP in each resample (one per row of ``weights``); NaN where a resample has no
    defect pixel."""
    positives, negatives = counts
    return binned_average_precision(weights @ positives, weights @ negatives)


def training_draws(trainings: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, trainings): which trainings each resample averages, drawn with replacement.
    One training has nothing to draw (and takes nothing from ``rng``)."""
    if trainings == 1:
        return np.zeros((resamples, 1), dtype=int)
    return rng.integers(0, trainings, (resamples, trainings))


def resampled_mean_ap(trainings: Trainings, weights: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Per resample (row of ``weights`` and ``draws``), the mean pixel AP of the trainings that
    ``draws`` picks, on the photos that ``weights`` picks."""
    per_training = np.stack([resampled_ap(c, weights) for c in trainings], axis=1)
    return np.take_along_axis(per_training, draws, axis=1).mean(axis=1)


def interval(values: np.ndarray, share: float = 0.9) -> list[float | None]:
    """The range holding the middle ``share`` of the defined values; None where none is."""
    values = values[np.isfinite(values)]
    if not values.size:
        return [None, None]
    tail = 50 * (1 - share)
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def ratio_resamples(runs: Sequence[tuple[dict[str, Trainings], Sequence[int]]], ours: str,
                    baseline: str, seed: int, resamples: int = RESAMPLES) -> np.ndarray:
    """``ours``' pixel AP over ``baseline``'s in each resample, each the mean over ``runs``
    (one per evaluation seed, ``(trainings by generator, photo groups)``): every run's test
    photos are drawn again within that run, the same draws for both generators; each
    generator's trainings are drawn again on their own (trainings on different samples share
    nothing but a seed). The baseline stays the one that was best as measured (choosing the
    best again in every resample would favour the baselines by their luck)."""
    rng = np.random.default_rng([seed, 0xE7A1])
    total = {ours: np.zeros(resamples), baseline: np.zeros(resamples)}
    for counts, groups in runs:
        weights = resample_weights(groups, resamples, rng)
        for name in total:
            draws = training_draws(len(counts[name]), resamples, rng)
            total[name] += resampled_mean_ap(counts[name], weights, draws)
    with np.errstate(divide="ignore", invalid="ignore"):
        return total[ours] / total[baseline]  # a ratio of sums is the ratio of the means


COUNTS_FILE = "pixel_counts.npz"


def save_counts(folder, counts: dict[str, Trainings], groups: Sequence[int]) -> None:
    """Keep a run's per-photo counts beside its report, so that a report over several seeds
    can resample every seed's photos. Arrays are (trainings, photos, bins)."""
    arrays = {"groups": np.asarray(groups, dtype=np.int8)}
    for name, trainings in counts.items():
        # Each training has its own bins; empty bins below the lowest score change no AP.
        width = max(p.shape[1] for p, _ in trainings)
        for part, side in enumerate(("positives", "negatives")):
            arrays[f"{name}.{side}"] = np.stack(
                [np.pad(t[part], ((0, 0), (width - t[part].shape[1], 0))) for t in trainings]
            ).astype(np.int32)
    np.savez_compressed(f"{folder}/{COUNTS_FILE}", **arrays)


def load_counts(folder) -> tuple[dict[str, list[Counts]], np.ndarray] | None:
    """What ``save_counts`` kept; None where the run kept none (no photo with a mask, or a
    report written before the bootstrap). Files from before detector seeds hold one
    training's (photos, bins)."""
    try:
        with np.load(f"{folder}/{COUNTS_FILE}") as data:
            names = {key.rsplit(".", 1)[0] for key in data.files if key != "groups"}
            loaded = {}
            for name in names:
                positives, negatives = data[f"{name}.positives"], data[f"{name}.negatives"]
                if positives.ndim == 2:
                    positives, negatives = positives[None], negatives[None]
                loaded[name] = list(zip(positives, negatives))
            return loaded, data["groups"]
    except FileNotFoundError:
        return None
