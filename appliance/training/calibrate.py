"""The CPU half of ``appliance retrain``: calibrate the procedural engine from real defects.

The training part of the plant's defects becomes a calibration profile (priors and a bank of
real defects, ``tools/image_gen/calibration.py``). The held-out part, never measured into it,
decides whether it is promoted, by what matters to the plant: how well a detector trained on the
engine's samples finds those real defects (``appliance eval``'s protocol, in small).

Both engines, the category's current calibration (or none) and the new profile, run the same
episodes (the batch's environment and policy) from the training photos' normal counterparts:
the held-out photos must stay unseen, their counterparts included. Each engine's accepted
samples train the evaluation's UNet, once per detector seed, and the UNet predicts the held-out
real defect photos; the figure is pixel AP over their masks, averaged over the seeds (the seeds
are the same for both engines, so the comparison is paired). The new profile is promoted when
it raises that AP by at least ``margin`` of its old value, and does so in at least
``confidence`` of the resamples of the held-out photos and the detector seeds (a bootstrap):
on a small plant, a few held-out photos decide the AP and a gain can be luck of which photos
were held out. The kernel distance of the accepted defects to the held-out real ones
(EfficientNet-Lite0 features of defect crops, the evaluation's generation metric) is reported
beside it: it says whether the samples look more like the plant's, not whether they teach
more.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from appliance.agent.episode import EpisodeResult, EpisodeSpec
from appliance.engine import Engine
from appliance.evaluation.data import resize_image, resize_mask
from appliance.evaluation.generation_metrics import defect_crop, image_features, kernel_distance
from appliance.evaluation.bootstrap import (RESAMPLES, Counts, interval, resample_weights,
                                            resampled_mean_ap, training_draws)
from appliance.evaluation.metrics import average_precision, binned_counts
from appliance.evaluation.train import TrainConfig, available_cpus, best_device, predict, train_unet
from appliance.tools.image_gen.calibration import CalibrationProfile, build_profile
from appliance.training.heldout import heldout_specs
from appliance.training.trajectories import DefectExample

DEFAULT_MARGIN = 0.05  # relative rise of the held-out pixel AP a new profile must reach
# Share of the bootstrap's resamples in which the profile must reach the margin: a gain the
# held-out photos cannot tell from luck is not promoted.
DEFAULT_CONFIDENCE = 0.8
MIN_ACCEPTED = 5  # accepted samples below which nothing is measured
DETECTOR_SEEDS = (0, 1, 2)  # one UNet per seed and engine; single runs vary a lot
# Episodes per engine: a detector trained on a handful of samples learns nothing either engine
# could be judged by, so a small plant's photos run several times each (other seeds); at most
# what ``appliance eval`` trains on.
MIN_EPISODES = 100
MAX_EPISODES = 300


@dataclass
class CheckFigures:
    episodes: int
    accepted: float  # share of episodes that ended with an accepted sample
    pixel_ap: float  # held-out real defects, mean over the detector seeds; NaN: not measured
    pixel_ap_by_seed: list[float]
    distance: float  # kernel distance of accepted defects to the held-out real ones
    acceptance_by_defect: dict[str, float]
    detector_loss: list[float] = field(default_factory=list)  # each seed's last epoch
    # Per seed, (positives, negatives) per held-out photo and score bin: what the bootstrap
    # resamples. Not written out.
    counts: list[Counts] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        """JSON-ready: a figure that was not measured is None (not NaN or Infinity)."""
        return {"episodes": self.episodes, "accepted": round(self.accepted, 4),
                "pixel_ap": _measured(self.pixel_ap, 4),
                "pixel_ap_by_seed": [round(v, 4) for v in self.pixel_ap_by_seed],
                "distance": _measured(self.distance, 6),
                "detector_loss": [round(v, 5) for v in self.detector_loss],
                "acceptance_by_defect": {k: round(v, 3) for k, v in self.acceptance_by_defect.items()}}


def _measured(value: float, digits: int) -> float | None:
    return round(value, digits) if np.isfinite(value) else None


def relative_change(before: float, after: float, lower_is_better: bool = False) -> float:
    """Share by which a figure improved (positive) or worsened (negative). A figure that could
    not be measured counts as the worst; the kernel distance's unbiased estimate dips below zero
    when two sets are indistinguishable at this sample size, which counts as zero."""
    if not np.isfinite(after):
        return 0.0 if not np.isfinite(before) else -1.0
    if not np.isfinite(before):
        return 1.0
    if lower_is_better:
        before, after = max(before, 0.0), max(after, 0.0)
        return (before - after) / before if before > 0 else 0.0
    return (after - before) / before if before > 0 else (1.0 if after > 0 else 0.0)


def profile_from(category: str, examples: Sequence[DefectExample]) -> CalibrationProfile:
    return build_profile(category, [(e.defect.image, e.defect.mask, e.defect.defect, e.defect.source)
                                    for e in examples])


def check_specs(train: Sequence[DefectExample], category: str, seed: int, repeats: int
                ) -> list[EpisodeSpec]:
    """The episodes both engines run: from the training photos' counterparts, ``repeats`` each
    or more to reach ``MIN_EPISODES``, at most ``MAX_EPISODES`` (every photo once before any
    twice)."""
    repeats = max(repeats, -(-MIN_EPISODES // max(len(train), 1)))
    # Shuffled, so that the cut at MAX_EPISODES falls on every defect type alike.
    order = np.random.default_rng([seed, 0x43]).permutation(len(train))
    return heldout_specs([train[i] for i in order], category, seed, repeats)[:MAX_EPISODES]


def detector_side(size: int) -> int:
    """The side the check's UNets work at: ``appliance eval``'s 256 px, or the photos' side when
    smaller, as a multiple of 16 (the UNet halves four times). Larger photos are brought down:
    six trainings at 1024 px would cost 16 times as much."""
    return max(min(size, 256) // 16 * 16, 64)


def teaching(samples: Sequence[EpisodeResult], heldout: Sequence[DefectExample],
             config: TrainConfig, progress: bool = False
             ) -> tuple[list[float], list[float], list[Counts]]:
    """Pixel AP on the held-out real defects of a UNet trained on ``samples``, its last
    epoch's loss, and its scores binned per held-out photo (``binned_counts``), per seed of
    ``DETECTOR_SEEDS``."""
    side = detector_side(heldout[0].defect.image.shape[0])
    images = [resize_image(r.final_image, side) for r in samples]
    masks = [resize_mask(r.mask.mask, side) for r in samples]
    sources = [resize_image(r.spec.image, side) for r in samples]
    tests = [resize_image(e.defect.image, side) for e in heldout]
    truth = np.stack([resize_mask(e.defect.mask, side) for e in heldout])
    aps, losses, counts = [], [], []
    for seed in DETECTOR_SEEDS:
        seeded = replace(config, seed=seed)
        model, log = train_unet(images, masks, sources, seeded, progress=progress,
                                label=f"detector seed {seed}")
        scores = predict(model, tests, seeded)
        aps.append(average_precision(truth, scores))
        losses.append(log.epoch_losses[-1])
        counts.append(binned_counts(truth, scores))
    return aps, losses, counts


def gain_resamples(before: Sequence[Counts], after: Sequence[Counts], seed: int,
                   resamples: int = RESAMPLES) -> np.ndarray:
    """The relative gain in held-out pixel AP (mean over the detector seeds) in each of
    ``resamples`` bootstrap resamples: the held-out photos drawn with replacement, and the
    detector seeds too, the same draws for both engines. Its spread is how much of a gain the
    choice of held-out photos and seeds alone could make. NaN where a resample has no
    defect pixel."""
    rng = np.random.default_rng([seed, 0xB0057])
    photos, seeds = before[0][0].shape[0], len(before)
    weights = resample_weights([0] * photos, resamples, rng)
    # Both engines' detectors share their seeds, so one draw of seeds serves both (paired).
    draws = training_draws(seeds, resamples, rng)
    old = resampled_mean_ap(before, weights, draws)
    new = resampled_mean_ap(after, weights, draws)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(old > 0, (new - old) / old, np.where(new > 0, 1.0, 0.0))


def heldout_check(engine: Engine, specs: Sequence[EpisodeSpec], heldout: Sequence[DefectExample],
                  real: np.ndarray, detector: TrainConfig, chunk: int = 8, progress=None
                  ) -> CheckFigures:
    """Run ``specs`` as episodes with the engine as it is; measure what its accepted samples
    teach a detector about the ``heldout`` real defects, and how far they are from ``real``
    (features of those defects' crops)."""
    results: list[EpisodeResult] = []
    for start in range(0, len(specs), chunk):
        results += engine.environment.run(list(specs[start:start + chunk]), engine.policy)
        if progress is not None:
            progress.update(len(specs[start:start + chunk]))
    kept = [r for r in results if r.accepted and r.final_image is not None and r.mask is not None
            and r.mask.mask.any()]
    # Too few accepted defects make both figures noise: count that as no match at all.
    if len(kept) >= MIN_ACCEPTED:
        distance = kernel_distance(image_features([defect_crop(r.final_image, r.mask.mask)
                                                   for r in kept]), real)
        aps, losses, counts = teaching(kept, heldout, detector, progress=progress is not None)
    else:
        distance, aps, losses, counts = float("inf"), [], [], []
    episodes = Counter(r.spec.defect for r in results)
    accepted = Counter(r.spec.defect for r in kept)
    return CheckFigures(len(results), len(kept) / max(len(results), 1),
                        float(np.mean(aps)) if aps else float("nan"), aps, distance,
                        {d: accepted[d] / n for d, n in sorted(episodes.items())}, losses, counts)


def decide(before: CheckFigures, after: CheckFigures, margin: float, confidence: float,
           seed: int) -> dict:
    """The gate: the profile is promoted when its held-out pixel AP beats the current engine's
    by ``margin`` (relative) and does so in at least ``confidence`` of the bootstrap's
    resamples. Returns the figures it decided on, with ``promote``."""
    gain = relative_change(before.pixel_ap, after.pixel_ap)
    wins = sum(a > b for a, b in zip(after.pixel_ap_by_seed, before.pixel_ap_by_seed))
    if before.counts and after.counts:
        gains = gain_resamples(before.counts, after.counts, seed)
        # A resample without a defect pixel cannot show the margin reached.
        reached = float(np.mean(np.nan_to_num(gains, nan=-np.inf) >= margin))
        spread = {"reached": round(reached, 4), "required": confidence,
                  "interval_90": [None if v is None else round(v, 4) for v in interval(gains)],
                  "resamples": len(gains)}
    else:
        # Nothing to resample where an engine was not measured; an unmeasured profile is
        # refused anyway, and an unmeasured current engine counts as the worst.
        reached, spread = (1.0 if after.counts else 0.0), None
    return {"pixel_ap_gain": round(gain, 4), "seeds_higher": wins, "margin": margin,
            "bootstrap": spread,
            "promote": bool(np.isfinite(after.pixel_ap) and gain >= margin
                            and reached >= confidence)}


def calibrate(engine: Engine, category: str, train: Sequence[DefectExample],
              heldout: Sequence[DefectExample], seed: int, repeats: int = 1,
              margin: float = DEFAULT_MARGIN, bar=None,
              detector: TrainConfig | None = None,
              confidence: float = DEFAULT_CONFIDENCE) -> tuple[CalibrationProfile, dict]:
    """Build the profile from ``train`` and measure it against the engine's current
    calibration on ``heldout``; returns (profile, figures with ``promote``)."""
    started = time.perf_counter()
    detector = detector or TrainConfig(device=best_device(), threads=available_cpus())
    profile = profile_from(category, train)
    specs = check_specs(train, category, seed, repeats)
    real = image_features([defect_crop(e.defect.image, e.defect.mask) for e in heldout])
    current = engine.calibrations.get(category)
    before = heldout_check(engine, specs, heldout, real, detector, progress=bar)
    engine.calibrations.use(profile)
    try:
        after = heldout_check(engine, specs, heldout, real, detector, progress=bar)
    finally:
        if current is not None:
            engine.calibrations.use(current)
        else:
            engine.calibrations.drop(category)
    figures = {"train_photos": len(train), "heldout_photos": len(heldout),
               "profile": profile.summary() | {"digest": None},
               "before_profile": current.digest if current is not None else None,
               "before": before.as_dict(), "after": after.as_dict(),
               "detector": {"seeds": list(DETECTOR_SEEDS), "epochs": detector.epochs,
                            "device": detector.device, "threads": detector.threads,
                            "side": detector_side(heldout[0].defect.image.shape[0]),
                            "niceness": os.nice(0)},  # what the timing ran at
               "distance_drop": round(relative_change(before.distance, after.distance,
                                                      lower_is_better=True), 4),
               **decide(before, after, margin, confidence, seed),
               "seconds": round(time.perf_counter() - started, 1)}
    return profile, figures
