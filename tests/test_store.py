"""The job store: migrations, idempotent queue, transactional numbers, reconciliation after crashes.

Crashes are real: a subprocess writes a sample and dies with ``os._exit`` at a chosen point
(no cleanup code runs, as with ``kill -9``), then the test reconciles and checks the result.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appliance.agent.episode import EpisodeSpec
from appliance.batch import plan_episodes
from appliance.dataset.writer import DatasetWriter
from appliance.storage import EpisodePlan, JobStore
from appliance.storage import migrations as migrations_module
from appliance.storage.exports import sync_exports
from appliance.storage.reconcile import reconcile


@pytest.fixture(scope="module")
def results(engine, tile_images):
    """Four accepted episodes on real magnetic tile photos (the engine is the embedded CPU one;
    some need a second attempt: a crack drawn as two far-apart lines is judged scattered)."""
    specs = [EpisodeSpec(image=tile_images[i], category="magnetic_tile", defect="crack",
                         seed=100 + i, source=f"tile_{i}.png", source_sha256=f"{i + 1:064x}")
             for i in range(4)]
    found = engine.environment.run(specs, engine.policy)
    assert all(r.accepted for r in found), [r.status for r in found]
    return found


def plans(n: int, category: str = "magnetic_tile") -> list[EpisodePlan]:
    out = []
    for i in range(n):
        out += plan_episodes(f"{i:064x}", category, ["crack"], 1)
    return out


# Schema and queue --------------------------------------------------------------------------------

def test_migrations_are_tracked_once_and_new_ones_apply_alone(tmp_path, monkeypatch):
    store = JobStore(tmp_path)
    assert store.migrations_run == ["m001_initial", "m002_intake_tries",
                                    "m003_test_good_and_reviews"]
    assert store.db.journal_mode == "wal"
    assert {"inputs", "normals", "episodes", "samples", "batches", "control",
            "intake_tries", "reviews"} <= set(
        store.db.table_names())
    store.close()
    again = JobStore(tmp_path)
    assert again.migrations_run == []
    again.close()

    def m099_add_note(db):
        db["episodes"].add_column("note", str)

    monkeypatch.setattr(migrations_module, "MIGRATIONS",
                        [*migrations_module.MIGRATIONS, ("m099_add_note", m099_add_note)])
    third = JobStore(tmp_path)
    assert third.migrations_run == ["m099_add_note"]
    assert "note" in third.db["episodes"].columns_dict
    assert [r["name"] for r in third.db["_migrations"].rows] == [
        "m001_initial", "m002_intake_tries", "m003_test_good_and_reviews", "m099_add_note"]
    third.close()


def test_a_store_from_before_test_good_keeps_its_normals_as_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(migrations_module, "MIGRATIONS", migrations_module.MIGRATIONS[:2])
    old = JobStore(tmp_path)
    old.db["normals"].insert({"sha256": "a" * 64, "category": "gear", "number": 0,
                              "path": "gear/train/good/000.png", "source": "x.png",
                              "status": "ok", "created": 0.0})
    old.close()
    monkeypatch.undo()
    new = JobStore(tmp_path)
    try:
        assert new.migrations_run == ["m003_test_good_and_reviews"]
        assert [n["split"] for n in new.normals()] == ["train"]
        assert new.normals(split="test") == []
        assert "reviews" in new.db.table_names()
    finally:
        new.close()


def test_enqueue_is_idempotent_by_key(tmp_path):
    store = JobStore(tmp_path)
    added, finished = store.enqueue(plans(3))
    assert (added, finished) == (3, [])
    assert store.enqueue(plans(3)) == (0, [])  # the same photos again: nothing new
    [row] = store.claim(1)
    store.finish(row["id"], "rejected", result={"key": row["key"]})
    added, finished = store.enqueue(plans(3))
    assert added == 0 and finished == [row["key"]]
    assert store.counts()["queued"] == 2 and store.counts()["rejected"] == 1
    store.close()


def _claim_all(root: str) -> list[int]:
    store = JobStore(Path(root))
    taken = []
    while rows := store.claim(3):
        taken += [r["id"] for r in rows]
    store.close()
    return taken


def _reserve_many(args: tuple[str, int]) -> list[int]:
    """Reserve a sample for every episode of one parity: the two processes never share an
    episode, so any error (a number collision on the UNIQUE index, a lock timeout) is a bug and
    reaches the test through ``pool.map``."""
    root, parity = args
    store = JobStore(Path(root))
    numbers = []
    for episode in list(store.db.query("select id, key from episodes where id % 2 = ? order by id",
                                       [parity])):
        row = store.reserve_sample(episode["id"], episode["key"], "magnetic_tile", "crack",
                                   lambda n: {"image": f"i{n}", "mask": f"m{n}", "trajectory": f"t{n}"})
        numbers.append(row["number"])
    store.close()
    return numbers


def test_two_processes_never_claim_the_same_episode(tmp_path):
    store = JobStore(tmp_path)
    store.enqueue(plans(60))
    store.close()
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        first, second = pool.map(_claim_all, [str(tmp_path)] * 2)
    assert not set(first) & set(second)
    assert sorted(first + second) == list(range(1, 61))


def test_sample_numbers_are_unique_under_concurrent_reservation(tmp_path):
    store = JobStore(tmp_path)
    store.enqueue(plans(50))
    store.close()
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        first, second = pool.map(_reserve_many, [(str(tmp_path), 0), (str(tmp_path), 1)])
    numbers = first + second
    assert len(first) == len(second) == 25
    assert len(numbers) == len(set(numbers)) == 50
    assert sorted(numbers) == list(range(50))  # no collision (it would have raised) and no gap


def test_running_episodes_of_a_dead_process_are_requeued(tmp_path):
    store = JobStore(tmp_path)
    store.enqueue(plans(6))
    store.close()
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from appliance.storage import JobStore
        store = JobStore(Path({str(tmp_path)!r}))
        store.claim(4)
        os._exit(9)  # dies holding 4 running episodes, like kill -9
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    store = JobStore(tmp_path)
    mine = store.claim(1)  # this process is alive: its claim must survive the sweep
    assert store.requeue_orphaned(max_tries=3) == (4, 0)
    counts = store.counts()
    assert counts["running"] == 1 and counts["queued"] == 5
    assert store.episode(mine[0]["id"])["status"] == "running"
    store.close()


def test_an_episode_that_keeps_killing_its_process_fails(tmp_path):
    store = JobStore(tmp_path)
    store.enqueue(plans(1))
    store.close()
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from appliance.storage import JobStore
        store = JobStore(Path({str(tmp_path)!r}))
        store.requeue_orphaned(max_tries=2)
        store.claim(1)
        os._exit(9)
    """)
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script], check=False)
    store = JobStore(tmp_path)
    assert store.requeue_orphaned(max_tries=2) == (0, 1)
    [row] = store.db.query("select * from episodes")
    assert row["status"] == "failed" and "interrupted 2 times" in row["error"]
    assert json.loads(row["result"])["status"] == "failed"
    store.close()


# Crashes while writing a sample --------------------------------------------------------------------

CRASH_SCRIPT = """
import os, pickle, sys
from pathlib import Path
import appliance.dataset.writer as writer_module
from appliance.storage import JobStore

root, results_file, where = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
results = pickle.loads(Path(results_file).read_bytes())
store = JobStore(root)
writer = writer_module.DatasetWriter(root, store=store)
writer.write(results[0])                      # one complete sample first
if where == "before_commit":                  # every file renamed, the row not yet ok
    store.commit_sample = lambda *a, **k: os._exit(3)
elif where == "before_mask":                  # the image written, the mask not
    real = writer_module.write_atomic
    def save(path, data):
        if path.name.endswith("_mask.png"):
            os._exit(3)
        real(path, data)
    writer_module.write_atomic = save
elif where == "mid_file":                     # a temporary file written, never renamed
    os.replace = lambda *a, **k: os._exit(3)
writer.write(results[1])
"""


def crash_while_writing(root: Path, results, where: str, tmp_path: Path) -> None:
    blob = tmp_path / "results.pickle"
    blob.write_bytes(pickle.dumps(results))
    done = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(root), str(blob), where],
                          capture_output=True, text=True)
    assert done.returncode == 3, done.stderr


def reconciled(root: Path):
    store = JobStore(root)
    with store.dataset_lock():
        report = reconcile(store)
    return store, report


def test_complete_files_of_an_uncommitted_sample_are_adopted(tmp_path, results):
    root = tmp_path / "ds"
    crash_while_writing(root, results, "before_commit", tmp_path)
    store, report = reconciled(root)
    assert len(report.adopted) == 1 and not report.removed_partial
    rows = store.samples()
    assert [r["number"] for r in rows] == [0, 1]
    assert [json.loads(line)["key"] for line in (root / "manifest.jsonl").read_text().splitlines()
            ] == [r["key"] for r in rows]
    assert store.episode_by_key(rows[1]["key"])["status"] == "accepted"
    store.close()


@pytest.mark.parametrize("where", ["before_mask", "mid_file"])
def test_a_half_written_sample_is_removed_and_its_number_reused(tmp_path, results, where):
    root = tmp_path / "ds"
    crash_while_writing(root, results, where, tmp_path)
    leftovers = [p for p in root.rglob(".*.tmp-*")]
    assert (where == "mid_file") == bool(leftovers)
    store, report = reconciled(root)
    assert report.removed_partial and not report.adopted
    assert not list(root.rglob(".*.tmp-*"))
    assert sorted(p.name for p in (root / "magnetic_tile" / "test" / "crack").iterdir()) == ["000.png"]
    assert not (root / "trajectories" / "magnetic_tile" / "crack" / "001").exists()
    episode = store.episode_by_key(
        f"{results[1].spec.source_sha256}:magnetic_tile:crack:{results[1].spec.seed}")
    assert episode["status"] == "queued"
    # Redoing it takes the freed number: no gap, no collision.
    written = DatasetWriter(root, store=store).write(results[1], episode_id=episode["id"])
    assert written.image.name == "001.png" and written.mask.name == "001_mask.png"
    assert len(store.samples()) == 2
    store.close()


def test_reconcile_moves_unknown_files_aside_and_rewrites_a_torn_manifest(tmp_path, results):
    root = tmp_path / "ds"
    store = JobStore(root)
    writer = DatasetWriter(root, store=store)
    for result in results[:2]:
        writer.write(result)
    stray = root / "magnetic_tile" / "test" / "crack" / "007.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(stray)
    keep = root / "magnetic_tile" / "test" / "crack" / "notes.txt"  # not ours: left alone
    keep.write_text("a person's note")
    with open(root / "manifest.jsonl", "a") as handle:
        handle.write('{"key": "torn')
    with store.dataset_lock():
        report = reconcile(store)
    assert report.orphans == ["magnetic_tile/test/crack/007.png"]
    assert keep.exists() and not stray.exists()
    assert list((root / ".appliance" / "orphans").rglob("007.png"))
    assert "manifest.jsonl" in report.exports_rewritten
    lines = (root / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == [r["key"] for r in store.samples()]
    store.close()


def test_a_sample_deleted_by_hand_is_removed_not_redone(tmp_path, results):
    root = tmp_path / "ds"
    store = JobStore(root)
    written = DatasetWriter(root, store=store).write(results[0])
    written.image.unlink()  # a quality engineer rejected it
    with store.dataset_lock():
        report = reconcile(store)
    assert report.missing == [written.record["image"]]
    assert not written.mask.exists()  # its mask went to orphans with it
    assert store.episode_by_key(written.record["key"])["status"] == "removed"
    assert written.record["key"] in store.finished_keys()
    assert (root / "manifest.jsonl").read_text() == ""
    store.close()


def test_a_dataset_without_a_store_is_imported_not_deleted(tmp_path, results):
    root = tmp_path / "ds"
    store = JobStore(root)
    writer = DatasetWriter(root, store=store)
    writer.add_normal("magnetic_tile", results[0].spec.image, results[0].spec.source_sha256, "a.png")
    for result in results[:3]:
        writer.write(result)
    keys = store.finished_keys()
    store.close()
    shutil.rmtree(root / ".appliance")  # as written before the store existed, or a lost db
    store, report = reconciled(root)
    assert report.imported == 4 and not report.orphans
    assert store.finished_keys() == keys
    assert [r["number"] for r in store.samples()] == [0, 1, 2]
    # New work continues the numbering.
    assert DatasetWriter(root, store=store).write(results[3]).image.name == "003.png"
    store.close()


def test_sync_exports_only_rewrites_what_disagrees(tmp_path, results):
    root = tmp_path / "ds"
    store = JobStore(root)
    DatasetWriter(root, store=store).write(results[0])
    assert sync_exports(store) == []
    (root / "normals.jsonl").write_text('{"nonsense": 1}\n')
    assert sync_exports(store) == ["normals.jsonl"]
    assert (root / "normals.jsonl").read_text() == ""
    store.close()


def test_a_file_without_a_row_is_never_overwritten(tmp_path, results):
    root = tmp_path / "ds"
    store = JobStore(root)
    writer = DatasetWriter(root, store=store)
    writer.write(results[0])
    stray = root / "magnetic_tile" / "ground_truth" / "crack" / "001_mask.png"
    stray.write_bytes(b"someone else's file")
    assert writer.write(results[1]).image.name == "002.png"
    assert stray.read_bytes() == b"someone else's file"
    store.close()
