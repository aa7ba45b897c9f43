"""Placement: defects land on the object, where such a defect physically occurs."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from skimage import data

from appliance.tools.image_gen.placement import (
    MaskObjectMap,
    choose_region,
    half_extent,
    inside_distance,
    place,
)
from appliance.tools.image_gen.prompt_params import parse_prompt
from appliance.tools.knowledge.families import FAMILIES
from appliance.tools.object_map import find_object


def plate_image(size: int = 320, seed: int = 0) -> np.ndarray:
    """A shaded, slightly rotated metal plate on a plain dark table, with sensor noise."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), (28, 30, 34), np.float64)
    corners = cv2.boxPoints(((size * 0.5, size * 0.52), (size * 0.62, size * 0.42), 8.0))
    plate = np.zeros((size, size), np.uint8)
    cv2.fillPoly(plate, [np.int32(corners)], 1)
    xx = np.arange(size)[None, :] / size
    shade = 150.0 + 50.0 * (1.0 - xx)
    for channel, gain in enumerate((1.0, 0.97, 0.9)):
        image[..., channel] = np.where(plate > 0, shade * gain, image[..., channel])
    image += rng.normal(0.0, 3.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def plate():
    image = plate_image()
    object_map = find_object(image)
    assert not object_map.is_texture
    return image, object_map


@pytest.fixture(scope="module")
def texture():
    image = np.repeat(data.gravel()[:300, :360, None], 3, axis=2)
    object_map = find_object(image)
    assert object_map.is_texture
    return image, object_map


def _center(box):
    return (box.x0 + box.x1) / 2.0, (box.y0 + box.y1) / 2.0


@pytest.mark.parametrize("family", FAMILIES)
def test_never_in_the_background(plate, family):
    image, object_map = plate
    near_part = cv2.dilate(object_map.foreground.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        params = parse_prompt("a defect", rng)
        placement = place(object_map, params, family, image.shape, rng)
        cx, cy = placement.center
        assert object_map.foreground[int(cy), int(cx)]
        for box in placement.boxes[1:]:
            # Further instances are centred on the part too (a bite on its outline).
            cx, cy = _center(box)
            assert near_part[min(int(cy), image.shape[0] - 1), min(int(cx), image.shape[1] - 1)]
        if family != "missing":
            # Most of the main box is on the part.
            box = placement.box
            assert object_map.foreground[box.y0:box.y1, box.x0:box.x1].mean() > 0.6


def test_missing_sits_on_the_outline(plate):
    image, object_map = plate
    band = object_map.boundary_band(3)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        params = parse_prompt("a chipped piece", rng)
        placement = place(object_map, params, "missing", image.shape, rng)
        cx, cy = placement.center
        assert band[int(cy), int(cx)]
        box = placement.box
        # The bite box straddles the outline: part and background both inside it.
        window = object_map.foreground[box.y0:box.y1, box.x0:box.x1]
        assert window.any() and not window.all()


@pytest.mark.parametrize("family", ["scratch", "crack", "hole", "stain", "contamination"])
def test_edge_words_land_on_the_boundary_band(plate, family):
    image, object_map = plate
    extent = math.sqrt(object_map.foreground.sum())
    for seed in range(30):
        rng = np.random.default_rng(seed)
        params = parse_prompt("a small defect near the edge", rng)
        placement = place(object_map, params, family, image.shape, rng)
        assert placement.anchor == "edge"
        cx, cy = placement.center
        band = object_map.boundary_band(int(placement.axes[1] / 2 + 2 + 0.06 * extent))
        assert band[int(cy), int(cx)]


def test_edge_lines_follow_the_outline(plate):
    image, object_map = plate
    # The plate is rotated by 8 degrees; its edges run at about 8 and 98 degrees.
    for seed in range(20):
        rng = np.random.default_rng(seed)
        params = parse_prompt("a crack along the top edge", rng)
        placement = place(object_map, params, "crack", image.shape, rng)
        assert placement.anchor == "edge:top"
        assert placement.orientation_deg is not None
        assert abs((placement.orientation_deg - 8.0 + 90.0) % 180.0 - 90.0) < 20.0


def test_lines_running_in_from_the_edge_start_there(plate):
    image, object_map = plate
    inside = inside_distance(object_map)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        params = parse_prompt("a crack running in from the top edge", rng)
        assert params.edge_mode == "inward"
        placement = place(object_map, params, "crack", image.shape, rng)
        # Across the top edge (8 degrees), so at about 98 degrees, centred half a length in.
        assert abs((placement.orientation_deg - 98.0 + 90.0) % 180.0 - 90.0) < 20.0
        cx, cy = placement.center
        depth = 0.45 * placement.axes[0]
        assert depth - 1 <= inside[int(cy), int(cx)] <= depth + 4


def test_side_and_corner_words(plate):
    image, object_map = plate
    ys, xs = np.nonzero(object_map.foreground)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    corners = cv2.boxPoints(((160, 166.4), (198.4, 134.4), 8.0))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        cx, cy = place(object_map, parse_prompt("a pit on the upper part", rng), "hole",
                       image.shape, rng).center
        assert cy < top + (bottom - top) / 3 + 1
        rng = np.random.default_rng(seed)
        cx, cy = place(object_map, parse_prompt("a pit on the right side", rng), "hole",
                       image.shape, rng).center
        assert cx > right - (right - left) / 3 - 1
        rng = np.random.default_rng(seed)
        cx, cy = place(object_map, parse_prompt("a small chip in the corner", rng), "missing",
                       image.shape, rng).center
        assert min(math.hypot(cx - px, cy - py) for px, py in corners) < 30


def test_center_word_stays_near_the_centroid(plate):
    image, object_map = plate
    ys, xs = np.nonzero(object_map.foreground)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        params = parse_prompt("a small stain in the center", rng)
        cx, cy = place(object_map, params, "stain", image.shape, rng).center
        assert math.hypot(cx - xs.mean(), cy - ys.mean()) < 0.15 * math.sqrt(len(xs))


def test_texture_anywhere_but_edge_words_lean_to_the_frame(texture):
    image, object_map = texture
    height, width = image.shape[:2]
    centers = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        centers.append(place(object_map, parse_prompt("a small pit", rng), "hole",
                             image.shape, rng).center)
    xs, ys = np.array(centers).T
    # Spread over the frame, not stuck in one place.
    assert xs.std() > width / 8 and ys.std() > height / 8
    for seed in range(30):
        rng = np.random.default_rng(seed)
        placement = place(object_map, parse_prompt("a small chip at the edge", rng), "missing",
                          image.shape, rng)
        cx, cy = placement.center
        # Near the frame, and whole: the frame is not known to be the part's edge, so the chip's
        # box is not cut by it.
        reach = placement.axes[0] / 2 + 0.05 * math.sqrt(height * width) + 2
        assert placement.axes[1] / 2 <= min(cx, cy, width - 1 - cx, height - 1 - cy) <= reach


def test_size_scales_the_box(plate):
    image, object_map = plate
    small = choose_region(object_map, parse_prompt("a small stain", np.random.default_rng(1)),
                          "stain", image.shape, np.random.default_rng(1))
    large = choose_region(object_map, parse_prompt("a large stain", np.random.default_rng(1)),
                          "stain", image.shape, np.random.default_rng(1))
    assert large.width * large.height > 4 * small.width * small.height


def test_several_instances_cluster_on_the_part(plate):
    image, object_map = plate
    for seed in range(10):
        rng = np.random.default_rng(seed)
        placement = place(object_map, parse_prompt("a cluster of pits", rng), "hole",
                          image.shape, rng)
        assert len(placement.boxes) >= 3
        first = _center(placement.box)
        for box in placement.boxes[1:]:
            cx, cy = _center(box)
            assert object_map.foreground[int(cy), int(cx)]
            assert math.hypot(cx - first[0], cy - first[1]) < 4 * max(placement.box.width,
                                                                       placement.box.height)


def test_line_families_get_strip_boxes(plate):
    image, object_map = plate
    rng = np.random.default_rng(3)
    params = parse_prompt("a long horizontal scratch", rng)
    box = choose_region(object_map, params, "scratch", image.shape, rng)
    assert box.width > 4 * box.height
    # Thin line-like defects are rotated strips: their box holds the strip's four corners, which
    # stick out past the ellipse of the same axes when the line runs at a slant. Blob-like
    # defects keep the (smaller) box of their ellipse.
    major, minor, theta = 100.0, 10.0, 30.0
    c, s = math.cos(math.radians(theta)), math.sin(math.radians(theta))
    corners = [(u * c - v * s, u * s + v * c)
               for u in (-major / 2, major / 2) for v in (-minor / 2, minor / 2)]
    strip = (max(abs(x) for x, _ in corners), max(abs(y) for _, y in corners))
    for family in ("scratch", "crack", "fold", "cut", "cutpaste_scar"):
        assert half_extent(family, major, minor, theta) == pytest.approx(strip), family
    for family in ("hole", "dent", "stain", "contamination", "discoloration"):
        hx, hy = half_extent(family, major, minor, theta)
        assert hx < strip[0] - 1 and hy < strip[1] - 1, family


def test_mask_object_map_matches_object_map(plate):
    image, object_map = plate
    built = MaskObjectMap.from_mask(image, object_map.foreground)
    assert not built.is_texture
    assert np.abs(np.subtract(built.background_color, object_map.background_color)).max() <= 4
    assert (built.boundary_band(4) == object_map.boundary_band(4)).mean() > 0.99


def test_placement_is_deterministic(plate):
    image, object_map = plate
    runs = []
    for _ in range(2):
        rng = np.random.default_rng(11)
        params = parse_prompt("two scratches", rng)
        runs.append(place(object_map, params, "scratch", image.shape, rng))
    assert runs[0].boxes == runs[1].boxes
