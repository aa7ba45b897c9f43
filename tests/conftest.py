"""Shared fixtures: real images (magnetic tile photos, scikit-image textures) and one engine."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MAGNETIC_TILE = DATASETS / "magnetic-tile"
SAMPLE_INBOX = REPO / "samples" / "inbox"


_OWN_FOLDERS: dict[str, str] = {}


def pytest_configure(config):
    # Tests never touch the user's cache (one index build per test session) nor the user's
    # models folder: a model or calibration profile installed on this machine would change what
    # every engine built here does (a profile promoted by hand once made a batch differ from
    # the same batch on a cluster, whose nodes the tests point at their own folder).
    import tempfile

    for variable, prefix in (("APPLIANCE_CACHE", "appliance-test-cache-"),
                             ("APPLIANCE_MODELS", "appliance-test-models-")):
        if variable not in os.environ:
            os.environ[variable] = _OWN_FOLDERS[variable] = tempfile.mkdtemp(prefix=prefix)


def pytest_unconfigure(config):
    # The session's folders go with it (made per run: /tmp would fill up over runs).
    import shutil

    for variable, folder in _OWN_FOLDERS.items():
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(variable, None)


def require_tiles(*parts: str) -> Path:
    """A folder of the real magnetic tile photos, e.g. ``require_tiles("MT_Free", "Imgs")``.

    The photos are part of the test environment (CI keeps a copy of shared/ beside the clone):
    missing is a broken checkout, never a reason to skip. Fails, naming the folder it looked in.
    """
    folder = MAGNETIC_TILE.joinpath(*parts)
    if not folder.is_dir() or not any(folder.glob("*.jpg")):
        pytest.fail(f"magnetic tile photos missing: no *.jpg in {folder} (looked for "
                    f"<clone>/../shared/datasets/magnetic-tile, the clone being {REPO}). Copy the "
                    "project's shared/ folder beside the clone; CI always has it there.",
                    pytrace=False)
    return folder


# Extras this run must have: ./install.sh always installs "test" (everything the tests need);
# .ci/run also builds "gguf" and says so with APPLIANCE_TEST_EXTRAS=test,gguf.
REQUIRED_EXTRAS = frozenset({"test"}) | {
    name.strip() for name in os.environ.get("APPLIANCE_TEST_EXTRAS", "").split(",") if name.strip()}


def require_module(name: str, extra: str = "test"):
    """Import ``name``. Missing from a required extra fails; missing from an optional one skips."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        error = exc
    if extra in REQUIRED_EXTRAS:
        extras = ",".join(["test", *sorted(REQUIRED_EXTRAS - {"test"})])
        pytest.fail(f"{name} cannot be imported ({error}); it comes with the '{extra}' extra, "
                    f"which this test run requires: reinstall with EXTRAS={extras} ./install.sh",
                    pytrace=False)
    pytest.skip(f"{name}: the optional '{extra}' extra is not installed "
                f"(EXTRAS=test,{extra} ./install.sh)", allow_module_level=True)


@pytest.fixture(scope="session")
def tile_paths() -> list[Path]:
    return sorted(require_tiles("MT_Free", "Imgs").glob("*.jpg"))


@pytest.fixture(scope="session")
def tile_images(tile_paths) -> list[np.ndarray]:
    from appliance.imaging import load_rgb

    return [load_rgb(p) for p in tile_paths[:6]]


@pytest.fixture(scope="session")
def tile_image(tile_images) -> np.ndarray:
    return tile_images[0]


@pytest.fixture(scope="session")
def texture_image() -> np.ndarray:
    from skimage import data

    gray = data.brick()[:256, :256]
    return np.repeat(gray[..., None], 3, axis=2)


@pytest.fixture(scope="session")
def engine():
    from appliance.engine import build_engine

    built = build_engine()
    yield built
    built.close()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MB tmpfs: a real filesystem that runs out of space (root only; skipped elsewhere)."""
    from _disks import mount_tiny_disk

    yield from mount_tiny_disk(tmp_path)


@pytest.fixture(scope="module")
def review_workspace(tmp_path_factory, tile_paths, engine) -> Path:
    """A folder whose ``dataset/`` has samples, judge rejections, test/good and a hostile
    category name (tests/_review.py), for the review server's tests."""
    from _review import make_review_dataset

    root = tmp_path_factory.mktemp("review")
    make_review_dataset(root, tile_paths, engine)
    return root
