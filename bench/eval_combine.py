"""Combine per-seed `appliance eval` reports run side by side (bench/eval_gpu.sh) into the
report `appliance eval --seeds` writes: mean, spread and per-seed values.

    python bench/eval_combine.py DIR     # DIR holds <mode>-seed<N>.json; writes DIR/<mode>/
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from appliance.evaluation import report as report_mod


def main(folder: Path) -> None:
    runs: dict[str, dict[int, dict]] = {}
    for path in sorted(folder.glob("*-seed*.json")):
        match = re.fullmatch(r"(.+)-seed(\d+)\.json", path.name)
        if match:
            runs.setdefault(match[1], {})[int(match[2])] = json.loads(path.read_text())
    if not runs:
        raise SystemExit(f"{folder}: no <mode>-seed<N>.json reports")
    for mode, reports in sorted(runs.items()):
        combined = report_mod.aggregate(dict(sorted(reports.items())))
        # The seeds ran side by side: the slowest one is the wall time.
        combined["wall_seconds"] = max(r.get("wall_seconds") or 0.0 for r in reports.values())
        report_mod.write_reports(folder / mode, combined)
        print(f"== {mode}: seeds {sorted(reports)}")
        print(report_mod.format_table(combined))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
