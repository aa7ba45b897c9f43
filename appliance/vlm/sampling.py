"""How a VLM samples: from the checkpoint's own ``generation_config.json``, then the settings.

Qwen's Thinking and Instruct checkpoints ship different recommended settings in
``generation_config.json``; a bundle that includes the file is read as the model's authors meant.
Settings (a manifest entry's ``settings``, and per role its ``roles.<role>`` table) override it.
Greedy decoding is only ever chosen explicitly (``do_sample = false`` in the settings): Qwen
advises against it for Thinking models (endless repetition), so a generation config that asks
for it, or a temperature of 0, is not taken as a reason to decode greedily.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class Sampling:
    # Qwen3's published defaults for its Thinking models, used when the checkpoint says nothing.
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    presence_penalty: float = 0.0
    do_sample: bool = True

    def __post_init__(self) -> None:
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be true or false, not {self.do_sample!r}")
        if not number(self.temperature) or (self.do_sample and self.temperature <= 0):
            raise ValueError(f"temperature must be a number above 0 when sampling, not "
                             f"{self.temperature!r} (for greedy decoding set do_sample = false)")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a whole number >= 0 (0: off), not {self.top_k!r}")
        if not number(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be between -2 and 2, not {self.presence_penalty!r}")

    def updated(self, overrides: dict | None) -> "Sampling":
        """These settings with ``overrides`` (field -> value; None values ignored)."""
        if not overrides:
            return self
        known = {f.name for f in fields(Sampling)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown sampling setting(s) {unknown}; allowed: {sorted(known)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def checkpoint_sampling(folder: Path | None) -> dict:
    """The sampling fields ``generation_config.json`` in ``folder`` sets (none when absent)."""
    if folder is None or not (Path(folder) / GENERATION_CONFIG).is_file():
        return {}
    try:
        data = json.loads((Path(folder) / GENERATION_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); using the default sampling settings",
                    Path(folder) / GENERATION_CONFIG, exc)
        return {}
    taken = {key: data[key] for key in ("temperature", "top_p", "top_k", "presence_penalty")
             if isinstance(data.get(key), (int, float)) and not isinstance(data.get(key), bool)}
    if taken.get("temperature", 1.0) <= 0 or data.get("do_sample") is False:
        # transformers writes do_sample = false by default, so this is common and not alarming.
        log.info("%s asks for greedy decoding; sampling anyway (set do_sample = false in the "
                 "model's settings to decode greedily)", Path(folder) / GENERATION_CONFIG)
        taken.pop("temperature", None)
    return taken


def resolve_sampling(folder: Path | None, settings: dict) -> Sampling:
    """The checkpoint's generation config, then ``settings`` (the fields of ``Sampling``)."""
    return Sampling().updated(checkpoint_sampling(folder)).updated(
        {k: v for k, v in settings.items() if k in {f.name for f in fields(Sampling)}})
