"""A real dataset for the review tests and a real `appliance review` server on it."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from conftest import REPO

HOSTILE_CATEGORY = "o'neil_&_co"  # what a factory folder may be called and our names allow


def make_review_dataset(root: Path, tile_paths: list[Path], engine) -> Path:
    """Six tiles of magnetic_tile (one held back in test/good, ten samples) and two of a
    category with a hostile name, run by a judge strict enough to reject some episodes."""
    from appliance.agent.episode import EnvConfig
    from appliance.batch import run_batch
    from appliance.engine import EngineConfig, build_engine

    inbox = root / "inbox" / "magnetic_tile"
    inbox.mkdir(parents=True)
    for path in tile_paths[:6]:
        shutil.copy(path, inbox / path.name)
    dataset = root / "dataset"
    run_batch(root / "inbox", dataset, engine=engine, defects=["crack", "blowhole"],
              test_good_share=0.1)
    strict = build_engine(EngineConfig(env=EnvConfig(min_location=5, min_quality=5,
                                                     max_image_gen=1)))
    try:
        hostile = root / "inbox2" / HOSTILE_CATEGORY
        hostile.mkdir(parents=True)
        for path in tile_paths[6:10]:
            shutil.copy(path, hostile / path.name)
        summary = run_batch(root / "inbox2", dataset, engine=strict,
                            defects=["crack", "blowhole"], test_good_share=0.1)
    finally:
        strict.close()
    assert summary.rejected + summary.failed >= 1, "the strict judge rejected nothing"
    return dataset


class ReviewServer:
    """``appliance review DATASET --port 0`` in a subprocess; the URL it prints."""

    def __init__(self, dataset: Path, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "review", str(dataset), "--port", "0",
             "--reviewer", "night-shift", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.process.stdout.readline().strip()
        if not line.startswith("http://"):
            self.process.kill()
            raise AssertionError(f"no URL printed: {line!r} {self.process.stderr.read()}")
        self.url = line
        parts = urlsplit(line)
        self.host, self.port = parts.hostname, parts.port
        self.token = parts.query.removeprefix("token=")
        self.cookie = f"appliance_review_{self.port}={self.token}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, cookie: bool = True):
        """(status, headers, body) of one raw request: the path goes out exactly as given."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        sent = {**({"Cookie": self.cookie} if cookie else {}), **(headers or {})}
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, dict(response.getheaders()), data

    def get_json(self, path: str):
        status, _, data = self.request("GET", path)
        assert status == 200, (path, status, data[:300])
        return json.loads(data)

    def csrf(self) -> str:
        status, _, page = self.request("GET", "/")
        assert status == 200
        text = page.decode()
        start = text.index('name="csrf-token" content="') + len('name="csrf-token" content="')
        return text[start:text.index('"', start)]

    def post_json(self, path: str, payload: dict, csrf: str | None):
        headers = {"Content-Type": "application/json"}
        if csrf is not None:
            headers["X-CSRF-Token"] = csrf
        status, _, data = self.request("POST", path, json.dumps(payload).encode(), headers)
        return status, json.loads(data or b"{}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process.stdout.close()
        self.process.stderr.close()


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")
