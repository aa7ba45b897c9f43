"""`appliance retry`: failed episodes go back in the queue once the cause is fixed; accepted ones
never do. The failure here is real: a process that claims the episode dies (kill -9 style) until
the store gives up on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from appliance.batch import plan_episodes
from appliance.dataset.check import check_dataset
from appliance.storage import JobStore

from conftest import REPO


def appliance(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli.main", *args], cwd=REPO,
                          env={**os.environ, "APPLIANCE_MODELS": "/nonexistent"},
                          capture_output=True, text=True, timeout=300)


def die_while_running(dataset) -> None:
    script = textwrap.dedent(f"""
        import os
        from appliance.storage import JobStore
        store = JobStore.for_dataset({str(dataset)!r})
        store.requeue_orphaned(max_tries=2)
        assert store.claim(1)
        os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == 9


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture()
def dataset_with_a_failed_episode(tmp_path, tile_paths):
    inbox = tmp_path / "inbox" / "magnetic_tile"
    inbox.mkdir(parents=True)
    shutil.copy(tile_paths[1], inbox / tile_paths[1].name)
    dataset = tmp_path / "dataset"
    first = appliance("batch", str(tmp_path / "inbox"), "--out", str(dataset), "--defect", "crack",
                      "--engine", "cpu", "--no-progress")
    assert first.returncode == 0, first.stderr
    store = JobStore.for_dataset(dataset)
    [normal] = store.normals()
    store.enqueue(plan_episodes(normal["sha256"], "magnetic_tile", ["blowhole"], 1))
    store.close()
    for _ in range(2):
        die_while_running(dataset)
    store = JobStore.for_dataset(dataset)
    assert store.requeue_orphaned(max_tries=2) == (0, 1)
    store.close()
    return tmp_path / "inbox", dataset


def test_retry_requeues_failed_episodes_and_the_next_batch_writes_them(dataset_with_a_failed_episode):
    inbox, dataset = dataset_with_a_failed_episode
    # Re-running the batch does not retry it on its own: it stays failed and is reported.
    again = appliance("batch", str(inbox), "--out", str(dataset), "--defect", "crack",
                      "--engine", "cpu", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert [r["defect"] for r in jsonl(dataset / "rejected.jsonl")] == ["blowhole"]

    dry = appliance("retry", "--dataset", str(dataset), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "failed   magnetic_tile/blowhole  interrupted 2 times" in dry.stdout
    assert "would re-queue 1 episode(s)" in dry.stdout
    assert JobStore.for_dataset(dataset).counts()["failed"] == 1

    done = appliance("retry", "--dataset", str(dataset))
    assert done.returncode == 0 and "re-queued 1 episode(s)" in done.stdout
    assert jsonl(dataset / "rejected.jsonl") == []  # the view follows the store at once
    store = JobStore.for_dataset(dataset)
    counts = store.counts()
    assert counts["queued"] == 1 and counts["failed"] == 0 and counts["accepted"] == 1
    store.close()

    final = appliance("batch", str(inbox), "--out", str(dataset), "--defect", "crack",
                      "--engine", "cpu", "--no-progress")
    assert final.returncode == 0, final.stderr
    report = check_dataset(dataset)
    assert report.ok, report.problems
    assert dict(report.by_category) == {("magnetic_tile", "crack"): 1,
                                        ("magnetic_tile", "blowhole"): 1}
    # Nothing is left to retry, and accepted episodes are never re-run.
    nothing = appliance("retry", "--dataset", str(dataset), "--rejected")
    assert "re-queued 0 episode(s) (no failed or rejected episodes)" in nothing.stdout
    assert JobStore.for_dataset(dataset).counts()["accepted"] == 2


def test_retry_filters_and_refuses_what_it_cannot_do(dataset_with_a_failed_episode, tmp_path):
    _, dataset = dataset_with_a_failed_episode
    other = appliance("retry", "--dataset", str(dataset), "--defect", "crack")
    assert "re-queued 0 episode(s) (no failed episodes for */crack)" in other.stdout
    assert JobStore.for_dataset(dataset).counts()["failed"] == 1
    plain = tmp_path / "plain"
    plain.mkdir()
    refused = appliance("retry", "--dataset", str(plain))
    assert refused.returncode == 1 and "has no job store" in refused.stderr
    with pytest.raises(ValueError, match="can be retried"):
        JobStore.for_dataset(dataset).requeue_finished(("accepted",))
