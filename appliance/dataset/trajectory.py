"""Saving an episode's conversation in the chat format a VLM trainer consumes.

``messages.json`` holds the messages exactly as the environment recorded them, with every image
reference resolved to a file under ``images/`` (``{"type": "image", "image": "images/2.png"}``);
``episode.json`` holds the provenance that is not part of the conversation (seeds, synthesis
parameters, judge measurements, timings).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from appliance.agent.episode import EpisodeResult
from appliance.imaging import (WORKING_PNG_LEVEL, link_atomic, png_bytes, save_png_atomic, to_pil,
                               write_atomic)
from appliance.serialization import json_default


def chat_messages(messages: list[dict], image_paths: dict[int, str]) -> list[dict]:
    """Messages with ``image_index`` references replaced by paths (or any per-index value)."""
    resolved = copy.deepcopy(messages)
    for message in resolved:
        for part in message["content"]:
            if part.get("type") == "image" and "image_index" in part:
                part["image"] = image_paths[part.pop("image_index")]
    return resolved


def episode_record(result: EpisodeResult) -> dict:
    """Everything about an episode except pixels, JSON-serialisable."""
    return {
        "category": result.spec.category, "defect": result.spec.defect, "seed": result.spec.seed,
        "source": result.spec.source, "source_sha256": result.spec.source_sha256,
        "status": result.status, "end_reason": result.end_reason, "policy": result.policy,
        "backends": result.backends, "turns": result.turns, "tool_sequence": result.tool_sequence,
        "errors": result.errors, "seconds": round(result.seconds, 4),
        "tool_seconds": {k: round(v, 4) for k, v in result.tool_seconds.items()},
        "final_image_index": result.final_image_index,
        "attempts": [{
            "image_index": a.image_index, "prompt": a.prompt, "seed": a.seed,
            "region": a.result.region.as_list(), "params": a.result.params,
            "passed": a.passed,
            "report": None if a.report is None else {**asdict(a.report), "score": a.report.score},
        } for a in result.attempts],
        # Per turn the model wrote: prompt, reasoning and action tokens and whether a budget cut
        # it (empty for the scripted policy).
        "generation": result.generation,
        "mask": None if result.mask is None else {
            "method": result.mask.method, "threshold": result.mask.threshold,
            "confidence": result.mask.confidence, "area_ratio": result.mask.area_ratio},
    }


def save_trajectory(result: EpisodeResult, folder: Path,
                    same_as: dict[int, Path] | None = None,
                    encoded: dict[int, bytes] | None = None) -> Path:
    """Write ``messages.json``, ``episode.json`` and ``images/N.png``; returns the folder.

    ``same_as`` names files already written with the same pixels as image N (the normal in
    ``train/good``, the sample in ``test/``): image N becomes a hard link to it instead of a
    second encoding of the same picture. ``encoded`` holds PNG bytes made ahead of time
    (``encode_trajectory_images``, in a thread while the engine runs).
    """
    folder = Path(folder)
    same_as, encoded = same_as or {}, encoded or {}
    paths = {}
    for index, image in enumerate(result.images, start=1):
        relative = f"images/{index}.png"
        if index in same_as and link_atomic(same_as[index], folder / relative):
            pass
        elif index in encoded:
            write_atomic(folder / relative, encoded[index])
        else:
            save_png_atomic(folder / relative, to_pil(image), WORKING_PNG_LEVEL)
        paths[index] = relative
    write_atomic(folder / "messages.json", json.dumps(
        chat_messages(result.messages, paths), indent=1, ensure_ascii=False).encode())
    write_atomic(folder / "episode.json", json.dumps(
        episode_record(result), indent=1, ensure_ascii=False, default=json_default).encode())
    return folder



def encode_trajectory_images(result: EpisodeResult, skip: set[int]) -> dict[int, bytes]:
    """PNG bytes of the trajectory images not in ``skip`` (those that will be links)."""
    return {index: png_bytes(to_pil(image), WORKING_PNG_LEVEL)
            for index, image in enumerate(result.images, start=1) if index not in skip}


def load_trajectory(folder: Path) -> tuple[list[dict], list[np.ndarray]]:
    """The inverse of ``save_trajectory``: the environment's messages (image parts as
    ``image_index``) and the episode's images in index order."""
    from appliance.imaging import load_rgb

    folder = Path(folder)
    messages = json.loads((folder / "messages.json").read_text(encoding="utf-8"))
    images: dict[int, np.ndarray] = {}
    for message in messages:
        for part in message["content"]:
            if part.get("type") == "image" and "image" in part:
                relative = part.pop("image")
                index = int(Path(relative).stem)
                if index not in images:
                    images[index] = load_rgb(folder / relative)
                part["image_index"] = index
    if sorted(images) != list(range(1, len(images) + 1)):
        raise ValueError(f"{folder}: images {sorted(images)} are not numbered 1..{len(images)}")
    return messages, [images[i] for i in sorted(images)]
