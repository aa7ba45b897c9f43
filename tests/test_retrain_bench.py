"""bench/retrain_seeds.py runs end to end as a real subprocess (a few steps: its figures mean
nothing at this size; the script's plumbing is what is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import require_module, require_tiles

ROOT = Path(__file__).resolve().parents[1]


def test_the_retrain_bench_reports_base_sft_and_grpo_on_held_out_and_unseen_photos(tmp_path):
    require_module("trl", extra="train")
    require_tiles("MT_Crack", "Imgs")
    out = tmp_path / "rows.json"
    scratch = tmp_path / "tmp"  # where the bench makes (and must remove) its working folder
    scratch.mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "retrain_seeds.py"), "--seeds", "3", "--photos", "3",
         "--unseen", "1", "--steps", "4", "--grpo-steps", "1", "--generations", "2",
         "--grpo-tasks", "2", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["seed"] for r in rows] == [3]
    row = rows[0]
    assert row["base"]["episodes"] == 2 * 2  # one held-out photo of each type, two runs each
    assert row["unseen"]["sft"]["episodes"] == row["unseen"]["grpo"]["episodes"] == 2 * 2
    assert "| mean |" in done.stdout and "GRPO above SFT:" in done.stdout
    assert not list(scratch.glob("appliance-*"))  # torch may leave its own caches there
