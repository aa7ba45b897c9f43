"""Evaluation metrics against hand-computed values and scikit-learn (a core dependency)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as sk

from appliance.evaluation.generation_metrics import (defect_crop, kernel_distance, mask_change_iou,
                                                     mean_pairwise_cosine_distance)
from appliance.evaluation.metrics import (average_precision, binned_average_precision,
                                          binned_counts, detection_scores, f1_max, image_score,
                                          pr_points, roc_auc)


def test_classic_four_point_example() -> None:
    # Scores 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): of the four (+, -) pairs, three are ordered.
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert roc_auc(labels, scores) == pytest.approx(0.75)
    # Recall 1/2 at precision 1, then recall 1 at precision 2/3.
    assert average_precision(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # Best threshold 0.35: P = 2/3, R = 1 -> F1 = 0.8.
    result = detection_scores(labels, scores)
    assert result.f1_max == pytest.approx(0.8)
    assert result.f1_threshold == pytest.approx(0.35)
    assert (result.positives, result.negatives) == (2, 2)


def test_ties_form_one_threshold() -> None:
    labels = [0, 1, 0, 1, 1]
    scores = [0.2, 0.6, 0.6, 0.9, 0.1]
    # Pairs (pos, neg): 0.6 beats 0.2 and ties 0.6 (1.5); 0.9 beats both (2); 0.1 loses both.
    assert roc_auc(labels, scores) == pytest.approx(3.5 / 6)
    # Thresholds 0.9, 0.6, 0.2, 0.1 -> (P, R) = (1, 1/3), (2/3, 2/3), (1/2, 2/3), (3/5, 1).
    assert average_precision(labels, scores) == pytest.approx(1 / 3 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 5)
    assert f1_max(labels, scores) == pytest.approx(0.75)


def test_all_scores_equal() -> None:
    labels = [1, 0, 1, 0]
    scores = [0.5] * 4
    assert roc_auc(labels, scores) == pytest.approx(0.5)
    assert average_precision(labels, scores) == pytest.approx(0.5)
    assert f1_max(labels, scores) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_perfect_and_reversed_rankings() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    perfect = detection_scores(labels, scores)
    assert (perfect.auroc, perfect.ap, perfect.f1_max) == (1.0, 1.0, 1.0)
    reversed_ = detection_scores(labels, -scores)
    assert reversed_.auroc == 0.0
    # Both positives come last: AP = 1/2 * 1/4 + 1/2 * 2/5.
    assert reversed_.ap == pytest.approx(0.5 * 0.25 + 0.5 * 0.4)


def test_one_class_only_is_undefined() -> None:
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))
    assert math.isnan(roc_auc([0, 0], [0.1, 0.2]))


def test_rejects_mismatched_or_non_finite_input() -> None:
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        roc_auc([0, 1], [0.1, float("nan")])


def test_pixel_maps_are_flattened() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1:3, 1:3] = True
    maps = masks.astype(np.float32) * 0.7 + 0.1
    assert detection_scores(masks, maps).auroc == 1.0
    assert detection_scores(masks, maps).positives == 4


def test_matches_scikit_learn_on_random_data() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        n = int(rng.integers(20, 3000))
        labels = rng.random(n) < rng.uniform(0.05, 0.6)
        # Rounding makes many ties, the case implementations most often get wrong.
        scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), int(rng.integers(0, 3)))
        ours = detection_scores(labels, scores)
        precision, recall, _ = sk.precision_recall_curve(labels, scores)
        f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
        assert ours.auroc == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
        assert ours.ap == pytest.approx(sk.average_precision_score(labels, scores), abs=1e-12)
        assert ours.f1_max == pytest.approx(f1, abs=1e-12)


def test_binned_counts_give_the_ap_of_any_multiset_of_images() -> None:
    """Summed rows of the per-image bin counts are the AP of those images taken together (the
    bootstrap's resample, an image drawn twice counting twice), to within the merging of
    thresholds inside a bin; equal scores stay one threshold, exactly as unbinned."""
    rng = np.random.default_rng(3)
    labels = rng.random((12, 48, 48)) < 0.03
    scores = np.clip(rng.normal(0.1, 0.1, labels.shape) + labels * rng.normal(0.2, 0.1, labels.shape),
                     0, 1).astype(np.float32)
    positives, negatives = binned_counts(labels, scores)
    assert positives.shape == negatives.shape and positives.shape[0] == 12
    assert positives.sum() == labels.sum() and negatives.sum() == (~labels).sum()
    for pick in ([*range(12)], [1, 1, 4], [0, 5, 5, 5, 11]):
        binned = binned_average_precision(positives[pick].sum(0), negatives[pick].sum(0))
        assert binned == pytest.approx(average_precision(labels[pick], scores[pick]), abs=2e-3)
    # Leading axes are separate curves.
    both = binned_average_precision(np.stack([positives[[1, 1, 4]].sum(0), positives.sum(0)]),
                                    np.stack([negatives[[1, 1, 4]].sum(0), negatives.sum(0)]))
    assert both.shape == (2,) and both[1] == pytest.approx(average_precision(labels, scores), abs=2e-3)
    coarse = np.round(scores, 1)
    positives, negatives = binned_counts(labels, coarse)
    assert binned_average_precision(positives.sum(0), negatives.sum(0)) == pytest.approx(
        average_precision(labels, coarse), abs=1e-9)
    assert np.isnan(binned_average_precision(np.zeros(5), np.ones(5)))


def test_pr_points_are_thinned_and_start_at_precision_one() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(5000) < 0.3
    recall, precision = pr_points(labels, rng.random(5000), max_points=50)
    assert len(recall) <= 50
    assert (recall[0], precision[0]) == (0.0, 1.0)
    assert recall[-1] == 1.0
    assert np.all(np.diff(recall) >= 0)


def test_image_score_prefers_a_blob_to_a_hot_pixel() -> None:
    hot_pixel = np.zeros((64, 64), dtype=np.float32)
    hot_pixel[10, 10] = 1.0
    blob = np.zeros((64, 64), dtype=np.float32)
    blob[30:40, 30:40] = 0.6
    assert image_score(blob, 5) > image_score(hot_pixel, 5)
    assert image_score(hot_pixel, 1) == 1.0


def test_mean_pairwise_cosine_distance() -> None:
    assert mean_pairwise_cosine_distance(np.array([[1.0, 0.0], [0.0, 2.0]])) == pytest.approx(1.0)
    assert mean_pairwise_cosine_distance(np.array([[1.0, 0.0], [3.0, 0.0]])) == pytest.approx(0.0)
    # Three vectors at 0, 90 and 180 degrees: cosines 0, -1, 0 -> mean distance 1 + 1/3.
    three = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert mean_pairwise_cosine_distance(three) == pytest.approx(4 / 3)
    assert math.isnan(mean_pairwise_cosine_distance(np.ones((1, 4))))


def test_kernel_distance() -> None:
    # Hand computation in d = 1: k(x, y) = (x * y + 1)^3.
    a, b = np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])
    k = lambda x, y: (x * y + 1.0) ** 3  # noqa: E731
    expected = (k(0, 1) + k(1, 0)) / 2 + (k(1, 2) + k(2, 1)) / 2 - 2 * (
        k(0, 1) + k(0, 2) + k(1, 1) + k(1, 2)) / 4
    assert kernel_distance(a, b) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    same = kernel_distance(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)))
    shifted = kernel_distance(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 1.0)
    assert abs(same) < 0.1 * shifted


def test_mask_change_iou() -> None:
    normal = np.full((20, 20, 3), 100, dtype=np.uint8)
    edited = normal.copy()
    edited[5:10, 5:10] = 160
    exact = np.zeros((20, 20), dtype=bool)
    exact[5:10, 5:10] = True
    assert mask_change_iou(normal, edited, exact) == 1.0
    double = np.zeros((20, 20), dtype=bool)
    double[5:10, 5:15] = True
    assert mask_change_iou(normal, edited, double) == pytest.approx(0.5)
    faint = normal.copy()
    faint[5:10, 5:10] = 105  # below the shared change threshold: nothing visibly changed
    assert mask_change_iou(normal, faint, exact) == 0.0


def test_defect_crop_is_square_and_contains_the_defect() -> None:
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    mask = np.zeros((100, 120), dtype=bool)
    mask[90:95, 110:118] = True
    image[mask] = 255
    crop = defect_crop(image, mask)
    assert crop.shape[0] == crop.shape[1] >= 25
    assert (crop == 255).all(axis=2).sum() == mask.sum()
