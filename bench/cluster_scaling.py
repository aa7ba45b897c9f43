"""Scaling row: the same batch on 1 and 2 Ray worker nodes, and on this box alone, in one run.

    python bench/cluster_scaling.py                      # 24 magnetic tile photos x 5 defects, 512 px
    python bench/cluster_scaling.py --photos 24 --side 1024 --json scaling.json

A local Ray cluster (``ray.cluster_utils.Cluster``, token authentication on): a head with no CPU
for engines (it keeps the job store and writes the dataset, as a real head does) and worker nodes
of one CPU each, the CPU engine. Each row runs ``run_batch`` on a fresh dataset with the engines
already started (model loading is left out of the rate, as in bench/run.py):

- ``episodes/s``: episodes run and written per second while the queue runs (the photos' intake
  and the contact sheets, the same work in every row, are left out; ``total s`` has them);
- ``efficiency``: the 2-node rate / (2 x the 1-node rate);
- ``head s/episode``: what the head spends per episode committing it (PNG encoding, the store's
  write protocol with its fsyncs), measured in the same runs: its inverse bounds how many
  episodes per second one head can take, whatever the number of nodes.

The datasets of every row are compared: images and masks must be identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TILES = REPO.parent / "shared" / "datasets" / "magnetic-tile" / "MT_Free" / "Imgs"


class HeadClock:
    """Seconds the head spends encoding and writing samples (wraps the writer's two steps)."""

    def __init__(self):
        from appliance.dataset import writer

        self.seconds = 0.0
        self.episodes = 0
        encode, write = writer.encode_sample, writer.DatasetWriter.write

        def timed_encode(*args, **kwargs):
            started = time.perf_counter()
            try:
                return encode(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        def timed_write(this, *args, **kwargs):
            started = time.perf_counter()
            try:
                return write(this, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.episodes += 1

        writer.encode_sample = timed_encode
        writer.DatasetWriter.write = timed_write

    def take(self) -> float:
        per = self.seconds / max(self.episodes, 1)
        self.seconds, self.episodes = 0.0, 0
        return per


class QueueClock:
    """Seconds spent in ``process_queue``: running and writing the episodes."""

    def __init__(self):
        import appliance.batch as batch

        self.seconds = 0.0
        process = batch.process_queue

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return process(*args, **kwargs)
            finally:
                self.seconds = time.perf_counter() - started

        batch.process_queue = timed


def sample_digest(root: Path) -> str:
    records = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    parts = sorted(hashlib.sha256((root / r["image"]).read_bytes() + (root / r["mask"]).read_bytes())
                   .hexdigest() for r in records)
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cluster-scaling-"))
    try:
        measure(args, work)
    finally:  # the photos, the batches' outputs and the cluster's token
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> None:
    token = work / "token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, secrets.token_hex(32).encode())
    os.close(fd)
    # Ray reads these when it is imported: before any import of it.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), OMP_NUM_THREADS="1")

    from PIL import Image
    from ray.cluster_utils import Cluster

    from appliance.batch import EpisodeRunner, run_batch
    from appliance.cluster.runner import ClusterRunner
    from appliance.cluster.settings import ClusterSettings
    from appliance.engine import EngineConfig

    inbox = work / "inbox" / "magnetic_tile"
    inbox.mkdir(parents=True)
    photos = sorted(TILES.glob("*.jpg"))[:args.photos]
    if len(photos) < args.photos:
        sys.exit(f"needs {args.photos} photos in {TILES}")
    for path in photos:
        Image.open(path).convert("RGB").resize((args.side, args.side)).save(inbox / f"{path.stem}.png")
    config = EngineConfig()
    clock, queue = HeadClock(), QueueClock()
    rows = []

    def run(name: str, runner) -> None:
        out = work / name
        started = time.perf_counter()
        summary = run_batch(inbox.parent, out, runner=runner, chunk=args.chunk,
                            test_good_share=0.0)
        seconds = time.perf_counter() - started
        rows.append({"row": name, "episodes": summary.episodes, "seconds": round(seconds, 2),
                     "queue_seconds": round(queue.seconds, 2),
                     "episodes_per_second": round(summary.episodes / queue.seconds, 2),
                     "head_seconds_per_episode": round(clock.take(), 4),
                     "samples": sample_digest(out)})
        print(f"{name:10s} {summary.episodes} episodes in {seconds:.1f} s", flush=True)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        settings = ClusterSettings(address=cluster.address, token_file=token)
        for nodes in (1, 2):
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            runner = ClusterRunner(config, settings)
            assert len(runner.engines) == nodes
            run(f"{nodes} node{'s' if nodes > 1 else ''}", runner)
    finally:
        cluster.shutdown()
    # Last: the nodes' engines built the box's retrieval cache, which this one then finds too.
    run("one box", EpisodeRunner(config=config))
    one, two = rows[0]["episodes_per_second"], rows[1]["episodes_per_second"]
    efficiency = two / (2 * one)
    head = max(r["head_seconds_per_episode"] for r in rows[:2])
    print(f"\n{args.photos} photos x 5 defects, {args.side} px, chunk {args.chunk}, "
          f"{os.cpu_count()} cores")
    print("| row | episodes/s | total s | head s/episode | samples |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['episodes_per_second']:.2f} | {r['seconds']:.1f} "
              f"| {r['head_seconds_per_episode']:.4f} | {r['samples']} |")
    print(f"efficiency (2 nodes / twice 1 node): {efficiency:.2f}")
    print(f"one head commits at most {1 / head:.1f} episodes/s at {args.side} px")
    same = len({r["samples"] for r in rows}) == 1
    print(f"identical samples in every row: {same}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "efficiency": round(efficiency, 3),
                                         "side": args.side, "identical": same}, indent=2))
    if not same:
        sys.exit("the rows wrote different samples")


if __name__ == "__main__":
    main()
