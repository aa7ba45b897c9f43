"""One resident copy of each model: the policy, PG and QE may all name the same weights; they
share one loaded runtime, counted by users and closed when the last one is released."""

from __future__ import annotations

import threading
from typing import Callable

from appliance.vlm.chat import VLMRuntime

_LOCK = threading.Lock()
_RUNTIMES: dict[tuple, VLMRuntime] = {}
_USERS: dict[int, int] = {}


def shared_runtime(key: tuple, load: Callable[[], VLMRuntime]) -> VLMRuntime:
    """The runtime loaded under ``key``, loading it on first use."""
    with _LOCK:
        runtime = _RUNTIMES.get(key)
        if runtime is None:
            runtime = load()
            _RUNTIMES[key] = runtime
        _USERS[id(runtime)] = _USERS.get(id(runtime), 0) + 1
        return runtime


def release_runtime(runtime: VLMRuntime) -> None:
    """Drop one user of a shared runtime; the last one closes it. Unshared runtimes stay open."""
    with _LOCK:
        if id(runtime) not in _USERS:
            return
        _USERS[id(runtime)] -= 1
        if _USERS[id(runtime)] > 0:
            return
        del _USERS[id(runtime)]
        for key, value in list(_RUNTIMES.items()):
            if value is runtime:
                del _RUNTIMES[key]
    runtime.close()


def loaded_runtimes() -> list[str]:
    with _LOCK:
        return [runtime.name for runtime in _RUNTIMES.values()]
