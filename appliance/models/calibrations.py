"""The CPU engine's calibration profiles per part category, kept like the adapters.

    MODELS/calibration/<category>/<hash>/      profile.json + bank/ (``calibration.save``)
    MODELS/calibration/<category>/active.json  the active profile and the history

``appliance retrain`` on a CPU engine stores a profile and promotes it when the held-out check
improves; ``appliance retrain --calibration --rollback`` returns to the previous one; every
batch after that uses the active profile of its category, and each sample records its hash.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from appliance.models.shelf import Shelf
from appliance.tools.image_gen.calibration import PROFILE_FILE, CalibrationProfile

CALIBRATIONS = Shelf("calibration", "calibration profile", PROFILE_FILE,
                     rollback_hint="appliance retrain --calibration --rollback --category {category}")


def store_profile(models_dir: Path, profile: CalibrationProfile, figures: dict) -> str:
    """Store ``profile`` under its hash (not yet active); returns the hash. It is written into a
    hidden folder beside the versions (never taken for a category) and copied into place."""
    folder = CALIBRATIONS.category_dir(models_dir, profile.category)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".profile-", dir=folder) as scratch:
        profile.save(Path(scratch))
        return CALIBRATIONS.store(models_dir, profile.category, Path(scratch), figures)


def active_profile(models_dir: Path, category: str) -> CalibrationProfile | None:
    found = CALIBRATIONS.active(models_dir, category)
    if found is None:
        return None
    digest, path, _ = found
    return CalibrationProfile.load(path, digest)


def active_profiles(models_dir: Path) -> dict[str, CalibrationProfile]:
    """Every category's promoted profile."""
    return {category: CalibrationProfile.load(path, digest)
            for category, (digest, path, _) in CALIBRATIONS.actives(models_dir).items()}
