"""Writing the output dataset in the MVTec-AD layout that anomalib reads.

::

    DATASET/<category>/train/good/000.png              normal photos (PNG)
    DATASET/<category>/test/<defect>/000.png           synthesized defect images
    DATASET/<category>/ground_truth/<defect>/000_mask.png   8-bit masks, 0 or 255
    DATASET/trajectories/<category>/<defect>/000/      the episode's conversation and images
    DATASET/manifest.jsonl                             one line per written sample
    DATASET/rejected.jsonl                             one line per episode that wrote nothing
    DATASET/normals.jsonl                              one line per normal photo in train/good

Names sort identically in ``test`` and ``ground_truth`` and ``NNN`` is contained in
``NNN_mask``, as anomalib's pairing requires. Every file is written to a temporary name, fsynced
and renamed before its manifest line is appended.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.agent.environment import EpisodeResult
from appliance.dataset.trajectory import _json_default, save_trajectory
from appliance.imaging import is_grayscale, mask_to_pil, save_png_atomic, to_pil

MANIFEST = "manifest.jsonl"
REJECTED = "rejected.jsonl"
NORMALS = "normals.jsonl"


def episode_key(sha256: str, category: str, defect: str, seed: int) -> str:
    """Work is idempotent by this key: the same photo, defect and seed is never done twice."""
    return f"{sha256}:{category}:{defect}:{seed}"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # A line cut short by a crash: the sample behind it is redone on the next run.
                continue
    return records


def _append_jsonl(path: Path, record: dict) -> None:
    line = json.dumps(record, ensure_ascii=False, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


@dataclass
class WrittenSample:
    image: Path
    mask: Path
    record: dict


class DatasetWriter:
    def __init__(self, root: Path, engine: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.engine = engine or {}
        self._normals = {(r["source_sha256"], r["category"]): r
                         for r in _read_jsonl(self.root / NORMALS)}

    # Reading back -------------------------------------------------------------------------------

    def records(self) -> list[dict]:
        return _read_jsonl(self.root / MANIFEST)

    def rejected(self) -> list[dict]:
        return _read_jsonl(self.root / REJECTED)

    def normals(self) -> list[dict]:
        return list(self._normals.values())

    def done_keys(self) -> set[str]:
        """Keys of episodes already finished, written or rejected."""
        return {r["key"] for r in self.records() + self.rejected() if "key" in r}

    # Writing ------------------------------------------------------------------------------------

    def add_normal(self, category: str, image: np.ndarray, sha256: str, source: str) -> Path:
        """Copy a normal photo into ``train/good`` once per content hash."""
        known = self._normals.get((sha256, category))
        if known is not None:
            return self.root / known["path"]
        folder = self.root / category / "train" / "good"
        path = folder / f"{self._next_number(folder):03d}.png"
        save_png_atomic(path, to_pil(image))
        record = {"category": category, "path": str(path.relative_to(self.root)),
                  "source": source, "source_sha256": sha256}
        _append_jsonl(self.root / NORMALS, record)
        self._normals[(sha256, category)] = record
        return path

    def write(self, result: EpisodeResult) -> WrittenSample | None:
        """Write an accepted episode as a sample; log any other outcome in rejected.jsonl."""
        spec = result.spec
        key = episode_key(spec.source_sha256, spec.category, spec.defect, spec.seed)
        if not result.accepted:
            _append_jsonl(self.root / REJECTED, {
                "key": key, "category": spec.category, "defect": spec.defect, "seed": spec.seed,
                "source": spec.source, "source_sha256": spec.source_sha256,
                "status": result.status, "reason": result.end_reason or result.status,
                "errors": result.errors[-3:], "turns": result.turns,
                "scores": [a.report.score for a in result.attempts if a.report is not None]})
            return None
        image_folder = self.root / spec.category / "test" / spec.defect
        mask_folder = self.root / spec.category / "ground_truth" / spec.defect
        number = max(self._next_number(image_folder), self._next_number(mask_folder, "_mask"))
        name = f"{number:03d}"
        trajectory = save_trajectory(
            result, self.root / "trajectories" / spec.category / spec.defect / name)
        image_path = image_folder / f"{name}.png"
        mask_path = mask_folder / f"{name}_mask.png"
        grayscale = is_grayscale(spec.image)
        save_png_atomic(image_path, to_pil(result.final_image, grayscale=grayscale))
        save_png_atomic(mask_path, mask_to_pil(result.mask.mask))
        final = next(a for a in result.attempts if a.image_index == result.final_image_index)
        record = {
            "key": key, "image": _rel(image_path, self.root), "mask": _rel(mask_path, self.root),
            "category": spec.category, "defect": spec.defect, "source": spec.source,
            "source_sha256": spec.source_sha256, "seed": spec.seed,
            "engine": self.engine.get("engine", ""), "policy": result.policy,
            "backends": result.backends, "engine_detail": self.engine,
            "location_score": result.report.location_score,
            "quality_score": result.report.quality_score, "score": result.report.score,
            "review": result.report.review, "prompt": final.prompt, "ig_seed": final.seed,
            "turns": result.turns, "image_gen_attempts": len(result.attempts),
            "knowledge_retrieved": "knowledge_retrieval" in result.tool_sequence,
            "mask_area_ratio": round(result.mask.area_ratio, 6),
            "mask_confidence": round(float(result.mask.confidence), 4),
            "trajectory": _rel(trajectory, self.root), "seconds": round(result.seconds, 4),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _append_jsonl(self.root / MANIFEST, record)
        return WrittenSample(image_path, mask_path, record)

    @staticmethod
    def _next_number(folder: Path, suffix: str = "") -> int:
        if not folder.is_dir():
            return 0
        pattern = re.compile(rf"^(\d{{3,}}){re.escape(suffix)}\.png$")
        numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
        return max(numbers) + 1 if numbers else 0


def _rel(path: Path, root: Path) -> str:
    return str(Path(path).relative_to(root))
