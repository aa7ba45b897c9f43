"""The CPU engine calibrated from real defects (issue 12): the profile measured from the real
magnetic tile defects, the transplant renderer's contract, the calibrated generator and judge,
and `appliance retrain` on the CPU engine storing, promoting and rolling back a profile that
the next batch records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.imaging import changed_pixels, is_grayscale, mask_iou
from appliance.tools.image_gen.calibration import (
    CalibrationProfile,
    Calibrations,
    build_profile,
    major_axis,
    size_rank,
)
from appliance.tools.image_gen.procedural import ProceduralImageGenerator
from appliance.tools.image_gen.transplant import transplant
from appliance.tools.interfaces import EditRequest, Issue, QualityRequest
from appliance.tools.object_map import find_object
from appliance.tools.quality_eval.heuristic import HeuristicQualityEvaluator

from conftest import require_tiles

CATEGORY = "magnetic_tile"
SIZE = 192
TYPES = ("MT_Blowhole", "MT_Crack", "MT_Break")


@pytest.fixture(scope="module")
def defects_dir(tmp_path_factory) -> Path:
    """Six real photos with masks of each of three defect types, in the DEFECTS layout."""
    root = tmp_path_factory.mktemp("plant") / "defects"
    for folder in TYPES:
        target = root / folder
        target.mkdir(parents=True)
        for photo in sorted(require_tiles(folder, "Imgs").glob("*.jpg"))[:6]:
            shutil.copy(photo, target / photo.name)
            shutil.copy(photo.with_suffix(".png"), target / photo.with_suffix(".png").name)
    return root


@pytest.fixture(scope="module")
def profile(defects_dir) -> CalibrationProfile:
    from appliance.evaluation.data import load_defect_folder

    items = load_defect_folder(defects_dir, SIZE, skipped=[], nonempty=True)
    return build_profile(CATEGORY, [(it.image, it.mask, it.defect, it.source) for it in items])


@pytest.fixture(scope="module")
def normals(tile_images) -> list[np.ndarray]:
    from appliance.evaluation.data import resize_image

    return [resize_image(image, SIZE) for image in tile_images]


def test_profile_measures_the_real_defects_and_survives_a_round_trip(profile, tmp_path):
    assert set(profile.priors) == {"blowhole", "crack", "break"}
    blowhole, crack = profile.priors["blowhole"], profile.priors["crack"]
    # Blowholes are small round pits, cracks long thin lines: the priors must say so.
    assert blowhole.quantile("sizes", 0.5) < crack.quantile("sizes", 0.5)
    assert blowhole.quantile("elongations", 0.5) < crack.quantile("elongations", 0.5)
    assert blowhole.dark_share > 0.5  # pits are darker than the tile
    assert all(c >= 1 for c in crack.counts) and len(crack.counts) == 6
    assert all(p > 0 for p in crack.peaks)
    assert len(crack.positions) == len(crack.sizes)
    assert all(-0.01 <= u <= 1.01 and -0.01 <= v <= 1.01 for u, v in crack.positions)
    for crops in profile.bank.values():
        for crop in crops:
            assert crop.image.shape[:2] == crop.mask.shape and crop.mask.any()

    profile.save(tmp_path / "p")
    loaded = CalibrationProfile.load(tmp_path / "p", digest="abc")
    assert loaded.priors == profile.priors and loaded.digest == "abc"
    for defect, crops in profile.bank.items():
        for a, b in zip(crops, loaded.bank[defect]):
            assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)


def test_profile_refuses_examples_without_a_usable_mask(tile_image):
    with pytest.raises(ValueError, match="no usable real defect"):
        build_profile(CATEGORY, [(tile_image, np.zeros(tile_image.shape[:2], bool), "crack", "x")])


def test_a_wide_defect_is_left_out_and_a_narrow_one_measured_whole(normals, tmp_path):
    """The surface under a wide patch cannot be told from its rim: measured against a smear, the
    patch's "contrast" would be the tile's own grain, and a transplant of it would carry the
    surface (grain, printing) with it. Such a defect is counted, not measured; a type with no
    other defect is left to the knowledge base's defaults. A narrow pit gives size and look."""
    tile = normals[0]
    pit, patch = tile.copy(), tile.copy()
    yy, xx = np.mgrid[:SIZE, :SIZE]
    pit_mask = (yy - 60) ** 2 + (xx - 70) ** 2 <= 5 ** 2
    patch_mask = (abs(yy - 96) < 45) & (abs(xx - 96) < 60)
    pit[pit_mask] = (pit[pit_mask] * 0.4).astype(np.uint8)
    patch[patch_mask] = (patch[patch_mask] * 0.8).astype(np.uint8)
    far_pit = (yy - 20) ** 2 + (xx - 175) ** 2 <= 5 ** 2  # a photo with a pit and a patch
    both = patch.copy()
    both[far_pit] = (both[far_pit] * 0.4).astype(np.uint8)
    built = build_profile(CATEGORY, [(pit, pit_mask, "pit", "a"), (patch, patch_mask, "patch", "b"),
                                     (both, far_pit | patch_mask, "pit", "c")])
    assert "patch" not in built.priors and not built.bank.get("patch")
    assert built.unmeasured == {"patch": 1, "pit": 1}
    pits = built.priors["pit"]
    assert len(pits.sizes) == len(pits.peaks) == len(built.bank["pit"]) == 2
    assert min(pits.peaks) > 30 and pits.dark_share == 1.0 and max(pits.sizes) < 0.1
    built.save(tmp_path / "p")
    assert CalibrationProfile.load(tmp_path / "p").unmeasured == built.unmeasured
    with pytest.raises(ValueError, match="too wide to measure"):
        build_profile(CATEGORY, [(patch, patch_mask, "patch", "b")])


def test_a_defect_that_fools_the_part_finder_is_measured_on_the_whole_frame(tmp_path):
    """This real break is a large dark wedge: on its own the part finder takes a sliver of the
    tile for the part, off the break, and the break would cover three times the part's area."""
    from appliance.evaluation.data import load_defect_folder
    from appliance.tools.image_gen.calibration import part_around

    photo = require_tiles("MT_Break", "Imgs") / "exp3_num_304317.jpg"
    folder = tmp_path / "defects" / "MT_Break"
    folder.mkdir(parents=True)
    for source in (photo, photo.with_suffix(".png")):
        shutil.copy(source, folder / source.name)
    (item,) = load_defect_folder(folder.parent, SIZE, skipped=[], nonempty=True)
    fooled = find_object(item.image).foreground
    assert fooled.mean() < 0.2 and fooled[item.mask].mean() < 0.5
    assert part_around(item.image, item.mask).foreground.all()
    narrow = find_object(item.image)  # and a defect on the part keeps the part found
    assert part_around(item.image, fooled & ~item.mask).foreground.sum() == narrow.foreground.sum()


def test_transplant_keeps_the_mask_contract_and_is_reproducible(profile, normals):
    crops = profile.bank["crack"] + profile.bank["blowhole"]
    for seed, normal in enumerate(normals[:4]):
        foreground = find_object(normal).foreground
        edited, mask, details = transplant(normal, foreground, crops, 2,
                                           np.random.default_rng(seed), gray=is_grayscale(normal))
        assert mask.any(), details
        assert np.array_equal(edited[~mask], normal[~mask])  # bit-identical outside the mask
        assert mask_iou(mask, changed_pixels(normal, edited)) >= 0.9
        assert not (mask & ~foreground).any()
        assert is_grayscale(edited) == is_grayscale(normal)
        again, mask_again, _ = transplant(normal, foreground, crops, 2, np.random.default_rng(seed),
                                          gray=is_grayscale(normal))
        assert np.array_equal(again, edited) and np.array_equal(mask_again, mask)
        assert details["family"] == "transplant" and details["instances"][0]["source"]


def test_size_words_mean_the_plants_sizes(profile, normals):
    """"small" and "large" pick the lower and upper part of the plant's own sizes, on the
    procedural path and the transplant path alike."""
    assert size_rank(0.03) < size_rank(0.3) <= 1.0
    for share in (0.0, 1.0):
        generator = ProceduralImageGenerator(calibrations=Calibrations({CATEGORY: profile}),
                                             transplant_share=share)
        areas = {}
        for word in ("very small", "very large"):
            masks = [generator.generate([EditRequest(normals[i % len(normals)], CATEGORY, "crack",
                                                     f"a single {word} crack", seed=i)])[0].mask
                     for i in range(8)]
            areas[word] = np.mean([major_axis(m) for m in masks])  # a crack's length
        assert areas["very large"] > 1.5 * areas["very small"], (share, areas)


def test_uncalibrated_engine_is_unchanged_and_calibrated_one_records_its_profile(profile, normals):
    request = EditRequest(normals[0], CATEGORY, "crack", "a thin crack", seed=5)
    plain = ProceduralImageGenerator().generate([request])[0]
    other_category = ProceduralImageGenerator(
        calibrations=Calibrations({"screw": profile})).generate([request])[0]
    assert np.array_equal(plain.image, other_category.image)
    assert "calibration" not in plain.params
    profile.digest = "0123456789abcdef"
    calibrated = ProceduralImageGenerator(
        calibrations=Calibrations({CATEGORY: profile}), transplant_share=1.0).generate([request])[0]
    assert calibrated.params["calibration"] == "0123456789abcdef"
    assert calibrated.params["family"] == "transplant"


def test_judge_refuses_what_the_instruction_or_the_plant_rules_out(profile, normals):
    normal = normals[1]
    small = ProceduralImageGenerator().generate(
        [EditRequest(normal, CATEGORY, "blowhole", "a tiny dark pit", seed=3)])[0].image
    judge = HeuristicQualityEvaluator()
    # The same small pit: fine when nothing asked for a size, refused when "large" was asked.
    plain = judge.evaluate([QualityRequest(normal, small, CATEGORY, "blowhole")])[0]
    asked_large = judge.evaluate([QualityRequest(normal, small, CATEGORY, "blowhole",
                                                 "a very large blowhole")])[0]
    assert Issue.TOO_SMALL not in plain.issues
    assert Issue.TOO_SMALL in asked_large.issues and asked_large.measurements["asked"] == 1.0
    assert "than the instruction asks" in asked_large.review

    # A defect covering a third of the tile: within the generic limits' reach of a large
    # defect type, but far beyond any real blowhole of this plant.
    big = normal.copy()
    big[40:140, 40:140] = (big[40:140, 40:140] * 0.6).astype(np.uint8)
    calibrated = HeuristicQualityEvaluator(calibrations=Calibrations({CATEGORY: profile}))
    report = calibrated.evaluate([QualityRequest(normal, big, CATEGORY, "blowhole")])[0]
    assert Issue.TOO_LARGE in report.issues and report.measurements["plant_size"] == 1.0
    assert "real defects" in report.review


def _run(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli.main", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=env)


def test_retrain_on_the_cpu_engine_calibrates_promotes_and_rolls_back(tmp_path, tile_paths,
                                                                     defects_dir):
    shutil.copytree(defects_dir, tmp_path / "defects")
    env = {**os.environ, "APPLIANCE_MODELS": str(tmp_path / "models"), "PYTHONUNBUFFERED": "1"}

    wrong = _run("retrain", "defects", "--category", CATEGORY, "--engine", "cpu", "--stage", "sft",
                 env=env, cwd=tmp_path)
    assert wrong.returncode == 2 and "scripted one" in wrong.stderr and "--stage calibrate" in wrong.stderr

    # -1: promoted whatever the check measures (what it measures is the next test's business).
    done = _run("retrain", "defects", "--category", CATEGORY, "--engine", "cpu", "--out", "run",
                "--calibration-margin", "-1", "--nice", "3", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    figures = report["stages"]["calibrate"]
    assert list(report["stages"]) == ["calibrate"]
    assert figures["train_photos"] + figures["heldout_photos"] == 18
    # Both engines ran the same episodes from the 15 training photos, 105 (at least 100), and
    # their samples trained a detector per seed that scored the 3 held-out photos.
    for engine in ("before", "after"):
        assert figures[engine]["episodes"] == 105
        assert len(figures[engine]["pixel_ap_by_seed"]) == 3
        assert 0 < figures[engine]["pixel_ap"] <= 1
        assert figures[engine]["pixel_ap"] == pytest.approx(
            np.mean(figures[engine]["pixel_ap_by_seed"]), abs=1e-4)
    assert figures["promote"] is True and figures["bootstrap"]["reached"] == 1.0
    assert figures["detector"]["niceness"] == min(os.nice(0) + 3, 19)  # it gave way as asked
    digest = figures["profile"]["digest"]
    assert "## Calibration of the CPU engine" in done.stdout and digest in done.stdout
    assert "held-out pixel AP" in done.stdout and "**promoted**" in done.stdout
    assert "reached in 100% of 2000 resamples of the held-out photos and seeds" in done.stdout
    active = json.loads((tmp_path / "models" / "calibration" / CATEGORY / "active.json").read_text())
    assert active == {"active": digest, "history": []}
    stored = tmp_path / "models" / "calibration" / CATEGORY / digest
    from appliance.models.calibrations import CALIBRATIONS

    assert CALIBRATIONS.version_hash(stored) == digest  # the folder is what its name says

    # The next batch uses it, and every sample says which profile made it.
    inbox = tmp_path / "inbox" / CATEGORY
    inbox.mkdir(parents=True)
    for path in tile_paths[:2]:
        shutil.copy(path, inbox / path.name)
    (inbox / "spec.toml").write_text('defects = ["crack", "blowhole"]\n')
    batch = _run("batch", str(inbox.parent), "--out", "dataset", "--no-progress", "--engine", "cpu",
                 env=env, cwd=tmp_path)
    assert batch.returncode == 0, batch.stderr
    assert f"accepted per type  {CATEGORY}/blowhole " in batch.stdout  # the judge's rate per type
    records = [json.loads(line) for line in
               (tmp_path / "dataset" / "manifest.jsonl").read_text().splitlines()]
    assert records and all(r["engine_detail"]["calibration"] == {CATEGORY: digest} for r in records)

    back = _run("retrain", "--rollback", "--calibration", "--category", CATEGORY, env=env,
                cwd=tmp_path)
    assert back.returncode == 0 and "no calibration profile is active" in back.stdout
    again = _run("retrain", "--rollback", "--calibration", "--category", CATEGORY, env=env,
                 cwd=tmp_path)
    assert again.returncode == 1 and "nothing to roll back" in again.stderr


def test_the_calibration_check_refuses_a_profile_that_teaches_the_detector_less(defects_dir,
                                                                              tmp_path,
                                                                              monkeypatch):
    """Masks drawn in the wrong place (a speck of intact surface) make a profile of invisible
    "defects" that teaches a detector nothing about the real ones: the held-out check refuses it
    on every detector seed. The held-out photos keep their true masks."""
    from dataclasses import replace

    from appliance.engine import build_engine
    from appliance.evaluation.data import load_defect_folder
    from appliance.training.calibrate import calibrate
    from appliance.training.reverse_synthesis import reverse_synthesize
    from appliance.training.trajectories import DefectExample

    monkeypatch.setenv("APPLIANCE_MODELS", str(tmp_path / "models"))  # no profile active yet
    items = load_defect_folder(defects_dir, SIZE, skipped=[], nonempty=True)
    train, heldout = [], []
    for defect in sorted({it.defect for it in items}):
        photos = [it for it in items if it.defect == defect]
        for it in photos[:-1]:
            speck = np.zeros_like(it.mask)
            speck[150:156, 20:26] = True
            wrong = replace(it, mask=speck)
            train.append(DefectExample(f"{defect}/{len(train)}", wrong,
                                       reverse_synthesize(it.image, speck)))
        it = photos[-1]
        heldout.append(DefectExample(f"{defect}/held", it, reverse_synthesize(it.image, it.mask)))

    engine = build_engine()
    _, figures = calibrate(engine, CATEGORY, train, heldout, seed=0, repeats=2, margin=0.0)
    before, after = figures["before"], figures["after"]
    assert before["episodes"] == after["episodes"] == 105  # 15 photos, 7 times: at least 100
    assert figures["promote"] is False and figures["seeds_higher"] == 0
    assert figures["bootstrap"]["reached"] < 0.2 and figures["bootstrap"]["interval_90"][1] < 0
    assert after["pixel_ap"] < 0.7 * before["pixel_ap"]
    assert engine.calibrations.get(CATEGORY) is None  # the check leaves the engine as it found it


def test_the_service_reloads_its_engine_when_a_profile_is_promoted(tmp_path, monkeypatch, profile):
    """The nightly service picks up what `appliance retrain` promoted at its next batch, with no
    restart; an unchanged shelf keeps the engine it has."""
    from appliance.config import load_config
    from appliance.models.calibrations import CALIBRATIONS, store_profile
    from appliance.service.daemon import Service

    models = tmp_path / "models"
    monkeypatch.setenv("APPLIANCE_MODELS", str(models))
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[paths]\nroot = "{tmp_path}"\n')
    service = Service(load_config(config_file), role="runner")
    assert service.start()
    try:
        assert service.runner.engine.calibrations.get(CATEGORY) is None
        assert service.reload_if_promoted() is False
        digest = store_profile(models, profile, {"note": "test"})
        CALIBRATIONS.promote(models, CATEGORY, digest)
        assert service.reload_if_promoted() is True
        assert service.runner.engine.calibrations.get(CATEGORY).digest == digest
        assert service.writer.engine["calibration"] == {CATEGORY: digest}
        assert service.reload_if_promoted() is False
        CALIBRATIONS.rollback(models, CATEGORY)
        assert service.reload_if_promoted() is True
        assert service.runner.engine.calibrations.get(CATEGORY) is None

        # A scratch folder left by a killed retrain, and a stray folder, are no categories.
        (models / "calibration" / ".profile-abc").mkdir()
        (models / "calibration" / CATEGORY / ".profile-def").mkdir()
        assert service.reload_if_promoted() is False
        # A promoted profile that cannot be read: the night goes on with the engine it has.
        broken = models / "calibration" / CATEGORY / "badbadbadbadbad0"
        broken.mkdir()
        (broken / "profile.json").write_text('{"format": 1, "category": "magnetic_tile"}')
        CALIBRATIONS.promote(models, CATEGORY, "badbadbadbadbad0")
        before = service.runner
        assert service.reload_if_promoted() is False
        assert service.runner is before and service.runner.engine is not None
        assert service.reload_if_promoted() is False  # not retried every batch
    finally:
        service.close()


def test_procedural_contrast_follows_the_plants_peaks(profile, normals):
    """On a calibrated category the rendered defect's peak change is the plant's at the rank the
    severity asks ("faint" a faint one of theirs), and the mask stays the changed pixels."""
    from appliance.imaging import change_map
    from appliance.tools.image_gen.calibration import plant_peak

    priors = profile.priors["crack"]
    generator = ProceduralImageGenerator(calibrations=Calibrations({CATEGORY: profile}),
                                         transplant_share=0.0)
    peaks: dict[str, list[float]] = {}
    close: list[bool] = []
    for word in ("very faint", "strongly pronounced"):
        for i in range(8):
            normal = normals[i % len(normals)]
            result = generator.generate([EditRequest(normal, CATEGORY, "crack",
                                                     f"a single {word} dark crack", seed=i)])[0]
            assert mask_iou(changed_pixels(normal, result.image), result.mask) >= 0.9
            assert np.array_equal(result.image[~result.mask], normal[~result.mask])
            measured = float(np.percentile(change_map(normal, result.image)[result.mask], 90))
            peaks.setdefault(word, []).append(measured)
            info = result.params["render"].get("contrast")
            if info is None:  # this draw kept the renderer's contrast (priors.trust())
                continue
            target = plant_peak(priors, result.params["edit_params"]["severity"])
            assert info["target_peak"] == round(target, 2)
            # Never further from the plant's contrast than the renderer's own guess (a dark
            # crack on a dark tile can saturate at black).
            assert abs(measured - target) <= abs(info["peak"] - target) + 1.0, (word, i, info)
            if "peak_after" in info:
                assert round(measured, 2) == info["peak_after"]
            close.append(abs(measured - target) <= 0.25 * target + 2.0)
    assert np.mean(peaks["very faint"]) < np.mean(peaks["strongly pronounced"]), peaks
    assert len(close) >= 3 and np.mean(close) >= 0.6, close


def test_a_few_real_defects_move_the_engine_part_way(profile):
    """Five shots cannot stand for a plant: each attribute follows the profile in n / (n + 5) of
    the draws and the knowledge base's defaults otherwise; many defects decide nearly all."""
    from dataclasses import replace as with_

    from appliance.tools.image_gen.calibration import PRIOR_WEIGHT, calibrated_params
    from appliance.tools.image_gen.prompt_params import parse_prompt

    few = profile.priors["crack"]
    many = with_(few, sizes=few.sizes * 20)
    for priors in (few, many):
        n = len(priors.sizes)
        assert priors.trust() == pytest.approx(n / (n + PRIOR_WEIGHT))
        rng = np.random.default_rng(0)
        followed = []
        for _ in range(600):
            asked = parse_prompt("a dark crack", rng)
            followed.append(calibrated_params(asked, priors, rng).size != asked.size)
        assert abs(np.mean(followed) - priors.trust()) < 0.06, (n, np.mean(followed))


def _check_on(truth: np.ndarray, scores_by_seed: list[np.ndarray]):
    """CheckFigures of a detector that scored ``truth``'s photos so, once per seed."""
    from appliance.evaluation.metrics import average_precision, binned_counts
    from appliance.training.calibrate import CheckFigures

    aps = [average_precision(truth, scores) for scores in scores_by_seed]
    return CheckFigures(100, 1.0, float(np.mean(aps)), aps, 0.01, {"crack": 1.0},
                        counts=[binned_counts(truth, scores) for scores in scores_by_seed])


def test_the_gate_refuses_a_gain_that_a_few_held_out_photos_make_by_luck():
    """A profile whose detector finds one held-out photo's defect far better and every other
    photo's the same has a large measured gain, but a resample of the held-out photos without
    that one shows none: on 4 photos the gate refuses it. The same gain on every one of 40
    photos is promoted. With the margin at -1 anything measured is promoted."""
    from appliance.training.calibrate import decide

    def scene(photos: int, better: list[int]):
        rng = np.random.default_rng(photos)
        truth = np.zeros((photos, 32, 32), bool)
        truth[:, 12:18, 8:24] = True
        before, after = [], []
        for _ in range(3):  # three detector seeds, each its own noise
            noise = rng.normal(0.2, 0.1, truth.shape)
            signal = truth * rng.normal(0.15, 0.1, truth.shape)
            before.append(noise + signal)
            lift = np.zeros(truth.shape)
            lift[better] = truth[better] * 0.3
            after.append(noise + signal + lift)
        return _check_on(truth, before), _check_on(truth, after)

    before, after = scene(4, [2])
    lucky = decide(before, after, margin=0.05, confidence=0.8, seed=0)
    assert lucky["pixel_ap_gain"] > 0.2 and lucky["seeds_higher"] == 3
    assert 0.5 < lucky["bootstrap"]["reached"] < 0.8  # the resamples that drew photo 2
    assert lucky["bootstrap"]["interval_90"][0] <= 0.0 < lucky["bootstrap"]["interval_90"][1]
    assert lucky["promote"] is False
    assert decide(before, after, margin=0.05, confidence=0.0, seed=0)["promote"] is True
    assert decide(before, after, margin=-1, confidence=0.8, seed=0)["promote"] is True

    before, after = scene(40, list(range(40)))
    clear = decide(before, after, margin=0.05, confidence=0.8, seed=0)
    assert clear["bootstrap"]["reached"] > 0.95 and clear["bootstrap"]["interval_90"][0] > 0.05
    assert clear["promote"] is True
    # Worse everywhere: refused, and the interval says so.
    worse = decide(after, before, margin=0.0, confidence=0.8, seed=0)
    assert worse["promote"] is False and worse["bootstrap"]["interval_90"][1] < 0


def test_the_calibration_report_says_what_was_not_measured_and_reads_old_runs():
    """An engine with fewer than 5 accepted samples has no figures: None in the JSON (not NaN or
    Infinity, which strict JSON readers refuse) and "not measured" in the report. A run finished
    before the check measured teaching still renders when resumed."""
    from appliance.training.calibrate import CheckFigures, relative_change
    from appliance.training.stages import render_report

    none = CheckFigures(12, 0.25, float("nan"), [], float("inf"), {"crack": 0.25})
    some = CheckFigures(12, 1.0, 0.21, [0.2, 0.22, 0.21], 0.01, {"crack": 1.0})
    assert json.loads(json.dumps(none.as_dict(), allow_nan=False))["pixel_ap"] is None
    assert relative_change(none.pixel_ap, some.pixel_ap) == 1.0
    assert relative_change(some.pixel_ap, none.pixel_ap) == -1.0
    base = {"category": CATEGORY, "photos": 6, "defects": "d", "photos_by_type": {"crack": 6},
            "skipped": []}
    calibrate = {"train_photos": 5, "heldout_photos": 1,
                 "profile": {"digest": "abc", "defects": {}}, "before_profile": None,
                 "detector": {"seeds": [0, 1, 2], "epochs": 15, "side": 256},
                 "pixel_ap_gain": 1.0, "seeds_higher": 0, "distance_drop": 1.0, "margin": 0.05,
                 "promote": True}
    text = render_report(base | {"stages": {"calibrate": calibrate | {
        "before": none.as_dict(), "after": some.as_dict()}}})
    assert "| before (uncalibrated) | 12 | 25% | not measured | - | not measured |" in text
    assert "pixel AP not compared (before not measured)" in text and "**promoted**" in text
    assert "resamples" not in text  # nothing to resample where an engine was not measured
    spread = {"reached": 0.703, "required": 0.8, "interval_90": [-0.0002, 0.7226], "resamples": 2000}
    text = render_report(base | {"stages": {"calibrate": calibrate | {
        "before": some.as_dict(), "after": some.as_dict(), "bootstrap": spread,
        "promote": False}}})
    assert ("+5 % required, reached in 70% of 2000 resamples of the held-out photos and seeds "
            "(80% required, 90 % of them between -0.0 % and +72.3 %): **refused**") in text
    old = {"train_photos": 5, "heldout_photos": 1, "profile": {"digest": "abc"},
           "distance_drop": 0.2, "margin": 0.05, "promote": True}
    assert "+20.0% lower, promoted" in render_report(base | {"stages": {"calibrate": old}})
