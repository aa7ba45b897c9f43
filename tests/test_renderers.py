"""Procedural renderers and the procedural image generator, on real and rendered images."""

from __future__ import annotations

import json
import time

import cv2
import numpy as np
import pytest
from conftest import require_tiles
from skimage import data
from skimage.morphology import skeletonize

from appliance.imaging import change_map, changed_pixels, is_grayscale, load_rgb, mask_iou
from appliance.tools.image_gen.procedural import ProceduralImageGenerator
from appliance.tools.image_gen.prompt_params import parse_prompt
from appliance.tools.image_gen.renderers import render_defect
from appliance.tools.interfaces import Box, EditRequest, MaskRequest
from appliance.tools.knowledge.base import load_knowledge_base
from appliance.tools.knowledge.families import FAMILIES
from appliance.tools.mask_gen.difference import DifferenceMaskGenerator
from appliance.tools.object_map import find_object


def part_on_table(size: int = 384, seed: int = 0) -> np.ndarray:
    """A tan, shaded cylinder cap seen from above on a plain dark table, with sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cx, cy, radius = size * 0.5, size * 0.48, size * 0.34
    disc = np.hypot(xx - cx, yy - cy) < radius
    shade = 150.0 + 60.0 * (1.0 - ((xx - cx + radius / 3) ** 2 + (yy - cy + radius / 3) ** 2)
                            / (2.0 * radius ** 2))
    image = np.empty((size, size, 3))
    image[:] = (32, 34, 38)
    for channel, gain in enumerate((1.0, 0.85, 0.62)):
        image[..., channel] = np.where(disc, shade * gain, image[..., channel])
    image += rng.normal(0.0, 3.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def gray_part(size: int = 300) -> np.ndarray:
    """A grey rounded rectangle (a washer-like part) on a light background: grayscale input."""
    image = np.full((size, size), 225, np.uint8)
    cv2.rectangle(image, (50, 70), (250, 230), 110, thickness=-1)
    image = cv2.GaussianBlur(image, (3, 3), 0)
    noise = np.random.default_rng(1).normal(0.0, 2.5, image.shape)
    gray = np.clip(image + noise, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _images() -> dict[str, np.ndarray]:
    # The real tile photo is required: without it this module fails to collect, naming the
    # folder, instead of silently dropping the tile cases from the parametrisation.
    return {
        "brick": np.repeat(cv2.resize(data.brick(), (320, 320),
                                      interpolation=cv2.INTER_AREA)[..., None], 3, axis=2),
        "part": part_on_table(),
        "gray_part": gray_part(),
        "tile": load_rgb(sorted(require_tiles("MT_Free", "Imgs").glob("*.jpg"))[3]),
    }


IMAGES = _images()
MAPS = {name: find_object(image) for name, image in IMAGES.items()}


def test_test_images_are_what_they_claim():
    assert MAPS["brick"].is_texture
    assert not MAPS["part"].is_texture and not MAPS["gray_part"].is_texture
    assert is_grayscale(IMAGES["gray_part"]) and not is_grayscale(IMAGES["part"])
    # The tile photo is a grayscale face filling the frame (as test_object_map asserts for the
    # MT_Free photos it samples): every pixel of its middle is placeable.
    tile, (height, width) = IMAGES["tile"], IMAGES["tile"].shape[:2]
    assert is_grayscale(tile)
    assert MAPS["tile"].is_texture
    assert MAPS["tile"].foreground[height // 4:3 * height // 4, width // 4:3 * width // 4].all()


def _render(family, name, prompt, seed, details=None):
    image, object_map = IMAGES[name], MAPS[name]
    rng = np.random.default_rng(seed)
    params = parse_prompt(prompt, rng)
    edited, mask = render_defect(family, image, object_map.foreground, params, rng,
                                 background_color=object_map.background_color, details=details)
    return image, object_map, edited, mask


@pytest.mark.parametrize("name", list(IMAGES))
@pytest.mark.parametrize("family", FAMILIES)
def test_renderer_contract(family, name):
    for seed in (0, 1):
        image, object_map, edited, mask = _render(family, name, "a clearly visible medium defect",
                                                  seed)
        assert edited.dtype == np.uint8 and edited.shape == image.shape
        assert mask.dtype == bool and mask.shape == image.shape[:2]
        assert mask.sum() >= 10, "a clearly visible defect changed almost nothing"
        allowed = object_map.foreground
        if family == "missing":
            # A bite also takes the part's last pixels that the coarse foreground mask missed.
            allowed = cv2.dilate(allowed.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert not (mask & ~allowed).any(), "defect off the object"
        assert np.array_equal(edited[~mask], image[~mask]), "pixels outside the mask changed"
        assert mask_iou(mask, changed_pixels(image, edited)) >= 0.85
        if is_grayscale(image):
            assert is_grayscale(edited), "colour leaked into a grayscale image"


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_matches_change_over_a_batch(family):
    """The product's acceptance test: mean IoU(mask, changed pixels) >= 0.8 over a batch."""
    scores = []
    for seed in range(8):
        name = list(IMAGES)[seed % len(IMAGES)]
        image, _, edited, mask = _render(family, name, "a defect", 100 + seed)
        scores.append(mask_iou(mask, changed_pixels(image, edited)))
    assert np.mean(scores) >= 0.8


def _contrast(image, edited):
    return float(change_map(image, edited).astype(np.float64).sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_severity_words_scale_contrast(family):
    wins = 0
    for name, seed in (("part", 5), ("brick", 6), ("gray_part", 7)):
        image, _, faint, _ = _render(family, name, "a faint medium defect", seed)
        _, _, strong, _ = _render(family, name, "a pronounced medium defect", seed)
        wins += _contrast(image, strong) > _contrast(image, faint)
    assert wins == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_size_words_scale_extent(family):
    wins = 0
    for name, seed in (("part", 5), ("brick", 6), ("gray_part", 7)):
        _, _, _, small = _render(family, name, "a small clearly visible defect", seed)
        _, _, _, large = _render(family, name, "a large clearly visible defect", seed)
        wins += large.sum() > small.sum()
    assert wins == 3


def test_missing_shows_the_background_on_a_part():
    image, object_map, edited, mask = _render("missing", "part", "a large chip at the edge", 3)
    assert mask.any()
    background = np.asarray(object_map.background_color, dtype=float)
    removed = edited[mask].astype(float)
    # Most of the bite is now background-coloured.
    assert np.mean(np.abs(removed - background).max(axis=1) < 25) > 0.5


def test_missing_on_a_texture_is_a_darker_fracture():
    image, _, edited, mask = _render("missing", "brick", "a large chip", 4)
    assert mask.any()
    assert edited[mask].mean() < image[mask].mean() - 10


def test_colour_tints_colour_images_only():
    _, _, edited, mask = _render("stain", "part", "a large rust stain", 2)
    changed = edited[mask].astype(float)
    assert (changed[:, 0] - changed[:, 2]).mean() > 20  # rust is red over blue
    image, _, edited, mask = _render("stain", "gray_part", "a large rust stain", 2)
    assert mask.any() and is_grayscale(edited)


def test_dark_and_bright_polarity():
    image, _, dark, mask_dark = _render("scratch", "part", "a long dark scratch", 8)
    _, _, bright, mask_bright = _render("scratch", "part", "a long bright scratch", 8)
    assert dark[mask_dark].mean() < image[mask_dark].mean()
    assert bright[mask_bright].mean() > image[mask_bright].mean()


def test_given_region_is_respected():
    image, object_map = IMAGES["brick"], MAPS["brick"]
    rng = np.random.default_rng(0)
    params = parse_prompt("a single clearly visible stain", rng)
    region = Box(40, 60, 110, 120)
    edited, mask = render_defect("stain", image, object_map.foreground, params, rng, region)
    ys, xs = np.nonzero(mask)
    assert xs.min() >= region.x0 - 12 and xs.max() < region.x1 + 12
    assert ys.min() >= region.y0 - 12 and ys.max() < region.y1 + 12


def test_rendering_is_deterministic():
    for family in ("crack", "perlin", "poisson", "contamination"):
        first = _render(family, "part", "a defect", 21)
        second = _render(family, "part", "a defect", 21)
        assert np.array_equal(first[2], second[2]) and np.array_equal(first[3], second[3])


def test_details_record_placement_and_rendering():
    details: dict = {}
    _render("hole", "part", "a cluster of small pits", 4, details)
    assert details["family"] == "hole"
    assert len(details["instances"]) >= 3
    assert "anchor" in details["placement"]
    json.dumps(details)


def test_render_speed_at_512px():
    image = np.repeat(data.grass()[..., None], 3, axis=2)  # 512 x 512
    foreground = np.ones(image.shape[:2], dtype=bool)
    timings = []
    for family in FAMILIES:
        rng = np.random.default_rng(0)
        params = parse_prompt("a large clearly visible defect", rng)
        start = time.perf_counter()
        render_defect(family, image, foreground, params, rng)
        timings.append(time.perf_counter() - start)
    # Generous bound for a shared CI machine; the measured figure is far lower (see report).
    assert np.median(timings) < 0.25


# --- the ImageGenerator backend ------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator():
    return ProceduralImageGenerator(load_knowledge_base())


def test_generator_uses_the_knowledge_base_family(generator):
    image = IMAGES["tile"]
    requests = [EditRequest(image, "magnetic_tile", defect, prompt, seed)
                for seed, (defect, prompt) in enumerate([
                    ("blowhole", "a small dark pore, clearly visible"),
                    ("break", "a chip at the top edge"),
                    ("crack", "a thin clearly visible crack"),
                    ("uneven", "a broad pronounced uneven patch"),
                ])]
    results = generator.generate(requests)
    assert [r.params["family"] for r in results] == ["hole", "missing", "crack", "dent"]
    for _request, result in zip(requests, results):
        assert result.mask is not None and result.mask.any()
        assert np.array_equal(result.image[~result.mask], image[~result.mask])
        assert mask_iou(result.mask, changed_pixels(image, result.image)) >= 0.85
        assert is_grayscale(result.image)
        text = json.dumps(result.params)
        assert "edit_params" in text and "object_map" in text
        ys, xs = np.nonzero(result.mask)
        region = result.region
        assert region.x0 <= xs.min() and xs.max() < region.x1
        assert region.y0 <= ys.min() and ys.max() < region.y1


def test_generator_is_deterministic_per_seed(generator):
    image = IMAGES["part"]
    request = EditRequest(image, "bottle", "scratch", "a scratch", seed=42)
    first, second = generator.generate([request, request])
    assert np.array_equal(first.image, second.image)
    assert first.params == second.params
    other = generator.generate([EditRequest(image, "bottle", "scratch", "a scratch", seed=43)])[0]
    assert not np.array_equal(first.image, other.image)


def test_generator_region_on_and_off_the_object(generator):
    image, object_map = IMAGES["part"], MAPS["part"]
    on = Box(150, 150, 230, 200)
    request = EditRequest(image, "cap", "stain", "a single dark stain", 3, on)
    result = generator.generate([request])[0]
    assert result.params["placement"]["anchor"] == "given"
    ys, xs = np.nonzero(result.mask)
    assert on.x0 - 15 <= xs.min() and xs.max() < on.x1 + 15
    # A box in the background (a table corner) is ignored: the defect still lands on the part.
    off = Box(0, 0, 40, 40)
    result = generator.generate([EditRequest(image, "cap", "stain", "a dark stain", 3, off)])[0]
    assert result.params["placement"]["reason"] == "off the object"
    assert result.mask.any() and not (result.mask & ~object_map.foreground).any()


def test_missing_bite_takes_the_whole_outline_of_the_part():
    """No sliver of the part may survive outside the bite where the foreground mask is coarse."""
    image, object_map, edited, mask = _render("missing", "part", "a large chip at the edge", 12)
    background = np.asarray(object_map.background_color, dtype=float)
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    ring = grown & ~mask & ~object_map.foreground
    # Just outside the bite and off the object: background colour, no leftover part pixels.
    assert np.mean(np.abs(edited[ring].astype(float) - background).max(axis=1) < 30) > 0.9


def test_several_pieces_share_a_given_region(generator):
    image = IMAGES["brick"]
    region = Box(60, 80, 200, 180)
    for seed in range(6):
        request = EditRequest(image, "wall", "hole", "a cluster of small dark pits", seed, region)
        result = generator.generate([request])[0]
        assert len(result.params["render"]["instances"]) >= 3
        ys, xs = np.nonzero(result.mask)
        assert xs.min() >= region.x0 - 3 and xs.max() < region.x1 + 3
        assert ys.min() >= region.y0 - 3 and ys.max() < region.y1 + 3
        inner = result.region  # the boxes and the mask: a pit's rim may spill as above
        assert region.x0 - 3 <= inner.x0 and inner.x1 <= region.x1 + 3
        assert region.y0 - 3 <= inner.y0 and inner.y1 <= region.y1 + 3


def test_generator_without_knowledge_base_falls_back_to_keywords():
    result = ProceduralImageGenerator(None).generate(
        [EditRequest(IMAGES["brick"], "wall", "oil_stain", "a clearly visible oil stain", 1)])[0]
    assert result.params["family"] == "stain"
    assert result.mask.any()


# --- one piece per thin defect ----------------------------------------------------------------------


def _pieces(mask: np.ndarray) -> int:
    """Connected pieces, edge-adjacent only: a line touching at pixel corners is broken."""
    count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
    return count - 1


@pytest.mark.parametrize("family", ["crack", "scratch"])
@pytest.mark.parametrize("name", ["brick", "part", "gray_part"])
def test_a_thin_defect_is_one_connected_piece(family, name):
    # Jagged, branching, diagonal and hair-thin: the hardest case for connectivity. Both the
    # rendered change and the mask must be one piece per instance, branches included.
    image, object_map = IMAGES[name], MAPS[name]
    for seed in range(6):
        rng = np.random.default_rng(seed)
        params = parse_prompt("a long jagged diagonal faint line, one pixel wide", rng)
        params.count = 1
        details: dict = {}
        edited, mask = render_defect(family, image, object_map.foreground, params, rng,
                                     details=details)
        assert mask.sum() >= 10
        changed = changed_pixels(image, edited)
        assert _pieces(changed) == 1, (seed, details)
        assert _pieces(mask) == 1, (seed, details)
        assert mask_iou(mask, changed) >= 0.9


def test_a_crack_from_the_knowledge_base_is_one_piece_through_the_mask_generator(generator):
    image = IMAGES["tile"]
    category = "magnetic_tile"
    prompt = ("Edit only one region of the magnetic tile. Add a crack defect. Look: A single "
              "crack: a thin, dark, jagged line with small branches. Size: Long and thin: one "
              "third to most of the tile width in length, one to three pixels wide.")
    masks = DifferenceMaskGenerator()
    for seed in range(4):
        result = generator.generate([EditRequest(image, category, "crack", prompt, seed)])[0]
        mask = masks.generate_masks([MaskRequest(image, result.image, result.mask)])[0].mask
        assert _pieces(mask) == 1, seed
        # "one to three pixels wide": the mask's area over its skeleton's length.
        width = mask.sum() / skeletonize(mask).sum()
        assert 1.0 <= width <= 3.5, width


def test_a_crack_running_in_from_an_edge_opens_there():
    from appliance.tools.image_gen.renderers.base import taper

    profile = taper(40, power=0.6, floor=0.2, open_start=True)
    assert profile[0] == profile.max() and np.all(np.diff(profile) <= 0) and profile[-1] == pytest.approx(0.2)
    from appliance.tools.image_gen.placement import inside_distance

    inside = inside_distance(MAPS["tile"])
    for seed in range(4):
        details = {}
        _, _, _, mask = _render("crack", "tile", "a long thin crack running inward from the edge",
                                seed, details)
        assert details["instances"][0]["from_edge"]
        assert inside[mask].min() <= 3  # it starts at the border


def test_even_a_faint_dent_is_drawn_where_it_can_be_seen():
    """"Shallow" is the dent's depth, not a licence to be invisible: on the dark tile the shading
    of a faint dent fell below the judge's floor 3 times in 4; now it stays above it, and a
    strong one still shows more than a faint one."""
    from appliance.imaging import VISIBLE_PEAK, change_map

    def peak(prompt, seed):
        image, _, edited, mask = _render("dent", "tile", prompt, seed)
        return float(np.percentile(change_map(image, edited)[mask], 90))

    faint = [peak("a very faint, shallow unevenness", seed) for seed in range(6)]
    strong = [peak("a strong, clearly visible unevenness", seed) for seed in range(6)]
    assert min(faint) >= VISIBLE_PEAK, faint
    assert np.median(strong) > np.median(faint)


def test_a_chip_at_the_edge_of_a_full_frame_face_is_as_large_as_asked():
    """A full-frame photo does not show where the part ends, so a chip "at the edge" sits just
    inside the frame, near it, and whole: its box is not cut short by the border (it came out at
    0.65x the asked size when it was)."""
    from appliance.tools.image_gen.placement import inside_distance, object_extent

    object_map = MAPS["tile"]
    inside = inside_distance(object_map)
    asked = 0.10 * object_extent(object_map)
    extents = []
    for seed in range(12):
        _, _, _, mask = _render("missing", "tile",
                                "a chip about 10 percent of the tile width at the edge", seed)
        ys, xs = np.nonzero(mask)
        extents.append(max(np.ptp(ys), np.ptp(xs)) + 1)
        assert inside[mask].min() <= asked  # near the edge
    assert 0.8 * asked <= np.median(extents) <= 1.25 * asked, (extents, asked)
