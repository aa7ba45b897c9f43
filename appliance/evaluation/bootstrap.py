"""How much of a pixel-AP comparison the choice of test photos alone could make: a bootstrap.

A detector's pixel AP on a few dozen real defect photos depends a great deal on which photos
they are. Drawing the photos again with replacement, each draw as many as there were, and
recomputing the comparison from the detector's scores shows the spread that choice brings
(nothing is trained again: the scores of each photo are kept as counts per score bin,
``metrics.binned_counts``). Photos are drawn within their group (normal or defective), so every
resample tests the same mix.

The spread says nothing about what another training of the detector would give; where several
seeds were run, their spread is reported beside it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from appliance.evaluation.metrics import binned_average_precision

RESAMPLES = 2000

Counts = tuple[np.ndarray, np.ndarray]  # positives, negatives per photo and score bin


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


def interval(values: np.ndarray, share: float = 0.9) -> list[float | None]:
    """The range holding the middle ``share`` of the defined values; None where none is."""
    values = values[np.isfinite(values)]
    if not values.size:
        return [None, None]
    tail = 50 * (1 - share)
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def ratio_resamples(runs: Sequence[tuple[dict[str, Counts], Sequence[int]]], ours: str,
                    baseline: str, seed: int, resamples: int = RESAMPLES) -> np.ndarray:
    """``ours``' pixel AP over ``baseline``'s in each resample, each the mean over ``runs``
    (one per evaluation seed, ``(counts by generator, photo groups)``): every run's test photos
    are drawn again within that run, the same draws for both generators. The baseline stays the
    one that was best as measured (choosing the best again in every resample would favour the
    baselines by their luck)."""
    rng = np.random.default_rng([seed, 0xE7A1])
    total = {ours: np.zeros(resamples), baseline: np.zeros(resamples)}
    for counts, groups in runs:
        weights = resample_weights(groups, resamples, rng)
        for name in total:
            total[name] += resampled_ap(counts[name], weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        return total[ours] / total[baseline]  # a ratio of sums is the ratio of the means


COUNTS_FILE = "pixel_counts.npz"


def save_counts(folder, counts: dict[str, Counts], groups: Sequence[int]) -> None:
    """Keep a run's per-photo counts beside its report, so that a report over several seeds
    can resample every seed's photos."""
    arrays = {"groups": np.asarray(groups, dtype=np.int8)}
    for name, (positives, negatives) in counts.items():
        arrays[f"{name}.positives"] = positives.astype(np.int32)
        arrays[f"{name}.negatives"] = negatives.astype(np.int32)
    np.savez_compressed(f"{folder}/{COUNTS_FILE}", **arrays)


def load_counts(folder) -> tuple[dict[str, Counts], np.ndarray] | None:
    """What ``save_counts`` kept; None where the run kept none (no photo with a mask, or a
    report written before the bootstrap)."""
    try:
        with np.load(f"{folder}/{COUNTS_FILE}") as data:
            names = {key.rsplit(".", 1)[0] for key in data.files if key != "groups"}
            return ({name: (data[f"{name}.positives"], data[f"{name}.negatives"])
                     for name in names}, data["groups"])
    except FileNotFoundError:
        return None
