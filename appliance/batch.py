"""``appliance batch``: a folder of normal photos in, a labeled defect dataset out.

The inbox holds one sub-folder per product category (``INBOX/bottle/*.png``). A category folder
may carry ``spec.toml``::

    defects = ["broken_large", "contamination"]   # default: the knowledge base's list
    per_image = 2                                   # samples per (image, defect); default --per-image
    material = "glass"                              # for a part the knowledge base does not know

Every (photo, defect, sample) is one episode with a seed derived from the photo's content, so
a re-run (or a renamed copy of a photo) skips work already in the dataset.

This module holds the one queue loop of the appliance: ``appliance batch``, ``appliance run`` and
the watcher all go through ``intake_image`` (photo -> normal + queued episodes in the job store)
and ``process_queue`` (claim episodes, run them, write samples). The job store
(``appliance.storage``) is the single source of truth, so a batch killed at any moment resumes
where it stopped without losing, duplicating or half-writing a sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import stat
import shutil
import statistics
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from appliance.agent.episode import EpisodeResult, EpisodeSpec
from appliance.config import TEST_GOOD_SHARE, CategorySection, ConfigError, parse_category_spec
from appliance.engine import Engine, EngineConfig, build_engine
from appliance.imaging import IMAGE_SUFFIXES, MAX_PIXELS, ImageReadError, load_rgb, read_plain_file
from appliance.names import InvalidName, Name, printable, unique_names
from appliance.storage import DiskFullError, EpisodePlan, JobStore, is_disk_full
from appliance.tools.knowledge.base import KnowledgeBase

log = logging.getLogger(__name__)

SPEC_FILE = "spec.toml"
MAX_INPUT_BYTES = 512_000_000  # a photo above this is not read (the service's intake.max_file_mb)
MAX_SPEC_BYTES = 64_000
DEFAULT_MAX_TRIES = 5


class InboxError(ValueError):
    """The inbox or one of its spec files cannot be used; the message says which and why."""


@dataclass
class CategoryPlan:
    category: str
    folder: Path
    defects: list[str]
    per_image: int
    images: list[Path]


@dataclass
class EpisodeJob:
    """What a worker needs to run one claimed episode (picklable, no pixels)."""

    episode_id: int
    key: str
    category: str
    defect: str
    seed: int
    sha256: str
    normal_path: str  # the normalised PNG in train/good: the pixels the episode edits
    source: str  # where the photo came from, for provenance


@dataclass
class BatchSummary:
    episodes: int = 0
    written: int = 0
    rejected: int = 0
    failed: int = 0
    skipped_done: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    skipped_categories: list[tuple[str, str]] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    first_try_accepts: int = 0
    refined_accepts: int = 0
    knowledge_calls: int = 0
    seconds: float = 0.0
    stopped: str = "done"  # why processing ended: done, paused, deadline, signal, disk full
    notes: list[str] = field(default_factory=list)  # recovery done at start, warnings
    runner_notes: list[str] = field(default_factory=list)  # e.g. cluster nodes refused or lost
    batch_id: str | None = None
    test_good: int = 0  # normal photos of the dataset held back in test/good
    # "category/defect" -> [episodes, written]: a judge that accepts everything is not judging.
    by_defect: dict[str, list[int]] = field(default_factory=dict)

    @property
    def accepted_rate(self) -> float:
        return self.written / self.episodes if self.episodes else 0.0

    def lines(self) -> list[str]:
        per_sample = f"{self.seconds / self.written:.2f} s" if self.written else "-"
        mean_turns = statistics.fmean(self.turns) if self.turns else 0.0
        lines = [f"recovered          {note}" for note in self.notes]
        lines += [
            f"episodes run       {self.episodes}  (skipped, already done: {self.skipped_done})",
            f"samples written    {self.written}",
            f"accepted rate      {100 * self.accepted_rate:.1f}%  "
            f"(first try {self.first_try_accepts}, after refinement {self.refined_accepts}; "
            f"rejected {self.rejected}, failed {self.failed})",
            f"mean turns         {mean_turns:.2f}  (knowledge retrieved in {self.knowledge_calls} episodes)",
            f"time               {self.seconds:.1f} s, {per_sample} per written sample",
            f"test/good          {self.test_good} normal photos held back for testing "
            f"(whole dataset; never edited)",
        ]
        if self.by_defect:
            lines.append("accepted per type  " + ", ".join(
                f"{key} {written}/{episodes}" for key, (episodes, written)
                in sorted(self.by_defect.items())))
        lines += [f"workers            {note}" for note in self.runner_notes]
        if self.stopped != "done":
            lines.append(f"stopped early      {self.stopped}; the rest stays queued")
        for name, reason in self.unreadable:
            lines.append(f"unreadable input   {name}: {reason}")
        for name, reason in self.skipped_categories:
            lines.append(f"skipped category   {name}: {reason}")
        return lines

    def as_dict(self) -> dict:
        return {"episodes": self.episodes, "written": self.written, "rejected": self.rejected,
                "failed": self.failed, "skipped_done": self.skipped_done,
                "seconds": round(self.seconds, 3), "stopped": self.stopped,
                "accepted_by_defect": {key: {"episodes": e, "written": w}
                                       for key, (e, w) in sorted(self.by_defect.items())}}


# Planning ---------------------------------------------------------------------------------------

def read_spec(folder: Path) -> CategorySection:
    """The category folder's ``spec.toml`` (the schema of a ``[categories.NAME]`` config table);
    an empty spec when the folder has none."""
    path = folder / SPEC_FILE
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return CategorySection()
    except OSError as exc:
        raise InboxError(f"{path}: cannot read: {exc.strerror or exc}") from None
    # Read only a small regular file: a link could point anywhere, a named pipe would block.
    if not stat.S_ISREG(info.st_mode):
        raise InboxError(f"{path}: must be a plain file, not a link, folder or pipe")
    if info.st_size > MAX_SPEC_BYTES:
        raise InboxError(f"{path}: {info.st_size} bytes; a spec is at most "
                         f"{MAX_SPEC_BYTES // 1000} kB")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            text = handle.read(MAX_SPEC_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InboxError(f"{path}: cannot read: {exc}") from None
    try:
        return parse_category_spec(text, path)
    except ConfigError as exc:
        raise InboxError("; ".join(exc.errors)) from None


def resolve_defects(category: str, knowledge_base: KnowledgeBase, spec: CategorySection,
                    defects: Sequence[str] | None = None) -> list[Name]:
    """Defect types for a category: given, else the spec's, else the knowledge base's.
    InvalidName if one of them cannot be a folder of the dataset."""
    chosen = list(defects) if defects else spec.defects
    if not chosen:
        chosen = knowledge_base.defects_for(category)
    if not chosen and spec.material:
        material = knowledge_base.subject(spec.material)
        chosen = list(material.defects) if material else []
    return unique_names(chosen or [], "defect")


def inbox_category(inbox: Path, folder: str) -> Name:
    """The category an inbox folder stands for; InvalidName if the folder's name cannot be one,
    or if another folder of the inbox is a second spelling of it ("Bottle" and "bottle")."""
    category = Name(folder, "category")
    try:
        others = [entry.name for entry in os.scandir(inbox) if entry.name != folder
                  and entry.is_dir(follow_symlinks=False) and _same_category(entry.name, category)]
    except OSError:
        others = []
    if others:
        raise InvalidName(f"inbox folders '{printable(folder)}' and '{printable(others[0])}' are "
                          f"both category {category!r}; move the photos into one of them")
    return category


def _same_category(name: str, category: str) -> bool:
    try:
        return Name(name, "category") == category
    except InvalidName:
        return False


def plan_inbox(inbox: Path, knowledge_base: KnowledgeBase, per_image: int,
               defects: Sequence[str] | None = None) -> tuple[list[CategoryPlan], list[tuple[str, str]]]:
    """Categories to run, and (category, reason) for folders that cannot be run."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise InboxError(f"inbox {inbox} is not a folder")
    plans, skipped = [], []
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            if folder.is_symlink():
                raise InboxError("a symbolic link; put the photos in a folder of the inbox")
            category = inbox_category(inbox, folder.name)
            spec = read_spec(folder)
            chosen = resolve_defects(category, knowledge_base, spec, defects)
            images = sorted(p for p in folder.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        except (InboxError, InvalidName, OSError) as exc:
            skipped.append((printable(folder.name), str(exc)))
            continue
        if not chosen:
            skipped.append((folder.name, f"the knowledge base has no defect list for {category!r}; "
                                         f"add {folder / SPEC_FILE} with defects = [...]"))
            continue
        if not images:
            skipped.append((folder.name, "no image files"))
            continue
        plans.append(CategoryPlan(category, folder, chosen, spec.per_image or per_image,
                                  images))
    return plans, skipped


def episode_seed(base_seed: int, sha256: str, defect: str, sample: int) -> int:
    """Deterministic per (photo content, defect, sample), independent of file names and order."""
    digest = hashlib.sha256(f"{base_seed}:{sha256}:{defect}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def plan_episodes(sha256: str, category: str, defects: Sequence[str], per_image: int,
                  base_seed: int = 0) -> list[EpisodePlan]:
    from appliance.dataset.writer import episode_key

    plans = []
    for defect in defects:
        for sample in range(per_image):
            seed = episode_seed(base_seed, sha256, defect, sample)
            plans.append(EpisodePlan(episode_key(sha256, category, defect, seed), sha256,
                                     category, defect, sample, seed))
    return plans


# Intake: one photo into the store ---------------------------------------------------------------

def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Bytes of an image file as uint8 RGB (EXIF orientation applied); ImageReadError if not."""
    return load_rgb(io.BytesIO(data), max_pixels=max_pixels)  # type: ignore[arg-type]


def intake_image(writer, category: str, image: np.ndarray, sha256: str, source: str,
                 size: int, defects: Sequence[str], per_image: int, base_seed: int = 0,
                 original_size: tuple[int, int] | None = None) -> tuple[int, list[str]]:
    """Record a photo, write its normal and queue its episodes; (added, keys already done).
    A photo the writer holds back for ``test/good`` queues nothing: it is never edited."""
    store: JobStore = writer.store
    store.add_input(sha256, size, image.shape[1], image.shape[0], source, original_size)
    if writer.add_normal(category, image, sha256, source).held_back:
        return 0, []
    return store.enqueue(plan_episodes(sha256, category, defects, per_image, base_seed))


# Running episodes -------------------------------------------------------------------------------

@dataclass
class EncodedChunk:
    """A chunk's results with their samples already encoded where they ran (a cluster node):
    the box that writes them only writes."""

    results: list[EpisodeResult]
    encoded: list  # appliance.dataset.writer.EncodedSample, or None where no sample is written


class RunnerUnavailable(RuntimeError):
    """No engine can run episodes now (a cluster that lost every node): the claimed episodes
    go back to the queue without counting a try."""


def run_jobs(engine: Engine, jobs: list[EpisodeJob],
             images: Sequence[np.ndarray] | None = None) -> list[EpisodeResult]:
    """Run claimed episodes on ``engine``. ``images`` are their normal photos when they come
    from elsewhere (a cluster node cannot read the head's train/good); else they are read."""
    if images is None:
        images = [load_rgb(Path(job.normal_path)) for job in jobs]
    specs = [EpisodeSpec(image=image, category=job.category, defect=job.defect, seed=job.seed,
                         source=job.source, source_sha256=job.sha256)
             for job, image in zip(jobs, images, strict=True)]
    return engine.environment.run(specs, engine.policy)


# Worker processes build the engine once and keep it resident.
_WORKER_ENGINE: Engine | None = None


def _init_worker(config: EngineConfig) -> None:
    global _WORKER_ENGINE
    import signal

    import torch

    # A stop is the main process's to handle: it finishes the chunks in flight, which needs
    # its workers alive (systemd's KillMode=mixed signals the main process alone).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    _WORKER_ENGINE = build_engine(config)


def _run_chunk(jobs: list[EpisodeJob]) -> list[EpisodeResult]:
    assert _WORKER_ENGINE is not None
    return run_jobs(_WORKER_ENGINE, jobs)


class EpisodeRunner:
    """Runs chunks of episodes in this process (``workers=1``) or in resident worker processes."""

    def __init__(self, engine: Engine | None = None, config: EngineConfig | None = None,
                 workers: int = 1):
        self.config = config or (engine.config if engine else EngineConfig())
        self.workers = max(1, workers)
        self.engine = engine
        self._pool: ProcessPoolExecutor | None = None
        if self.workers == 1 and self.engine is None:
            self.engine = build_engine(self.config)

    @property
    def slots(self) -> int:
        """Chunks kept in flight at once."""
        return self.workers

    def describe(self) -> dict:
        if self.engine is not None:
            return self.engine.describe()
        return {"engine": self.config.name, **self.config.backend_names()}

    def nodes(self) -> dict | None:
        """Per-node progress for ``appliance status``; None on a single box."""
        return None

    # A second runner can be built beside this one (an engine reload keeps the old one until
    # the new one works); a cluster runner's engines hold the nodes, so it is closed first.
    exclusive = False

    @property
    def notes(self) -> list[str]:
        """What the runner had to do that the batch summary should say (refused nodes)."""
        return []

    def submit(self, jobs: list[EpisodeJob]) -> Future:
        if self.workers == 1:
            future: Future = Future()
            try:
                future.set_result(run_jobs(self.engine, jobs))
            except Exception as exc:  # noqa: BLE001 - reported per chunk by the caller
                future.set_exception(exc)
            return future
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self.config,))
        return self._pool.submit(_run_chunk, jobs)

    def reset_pool(self) -> None:
        """After a worker died: a fresh pool for the next chunk."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def check_free_space(root: Path, min_free_bytes: int) -> None:
    """Refuse to start work that the disk cannot hold (raises DiskFullError)."""
    if min_free_bytes <= 0:
        return
    free = shutil.disk_usage(root).free
    if free < min_free_bytes:
        raise DiskFullError(f"only {free / 1e6:.0f} MB free on the device of {root}, below the "
                            f"minimum of {min_free_bytes / 1e6:.0f} MB; waiting for space")


def _jobs_for(store: JobStore, rows: list[dict]) -> list[EpisodeJob]:
    """Claimed rows as jobs; an episode whose normal image is gone cannot run: failed."""
    jobs = []
    for row in rows:
        normal = store.normal(row["sha256"], row["category"])
        if normal is None or normal["status"] != "ok":
            store.retry_or_fail([row["id"]], "its normal image is missing from train/good", 1)
            continue
        jobs.append(EpisodeJob(row["id"], row["key"], row["category"], row["defect"],
                               row["seed"], row["sha256"], str(store.root / normal["path"]),
                               normal["source"] or ""))
    return jobs


def process_queue(store: JobStore, writer, runner: EpisodeRunner, *, chunk: int = 4,
                  max_tries: int = DEFAULT_MAX_TRIES, batch: str | None = None,
                  summary: BatchSummary | None = None,
                  stop: Callable[[], str | None] | None = None,
                  progress: Callable[[int, int, BatchSummary], None] | None = None,
                  min_free_bytes: int = 0) -> str:
    """Run queued episodes until the queue is empty or ``stop()`` gives a reason; returns it.

    Episodes are claimed a chunk at a time (so a kill re-queues only the chunks in flight),
    and ``stop`` is asked between chunks: pause, the end of the time window, a signal. Chunks
    already running are finished and written before returning. A full disk raises
    DiskFullError after putting every unwritten claimed episode back in the queue.

    A chunk's PNGs are encoded in a thread while the engine runs the next chunk, and written
    (in the store's write protocol, on this thread) after it: the two overlap on two cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    from appliance.dataset.writer import encode_sample

    summary = summary if summary is not None else BatchSummary()
    in_flight: deque[tuple[list[EpisodeJob], Future]] = deque()
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="png")
    unwritten: list[int] = []  # claimed ids of the chunk being written, not yet written
    submitting: list[EpisodeJob] = []
    # Anything still marked running by this process is left from an earlier call that failed
    # (e.g. a full disk that also refused the release): it goes back to the queue first.
    store.release_mine()
    total = store.counts()["queued"]
    reason = "done"
    nodes_written = 0.0

    def ask() -> None:
        nonlocal reason
        if reason == "done" and stop is not None and (why := stop()):
            reason = why

    def fill() -> None:
        while reason == "done" and len(in_flight) < runner.slots:
            check_free_space(store.root, min_free_bytes)
            rows = store.claim(chunk)
            if not rows:
                break
            jobs = _jobs_for(store, rows)
            if jobs:
                submitting[:] = jobs  # claimed, not yet in flight: released if submit() fails
                in_flight.append((jobs, runner.submit(jobs)))
                submitting.clear()

    try:
        while True:
            # 1. Ask between chunks whether to go on.
            ask()
            # 2. Keep the workers busy: claim and submit chunks.
            fill()
            if not in_flight:
                if reason == "done" and store.counts()["queued"]:
                    continue  # a chunk whose normals were missing: claim the next one
                break
            # 3. Write the oldest chunk's results.
            jobs, future = in_flight.popleft()
            unwritten = [job.episode_id for job in jobs]
            try:
                outcome = future.result()
            except RunnerUnavailable:
                raise  # not the episodes' fault: they go back to the queue untried
            except Exception as exc:  # noqa: BLE001 - an engine failure must not stop the queue
                if isinstance(exc, BrokenProcessPool):
                    runner.reset_pool()
                failed = store.retry_or_fail(unwritten, f"engine error: {type(exc).__name__}: "
                                                        f"{exc}", max_tries)
                unwritten = []
                summary.failed += len(failed)
                summary.episodes += len(failed)
                log.error("a chunk of %d episode(s) failed: %s", len(jobs), exc)
                continue
            # 4. Encode this chunk's images while the engine runs the next (with one worker,
            # submit() runs it right here), then write them. Chunks from a cluster node come
            # encoded already.
            if isinstance(outcome, EncodedChunk):
                results, encoding = outcome.results, None
            else:
                results = outcome
                encoding = encoder.submit(lambda done=results: [encode_sample(r) for r in done])
            ask()
            fill()
            try:
                encoded = outcome.encoded if encoding is None else encoding.result()
            except Exception as exc:  # noqa: BLE001 - write() encodes again, and says why
                log.warning("encoding ahead failed (%s); encoding while writing", exc)
                encoded = [None] * len(results)
            for job, result, ready in zip(jobs, results, encoded):
                try:
                    written = writer.write(result, episode_id=job.episode_id, batch=batch,
                                           encoded=ready)
                except Exception as exc:
                    if is_disk_full(exc):
                        raise
                    # Counted as a try: an episode the writer refuses (a name from an older
                    # store, a bug) ends failed instead of stopping the queue on every start.
                    failed = store.retry_or_fail([job.episode_id], f"write error: "
                                                 f"{type(exc).__name__}: {exc}", max_tries)
                    unwritten.remove(job.episode_id)
                    summary.failed += len(failed)
                    summary.episodes += len(failed)
                    log.error("episode %d could not be written: %s", job.episode_id, exc)
                    continue
                unwritten.remove(job.episode_id)
                _count(summary, result, written is not None)
            if time.monotonic() - nodes_written >= NODES_EVERY_SECONDS:
                nodes_written = _write_nodes(store, runner)
            if progress is not None:
                progress(summary.episodes, total, summary)
    except BaseException as exc:
        # Whatever stopped us (a full disk, a signal that became an exception, a bug), the
        # claimed but unwritten episodes go back to the queue without counting as a try.
        ids = unwritten + [job.episode_id for job in submitting] + [
            job.episode_id for jobs, _ in in_flight for job in jobs]
        for _, future in in_flight:
            future.cancel()
        try:
            store.release(ids, error="interrupted before writing" if not is_disk_full(exc)
                          else "waiting for disk space")
        except Exception as cleanup:  # noqa: BLE001 - release_mine() retries next time
            log.warning("could not re-queue %d episode(s) yet: %s", len(ids), cleanup)
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise DiskFullError(f"no space left for the job store or the dataset in "
                                f"{store.root}: {exc}") from exc
        raise
    finally:
        encoder.shutdown(wait=True)
    _write_nodes(store, runner)
    summary.stopped = reason
    return reason


NODES_EVERY_SECONDS = 2.0  # how often per-node progress goes into the store for `status`


def _write_nodes(store: JobStore, runner: EpisodeRunner) -> float:
    """Per-node progress into the store (a cluster runner); returns when."""
    if (nodes := runner.nodes()) is not None:
        store.set("cluster", nodes)
    return time.monotonic()


def _count(summary: BatchSummary, result: EpisodeResult, written: bool) -> None:
    summary.episodes += 1
    summary.turns.append(result.turns)
    tally = summary.by_defect.setdefault(f"{result.spec.category}/{result.spec.defect}", [0, 0])
    tally[0] += 1
    tally[1] += int(written)
    if "knowledge_retrieval" in result.tool_sequence:
        summary.knowledge_calls += 1
    if written:
        summary.written += 1
        if len(result.attempts) == 1:
            summary.first_try_accepts += 1
        else:
            summary.refined_accepts += 1
    elif result.status == "rejected":
        summary.rejected += 1
    else:
        summary.failed += 1


# Per-batch output -------------------------------------------------------------------------------

def write_batch_folder(store: JobStore, batch_id: str) -> Path:
    """``batches/<id>/`` with this batch's manifest and contact sheet (paths relative to it)."""
    from appliance.dataset.contact_sheet import THUMBS, write_contact_sheet
    from appliance.imaging import write_atomic
    from appliance.storage.exports import jsonl_line, normal_record

    folder = store.root / "batches" / batch_id
    up = "../../"
    records, normals = [], {}
    for row in store.samples("ok", batch=batch_id):
        record = json.loads(row["record"])
        for key in ("image", "mask", "trajectory"):
            record[key] = up + record[key]
        records.append(record)
        normal = store.normal(record["source_sha256"], record["category"])
        if normal is not None:
            entry = normal_record(normal)
            entry["path"] = up + entry["path"]
            normals[(normal["sha256"], normal["category"])] = entry
    rejected = [json.loads(r[0]) for r in store.db.execute(
        "select result from episodes where batch = ? and status in ('rejected', 'failed') "
        "and result is not null order by finished_at", [batch_id])]
    for name, lines in (("manifest.jsonl", records), ("normals.jsonl", list(normals.values())),
                        ("rejected.jsonl", rejected)):
        write_atomic(folder / name, "".join(jsonl_line(r) for r in lines).encode("utf-8"))
    write_contact_sheet(folder, title=f"Batch {batch_id}", thumbs=store.root / THUMBS)
    return folder


def finish_batch(store: JobStore, batch_id: str, summary: BatchSummary,
                 always_sheet: bool = False) -> None:
    """Contact sheets for the batch and the whole dataset, and the batch's row."""
    from appliance.dataset.contact_sheet import write_contact_sheet

    if summary.episodes or always_sheet:
        with store.dataset_lock():
            write_contact_sheet(store.root)  # first: it makes the thumbnails both pages show
            if summary.episodes:
                write_batch_folder(store, batch_id)
    store.end_batch(batch_id, summary.as_dict())


# appliance batch --------------------------------------------------------------------------------

def run_batch(inbox: Path, out: Path, engine_config: EngineConfig | None = None,
              per_image: int = 1, seed: int = 0, workers: int = 1,
              defects: Sequence[str] | None = None, chunk: int = 4,
              progress: Callable[[int, int, BatchSummary], None] | None = None,
              engine: Engine | None = None, max_tries: int = DEFAULT_MAX_TRIES,
              test_good_share: float = TEST_GOOD_SHARE,
              runner: EpisodeRunner | None = None) -> BatchSummary:
    """Queue every photo of the inbox, run the dataset's queue and write the dataset.
    ``test_good_share`` of the normal photos go to ``test/good`` instead of being edited.
    ``runner`` runs the episodes elsewhere (a cluster); by default this box does, with
    ``workers`` processes."""
    from appliance.dataset.writer import DatasetWriter
    from appliance.storage.reconcile import reconcile

    started = time.perf_counter()
    if runner is None:
        engine_config = engine_config or (engine.config if engine else EngineConfig())
        runner = EpisodeRunner(engine, engine_config, workers)
    engine_config = runner.config
    knowledge_base = runner.engine.knowledge_base if runner.engine else build_engine_kb(engine_config)
    plans, skipped = plan_inbox(inbox, knowledge_base, per_image, defects)
    summary = BatchSummary(skipped_categories=skipped)
    store = JobStore.for_dataset(out)
    writer = DatasetWriter(out, engine=runner.describe(), store=store,
                           test_good_share=test_good_share)
    try:
        # 1. Settle whatever an earlier, interrupted run left behind.
        with store.dataset_lock():
            summary.notes = reconcile(store, max_tries).lines()
        # 2. Read every photo once: its hash keys the work, and it goes to train/good.
        for plan in plans:
            for path in plan.images:
                try:
                    Name(path.name, "file")
                    data = read_plain_file(path, MAX_INPUT_BYTES)
                    image = decode_image(data)
                except (ImageReadError, OSError, InvalidName) as exc:
                    summary.unreadable.append((printable(str(path)), str(exc)))
                    continue
                _, finished = intake_image(writer, plan.category, image,
                                           hashlib.sha256(data).hexdigest(), str(path), len(data),
                                           plan.defects, plan.per_image, seed)
                summary.skipped_done += len(finished)
        summary.test_good = len(store.normals(split="test"))
        # 3. Run the queue (this inbox's episodes and any left by an interrupted run).
        summary.batch_id = store.begin_batch("batch")
        try:
            process_queue(store, writer, runner, chunk=chunk, max_tries=max_tries,
                          batch=summary.batch_id, summary=summary, progress=progress)
        finally:
            summary.runner_notes = runner.notes
        # 4. The contact sheet reflects the whole dataset, earlier runs included.
        summary.seconds = time.perf_counter() - started
        finish_batch(store, summary.batch_id, summary, always_sheet=True)
    finally:
        runner.close()
        store.close()
    summary.seconds = time.perf_counter() - started
    return summary


def build_engine_kb(config: EngineConfig) -> KnowledgeBase:
    from appliance.tools.knowledge.base import load_knowledge_base

    return load_knowledge_base(config.knowledge_base)
