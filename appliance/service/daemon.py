"""The service loop behind ``appliance watch`` and ``appliance run``.

``watch`` runs until stopped: it takes complete files from the inbox into the job store, and,
while the time window is open and the queue is not paused, runs queued episodes a chunk at a
time, coming back to the inbox every poll. ``run`` (the nightly timer) takes what is in the
inbox once and works through the queue until it is empty, the deadline or the window's end.

Both share ``appliance.batch.process_queue`` and the dataset writer with ``appliance batch``:
there is one queue loop. A full disk never loses work: the episode stays queued, the service
says so in its log and in ``appliance status``, and tries again after a back-off.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance.batch import (BatchSummary, EpisodeRunner, RunnerUnavailable, finish_batch,
                             process_queue)
from appliance.cluster.auth import ClusterError, read_token
from appliance.config import Config, check_writable
from appliance.engine import promoted_versions
from appliance.models.shelf import ShelfError
from appliance.names import printable
from appliance.service.intake import Intake
from appliance.service.notify import Notifier
from appliance.service.schedule import Window
from appliance.service.watcher import InboxScanner
from appliance.storage import JobStore, is_disk_full
from appliance.storage.reconcile import reconcile

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
ORPHAN_SWEEP_SECONDS = 60.0
EXIT_OK, EXIT_DISK_FULL, EXIT_CONFIG = 0, 75, 78  # 75: EX_TEMPFAIL, 78: EX_CONFIG
EXIT_TEMPFAIL = EXIT_DISK_FULL  # the work stays queued; a later run goes on with it


@dataclass
class RunResult:
    exit_code: int
    summary: BatchSummary
    message: str


class Service:
    def __init__(self, config: Config, role: str = "watcher", notifier: Notifier | None = None,
                 process: bool = True):
        self.config = config
        self.role = role  # "watcher" or "runner": the control key its heartbeat is kept under
        self.notifier = notifier or Notifier()
        self.window = Window.parse(config.schedule.window)
        self.process = process
        self.stop_signal: str | None = None
        self.backoff_until = 0.0
        self._cluster_retry_at = 0.0
        self.batch_id: str | None = None
        self.summary = BatchSummary()
        self.state = "starting"
        self._last_beat = 0.0
        self._last_scan = 0.0
        self.store: JobStore | None = None  # opened by start(), which waits out a full disk
        self.writer = None
        self.runner: EpisodeRunner | None = None
        self._promoted: dict | None = None  # what the engine loaded (``promoted_versions``)
        self.scanner = InboxScanner(config.inbox, config.intake.stable_polls,
                                    config.intake.settle_seconds,
                                    config.intake.quarantine_after_seconds)

    # Start and stop -----------------------------------------------------------------------------

    def start(self) -> bool:
        """Open the store (waiting while the disk is full), recover from any crash, build the
        engine and load what intake needs. False if a signal came first."""
        if not self._open_store():
            return False
        engine_config = self.config.engine_config()
        if self.process:
            knowledge_base = self._build_runner()
        else:
            knowledge_base = _load_kb(engine_config)
            self._describe({"engine": engine_config.name, **engine_config.backend_names()})
        self.intake = Intake(self.config, self.writer, knowledge_base)
        log.info("inbox %s -> dataset %s; window %s%s", self.config.inbox, self.config.dataset,
                 self.window, "" if self.process else "; intake only")
        return True

    def _build_runner(self):
        """Build the engine (with the adapters and calibration profiles promoted now); returns
        its knowledge base."""
        engine_config = self.config.engine_config()
        try:
            self._promoted = promoted_versions(engine_config)
        except (ShelfError, OSError, ValueError):
            self._promoted = None  # building the engine says what is wrong with them
        try:
            self.runner = _runner_for(self.config, engine_config)
        except ClusterError as exc:  # nodes down or busy, the head up first: try again later
            self._cluster_unavailable(exc)
            self._describe({"engine": engine_config.name, **engine_config.backend_names()})
            return _load_kb(engine_config)
        self._describe(self.runner.describe())
        return (self.runner.engine.knowledge_base if self.runner.engine
                else _load_kb(engine_config))

    def _cluster_unavailable(self, exc: Exception) -> None:
        """The cluster cannot run episodes now: intake goes on, the work stays queued, and the
        engines are started again in CLUSTER_RETRY_SECONDS."""
        if self.runner is not None:
            self.runner.close()
        self.runner = None
        self._cluster_retry_at = time.time() + CLUSTER_RETRY_SECONDS
        message = (f"cluster: {exc}; the work stays queued, trying again in "
                   f"{CLUSTER_RETRY_SECONDS:.0f} s")
        log.error(message)
        self.store_safe_set("last_error", message)

    def _retry_cluster(self) -> bool:
        """After the cluster was unavailable, start its engines again when it is time."""
        if self.config.cluster.address is None or time.time() < self._cluster_retry_at:
            return False
        self._build_runner()
        return self.runner is not None

    def _describe(self, describe: dict) -> None:
        self.writer.engine = describe
        self.engine_line = ", ".join(f"{k}={v}" for k, v in describe.items()
                                     if k not in ("env", "knowledge_base_digest"))
        log.info("engine %s", self.engine_line)

    def reload_if_promoted(self) -> bool:
        """Before a batch: when `appliance retrain` has promoted or rolled back an adapter or a
        calibration profile since the engine was built, build it again; True if it did."""
        if self.runner is None:
            return False
        try:
            now = promoted_versions(self.config.engine_config())
        except (ShelfError, OSError, ValueError) as exc:
            log.error("cannot read the promoted adapters/calibrations (%s); the engine keeps "
                      "what it loaded", exc)
            return False
        if now == self._promoted:
            return False
        log.info("promoted adapters/calibration profiles changed (%s -> %s); reloading the engine",
                 self._promoted, now)
        old = self.runner
        if old.exclusive:  # its engines hold the nodes the new ones need
            old.close()
            try:
                self._build_runner()
            except Exception as exc:  # noqa: BLE001 - reported; the queue waits for a restart
                self.runner = None
                self.store_safe_set("last_error", f"the engines with the newly promoted "
                                                  f"adapter/profile cannot start: {exc}")
                log.error("the engines with the newly promoted adapter/profile cannot start on "
                          "the cluster (%s); episodes wait until the service is restarted", exc)
                return False
            return True
        try:
            self._build_runner()
        except Exception as exc:  # noqa: BLE001 - the old engine keeps the night going
            self.runner = old
            self._promoted = now  # not retried every batch; the next change is
            self._describe(old.describe())
            log.error("the engine with the newly promoted adapter/profile cannot be built (%s); "
                      "the previous engine keeps running", exc)
            return False
        old.close()
        return True

    def _open_store(self) -> bool:
        """Folders, store and crash recovery; on a full disk, wait and try again rather than
        exit (under systemd an exit would only restart into the same full disk)."""
        from appliance.dataset.writer import DatasetWriter

        while self.stop_signal is None:
            try:
                problems = check_writable(self.config)
                if problems:
                    raise ServiceError("cannot write where the config says:\n  "
                                       + "\n  ".join(problems))
                if self.store is None:
                    self.store = JobStore.for_dataset(self.config.dataset)
                    self.writer = DatasetWriter(
                        self.config.dataset, store=self.store,
                        test_good_share=self.config.defaults.test_good_share)
                with self.store.dataset_lock():
                    for line in reconcile(self.store, self.config.service.max_tries).lines():
                        log.warning("recovered: %s", line)
                return True
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                self._disk_full(exc)
                if self._past_deadline():
                    return False
                self._sleep(min(self.backoff_until - time.time(), self._left()))
        return False

    def install_signals(self) -> None:
        def handler(signum, _frame):
            self.stop_signal = signal.Signals(signum).name
            log.info("%s received: finishing the chunk in progress, then stopping",
                     self.stop_signal)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        if self.store is None:
            return
        if self.batch_id is not None:
            self._finish_batch()
        self._beat(force=True, state="stopped")
        if self.runner is not None:
            self.runner.close()
        self.store.close()

    # appliance watch ----------------------------------------------------------------------------

    def watch(self) -> int:
        if not self.start():
            self.notifier.stopping(f"stopping ({self.stop_signal})")
            return EXIT_OK
        self.notifier.ready(self._status_line())
        last_sweep = time.monotonic()
        while self.stop_signal is None:
            self.notifier.ping()
            self._take_ready_files()
            if time.monotonic() - last_sweep >= ORPHAN_SWEEP_SECONDS:
                # Another process (the nightly run) may have died holding claimed episodes.
                last_sweep = time.monotonic()
                requeued, failed = self.store.requeue_orphaned(self.config.service.max_tries)
                if requeued or failed:
                    log.warning("re-queued %d episode(s) of a process that died; %d failed",
                                requeued, failed)
            if self._may_process():
                self._process(stop=self._watch_stop)
            else:
                self._sleep_until_next_poll()
            self._beat()
        self.notifier.stopping(f"stopping ({self.stop_signal})")
        return EXIT_OK

    def _watch_stop(self) -> str | None:
        self.notifier.ping()
        reason = self._common_stop()
        if reason:
            return reason
        if time.monotonic() - self._last_scan >= self.config.intake.poll_seconds:
            return "intake"  # back to the inbox; the batch goes on afterwards
        return None

    # appliance run ------------------------------------------------------------------------------

    def run(self, until: datetime | None = None) -> RunResult:
        """One pass over the inbox, then the queue until empty, ``until`` or the window's end."""
        now = datetime.now()
        if until is None and not self.window.always:
            if not self.window.contains(now):
                message = f"outside the processing window {self.window}; nothing to do"
                log.info(message)
                return RunResult(EXIT_OK, self.summary, message)
            until = self.window.closes_at(now)
        self.deadline = until
        if not self.start():
            message = self.stop_signal and f"signal {self.stop_signal}" or "disk full"
            self.summary.stopped = message
            return RunResult(EXIT_OK if self.stop_signal else EXIT_DISK_FULL, self.summary,
                             message)
        self.notifier.ready(self._status_line())
        for _ in range(self.config.intake.stable_polls):  # establish which files are complete
            self._take_ready_files()
            if self.stop_signal:
                break
            time.sleep(min(self.config.intake.poll_seconds, 5.0))
        reason = "done"
        while self.stop_signal is None and not self._past_deadline():
            if time.time() < self.backoff_until:
                self._sleep(min(self.backoff_until - time.time(), self._left()))
                continue
            self._take_ready_files()  # again after a full disk: files left in the inbox
            if time.time() < self.backoff_until:
                reason = "disk full"
                continue
            if self.store.counts()["queued"] == 0:
                reason = "done"
                break
            reason = self._process(stop=self._run_stop)
            if reason != "disk full":
                break
        if self.batch_id is not None:
            self._finish_batch()
        if reason == "disk full":
            self.summary.stopped = "disk full"
            return RunResult(EXIT_DISK_FULL, self.summary, self.store.get("last_error") or reason)
        if self.runner is None and self.config.cluster.address and self.store.counts()["queued"]:
            self.summary.stopped = "cluster unavailable"  # a temporary failure, as a full disk
            return RunResult(EXIT_TEMPFAIL, self.summary, self.store.get("last_error") or reason)
        if self.stop_signal:
            reason = f"signal {self.stop_signal}"
        elif self._past_deadline() and self.store.counts()["queued"]:
            reason = "deadline"
        self.summary.stopped = reason
        return RunResult(EXIT_OK, self.summary, reason)

    def _run_stop(self) -> str | None:
        self.notifier.ping()
        if self._past_deadline():
            return "deadline"
        return self._common_stop()

    def _past_deadline(self) -> bool:
        deadline = getattr(self, "deadline", None)
        return deadline is not None and datetime.now() >= deadline

    def _left(self) -> float:
        deadline = getattr(self, "deadline", None)
        return 3600.0 if deadline is None else max(0.0, (deadline - datetime.now()).total_seconds())

    # Shared steps -------------------------------------------------------------------------------

    def _common_stop(self) -> str | None:
        self._beat()
        if self.stop_signal:
            return f"signal {self.stop_signal}"
        if self.store.paused:
            return "paused"
        if not self.window.contains(datetime.now()):
            return "window closed"
        return None

    def _may_process(self) -> bool:
        return (self.process and self.config.schedule.watcher_processes
                and time.time() >= self.backoff_until and not self.store.paused
                and self.window.contains(datetime.now())
                and self.store.counts()["queued"] > 0)

    def _process(self, stop) -> str:
        """Run queued episodes until ``stop`` says otherwise; returns why it stopped."""
        if self.runner is None and not self._retry_cluster():
            return "intake only"
        try:
            if self.batch_id is None:
                self.reload_if_promoted()
                if self.runner is None:
                    return "intake only"
                self.batch_id = self.store.begin_batch(self.role)
                self.summary = BatchSummary(batch_id=self.batch_id)
                self._batch_started = time.perf_counter()
            self._beat(force=True, state="processing")
            reason = process_queue(
                self.store, self.writer, self.runner, chunk=self.config.engine.chunk,
                max_tries=self.config.service.max_tries, batch=self.batch_id,
                summary=self.summary, stop=stop, progress=self._progress,
                min_free_bytes=int(self.config.service.min_free_mb * 1e6))
        except RunnerUnavailable as exc:  # every node of the cluster lost
            self._cluster_unavailable(exc)
            return "cluster unavailable"
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            self._disk_full(exc)
            return "disk full"
        self.store_safe_set("last_error", None)
        if reason != "intake":
            self._finish_batch()
            log.info("processing stopped: %s", reason)
        return reason

    def _finish_batch(self) -> None:
        self.summary.seconds = time.perf_counter() - getattr(self, "_batch_started",
                                                              time.perf_counter())
        try:
            finish_batch(self.store, self.batch_id, self.summary)
        except Exception as exc:  # noqa: BLE001 - sheets are redone by the next batch
            if is_disk_full(exc):
                self._disk_full(exc)
            else:
                log.error("could not write the contact sheet: %s", exc)
        else:
            if self.summary.episodes:
                log.info("batch %s: %d episode(s), %d sample(s) written, %d rejected, %d failed",
                         self.batch_id, self.summary.episodes, self.summary.written,
                         self.summary.rejected, self.summary.failed)
        self.batch_id = None

    def _disk_full(self, exc: Exception) -> None:
        wait = self.config.service.disk_backoff_seconds
        detail = str(exc)
        if not detail.startswith(("no space left", "only ")):
            free = shutil.disk_usage(_existing(self.config.dataset)).free
            detail = (f"no space left on the device of {self.config.dataset} "
                      f"({free / 1e6:.1f} MB free; {exc}); the work stays queued")
        message = f"disk full: {detail}. Free space on that disk; retrying in {wait:g} s"
        log.error(message)
        self.store_safe_set("last_error", message)
        self.backoff_until = time.time() + wait
        self.notifier.status(message[:200])
        self._beat(force=True, state="waiting for disk space")

    def store_safe_set(self, key: str, value) -> None:
        if self.store is None:
            return
        try:
            self.store.set(key, value)
        except Exception as exc:  # noqa: BLE001 - the store may be on the full disk
            log.debug("could not record %s: %s", key, exc)

    def _take_ready_files(self) -> None:
        self._last_scan = time.monotonic()
        if time.time() < self.backoff_until:
            return
        ready = self.scanner.poll()
        try:
            self.store.forget_intake_tries({self._try_key(p) for p in self.scanner.seen()})
        except Exception as exc:  # noqa: BLE001 - bookkeeping; the next poll tries again
            if is_disk_full(exc):
                self._disk_full(exc)
                return
            log.warning("could not forget the tries of files gone from the inbox: %s", exc)
        for path in ready:
            if self.stop_signal:
                return
            self.notifier.ping()
            try:
                self._take(path)
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the service
                if is_disk_full(exc):
                    self._disk_full(exc)  # the file stays in the inbox for later
                    return
                # The try was counted before it began: the file cannot loop forever.
                log.exception("intake of inbox/%s failed: %s",
                              printable(str(path.relative_to(self.config.inbox))), exc)
                self.scanner.defer(path)
        # Measured from the end of the pass: a long intake must not starve the queue.
        self._last_scan = time.monotonic()

    def _take(self, path: Path) -> None:
        """One try at one inbox file. Every try is counted in the store before it is made, so
        one that crashes the process counts too; after ``service.max_tries`` failed tries the
        file goes to quarantine/ with the last error, and one that cannot even be moved there
        is left alone until it changes, with the reason in the log and in ``appliance status``.
        """
        key = self._try_key(path)
        shown = printable(str(path.relative_to(self.config.inbox)))
        row = self.store.begin_intake_try(key, shown)
        max_tries = self.config.service.max_tries
        if row["tries"] > max_tries:
            reason = (f"taking it in failed {row['tries'] - 1} times "
                      f"(service.max_tries = {max_tries}); last error: "
                      f"{row['error'] or 'the service stopped while taking it (crash or kill)'}")
            outcome = self.intake.give_up(path, reason)
            if outcome.status == "quarantined":
                self.store.end_intake_try(key)
                self.scanner.forget(path)
            else:
                self.store.end_intake_try(key, error=outcome.reason)
                log.error("inbox/%s is left in the inbox until it changes: %s", shown,
                          outcome.reason)
                self.scanner.hold(path)
            return
        ahead = self.scanner.future(path)
        if ahead > 60:
            log.warning("inbox/%s: its modification time is %.0f s in the future (the clock of "
                        "the machine that wrote it?); judged by when it was first seen", shown,
                        ahead)
        try:
            outcome = self.intake.take(path, age=self.scanner.age(path))
        except Exception as exc:
            if is_disk_full(exc):
                self._take_back_try(key, counted=False)
                raise
            log.exception("intake of inbox/%s failed (try %d of %d): %s", shown, row["tries"],
                          max_tries, exc)
            self.store.end_intake_try(key, error=f"{type(exc).__name__}: {exc}")
            self.scanner.defer(path)
            return
        if outcome.status == "wait":
            log.info("%s: not taken yet (%s)", outcome.source, outcome.reason)
            self.store.end_intake_try(key, counted=False)
            self.scanner.defer(path)
        elif outcome.status == "error":
            self.store.end_intake_try(key, error=outcome.reason)
            self.scanner.defer(path)
        elif outcome.status == "left":
            log.error("inbox/%s is left in the inbox until it changes: %s", shown,
                      outcome.reason)
            self.store.end_intake_try(key, error=outcome.reason)
            self.scanner.hold(path)
        else:
            self.store.end_intake_try(key)
            self.scanner.forget(path)

    def _try_key(self, path: Path) -> str:
        return os.fsencode(path.relative_to(self.config.inbox)).hex()

    def _take_back_try(self, key: str, counted: bool) -> None:
        try:
            self.store.end_intake_try(key, counted=counted)
        except Exception as exc:  # noqa: BLE001 - the store may be on the full disk
            log.debug("could not take back the try at %s: %s", key, exc)

    def _progress(self, done: int, total: int, summary: BatchSummary) -> None:
        self.notifier.ping()
        self.notifier.status(self._status_line())

    def _sleep_until_next_poll(self) -> None:
        left = self.config.intake.poll_seconds - (time.monotonic() - self._last_scan)
        self._sleep(left)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + max(0.0, seconds)
        while self.stop_signal is None and time.monotonic() < end:
            self.notifier.ping()
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    # Status -------------------------------------------------------------------------------------

    def _status_line(self) -> str:
        if self.store is None:
            return self._state()
        counts = self.store.counts()
        state = self._state()
        return (f"{state}; queue {counts['queued'] + counts['running']}, "
                f"done {counts['accepted']}, rejected {counts['rejected']}, "
                f"failed {counts['failed']}")

    def _state(self) -> str:
        if time.time() < self.backoff_until:
            return "waiting for disk space"
        if self.store is None:
            return "starting"
        if self.store.paused:
            return "paused"
        if not self.window.contains(datetime.now()):
            return f"outside window {self.window}"
        return "processing" if self.batch_id else "idle"

    def _beat(self, force: bool = False, state: str | None = None) -> None:
        now = time.time()
        if not force and now - self._last_beat < HEARTBEAT_SECONDS:
            return
        self._last_beat = now
        self.state = state or self._state()
        self.notifier.status(self._status_line())
        self.store_safe_set(self.role, {
            "pid": os.getpid(), "state": self.state, "engine": getattr(self, "engine_line", ""),
            "window": str(self.window), "inbox": str(self.config.inbox),
            "pending_files": self.scanner.pending(), "held_files": self.scanner.held(),
            "unreadable_folders": sorted(printable(f) for f in self.scanner.unreadable),
            "batch": self.batch_id, "poll_seconds": self.config.intake.poll_seconds})


class ServiceError(RuntimeError):
    """The service cannot run as configured (e.g. a folder it must write is not writable)."""


CLUSTER_RETRY_SECONDS = 60.0  # after the cluster could not run episodes, when to try again


def _runner_for(config: Config, engine_config) -> EpisodeRunner:
    """This box's worker processes, or the engines of the cluster the config names."""
    from appliance.cluster.settings import ClusterSettings

    settings = ClusterSettings.from_config(config)
    if settings is None:
        return EpisodeRunner(config=engine_config, workers=config.engine.workers)
    try:
        read_token(settings.token_file)  # a configuration problem: no point retrying
        from appliance.cluster.runner import ClusterRunner
    except ClusterError as exc:
        raise ServiceError(f"cluster: {exc}") from None
    except ImportError as exc:
        raise ServiceError(f"cluster.address is set but Ray cannot be imported ({exc}); install "
                           "the cluster extra: pip install '.[cluster]'") from None
    return ClusterRunner(engine_config, settings)  # ClusterError: the cluster, not the config


def _existing(path: Path) -> Path:
    """The path, or its nearest existing parent (disk usage of a folder not made yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _load_kb(engine_config):
    from appliance.tools.knowledge.base import load_knowledge_base

    return load_knowledge_base(engine_config.knowledge_base)


def configure_logging(verbose: bool = False) -> None:
    """journald stamps time and unit itself; a terminal gets the time from us."""
    fmt = ("%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM")
           else "%(asctime)s %(levelname)s %(message)s")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt,
                        datefmt="%Y-%m-%d %H:%M:%S", force=True)


def data_paths(config: Config) -> dict[str, Path]:
    return {name: config.path(name) for name in ("inbox", "done", "quarantine", "dataset")}
