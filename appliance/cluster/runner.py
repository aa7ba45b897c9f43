"""Episodes on a Ray cluster: the head keeps the job store and the writer, the nodes run engines.

``ClusterRunner`` is an episode runner like ``batch.EpisodeRunner``: ``process_queue`` claims
chunks in the store, hands them to it and writes each result exactly once, in claim order. Here a
chunk goes to a Ray actor (an ``EngineActor``: one engine, models loaded once) on some node, with
the normal photos' bytes, since a node cannot read the head's disk. Each node runs as many
engines as its resources hold (``cpus_per_engine``, ``gpus_per_engine``).

Faults: when an engine or its node dies, the chunks it held run again on another engine before
``process_queue`` sees them, so they are written once and in the same order; an actor that
crashed on a live node is restarted by Ray and reloads its models. A chunk whose own episodes
fail (a Python error in the loop) fails as on a single box and counts a try. With no engine left
anywhere, ``RunnerUnavailable`` puts the claimed episodes back in the queue untried.

Seeds come from the episodes (their photo's content and number), not from which node ran them or
when, so the dataset's images, masks and records do not depend on the cluster's size.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from appliance.batch import EncodedChunk, EpisodeJob, RunnerUnavailable, decode_image, run_jobs
from appliance.cluster.auth import ClusterError, ray_auth_env
from appliance.cluster.settings import ClusterSettings
from appliance.cluster.fingerprint import (engine_fingerprint, for_this_node, node_problems,
                                          with_models_dir)
from appliance.dataset.writer import encode_sample
from appliance.engine import EngineConfig, build_engine

log = logging.getLogger(__name__)

NAMESPACE = "appliance"
ACTOR_RESTARTS = 3  # a crashing engine is restarted this often (models reloaded), then dropped
ENGINE_FAILURES = 3  # crashes without a finished chunk before an engine is given up
CHUNK_MOVES = 6  # a chunk that loses this many engines is treated as the cause: a failed try
REFRESH_SECONDS = 10.0  # how often new nodes (or nodes back from a reboot) are looked for
NODE_WAIT_SECONDS = 120.0  # with no engine left, how long to wait for one before giving up
START_SECONDS = 900.0  # how long engines may take to start (GPU models load) before giving up
START_GRACE_SECONDS = 60.0  # once one engine is up, how long to wait for the others at start
START_FAILURES = 3  # engines that fail to start on a node before the node is refused
RESTART_SECONDS = 900.0  # how long a crashed engine may take to come back (GPU models reload)


class EngineActor:
    """One engine resident on a node. Refuses to build when the node's bundles, knowledge base
    or promoted profiles differ from the head's (``problems`` says which)."""

    def __init__(self, config: EngineConfig, expected: dict[str, str], threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.engine = None
        self._rollouts = None
        config = for_this_node(config)
        self.config = config
        try:
            self.problems = node_problems(config, expected)
            if not self.problems:
                self.engine = build_engine(config)
        except Exception as exc:  # noqa: BLE001 - reported to the head as this node's refusal
            self.problems = [f"the engine does not build here: {type(exc).__name__}: {exc}"]

    def ready(self) -> dict:
        described = self.engine.describe() if self.engine is not None else None
        return {"problems": self.problems, "describe": described}

    def run(self, jobs: list[EpisodeJob], pngs: list[bytes]):
        if self.engine is None:  # restarted after the node's files changed
            raise ClusterError("; ".join(self.problems))
        results = run_jobs(self.engine, jobs, [decode_image(data) for data in pngs])
        # Encoded here, not on the head: the head's time per episode is what bounds how many
        # nodes one head can feed.
        return EncodedChunk(results, [encode_sample(result) for result in results])

    def rollouts(self, adapter: dict[str, bytes], version: int, example, specs, settings):
        """One task's GRPO rollouts with the trainer's current adapter (``cluster.rollouts``)."""
        if self.engine is None:
            raise ClusterError("; ".join(self.problems))
        if self._rollouts is None:
            from appliance.cluster.rollouts import NodeRollouts

            self._rollouts = NodeRollouts(self.config, settings)
        return self._rollouts.run(self.engine.environment, adapter, version, example, specs)


RemoteEngine = ray.remote(EngineActor)


@dataclass
class _Engine:
    actor: object  # the actor's handle
    node: str
    name: str  # "host (ip)", for people
    busy: int = 0  # chunks sent and not yet back
    failures: int = 0  # crashes since its last chunk came back
    probe: object = None  # while Ray restarts it: the ready() call that says it is back
    crashed_at: float = 0.0


@dataclass
class _NodeTally:
    name: str
    engines: int = 0
    episodes: int = 0
    first: float | None = None
    last: float | None = None
    state: str = "running"


def connect(address: str, token_file: Path) -> None:
    """Join the cluster at ``address`` as its driver, with the token; ClusterError if the token
    is missing or refused, or the cluster cannot be reached."""
    os.environ.update(ray_auth_env(token_file))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the token file
    host, _, port = address.rpartition(":")
    try:  # Ray's own connect waits for ever on a head that is down
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address}: its head does not answer "
                           f"({exc}). Is `appliance cluster start` running there?") from None
    try:
        # Ray read its settings when it was imported; have it read them again, as
        # ray._private.authentication.authentication_token_setup does when it turns tokens on.
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except ImportError:  # pragma: no cover - a Ray without token authentication
        raise ClusterError("this Ray has no token authentication; install the cluster extra "
                           "(Ray 2.60)") from None
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING,
                 log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        chain, seen = [], exc
        while seen is not None:
            chain.append(f"{type(seen).__name__}: {seen}")
            seen = seen.__cause__ or seen.__context__
        if any("InvalidAuthToken" in text or "AuthenticationError" in text for text in chain):
            raise ClusterError(f"the Ray cluster at {address} refused this box's token "
                               f"({token_file}): every box must hold the same token file; copy "
                               f"the head's") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"cannot join the Ray cluster at {address}: {first}. Is "
                           f"`appliance cluster start` running on this box, joined to it?") from None


class _Call(Future):
    """Work in flight on one engine (a chunk of episodes, a group of GRPO rollouts).
    ``result()`` waits for it, moving it to another engine when the one running it is lost."""

    def __init__(self, runner: "ClusterRunner", method: str, args: tuple, episodes: int):
        super().__init__()
        self.runner, self.method, self.args, self.episodes = runner, method, args, episodes
        self.moves = 0
        self.engine, self.ref = runner._dispatch(method, args)

    def result(self, timeout=None):
        while not self.done():
            try:
                results = ray.get(self.ref)
            except RayTaskError as exc:
                if not isinstance(getattr(exc, "cause", None), ClusterError):
                    # The episodes' own code failed: as on one box, a try.
                    self.runner._returned(self.engine, 0)
                    self.set_exception(exc.as_instanceof_cause())
                    break
                # An engine that cannot run here any more (refused after a restart).
                self.runner._unusable(self.engine, exc)
            except RayError as exc:  # the engine or its node is gone
                self.runner._lost(self.engine, exc)
            else:
                self.runner._returned(self.engine, self.episodes)
                self.set_result(results)
                break
            self.moves += 1
            if self.moves >= CHUNK_MOVES:
                self.set_exception(RuntimeError(f"this work lost {self.moves} engines in a row; "
                                                f"last on {self.engine.name}"))
                break
            self.engine, self.ref = self.runner._dispatch(self.method, self.args,
                                                          avoid=self.engine)
        return super().result(timeout)

    def cancel(self) -> bool:
        """Stops the work on its engine too (a stopped queue), so the engine is free again."""
        if self.done():
            return False
        try:
            ray.cancel(self.ref)
        except Exception:  # noqa: BLE001 - already finished or gone
            pass
        self.engine.busy -= 1
        return super().cancel()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class ClusterRunner:
    """Runs chunks of episodes on engines spread over a Ray cluster (see the module's doc)."""

    engine = None  # no engine on the head: the writer takes its description from the nodes
    exclusive = True  # its engines hold the nodes' resources: close it before building another

    def __init__(self, config: EngineConfig, settings: ClusterSettings,
                 say: Callable[[str], None] | None = None):
        self.config = with_models_dir(config)
        self.settings = settings
        self.say = say or log.warning
        self.expected = engine_fingerprint(self.config)
        self.engines: list[_Engine] = []
        self._pending: dict[object, tuple[object, str, str]] = {}  # ready ref -> actor, node, name
        self._refused: dict[str, str] = {}  # node id -> why
        self._tally: dict[str, _NodeTally] = {}
        self._notes: list[str] = []
        self._described: dict | None = None
        self._last_refresh = 0.0
        self._start_failures: dict[str, int] = {}
        missing = [what for what, digest in self.expected.items() if digest.startswith("missing")]
        if missing:  # the head's files are what every node must match
            raise ClusterError(f"this box (the head) lacks {', '.join(missing)}: install the "
                               f"bundles here too; they name what every node must hold")
        connect(settings.address, settings.token_file)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        """Start engines on every node with room and wait for them: all of them, or once one
        is up, the others for a minute more (engines another run holds leave no room; those
        still loading join later)."""
        self._refresh(force=True)
        started = time.monotonic()
        first_up = None
        while self._pending:
            now = time.monotonic()
            if first_up is None and self.engines:
                first_up = now
            if now - started > START_SECONDS or (first_up and now - first_up > START_GRACE_SECONDS):
                break
            self._collect(block=True, timeout=5.0)
        if not self.engines:
            waiting = (f"{len(self._pending)} engine(s) still waiting for room or loading after "
                       f"{START_SECONDS:.0f} s: is another batch or service holding the nodes? "
                       "(one run at a time per cluster)") if self._pending else ""
            why = "; ".join(self._notes + ([waiting] if waiting else [])) or (
                "no node has the resources for one engine "
                f"({self.settings.cpus_per_engine:g} CPU, {self.settings.gpus_per_engine:g} GPU)")
            raise ClusterError(f"no node of the cluster at {self.settings.address} can run this "
                               f"engine: {why}")

    # The runner protocol (batch.EpisodeRunner) -------------------------------------------------

    @property
    def slots(self) -> int:
        return max(1, len(self.engines)) * self.settings.chunks_per_engine

    def describe(self) -> dict:
        assert self._described is not None
        return self._described

    def submit(self, jobs: list[EpisodeJob]) -> Future:
        try:
            pngs = [Path(job.normal_path).read_bytes() for job in jobs]
        except OSError as exc:  # as on one box: the chunk fails and counts a try
            failed: Future = Future()
            failed.set_exception(exc)
            return failed
        return _Call(self, "run", (jobs, pngs), len(jobs))

    def call(self, method: str, *args, episodes: int = 0) -> Future:
        """Any other work of an ``EngineActor`` method on the least busy engine, with the same
        care for lost engines as a chunk (GRPO rollouts)."""
        return _Call(self, method, args, episodes)

    def reset_pool(self) -> None:
        """Lost engines are handled per chunk; nothing to reset."""

    def nodes(self) -> dict:
        now = time.time()
        report = {}
        for node, tally in sorted(self._tally.items(), key=lambda item: item[1].name):
            span = (tally.last - tally.first) if tally.first and tally.last else 0.0
            report[node] = {"name": tally.name, "state": tally.state, "engines": tally.engines,
                            "episodes": tally.episodes, "updated": now,
                            "episodes_per_second": round(tally.episodes / span, 3) if span > 0 else None}
        return report

    @property
    def notes(self) -> list[str]:
        return list(self._notes)

    def close(self) -> None:
        for engine in self.engines:
            _kill(engine.actor)
        for actor, _, _ in self._pending.values():
            _kill(actor)
        self.engines, self._pending = [], {}
        if ray.is_initialized():
            ray.shutdown()

    # Placing engines ----------------------------------------------------------------------------

    def _capacity(self, resources: dict) -> int:
        """Engines a node with these resources holds."""
        fits = []
        for key, need in (("CPU", self.settings.cpus_per_engine),
                          ("GPU", self.settings.gpus_per_engine)):
            if need > 0:
                fits.append(int(resources.get(key, 0.0) // need))
        return min(fits) if fits else 1

    def _refresh(self, force: bool = False) -> None:
        """Start engines on live nodes that have room for more (new or returning nodes)."""
        now = time.monotonic()
        if not force and now - self._last_refresh < REFRESH_SECONDS:
            return
        self._last_refresh = now
        placed: dict[str, int] = {}
        for engine in self.engines:
            placed[engine.node] = placed.get(engine.node, 0) + 1
        for _, node, _ in self._pending.values():
            placed[node] = placed.get(node, 0) + 1
        threads = max(1, int(self.settings.cpus_per_engine))
        for info in ray.nodes():
            node = info["NodeID"]
            if not info.get("Alive") or node in self._refused:
                continue
            name = (f"{info.get('NodeManagerHostname', '?')} ({info.get('NodeManagerAddress', '?')}, "
                    f"node {node[:8]})")
            tally = self._tally.setdefault(node, _NodeTally(name))
            room = self._capacity(info.get("Resources", {}))
            if room == 0 and tally.state == "running" and not tally.engines:
                tally.state = "no room for an engine"
            for _ in range(room - placed.get(node, 0)):
                actor = RemoteEngine.options(
                    num_cpus=self.settings.cpus_per_engine, num_gpus=self.settings.gpus_per_engine,
                    max_restarts=ACTOR_RESTARTS, max_task_retries=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                ).remote(self.config, self.expected, threads)
                self._pending[actor.ready.remote()] = (actor, node, name)
                tally.state = "starting"

    def _collect(self, block: bool = False, timeout: float | None = None) -> None:
        """Take in the engines that finished loading; refuse the nodes that cannot run ours."""
        if not self._pending:
            return
        ready, _ = ray.wait(list(self._pending), num_returns=1 if block else len(self._pending),
                            timeout=timeout if block else 0)
        for ref in ready:
            actor, node, name = self._pending.pop(ref)
            tally = self._tally[node]
            try:
                info = ray.get(ref)
            except RayError as exc:
                _kill(actor)
                tally.state = "lost"
                self._start_failures[node] = self._start_failures.get(node, 0) + 1
                if self._start_failures[node] >= START_FAILURES:
                    self._refuse(node, name, f"{START_FAILURES} engines did not start there "
                                             f"(last: {_short(exc)})")
                else:
                    log.warning("%s: an engine did not start (%s)", name, _short(exc))
                continue
            if info["problems"]:
                _kill(actor)
                self._refuse(node, name, "; ".join(info["problems"]))
                continue
            if self._described is None:
                self._described = info["describe"]
            self.engines.append(_Engine(actor, node, name))
            tally.engines += 1
            tally.state = "running"

    def _refuse(self, node: str, name: str, why: str) -> None:
        """No more engines on this node for this run (its engines are dropped)."""
        self._refused[node] = why
        self._tally[node].state = "refused"
        for engine in [e for e in self.engines if e.node == node]:
            self.engines.remove(engine)
            self._tally[node].engines -= 1
            _kill(engine.actor)
        self._note(f"{name} refused: {why}")

    def _note(self, text: str) -> None:
        self._notes.append(text)
        self.say(text)

    # Sending and losing chunks -------------------------------------------------------------------

    def _dispatch(self, method: str, args: tuple,
                  avoid: _Engine | None = None) -> tuple[_Engine, object]:
        self._refresh()
        self._collect()
        self._probe()
        deadline = time.monotonic() + NODE_WAIT_SECONDS
        while not (usable := [engine for engine in self.engines if engine.probe is None]):
            if time.monotonic() > deadline:
                raise RunnerUnavailable(f"no engine left on the cluster at "
                                        f"{self.settings.address} for {NODE_WAIT_SECONDS:.0f} s")
            if self.engines:  # only restarting ones: wait for the first back
                ray.wait([engine.probe for engine in self.engines], num_returns=1, timeout=1.0)
            else:
                time.sleep(1.0)
            self._refresh(force=True)
            self._collect()
            self._probe()
        choices = [engine for engine in usable if engine is not avoid] or usable
        engine = min(choices, key=lambda e: e.busy)
        engine.busy += 1
        return engine, getattr(engine.actor, method).remote(*args)

    def _unusable(self, engine: _Engine, exc: RayTaskError) -> None:
        engine.busy -= 1
        if engine in self.engines:
            self._refuse(engine.node, engine.name, str(exc.cause))

    def _returned(self, engine: _Engine, episodes: int) -> None:
        engine.busy -= 1
        engine.failures = 0
        if episodes:
            tally = self._tally[engine.node]
            now = time.time()
            tally.first = tally.first or now
            tally.last = now
            tally.episodes += episodes

    def _lost(self, engine: _Engine, exc: BaseException) -> None:
        """A chunk came back without results: the engine crashed or its node is gone. Ray
        restarts a crashed engine on a live node (models loaded again); no work goes to it until
        it answers again. A dead engine or node, or an engine that crashes again and again
        without finishing a chunk, is dropped (new nodes are picked up by ``_refresh``)."""
        engine.busy -= 1
        if engine not in self.engines or engine.probe is not None:
            return  # already dropped, or already known to be restarting
        engine.failures += 1
        alive = _alive_nodes()
        if (engine.node in alive and engine.failures < ENGINE_FAILURES
                and not isinstance(exc, ActorDiedError)):
            log.warning("an engine on %s stopped (%s); its chunks run on the other engines while "
                        "Ray restarts it", engine.name, _short(exc))
            engine.probe = engine.actor.ready.remote()
            engine.crashed_at = time.monotonic()
            return
        self._drop(engine, exc, alive)

    def _probe(self) -> None:
        """Engines back from a restart take work again; one that did not come back is dropped."""
        restarting = [engine for engine in self.engines if engine.probe is not None]
        if not restarting:
            return
        done, _ = ray.wait([engine.probe for engine in restarting], num_returns=len(restarting),
                           timeout=0)
        for engine in restarting:
            if engine.probe not in done:
                continue
            try:
                info = ray.get(engine.probe)
            except RayError as exc:
                if (isinstance(exc, ActorUnavailableError)
                        and time.monotonic() - engine.crashed_at < RESTART_SECONDS):
                    engine.probe = engine.actor.ready.remote()  # still restarting: ask again
                    continue
                engine.probe = None
                self._drop(engine, exc, _alive_nodes())
                continue
            engine.probe = None
            if info["problems"]:  # rebuilt after the node's files changed, or it failed to load
                self._refuse(engine.node, engine.name, "; ".join(info["problems"]))
                continue
            log.warning("the engine on %s is back", engine.name)

    def _drop(self, engine: _Engine, exc: BaseException, alive: set[str]) -> None:
        """Give up an engine; on a dead node, every engine of that node."""
        dead = engine.node not in alive
        gone = [e for e in self.engines if e is engine or (dead and e.node == engine.node)]
        for lost in gone:
            self.engines.remove(lost)
            _kill(lost.actor)
        tally = self._tally[engine.node]
        tally.engines -= len(gone)
        tally.state = "lost" if dead else tally.state
        self._note(f"{engine.name}: {'its node is gone' if dead else 'an engine was lost'} "
                   f"({_short(exc)}); its chunks run on the other engines")


def _alive_nodes() -> set[str]:
    return {info["NodeID"] for info in ray.nodes() if info.get("Alive")}


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass
