"""systemd's notification protocol (READY, STATUS, WATCHDOG), without a dependency.

The whole protocol is one datagram to the AF_UNIX socket named in ``$NOTIFY_SOCKET``; outside
systemd the variable is unset and every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Send one notification; True if a socket was there to receive it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8", "replace"))
    except OSError as exc:
        log.debug("sd_notify(%r) failed: %s", message, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WatchdogSec, as systemd recommends."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


class Notifier:
    """READY once, STATUS when it changes, WATCHDOG at most every half WatchdogSec."""

    def __init__(self) -> None:
        self.interval = watchdog_interval()
        self._last_ping = 0.0
        self._last_status = ""

    def ready(self, status: str = "") -> None:
        sd_notify("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self._last_status = status
        self.ping(force=True)

    def status(self, text: str) -> None:
        if text != self._last_status:
            sd_notify(f"STATUS={text}")
            self._last_status = text

    def ping(self, force: bool = False) -> None:
        """Call from the main loop: a hung loop stops pinging and systemd restarts it."""
        if self.interval is None:
            return
        now = time.monotonic()
        if force or now - self._last_ping >= self.interval:
            sd_notify("WATCHDOG=1")
            self._last_ping = now

    def stopping(self, status: str = "") -> None:
        sd_notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))
