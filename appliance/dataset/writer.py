"""Writing the output dataset in the MVTec-AD layout that anomalib reads.

::

    DATASET/<category>/train/good/000.png              normal photos (PNG), synthesis sources
    DATASET/<category>/test/good/004.png               normal photos held back for testing
    DATASET/<category>/test/<defect>/000.png           synthesized defect images
    DATASET/<category>/ground_truth/<defect>/000_mask.png   8-bit masks, 0 or 255
    DATASET/trajectories/<category>/<defect>/000/      the episode's conversation and images
    DATASET/manifest.jsonl                             one line per written sample
    DATASET/rejected.jsonl                             one line per episode that wrote nothing
    DATASET/normals.jsonl                              one line per normal photo (either split)

Names sort identically in ``test`` and ``ground_truth`` and ``NNN`` is contained in
``NNN_mask``, as anomalib's pairing requires. The job store (``appliance.storage``) is the single
source of truth: it hands out every number inside a transaction, and a sample's files are
written to temporary names, fsynced and renamed between its ``writing`` and ``ok`` rows, so a
crash can neither duplicate a number nor leave a half-written sample. The jsonl files are views
of the store, appended after each commit and rewritten from it whenever they disagree.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from appliance.agent.episode import EpisodeResult
from appliance.dataset.trajectory import encode_trajectory_images, save_trajectory
from appliance.names import Name, path_under
from appliance.imaging import is_grayscale, mask_to_pil, png_bytes, save_png_atomic, to_pil, write_atomic
from appliance.serialization import json_default
from appliance.storage.exports import append_jsonl, read_jsonl
from appliance.storage.layout import MANIFEST, NORMALS, REJECTED

if TYPE_CHECKING:
    from appliance.storage import JobStore

log = logging.getLogger(__name__)



def episode_key(sha256: str, category: str, defect: str, seed: int) -> str:
    """Work is idempotent by this key: the same photo, defect and seed is never done twice."""
    return f"{sha256}:{category}:{defect}:{seed}"


@dataclass
class EncodedSample:
    """The PNG bytes of an accepted episode, made ahead of ``write`` (in another thread)."""

    image: bytes
    mask: bytes
    trajectory: dict[int, bytes]


def encode_sample(result: EpisodeResult) -> EncodedSample | None:
    """Encode what ``DatasetWriter.write`` will write for ``result``; touches no store or file,
    so it may run in a thread while the engine works on the next chunk (zlib lets go of the
    GIL). None for an episode that writes no sample."""
    if not result.accepted or result.final_image is None or result.mask is None:
        return None
    grayscale = is_grayscale(result.spec.image)
    skip = {result.final_image_index}  # a link to the sample's own image
    if result.images and np.array_equal(result.images[0], result.spec.image):
        skip.add(1)  # a link to the normal in train/good
    return EncodedSample(png_bytes(to_pil(result.final_image, grayscale=grayscale)),
                         png_bytes(mask_to_pil(result.mask.mask)),
                         encode_trajectory_images(result, skip))


def held_back(number: int, share: float) -> bool:
    """Whether the category's normal photo number ``number`` goes to ``test/good``: spread
    evenly at ``share`` of the numbers, the first at the earliest (number 2 at 0.2, 4 at 0.1),
    never number 0, so a category's first photo is always a synthesis source. Decided by the
    number the store hands out, so it holds across crashes and runs."""
    if number < 1 or share <= 0:
        return False
    return math.floor((number + 1) * share + 0.5) > math.floor(number * share + 0.5)


@dataclass
class NormalPhoto:
    path: Path
    split: str  # "train": a synthesis source; "test": held back in test/good

    @property
    def held_back(self) -> bool:
        return self.split == "test"


@dataclass
class WrittenSample:
    image: Path
    mask: Path
    record: dict


class DatasetWriter:
    """Writes normals and samples into the dataset; reading needs no store.

    ``test_good_share``: the share of normal photos held back in ``test/good`` (the batch and
    the service pass the config's; none by default).
    """

    def __init__(self, root: Path, engine: dict | None = None, store: "JobStore | None" = None,
                 test_good_share: float = 0.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.engine = engine or {}
        self._store = store
        self.test_good_share = test_good_share

    @property
    def store(self) -> "JobStore":
        """The dataset's job store, opened on first write."""
        if self._store is None:
            from appliance.storage import JobStore

            self._store = JobStore.for_dataset(self.root)
        return self._store

    # Reading back -------------------------------------------------------------------------------

    def records(self) -> list[dict]:
        return read_jsonl(self.root / MANIFEST)

    def rejected(self) -> list[dict]:
        return read_jsonl(self.root / REJECTED)

    def normals(self) -> list[dict]:
        return read_jsonl(self.root / NORMALS)

    def done_keys(self) -> set[str]:
        """Keys of episodes already finished, written or rejected."""
        return self.store.finished_keys()

    # Writing ------------------------------------------------------------------------------------

    def add_normal(self, category: str, image: np.ndarray, sha256: str, source: str) -> NormalPhoto:
        """Copy a normal photo into the dataset once per (content hash, category): into
        ``train/good`` as a synthesis source, or, for a share of them, ``test/good``."""
        from appliance.storage.exports import normal_record

        store = self.store
        name = Name(category, "category")
        folders = {"train": path_under(self.root, name, "train", "good"),
                   "test": path_under(self.root, name, "test", "good")}
        known = store.normal(sha256, category)
        if known is not None and known["status"] == "ok":
            return NormalPhoto(self.root / known["path"], known["split"])

        def place(number: int) -> tuple[str, str]:
            split = "test" if held_back(number, self.test_good_share) else "train"
            return _rel(folders[split] / f"{number:03d}.png", self.root), split

        with self._disk_guard(folders["train"]), store.dataset_lock():
            row, created = store.reserve_normal(
                sha256, category, source, place,
                is_free=lambda n: not any(os.path.lexists(f / f"{n:03d}.png")
                                          for f in folders.values()))
            path = self.root / row["path"]
            if not created:
                return NormalPhoto(path, row["split"])
            try:
                save_png_atomic(path, to_pil(image))
            except BaseException:
                _discard(path)
                _quietly(store.drop_normal, row["id"])
                raise
            store.commit_normal(row["id"])
            self._export(NORMALS, normal_record({**row, "status": "ok"}))
        return NormalPhoto(path, row["split"])

    def write(self, result: EpisodeResult, episode_id: int | None = None,
              batch: str | None = None,
              encoded: EncodedSample | None = None) -> WrittenSample | None:
        """Write an accepted episode as a sample; log any other outcome in rejected.jsonl.
        ``encoded``: its PNG bytes from ``encode_sample``, else they are made here.

        Raises ``DiskFullError`` (with nothing half-written left, the episode queued again)
        when the disk fills up.
        """
        from appliance.storage.repair import remove_sample_files

        spec = result.spec
        key = episode_key(spec.source_sha256, spec.category, spec.defect, spec.seed)
        store = self.store
        if episode_id is None:
            episode_id = self._episode_for(key, spec)
        if not result.accepted:
            record = {
                "key": key, "category": spec.category, "defect": spec.defect, "seed": spec.seed,
                "source": spec.source, "source_sha256": spec.source_sha256,
                "status": result.status, "reason": result.end_reason or result.status,
                "errors": result.errors[-3:], "turns": result.turns,
                "scores": [a.report.score for a in result.attempts if a.report is not None]}
            with self._disk_guard(self.root), store.dataset_lock():
                store.finish(episode_id, result.status, result=json.loads(
                    json.dumps(record, default=json_default)), seconds=result.seconds,
                    batch=batch, error=record["reason"])
                self._export(REJECTED, record)
            return None
        category, defect = Name(spec.category, "category"), Name(spec.defect, "defect")
        image_folder = path_under(self.root, category, "test", defect)
        mask_folder = path_under(self.root, category, "ground_truth", defect)
        trajectory_folder = path_under(self.root, "trajectories", category, defect)
        final = next(a for a in result.attempts if a.image_index == result.final_image_index)

        def record_for(number: int) -> dict:
            name = f"{number:03d}"
            return {
                "key": key, "image": _rel(image_folder / f"{name}.png", self.root),
                "mask": _rel(mask_folder / f"{name}_mask.png", self.root),
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
                "trajectory": _rel(trajectory_folder / name, self.root),
                "seconds": round(result.seconds, 4), "batch": batch,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }

        with self._disk_guard(image_folder), store.dataset_lock():
            sample = store.reserve_sample(
                episode_id, key, spec.category, spec.defect, record_for,
                is_free=lambda n: not (os.path.lexists(image_folder / f"{n:03d}.png")
                                       or os.path.lexists(mask_folder / f"{n:03d}_mask.png")))
            record = json.loads(sample["record"])
            encoded = encoded or encode_sample(result)
            try:
                write_atomic(self.root / record["image"], encoded.image)
                write_atomic(self.root / record["mask"], encoded.mask)
                save_trajectory(result, self.root / record["trajectory"],
                                same_as=self._same_pictures(result, self.root / record["image"]),
                                encoded=encoded.trajectory)
            except BaseException:
                remove_sample_files(self.root, sample)
                _quietly(store.drop_sample, sample["id"])
                raise
            store.commit_sample(sample["id"], batch=batch)
            self._export(MANIFEST, record)
        return WrittenSample(self.root / record["image"], self.root / record["mask"], record)

    def _same_pictures(self, result: EpisodeResult, image: Path) -> dict[int, Path]:
        """Trajectory images already in the dataset with the same pixels: the final image is the
        sample just written, the first is the normal in train/good when it is the episode's."""
        same = {result.final_image_index: image}
        normal = self.store.normal(result.spec.source_sha256, result.spec.category)
        if (normal is not None and normal["status"] == "ok" and result.images
                and np.array_equal(result.images[0], result.spec.image)):
            same.setdefault(1, self.root / normal["path"])
        return same

    def _episode_for(self, key: str, spec) -> int:
        """The store row of an episode written without one (a direct call, not the queue)."""
        from appliance.storage import EpisodePlan

        row = self.store.episode_by_key(key)
        if row is None:
            self.store.enqueue([EpisodePlan(key, spec.source_sha256, spec.category, spec.defect,
                                            0, spec.seed)])
            row = self.store.episode_by_key(key)
        return row["id"]

    def _export(self, name: str, record: dict) -> None:
        """Append to a jsonl view; if that fails the store marks it for a rewrite."""
        try:
            append_jsonl(self.root / name, record)
        except OSError as exc:
            log.warning("could not append to %s (%s); it will be rewritten from the store",
                        name, exc)
            _quietly(self.store.set, "exports_dirty", True)

    @contextmanager
    def _disk_guard(self, where: Path):
        """Turn "no space left" from files or SQLite into one clear DiskFullError."""
        from appliance.storage import DiskFullError, is_disk_full

        try:
            yield
        except DiskFullError:
            raise
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            free = shutil.disk_usage(self.root).free if self.root.exists() else 0
            raise DiskFullError(
                f"no space left on the device of {self.root} while writing {where} "
                f"({free / 1e6:.1f} MB free); nothing half-written was kept and the work stays "
                f"queued") from exc


def _rel(path: Path, root: Path) -> str:
    return str(Path(path).relative_to(root))


def _discard(path: Path) -> None:
    """Remove a file and its temporary siblings after a failed write."""
    for candidate in [path, *path.parent.glob(f".{path.name}.tmp-*")]:
        try:
            candidate.unlink()
        except FileNotFoundError:
            pass


def _quietly(function: Callable, *args) -> None:
    """Best-effort cleanup: the next lock holder repairs whatever this leaves."""
    try:
        function(*args)
    except Exception as exc:  # noqa: BLE001
        log.warning("cleanup step %s failed: %s", getattr(function, "__name__", function), exc)
