"""`appliance cluster token/start/stop`: the real `ray start` the appliance runs (token
authentication, fixed ports, no dashboard), then a batch over the node it started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, require_module
from PIL import Image

require_module("ray")  # the test extra includes the cluster extra

pytestmark = pytest.mark.slow

PORT = 46379  # not Ray's default: never a cluster that happens to run on the test machine


def appliance(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_start_a_head_with_a_token_run_a_batch_on_it_and_stop(tmp_path, tile_paths):
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nroot = "{tmp_path}"\n\n[cluster]\nport = {PORT}\n'
                      f'node_ip = "127.0.0.1"\n')
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
           "APPLIANCE_CONFIG": str(config), "OMP_NUM_THREADS": "1"}
    refused = appliance("cluster", "start", "--num-cpus", "1", env=env)
    assert refused.returncode != 0 and "appliance cluster token" in refused.stderr
    assert not listening(PORT)
    made = appliance("cluster", "token", env=env)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "cluster-token").stat().st_mode & 0o777 == 0o600
    again = appliance("cluster", "token", env=env)
    assert again.returncode != 0 and "--force" in again.stderr  # never replaced by accident
    inbox = tmp_path / "inbox" / "magnetic_tile"
    inbox.mkdir(parents=True)
    for path in tile_paths[:2]:
        Image.open(path).save(inbox / (path.stem + ".png"))
    started = appliance("cluster", "start", "--num-cpus", "1", env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "--include-dashboard=false" in started.stderr
        assert listening(PORT) and not listening(8265)  # the GCS port; no dashboard
        result = appliance("batch", str(inbox.parent), "--out", str(tmp_path / "dataset"),
                           "--engine", "cpu", "--test-good-share", "0", "--no-progress",
                           "--cluster", f"127.0.0.1:{PORT}", env=env)
        assert result.returncode == 0, result.stderr
        assert "1 engine(s), running" in result.stderr
        records = (tmp_path / "dataset" / "manifest.jsonl").read_text().splitlines()
        assert len(records) == 10 and all(json.loads(r)["engine"] == "cpu" for r in records)
    finally:
        stopped = appliance("cluster", "stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert not listening(PORT)
