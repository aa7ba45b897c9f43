"""bench/run.py runs, and its end-to-end row (`appliance batch` in a fresh process) reports a
ratio to the engine alone measured in the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_speed_bench_has_an_end_to_end_row(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--sizes", "64",
                           "--episodes", "5", "--generators", "ours,batch", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["generator"]: row for row in json.loads(out.read_text())}
    assert rows["batch"]["episodes"] >= 5 and rows["batch"]["accepted"] >= 1
    assert rows["batch"]["episodes_per_s"] > 0 and rows["ours"]["episodes_per_s"] > 0
    assert "of the engine alone on the same episodes" in done.stdout
    assert rows["batch"]["engine_alone_episodes_per_s"] > 0
