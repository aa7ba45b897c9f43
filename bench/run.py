"""Speed benchmark: the CPU engine against the DRAEM and CutPaste baselines, in one run.

    python bench/run.py [--sizes 256,512] [--episodes 48] [--threads 2]
    python bench/run.py --sizes 256 --episodes 300 --generators ours,batch   # issue 15's target

Every (generator, size) runs in its own child process pinned to ``--threads`` cores, so peak
memory is that generator's alone and one measurement cannot warm the caches of the next. An
episode is one normal image in, one synthetic sample out (ours: the full agent loop, judge
and retries included; a baseline: one call of its recipe). Engine start-up and two warm-up
episodes are timed separately and left out of the rates.

``batch`` is the end to end: ``appliance batch`` as a user runs it, a fresh process on an inbox
of the same photos (each with every defect type of the category, so the episodes are the same
mix), writing the whole dataset (normals, samples, masks, trajectories, manifests, contact
sheets). Its rate is wall time from process start to exit, start-up included; a one-photo
batch first warms the box's caches (the retrieval index and its query vectors, built once per
box), as the warm-up episodes do for the engine. Its ratio is to the engine alone on exactly
those episodes, measured in the same process: every photo with every defect type, in the
queue's order and chunks (``engine_alone``); the ``ours`` row runs one defect per photo, which
shares less work between the episodes of a chunk, and is not the same workload.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TILES = REPO.parent / "shared" / "datasets" / "magnetic-tile" / "MT_Free"
GENERATORS = ("ours", "draem", "cutpaste", "batch")
WARMUP = 2


def _normals(count: int, size: int) -> tuple[list, str]:
    """Real normal photos when the magnetic tile data sits beside the repo, else textures."""
    import numpy as np

    if TILES.is_dir():
        from appliance.evaluation.data import find_images, load_normals

        paths = find_images(TILES)[:count]
        return [it.image for it in load_normals(paths, size)], "magnetic_tile"
    import cv2
    import skimage.data

    sources = [skimage.data.brick(), skimage.data.gravel(), skimage.data.grass()]
    images = []
    for i in range(count):
        grey = cv2.resize(np.roll(sources[i % 3], 37 * i, axis=1), (size, size))
        images.append(np.repeat(grey[..., None], 3, axis=2))
    return images, "tile"


def end_to_end(size: int, episodes: int, threads: int, seed: int) -> dict:
    """``appliance batch`` in a fresh process over the same photos; wall time, start-up in."""
    import tempfile

    from PIL import Image

    from appliance.tools.knowledge.base import load_knowledge_base

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    images, category = _normals(episodes, size)
    defects = load_knowledge_base().defects_for(category) or ["crack", "scratch", "stain"]
    photos = -(-episodes // len(defects))
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        root = Path(tmp)

        def inbox(name: str, chosen: list) -> Path:
            folder = root / name / category
            folder.mkdir(parents=True)
            for i, image in enumerate(chosen):
                Image.fromarray(image).save(folder / f"{i:04d}.png")
            return folder.parent

        def run(inbox_dir: Path, out: Path) -> float:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "appliance.cli.main", "batch",
                                   str(inbox_dir), "--out", str(out), "--no-progress",
                                   "--seed", str(seed)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"appliance batch failed:\n{done.stderr[-3000:]}")
            return time.perf_counter() - start

        startup = run(inbox("warm", images[:1]), root / "warm-out")
        seconds = run(inbox("inbox", images[:photos]), root / "out")
        manifest = (root / "out" / "manifest.jsonl").read_text().splitlines()
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    engine_seconds = engine_alone(images[:photos], category, defects, seed)
    ran = photos * len(defects)
    return {"generator": "batch", "size": size, "episodes": ran, "seconds": seconds,
            "episodes_per_s": ran / seconds, "accepted": len(manifest),
            "s_per_accepted": seconds / len(manifest) if manifest else float("inf"),
            "startup_s": startup, "threads": threads, "category": category,
            "peak_rss_mb": peak, "engine_alone_episodes_per_s": ran / engine_seconds}


def engine_alone(images: list, category: str, defects: list, seed: int) -> float:
    """Seconds the engine alone takes for the batch's episodes, in its order and chunks."""
    import torch

    from appliance.agent.episode import EpisodeSpec
    from appliance.agent.runner import run_episodes
    from appliance.engine import build_engine

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    engine = build_engine()
    specs = [EpisodeSpec(image=image, category=category, defect=defect, seed=seed + i,
                         source=f"#{i}") for i, image in enumerate(images) for defect in defects]
    list(run_episodes(engine, specs[:WARMUP], chunk=4))
    start = time.perf_counter()
    list(run_episodes(engine, specs, chunk=4))
    return time.perf_counter() - start


def worker(generator: str, size: int, episodes: int, threads: int, seed: int) -> dict:
    if generator == "batch":
        return end_to_end(size, episodes, threads, seed)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO))
    from appliance.evaluation.generators import make_generator
    from appliance.tools.knowledge.base import load_knowledge_base

    images, category = _normals(episodes + WARMUP, size)
    defects = load_knowledge_base().defects_for(category) or ["crack", "scratch", "stain"]
    start = time.perf_counter()
    engine = None
    if generator == "ours":
        from appliance.engine import build_engine

        engine = build_engine()
    made = make_generator(generator, category, defects, engine)
    made.generate(images[:WARMUP], seed)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    samples = made.generate(images[WARMUP:], seed + 1)
    seconds = time.perf_counter() - start
    accepted = sum(s.accepted for s in samples)
    return {"generator": generator, "size": size, "episodes": episodes, "seconds": seconds,
            "episodes_per_s": episodes / seconds, "accepted": accepted,
            "s_per_accepted": seconds / accepted if accepted else float("inf"),
            "startup_s": startup, "threads": threads, "category": category,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _run_child(generator: str, size: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, __file__, "--worker", generator, "--sizes", str(size),
               "--episodes", str(args.episodes), "--threads", str(args.threads),
               "--seed", str(args.seed)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{generator} at {size}px failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    header = ["generator", "size", "episodes/s", "s/accepted", "accepted", "peak RSS MB",
              "start-up s", "s/accepted vs ours"]
    body = []
    for row in rows:
        ours = next((r for r in rows if r["generator"] == "ours" and r["size"] == row["size"]), None)
        ratio = ""
        if row["generator"] == "batch":
            alone = row["engine_alone_episodes_per_s"]
            ratio = (f"end to end {row['episodes_per_s'] / alone:.2f} of the engine alone on "
                     f"the same episodes ({alone:.1f}/s)")
        elif ours and row["generator"] != "ours" and row["s_per_accepted"] > 0:
            ratio = f"ours {ours['s_per_accepted'] / row['s_per_accepted']:.1f}x slower"
        body.append([row["generator"], str(row["size"]), f"{row['episodes_per_s']:.1f}",
                     f"{row['s_per_accepted']:.4f}", f"{row['accepted']}/{row['episodes']}",
                     f"{row['peak_rss_mb']:.0f}", f"{row['startup_s']:.1f}", ratio])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--episodes", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--generators", default=",".join(GENERATORS))
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, sizes[0], args.episodes, args.threads, args.seed)))
        return
    rows = []
    for size in sizes:
        for generator in args.generators.split(","):
            print(f"running {generator} at {size}px ...", file=sys.stderr, flush=True)
            rows.append(_run_child(generator, size, args))
    print(f"{rows[0]['category']} normals, {args.episodes} episodes per row, "
          f"{args.threads} threads, python {sys.version.split()[0]}")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
