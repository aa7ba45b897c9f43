"""Zero-shot evaluation on real parts the engine was never tuned on: elpv solar cells.

    pip install elpv-dataset                     # 91 MB of real photos, CC BY-NC-SA 4.0
    python bench/heldout_elpv.py                 # mono cells, seeds 0-2, about 3 minutes a seed on 2 cores
    python bench/heldout_elpv.py --cells poly --seeds 0 --json elpv-poly.json

Every tuning decision in the CPU engine was made on the magnetic tiles, the only real defects with
masks we have. The elpv dataset (Buerhop-Lutz et al. 2018, Deitsch et al. 2019) is 2,624
electroluminescence photos of solar cells cut from real modules, each rated by experts as
defective with probability 0, 1/3, 2/3 or 1. The defects are mostly cracks and the dark inactive
regions they cut off. It has no masks, so it measures image-level detection only.

What it runs: the cells of one type (``--cells``) rated 0 become the normal folder, those rated
1 one defect class, ``crack``, the name the dataset's authors give the defects; the uncertain
ratings are left out. Then ``appliance eval --image-labels`` as a user runs it (a subprocess,
zero-shot, the same UNet and protocol as on the tiles), under the category ``solar_cell``, which the knowledge
base does not have: the engine falls back to its defaults, as on a new plant's part. The
headline is image AUROC (no masks), ours over the best baseline, mean over the seeds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEFECT_CLASS = "crack"
CATEGORY = "solar_cell"


def write_folders(cells: str, root: Path, max_defects: int) -> tuple[Path, Path, int, int]:
    """The normal folder and the defect folder (one class, no masks) of one cell type."""
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise SystemExit("this benchmark reads the elpv photos from their PyPI package: "
                         "pip install elpv-dataset") from None
    images, probabilities, types = load_dataset()
    chosen = types == cells
    normal_dir, defects_dir = root / "normal", root / "defects"
    crack_dir = defects_dir / DEFECT_CLASS
    normal_dir.mkdir(parents=True)
    crack_dir.mkdir(parents=True)
    normals = np.flatnonzero(chosen & (probabilities == 0.0))
    # Every defective cell, or an even spread of them: the dataset's order is by module.
    defective = np.flatnonzero(chosen & (probabilities == 1.0))
    if max_defects and len(defective) > max_defects:
        defective = defective[np.linspace(0, len(defective) - 1, max_defects).round().astype(int)]
    for folder, indices in ((normal_dir, normals), (crack_dir, defective)):
        for i in indices:
            Image.fromarray(images[i]).save(folder / f"cell{i:04d}.png")
    return normal_dir, defects_dir, len(normals), len(defective)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", choices=("mono", "poly"), default="mono")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--generators", default="ours,draem,cutpaste")
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--max-defects", type=int, default=0,
                        help="test on at most this many defective cells, evenly spread (0: all)")
    parser.add_argument("--detector-seeds", type=int, default=1,
                        help="detectors trained per generator and seed (appliance eval's option)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="keep the eval reports here (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="elpv-") as tmp:
        normal_dir, defects_dir, n_normal, n_defect = write_folders(args.cells, Path(tmp) / "data",
                                                                    args.max_defects)
        out = args.out or Path(tmp) / "eval"
        print(f"elpv {args.cells}: {n_normal} normal cells, {n_defect} defective cells", flush=True)
        command = [sys.executable, "-m", "appliance.cli.main", "eval", "--normal", str(normal_dir),
                   "--defects", str(defects_dir), "--category", CATEGORY, "--seeds", args.seeds,
                   "--generators", args.generators, "--train-size", str(args.train_size),
                   "--detector-seeds", str(args.detector_seeds),
                   "--threads", str(args.threads), "--no-generation-metrics", "--no-progress",
                   "--image-labels",
                   "--out", str(out)]
        subprocess.run(command, check=True)
        report = json.loads((out / "report.json").read_text())

    ratio = report["ratio_ours_to_best_baseline"]
    summary = {"dataset": f"elpv {args.cells}", "normal_cells": n_normal, "defective_cells": n_defect,
               "seeds": report["seeds"],
               "metrics": {name: {key: gen["metrics"][key] for key in ("image_auroc", "image_ap")}
                           for name, gen in report["generators"].items()},
               "acceptance": report["generators"].get("ours", {}).get("generation", {})
                                                  .get("acceptance_rate"),
               "ratio": {key: ratio[key] for key in ("image_auroc", "image_ap") if key in ratio}}
    print()
    for key in ("image_auroc", "image_ap"):
        cells = ", ".join(f"{name} {m[key]['mean']:.3f}"
                          + (f" ± {m[key]['std']:.3f}" if m[key]["std"] is not None else "")
                          for name, m in summary["metrics"].items())
        line = f"{key}: {cells}"
        if key in summary["ratio"]:
            cell = summary["ratio"][key]
            per_seed = ", ".join("n/a" if r is None else f"{r:.2f}" for r in cell["per_seed"])
            line += (f"; ours / best baseline ({cell['best_baseline']}) {cell['ratio']:.3f} "
                     f"(per seed {per_seed})")
        print(line)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
