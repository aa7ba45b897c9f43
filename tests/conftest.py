"""Shared fixtures: real images (magnetic tile photos, scikit-image textures) and one engine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MAGNETIC_TILE = DATASETS / "magnetic-tile"
SAMPLE_INBOX = REPO / "samples" / "inbox"


def pytest_configure(config):
    # Tests never touch the user's cache; one index build per test session.
    if "APPLIANCE_CACHE" not in os.environ:
        import tempfile

        os.environ["APPLIANCE_CACHE"] = tempfile.mkdtemp(prefix="appliance-test-cache-")


def _require_tiles() -> Path:
    if not (MAGNETIC_TILE / "MT_Free" / "Imgs").is_dir():
        pytest.skip(f"magnetic tile photos not found at {MAGNETIC_TILE}")
    return MAGNETIC_TILE


@pytest.fixture(scope="session")
def tile_paths() -> list[Path]:
    root = _require_tiles()
    return sorted((root / "MT_Free" / "Imgs").glob("*.jpg"))


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
