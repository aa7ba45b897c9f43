#!/usr/bin/env python3
"""Reliability test: ``kill -9`` a running batch at random moments, restart it, check everything.

    .venv/bin/python scripts/crash_test.py                  # 200 images, 20 kills (the bar)
    .venv/bin/python scripts/crash_test.py --images 30 --kills 5 --workdir /tmp/crash

It builds an inbox of small distinct photos (crops of the magnetic tile photos in
../shared/datasets, or scikit-image textures when those are absent), runs ``appliance batch``
as a real subprocess, kills its whole process group with SIGKILL after a random delay, starts
it again, and repeats; then lets a last run finish. The kill moments are random: a fifth fall
during start-up and recovery, the rest at random points of progress (when the dataset has
reached a random number of samples, plus a random few milliseconds, so that they land in the
middle of writes on a fast machine and a slow one alike). A clean reference run of the same
inbox into another folder says what the dataset must contain. The checks:

- every planned episode is finished exactly once; every accepted one has exactly one sample,
  and the set of samples (and their pixels) equals the reference run's;
- every image and mask decodes completely; masks are 8-bit 0/255; trajectories parse;
- the files on disk are exactly the store's rows (no extra, none missing, no number twice),
  and ``manifest.jsonl`` / ``normals.jsonl`` / ``rejected.jsonl`` match the store line for line;
- nothing is left under a temporary name and nothing had to be moved aside as an orphan.

Exit status 0 when every check passes; the problems are printed otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TILES = REPO.parent / "shared" / "datasets" / "magnetic-tile" / "MT_Free" / "Imgs"
CATEGORY = "magnetic_tile"
DEFECT = "crack"
TEMP_NAMES = re.compile(r"(^\..+\.tmp-\d+$)|(\.part$)|(\.tmp$)")


@dataclass
class CrashReport:
    kills: int = 0
    runs: int = 0
    finished_early: int = 0
    samples: int = 0
    rejected: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# The inbox --------------------------------------------------------------------------------------

def make_inbox(inbox: Path, count: int, size: int = 96, seed: int = 0) -> list[Path]:
    """``count`` distinct small PNG photos in ``inbox/magnetic_tile/``."""
    rng = np.random.default_rng(seed)
    folder = inbox / CATEGORY
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.toml").write_text(f'defects = ["{DEFECT}"]\nper_image = 1\n')
    sources = sorted(TILES.glob("*.jpg")) if TILES.is_dir() else []
    if not sources:
        from skimage import data

        sources = [data.brick(), data.gravel(), data.grass(), data.camera()]
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        pixels = np.asarray(Image.open(source).convert("L")) if isinstance(source, Path) else source
        height, width = pixels.shape[:2]
        side = min(height, width, 2 * size)
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(pixels[top:top + side, left:left + side]))
        path = folder / f"part_{index:04d}.png"
        crop.resize((size, size), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


def batch_command(inbox: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "appliance.cli.main", "batch", str(inbox), "--out", str(out),
            "--no-progress", "--max-attempts", "1", "--chunk", "4"]


# Killing ----------------------------------------------------------------------------------------

@dataclass
class Kill:
    """One planned kill: at a moment of start-up, or once the dataset reached some progress."""

    after_seconds: float | None = None  # start-up kill: this long after the start
    at_samples: int | None = None  # progress kill: once this many samples are committed...
    jitter: float = 0.0  # ...plus this long, so that it lands anywhere in the next write

    def describe(self) -> str:
        if self.at_samples is None:
            return f"{self.after_seconds:.2f} s after start"
        return f"at {self.at_samples} samples + {1000 * self.jitter:.0f} ms"


def plan_kills(rng: random.Random, kills: int, episodes: int, startup: float) -> list[Kill]:
    """Random moments over the whole run: a fifth during start-up and recovery, the rest at
    random points of progress (in samples, so the plan fits a fast machine and a slow one)."""
    plan = []
    targets = sorted(rng.randrange(0, max(1, episodes)) for _ in range(kills))
    for target in targets:
        if rng.random() < 0.2:
            plan.append(Kill(after_seconds=rng.uniform(0.2, max(0.3, startup))))
        else:
            plan.append(Kill(at_samples=target, jitter=rng.uniform(0.0, 0.08)))
    return plan


def _samples_written(out: Path) -> int:
    db_path = out / ".appliance" / "jobs.db"
    if not db_path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("select count(*) from samples where status = 'ok'").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0  # not initialised yet


def _wait_for_moment(process: subprocess.Popen, out: Path, kill: Kill) -> bool:
    """Wait until the planned moment; False if the process finished first."""
    started = time.monotonic()
    while process.poll() is None:
        if kill.at_samples is None:
            if time.monotonic() - started >= kill.after_seconds:
                return True
        elif _samples_written(out) >= kill.at_samples:
            time.sleep(kill.jitter)
            return process.poll() is None
        time.sleep(0.01)
    return False


def run_with_kills(command: list[str], plan: list[Kill], report: CrashReport,
                   timeout: float = 1800.0) -> None:
    """Start the batch, kill -9 it at the next planned moment, restart... then one run to the end."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = Path(command[command.index("--out") + 1])
    for kill in plan:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env=env, start_new_session=True, cwd=REPO)
        report.runs += 1
        if _wait_for_moment(process, out, kill):
            os.killpg(process.pid, signal.SIGKILL)  # the whole group: workers too
            process.wait()
            report.kills += 1
            report.log.append(f"run {report.runs}: killed {kill.describe()}; "
                              f"{_state_after_kill(command)}")
            continue
        process.wait()
        report.finished_early += 1
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        report.log.append(f"run {report.runs}: finished before its kill ({kill.describe()}), "
                          f"exit {process.returncode}")
        if process.returncode != 0:
            report.problems.append(f"run {report.runs} failed: {stderr[-2000:]}")
            return
    final = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout,
                           cwd=REPO)
    report.runs += 1
    report.log.append(f"final run: exit {final.returncode}")
    report.log += [f"  {line}" for line in final.stdout.splitlines() if line.startswith("recovered")]
    if final.returncode != 0:
        report.problems.append(f"final run failed: {final.stderr[-2000:]}")


def _state_after_kill(command: list[str]) -> str:
    """What the kill left behind, before the next run repairs it (evidence, not a check)."""
    out = Path(command[command.index("--out") + 1])
    db_path = out / ".appliance" / "jobs.db"
    if not db_path.exists():
        return "no store yet"
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = dict(db.execute("select status, count(*) from samples group by status").fetchall())
        running = db.execute("select count(*) from episodes where status in "
                             "('running', 'writing')").fetchone()[0]
    except sqlite3.Error:
        return "store not initialised yet"
    finally:
        db.close()
    temps = sum(1 for p in out.rglob("*") if TEMP_NAMES.search(p.name))
    return (f"{rows.get('ok', 0)} samples written, {rows.get('writing', 0)} mid-write, "
            f"{running} episode(s) in flight, {temps} temporary file(s)")


# Checking ---------------------------------------------------------------------------------------

def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001
        return False


def verify(out: Path, expected_keys: set[str] | None = None,
           reference: Path | None = None) -> list[str]:
    """Every problem found in the dataset ``out``; empty when it is consistent."""
    from appliance.config import TEST_GOOD_SHARE
    from appliance.dataset.writer import held_back
    from appliance.storage.exports import read_jsonl

    problems: list[str] = []
    db = sqlite3.connect(f"file:{out / '.appliance' / 'jobs.db'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    episodes = [dict(r) for r in db.execute("select * from episodes")]
    samples = [dict(r) for r in db.execute("select * from samples order by id")]
    normals = [dict(r) for r in db.execute("select * from normals order by id")]
    db.close()

    # 1. The work: every planned episode finished once; accepted ones have one sample each.
    unfinished = [e["key"] for e in episodes if e["status"] not in ("accepted", "rejected", "failed")]
    if unfinished:
        problems.append(f"{len(unfinished)} episode(s) not finished: {unfinished[:3]}")
    keys = [e["key"] for e in episodes]
    if len(keys) != len(set(keys)):
        problems.append("an episode key appears twice in the store")
    # Photos held back in test/good plan no episode; which ones depends only on the numbers the
    # store handed out, so their count is fixed by how many normals there are.
    held = {n["sha256"] for n in normals if n["split"] == "test"}
    share = len([n for n in range(len(normals)) if held_back(n, TEST_GOOD_SHARE)])
    if len(held) != share:
        problems.append(f"{len(held)} normal photos held back in test/good, expected {share}")
    if expected_keys is not None:
        expected_keys = {k for k in expected_keys if k.split(":")[0] not in held}
    if expected_keys is not None and set(keys) != expected_keys:
        problems.append(f"episodes differ from the plan: missing {len(expected_keys - set(keys))}, "
                        f"extra {len(set(keys) - expected_keys)}")
    failed = [e for e in episodes if e["status"] == "failed"]
    if failed:
        problems.append(f"{len(failed)} episode(s) failed: {failed[0]['error']}")
    accepted = {e["id"] for e in episodes if e["status"] == "accepted"}
    ok_samples = [s for s in samples if s["status"] == "ok"]
    if len(samples) != len(ok_samples):
        problems.append(f"{len(samples) - len(ok_samples)} sample row(s) not ok")
    by_episode = [s["episode_id"] for s in ok_samples]
    if sorted(by_episode) != sorted(accepted):
        problems.append("accepted episodes and samples do not pair one to one")
    numbers = [(s["category"], s["defect"], s["number"]) for s in ok_samples]
    if len(numbers) != len(set(numbers)):
        problems.append("a sample number was given twice")

    # 2. The files: complete, valid, and exactly the rows.
    for sample in ok_samples:
        image, mask = out / sample["image"], out / sample["mask"]
        if not _decodes(image):
            problems.append(f"{sample['image']}: missing or incomplete")
        if not _decodes(mask):
            problems.append(f"{sample['mask']}: missing or incomplete")
        else:
            with Image.open(mask) as m:
                values = set(np.unique(np.asarray(m)).tolist())
                if m.mode != "L" or not values <= {0, 255} or 255 not in values:
                    problems.append(f"{sample['mask']}: not an 8-bit 0/255 mask with a defect")
        if Path(sample["image"]).stem + "_mask" != Path(sample["mask"]).stem:
            problems.append(f"{sample['image']} and {sample['mask']} do not pair by name")
        for name in ("messages.json", "episode.json"):
            try:
                json.loads((out / sample["trajectory"] / name).read_text())
            except Exception:  # noqa: BLE001
                problems.append(f"{sample['trajectory']}/{name}: missing or not valid JSON")
    on_disk = {str(p.relative_to(out)) for p in (out / CATEGORY / "test").rglob("*")
               if p.is_file() and p.parent.name != "good"}
    on_disk |= {str(p.relative_to(out)) for p in (out / CATEGORY / "ground_truth").rglob("*")
                if p.is_file()}
    in_store = {s["image"] for s in ok_samples} | {s["mask"] for s in ok_samples}
    if on_disk != in_store:
        problems.append(f"files and store differ: {len(on_disk - in_store)} file(s) without a "
                        f"row {sorted(on_disk - in_store)[:3]}, {len(in_store - on_disk)} row(s) "
                        f"without a file")
    good = {str(p.relative_to(out)) for split in ("train", "test")
            for p in (out / CATEGORY / split / "good").glob("*")}
    if good != {n["path"] for n in normals if n["status"] == "ok"} or len(normals) != len(good):
        problems.append("train/good, test/good and the store's normals differ")
    trajectories = {str(p.relative_to(out)) for p in (out / "trajectories").glob("*/*/*")}
    if trajectories != {s["trajectory"] for s in ok_samples}:
        problems.append("trajectory folders and samples differ")

    # 3. The manifests: views of the store, line for line.
    manifest = read_jsonl(out / "manifest.jsonl", problems)
    if [r.get("key") for r in manifest] != [s["key"] for s in ok_samples]:
        problems.append(f"manifest.jsonl ({len(manifest)} lines) does not match the store "
                        f"({len(ok_samples)} samples)")
    for record in manifest:
        files = [record.get("image"), record.get("mask")]
        if not all(files) or not all((out / name).exists() for name in files):
            problems.append(f"manifest line without its files: {record.get('key')}")
    listed = read_jsonl(out / "normals.jsonl", problems)
    if sorted(str(r.get("path")) for r in listed) != sorted(n["path"] for n in normals):
        problems.append("normals.jsonl does not match the store")
    rejected = read_jsonl(out / "rejected.jsonl", problems)
    if sorted(str(r.get("key")) for r in rejected) != sorted(
            e["key"] for e in episodes if e["status"] in ("rejected", "failed")):
        problems.append("rejected.jsonl does not match the store")

    # 4. No temporary names, nothing moved aside.
    leftovers = [str(p.relative_to(out)) for p in out.rglob("*") if TEMP_NAMES.search(p.name)]
    if leftovers:
        problems.append(f"{len(leftovers)} file(s) under temporary names: {leftovers[:3]}")
    orphans = out / ".appliance" / "orphans"
    if orphans.exists() and any(p.is_file() for p in orphans.rglob("*")):
        problems.append("files had to be moved aside as orphans: " + ", ".join(
            str(p.relative_to(orphans)) for p in list(orphans.rglob("*"))[:3]))

    # 5. The same samples, pixel for pixel, as an uninterrupted run.
    if reference is not None:
        ours = {r.get("key"): r for r in manifest}
        theirs = {r.get("key"): r for r in read_jsonl(reference / "manifest.jsonl", problems)}
        if set(ours) != set(theirs):
            problems.append(f"samples differ from the uninterrupted run: missing "
                            f"{len(set(theirs) - set(ours))}, extra {len(set(ours) - set(theirs))}")
        for key in set(ours) & set(theirs):
            for part in ("image", "mask"):
                a = np.asarray(Image.open(out / ours[key][part]))
                b = np.asarray(Image.open(reference / theirs[key][part]))
                if a.shape != b.shape or not np.array_equal(a, b):
                    problems.append(f"{ours[key][part]} differs from the uninterrupted run")
    return problems


def expected_keys(inbox: Path) -> set[str]:
    from appliance.batch import plan_episodes
    from appliance.imaging import sha256_file

    keys = set()
    for path in sorted((inbox / CATEGORY).glob("*.png")):
        keys |= {plan.key for plan in plan_episodes(sha256_file(path), CATEGORY, [DEFECT], 1, 0)}
    return keys


def crash_test(workdir: Path, images: int = 200, kills: int = 20, seed: int = 0,
               reference: bool = True, size: int = 96) -> CrashReport:
    """Build the inbox, run the uninterrupted reference, then the killed runs; verify."""
    started = time.perf_counter()
    report = CrashReport()
    rng = random.Random(seed)
    inbox, out, clean = workdir / "inbox", workdir / "dataset", workdir / "reference"
    for folder in (inbox, out, clean):
        shutil.rmtree(folder, ignore_errors=True)
    make_inbox(inbox, images, size=size, seed=seed)
    startup = 1.5
    if reference:
        done = subprocess.run(batch_command(inbox, clean), capture_output=True, text=True,
                              cwd=REPO, timeout=1800)
        if done.returncode != 0:
            report.problems.append(f"reference run failed: {done.stderr[-2000:]}")
            return report
        # A second run has nothing to do: its length is this machine's start-up.
        begin = time.perf_counter()
        subprocess.run(batch_command(inbox, clean), capture_output=True, cwd=REPO, timeout=1800)
        startup = time.perf_counter() - begin
    run_with_kills(batch_command(inbox, out), plan_kills(rng, kills, images, startup), report)
    if not report.problems:
        report.problems += verify(out, expected_keys(inbox), clean if reference else None)
    manifest = out / "manifest.jsonl"
    report.samples = len(manifest.read_text().splitlines()) if manifest.exists() else 0
    rejected = out / "rejected.jsonl"
    report.rejected = len(rejected.read_text().splitlines()) if rejected.exists() else 0
    report.seconds = time.perf_counter() - started
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=96, help="side of the test photos, pixels")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the uninterrupted comparison run")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep everything here (default: a temporary folder, removed)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="appliance-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = crash_test(workdir, args.images, args.kills, args.seed,
                            not args.no_reference, args.size)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for line in report.log:
        print(line)
    print(f"{args.images} images, {report.kills} kills in {report.runs} runs "
          f"({report.finished_early} finished before their kill): {report.samples} samples, "
          f"{report.rejected} rejected, {report.seconds:.0f} s")
    if report.ok:
        print("PASS: every expected sample exists exactly once, complete and valid; manifests, "
              "files and store agree; no temporary names left")
        return 0
    print("FAIL:")
    for problem in report.problems:
        print(f"  - {problem}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
