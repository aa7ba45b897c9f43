"""Combine per-seed `appliance eval` reports run side by side (bench/eval_gpu.sh) into the
report `appliance eval --seeds` writes: mean, spread and per-seed values, and the bootstrap
range of the pixel-AP ratio where every run's <mode>-seed<N>/pixel_counts.npz came back too.

    python bench/eval_combine.py DIR     # DIR holds <mode>-seed<N>.json; writes DIR/<mode>/
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from appliance.evaluation import report as report_mod
from appliance.evaluation.bootstrap import load_counts
from appliance.evaluation.runner import add_ratio_interval


def main(folder: Path) -> None:
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*-seed*.json")):
        match = re.fullmatch(r"(.+)-seed(\d+)\.json", path.name)
        if match:
            runs.setdefault(match[1], {})[int(match[2])] = json.loads(path.read_text())
    if not runs:
        raise SystemExit(f"{folder}: no <mode>-seed<N>.json reports")
    for mode, reports in sorted(runs.items()):
        seeds = sorted(reports)
        combined = report_mod.aggregate({seed: reports[seed] for seed in seeds})
        counts = [load_counts(folder / f"{mode}-seed{seed}") for seed in seeds]
        if all(c is not None for c in counts):
            add_ratio_interval(combined, counts, seeds[0])
        # The seeds ran side by side: the slowest one is the wall time.
        combined["wall_seconds"] = max(r.get("wall_seconds") or 0.0 for r in reports.values())
        report_mod.write_reports(folder / mode, combined)
        print(f"== {mode}: seeds {sorted(reports)}")
        print(report_mod.format_table(combined))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
