"""Reliability: kill -9 at random moments, and a disk that fills up.

The crash test is ``scripts/crash_test.py`` (200 images, 20 kills) at a smaller size. The full
disk is a real one: a tiny tmpfs mounted for the test (root only; skipped elsewhere).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from _disks import fill

import pytest

from appliance.agent.environment import AgentEnvironment
from appliance.agent.episode import EpisodeSpec
from appliance.config import TEST_GOOD_SHARE
from appliance.dataset.writer import DatasetWriter, held_back
from appliance.storage import DiskFullError, JobStore
from appliance.storage.reconcile import reconcile

REPO = Path(__file__).resolve().parents[1]


def load_crash_script():
    spec = importlib.util.spec_from_file_location("crash_test", REPO / "scripts" / "crash_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_kill_9_at_random_moments_loses_and_duplicates_nothing(tmp_path):
    crash = load_crash_script()
    report = crash.crash_test(tmp_path, images=30, kills=5, seed=3, reference=True, size=80)
    assert report.ok, "\n".join(report.problems + report.log)
    assert report.kills == 5
    held = sum(held_back(n, TEST_GOOD_SHARE) for n in range(30))  # photos 4, 14 and 24
    assert held == 3 and report.samples + report.rejected == 30 - held


def test_the_crash_checker_finds_real_damage(tmp_path):
    """The verifier must be able to fail: damage a good dataset in the ways a bug would."""
    crash = load_crash_script()
    crash.make_inbox(tmp_path / "inbox", 4, size=64)
    done = subprocess.run(crash.batch_command(tmp_path / "inbox", tmp_path / "ds"),
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    expected = crash.expected_keys(tmp_path / "inbox")
    assert crash.verify(tmp_path / "ds", expected) == []
    test_dir = tmp_path / "ds" / "magnetic_tile" / "test" / "crack"
    first = sorted(test_dir.iterdir())[0]
    first.write_bytes(first.read_bytes()[:100])  # a half-written image
    shutil.copy(sorted(test_dir.iterdir())[1], test_dir / ".002.png.tmp-999")  # a temp name
    with open(tmp_path / "ds" / "manifest.jsonl", "a") as handle:
        handle.write('{"key": "dup"}\n')
    problems = "\n".join(crash.verify(tmp_path / "ds", expected))
    assert "missing or incomplete" in problems
    assert "temporary names" in problems
    assert "manifest.jsonl" in problems


# A full disk -------------------------------------------------------------------------------------

def one_try(engine) -> AgentEnvironment:
    """The engine's tools with a single image_gen attempt: fast, and no knowledge retrieval."""
    return AgentEnvironment(engine.tools, replace(engine.config.env, max_image_gen=1))


@pytest.fixture(scope="module")
def accepted(engine, texture_image):
    specs = [EpisodeSpec(image=texture_image[i * 20:i * 20 + 160, :160].copy(),
                         category="magnetic_tile", defect="crack", seed=7 + i,
                         source=f"brick_{i}.png", source_sha256=f"{i + 11:064x}")
             for i in range(8)]
    results = [r for r in one_try(engine).run(specs, engine.policy) if r.accepted]
    assert len(results) >= 6
    return results


def test_a_full_disk_leaves_nothing_half_written(tiny_disk, accepted):
    root = tiny_disk / "dataset"
    store = JobStore(root)
    writer = DatasetWriter(root, store=store)
    writer.write(accepted[0])
    filler = fill(tiny_disk, 120_000)  # room for about one more sample, not for all of them
    written, error = 1, None
    for result in accepted[1:]:
        try:
            writer.write(result)
            written += 1
        except DiskFullError as exc:
            error = exc
            break
    assert error is not None, "the disk never filled up"
    assert "no space left" in str(error) and "stays queued" in str(error)
    # Nothing half-written: no temporary names, files exactly the committed samples.
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]
    rows = store.samples()
    assert len(rows) == written and not store.samples(status="writing")
    images = sorted(str(p.relative_to(root)) for p in (root / "magnetic_tile" / "test").rglob("*.png"))
    assert images == sorted(r["image"] for r in rows)
    trajectories = sorted(str(p.relative_to(root)) for p in (root / "trajectories").glob("*/*/*"))
    assert trajectories == sorted(r["trajectory"] for r in rows)
    failed = accepted[written]
    episode = store.episode_by_key(f"{failed.spec.source_sha256}:magnetic_tile:crack:{failed.spec.seed}")
    assert episode["status"] == "queued"
    # Space comes back: the same episode is written with the next number, and all agrees.
    filler.unlink()
    again = writer.write(failed, episode_id=episode["id"])
    assert again.image.name == f"{written:03d}.png"
    with store.dataset_lock():
        report = reconcile(store)
    assert not report.orphans and not report.removed_partial
    lines = (root / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [r["key"] for r in store.samples()]
    store.close()


CONFIG = """\
[paths]
root = "{root}"
dataset = "{dataset}"

[engine]
max_attempts = 1

[intake]
poll_seconds = 0.2
settle_seconds = 0

[service]
min_free_mb = 0
disk_backoff_seconds = 0.5

[categories.magnetic_tile]
defects = ["crack"]
"""


def test_the_service_backs_off_on_a_full_disk_and_resumes(tiny_disk, tmp_path):
    crash = load_crash_script()
    crash.make_inbox(tmp_path / "inbox", 6, size=128)
    expected = crash.expected_keys(tmp_path / "inbox")  # before the files move to done/
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(root=tmp_path, dataset=tiny_disk / "dataset"))
    env = {**os.environ, "APPLIANCE_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
    # Let the intake write the normals, then leave too little room for the samples.
    (tiny_disk / "dataset").mkdir()
    filler = fill(tiny_disk, 400_000)
    log = tmp_path / "run.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "appliance.cli.service_commands", "run"],
                                   stdout=handle, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while "disk full" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert "ERROR disk full: no space left" in text and "retrying in 0.5 s" in text
        time.sleep(1.5)  # backing off and retrying, not crashing
        assert process.poll() is None, log.read_text()
        filler.unlink()
        assert process.wait(timeout=120) == 0, log.read_text()
    dataset = tiny_disk / "dataset"
    crash_report = crash.verify(dataset, expected)
    assert crash_report == [], crash_report
    assert len((dataset / "manifest.jsonl").read_text().splitlines()) + (
        len((dataset / "rejected.jsonl").read_text().splitlines())
        if (dataset / "rejected.jsonl").exists() else 0) == 6 - 1  # photo 4 is in test/good
    assert len(list((tmp_path / "done" / "magnetic_tile").iterdir())) == 6
