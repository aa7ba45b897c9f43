"""The baselines, and a tiny end-to-end ``appliance eval`` on real magnetic tile photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_tiles
from PIL import Image

from appliance.evaluation.baselines import (CutPasteGenerator, DraemGenerator, cutpaste_patch,
                                            cutpaste_scar)
from appliance.evaluation.data import find_images, load_defect_folder, load_normals
from appliance.evaluation.generators import generate_training_set, make_generator
from appliance.imaging import changed_pixels, mask_iou

def _normals(n: int, size: int) -> list[np.ndarray]:
    """The first ``n`` defect-free magnetic tile photos (required: a missing folder fails)."""
    free = require_tiles("MT_Free", "Imgs").parent
    return [it.image for it in load_normals(find_images(free)[:n], size)]


def test_draem_is_deterministic_and_masks_what_it_changes() -> None:
    normals = _normals(6, 128)
    first = DraemGenerator().generate(normals, seed=5)
    again = DraemGenerator().generate(normals, seed=5)
    other = DraemGenerator().generate(normals, seed=6)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
               for a, b in zip(first, again))
    assert any(not np.array_equal(a.mask, b.mask) for a, b in zip(first, other))
    for sample, normal in zip(first, normals):
        assert sample.mask.any() and sample.accepted
        # Nothing outside the Perlin mask may change.
        changed = changed_pixels(normal, sample.image, threshold=1)
        assert not (changed & ~sample.mask).any()


def test_cutpaste_patch_follows_the_paper() -> None:
    image = _normals(1, 256)[0]
    for seed in range(20):
        out, mask = cutpaste_patch(image, np.random.default_rng(seed))
        ys, xs = np.nonzero(mask)
        height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert mask.sum() == height * width  # the mask is the pasted box
        assert 0.02 * 0.95 <= mask.mean() <= 0.15 * 1.05
        assert 0.3 * 0.9 <= width / height <= 1 / 0.3 * 1.1
        assert not (changed_pixels(image, out, threshold=0) & ~mask).any()


def test_cutpaste_scar_is_a_thin_rotated_strip() -> None:
    image = _normals(1, 256)[0]
    for seed in range(20):
        out, mask = cutpaste_scar(image, np.random.default_rng(seed))
        assert 2 * 10 * 0.5 <= mask.sum() <= 16 * 25 * 1.2
        assert not (changed_pixels(image, out, threshold=0) & ~mask).any()


def test_cutpaste_mixed_uses_both_variants() -> None:
    samples = CutPasteGenerator("mixed").generate(_normals(12, 64), seed=0)
    assert {s.defect for s in samples} == {"patch", "scar"}
    assert [s.source_index for s in samples] == list(range(12))


def test_baselines_report_progress_once_per_image() -> None:
    normals = _normals(3, 32)
    for generator in (DraemGenerator(), CutPasteGenerator("mixed")):
        ticks: list[int] = []
        generator.generate(normals, seed=0, progress=ticks.append)
        assert ticks == [1, 1, 1]


def test_copypaste_pastes_real_defects_and_masks_exactly_what_it_changes(tmp_path: Path) -> None:
    root = _tiny_tiles(tmp_path / "tiles")
    shots = load_defect_folder(root, 64, exclude=[root / "MT_Free"])
    normals = _normals(8, 64)
    generator = make_generator("copypaste", "magnetic_tile", ["blowhole", "crack"], shots=shots)
    first = generator.generate(normals, seed=3)
    again = generator.generate(normals, seed=3)
    other = generator.generate(normals, seed=4)
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
               for a, b in zip(first, again))
    assert any(not np.array_equal(a.mask, b.mask) for a, b in zip(first, other))
    areas = {int(s.mask.sum()) for s in shots if s.mask.any()}
    for sample, normal in zip(first, normals):
        assert sample.accepted and sample.defect in ("blowhole", "crack")
        assert int(sample.mask.sum()) in areas  # a real defect's mask, only moved (and flipped)
        changed = changed_pixels(normal, sample.image, threshold=0)
        assert not (changed & ~sample.mask).any()  # the feathering stays inside the label
        assert mask_iou(sample.mask, changed) >= 0.5  # and the real pixels did land there


def test_copypaste_needs_few_shot_examples(tmp_path: Path) -> None:
    from appliance.cli.eval_command import eval_command
    from appliance.evaluation.runner import EvalConfig

    with pytest.raises(ValueError, match="--few-shot"):
        make_generator("copypaste", "magnetic_tile", ["crack"])
    with pytest.raises(ValueError, match="few-shot"):
        EvalConfig(generators=("draem", "copypaste"))
    assert EvalConfig(few_shot=2).generators == ("ours", "draem", "cutpaste", "copypaste")
    assert EvalConfig().generators == ("ours", "draem", "cutpaste")
    root = _tiny_tiles(tmp_path / "tiles")
    result = CliRunner().invoke(eval_command, ["--normal", str(root / "MT_Free"), "--defects",
                                               str(root), "--generators", "draem,copypaste",
                                               "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "needs some: add --few-shot K" in result.output
    assert not (tmp_path / "o").exists()


def test_ours_adapter_keeps_one_sample_per_normal_and_is_deterministic() -> None:
    from appliance.engine import build_engine
    from appliance.evaluation.generators import OursGenerator

    normals = _normals(4, 64)
    generator = OursGenerator("magnetic_tile", ["blowhole", "crack"], build_engine())
    first = generate_training_set(generator, normals, seed=4)
    again = generate_training_set(generator, normals, seed=4)
    assert 1 <= len(first.samples) <= 4 and first.episodes >= 4
    assert len({s.source_index for s in first.samples}) == len(first.samples)
    for sample in first.samples:
        assert sample.accepted and sample.mask.any() and sample.image.shape == (64, 64, 3)
        assert sample.defect in ("blowhole", "crack")
    assert [s.source_index for s in first.samples] == [s.source_index for s in again.samples]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first.samples, again.samples))
    ticks: list[int] = []
    generator.generate(normals, seed=4, progress=ticks.append)
    assert ticks == [1] * len(normals)  # one per episode, whether it made a sample or not
    rates = first.acceptance_by_defect
    assert set(rates) <= {"blowhole", "crack"} and all(0.0 <= r <= 1.0 for r in rates.values())
    # The judge's own verdicts: one per image_gen attempt, the last one the episode's verdict.
    for sample in first.attempted:
        assert 1 <= len(sample.verdicts) <= 3 and sample.verdicts[-1] == sample.accepted
    verdicts = first.judge_pass_by_defect
    assert set(verdicts) == set(rates)
    for defect, cell in verdicts.items():
        assert cell["attempts"] == sum(len(s.verdicts) for s in first.attempted if s.defect == defect)
        assert 0.0 <= cell["first_attempt"] <= 1.0 and 0.0 <= cell["all_attempts"] <= 1.0


class _RejectingFirst:
    """A generator whose judge rejects every first attempt: the top-up rounds must rerun it."""

    name = "ours"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, images, seed, progress=None):
        from appliance.evaluation.baselines import TrainingSample

        self.calls.append(len(images))
        accepted = len(self.calls) > 1
        return [TrainingSample(im, np.ones(im.shape[:2], bool), "crack", accepted, i)
                for i, im in enumerate(images)]


def test_rejected_samples_are_retried_and_not_trained_on() -> None:
    generator = _RejectingFirst()
    result = generate_training_set(generator, _normals(3, 32), seed=0, max_rounds=3)
    assert generator.calls == [3, 3]
    assert len(result.samples) == 3 and all(s.accepted for s in result.samples)
    assert result.acceptance_rate == pytest.approx(0.5)
    assert result.episodes == 6


def _tiny_tiles(root: Path) -> Path:
    for folder, count in (("MT_Free", 12), ("MT_Crack", 3), ("MT_Blowhole", 3)):
        target = root / folder / "Imgs"
        target.mkdir(parents=True)
        for photo in sorted(require_tiles(folder, "Imgs").glob("*.jpg"))[:count]:
            shutil.copy(photo, target / photo.name)
            shutil.copy(photo.with_suffix(".png"), target / photo.with_suffix(".png").name)
    return root


def test_tiny_eval_end_to_end(tmp_path: Path) -> None:
    from appliance.cli.eval_command import eval_command

    root = _tiny_tiles(tmp_path / "tiles")
    args = ["--normal", str(root / "MT_Free"), "--defects", str(root), "--size", "64",
            "--train-size", "8", "--epochs", "2", "--generators", "ours,draem,cutpaste",
            "--threads", "2", "--seed", "1", "--out", str(tmp_path / "a")]
    first = CliRunner().invoke(eval_command, args)
    assert first.exit_code == 0, first.output
    assert "pixel AP" in first.output and "ours / best baseline" in first.output

    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["category"] == "tiles"
    assert report["protocol"]["test_defects_per_class"] == {"blowhole": 3, "crack": 3}
    assert report["protocol"]["grayscale_training"] is True
    assert list(report["generators"]) == ["ours", "draem", "cutpaste"]
    for name in ("ours", "draem", "cutpaste"):
        metrics = report["generators"][name]["metrics"]
        assert set(metrics) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "image_auroc",
                                "image_ap", "image_f1_max", "pixel_auroc_class_mean",
                                "pixel_ap_class_mean", "image_auroc_class_mean"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
        per_class = report["generators"][name]["per_class"]
        assert metrics["pixel_ap_class_mean"] == pytest.approx(
            (per_class["blowhole"]["pixel_ap"] + per_class["crack"]["pixel_ap"]) / 2)
        assert set(report["generators"][name]["per_class"]) == {"blowhole", "crack"}
        generation = report["generators"][name]["generation"]
        assert 1 <= generation["kept"] <= 8
        assert (generation["acceptance_rate"] is None) == (name != "ours")
        assert ("acceptance_by_defect" in generation) == (name == "ours")
        assert generation["kernel_distance_to_real"] is not None
        assert 0.0 < generation["mask_area_percent"] < 100.0
        assert 0.0 <= generation["mask_change_iou"] <= 1.0
    assert report["protocol"]["normal_reference_distance"] is not None
    ratios = report["ratio_ours_to_best_baseline"]
    pixel_ap = report["generators"]["ours"]["metrics"]["pixel_ap"]
    best = max(report["generators"][g]["metrics"]["pixel_ap"] for g in ("draem", "cutpaste"))
    assert ratios["pixel_ap"]["ratio"] == pytest.approx(pixel_ap / best)
    # The bootstrap over the test photos: its range, from the counts kept beside the report.
    low, high = ratios["pixel_ap"]["interval_90"]
    assert low <= high and 0.0 <= ratios["pixel_ap"]["ahead"] <= 1.0
    assert ratios["pixel_ap"]["resamples"] == 2000
    from appliance.evaluation.bootstrap import load_counts
    from appliance.evaluation.metrics import binned_average_precision

    counts, groups = load_counts(tmp_path / "a")
    assert sorted(counts) == ["cutpaste", "draem", "ours"]
    assert list(groups) == [0] * report["protocol"]["test_normals"] + [1] * 6
    for name, trainings in counts.items():
        assert len(trainings) == 1  # one detector per generator unless --detector-seeds
        positives, negatives = trainings[0]
        assert binned_average_precision(positives.sum(0), negatives.sum(0)) == pytest.approx(
            report["generators"][name]["metrics"]["pixel_ap"], abs=0.01)
    assert set(report["generators"]["ours"]["generation"]["acceptance_by_defect"]) <= {
        "blowhole", "crack"}
    assert report["protocol"]["few_shot"] == 0 and report["protocol"]["shots"] == []
    import cv2

    assert report["environment"]["opencv"] == cv2.__version__  # figures depend on it
    assert {"numpy", "pillow", "scipy", "torch"} <= set(report["environment"])
    markdown = (tmp_path / "a" / "report.md").read_text()
    assert "| pixel AP |" in markdown and "Judge acceptance per defect type" in markdown
    assert "resamples (the test photos drawn again) 90 % of the ratios lie between" in markdown
    assert "ours: first attempts passed" in markdown
    for figure in ("pr_curves.png", "examples.png", "training_samples.png"):
        with Image.open(tmp_path / "a" / figure) as image:
            assert image.width > 100 and image.height > 100



def test_eval_with_a_class_of_unmasked_photos_scores_it_on_image_labels(tmp_path: Path) -> None:
    from appliance.cli.eval_command import eval_command

    root = _tiny_tiles(tmp_path / "tiles")
    for mask in (root / "MT_Crack" / "Imgs").glob("*.png"):
        mask.unlink()
    args = ["--normal", str(root / "MT_Free"), "--defects", str(root), "--size", "64",
            "--train-size", "6", "--epochs", "1", "--generators", "draem,cutpaste",
            "--threads", "2", "--out", str(tmp_path / "a")]
    refused = CliRunner().invoke(eval_command, args)
    assert refused.exit_code == 1 and "--image-labels" in refused.output
    args.insert(0, "--image-labels")
    result = CliRunner().invoke(eval_command, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["protocol"]["image_level_classes"] == ["crack"]
    assert report["protocol"]["test_defects_per_class"] == {"blowhole": 3, "crack": 3}
    for name in ("draem", "cutpaste"):
        metrics, per_class = (report["generators"][name][k] for k in ("metrics", "per_class"))
        # The cracks count in the image metrics and nowhere in the pixel metrics: the overall
        # pixel figures are the blowholes' with the normals.
        assert per_class["crack"]["pixel_ap"] is None and per_class["crack"]["pixel_auroc"] is None
        assert 0.0 <= per_class["crack"]["image_auroc"] <= 1.0
        for key in ("pixel_ap", "pixel_auroc", "pixel_f1_max"):
            assert metrics[key] == pytest.approx(per_class["blowhole"][key])
        assert metrics["pixel_ap_class_mean"] == pytest.approx(per_class["blowhole"]["pixel_ap"])
        assert metrics["image_auroc"] != pytest.approx(per_class["blowhole"]["image_auroc"])
    assert "## Image-level labels" in (tmp_path / "a" / "report.md").read_text()
    # Few-shot calibration measures the shots, so it is refused before any synthesis.
    refused = CliRunner().invoke(eval_command, args[:-1] + [str(tmp_path / "c"), "--few-shot", "1"])
    assert refused.exit_code == 1 and "these defect types have none: crack" in refused.output
    assert not (tmp_path / "c" / "report.json").exists()

    # With no mask at all, the image AUROC is the headline and the crop measurements are skipped.
    for mask in (root / "MT_Blowhole" / "Imgs").glob("*.png"):
        mask.unlink()
    result = CliRunner().invoke(eval_command, args[:-1] + [str(tmp_path / "b"),
                                                          "--detector-seeds", "2"])
    assert result.exit_code == 0, result.output
    assert "generation measurements (which compare defect crops) are skipped" in result.output
    assert "image AUROC" in result.output and "pixel AP" not in result.output  # no all-nan rows
    assert "image AUROC of each detector (seeds 0, 1): draem " in result.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["protocol"]["image_level_classes"] == ["blowhole", "crack"]
    assert report["generators"]["draem"]["metrics"]["pixel_ap"] is None
    assert "kernel_distance_to_real" not in report["generators"]["draem"]["generation"]
    markdown = (tmp_path / "b" / "report.md").read_text()
    assert "No class has masks, so the headline is image AUROC" in markdown
    assert "Image AUROC is the headline here" in markdown and "Pixel AP per defect" not in markdown
    with Image.open(tmp_path / "b" / "pr_curves.png") as both, \
            Image.open(tmp_path / "a" / "pr_curves.png") as with_pixels:
        assert both.width * 2 == with_pixels.width  # the image panel alone


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    from appliance.evaluation.data import load_folders
    from appliance.evaluation.runner import EvalConfig, evaluate
    from appliance.evaluation.train import TrainConfig

    root = _tiny_tiles(tmp_path / "tiles")
    data = load_folders(root / "MT_Free", root, 32, seed=2, train_size=6, category="magnetic_tile")

    def run(seed: int, out: str) -> dict:
        config = EvalConfig(size=32, seed=seed, generators=("draem", "cutpaste"),
                            generation_metrics=False,
                            train=TrainConfig(epochs=1, batch_size=4, threads=2))
        return evaluate(data, tmp_path / out, config, log=lambda _: None)["generators"]

    first, again, other = run(2, "a"), run(2, "b"), run(3, "c")
    for name in ("draem", "cutpaste"):
        assert first[name]["metrics"] == again[name]["metrics"]
        assert first[name]["train_losses"] == again[name]["train_losses"]
    assert first["draem"]["train_losses"] != other["draem"]["train_losses"]


def test_detector_seeds_average_several_trainings_of_the_same_samples(tmp_path: Path) -> None:
    from appliance.evaluation.bootstrap import COUNTS_FILE
    from appliance.evaluation.data import load_folders
    from appliance.evaluation.runner import EvalConfig, evaluate
    from appliance.evaluation.train import TrainConfig

    root = _tiny_tiles(tmp_path / "tiles")
    data = load_folders(root / "MT_Free", root, 32, seed=2, train_size=6, category="magnetic_tile")

    def run(detectors: int, out: str) -> dict:
        config = EvalConfig(size=32, seed=2, generators=("draem", "cutpaste"),
                            generation_metrics=False, detector_seeds=detectors,
                            train=TrainConfig(epochs=1, batch_size=4, threads=2))
        return evaluate(data, tmp_path / out, config, log=lambda _: None)

    single, several = run(1, "one"), run(3, "three")
    assert several["protocol"]["detector_seeds"] == 3
    for name in ("draem", "cutpaste"):
        assert "detectors" not in single["generators"][name]["generation"]
        detectors = several["generators"][name]["generation"]["detectors"]
        assert detectors["seeds"] == [2, 3, 4]  # the run's seed, then the next ones
        # The first detector is the one a single-detector run trains; the others differ.
        assert detectors["pixel_ap"][0] == single["generators"][name]["metrics"]["pixel_ap"]
        assert len(set(detectors["pixel_ap"])) == 3
        assert several["generators"][name]["metrics"]["pixel_ap"] == pytest.approx(
            np.mean(detectors["pixel_ap"]))
        per_class = several["generators"][name]["per_class"]["crack"]
        assert per_class["images"] == 3  # a count stays a count
    with np.load(tmp_path / "three" / COUNTS_FILE) as saved:
        assert saved["draem.positives"].shape[0] == 3
    markdown = (tmp_path / "three" / "report.md").read_text()
    assert "3 detectors trained (metrics: their mean)" in markdown
    assert "pixel AP of each detector (seeds 2, 3, 4): draem " in markdown
    with pytest.raises(ValueError, match="at least one detector"):
        EvalConfig(detector_seeds=0)


def test_cli_refuses_ambiguous_inputs(tmp_path: Path) -> None:
    from appliance.cli.eval_command import eval_command

    result = CliRunner().invoke(eval_command, ["--out", str(tmp_path)])
    assert result.exit_code != 0 and "--category-dir" in result.output
    result = CliRunner().invoke(eval_command, ["--category-dir", str(tmp_path), "--normal",
                                               str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    result = CliRunner().invoke(eval_command, ["--category-dir", str(tmp_path), "--out",
                                               str(tmp_path / "o"), "--generators", "gan"])
    assert result.exit_code != 0 and "unknown generator" in result.output
    for seeds, message in (("0,x", "'x' is not a whole number"), ("1,1", "given twice"),
                           ("-1", "0 or more")):
        result = CliRunner().invoke(eval_command, ["--category-dir", str(tmp_path), "--out",
                                                   str(tmp_path / "o"), "--seeds", seeds])
        assert result.exit_code == 2 and message in result.output
    result = CliRunner().invoke(eval_command, ["--category-dir", str(tmp_path), "--out",
                                               str(tmp_path / "o"), "--seed", "1", "--seeds", "0,1"])
    assert result.exit_code == 2 and "give one or the other" in result.output


def test_cli_seeds_write_one_report_per_seed_and_their_mean_and_spread(tmp_path: Path) -> None:
    from appliance.cli.eval_command import eval_command

    root = _tiny_tiles(tmp_path / "tiles")
    out = tmp_path / "out"
    # 128 px: at 64 px a real blowhole is a 4-pixel speck, too small to calibrate on.
    args = ["--normal", str(root / "MT_Free"), "--defects", str(root), "--size", "128",
            "--train-size", "4", "--epochs", "1", "--generators", "ours,draem,copypaste",
            "--few-shot", "1", "--seeds", "0,1", "--detector-seeds", "2",
            "--no-generation-metrics", "--threads", "2", "--out", str(out)]
    result = CliRunner().invoke(eval_command, args)
    assert result.exit_code == 0, result.output
    assert "±" in result.output and "ours / best baseline per seed" in result.output

    per_seed = [json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in (0, 1)]
    for seed, report in zip((0, 1), per_seed):
        assert report["protocol"]["seed"] == seed and report["protocol"]["few_shot"] == 1
        assert report["protocol"]["shots_per_class"] == {"blowhole": 1, "crack": 1}
        assert report["protocol"]["test_defects_per_class"] == {"blowhole": 2, "crack": 2}
        assert len(report["protocol"]["shots"]) == 2
        for figure in ("report.md", "pr_curves.png", "examples.png", "training_samples.png"):
            assert (out / f"seed-{seed}" / figure).is_file()

    combined = json.loads((out / "report.json").read_text())
    assert combined["seeds"] == [0, 1] and combined["seed_folders"] == ["seed-0", "seed-1"]
    assert combined["protocol"]["few_shot"] == 1 and "seed" not in combined["protocol"]
    assert combined["protocol"]["shots"]["per_seed"] == [r["protocol"]["shots"] for r in per_seed]
    assert list(combined["generators"]) == ["ours", "draem", "copypaste"]
    for name in ("ours", "draem", "copypaste"):
        cell = combined["generators"][name]["metrics"]["pixel_ap"]
        values = [r["generators"][name]["metrics"]["pixel_ap"] for r in per_seed]
        assert cell["per_seed"] == values
        assert cell["mean"] == pytest.approx(np.mean(values))
        assert cell["std"] == pytest.approx(np.std(values, ddof=1))  # sample std
    ratio = combined["ratio_ours_to_best_baseline"]["pixel_ap"]
    means = {g: combined["generators"][g]["metrics"]["pixel_ap"]["mean"]
             for g in ("ours", "draem", "copypaste")}
    assert ratio["ratio"] == pytest.approx(means["ours"] / max(means["draem"], means["copypaste"]))
    assert ratio["per_seed"] == [r["ratio_ours_to_best_baseline"]["pixel_ap"]["ratio"]
                                 for r in per_seed]
    assert ratio["interval_90"][0] <= ratio["interval_90"][1] and ratio["resamples"] == 2000
    assert ("every seed's test photos drawn again within its seed, and each generator's 2 "
            "detector trainings" in result.output)
    assert "mean of 2 detectors per generator" in result.output
    assert all(r["protocol"]["detector_seeds"] == 2 for r in per_seed)
    accepted = combined["generators"]["ours"]["generation"]["acceptance_by_defect"]
    assert all(len(v["per_seed"]) == 2 for v in accepted.values())
    markdown = (out / "report.md").read_text()
    assert "## Ours / best baseline per seed" in markdown and "## Few-shot protocol" in markdown
    assert "| pixel AP |" in markdown
