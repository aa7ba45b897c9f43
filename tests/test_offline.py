"""Offline by construction: a run opens no network socket; model files load only as tensors.

The socket guard is a ``sitecustomize`` module put first on the subprocess's path: every
connect, send or name lookup towards anything but an AF_UNIX socket is recorded and refused.
A library that swallowed the refusal would still leave its record behind.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

GUARD = textwrap.dedent("""
    import os, socket, traceback

    _LOG = os.environ["NETWORK_GUARD_LOG"]

    def _record(what):
        with open(_LOG, "a") as handle:
            handle.write(what + "\\n" + "".join(traceback.format_stack(limit=8)) + "\\n")

    def _guard(name):
        original = getattr(socket.socket, name)
        def guarded(self, *args, **kwargs):
            if self.family != socket.AF_UNIX:
                _record(f"socket.{name}{args!r} family={self.family!r}")
                raise OSError("network access refused by the test's guard")
            return original(self, *args, **kwargs)
        setattr(socket.socket, name, guarded)

    for _name in ("connect", "connect_ex", "sendto", "sendmsg", "bind"):
        _guard(_name)

    _getaddrinfo = socket.getaddrinfo
    def _lookup(host, *args, **kwargs):
        _record(f"getaddrinfo({host!r})")
        raise OSError("name lookup refused by the test's guard")
    socket.getaddrinfo = _lookup
""")


def make_inbox(folder: Path, count: int = 3) -> Path:
    from skimage import data

    brick = data.brick()
    category = folder / "magnetic_tile"
    category.mkdir(parents=True)
    (category / "spec.toml").write_text('defects = ["crack"]\n')
    for i in range(count):
        crop = brick[i * 40:i * 40 + 96, i * 30:i * 30 + 96]
        Image.fromarray(np.ascontiguousarray(crop)).save(category / f"p{i}.png")
    return folder


def guarded_run(args: list[str], tmp_path: Path, extra_env: dict | None = None):
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir(exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update({"PYTHONPATH": os.pathsep.join([str(guard_dir), env.get("PYTHONPATH", "")]),
                "NETWORK_GUARD_LOG": str(log), "PYTHONUNBUFFERED": "1", **(extra_env or {})})
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    return done, (log.read_text() if log.exists() else "")


def test_the_guard_itself_catches_a_connection(tmp_path):
    done, log = guarded_run(["-c", "import socket; socket.create_connection(('192.0.2.1', 80), 1)"],
                            tmp_path)
    assert done.returncode != 0 and "getaddrinfo('192.0.2.1')" in log


def test_a_batch_opens_no_network_socket(tmp_path):
    inbox = make_inbox(tmp_path / "inbox")
    done, log = guarded_run(["-m", "appliance.cli.main", "batch", str(inbox), "--out",
                             str(tmp_path / "ds"), "--no-progress", "--max-attempts", "2"],
                            tmp_path)
    assert done.returncode == 0, done.stderr
    assert "samples written" in done.stdout
    assert log == "", log


def test_the_service_run_opens_no_network_socket(tmp_path):
    make_inbox(tmp_path / "inbox")
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nroot = "{tmp_path}"\n[intake]\npoll_seconds = 0.1\n'
                      f'settle_seconds = 0\n[service]\nmin_free_mb = 1\n')
    done, log = guarded_run(["-m", "appliance.cli.service_commands", "run"], tmp_path,
                            {"APPLIANCE_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr
    assert "samples written" in done.stdout
    assert log == "", log


def test_a_batch_runs_in_a_namespace_without_network(tmp_path):
    """The strongest form: no network interface at all (needs unshare and the privilege)."""
    unshare = shutil.which("unshare")
    # -n needs CAP_SYS_ADMIN; -rn gets it inside a user namespace where those are allowed.
    flags = next((f for f in ("-n", "-rn") if unshare is not None
                  and subprocess.run([unshare, f, "true"], capture_output=True).returncode == 0), None)
    if flags is None:
        pytest.skip("cannot create a network namespace here (unshare -n or -rn)")
    inbox = make_inbox(tmp_path / "inbox", count=2)
    done = subprocess.run([unshare, flags, sys.executable, "-m", "appliance.cli.main", "batch",
                           str(inbox), "--out", str(tmp_path / "ds"), "--no-progress",
                           "--max-attempts", "1"], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr


# Model files: tensors only ----------------------------------------------------------------------

UNSAFE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("cPickle", "load"), ("dill", "load"),
    ("joblib", "load"), ("marshal", "loads"), ("jit", "load"), ("torch.jit", "load"),
}


def _unsafe_loads(path: Path) -> list[str]:
    """Calls in one source file that could run code hidden in a model file."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = ast.unparse(func)
        keywords = {k.arg: k.value for k in node.keywords}
        where = f"{path.relative_to(REPO)}:{node.lineno}: {name}"
        if name in ("torch.load",) or name.endswith(".torch.load"):
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where} without weights_only=True")
        elif isinstance(func, ast.Attribute) and isinstance(func.value, (ast.Name, ast.Attribute)):
            owner = ast.unparse(func.value)
            if (owner, func.attr) in UNSAFE_CALLS:
                found.append(where)
            if (owner in ("np", "numpy") and func.attr == "load"
                    and isinstance(keywords.get("allow_pickle"), ast.Constant)
                    and keywords["allow_pickle"].value):
                found.append(f"{where} with allow_pickle=True")
        flag = keywords.get("trust_remote_code")
        if isinstance(flag, ast.Constant) and flag.value is True:
            found.append(f"{where} with trust_remote_code=True")
    return found


def test_no_code_path_unpickles_model_files():
    problems = []
    # The vendored llama.cpp converter runs in our processes too (third_party/llama_cpp_convert:
    # PATCHES.md records the trust_remote_code lines we turned off).
    for folder in ("appliance", "third_party"):
        for path in sorted((REPO / folder).rglob("*.py")):
            problems += _unsafe_loads(path)
    assert problems == []


def test_the_scan_would_catch_an_unsafe_load(tmp_path):
    sample = REPO / "appliance" / "_scan_probe_tmp.py"
    try:
        sample.write_text("import torch, pickle\ntorch.load('m.pt')\npickle.load(open('x', 'rb'))\n"
                          "torch.load('m.pt', weights_only=False)\n")
        assert len(_unsafe_loads(sample)) == 3
    finally:
        sample.unlink()


def test_a_pickled_payload_is_refused_at_run_time(tmp_path):
    """Even a library asking torch.load for a full unpickle gets the weights-only loader."""
    script = textwrap.dedent(f"""
        import pickle, torch
        import appliance  # sets TORCH_FORCE_WEIGHTS_ONLY_LOAD before torch is used
        class Payload:
            def __reduce__(self):
                return (print, ("code ran",))
        torch.save({{"w": torch.zeros(2), "x": Payload()}}, {str(tmp_path / 'm.pt')!r})
        try:
            torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)
        except pickle.UnpicklingError as exc:
            print("refused")
        torch.save({{"w": torch.ones(2)}}, {str(tmp_path / 'ok.pt')!r})
        print("tensors", float(torch.load({str(tmp_path / 'ok.pt')!r})["w"].sum()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_WEIGHTS_ONLY_LOAD"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "refused" in done.stdout and "code ran" not in done.stdout
    assert "tensors 2.0" in done.stdout


def test_the_bundled_embedder_is_read_from_safetensors():
    from appliance.tools.knowledge.embedder import bundled_model_path, weights_file

    # The file that is fingerprinted...
    assert weights_file(bundled_model_path()).suffix == ".safetensors"
    # ...and what loading the embedder actually reads: torch.load (a pickle weight file) is never
    # called, and the model still encodes.
    script = textwrap.dedent("""
        import torch
        def refuse(*args, **kwargs):
            raise AssertionError("torch.load called: a pickle weight file was read")
        torch.load = refuse
        from appliance.tools.knowledge.embedder import load_embedder
        print("dim", load_embedder().encode(["a crack on a tile"]).shape[1])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "dim 384" in done.stdout


@pytest.mark.parametrize("debug, shown", [("", False), ("1", True)])
def test_hub_libraries_stay_quiet_unless_debugging(debug, shown):
    """bitsandbytes and the kernels package warn that they could not reach the Hub (they must
    not); a batch's console shows that only with APPLIANCE_DEBUG=1."""
    code = ("import logging, appliance\n"
            "logging.basicConfig()\n"
            "logging.getLogger('kernels._internals.hf_hub').warning('Skipping publisher trust check')\n"
            "logging.getLogger('bitsandbytes.cextension').warning('could not fetch a kernel')\n")
    env = {**os.environ, "APPLIANCE_DEBUG": debug}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert ("Skipping publisher trust check" in done.stderr) is shown
    assert ("could not fetch a kernel" in done.stderr) is shown


def test_hub_kernels_are_off_even_where_the_operator_turned_them_on():
    """transformers swaps layers for Hub kernels when `kernels` is installed; on CUDA that is a
    download, and offline it failed every NF4 load on an H200 (bench/RESULTS.md)."""
    code = ("import appliance\n"
            "from transformers.integrations.hub_kernels import _kernels_enabled\n"
            "print(_kernels_enabled())\n")
    env = {**os.environ, "USE_HUB_KERNELS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
