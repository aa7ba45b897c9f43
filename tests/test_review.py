"""`appliance review` over real HTTP, decisions in the real store, `appliance export`, and the
test/good layout that anomalib's readers need."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from _review import HOSTILE_CATEGORY, ReviewServer
from appliance.dataset.check import check_dataset
from appliance.storage import JobStore
from appliance.storage.reviews import ReviewError, ReviewLog
from conftest import REPO


@pytest.fixture(scope="module")
def dataset(review_workspace) -> Path:
    return review_workspace / "dataset"


@pytest.fixture(scope="module")
def server(dataset):
    running = ReviewServer(dataset)
    yield running
    running.stop()


def _samples(dataset: Path) -> list[dict]:
    store = JobStore.for_dataset(dataset)
    try:
        return store.samples("ok")
    finally:
        store.close()


# test/good -------------------------------------------------------------------------------------

def test_a_share_of_normals_is_held_back_in_test_good_and_never_edited(dataset):
    good = sorted((dataset / "magnetic_tile" / "test" / "good").glob("*.png"))
    assert [p.name for p in good] == ["004.png"]  # the fifth photo at the default share 0.1
    normals = [json.loads(line) for line in (dataset / "normals.jsonl").read_text().splitlines()]
    held = [n for n in normals if n["split"] == "test"]
    assert [n["path"] for n in held] == ["magnetic_tile/test/good/004.png"]
    sources = {json.loads(r["record"])["source_sha256"] for r in _samples(dataset)}
    assert held[0]["source_sha256"] not in sources
    store = JobStore.for_dataset(dataset)
    try:
        assert not store.db.execute("select 1 from episodes where sha256 = ?",
                                    [held[0]["source_sha256"]]).fetchone()
    finally:
        store.close()
    report = check_dataset(dataset)
    assert report.ok, report.problems
    assert report.test_good == 1
    # The hostile category has 4 photos: number 4 is never reached, so it has no test/good,
    # and the check says so as a warning (not a failure).
    assert any(HOSTILE_CATEGORY in w and "test/good" in w for w in report.warnings)


def test_anomalib_mvtec_rules_hold(dataset):
    """What anomalib 2.x's ``make_mvtec_ad_dataset`` does with the folders, step by step: every
    PNG two levels below the category is (split, label, file); masks are the ground_truth rows;
    abnormal test rows and masks, both sorted by path, pair by position and the image's stem
    must be in the mask's."""
    category = dataset / "magnetic_tile"
    rows = sorted((str(p), *p.relative_to(category).parts) for p in category.glob("**/*")
                  if p.suffix in (".png", ".PNG"))
    assert all(len(r) == 4 for r in rows), "every image sits at split/label/file"
    samples = [r for r in rows if r[1] != "ground_truth"]
    masks = [r for r in rows if r[1] == "ground_truth"]
    train_labels = {label for _, split, label, _ in samples if split == "train"}
    test_labels = {label for _, split, label, _ in samples if split == "test"}
    assert train_labels == {"good"}
    assert "good" in test_labels and test_labels - {"good"}, "test needs both labels"
    abnormal = [r for r in samples if r[1] == "test" and r[2] != "good"]
    assert len(abnormal) == len(masks)
    for image, mask in zip(abnormal, masks):
        assert Path(image[0]).stem in Path(mask[0]).stem and image[2] == mask[2]


def test_check_refuses_a_test_photo_that_is_also_trained_on(dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    shutil.copy(copy / "magnetic_tile" / "train" / "good" / "000.png",
                copy / "magnetic_tile" / "test" / "good" / "009.png")
    report = check_dataset(copy)
    assert any("009.png" in p and "train/good" in p for p in report.problems), report.problems


# The review log --------------------------------------------------------------------------------

def test_a_bulk_decision_is_all_or_nothing(dataset):
    store = JobStore.for_dataset(dataset)
    try:
        log = ReviewLog(store)
        before = store.db.execute("select count(*) from reviews").fetchone()[0]
        first = store.samples("ok")[0]["id"]
        with pytest.raises(ReviewError, match="no written sample with id 999999"):
            log.decide([first, 999999], "approved", "tester")
        with pytest.raises(ReviewError, match="reason is empty"):
            log.decide([first], "rejected", "tester")
        with pytest.raises(ReviewError, match="do not print"):
            log.decide([first], "rejected", "tester", "bad\u202ereason")
        with pytest.raises(ReviewError, match="decision must be"):
            log.decide([first], "maybe", "tester")
        assert store.db.execute("select count(*) from reviews").fetchone()[0] == before
    finally:
        store.close()


# The server ------------------------------------------------------------------------------------

def test_every_request_needs_the_token(server):
    status, _, body = server.request("GET", "/", cookie=False)
    assert status == 403 and b"token" in body
    assert server.request("GET", "/api/items", cookie=False)[0] == 403
    assert server.request("GET", "/static/review.js", cookie=False)[0] == 403
    assert server.request("GET", "/?token=wrong", cookie=False)[0] == 403
    wrong = {"Cookie": f"appliance_review_{server.port}=wrong"}
    assert server.request("GET", "/", headers=wrong, cookie=False)[0] == 403
    status, headers, _ = server.request("GET", f"/?token={server.token}", cookie=False)
    assert status == 302 and headers["Location"].endswith("/")  # the token leaves the URL
    cookie = headers["Set-Cookie"]
    assert server.token in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, headers, page = server.request("GET", "/")
    assert status == 200 and b'name="csrf-token"' in page
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_a_foreign_host_name_is_refused(server):
    status, _, _ = server.request("GET", "/", headers={"Host": "attacker.example"})
    assert status == 400


@pytest.mark.parametrize("path", [
    "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/file/s1/../../../etc/passwd",
    "/file/..%2f..%2f..%2fetc%2fpasswd/image", "/file/s1/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2f..%2f..%2fetc%2fpasswd", "/file/s1/trajectory/..%2f..%2f..",
    "/file/e1/image", "/file/s99999/image", "/file/x1/image", "/file/s1/manifest",
    "/file/s-1/image", "/file/s1/trajectory/999",
])
def test_files_only_by_id(server, path):
    status, _, body = server.request("GET", path)
    assert status == 404, (path, status)
    assert b"root:" not in body


def test_files_are_the_datasets_own(server, dataset):
    sample = _samples(dataset)[0]
    status, headers, body = server.request("GET", f"/file/s{sample['id']}/image")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body == (dataset / sample["image"]).read_bytes()
    status, _, body = server.request("GET", f"/file/s{sample['id']}/mask")
    assert body == (dataset / sample["mask"]).read_bytes()
    status, _, thumb = server.request("GET", f"/file/s{sample['id']}/image?thumb=1")
    assert status == 200 and thumb.startswith(b"\x89PNG")
    status, _, body = server.request("GET", f"/file/s{sample['id']}/trajectory/1")
    assert status == 200 and body.startswith(b"\x89PNG")


def test_filters_sort_and_pages(server, dataset):
    everything = server.get_json("/api/items?per_page=200")
    samples = [i for i in everything["items"] if i["kind"] == "sample"]
    episodes = [i for i in everything["items"] if i["kind"] == "episode"]
    assert len(samples) == len(_samples(dataset)) and episodes
    assert everything["facets"]["categories"] == sorted(["magnetic_tile", HOSTILE_CATEGORY])
    crack = server.get_json("/api/items?category=magnetic_tile&defect=crack&per_page=200")
    assert crack["total"] == 5
    assert {(i["category"], i["defect"]) for i in crack["items"]} == {("magnetic_tile", "crack")}
    rejected = server.get_json("/api/items?verdict=rejected")
    assert rejected["total"] >= 1 and all(i["reason"] for i in rejected["items"])
    by_score = server.get_json("/api/items?verdict=accepted&sort=score&order=asc&per_page=200")
    scores = [i["score"] for i in by_score["items"]]
    assert scores == sorted(scores)
    by_area = server.get_json("/api/items?verdict=accepted&sort=area&order=desc&per_page=200")
    areas = [i["area"] for i in by_area["items"]]
    assert areas == sorted(areas, reverse=True)
    high = server.get_json("/api/items?min_score=9.5&per_page=200")
    assert all(i["score"] >= 9.5 for i in high["items"])
    first, second = (server.get_json(f"/api/items?per_page=5&page={n}") for n in (1, 2))
    assert first["total"] == everything["total"] and len(first["items"]) == 5
    assert not {i["id"] for i in first["items"]} & {i["id"] for i in second["items"]}
    nonsense = server.get_json("/api/items?page=-4&per_page=100000&min_score=nan&sort=x")
    assert nonsense["page"] == 1 and nonsense["per_page"] == 200


def test_detail_of_a_sample_and_of_a_rejected_episode(server):
    items = server.get_json("/api/items?per_page=200")["items"]
    sample = next(i for i in items if i["kind"] == "sample")
    detail = server.get_json(f"/api/items/{sample['id']}")
    assert detail["record"]["prompt"] and detail["files"]["normal"]
    assert detail["attempts"] and detail["steps"][0]["role"] == "system"
    assert any(step["images"] for step in detail["steps"])
    assert detail["provenance"]["policy"] == "scripted"
    episode = next(i for i in items if i["kind"] == "episode")
    detail = server.get_json(f"/api/items/{episode['id']}")
    assert detail["verdict"] in ("rejected", "failed") and detail["record"]["reason"]
    assert detail["files"]["image"] is None and detail["files"]["normal"]
    assert server.request("GET", detail["files"]["normal"])[0] == 200
    assert server.request("GET", "/api/items/s99999")[0] == 404


def test_decisions_need_post_json_and_the_csrf_token(server, dataset):
    sample = _samples(dataset)[0]
    body = {"ids": [f"s{sample['id']}"], "decision": "approved"}
    assert server.post_json("/api/reviews", body, csrf=None)[0] == 403
    assert server.post_json("/api/reviews", body, csrf="forged")[0] == 403
    csrf = server.csrf()
    status, _, _ = server.request("POST", "/api/reviews", b"ids=1&decision=approved",
                                  {"Content-Type": "application/x-www-form-urlencoded",
                                   "X-CSRF-Token": csrf})
    assert status == 415
    assert server.request("GET", "/api/reviews")[0] == 405
    assert server.request("DELETE", "/api/items/s1", headers={"X-CSRF-Token": csrf})[0] == 405
    status, answer = server.post_json("/api/reviews", {**body, "ids": ["s99999"]}, csrf)
    assert status == 400 and "99999" in answer["error"]


def test_decisions_land_in_the_store_and_in_status(server, review_workspace, dataset):
    samples = _samples(dataset)
    csrf = server.csrf()
    hostile = "<img src=x onerror=alert(1)> & 'quoted'"
    status, answer = server.post_json("/api/reviews", {
        "ids": [f"s{samples[0]['id']}", f"s{samples[1]['id']}"], "decision": "approved",
        "reviewer": "anna"}, csrf)
    assert status == 200 and answer["recorded"] == 2
    status, answer = server.post_json("/api/reviews", {
        "ids": [f"s{samples[2]['id']}"], "decision": "rejected", "reason": hostile,
        "reviewer": "<script>bob</script>"}, csrf)
    assert status == 200
    # Another process (the CLI, or the page after a reload) sees them at once.
    db = sqlite3.connect(dataset / ".appliance" / "jobs.db")
    rows = db.execute("select sample_id, decision, reason, reviewer from reviews order by id").fetchall()
    db.close()
    assert (samples[2]["id"], "rejected", hostile, "<script>bob</script>") in rows
    detail = server.get_json(f"/api/items/s{samples[2]['id']}")
    assert detail["history"][-1]["reason"] == hostile
    approved = server.get_json("/api/items?review=approved&per_page=200")
    assert {i["id"] for i in approved["items"]} >= {f"s{samples[0]['id']}", f"s{samples[1]['id']}"}
    done = subprocess.run([sys.executable, "-m", "appliance.cli.main", "status"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k != "APPLIANCE_CONFIG"},
                               "APPLIANCE_HOME": str(review_workspace)})
    assert done.returncode == 0, done.stderr
    assert "review      2 approved, 1 rejected" in done.stdout, done.stdout


def test_remote_binding_needs_a_flag(dataset):
    done = subprocess.run([sys.executable, "-m", "appliance.cli.main", "review", str(dataset),
                           "--host", "0.0.0.0", "--port", "0"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "--allow-remote" in done.stderr
    remote = ReviewServer(dataset, "--host", "0.0.0.0", "--allow-remote")
    try:
        assert "WARNING" in remote.process.stderr.readline()
        assert remote.request("GET", "/", headers={"Host": f"10.1.2.3:{remote.port}"})[0] == 200
    finally:
        remote.stop()


# Export ----------------------------------------------------------------------------------------

def test_export_writes_approved_samples_and_the_feedback(server, dataset, tmp_path):
    csrf = server.csrf()
    samples = _samples(dataset)
    server.post_json("/api/reviews", {"ids": [f"s{samples[3]['id']}"], "decision": "approved",
                                      "reviewer": "anna"}, csrf)
    server.post_json("/api/reviews", {"ids": [f"s{samples[3]['id']}"], "decision": "rejected",
                                      "reason": "too large", "reviewer": "anna"}, csrf)
    store = JobStore.for_dataset(dataset)
    try:
        states = {i: r["decision"] for i, r in ReviewLog(store).latest().items()}
    finally:
        store.close()
    approved = sorted(i for i, d in states.items() if d == "approved")
    rejected = sorted(i for i, d in states.items() if d == "rejected")
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "appliance.cli.main", "export", str(dataset),
                           str(out), "--approved"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"exported {len(approved)} samples" in done.stdout
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == len(approved)
    assert all(r["human_review"]["decision"] == "approved" for r in records)
    assert sorted((out / "magnetic_tile" / "test" / "good").glob("*.png"))
    feedback = [json.loads(line) for line in (out / "review_feedback.jsonl").read_text().splitlines()]
    assert len(feedback) == len(rejected)
    assert {f["human_review"]["reason"] for f in feedback} >= {"too large"}
    assert all((out / f["image"]).is_file() and (out / f["mask"]).is_file() for f in feedback)
    report = check_dataset(out)
    assert report.ok, report.problems
    # Renumbered from 000 per (category, defect), pairs intact.
    for record in records:
        assert Path(record["mask"]).name == Path(record["image"]).stem + "_mask.png"
    again = subprocess.run([sys.executable, "-m", "appliance.cli.main", "export", str(dataset),
                            str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "not empty" in again.stderr
    inside = subprocess.run([sys.executable, "-m", "appliance.cli.main", "export", str(dataset),
                             str(dataset / "export")], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert inside.returncode == 1 and "inside the dataset" in inside.stderr
    assert not list(tmp_path.glob(".export.partial-*"))


def test_odd_tokens_and_ids_are_refused_not_errors(server):
    assert server.request("GET", "/", headers={"Cookie": f"appliance_review_{server.port}=\u00e9"},
                          cookie=False)[0] == 403
    assert server.request("GET", "/api/items/s%C2%B2")[0] == 404
    assert server.request("GET", "/", headers={"Host": f"[::1]:{server.port}"})[0] == 200
