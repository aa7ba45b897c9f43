"""``evaluate``: what each generator's synthetic data teaches a detector about real defects.

For every generator, on the same train normals, with the same seed and the same budget:
synthesize one anomaly per normal -> train the same UNet -> predict the held-out normals and the
real defects -> pixel and image AUROC / AP / F1-max, overall and per defect class. The protocol
(split, UNet, budget) is fixed in ``EvalConfig`` before any generator runs. ``evaluate_seeds``
repeats the whole comparison per seed and reports mean and spread.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from appliance.evaluation import report as report_mod
from appliance.evaluation.bootstrap import (Counts, interval, load_counts, ratio_resamples,
                                            save_counts)
from appliance.evaluation.data import GOOD, EvalData, LabeledImage, load_folders, load_mvtec_category
from appliance.evaluation.generation_metrics import (
    FEATURE_MODEL,
    defect_crop,
    generation_report,
    image_features,
    kernel_distance,
    normal_reference_crops,
)
from appliance.evaluation.generators import (BASELINES, NEEDS_SHOTS, GeneratorOutcome,
                                             generate_training_set, make_generator)
from appliance.evaluation.metrics import binned_counts, detection_scores, image_score, pr_points
from appliance.evaluation.train import TrainConfig, TrainLog, predict, train_unet
from appliance.imaging import is_grayscale

DEFAULT_GENERATORS = ("ours", "draem", "cutpaste")
FEW_SHOT_GENERATORS = DEFAULT_GENERATORS + ("copypaste",)


@dataclass
class EvalConfig:
    size: int = 256
    seed: int = 0
    generators: tuple[str, ...] = ()  # empty: DEFAULT_GENERATORS, or FEW_SHOT_GENERATORS with shots
    train_size: int = 300
    test_fraction: float = 0.2  # share of the normals held out (folder layout only)
    max_rounds: int = 3  # episodes per train normal, at most, to get one accepted sample
    generation_metrics: bool = True
    examples_per_class: int = 2
    # Real defects per type given to the generators (and taken out of the test set); 0: zero-shot.
    few_shot: int = 0
    progress: bool = False  # progress bars on stderr (synthesis and training)
    # A defect type with no mask at all is tested on image-level labels; off, it is an error.
    image_labels: bool = False
    # Detectors trained per generator, with seeds train.seed, train.seed + 1, ...; the metrics
    # are their means. One training is a noisy measure of what a generator teaches.
    detector_seeds: int = 1
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.size % 16:
            raise ValueError("size must be a multiple of 16 (four 2x poolings in the UNet)")
        if self.few_shot < 0:
            raise ValueError("few_shot cannot be negative")
        if self.detector_seeds < 1:
            raise ValueError("detector_seeds: train at least one detector per generator")
        self.generators = tuple(self.generators) or (
            FEW_SHOT_GENERATORS if self.few_shot else DEFAULT_GENERATORS)
        needs_shots = [g for g in self.generators if g in NEEDS_SHOTS]
        if needs_shots and not self.few_shot:
            raise ValueError(f"{', '.join(needs_shots)} pastes real defects: it needs few-shot "
                             "examples (--few-shot K, K >= 1)")
        self.train.seed = self.seed


def _library_versions() -> dict[str, str]:
    """The image libraries' versions: the same seed gives other figures under another one
    (opencv 5.0 against 5.1 moved one run's pixel AP from 0.127 to 0.107)."""
    import cv2
    import PIL
    import scipy

    return {"numpy": np.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__,
            "scipy": scipy.__version__}


def grey_rgb(image: np.ndarray) -> np.ndarray:
    """Three equal channels of the image's luma: what the detector trains on for a grey part."""
    luma = np.asarray(image, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    grey = np.clip(luma + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _pixel_truth(maps: np.ndarray, items: Sequence[LabeledImage]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(masks, maps) of the photos with pixel labels: one with image-level labels only says
    nothing about its pixels."""
    labelled = [i for i, it in enumerate(items) if it.pixel_labels]
    return np.stack([items[i].mask for i in labelled]), maps[labelled]


def _score_set(maps: np.ndarray, items: Sequence[LabeledImage], window: int) -> dict:
    pixel = detection_scores(*_pixel_truth(maps, items))
    image_labels = np.array([it.defect != GOOD for it in items])
    image_scores = np.array([image_score(m, window) for m in maps])
    image = detection_scores(image_labels, image_scores)
    return {"pixel": pixel.as_dict(), "image": image.as_dict(), "_image_scores": image_scores}


def _finite_mean(values: Sequence[float]) -> float:
    """The mean of the defined values; NaN when none is (no class has pixel labels)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _mean_over(trainings: Sequence[dict]) -> dict:
    """Each field's mean over the detectors' trainings (a count all of them share stays as is)."""
    return {key: trainings[0][key] if all(t[key] == trainings[0][key] for t in trainings)
            else float(np.mean([t[key] for t in trainings])) for key in trainings[0]}


def _flat(scores: dict) -> dict:
    return {f"{level}_{name}": scores[level][name]
            for level in ("pixel", "image") for name in ("auroc", "ap", "f1_max")}


def example_indices(data: EvalData, per_class: int) -> list[int]:
    """Which test images the example figure shows: the first few of every class, one normal."""
    test = data.test_set
    chosen: list[int] = []
    for defect in [GOOD] + data.defect_classes:
        limit = 1 if defect == GOOD else per_class
        chosen += [i for i, it in enumerate(test) if it.defect == defect][:limit]
    return chosen


def run_generator(name: str, data: EvalData, config: EvalConfig, engine: Any,
                  real_features: np.ndarray | None, grayscale: bool,
                  examples: Sequence[int], log: Callable[[str], None]) -> GeneratorOutcome:
    normals = [it.image for it in data.train_normals]
    generator = make_generator(name, data.category, data.defect_classes, engine, data.shots)
    log(f"[{name}] synthesizing from {len(normals)} train normals")
    generated = generate_training_set(generator, normals, config.seed, config.max_rounds,
                                      config.progress)
    if not generated.samples:
        raise RuntimeError(f"{name} produced no usable sample from {len(normals)} normals")
    kept = generated.samples
    # The detector must not learn a colour cue that the real test images cannot have.
    images = [grey_rgb(s.image) if grayscale else s.image for s in kept]
    sources = [normals[s.source_index] for s in kept]
    batches = -(-len(kept) // config.train.batch_size)
    log(f"[{name}] {len(kept)} samples kept of {generated.episodes} episodes "
        f"in {generated.seconds:.1f} s")
    trainings = [_train_and_score(name, images, [s.mask for s in kept], sources, data, config,
                                  config.train.seed + k, batches, log, keep_maps=k == 0)
                 for k in range(config.detector_seeds)]
    first = trainings[0]
    metrics = _mean_over([t.metrics for t in trainings])
    per_class = {defect: _mean_over([t.per_class[defect] for t in trainings])
                 for defect in first.per_class}
    test = data.test_set
    pr_image = pr_points(np.array([it.defect != GOOD for it in test]), first.image_scores)
    truth, labelled_maps = _pixel_truth(first.maps, test)
    pr_pixel = pr_points(truth, labelled_maps)
    counts = [t.pixel_counts for t in trainings]

    engine_info = None
    if hasattr(generator, "engine") and hasattr(generator.engine, "describe"):
        engine_info = {k: v for k, v in generator.engine.describe().items() if k != "env"}
        if getattr(generator, "calibration_used", None) is not None:
            engine_info["calibration"] = generator.calibration_used
    judged = name not in BASELINES  # the baselines have no judge: every sample counts
    generation: dict = {"engine": engine_info} if engine_info else {}
    generation |= {"acceptance_rate": generated.acceptance_rate if judged else None,
                   "episodes": generated.episodes, "kept": len(kept)}
    if judged:
        generation["acceptance_by_defect"] = generated.acceptance_by_defect
        generation["judge_pass_by_defect"] = generated.judge_pass_by_defect
    gen_seconds = 0.0
    if real_features is not None:
        start = time.perf_counter()
        generation |= generation_report(images, [s.mask for s in kept], [s.defect for s in kept],
                                        [grey_rgb(n) if grayscale else n for n in sources],
                                        real_features, config.train.device)
        gen_seconds = time.perf_counter() - start
    timings = {"synthesis_s": generated.seconds,
               "train_s": sum(t.train_log.seconds for t in trainings),
               "predict_s": sum(t.predict_seconds for t in trainings),
               "metrics_s": sum(t.metrics_seconds for t in trainings),
               "generation_metrics_s": gen_seconds,
               "seconds_per_kept_sample": generated.seconds / len(kept)}
    if len(trainings) > 1:
        # What each detector alone measured: the spread of one training.
        generation["detectors"] = {
            "seeds": [t.seed for t in trainings],
            **{key: [t.metrics[key] for t in trainings]
               for key in ("pixel_ap", "pixel_auroc", "image_auroc", "pixel_ap_class_mean")}}
    return GeneratorOutcome(name, generated, metrics, per_class, generation, timings,
                            first.train_log.epoch_losses, pr_pixel, pr_image,
                            first.maps[list(examples)],
                            [(images[i], kept[i].mask) for i in
                             np.linspace(0, len(kept) - 1, min(8, len(kept))).round().astype(int)],
                            None if None in counts else counts)


@dataclass
class _Training:
    """One detector trained on one generator's samples, and what it measured."""
    seed: int
    train_log: TrainLog
    maps: np.ndarray | None  # kept for the first detector only (the figures show its maps)
    image_scores: np.ndarray
    metrics: dict
    per_class: dict
    pixel_counts: Counts | None
    predict_seconds: float
    metrics_seconds: float


def _train_and_score(name: str, images: list[np.ndarray], masks: list[np.ndarray],
                     sources: list[np.ndarray], data: EvalData, config: EvalConfig, seed: int,
                     batches: int, log: Callable[[str], None], keep_maps: bool) -> _Training:
    train = replace(config.train, seed=seed)
    label = f"[{name}]" if config.detector_seeds == 1 else f"[{name}, detector seed {seed}]"
    log(f"{label} training the UNet on {len(images)} samples, {train.epochs} epochs x "
        f"{batches} batches")
    model, train_log = train_unet(images, masks, sources, train, progress=config.progress,
                                  label=label)
    log(f"{label} trained {train_log.steps} steps in {train_log.seconds:.1f} s "
        f"(loss {train_log.epoch_losses[0]:.4f} -> {train_log.epoch_losses[-1]:.4f}); predicting")
    start = time.perf_counter()
    test = data.test_set
    maps = predict(model, [it.image for it in test], train)
    predict_seconds = time.perf_counter() - start

    start = time.perf_counter()
    window = max(1, round(config.size * 21 / 256)) | 1  # DRAEM's 21 px window at 256 px
    overall = _score_set(maps, test, window)
    per_class = {}
    n_normal = len(data.test_normals)
    for defect in data.defect_classes:
        index = list(range(n_normal)) + [n_normal + i for i, it in enumerate(data.test_defects)
                                         if it.defect == defect]
        scored = _score_set(maps[index], [test[i] for i in index], window)
        per_class[defect] = _flat(scored) | {"images": len(index) - n_normal}
    # Macro averages: on the magnetic tiles one class (uneven) has most of the defect pixels
    # and would otherwise decide the pixel metrics alone.
    class_means = {f"{key}_class_mean": _finite_mean([c[key] for c in per_class.values()])
                   for key in ("pixel_auroc", "pixel_ap", "image_auroc")}
    truth, labelled_maps = _pixel_truth(maps, test)
    pixel_counts = binned_counts(truth, labelled_maps) if truth.any() else None
    return _Training(seed, train_log, maps if keep_maps else None, overall["_image_scores"],
                     _flat(overall) | class_means, per_class, pixel_counts, predict_seconds,
                     time.perf_counter() - start)


def evaluate(data: EvalData, out_dir: Path, config: EvalConfig | None = None, engine: Any = None,
             log: Callable[[str], None] = print) -> dict:
    """Run every generator of ``config`` on ``data``; write report.json, report.md and figures
    under ``out_dir``; return the report."""
    config = config or EvalConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    grayscale = all(is_grayscale(it.image) for it in data.train_normals + data.test_normals)
    log(f"eval: {data.category}: {len(data.train_normals)} train normals "
        f"(of {data.train_pool_size}), {len(data.test_normals)} test normals, "
        f"{len(data.test_defects)} real defects in {len(data.defect_classes)} classes "
        f"({', '.join(data.defect_classes)}), {config.size}px, seed {config.seed}"
        + (f", {len(data.shots)} real defects given as shots ({config.few_shot} per type)"
           if config.few_shot else ""))
    if data.image_level_classes:
        log(f"eval: {', '.join(data.image_level_classes)}: photos without masks, so image-level "
            "labels only: in the image metrics, left out of the pixel metrics")
    real_features, normal_reference = None, None
    outlined = [it for it in data.test_defects if it.pixel_labels]
    if config.generation_metrics and not outlined:
        log("eval: no real defect has a mask, so the generation measurements (which compare "
            "defect crops) are skipped")
    elif config.generation_metrics:
        real_features = image_features([defect_crop(it.image, it.mask) for it in outlined],
                                       config.train.device)
        anchor = image_features(normal_reference_crops([it.image for it in data.test_normals],
                                                       [it.mask for it in outlined]),
                                config.train.device)
        normal_reference = kernel_distance(anchor, real_features)
    examples = example_indices(data, config.examples_per_class)
    outcomes = []
    for done, name in enumerate(config.generators, start=1):
        outcomes.append(run_generator(name, data, config, engine, real_features, grayscale,
                                      examples, log))
        # A time estimate that also reaches a log file, where tqdm's bars stay off.
        spent = time.perf_counter() - started
        left = len(config.generators) - done
        log(f"[{name}] done; {done} of {len(config.generators)} generators in {spent:.0f} s"
            + (f", about {spent / done * left:.0f} s left for this seed" if left else ""))
    shots_per_class = {d: sum(it.defect == d for it in data.shots) for d in data.defect_classes}

    result = {
        "category": data.category,
        "protocol": {
            "size": config.size, "seed": config.seed, "train_normals": len(data.train_normals),
            "train_pool": data.train_pool_size, "test_normals": len(data.test_normals),
            "test_defects": len(data.test_defects),
            "test_defects_per_class": {d: sum(it.defect == d for it in data.test_defects)
                                       for d in data.defect_classes},
            # Classes without masks: image metrics only (the pixel metrics leave them out).
            "image_level_classes": data.image_level_classes,
            "few_shot": config.few_shot,
            "shots": [it.source for it in data.shots],
            "shots_per_class": shots_per_class,
            # Types with too few images: every type keeps at least one test image.
            "shots_capped": {d: n for d, n in shots_per_class.items() if n < config.few_shot},
            "grayscale_training": grayscale, "max_rounds": config.max_rounds,
            "detector_seeds": config.detector_seeds,
            "train": config.train.as_dict(), "unet": f"SmallUNet(width={config.train.width}, depth=4)",
            "image_score": "max of the anomaly map averaged over a DRAEM-size window",
            "feature_model": FEATURE_MODEL,
            "normal_reference_distance": normal_reference,
        },
        "generators": {o.name: {"metrics": o.metrics, "per_class": o.per_class,
                                "generation": o.generation, "timings": o.timings,
                                "train_losses": o.train_losses} for o in outcomes},
        "ratio_ours_to_best_baseline": report_mod.ratios({o.name: o.metrics for o in outcomes}),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": config.train.threads, "device": config.train.device,
                        **_library_versions()},
        "wall_seconds": None,
    }
    counted = {o.name: o.pixel_counts for o in outcomes if o.pixel_counts is not None}
    if counted:
        groups = [int(it.defect != GOOD) for it in data.test_set if it.pixel_labels]
        save_counts(out_dir, counted, groups)
        add_ratio_interval(result, [(counted, groups)], config.seed)
    report_mod.write_figures(out_dir, data, outcomes, examples)
    result["wall_seconds"] = time.perf_counter() - started
    report_mod.write_reports(out_dir, result)
    return result


def add_ratio_interval(report: dict, runs: Sequence[tuple[dict, Sequence[int]]], seed: int
                       ) -> None:
    """Put beside the pixel-AP ratio of ours to the best baseline the range that 90 % of its
    bootstrap resamples fall in (the test photos of every run drawn again), and the share of
    resamples in which ours comes out ahead."""
    cell = report["ratio_ours_to_best_baseline"].get("pixel_ap")
    if cell is None or not all({"ours", cell["best_baseline"]} <= set(c) for c, _ in runs):
        return
    ratios = ratio_resamples(runs, "ours", cell["best_baseline"], seed)
    cell["interval_90"] = interval(ratios)
    cell["ahead"] = float(np.mean(np.nan_to_num(ratios, nan=0.0) > 1.0))
    cell["resamples"] = len(ratios)


def evaluate_seeds(load: Callable[[int], EvalData], out_dir: Path, seeds: Sequence[int],
                   config: EvalConfig | None = None, engine: Any = None,
                   log: Callable[[str], None] = print) -> dict:
    """The whole comparison once per seed, each exactly as ``evaluate`` with that seed (its own
    split from ``load(seed)``, synthesis and training) into ``out_dir/seed-N/``; then
    ``out_dir/report.json`` and ``report.md`` with mean, spread and per-seed values."""
    config = config or EvalConfig()
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError("give one or more distinct seeds")
    started = time.perf_counter()
    reports = {}
    for done, seed in enumerate(seeds, start=1):
        seed_config = replace(config, seed=seed, train=replace(config.train))
        reports[seed] = evaluate(load(seed), Path(out_dir) / f"seed-{seed}", seed_config, engine, log)
        log(f"seed {seed}:\n{report_mod.format_table(reports[seed])}")
        spent = time.perf_counter() - started
        if done < len(seeds):
            log(f"{done} of {len(seeds)} seeds in {spent / 60:.1f} min; about "
                f"{spent / done * (len(seeds) - done) / 60:.1f} min left")
    result = report_mod.aggregate(reports)
    runs = [load_counts(Path(out_dir) / f"seed-{seed}") for seed in seeds]
    if all(run is not None for run in runs):
        add_ratio_interval(result, runs, seeds[0])
    result["seed_folders"] = [f"seed-{seed}" for seed in seeds]
    result["wall_seconds"] = time.perf_counter() - started
    report_mod.write_reports(Path(out_dir), result)
    return result


def evaluate_folders(normal_dir: Path, defects_dir: Path, out_dir: Path, category: str,
                     config: EvalConfig | None = None, engine: Any = None,
                     log: Callable[[str], None] = print, seeds: Sequence[int] = ()) -> dict:
    """``seeds``: run once per seed (``evaluate_seeds``) instead of once with ``config.seed``."""
    config = config or EvalConfig()

    def load(seed: int) -> EvalData:
        return load_folders(normal_dir, defects_dir, config.size, seed, config.train_size,
                            category, config.test_fraction, config.few_shot, config.image_labels)

    if seeds:
        return evaluate_seeds(load, out_dir, seeds, config, engine, log)
    return evaluate(load(config.seed), out_dir, config, engine, log)


def evaluate_mvtec(category_dir: Path, out_dir: Path, category: str | None = None,
                   config: EvalConfig | None = None, engine: Any = None,
                   log: Callable[[str], None] = print, seeds: Sequence[int] = ()) -> dict:
    """``seeds``: run once per seed (``evaluate_seeds``) instead of once with ``config.seed``."""
    config = config or EvalConfig()

    def load(seed: int) -> EvalData:
        return load_mvtec_category(category_dir, config.size, seed, config.train_size, category,
                                   config.few_shot, config.image_labels)

    if seeds:
        return evaluate_seeds(load, out_dir, seeds, config, engine, log)
    return evaluate(load(config.seed), out_dir, config, engine, log)
