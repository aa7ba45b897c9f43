"""Difference masks: they match a known rendered defect, refine a renderer's hint down to what
changed, find a changed blob without a hint, and are empty only when nothing changed."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from appliance.imaging import CHANGE_THRESHOLD, change_map, changed_pixels, mask_iou
from appliance.tools.interfaces import MaskRequest
from appliance.tools.mask_gen.difference import DifferenceMaskGenerator


@pytest.fixture(scope="module")
def brick() -> np.ndarray:
    return np.repeat(data.brick()[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def generator() -> DifferenceMaskGenerator:
    return DifferenceMaskGenerator()


def _hole(image: np.ndarray, center=(300, 200), radius=20) -> tuple[np.ndarray, np.ndarray]:
    """A rendered dark pit with a hard rim, and its exact footprint."""
    footprint = np.zeros(image.shape[:2], np.uint8)
    cv2.circle(footprint, center, radius, 1, -1)
    footprint = footprint.astype(bool)
    edited = image.copy()
    edited[footprint] = (edited[footprint] * 0.4).astype(np.uint8)
    return edited, footprint


def _soft_blotch(image: np.ndarray, cy=200, cx=300, radius=24, strength=0.4):
    """A stain that fades out to its rim, and the renderer's footprint (its whole support)."""
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    profile = np.clip(1 - np.hypot(yy - cy, xx - cx) / radius, 0, 1)
    edited = np.clip(image * (1 - strength * profile[..., None]), 0, 255).astype(np.uint8)
    return edited, profile > 0


def test_change_map_is_the_exact_largest_channel_difference(brick):
    edited = np.clip(brick + np.random.default_rng(0).normal(0, 20, brick.shape), 0, 255)
    edited = edited.astype(np.uint8)
    expected = np.abs(edited.astype(np.int16) - brick.astype(np.int16)).max(axis=2)
    assert np.array_equal(change_map(brick, edited), expected)
    with pytest.raises(ValueError):
        change_map(brick, edited[:10])


def test_matches_a_known_rendered_defect_without_hint(brick, generator):
    edited, footprint = _hole(brick)
    result = generator.generate_masks([MaskRequest(brick, edited)])[0]
    assert result.method == "difference"
    assert result.threshold == CHANGE_THRESHOLD
    assert mask_iou(result.mask, footprint) >= 0.9
    assert result.confidence >= 0.9


def test_hint_refinement_removes_pixels_that_did_not_change(brick, generator):
    edited, footprint = _soft_blotch(brick)
    changed = changed_pixels(brick, edited)
    assert (footprint & ~changed).sum() > 300  # the faint fringe is a real part of the hint
    result = generator.generate_masks([MaskRequest(brick, edited, hint=footprint)])[0]
    assert result.method == "hint_refined"
    assert not (result.mask & ~footprint).any()
    # The fringe is gone: far fewer unchanged pixels than in the hint, and the mask explains
    # the change much better than the hint did.
    assert (result.mask & ~changed).sum() < 0.1 * (footprint & ~changed).sum()
    assert result.confidence >= 0.9
    assert result.confidence > mask_iou(footprint, changed) + 0.1


def test_hint_with_a_hard_defect_is_kept_exactly(brick, generator):
    edited, footprint = _hole(brick)
    hint = cv2.dilate(footprint.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    result = generator.generate_masks([MaskRequest(brick, edited, hint=hint)])[0]
    assert mask_iou(result.mask, footprint) >= 0.97


def test_hint_falls_back_when_nothing_changed(brick, generator):
    _, footprint = _hole(brick)
    result = generator.generate_masks([MaskRequest(brick, brick.copy(), hint=footprint)])[0]
    assert np.array_equal(result.mask, footprint)
    assert result.confidence == 0.0


def test_hint_shape_must_match(brick, generator):
    with pytest.raises(ValueError):
        generator.generate_masks([MaskRequest(brick, brick, hint=np.ones((4, 4), bool))])


def test_finds_a_changed_blob_without_hint(brick, generator):
    edited, _ = _soft_blotch(brick)
    changed = changed_pixels(brick, edited)
    result = generator.generate_masks([MaskRequest(brick, edited)])[0]
    count, _ = cv2.connectedComponents(result.mask.astype(np.uint8))
    assert count - 1 == 1
    assert mask_iou(result.mask, changed) >= 0.9


def test_keeps_a_one_pixel_scratch(brick, generator):
    edited = brick.copy()
    cv2.line(edited, (100, 100), (220, 160), (10, 10, 10), 1)
    changed = changed_pixels(brick, edited)
    result = generator.generate_masks([MaskRequest(brick, edited)])[0]
    assert mask_iou(result.mask, changed) >= 0.9


def test_drops_specks_beside_a_defect(brick, generator):
    edited, footprint = _hole(brick)
    for y, x in ((40, 40), (450, 60), (480, 480)):
        edited[y, x] = 255 - edited[y, x]
    result = generator.generate_masks([MaskRequest(brick, edited)])[0]
    assert not result.mask[40, 40] and not result.mask[450, 60]
    assert mask_iou(result.mask, footprint) >= 0.9


def test_empty_only_when_nothing_changed(brick, generator):
    unchanged = generator.generate_masks([MaskRequest(brick, brick.copy())])[0]
    assert not unchanged.mask.any()
    assert unchanged.area_ratio == 0.0

    # Changes at or below the threshold are no change.
    subtle = np.clip(brick.astype(int) + CHANGE_THRESHOLD, 0, 255).astype(np.uint8)
    assert not generator.generate_masks([MaskRequest(brick, subtle)])[0].mask.any()

    # A two-pixel speck is tiny, but it is a change: the mask must not be empty.
    speck = brick.copy()
    speck[100, 100:102] = 255 - speck[100, 100:102]
    result = generator.generate_masks([MaskRequest(brick, speck)])[0]
    assert result.mask[100, 100] and result.mask[100, 101]


def test_diffuse_change_raises_the_threshold(brick, generator):
    # A global drift (as a diffusion round trip leaves) plus one strong local defect.
    drift = np.clip(brick + np.random.default_rng(0).normal(0, 8, brick.shape), 0, 255)
    edited, footprint = _hole(drift.astype(np.uint8))
    result = generator.generate_masks([MaskRequest(brick, edited)])[0]
    assert result.threshold > CHANGE_THRESHOLD
    assert result.mask.any()
    assert mask_iou(result.mask, footprint) >= 0.5


def test_batch_keeps_order(brick, generator):
    edited, _ = _hole(brick)
    results = generator.generate_masks([MaskRequest(brick, brick.copy()),
                                        MaskRequest(brick, edited)])
    assert [r.mask.any() for r in results] == [False, True]
    assert generator.name == "difference"


def test_a_thin_line_broken_at_its_steps_is_one_mask_piece():
    # A one-pixel staircase line with a pixel missing now and then, some at its steps (where a
    # 3x3 closing cannot join it): the mask joins the pieces without swallowing the corners.
    normal = np.repeat(data.brick()[..., None], 3, axis=2)
    edited = normal.copy()
    for i in range(60):
        if i % 7:
            edited[300 + i // 3, 100 + i] = 255
    changed = changed_pixels(normal, edited)
    assert cv2.connectedComponents(changed.astype(np.uint8), connectivity=8)[0] - 1 > 1
    mask = DifferenceMaskGenerator().generate_one(MaskRequest(normal, edited, None)).mask
    assert cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1 == 1
    assert mask.sum() <= 1.35 * changed.sum()  # only the gaps were added
