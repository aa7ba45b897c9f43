"""A live `appliance watch` process for tests: sd_notify socket, log, store queries, and the
small real photos the tests drop into its inbox."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from appliance.service.intake import REASON_SUFFIX

OLD = time.time() - 3600  # mtime of a file copied with its timestamp kept (cp -p, rsync -t)


def photo(seed: int, size: tuple[int, int] = (96, 96)) -> np.ndarray:
    """A small real photo: a crop of scikit-image's brick texture, shifted per seed."""
    from skimage import data

    brick = data.brick()
    top, left = (seed * 37) % 200, (seed * 53) % 200
    crop = brick[top:top + 96, left:left + 96]
    return np.asarray(Image.fromarray(crop).resize(size, Image.BILINEAR))


def png_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose data is a few bytes."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))



class NotifyListener:
    """A datagram socket playing systemd's part: collects READY/STATUS/WATCHDOG messages."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (socket.timeout, OSError):
                continue

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


class Watcher:
    def __init__(self, root: Path, config: str, env: dict | None = None,
                 prefix: list[str] | None = None):
        self.root = root
        self.config = root / "config.toml"
        self.config.write_text(config.format(root=root))
        self.listener = NotifyListener(root / "notify.sock")
        self.log = open(root / "watch.log", "w+")
        env = {**os.environ, "APPLIANCE_CONFIG": str(self.config), "PYTHONUNBUFFERED": "1",
               "NOTIFY_SOCKET": str(self.listener.path), "WATCHDOG_USEC": "1000000",
               **(env or {})}
        env.pop("WATCHDOG_PID", None)
        self.process = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "appliance.cli.service_commands", "watch"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return (self.root / "watch.log").read_text(errors="replace")

    def wait_for(self, condition, timeout: float = 60.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"watcher died:\n{self.output()[-3000:]}"
            value = condition()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.output()[-3000:]}")

    def store_counts(self) -> dict:
        import sqlite3

        db = sqlite3.connect(f"file:{self.root / 'dataset' / '.appliance' / 'jobs.db'}?mode=ro",
                             uri=True, timeout=10)
        try:
            return dict(db.execute("select status, count(*) from episodes group by status"))
        finally:
            db.close()

    def idle(self) -> bool:
        counts = self.store_counts()
        return not any(counts.get(s) for s in ("queued", "running", "writing"))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.listener.close()
            self.log.close()


def reasons(quarantine: Path) -> dict[str, str]:
    """{the 'file:' line: the 'reason:' line} of every .reason.txt."""
    found = {}
    for note in quarantine.rglob(f"*{REASON_SUFFIX}"):
        fields = dict(line.split(":", 1) for line in note.read_text().splitlines() if ":" in line)
        found[fields["file"].strip()] = fields["reason"].strip()
    return found


def notes_have_files(quarantine: Path) -> bool:
    """The note is written just before its file is moved in: both, once settled."""
    return all(os.path.lexists(note.parent / note.name[: -len(REASON_SUFFIX)])
               for note in quarantine.rglob(f"*{REASON_SUFFIX}"))
