"""The heuristic judge: obviously bad edits are rejected with the right issue, plausible local
defects on real surfaces are accepted, and the review carries the measured numbers."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
from conftest import require_tiles
from skimage import data

from appliance.imaging import load_rgb
from appliance.tools.interfaces import Issue, MaskRequest, QualityRequest
from appliance.tools.mask_gen.difference import DifferenceMaskGenerator
from appliance.tools.object_map import find_object
from appliance.tools.quality_eval.heuristic import HeuristicQualityEvaluator, measure

ACCEPT = 3  # the agent's usual acceptance bar on both scores


# --- images and edits ------------------------------------------------------------------------


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


@pytest.fixture(scope="module")
def brick() -> np.ndarray:
    return _rgb(data.brick())


@pytest.fixture(scope="module")
def part() -> np.ndarray:
    """A grey part (disc of level 150) on a dark background, with sensor noise."""
    yy, xx = np.mgrid[0:512, 0:512]
    image = np.full((512, 512, 3), 25.0)
    image[np.hypot(yy - 256, xx - 256) < 170] = 150.0
    image += np.random.default_rng(1).normal(0.0, 6.0, image.shape)
    return cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (3, 3), 0)


def blotch(image, cy, cx, radius, strength=0.35, soft=True):
    """Darken (strength > 0) or brighten (< 0) a disc, fading out to its rim when soft."""
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    distance = np.hypot(yy - cy, xx - cx) / radius
    profile = np.clip(1 - distance, 0, 1) ** 0.7 if soft else (distance < 1).astype(float)
    return np.clip(image * (1 - strength * profile[..., None]), 0, 255).astype(np.uint8)


def line(image, start, end, delta=-45, width=2):
    """An anti-aliased scratch ``delta`` grey levels darker or brighter than the surface."""
    stroke = np.zeros(image.shape[:2], np.float32)
    cv2.line(stroke, start, end, 1.0, width, cv2.LINE_AA)
    stroke = cv2.GaussianBlur(stroke, (0, 0), 0.8)
    return np.clip(image + delta * stroke[..., None], 0, 255).astype(np.uint8)


def pasted_rectangle(image, y, x, h, w, sy, sx, delta=-30):
    """A patch from elsewhere in the image, pasted with hard straight edges."""
    out = image.astype(int)
    out[y:y + h, x:x + w] = image[sy:sy + h, sx:sx + w].astype(int) + delta
    return np.clip(out, 0, 255).astype(np.uint8)


def judge(normal, edited):
    return HeuristicQualityEvaluator().evaluate([QualityRequest(normal, edited, "part", "x")])[0]


# --- bad edits ---------------------------------------------------------------------------------


def _noise(image, sigma, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0.0, sigma, image.shape), 0, 255).astype(np.uint8)


def _sparse_noise(image, density=0.02, seed=0):
    out = image.copy()
    hit = np.random.default_rng(seed).random(image.shape[:2]) < density
    out[hit] = 255 - out[hit]
    return out


def _speck(image):
    out = image.copy()
    out[100, 100:102] = 255 - out[100, 100:102]
    return out


BAD_EDITS = {
    # name: (normal fixture, edit, issues of which at least one must be reported)
    "no change": ("brick", lambda im: im.copy(), {Issue.NO_CHANGE}),
    "blotch in the background": ("part", lambda im: blotch(im, 40, 40, 18, -2.0),
                                 {Issue.OFF_OBJECT}),
    "noise over the whole image": ("brick", lambda im: _noise(im, 12),
                                   {Issue.TOO_LARGE, Issue.SCATTERED}),
    "faint noise over the whole part": ("part", lambda im: _noise(im, 5),
                                        {Issue.TOO_LARGE, Issue.SCATTERED}),
    "salt and pepper": ("brick", _sparse_noise, {Issue.SCATTERED}),
    "brightness shift": ("brick", lambda im: np.clip(im.astype(int) + 25, 0, 255)
                         .astype(np.uint8), {Issue.TOO_LARGE}),
    "brightness shift of a part photo": ("part", lambda im: np.clip(im.astype(int) + 25, 0, 255)
                                         .astype(np.uint8), {Issue.TOO_LARGE}),
    "blob over half the part": ("part", lambda im: blotch(im, 256, 256, 125, 0.4, soft=False),
                                {Issue.TOO_LARGE}),
    "soft blob over half the surface": ("brick", lambda im: blotch(im, 256, 256, 200, 0.4),
                                        {Issue.TOO_LARGE}),
    "pasted rectangle on texture": ("brick", lambda im: pasted_rectangle(im, 200, 200, 50, 70,
                                                                         20, 20),
                                    {Issue.HARD_SEAMS}),
    "pasted rectangle on part": ("part", lambda im: pasted_rectangle(im, 220, 220, 40, 60, 150,
                                                                     150, -40),
                                 {Issue.HARD_SEAMS}),
    "two-pixel speck": ("brick", _speck, {Issue.TOO_SMALL}),
    "barely visible blotch": ("brick", lambda im: blotch(im, 200, 300, 18, 0.12),
                              {Issue.TOO_FAINT}),
}


@pytest.mark.parametrize("name", sorted(BAD_EDITS))
def test_bad_edits_are_rejected(name, request):
    fixture, edit, expected = BAD_EDITS[name]
    normal = request.getfixturevalue(fixture)
    report = judge(normal, edit(normal))
    assert expected & set(report.issues), (report.issues, report.review)
    assert report.location_score < ACCEPT or report.quality_score < ACCEPT, report.review


def test_glaring_spot_is_too_strong():
    # A dark part (level 40) with a pure white spot: 200+ grey levels on a smooth surface.
    yy, xx = np.mgrid[0:512, 0:512]
    normal = np.full((512, 512, 3), 215, dtype=np.uint8)
    normal[np.hypot(yy - 256, xx - 256) < 170] = 40
    normal = _noise(normal, 3)
    edited = normal.copy()
    edited[np.hypot(yy - 240, xx - 280) < 15] = 255
    report = judge(normal, edited)
    assert Issue.TOO_STRONG in report.issues
    assert report.quality_score < ACCEPT
    assert "glaringly strong" in report.review


def test_pasted_rectangle_on_tile_is_rejected(tile_images):
    for tile in tile_images[:3]:
        # A patch from another spot of the face, pasted 30 grey levels darker than the spot it
        # covers: the tile face is brighter in some places than others.
        target, source = tile[100:140, 80:130], tile[20:60, 150:200]
        delta = int(target.mean() - source.mean()) - 30
        report = judge(tile, pasted_rectangle(tile, 100, 80, 40, 50, 20, 150, delta))
        assert Issue.HARD_SEAMS in report.issues, report.review
        assert report.quality_score < ACCEPT
        assert "pasted" in report.review


def test_nothing_changed_scores_zero(brick):
    report = judge(brick, brick.copy())
    assert (report.location_score, report.quality_score) == (0, 0)
    assert report.issues == [Issue.NO_CHANGE]


# --- good edits --------------------------------------------------------------------------------


GOOD_EDITS = {
    "soft blotch on brick": ("brick", lambda im: blotch(im, 200, 300, 18)),
    "scratch on brick": ("brick", lambda im: line(im, (100, 100), (190, 160))),
    "soft blotch on a part": ("part", lambda im: blotch(im, 230, 280, 16)),
    "scratch on a part": ("part", lambda im: line(im, (200, 200), (280, 260))),
}


@pytest.mark.parametrize("name", sorted(GOOD_EDITS))
def test_plausible_local_defects_are_accepted(name, request):
    fixture, edit = GOOD_EDITS[name]
    normal = request.getfixturevalue(fixture)
    report = judge(normal, edit(normal))
    assert report.issues == [], report.review
    assert report.location_score >= ACCEPT and report.quality_score >= ACCEPT, report.review


@pytest.mark.parametrize("kind", ["blotch", "scratch"])
def test_plausible_defects_on_magnetic_tiles_are_accepted(tile_images, kind):
    for tile in tile_images[:4]:
        height, width = tile.shape[:2]
        if kind == "blotch":
            edited = blotch(tile, height // 2, width // 2, 14, 0.45)
        else:
            edited = line(tile, (width // 3, height // 3), (width // 3 + 40, height // 3 + 60), -40)
        report = judge(tile, edited)
        assert report.issues == [], report.review
        assert report.location_score >= ACCEPT and report.quality_score >= ACCEPT, report.review


def test_background_blotch_scores_lower_location_than_the_same_on_the_part(part):
    on = judge(part, blotch(part, 230, 280, 16, -0.5))
    off = judge(part, blotch(part, 40, 40, 16, -2.0))
    assert on.location_score == 5
    assert off.location_score == 0


# --- report contents ---------------------------------------------------------------------------


def test_review_is_written_from_the_measurements(brick):
    report = judge(brick, blotch(brick, 200, 300, 18, 0.12))
    m = report.measurements
    assert f"peaks at {m['peak_change']:.1f} grey levels" in report.review
    assert f"mean {m['mean_change']:.1f}" in report.review
    assert f"texture spread of {m['texture_spread']:.1f}" in report.review
    assert f"{100 * m['on_object']:.0f} % of changed pixels" in report.review
    assert 1 <= report.review.count(". ") + 1 <= 4


def test_measurements_are_json_floats(part):
    report = judge(part, blotch(part, 230, 280, 16))
    assert all(isinstance(value, float) for value in report.measurements.values())
    json.dumps(report.measurements, allow_nan=False)
    for key in ("on_object", "size_share", "top3_share", "mean_change", "peak_change",
                "texture_spread",
                "contrast_ratio", "edge_hardness", "straight_outline_share",
                "seam_gradient_ratio"):
        assert key in report.measurements


def test_measure_uses_the_given_object_map(part):
    edited = blotch(part, 230, 280, 16)
    object_map = find_object(part)
    m = measure(part, edited, object_map)
    assert m["on_object"] == pytest.approx(1.0)
    assert m["object_pixels"] == pytest.approx(float(object_map.foreground.sum()))


def test_batch_keeps_order(brick, part):
    evaluator = HeuristicQualityEvaluator()
    assert evaluator.name == "heuristic"
    reports = evaluator.evaluate([
        QualityRequest(brick, brick.copy(), "brick", "x"),
        QualityRequest(part, blotch(part, 230, 280, 16), "part", "x"),
    ])
    assert [Issue.NO_CHANGE in r.issues for r in reports] == [True, False]


def test_judge_and_masks_are_fast_at_512_px(brick):
    edited = blotch(brick, 200, 300, 18)
    evaluator, masks = HeuristicQualityEvaluator(), DifferenceMaskGenerator()
    judge_request = [QualityRequest(brick, edited, "brick", "x")]
    mask_request = [MaskRequest(brick, edited)]
    evaluator.evaluate(judge_request)
    masks.generate_masks(mask_request)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        evaluator.evaluate(judge_request)
        masks.generate_masks(mask_request)
        timings.append(time.perf_counter() - start)
    # About 7 ms together on one idle core; the fastest of five runs is compared, so that a
    # busy shared test machine does not fail the test.
    assert min(timings) < 0.050


def test_clustered_particles_are_local_not_scattered(brick):
    # Contamination: a dozen dark particles within a 70 px patch is one local defect.
    edited = brick.copy()
    rng = np.random.default_rng(3)
    for y, x in rng.integers(0, 70, size=(12, 2)):
        cv2.circle(edited, (int(250 + x), int(150 + y)), 2, (25, 25, 25), -1)
    report = judge(brick, edited)
    assert Issue.SCATTERED not in report.issues, report.review
    assert report.location_score >= ACCEPT and report.quality_score >= ACCEPT, report.review


@pytest.mark.parametrize("kind", ["MT_Crack", "MT_Blowhole", "MT_Break"])
def test_real_tile_defects_are_mostly_accepted(kind):
    # Real defects, with the "normal" image made by inpainting the defect away: the judge should
    # accept nearly all of them (25/25 of the first 25 of each of these classes when written).
    folder = require_tiles(kind, "Imgs")
    accepted = 0
    paths = sorted(folder.glob("*.jpg"))[:10]
    for path in paths:
        edited = load_rgb(path)
        mask = load_rgb(path.with_suffix(".png"))[..., 0] >= 128
        region = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8))
        normal = cv2.inpaint(edited, region, 5, cv2.INPAINT_TELEA)
        report = judge(normal, edited)
        accepted += report.location_score >= ACCEPT and report.quality_score >= ACCEPT
    assert accepted >= 0.9 * len(paths)


def test_two_defects_far_apart_are_scattered(part):
    # One defect was asked; two clear blotches on opposite sides of the part are two defects.
    edited = blotch(blotch(part, 180, 150, 22), 330, 360, 20)
    report = judge(part, edited)
    assert Issue.SCATTERED in report.issues, report.review
    assert report.measurements["far_share"] > 0.2
    assert "far apart" in report.review


def test_pores_close_together_are_one_defect(part):
    # "sometimes two or three pores close together": local, not scattered.
    edited = blotch(blotch(blotch(part, 250, 240, 9, soft=False), 262, 266, 8, soft=False),
                    236, 262, 7, soft=False)
    report = judge(part, edited)
    assert Issue.SCATTERED not in report.issues, report.review
    assert report.measurements["far_share"] == 0.0


def test_a_crack_with_a_detached_far_piece_is_scattered(brick):
    crack = line(brick, (150, 150), (260, 230), delta=-60)
    assert Issue.SCATTERED not in judge(brick, crack).issues
    stray = line(crack, (420, 420), (470, 470), delta=-60)
    assert Issue.SCATTERED in judge(brick, stray).issues


def test_a_defect_type_the_knowledge_base_calls_large_is_not_too_large(part, engine):
    # A soft unevenness over about a third of the part: too large for a local defect in
    # general, exactly what the knowledge base asks of magnetic_tile/uneven (15 to 40 % of the
    # face). A blowhole of that size stays too large.
    edited = blotch(part, 256, 256, 120, strength=0.3)
    informed = HeuristicQualityEvaluator(knowledge_base=engine.knowledge_base)
    uneven, blowhole = informed.evaluate([QualityRequest(part, edited, "magnetic_tile", "uneven"),
                                          QualityRequest(part, edited, "magnetic_tile", "blowhole")])
    plain = HeuristicQualityEvaluator().evaluate(
        [QualityRequest(part, edited, "magnetic_tile", "uneven")])[0]
    assert 0.25 < uneven.measurements["size_share"] < 0.5
    assert Issue.TOO_LARGE in plain.issues and Issue.TOO_LARGE in blowhole.issues
    assert Issue.TOO_LARGE not in uneven.issues and uneven.location_score >= ACCEPT


def _judge_asked(normal, edited, instruction):
    return HeuristicQualityEvaluator().evaluate(
        [QualityRequest(normal, edited, "part", "pit", instruction)])[0]


def _pits(image, centres, radius=7):
    for cy, cx in centres:
        image = blotch(image, cy, cx, radius, soft=False)
    return image


def test_the_count_asked_for_is_checked(part):
    """"two pits" showing five, or "a cluster of pores" showing one, is the wrong count; what
    was asked (allowing close neighbours that merge) passes."""
    two = _pits(part, [(230, 230), (262, 270)])
    five = _pits(part, [(200, 200), (200, 260), (240, 230), (280, 200), (280, 260)])
    one = _pits(part, [(256, 256)])
    assert Issue.WRONG_COUNT not in _judge_asked(part, two, "two dark pits").issues
    report = _judge_asked(part, five, "two dark pits")
    assert Issue.WRONG_COUNT in report.issues, report.review
    assert report.quality_score <= 1 and report.measurements["pieces"] == 5.0
    assert "5 separate defects where 1 to 3" in report.review
    crowd = _judge_asked(part, one, "a cluster of small dark pores")
    assert Issue.WRONG_COUNT in crowd.issues, crowd.review
    assert Issue.WRONG_COUNT not in _judge_asked(part, five, "a cluster of small dark pores").issues
    # "sometimes two or three": one is as right as three.
    for edited in (one, _pits(part, [(230, 230), (262, 270), (240, 290)])):
        assert Issue.WRONG_COUNT not in _judge_asked(
            part, edited, "small pits; sometimes two or three pores close together").issues
    # No count asked and no calibration: not checked.
    assert Issue.WRONG_COUNT not in judge(part, five).issues
