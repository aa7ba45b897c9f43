"""What `appliance retrain` on the same cores costs the night's batch, and what `--nice` buys.

    python bench/retrain_beside_batch.py                      # about 20 minutes on 2 cores
    python bench/retrain_beside_batch.py --photos 100 --nices 10

On a box without a GPU the service's batches and an on-site retraining share a few cores. The
CPU engine's calibration check trains UNets with torch on every core it may use; the batch runs
the engine in worker processes. This runs, each in fresh processes as a user would:

1. ``appliance batch`` alone over an inbox of normal tiles (every defect type per photo);
2. ``appliance retrain DEFECTS --stage calibrate`` alone;
3. for each ``--nices`` value, the retraining started at that niceness and, once its first
   episodes are done and its detectors train (``--lead``), the same batch beside it.

It prints wall seconds and each run's ratio to the same command alone, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TILES = REPO.parent / "shared" / "datasets" / "magnetic-tile"
CATEGORY = "magnetic_tile"
DEFECTS = ("blowhole", "break", "crack", "fray", "uneven")


def _appliance(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance.cli.main", *args]


def _inbox(root: Path, photos: int) -> Path:
    folder = root / "inbox" / CATEGORY
    folder.mkdir(parents=True)
    normals = sorted((TILES / "MT_Free" / "Imgs").glob("*.jpg"))[:photos]
    if len(normals) < photos:
        raise SystemExit(f"only {len(normals)} normal tiles under {TILES / 'MT_Free'}")
    for path in normals:
        shutil.copy(path, folder / path.name)
    (folder / "spec.toml").write_text(f"defects = {json.dumps(list(DEFECTS))}\n")
    return folder.parent


def _batch(inbox: Path, out: Path, env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(_appliance("batch", str(inbox), "--out", str(out), "--no-progress",
                                     "--engine", "cpu"), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"appliance batch failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _retrain(defects: Path, out: Path, nice: int, env: dict) -> subprocess.Popen:
    # The child keeps its own copy of the log's descriptor; this one closes at once.
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen(_appliance("retrain", str(defects), "--category", CATEGORY,
                                           "--engine", "cpu", "--stage", "calibrate", "--out",
                                           str(out), "--nice", str(nice)),
                                env=env, stdout=log, stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defects", type=Path, default=TILES,
                        help="real defect photos with masks for the retraining (default: the tiles)")
    parser.add_argument("--photos", type=int, default=200,
                        help="normal photos in the batch's inbox; each runs every defect type")
    parser.add_argument("--nices", default="0,10", help="niceness values to run retrain at")
    parser.add_argument("--lead", type=float, default=25.0,
                        help="seconds after the retraining starts before the batch does: its "
                             "start-up and first episodes take about 15 s, then its detectors "
                             "train for minutes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-beside-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "APPLIANCE_HOME": str(root / "home"), "PYTHONUNBUFFERED": "1",
               # Each retraining starts from the uncalibrated engine and promotes into a scratch
               # folder, so the runs are alike and the box's own models are not touched.
               "APPLIANCE_MODELS": str(root / "models")}
        inbox = _inbox(root, args.photos)
        # A batch warms the box's caches (the retrieval index), as the service's first would.
        _batch(inbox, root / "warm", env)
        figures: dict[str, float] = {"batch alone": _batch(inbox, root / "alone", env)}
        print(f"batch alone: {figures['batch alone']:.1f} s "
              f"({args.photos * len(DEFECTS)} episodes)", flush=True)
        start = time.perf_counter()
        alone = _retrain(args.defects, root / "retrain-alone", 0, env)
        if alone.wait() != 0:
            raise RuntimeError(f"retrain failed; see {root / 'retrain-alone.log'}")
        figures["retrain alone"] = time.perf_counter() - start
        print(f"retrain alone: {figures['retrain alone']:.1f} s", flush=True)
        for nice in (int(n) for n in args.nices.split(",")):
            shutil.rmtree(root / "models", ignore_errors=True)
            run = root / f"retrain-nice{nice}"
            start = time.perf_counter()
            process = _retrain(args.defects, run, nice, env)
            time.sleep(args.lead)
            batch = _batch(inbox, root / f"beside-nice{nice}", env)
            if process.wait() != 0:
                raise RuntimeError(f"retrain failed; see {run.with_suffix('.log')}")
            retrain = time.perf_counter() - start
            figures[f"batch beside retrain --nice {nice}"] = batch
            figures[f"retrain --nice {nice} beside batch"] = retrain
            print(f"--nice {nice}: batch {batch:.1f} s ({batch / figures['batch alone']:.2f}x "
                  f"alone), retrain {retrain:.1f} s ({retrain / figures['retrain alone']:.2f}x "
                  "alone)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
