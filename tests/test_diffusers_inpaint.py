"""SDXL inpainting and Flux Fill backends on tiny random-weight pipelines (real diffusers code)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import require_module

require_module("diffusers")

from appliance.tools.interfaces import Box, EditRequest  # noqa: E402

BACKENDS = ("sdxl-inpaint", "flux-fill")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster single-threaded on a busy 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory, one_thread):
    from appliance.models.tiny_diffusion import build_tiny_flux_fill, build_tiny_sdxl_inpaint

    root = tmp_path_factory.mktemp("tiny-diffusion")
    return {"sdxl-inpaint": build_tiny_sdxl_inpaint(root / "sdxl"),
            "flux-fill": build_tiny_flux_fill(root / "flux")}


@pytest.fixture(scope="module")
def generators(pipeline_dirs):
    from appliance.models.tiny_diffusion import TINY_SETTINGS
    from appliance.tools.image_gen.diffusers_inpaint import DiffusersInpaintGenerator
    from appliance.tools.knowledge.base import load_knowledge_base

    kb = load_knowledge_base()
    built = {name: DiffusersInpaintGenerator(folder, name, TINY_SETTINGS, kb)
             for name, folder in pipeline_dirs.items()}
    yield built
    for generator in built.values():
        generator.close()


@pytest.fixture(scope="module")
def photo(texture_image):
    return np.ascontiguousarray(texture_image[:96, :128])


def _outside(region: Box, shape) -> np.ndarray:
    outside = np.ones(shape[:2], dtype=bool)
    outside[region.y0:region.y1, region.x0:region.x1] = False
    return outside


@pytest.mark.parametrize("backend", BACKENDS)
def test_inpaints_inside_the_region_only(generators, photo, backend):
    generator = generators[backend]
    requests = [
        EditRequest(photo, "magnetic_tile", "crack", "a thin dark crack near the top edge", seed=11),
        EditRequest(photo, "magnetic_tile", "stain", "a round brown stain", seed=12,
                    region=Box(20, 30, 60, 70)),
    ]
    results = generator.generate(requests)
    assert len(results) == 2
    for request, result in zip(requests, results):
        assert result.image.shape == photo.shape and result.image.dtype == np.uint8
        outside = _outside(result.region, photo.shape)
        # Bit-exact outside the region: the VAE round trip must not leak into the photo.
        assert np.array_equal(result.image[outside], photo[outside])
        changed = np.any(result.image != photo, axis=2)
        assert changed.sum() > 20, "the model painted nothing inside the region"
        assert result.mask is None
        assert result.params["seed"] == request.seed
        assert result.params["backend"] == backend
        assert result.params["steps"] == 2 and result.params["resolution"] == 64
        assert result.params["batch_size"] == 2
    assert results[1].region == Box(20, 30, 60, 70)
    assert results[1].params["region_source"] == "policy"
    assert results[0].params["region_source"].startswith("placement:")


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_results_do_not_depend_on_the_batch(generators, photo, backend):
    generator = generators[backend]
    request = EditRequest(photo, "magnetic_tile", "blowhole", "a small dark pit", seed=5,
                          region=Box(60, 20, 90, 50))
    other = replace(request, seed=6)
    alone = generator.generate([request])[0].image
    batched = generator.generate([other, request])
    assert np.array_equal(alone, batched[1].image)
    assert not np.array_equal(batched[0].image, batched[1].image)


def test_placement_puts_the_defect_on_the_part(generators):
    # A bright disc on a dark plain background: the part is the disc.
    import cv2

    image = np.full((96, 96, 3), 20, np.uint8)
    cv2.circle(image, (60, 50), 24, (200, 190, 180), -1)
    noise = np.random.default_rng(0).integers(0, 6, image.shape, dtype=np.uint8)
    image = cv2.add(image, noise)
    generator = generators["sdxl-inpaint"]
    for seed in range(4):
        plan = generator.plan(EditRequest(image, "bottle", "contamination", "a small dark speck",
                                          seed=seed))
        cy, cx = np.argwhere(plan.footprint).mean(axis=0)
        assert np.hypot(cx - 60, cy - 50) < 24, f"seed {seed}: footprint centre off the part"
        assert plan.alpha.max() == pytest.approx(1.0)
        window = plan.footprint[plan.crop.y0:plan.crop.y1, plan.crop.x0:plan.crop.x1]
        assert np.all(plan.alpha[~window] == 0)


def test_crop_stays_in_the_photo_and_holds_the_region(generators, photo):
    generator = generators["flux-fill"]
    for region in (Box(0, 0, 10, 10), Box(118, 86, 128, 96), Box(10, 5, 120, 90)):
        plan = generator.plan(EditRequest(photo, "tile", "crack", "crack", 1, region=region))
        crop = plan.crop
        assert 0 <= crop.x0 <= region.x0 and region.x1 <= crop.x1 <= photo.shape[1]
        assert 0 <= crop.y0 <= region.y0 and region.y1 <= crop.y1 <= photo.shape[0]


def test_engine_builds_the_backend_from_an_installed_manifest(tmp_path, photo):
    from appliance.agent.episode import EpisodeSpec
    from appliance.engine import EngineConfig, build_engine
    from appliance.models.tiny_models import build_tiny_models

    build_tiny_models(tmp_path / "models", parts=["sdxl"])
    config = replace(EngineConfig(), name="test", image_gen="sdxl-inpaint",
                     models_dir=tmp_path / "models")
    engine = build_engine(config)
    try:
        assert engine.tools.image_gen.name == "sdxl-inpaint"
        result = engine.environment.run([EpisodeSpec(photo, "magnetic_tile", "crack", 3)],
                                        engine.policy)[0]
    finally:
        engine.close()
    assert result.status in ("accepted", "rejected"), result.end_reason
    params = result.attempts[0].result.params
    assert params["backend"] == "sdxl-inpaint" and params["model"].startswith("local/sdxl-inpaint-tiny@")


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_paints_a_real_defect_back_within_its_hole(generators, photo, backend):
    """Reverse synthesis through the inpainter (``appliance retrain``'s normal counterparts):
    the grown hole is repainted, the photo beyond its feathered rim is kept bit for bit, and a
    seed gives the same counterpart every time."""
    import cv2

    from appliance.training.reverse_synthesis import GROW_PIXELS, reverse_synthesize_with

    defect = photo.copy()
    cv2.line(defect, (30, 40), (90, 52), (0, 0, 0), 2)
    mask = np.any(defect != photo, axis=2)
    generator = generators[backend]
    restored = reverse_synthesize_with(defect, mask, generator, "magnetic_tile", seed=4)
    assert restored.shape == defect.shape and restored.dtype == np.uint8
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * GROW_PIXELS + 1,) * 2, np.uint8)) > 0
    # The feather reaches 2 sigma (sigma >= 1 px, 8 % of the hole's shorter side) past the hole.
    far = cv2.dilate(grown.astype(np.uint8), np.ones((13, 13), np.uint8)) == 0
    assert np.array_equal(restored[far], defect[far])
    assert np.any(restored[mask] != defect[mask], axis=1).mean() > 0.9  # the line was painted over
    assert np.array_equal(restored, reverse_synthesize_with(defect, mask, generator,
                                                            "magnetic_tile", seed=4))
    assert np.array_equal(reverse_synthesize_with(defect, np.zeros_like(mask), generator,
                                                  "magnetic_tile", seed=4), defect)


def test_retrain_takes_normal_counterparts_from_the_engines_inpainter(tmp_path, photo):
    """With a diffusion engine and no --normal photos, the retrain run's examples are painted by
    that engine's inpainter; with --normal photos they are borrowed from them."""
    import cv2

    from appliance.engine import EngineConfig
    from appliance.evaluation.data import LabeledImage
    from appliance.models.tiny_models import build_tiny_models
    from appliance.training.run import RetrainOptions
    from appliance.training.stages import StageContext

    build_tiny_models(tmp_path / "models", parts=["sdxl"])
    config = replace(EngineConfig(), name="test", image_gen="sdxl-inpaint",
                     models_dir=tmp_path / "models")
    items = []
    for n in range(2):
        image = photo.copy()
        cv2.circle(image, (40 + 30 * n, 50), 6, (10, 10, 10), -1)
        items.append(LabeledImage(image, np.any(image != photo, axis=2), "blowhole", f"p{n}.png"))
    said: list[str] = []

    def context(normals):
        return StageContext(RetrainOptions(tmp_path / "defects", "magnetic_tile", tmp_path / "run",
                                           holdout=0.5),
                            "magnetic_tile", None, items, [], said.append, None, config,
                            normals=normals)

    ctx = context([])
    try:
        assert ctx.restorer() is ctx.engine.tools.image_gen
        train, heldout = ctx.split
        assert len(train) == len(heldout) == 1
        assert "painted by the engine's inpainter (sdxl-inpaint)" in said[-1]
        for example in train + heldout:
            hole = example.defect.mask
            assert np.any(example.normal[hole] != example.defect.image[hole], axis=1).mean() > 0.9
        borrowed = context([photo])
        borrowed._engine = ctx.engine
        borrowed_train, _ = borrowed.split
        assert "borrowed from the best-matching --normal photo" in said[-1]
        assert not np.array_equal(borrowed_train[0].normal, train[0].normal)
    finally:
        ctx.engine.close()
