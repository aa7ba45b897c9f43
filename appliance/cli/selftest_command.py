"""``appliance selftest``: one episode through every installed backend, on a tiny model kit.

For a freshly installed box: builds the tiny random-weight kit in a temporary folder, then for
each registered backend whose libraries are installed runs one episode with that backend in its
role (the CPU defaults in the others) and prints PASS / FAIL / SKIP with timings. A random policy
cannot follow the protocol, so on the tiny kit VLM backends are guided by the built-in ones
(forced decoding: the real processor, model and generation loop still run every token) and the
line says so: it checks the machinery, not the model's judgement.

``--real`` runs episodes on the engine the installed models make, unguided (guidance is a test
tool for random weights, never applied to real models), and reports honestly how many episodes
finished the protocol, how many replies hit a reasoning or action budget, and the protocol
errors seen. It passes only when every episode finished the protocol.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import click

CATEGORY, DEFECT = "magnetic_tile", "crack"
TOOL_OF_ROLE = {"prompt_gen": "prompt_gen", "image_gen": "image_gen",
                "quality_eval": "quality_eval", "knowledge": "knowledge_retrieval",
                "mask_gen": "mask_gen"}
# Which tiny kit part serves each backend (the kit builds only what is asked for).
KIT_PART = {"sdxl-inpaint": "sdxl", "flux-fill": "flux", "metauas-onnx": "metauas"}


@dataclass
class Outcome:
    role: str
    backend: str
    status: str  # PASS, FAIL, SKIP
    detail: str
    load_s: float = 0.0
    episode_s: float = 0.0

    def line(self) -> str:
        timing = (f"load {self.load_s:6.2f} s  episode {self.episode_s:6.2f} s"
                  if self.status != "SKIP" else " " * 35)
        return f"{self.status:4s}  {self.role:12s} {self.backend:20s} {timing}  {self.detail}"


def sample_image():
    """A real photo that ships with scikit-image: a brick wall texture, 128 px, RGB."""
    import numpy as np
    from skimage import data

    gray = data.brick()[:128, :128]
    return np.repeat(gray[..., None], 3, axis=2)


def _config(models_dir: Path, name: str, **backends):
    from appliance.engine import EngineConfig

    return replace(EngineConfig(), name=name, models_dir=models_dir, **backends)


def _tool_errors(messages: list[dict], tool: str) -> list[str]:
    from appliance.agent.protocol import parse_tool_response

    errors = []
    for message in messages:
        if message.get("role") != "tool" or message.get("name") != tool:
            continue
        for part in message["content"]:
            parsed = parse_tool_response(part.get("text", "")) if part["type"] == "text" else None
            if parsed and parsed[1].get("status") == "error":
                errors.append(str(parsed[1].get("error")))
    return errors


def _unguide(engine) -> None:
    """Let every model decide for itself (tiny-kit manifests carry a guide)."""
    for backend in (engine.policy, *vars(engine.tools).values()):
        if getattr(backend, "guide", None) is not None:
            backend.guide = None


@dataclass
class RealReport:
    episodes: int = 0
    finished: int = 0  # answered or gave up by the protocol, not cut off by the turn limit
    accepted: int = 0
    replies: int = 0
    reasoning_hits: int = 0
    action_hits: int = 0
    protocol_errors: dict[str, int] | None = None

    def line(self) -> str:
        errors = ", ".join(f"{count}x {message[:70]}" for message, count in
                           sorted((self.protocol_errors or {}).items(), key=lambda kv: -kv[1])[:3])
        return (f"{self.finished}/{self.episodes} episodes finished the protocol, "
                f"{self.accepted} accepted; {self.replies} replies: {self.reasoning_hits} hit the "
                f"reasoning budget, {self.action_hits} the action budget; protocol errors: "
                f"{sum((self.protocol_errors or {}).values())}" + (f" ({errors})" if errors else ""))


def run_real(config, episodes: int) -> tuple[Outcome, RealReport]:
    """``episodes`` unguided episodes on the installed models, and what the model did in them."""
    from appliance.agent.episode import EpisodeSpec
    from appliance.engine import build_engine

    started = time.perf_counter()
    try:
        engine = build_engine(config)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return Outcome("engine", "installed", "FAIL", f"cannot load: {type(exc).__name__}: {exc}",
                       time.perf_counter() - started), RealReport()
    load_s = time.perf_counter() - started
    report = RealReport(episodes=episodes, protocol_errors={})
    try:
        _unguide(engine)
        image = sample_image()
        specs = [EpisodeSpec(image if i % 2 == 0 else image[:, ::-1].copy(), CATEGORY, DEFECT,
                             seed=7 + i) for i in range(episodes)]
        started = time.perf_counter()
        results = engine.environment.run(specs, engine.policy)
        episode_s = (time.perf_counter() - started) / max(episodes, 1)
    except Exception as exc:  # noqa: BLE001
        return Outcome("engine", "installed", "FAIL", f"episodes raised {type(exc).__name__}: {exc}",
                       load_s), report
    finally:
        engine.close()
    for result in results:
        report.finished += result.end_reason == "answered" or result.end_reason.startswith(
            "the policy gave up")
        report.accepted += result.accepted
        report.replies += result.turns
        report.reasoning_hits += sum(bool(g.get("reasoning_budget_hit")) for g in result.generation)
        report.action_hits += sum(bool(g.get("action_budget_hit")) for g in result.generation)
        for message in _tool_errors(result.messages, "environment"):
            report.protocol_errors[message] = report.protocol_errors.get(message, 0) + 1
    status = "PASS" if report.finished == episodes else "FAIL"
    policy = results[0].policy if results else "?"
    return Outcome("engine", f"installed ({policy})", status, report.line(), load_s,
                   episode_s), report


def run_episode(config, role: str | None, backend: str) -> Outcome:
    """Build the engine for ``config``, run one episode, judge whether ``backend`` worked."""
    from appliance.agent.episode import EpisodeSpec
    from appliance.engine import build_engine
    from appliance.policies.scripted import ScriptedPolicy

    started = time.perf_counter()
    role_name = role or "engine"
    try:
        engine = build_engine(config)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return Outcome(role_name, backend, "FAIL", f"cannot load: {type(exc).__name__}: {exc}",
                       time.perf_counter() - started)
    load_s = time.perf_counter() - started
    try:
        if getattr(engine.policy, "guide", "absent") is None:
            engine.policy.guide = ScriptedPolicy()  # force the protocol through the real model
        started = time.perf_counter()
        result = engine.environment.run([EpisodeSpec(sample_image(), CATEGORY, DEFECT, seed=7)],
                                        engine.policy)[0]
        episode_s = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001
        detail = f"episode raised {type(exc).__name__}: {exc}"
        if os.environ.get("APPLIANCE_DEBUG"):
            detail += "\n" + traceback.format_exc()
        return Outcome(role_name, backend, "FAIL", detail, load_s)
    finally:
        engine.close()
    problems = []
    if result.status == "failed":
        problems.append(f"episode failed ({result.end_reason})")
    tool = TOOL_OF_ROLE.get(role or "")
    if tool:
        if tool not in result.tool_sequence:
            problems.append(f"{tool} never ran successfully")
        problems += [f"{tool} error: {e}" for e in _tool_errors(result.messages, tool)]
    if problems:
        return Outcome(role_name, backend, "FAIL", "; ".join(problems), load_s, episode_s)
    detail = f"{result.status}, {result.turns} turns, {len(result.attempts)} attempt(s)"
    guided = sorted({name for name in (result.policy, *result.backends.values()) if "guided by" in name})
    if guided:
        detail += f"; guided (forced decoding through the model): {', '.join(guided)}"
    if result.mask is not None and role == "mask_gen":
        detail += f", mask by {result.mask.method}"
    return Outcome(role_name, backend, "PASS", detail, load_s, episode_s)


def candidates(only: tuple[str, ...]) -> list[tuple[str, str]]:
    """(role, backend) for every registered backend except the CPU defaults."""
    from appliance.engine import BACKENDS, EngineConfig

    defaults = EngineConfig()
    found = [(role, name) for role, names in BACKENDS.items() for name in names
             if name != getattr(defaults, role)]
    if only:
        unknown = set(only) - {name for _, name in found}
        if unknown:
            raise click.BadParameter(f"not a registered backend: {', '.join(sorted(unknown))}",
                                     param_hint="--backend")
        found = [(role, name) for role, name in found if name in only]
    return found


def selftest(only: tuple[str, ...] = (), real: bool = False, keep: Path | None = None,
             models_dir: Path | None = None, echo=click.echo, episodes: int = 4) -> list[Outcome]:
    from appliance.engine import select_engine
    from appliance.models.manifest import missing_packages, model_for
    from appliance.models.tiny_models import PARTS, build_tiny_models

    outcomes: list[Outcome] = []
    todo = candidates(only)
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="appliance-selftest-"))
    kit = folder / "models"
    try:
        runnable = [(r, b) for r, b in todo if not missing_packages(b)]
        outcomes += [Outcome(r, b, "SKIP", f"needs {', '.join(missing_packages(b))}")
                     for r, b in todo if missing_packages(b)]
        parts = {KIT_PART.get(b, "qwen") for _, b in runnable}
        if any("llama" in b or "gguf" in b for _, b in runnable):
            parts.add("gguf")
        started = time.perf_counter()
        build_tiny_models(kit, parts=sorted(parts & set(PARTS)))
        echo(f"tiny model kit built in {time.perf_counter() - started:.1f} s ({kit})")
        saved = os.environ.get("APPLIANCE_MODELS")
        os.environ["APPLIANCE_MODELS"] = str(kit)  # for factories that read the environment
        try:
            if not only:
                outcome = run_episode(_config(kit, "selftest-cpu"), None, "cpu (defaults)")
                echo(outcome.line())
                outcomes.append(outcome)
            for role, backend in runnable:
                try:
                    model_for(kit, role, backend)
                except FileNotFoundError:
                    outcome = Outcome(role, backend, "SKIP", "the tiny kit has no model for it")
                else:
                    outcome = run_episode(_config(kit, f"selftest-{backend}", **{role: backend}),
                                          role, backend)
                echo(outcome.line())
                outcomes.append(outcome)
        finally:
            if saved is None:
                os.environ.pop("APPLIANCE_MODELS", None)
            else:
                os.environ["APPLIANCE_MODELS"] = saved
        for outcome in outcomes:
            if outcome.status == "SKIP" and outcome.detail.startswith("needs"):
                echo(outcome.line())
        if real:
            choice = select_engine(models_dir)
            if not any(pick.model for pick in choice.roles.values()):
                outcome = Outcome("engine", "installed", "SKIP",
                                  f"no models installed in {choice.models_dir}")
            else:
                echo(f"running {episodes} unguided episode(s) on the installed models ...")
                outcome, _ = run_real(choice.engine_config(), episodes)
            echo(outcome.line())
            outcomes.append(outcome)
    finally:
        if keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return outcomes


@click.command("selftest")
@click.option("--real", is_flag=True,
              help="Also run unguided episodes on the installed models and report how many "
                   "finished the protocol, the budget hits and the protocol errors.")
@click.option("--episodes", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Episodes for --real.")
@click.option("--backend", "only", multiple=True,
              help="Test only these backends (repeatable); default: every installed one.")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Build the tiny kit here and keep it (default: a temporary folder).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Installed models for --real (default: $APPLIANCE_MODELS).")
def selftest_command(real: bool, episodes: int, only: tuple[str, ...], keep: Path | None,
                     models_dir: Path | None) -> None:
    """Check every installed backend end to end on tiny random-weight models (guided: the
    machinery, not the model's judgement); with --real, how the installed models really do."""
    outcomes = selftest(only, real, keep, models_dir, episodes=episodes)
    failed = [o for o in outcomes if o.status == "FAIL"]
    passed = sum(o.status == "PASS" for o in outcomes)
    click.echo(f"{passed} passed, {len(failed)} failed, "
               f"{sum(o.status == 'SKIP' for o in outcomes)} skipped")
    if failed:
        raise SystemExit(1)
