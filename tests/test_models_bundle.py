"""Model manifest, bundles (pull/install/verify), `appliance models` and `appliance selftest`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_module

from appliance.engine import select_engine
from appliance.models.bundle import BundleError, install, pull, recover, verify
from appliance.models.manifest import (
    UNKNOWN,
    FileEntry,
    Manifest,
    ManifestError,
    ModelEntry,
    catalogue_path,
    load_manifest,
    parse_manifest,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its sha256: the whole installed state."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_bundle(folder: Path, models: dict[str, dict[str, bytes]]) -> Path:
    """A bundle of small models (real files, real hashes) serving a made-up mask backend."""
    entries = []
    for name, files in models.items():
        listed = []
        for relative, data in files.items():
            path = folder / name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            listed.append(FileEntry(relative, hashlib.sha256(data).hexdigest(), len(data)))
        entries.append(ModelEntry(name=name, repo=f"test/{name}", revision="0" * 40, licence="MIT",
                                  format="onnx", backends={"mask_gen": "metauas-onnx"},
                                  files=tuple(listed)))
    write_manifest(Manifest(entries, bundle={"kind": "test"}), folder)
    return folder


def _payload(seed: int, size: int = 50_000) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.fixture
def installed(tmp_path):
    bundle = make_bundle(tmp_path / "bundle-1", {
        "alpha": {"weights.bin": _payload(1), "config/settings.json": b'{"a": 1}'},
        "beta": {"model.onnx": _payload(2)}})
    models = tmp_path / "models"
    report = install(bundle, models)
    assert report.installed == ["alpha", "beta"] and report.files == 3
    return models


def test_install_verifies_and_lists_every_file(installed):
    assert verify(installed) == []
    manifest = load_manifest(installed)
    assert [m.name for m in manifest.models] == ["alpha", "beta"]
    assert "installed" in manifest.bundle


def test_one_flipped_byte_is_refused_and_nothing_changes(installed, tmp_path):
    before = _tree(installed)
    bundle = make_bundle(tmp_path / "bundle-2", {"alpha": {"weights.bin": _payload(3),
                                                           "config/settings.json": b'{"a": 2}'}})
    target = bundle / "alpha" / "weights.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        install(bundle, installed)
    assert _tree(installed) == before
    assert not list(tmp_path.glob(".models.*")), "a staging folder was left behind"
    assert verify(installed) == []


def test_a_new_bundle_replaces_its_models_and_keeps_the_others(installed, tmp_path):
    bundle = make_bundle(tmp_path / "bundle-3", {"alpha": {"weights.bin": _payload(4)}})
    report = install(bundle, installed)
    assert report.installed == ["alpha"] and report.kept == ["beta"]
    manifest = load_manifest(installed)
    assert [m.name for m in manifest.models] == ["alpha", "beta"]
    assert (installed / "alpha" / "weights.bin").read_bytes() == _payload(4)
    assert not (installed / "alpha" / "config").exists()
    assert verify(installed) == []


def test_unsafe_or_unfinished_manifests_are_refused(tmp_path, installed):
    text = (f'schema = 1\n[[models]]\nname = "evil"\nrepo = "x/y"\nrevision = "r"\nlicence = "MIT"\n'
            f'format = "onnx"\nbackends = {{ mask_gen = "metauas-onnx" }}\n[[models.files]]\n'
            f'path = "../../etc/passwd"\nsha256 = "{"0" * 64}"\nsize = 1\n')
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "manifest.toml").write_text(text)
    with pytest.raises(BundleError, match="unsafe file path"):
        install(tmp_path / "evil", installed)
    # A catalogue-style bundle (hashes not filled in) is not installable either.
    import tomllib

    catalogue = tomllib.loads(catalogue_path().read_text())
    (tmp_path / "unpulled").mkdir()
    (tmp_path / "unpulled" / "manifest.toml").write_text(catalogue_path().read_text())
    with pytest.raises(BundleError, match=UNKNOWN):
        install(tmp_path / "unpulled", installed)
    assert parse_manifest(catalogue).models  # the catalogue itself is valid


def test_never_installs_over_a_folder_that_is_not_a_models_folder(tmp_path):
    bundle = make_bundle(tmp_path / "bundle", {"alpha": {"w.bin": _payload(5)}})
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a models folder"):
        install(bundle, home)
    assert (home / "notes.txt").read_text() == "mine"


def test_recover_restores_an_interrupted_swap(installed):
    before = _tree(installed)
    previous = installed.with_name(f".{installed.name}.previous")
    os.rename(installed, previous)  # as if the process died between the two renames
    recover(installed)
    assert _tree(installed) == before and not previous.exists()


def test_catalogue_names_registered_backends_and_unknown_hashes():
    from appliance.engine import BACKENDS

    manifest = load_manifest(catalogue_path())
    roles = {role for entry in manifest.models for role in entry.roles}
    assert {"policy", "prompt_gen", "quality_eval", "image_gen", "mask_gen"} <= roles
    for entry in manifest.models:
        for role, backend in entry.backends.items():
            assert backend in BACKENDS[role], f"{entry.name}: {role} backend {backend!r}"
        assert entry.files and not entry.verifiable  # filled in by the pull, not by hand
    import tomllib

    data = tomllib.loads(catalogue_path().read_text())
    data["models"].append(data["models"][0])
    with pytest.raises(ManifestError, match="duplicate"):
        parse_manifest(data)


def fake_hub(commit: str):
    """A stand-in for ``huggingface_hub.HfApi`` whose every repo is at ``commit``."""

    class FakeApi:
        def __init__(self, token=None):
            pass

        def repo_info(self, repo, repo_type="model", revision=None):
            return type("Info", (), {"sha": commit})()

    return FakeApi


def test_pull_pins_the_revision_and_hashes_what_it_got(tmp_path, monkeypatch):
    """``pull`` against a stand-in Hub (no network here): revision, hashes, expected files."""
    import huggingface_hub

    calls = []

    def fake_snapshot(repo, repo_type="model", revision=None, allow_patterns=None, local_dir=None,
                      token=None):
        assert os.environ["HF_HUB_OFFLINE"] == "0", "pull must lift offline mode for itself"
        calls.append((repo, revision, tuple(allow_patterns)))
        Path(local_dir, "sub").mkdir(parents=True, exist_ok=True)
        Path(local_dir, "model_index.json").write_text("{}")
        Path(local_dir, "sub", "weights.safetensors").write_bytes(_payload(6))
        Path(local_dir, ".cache", "huggingface").mkdir(parents=True, exist_ok=True)
        Path(local_dir, ".cache", "huggingface", "meta").write_text("x")
        return local_dir

    monkeypatch.setattr(huggingface_hub, "HfApi", fake_hub("c0ffee" * 6 + "abcd"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    catalogue = tmp_path / "catalogue.toml"
    catalogue.write_text(
        'schema = 1\n[[models]]\nname = "inpaint"\nrepo = "org/inpaint"\nrevision = "main"\n'
        'licence = "MIT"\nformat = "diffusers"\nbackends = { image_gen = "sdxl-inpaint" }\n'
        'include = ["model_index.json", "*/*.safetensors"]\n[[models.files]]\n'
        f'path = "model_index.json"\nsha256 = "{UNKNOWN}"\nsize = "{UNKNOWN}"\n')
    manifest = pull(catalogue, tmp_path / "bundle")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert calls == [("org/inpaint", "c0ffee" * 6 + "abcd", ("model_index.json", "*/*.safetensors"))]
    entry = manifest.models[0]
    assert entry.revision.startswith("c0ffee") and entry.verifiable
    assert [f.path for f in entry.files] == ["model_index.json", "sub/weights.safetensors"]
    assert verify(tmp_path / "bundle") == []
    install(tmp_path / "bundle", tmp_path / "models")  # and the box accepts it
    assert verify(tmp_path / "models") == []


def test_pull_refuses_a_checkpoint_that_is_not_the_published_one(tmp_path, monkeypatch):
    import huggingface_hub

    from appliance.models.bundle import BundleError

    def fake_snapshot(repo, repo_type="model", revision=None, allow_patterns=None, local_dir=None,
                      token=None):
        Path(local_dir, "weights").mkdir(parents=True, exist_ok=True)
        Path(local_dir, "weights", "metauas-256.ckpt").write_bytes(_payload(3))
        return local_dir

    monkeypatch.setattr(huggingface_hub, "HfApi", fake_hub("beef" * 10))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    catalogue = tmp_path / "catalogue.toml"
    catalogue.write_text(
        'schema = 1\n[[models]]\nname = "metauas-256"\nrepo = "org/metauas"\nrepo_type = "space"\n'
        'revision = "main"\nlicence = "MIT"\nformat = "onnx"\nbackends = { mask_gen = "metauas-onnx" }\n'
        'include = ["weights/metauas-256.ckpt"]\nexport = "metauas-onnx"\n'
        f'source = {{ checkpoint_lfs_sha256 = "{"ab" * 32}" }}\n[[models.files]]\n'
        f'path = "metauas.onnx"\nsha256 = "{UNKNOWN}"\nsize = "{UNKNOWN}"\n')
    with pytest.raises(BundleError, match="the catalogue expects abababab"):
        pull(catalogue, tmp_path / "bundle")
    assert not (tmp_path / "bundle" / "manifest.toml").exists()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    require_module("diffusers")
    require_module("onnxruntime")
    import torch

    from appliance.models.tiny_models import build_tiny_models

    folder = tmp_path_factory.mktemp("tiny") / "models"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_tiny_models(folder, parts=["sdxl", "metauas"])
    finally:
        torch.set_num_threads(threads)
    return folder


def test_models_list_and_verify_commands(tiny_models, tmp_path):
    from appliance.cli.models_command import models_group

    runner = CliRunner()
    listed = runner.invoke(models_group, ["list", "--models-dir", str(tiny_models)])
    assert listed.exit_code == 0, listed.output
    assert "sdxl-inpaint-tiny" in listed.output and "metauas-tiny" in listed.output
    assert "engine that will run: auto" in listed.output
    lines = {line.split()[0]: line for line in listed.output.splitlines()[1:] if line.startswith("  ")
             and line.split()[0] in ("image_gen", "mask_gen", "policy")}
    assert "sdxl-inpaint" in lines["image_gen"] and "sdxl-inpaint-tiny is installed" in lines["image_gen"]
    assert "metauas-onnx" in lines["mask_gen"]
    assert "scripted" in lines["policy"] and "CPU default" in lines["policy"]
    choice = select_engine(tiny_models)
    assert choice.backend_names()["image_gen"] == "sdxl-inpaint"
    assert choice.engine_config().models_dir == tiny_models

    ok = runner.invoke(models_group, ["verify", "--models-dir", str(tiny_models)])
    assert ok.exit_code == 0 and "match their sha256" in ok.output
    # A copy with one flipped byte fails verification and says where.
    broken = tmp_path / "broken"
    install(tiny_models, broken)
    onnx = broken / "metauas-tiny" / "metauas.onnx"
    data = bytearray(onnx.read_bytes())
    data[100] ^= 0x80
    onnx.write_bytes(bytes(data))
    bad = runner.invoke(models_group, ["verify", "--models-dir", str(broken)])
    assert bad.exit_code == 1 and "metauas-tiny/metauas.onnx" in bad.output
    empty = runner.invoke(models_group, ["list", "--models-dir", str(tmp_path / "none")])
    assert "no models installed" in empty.output and "engine that will run: cpu" in empty.output


def test_selftest_runs_each_backend_end_to_end(tmp_path):
    require_module("diffusers")
    require_module("onnxruntime")
    from appliance.cli.main import cli

    assert "selftest" in cli.commands, "appliance/cli/main.py must register `appliance selftest`"
    args = ["selftest", "--backend", "sdxl-inpaint", "--backend", "metauas-onnx"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "APPLIANCE_MODELS": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-m", "appliance.cli.main", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout
    assert done.returncode == 0, output + done.stderr
    assert "PASS  image_gen    sdxl-inpaint" in output
    assert "PASS  mask_gen     metauas-onnx" in output
    assert "2 passed, 0 failed" in output
