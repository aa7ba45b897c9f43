"""The CPU half of ``appliance retrain``: calibrate the procedural engine from real defects.

The training part of the plant's defects becomes a calibration profile (priors and a bank of
real defects, ``tools/image_gen/calibration.py``). The held-out part, never measured into it,
decides whether it is promoted: the engine runs the same episodes (the batch's environment and
policy, from each held-out defect's normal counterpart) once with the category's current
calibration and once with the new profile, and each run's accepted defects are compared with
the held-out real ones in the evaluation's feature space (KID-style kernel distance of
EfficientNet-Lite0 features of defect crops; lower is closer). The new profile is promoted
when it lowers that distance by at least ``margin`` of its old value.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from appliance.agent.episode import EpisodeResult, EpisodeSpec
from appliance.engine import Engine
from appliance.evaluation.generation_metrics import defect_crop, image_features, kernel_distance
from appliance.tools.image_gen.calibration import CalibrationProfile, build_profile
from appliance.training.heldout import heldout_specs
from appliance.training.trajectories import DefectExample

DEFAULT_MARGIN = 0.05  # relative drop of the held-out distance a new profile must reach
MIN_ACCEPTED = 5  # accepted held-out episodes below which a distance is not measured


@dataclass
class CheckFigures:
    episodes: int
    accepted: float  # share of episodes that ended with an accepted sample
    distance: float  # kernel distance of accepted defects to the held-out real ones
    acceptance_by_defect: dict[str, float]

    def as_dict(self) -> dict:
        return {"episodes": self.episodes, "accepted": round(self.accepted, 4),
                "distance": round(self.distance, 6),
                "acceptance_by_defect": {k: round(v, 3) for k, v in self.acceptance_by_defect.items()}}


def distance_drop(before: float, after: float) -> float:
    """Share by which the distance fell. The unbiased estimate dips below zero when two sets
    are indistinguishable at this sample size: a negative reading counts as zero."""
    if not np.isfinite(after):
        return 0.0
    if not np.isfinite(before):
        return 1.0
    before, after = max(before, 0.0), max(after, 0.0)
    return (before - after) / before if before > 0 else 0.0


def profile_from(category: str, examples: Sequence[DefectExample]) -> CalibrationProfile:
    return build_profile(category, [(e.defect.image, e.defect.mask, e.defect.defect, e.defect.source)
                                    for e in examples])


def heldout_check(engine: Engine, specs: Sequence[EpisodeSpec], real: np.ndarray,
                  chunk: int = 8, progress=None) -> CheckFigures:
    """Run ``specs`` as episodes with the engine as it is; compare the accepted defects with
    ``real`` (features of the held-out real defects)."""
    results: list[EpisodeResult] = []
    for start in range(0, len(specs), chunk):
        results += engine.environment.run(list(specs[start:start + chunk]), engine.policy)
        if progress is not None:
            progress.update(len(specs[start:start + chunk]))
    kept = [r for r in results if r.accepted and r.final_image is not None and r.mask is not None
            and r.mask.mask.any()]
    crops = [defect_crop(r.final_image, r.mask.mask) for r in kept]
    # Too few accepted defects make the distance noise: count that as no match at all.
    distance = (kernel_distance(image_features(crops), real) if len(crops) >= MIN_ACCEPTED
                else float("inf"))
    episodes = Counter(r.spec.defect for r in results)
    accepted = Counter(r.spec.defect for r in kept)
    return CheckFigures(len(results), len(kept) / max(len(results), 1), distance,
                        {d: accepted[d] / n for d, n in sorted(episodes.items())})


def calibrate(engine: Engine, category: str, train: Sequence[DefectExample],
              heldout: Sequence[DefectExample], seed: int, repeats: int = 1,
              margin: float = DEFAULT_MARGIN, bar=None) -> tuple[CalibrationProfile, dict]:
    """Build the profile from ``train`` and measure it against the engine's current
    calibration on ``heldout``; returns (profile, figures with ``promote``)."""
    started = time.perf_counter()
    profile = profile_from(category, train)
    specs = heldout_specs(heldout, category, seed, repeats)
    real = image_features([defect_crop(e.defect.image, e.defect.mask) for e in heldout])
    current = engine.calibrations.get(category)
    before = heldout_check(engine, specs, real, progress=bar)
    engine.calibrations.use(profile)
    try:
        after = heldout_check(engine, specs, real, progress=bar)
    finally:
        if current is not None:
            engine.calibrations.use(current)
        else:
            engine.calibrations.drop(category)
    gain = distance_drop(before.distance, after.distance)
    figures = {"train_photos": len(train), "heldout_photos": len(heldout),
               "profile": profile.summary() | {"digest": None},
               "before_profile": current.digest if current is not None else None,
               "before": before.as_dict(), "after": after.as_dict(),
               "distance_drop": round(gain, 4), "margin": margin,
               "promote": bool(gain >= margin and np.isfinite(after.distance)),
               "seconds": round(time.perf_counter() - started, 1)}
    return profile, figures
