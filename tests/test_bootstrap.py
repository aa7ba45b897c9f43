"""The bootstrap over test photos (appliance/evaluation/bootstrap.py), on planted score maps."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.evaluation.bootstrap import (interval, load_counts, ratio_resamples,
                                            resample_weights, save_counts)
from appliance.evaluation.metrics import binned_counts


def _scores(photos: int, lift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``photos`` normal photos then as many with a defect; ``lift`` raises the defect's score."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((2 * photos, 24, 24), bool)
    truth[photos:, 8:14, 6:18] = True
    scores = rng.normal(0.2, 0.1, truth.shape) + truth * (0.1 + lift)
    return truth, scores


def test_resamples_keep_each_group_and_draw_with_replacement():
    weights = resample_weights([0, 0, 0, 1, 1], 500, np.random.default_rng(0))
    assert weights.shape == (500, 5)
    assert (weights[:, :3].sum(1) == 3).all() and (weights[:, 3:].sum(1) == 2).all()
    assert (weights.max(1) > 1).mean() > 0.5  # some photos drawn twice, others left out
    assert interval(np.array([np.nan, np.nan])) == [None, None]


def test_the_ratio_range_is_one_for_equal_generators_and_above_one_for_a_better_one(tmp_path):
    truth, plain = _scores(20, 0.0, 0)
    _, better = _scores(20, 0.2, 0)
    groups = [0] * 20 + [1] * 20
    counts = {"ours": binned_counts(truth, plain), "draem": binned_counts(truth, plain)}
    same = ratio_resamples([(counts, groups)], "ours", "draem", seed=0)
    assert same.shape == (2000,) and np.allclose(same, 1.0)
    counts["ours"] = binned_counts(truth, better)
    ahead = ratio_resamples([(counts, groups)], "ours", "draem", seed=0)
    low, high = interval(ahead)
    assert 1.0 < low < high
    # Two seeds' runs: the mean over both, each seed's photos drawn within it.
    truth2, plain2 = _scores(20, 0.0, 1)
    other = {"ours": binned_counts(truth2, plain2), "draem": binned_counts(truth2, plain2)}
    both = ratio_resamples([(counts, groups), (other, groups)], "ours", "draem", seed=0)
    assert 1.0 < np.median(both) < np.median(ahead)

    save_counts(tmp_path, counts, groups)
    loaded, kept_groups = load_counts(tmp_path)
    assert sorted(loaded) == ["draem", "ours"] and list(kept_groups) == groups
    assert all(np.array_equal(loaded[n][k], counts[n][k]) for n in counts for k in (0, 1))
    assert load_counts(tmp_path / "nothing") is None
    assert ratio_resamples([(loaded, kept_groups)], "ours", "draem", seed=0) == pytest.approx(ahead)
