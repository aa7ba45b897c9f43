"""`appliance dataset check` on a real dataset written by the CPU engine, and on broken copies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from appliance.dataset.check import check_dataset

from conftest import REPO


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tile_paths, engine):
    from appliance.batch import run_batch

    root = tmp_path_factory.mktemp("check")
    inbox = root / "inbox" / "magnetic_tile"
    inbox.mkdir(parents=True)
    shutil.copy(tile_paths[0], inbox / tile_paths[0].name)
    summary = run_batch(root / "inbox", root / "dataset", engine=engine,
                        defects=["crack", "blowhole"])
    assert summary.written == 2
    return root / "dataset"


def broken_copy(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    return copy, [json.loads(line) for line in (copy / "manifest.jsonl").read_text().splitlines()]


def test_a_written_dataset_passes(dataset):
    report = check_dataset(dataset)
    assert report.ok, report.problems
    assert report.samples == 2 and report.normals == 1
    assert dict(report.by_category) == {("magnetic_tile", "crack"): 1, ("magnetic_tile", "blowhole"): 1}
    assert list(report.engines) == ["policy=scripted, image_gen=procedural, knowledge_retrieval="
                                    "faiss-minilm, mask_gen=difference, prompt_gen=knowledge, "
                                    "quality_eval=heuristic"]
    done = subprocess.run([sys.executable, "-m", "appliance.cli.main", "dataset", "check",
                           str(dataset)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 samples, 1 normal photos" in done.stdout and "magnetic_tile/crack: 1" in done.stdout


def test_every_kind_of_damage_is_named(dataset, tmp_path):
    copy, records = broken_copy(dataset, tmp_path)
    first, second = records
    (copy / first["mask"]).unlink()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(copy / second["mask"])  # empty, wrong size
    stray = copy / "magnetic_tile" / "test" / "crack" / "007.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(stray)
    (copy / second["trajectory"] / "messages.json").write_text("{not json")
    with open(copy / "manifest.jsonl", "a") as manifest:
        manifest.write("{broken\n")
    report = check_dataset(copy)
    text = "\n".join(report.problems)
    assert not report.ok
    assert f"{first['image']}: image or mask file is missing" in text
    assert f"{second['image']}: image (" in text and "differ in size" in text
    assert f"{second['image']}: mask is empty" in text
    assert "magnetic_tile/test/crack/007.png: not in manifest.jsonl" in text
    assert f"{second['trajectory']}: unreadable trajectory" in text
    assert "manifest.jsonl:3: not JSON" in text
    done = subprocess.run([sys.executable, "-m", "appliance.cli.main", "dataset", "check",
                           str(copy)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "PROBLEM" in done.stdout


def test_an_empty_or_missing_dataset_is_not_ok(tmp_path):
    assert not check_dataset(tmp_path / "nowhere").ok
    (tmp_path / "empty").mkdir()
    report = check_dataset(tmp_path / "empty")
    assert not report.ok and "no samples yet" in report.lines()
