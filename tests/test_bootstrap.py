"""The bootstrap over test photos (appliance/evaluation/bootstrap.py), on planted score maps."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.evaluation.bootstrap import (COUNTS_FILE, interval, load_counts, ratio_resamples,
                                            resample_weights, resampled_mean_ap, save_counts,
                                            training_draws)
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
    counts = {"ours": [binned_counts(truth, plain)], "draem": [binned_counts(truth, plain)]}
    same = ratio_resamples([(counts, groups)], "ours", "draem", seed=0)
    assert same.shape == (2000,) and np.allclose(same, 1.0)
    counts["ours"] = [binned_counts(truth, better)]
    ahead = ratio_resamples([(counts, groups)], "ours", "draem", seed=0)
    low, high = interval(ahead)
    assert 1.0 < low < high
    # Two seeds' runs: the mean over both, each seed's photos drawn within it.
    truth2, plain2 = _scores(20, 0.0, 1)
    other = {"ours": [binned_counts(truth2, plain2)], "draem": [binned_counts(truth2, plain2)]}
    both = ratio_resamples([(counts, groups), (other, groups)], "ours", "draem", seed=0)
    assert 1.0 < np.median(both) < np.median(ahead)

    save_counts(tmp_path, counts, groups)
    loaded, kept_groups = load_counts(tmp_path)
    assert sorted(loaded) == ["draem", "ours"] and list(kept_groups) == groups
    assert all(np.array_equal(loaded[n][0][k], counts[n][0][k]) for n in counts for k in (0, 1))
    assert load_counts(tmp_path / "nothing") is None
    assert ratio_resamples([(loaded, kept_groups)], "ours", "draem", seed=0) == pytest.approx(ahead)


def test_several_trainings_are_drawn_again_and_averaged(tmp_path):
    truth, plain = _scores(20, 0.0, 0)
    _, better = _scores(20, 0.3, 0)
    groups = [0] * 20 + [1] * 20
    weak, strong = binned_counts(truth, plain), binned_counts(truth, better)
    rng = np.random.default_rng(0)
    weights = resample_weights(groups, 2000, rng)
    draws = training_draws(2, 2000, rng)
    assert draws.shape == (2000, 2) and set(np.unique(draws)) == {0, 1}
    mixed = resampled_mean_ap([weak, strong], weights, draws)
    alone_weak = resampled_mean_ap([weak], weights, training_draws(1, 2000, rng))
    alone_strong = resampled_mean_ap([strong], weights, training_draws(1, 2000, rng))
    # Each resample averages two draws of the trainings: both weak, both strong, or one each.
    assert np.all(mixed >= alone_weak - 1e-9) and np.all(mixed <= alone_strong + 1e-9)
    both_weak = (draws == 0).all(axis=1)
    assert np.allclose(mixed[both_weak], alone_weak[both_weak])
    # The trainings' luck widens the ratio's range beyond what the photos alone give.
    one = {"ours": [strong], "draem": [strong]}
    two = {"ours": [weak, strong], "draem": [strong, weak]}
    narrow = interval(ratio_resamples([(one, groups)], "ours", "draem", seed=0))
    wide = interval(ratio_resamples([(two, groups)], "ours", "draem", seed=0))
    assert wide[1] - wide[0] > narrow[1] - narrow[0] + 0.1

    # Each training has bins of its own, so they are padded to one width (empty bins).
    narrower = (weak[0][:, 5:], weak[1][:, 5:])
    save_counts(tmp_path, {"ours": [narrower, strong]}, groups)
    with np.load(tmp_path / COUNTS_FILE) as saved:
        assert saved["ours.positives"].shape[0] == 2
    loaded, _ = load_counts(tmp_path)
    padded = loaded["ours"][0]
    assert padded[0].shape == strong[0].shape
    assert np.allclose(resampled_mean_ap([padded], weights, draws[:, :1] * 0),
                       resampled_mean_ap([narrower], weights, draws[:, :1] * 0), equal_nan=True)
    # A file from before detector seeds holds one training's (photos, bins).
    np.savez_compressed(tmp_path / COUNTS_FILE, groups=np.array(groups, np.int8),
                        **{"ours.positives": weak[0], "ours.negatives": weak[1]})
    old, _ = load_counts(tmp_path)
    assert len(old["ours"]) == 1 and np.array_equal(old["ours"][0][0], weak[0])
