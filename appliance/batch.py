"""``appliance batch``: a folder of normal photos in, a labeled defect dataset out.

The inbox holds one sub-folder per product category (``INBOX/bottle/*.png``). A category folder
may carry ``spec.toml``::

    defects = ["broken_large", "contamination"]   # default: the knowledge base's list
    per_image = 2                                   # samples per (image, defect); default --per-image
    material = "glass"                              # for a part the knowledge base does not know

Every (photo, defect, sample) is one episode with a seed derived from the photo's content, so
a re-run (or a renamed copy of a photo) skips work already in the dataset.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import statistics
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from appliance.agent.environment import EpisodeResult, EpisodeSpec
from appliance.engine import Engine, EngineConfig, build_engine
from appliance.imaging import IMAGE_SUFFIXES, ImageReadError, load_rgb, sha256_file
from appliance.knowledge import KnowledgeBase, normalize_name

SPEC_FILE = "spec.toml"
_SPEC_KEYS = {"defects", "per_image", "material"}


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
class Job:
    path: Path
    sha256: str
    category: str
    defect: str
    seed: int
    key: str


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

    @property
    def accepted_rate(self) -> float:
        return self.written / self.episodes if self.episodes else 0.0

    def lines(self) -> list[str]:
        per_sample = self.seconds / self.written if self.written else float("nan")
        mean_turns = statistics.fmean(self.turns) if self.turns else 0.0
        lines = [
            f"episodes run       {self.episodes}  (skipped, already done: {self.skipped_done})",
            f"samples written    {self.written}",
            f"accepted rate      {100 * self.accepted_rate:.1f}%  "
            f"(first try {self.first_try_accepts}, after refinement {self.refined_accepts}; "
            f"rejected {self.rejected}, failed {self.failed})",
            f"mean turns         {mean_turns:.2f}  (knowledge retrieved in {self.knowledge_calls} episodes)",
            f"time               {self.seconds:.1f} s, {per_sample:.2f} s per written sample",
        ]
        for name, reason in self.unreadable:
            lines.append(f"unreadable input   {name}: {reason}")
        for name, reason in self.skipped_categories:
            lines.append(f"skipped category   {name}: {reason}")
        return lines


def _read_spec(folder: Path) -> dict:
    path = folder / SPEC_FILE
    if not path.exists():
        return {}
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InboxError(f"{path}: not valid TOML: {exc}") from exc
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise InboxError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    if "defects" in spec and (not isinstance(spec["defects"], list) or not spec["defects"]
                              or not all(isinstance(d, str) and d.strip() for d in spec["defects"])):
        raise InboxError(f"{path}: 'defects' must be a non-empty list of names")
    if "per_image" in spec and (not isinstance(spec["per_image"], int) or spec["per_image"] < 1):
        raise InboxError(f"{path}: 'per_image' must be a positive integer")
    return spec


def plan_inbox(inbox: Path, knowledge_base: KnowledgeBase, per_image: int,
               defects: Sequence[str] | None = None) -> tuple[list[CategoryPlan], list[tuple[str, str]]]:
    """Categories to run, and (category, reason) for folders that cannot be run."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise InboxError(f"inbox {inbox} is not a folder")
    plans, skipped = [], []
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        category = normalize_name(folder.name)
        try:
            spec = _read_spec(folder)
        except InboxError as exc:
            skipped.append((folder.name, str(exc)))
            continue
        chosen = list(defects) if defects else spec.get("defects")
        if not chosen:
            chosen = knowledge_base.defects_for(category)
        if not chosen and spec.get("material"):
            material = knowledge_base.subject(spec["material"])
            chosen = list(material.defects) if material else []
        if not chosen:
            skipped.append((folder.name, f"the knowledge base has no defect list for {category!r}; "
                                         f"add {folder / SPEC_FILE} with defects = [...]"))
            continue
        images = sorted(p for p in folder.iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            skipped.append((folder.name, "no image files"))
            continue
        plans.append(CategoryPlan(category, folder, [normalize_name(d) for d in chosen],
                                  spec.get("per_image", per_image), images))
    return plans, skipped


def episode_seed(base_seed: int, sha256: str, defect: str, sample: int) -> int:
    """Deterministic per (photo content, defect, sample), independent of file names and order."""
    digest = hashlib.sha256(f"{base_seed}:{sha256}:{defect}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# Worker processes build the engine once and keep it resident.
_WORKER_ENGINE: Engine | None = None


def _init_worker(config: EngineConfig) -> None:
    global _WORKER_ENGINE
    import torch

    torch.set_num_threads(1)
    _WORKER_ENGINE = build_engine(config)


def _run_chunk(chunk: list[tuple[Job, object]]) -> list[EpisodeResult]:
    assert _WORKER_ENGINE is not None
    specs = [EpisodeSpec(image=image, category=job.category, defect=job.defect, seed=job.seed,
                         source=str(job.path), source_sha256=job.sha256) for job, image in chunk]
    return _WORKER_ENGINE.environment.run(specs, _WORKER_ENGINE.policy)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_batch(inbox: Path, out: Path, engine_config: EngineConfig | None = None,
              per_image: int = 1, seed: int = 0, workers: int = 1,
              defects: Sequence[str] | None = None, chunk: int = 4,
              progress: Callable[[int, int, BatchSummary], None] | None = None,
              engine: Engine | None = None) -> BatchSummary:
    """Run every pending episode of the inbox and write the dataset; returns the summary."""
    from appliance.dataset.contact_sheet import write_contact_sheet
    from appliance.dataset.writer import DatasetWriter, episode_key

    started = time.perf_counter()
    engine_config = engine_config or EngineConfig()
    if engine is None and workers <= 1:
        engine = build_engine(engine_config)
    knowledge_base = engine.knowledge_base if engine else build_engine_kb(engine_config)
    plans, skipped = plan_inbox(inbox, knowledge_base, per_image, defects)
    summary = BatchSummary(skipped_categories=skipped)
    describe = engine.describe() if engine else {"engine": engine_config.name,
                                                 **engine_config.backend_names()}
    writer = DatasetWriter(out, engine=describe)
    done = writer.done_keys()

    # 1. Read every photo once: its hash keys the work, and it goes to train/good.
    work: list[tuple[Job, object]] = []
    for plan in plans:
        for path in plan.images:
            try:
                image = load_rgb(path)
                sha = sha256_file(path)
            except (ImageReadError, OSError) as exc:
                summary.unreadable.append((str(path), str(exc)))
                continue
            writer.add_normal(plan.category, image, sha, str(path))
            for defect in plan.defects:
                for sample in range(plan.per_image):
                    job_seed = episode_seed(seed, sha, defect, sample)
                    key = episode_key(sha, plan.category, defect, job_seed)
                    if key in done:
                        summary.skipped_done += 1
                        continue
                    done.add(key)  # the same photo twice in the inbox is one piece of work
                    work.append((Job(path, sha, plan.category, defect, job_seed, key), image))

    # 2. Run episodes in chunks (in-process or in resident worker processes) and write results.
    def consume(results: list[EpisodeResult]) -> None:
        for result in results:
            summary.episodes += 1
            summary.turns.append(result.turns)
            if "knowledge_retrieval" in result.tool_sequence:
                summary.knowledge_calls += 1
            if writer.write(result) is not None:
                summary.written += 1
                if len(result.attempts) == 1:
                    summary.first_try_accepts += 1
                else:
                    summary.refined_accepts += 1
            elif result.status == "rejected":
                summary.rejected += 1
            else:
                summary.failed += 1
        if progress is not None:
            progress(summary.episodes, len(work), summary)

    chunks = list(_chunks(work, chunk))
    if workers <= 1:
        for part in chunks:
            consume(engine.environment.run(
                [EpisodeSpec(image=image, category=job.category, defect=job.defect, seed=job.seed,
                             source=str(job.path), source_sha256=job.sha256) for job, image in part],
                engine.policy))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                 initializer=_init_worker, initargs=(engine_config,)) as pool:
            for results in pool.map(_run_chunk, chunks):
                consume(results)

    # 3. The contact sheet reflects the whole dataset, earlier runs included.
    write_contact_sheet(out)
    summary.seconds = time.perf_counter() - started
    return summary


def build_engine_kb(config: EngineConfig) -> KnowledgeBase:
    from appliance.knowledge import load_knowledge_base

    return load_knowledge_base(config.knowledge_base)
