"""`appliance batch --cluster`: a real local Ray cluster (a head and worker nodes of 1 CPU each,
token authentication on), the CPU engine, the real command line in a child process.

The dataset a cluster writes is compared with a single-box run of the same inbox and seed:
every image, mask and normal byte for byte, every record and trajectory field for field except
the ones that say when and how fast it ran (and where the inbox was).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, require_module
from PIL import Image

require_module("ray")  # the test extra includes the cluster extra

from ray._private.authentication_test_utils import reset_auth_token_state  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from appliance.cluster.auth import make_token  # noqa: E402
from appliance.storage.layout import DB_NAME  # noqa: E402

pytestmark = pytest.mark.slow

RUN_FIELDS = {"seconds", "batch", "created", "tool_seconds", "source"}
PHOTOS, DEFECTS = 12, 5  # 60 episodes
SIDE = 768  # large enough that a batch lasts long enough to lose a node in it


def appliance(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def batch_args(inbox: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", str(inbox), "--out", str(out), "--engine", "cpu", "--test-good-share", "0",
            "--no-progress", *extra]


def clean_env(**more: str) -> dict:
    """This process's environment without Ray's token settings (the command sets its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **more}


@pytest.fixture(scope="module")
def site(tmp_path_factory, tile_paths):
    root = tmp_path_factory.mktemp("cluster")
    inbox = root / "inbox" / "magnetic_tile"
    inbox.mkdir(parents=True)
    for path in tile_paths[:PHOTOS]:
        Image.open(path).convert("RGB").resize((SIDE, SIDE)).save(inbox / (path.stem + ".png"))
    token = make_token(root / "cluster-token")
    (root / "models").mkdir()
    reference = root / "single-box"
    single = appliance(*batch_args(inbox.parent, reference), env=clean_env())
    assert single.returncode == 0, single.stderr
    return {"root": root, "inbox": inbox.parent, "token": token, "reference": reference}


@pytest.fixture(scope="module")
def cluster(site):
    """A head that runs no engine (it holds the dataset) and two worker nodes of 1 CPU."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                                            "APPLIANCE_MODELS")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(site["token"]),
                      APPLIANCE_MODELS=str(site["root"] / "models"))
    reset_auth_token_state()  # Ray read its settings at import, before token mode was on
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_auth_token_state()


def dataset_digest(root: Path) -> dict[str, object]:
    """Every file of the dataset by relative path: the bytes' sha256, or for records the
    content without the fields that describe one particular run."""
    digest: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or relative.parts[0] in (".appliance", "batches", "contact_sheet") \
                or relative.name == "index.html":
            continue
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines()]
            digest[str(relative)] = sorted(
                json.dumps({k: v for k, v in r.items() if k not in RUN_FIELDS}, sort_keys=True)
                for r in records)
        elif path.name == "episode.json":
            episode = json.loads(path.read_text())
            digest[str(relative)] = {k: v for k, v in episode.items() if k not in RUN_FIELDS}
        else:
            digest[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def sample_hashes(root: Path) -> list[str]:
    """The images and masks of the samples by content (not by their numbers)."""
    records = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    return sorted(hashlib.sha256((root / r["image"]).read_bytes() + (root / r["mask"]).read_bytes())
                  .hexdigest() for r in records)


def store_counts(out: Path) -> tuple[dict[str, int], int, int]:
    """Episodes by status, samples written, and distinct episodes among those samples."""
    db = sqlite3.connect(f"file:{out / '.appliance' / DB_NAME}?mode=ro", uri=True, timeout=30)
    try:
        counts = dict(db.execute("select status, count(*) from episodes group by status"))
        written, distinct = db.execute("select count(*), count(distinct episode_id) from samples "
                                       "where status = 'ok'").fetchone()
    finally:
        db.close()
    return counts, written, distinct


def written_so_far(out: Path) -> int:
    try:
        return store_counts(out)[1]
    except sqlite3.Error:
        return 0


def assert_complete_and_exactly_once(out: Path, env: dict) -> None:
    counts, written, distinct = store_counts(out)
    assert sum(counts.values()) == PHOTOS * DEFECTS, counts
    assert set(counts) <= {"accepted", "rejected"}, counts
    assert written == distinct == counts["accepted"], (written, distinct, counts)
    records = (out / "manifest.jsonl").read_text().splitlines()
    assert len(records) == written
    check = appliance("dataset", "check", str(out), env=env)
    assert check.returncode == 0, check.stdout + check.stderr


def start_batch(site, cluster, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main",
         *batch_args(site["inbox"], out, "--cluster", cluster.address, "--token-file",
                     str(site["token"]), "--chunk", "2", *extra)],
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_samples(process: subprocess.Popen, out: Path, at_least: int) -> None:
    deadline = time.monotonic() + 300
    while written_so_far(out) < at_least:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no samples written in 5 minutes"
        time.sleep(0.2)


def test_cluster_batch_writes_each_episode_once_and_the_single_box_dataset(site, cluster):
    out = site["root"] / "home" / "dataset"
    result = appliance(*batch_args(site["inbox"], out, "--cluster", cluster.address,
                                   "--token-file", str(site["token"])), env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("1 engine(s), running") == 2, result.stderr
    assert_complete_and_exactly_once(out, clean_env())
    assert dataset_digest(out) == dataset_digest(site["reference"])
    # appliance status shows what each node did.
    status = appliance("status", "--json", env=clean_env(APPLIANCE_HOME=str(out.parent)))
    nodes = json.loads(status.stdout)["cluster"]
    assert sorted(n["episodes"] for n in nodes.values() if n["engines"]) != [0, 0]
    assert sum(n["episodes"] for n in nodes.values()) == PHOTOS * DEFECTS
    text = appliance("status", env=clean_env(APPLIANCE_HOME=str(out.parent))).stdout
    assert text.count("engine(s)") == 3, text  # the head (no room) and the two workers


def test_a_worker_node_lost_mid_batch_loses_nothing_and_duplicates_nothing(site, cluster):
    spare = cluster.add_node(num_cpus=1)  # the node to lose; two stay
    cluster.wait_for_nodes()
    out = site["root"] / "lost-node"
    process = start_batch(site, cluster, out)
    wait_for_samples(process, out, 4)
    cluster.remove_node(spare, allow_graceful=False)  # its raylet and workers killed at once
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    # The loss happened while it ran: its chunks moved (the node may be given up only later).
    assert "its chunks run on the other engines" in stderr, stderr
    assert_complete_and_exactly_once(out, clean_env())
    # Chunks that moved to another engine are written where they would have been.
    assert dataset_digest(out) == dataset_digest(site["reference"])


def engine_processes() -> set[int]:
    """Process ids of the engines' Ray actors on this machine."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in listing.splitlines()
            if "ray::EngineActor" in line and "ps -eo" not in line}


def test_an_engine_that_crashes_is_restarted_and_its_chunk_runs_again(site, cluster):
    out = site["root"] / "crashed-engine"
    process = start_batch(site, cluster, out)
    wait_for_samples(process, out, 4)
    engines = engine_processes()
    assert len(engines) == 2, engines
    os.kill(min(engines), signal.SIGKILL)  # the engine's own process; its node stays up
    restarted = set()
    while process.poll() is None and not restarted:
        restarted = engine_processes() - engines  # Ray starts it again, models and all
        time.sleep(0.1)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert restarted, "the engine was not restarted while the batch ran"
    assert "an engine was lost" not in stderr, stderr  # its node was not given up
    assert_complete_and_exactly_once(out, clean_env())
    assert dataset_digest(out) == dataset_digest(site["reference"])


def test_the_head_killed_mid_batch_resumes_exactly_once(site, cluster):
    out = site["root"] / "killed-head"
    process = start_batch(site, cluster, out)
    wait_for_samples(process, out, 6)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    done_before = written_so_far(out)
    assert 0 < done_before < PHOTOS * DEFECTS
    again = appliance(*batch_args(site["inbox"], out, "--cluster", cluster.address,
                                  "--token-file", str(site["token"])), env=clean_env())
    assert again.returncode == 0, again.stderr
    assert_complete_and_exactly_once(out, clean_env())
    # The same samples as the single box; the numbers of those after the kill may differ.
    assert sample_hashes(out) == sample_hashes(site["reference"])


def test_no_token_and_a_wrong_token_are_refused_clearly(site, cluster, tmp_path):
    missing = appliance(*batch_args(site["inbox"], tmp_path / "a", "--cluster", cluster.address,
                                    "--token-file", str(tmp_path / "none")), env=clean_env())
    assert missing.returncode != 0
    assert f"no cluster token at {tmp_path / 'none'}" in missing.stderr
    assert "appliance cluster token" in missing.stderr
    wrong = make_token(tmp_path / "other-token")
    refused = appliance(*batch_args(site["inbox"], tmp_path / "b", "--cluster", cluster.address,
                                    "--token-file", str(wrong)), env=clean_env(), timeout=180)
    assert refused.returncode != 0
    assert f"refused this box's token ({wrong})" in refused.stderr, refused.stderr
    loose = tmp_path / "loose-token"
    shutil.copy(site["token"], loose)
    loose.chmod(0o644)
    readable = appliance(*batch_args(site["inbox"], tmp_path / "c", "--cluster", cluster.address,
                                     "--token-file", str(loose)), env=clean_env())
    assert readable.returncode != 0 and "chmod 600" in readable.stderr
    for folder in ("a", "b", "c"):
        assert not (tmp_path / folder).exists()  # refused before anything was written


def test_a_node_with_a_different_bundle_is_refused_by_name(site, cluster, tmp_path):
    """The tiny MetaUAS bundle plays mask generation; one node's copy has one byte changed."""
    from appliance.models.tiny_models import build_tiny_models

    require_module("onnxruntime")
    models = site["root"] / "models"
    build_tiny_models(tmp_path / "bundle", parts=["metauas"])
    env = clean_env(APPLIANCE_MODELS=str(models))
    installed = appliance("models", "install", str(tmp_path / "bundle"), env=env)
    assert installed.returncode == 0, installed.stderr
    bad_models = tmp_path / "bad-models"
    shutil.copytree(models, bad_models)
    onnx = next(bad_models.rglob("*.onnx"))
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    os.environ["APPLIANCE_MODELS"] = str(bad_models)  # what the new node's processes see
    try:
        bad = cluster.add_node(num_cpus=1)
    finally:
        os.environ["APPLIANCE_MODELS"] = str(models)
    cluster.wait_for_nodes()
    inbox = tmp_path / "inbox" / "magnetic_tile"
    inbox.mkdir(parents=True)
    for path in sorted(site["inbox"].glob("*/*.png"))[:2]:
        Image.fromarray(np.asarray(Image.open(path))[::4, ::4]).save(inbox / path.name)
    try:
        result = appliance("batch", str(inbox.parent), "--out", str(tmp_path / "out"),
                           "--test-good-share", "0", "--no-progress", "--cluster",
                           cluster.address, "--token-file", str(site["token"]), env=env)
    finally:
        cluster.remove_node(bad)
    assert result.returncode == 0, result.stderr
    refusal = [line for line in result.stderr.splitlines() if line.startswith("cluster: ")]
    assert len(refusal) == 1, result.stderr
    assert f"node {bad.node_id[:8]}) refused: bundle metauas-tiny: metauas.onnx: sha256" \
        in refusal[0], refusal
    assert "refused" in result.stdout  # and in the summary
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text()
               .splitlines()]
    assert records and {r["backends"]["mask_gen"] for r in records} == {"metauas-onnx"}


def test_the_nightly_run_sends_its_episodes_to_the_cluster_in_the_config(site, cluster, tmp_path):
    home = tmp_path / "home"
    inbox = home / "inbox" / "magnetic_tile"
    inbox.mkdir(parents=True)
    for path in sorted(site["inbox"].glob("*/*.png"))[:2]:
        shutil.copy(path, inbox / path.name)
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nroot = "{home}"\n\n[engine]\nname = "cpu"\n\n'
                      f'[defaults]\ntest_good_share = 0.0\n\n'
                      f'[intake]\nsettle_seconds = 0.0\npoll_seconds = 0.2\n\n'
                      f'[cluster]\naddress = "{cluster.address}"\ntoken_file = "{site["token"]}"\n')
    env = clean_env(APPLIANCE_CONFIG=str(config))
    result = appliance("run", env=env)
    assert result.returncode == 0, result.stderr
    records = (home / "dataset" / "manifest.jsonl").read_text().splitlines()
    assert len(records) == 2 * DEFECTS
    status = json.loads(appliance("status", "--json", env=env).stdout)
    assert sum(node["episodes"] for node in status["cluster"].values()) == 2 * DEFECTS
    # A cluster that is not there (its head down): the photos are taken in, the work stays
    # queued, and the run ends with the temporary-failure status, saying why.
    for path in sorted(site["inbox"].glob("*/*.png"))[2:4]:
        shutil.copy(path, inbox / path.name)
    config.write_text(config.read_text().replace(cluster.address, "127.0.0.1:9"))
    down = appliance("run", env=env)
    assert down.returncode == 75, down.stderr
    assert "cluster: cannot join the Ray cluster at 127.0.0.1:9" in down.stderr
    status = json.loads(appliance("status", "--json", env=env).stdout)
    assert status["counts"]["queued"] == 2 * DEFECTS and "cannot join" in status["last_error"]
    # A missing token is the configuration's fault: refused before any work (EX_CONFIG).
    config.write_text(config.read_text().replace(str(site["token"]), str(tmp_path / "nothing")))
    refused = appliance("run", env=env)
    assert refused.returncode == 78 and "no cluster token at" in refused.stderr, refused.stderr


def test_grpo_rollouts_fan_out_to_the_engines_and_come_back_as_they_run_here(site, cluster,
                                                                              tmp_path):
    """`appliance retrain --cluster`: the trainer's current adapter goes to the nodes, each
    task's G rollouts run on an engine there, and the episodes come back token for token what
    the training box itself writes with the same weights and seeds."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model

    from appliance.cluster.rollouts import ClusterRollouts
    from appliance.cluster.runner import ClusterRunner
    from appliance.cluster.settings import ClusterSettings
    from appliance.engine import build_engine, resolve_engine_config
    from appliance.engine.registry import role_options, settings_and_guide
    from appliance.evaluation.data import LabeledImage
    from appliance.models.tiny_models import build_tiny_models
    from appliance.training.grpo import EpisodeRollouts
    from appliance.training.sft import LANGUAGE_LORA_TARGETS, load_base_model
    from appliance.training.stages import policy_model
    from appliance.training.trajectories import DefectExample
    from appliance.vlm.transformers_runtime import transformers_config

    models = tmp_path / "models"
    build_tiny_models(tmp_path / "bundle", parts=["qwen"])
    installed = appliance("models", "install", str(tmp_path / "bundle"),
                          env=clean_env(APPLIANCE_MODELS=str(models)))
    assert installed.returncode == 0, installed.stderr
    os.environ["APPLIANCE_MODELS"] = str(models)  # the policy bundle on the two new nodes
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    finally:
        os.environ["APPLIANCE_MODELS"] = str(site["root"] / "models")
    cluster.wait_for_nodes()

    config, _ = resolve_engine_config("auto", models_dir=models)
    entry, folder = policy_model(config)
    runtime_config, _ = transformers_config(folder, settings_and_guide(entry)[0])
    budget, _ = role_options(entry, "policy")
    engine = build_engine(config)
    blowholes = sorted((REPO.parent / "shared" / "datasets" / "magnetic-tile" / "MT_Blowhole"
                        / "Imgs").glob("*.jpg"))[:2]
    tasks = []
    for path in blowholes:
        image = np.asarray(Image.open(path).convert("RGB").resize((128, 128)))
        mask = np.asarray(Image.open(path.with_suffix(".png")).convert("L").resize((128, 128))) > 127
        normal = image.copy()
        normal[mask] = int(np.median(image[~mask]))
        tasks.append(DefectExample(f"blowhole/{path.stem}",
                                   LabeledImage(image, mask, "blowhole", str(path)), normal))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engines on the nodes run
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(folder, "cpu"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                      target_modules=LANGUAGE_LORA_TARGETS))
    trainer = SimpleNamespace(model=model, state=SimpleNamespace(global_step=3))
    inputs = [{"task": 0}, {"task": 0}, {"task": 1}, {"task": 1}]
    arguments = (engine.environment, tasks, "magnetic_tile", runtime_config, budget, 0)
    untrained = EpisodeRollouts(*arguments)(trainer, inputs)
    with torch.no_grad():  # a trained adapter: it changes what the policy writes
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    here = EpisodeRollouts(*arguments)(trainer, inputs)
    assert here[1] != untrained[1]
    adapter_copies = set(Path(tempfile.gettempdir()).glob("appliance-grpo-*"))
    runner = ClusterRunner(config, ClusterSettings(cluster.address, site["token"]))
    try:
        rollouts = ClusterRollouts(*arguments, runner=runner, bundle=entry.name)
        there = rollouts(trainer, inputs)
        # The next step: the nodes replace the adapter's weights in place.
        trainer.state.global_step = 4
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(-1.0)
        next_here = EpisodeRollouts(*arguments)(trainer, inputs)
        next_there = rollouts(trainer, inputs)
        tallies = runner.nodes()
    finally:
        runner.close()
        engine.close()  # its resident policy model is shared process-wide (other tests count them)
        torch.set_num_threads(threads)
        for node in nodes:
            cluster.remove_node(node)
    assert there[0] == here[0] and there[1] == here[1] and there[2] == here[2]
    assert next_here[1] != here[1] and next_there[1] == next_here[1]
    assert sorted(t["episodes"] for t in tallies.values() if t["state"] == "running") == [4, 4]
    refused = [t for t in tallies.values() if t["state"] == "refused"]
    assert len(refused) == 2  # the first two nodes lack the policy bundle
    # The nodes' engines were killed with their nodes: no copy of the adapter stays behind.
    assert set(Path(tempfile.gettempdir()).glob("appliance-grpo-*")) <= adapter_copies
