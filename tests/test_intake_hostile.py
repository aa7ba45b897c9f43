"""Intake that no dropped file can break: a live `appliance watch` against > 50 hostile inputs.

The corpus covers what issue 13 found and more: category folders and defect names that would
lead outside the dataset or over its own folders, specs with unbounded or malformed values (and
specs that are links, pipes, folders or huge), file names with control, bidirectional and
invisible characters, files the service may not read or move, timestamps in the future and in
1970, and names that already exist in done/. Every input must end processed, quarantined with
its reason, or deliberately left with the reason in the log and `appliance status`; nothing may
be written outside the appliance's root; the watcher stays alive and stops on SIGTERM with the
store consistent.

When the tests run as root (CI), the watcher runs in a user namespace without capabilities
(``unshare --user``), where file modes bind it as they bind any service user: the permission
cases are real.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from _disks import fill
from _live_watcher import Watcher, photo, png_bytes, reasons

from appliance.service.intake import REASON_SUFFIX

CONFIG = """\
[paths]
root = "{root}"

[engine]
max_attempts = 1
chunk = 2

[intake]
poll_seconds = 0.2
stable_polls = 2
settle_seconds = 0.3
quarantine_after_seconds = 3.0
max_file_mb = 1.0
max_pixels = 4000000
min_side = 32
max_side = 256

[service]
min_free_mb = 0
max_tries = 2
disk_backoff_seconds = 0.5

[categories.magnetic_tile]
defects = ["crack"]
"""
OLD = time.time() - 3600
TOKEN = uuid.uuid4().hex[:8]  # in every name that must never appear outside the root


UNPRIVILEGED = ["unshare", "--user", "--map-user=1000"]


def _unprivileged_works() -> bool:
    """Root in a user namespace of its own has no capabilities: a mode-000 file is unreadable."""
    if os.geteuid() != 0:
        return False
    with tempfile.NamedTemporaryFile() as handle:
        os.chmod(handle.name, 0)
        probe = subprocess.run([*UNPRIVILEGED, sys.executable, "-c",
                                f"open({handle.name!r}).read()"], capture_output=True)
    return probe.returncode != 0 and b"PermissionError" in probe.stderr


AS_ROOT_UNPRIVILEGED = _unprivileged_works()
# Permissions mean something only to a process without root's capabilities.
REAL_PERMISSIONS = AS_ROOT_UNPRIVILEGED or os.geteuid() != 0


class Corpus:
    """Hostile inputs and what must become of each: ("quarantined", words), ("processed", "")
    or ("left", words). The marker (``hNN``) is part of every file name."""

    def __init__(self, inbox: Path, done: Path, outside: Path):
        self.inbox, self.done, self.outside = inbox, done, outside
        self.expected: dict[str, tuple[str, str, str]] = {}  # marker -> (outcome, words, path)
        self.good = png_bytes(photo(1))
        self.count = 0

    def drop(self, relative: str, data: bytes | None = None, outcome: str = "quarantined",
             words: str = "", mtime: float | None = OLD, mode: int | None = None) -> Path:
        self.count += 1
        marker = f"h{self.count:02d}"
        folder, _, name = relative.rpartition("/")
        path = self.inbox / folder / f"{marker}_{name}" if folder else self.inbox / f"{marker}_{name}"
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.parent / f".{marker}.tmp"  # hidden while written: the scanner skips it
        staged.write_bytes(self.good if data is None else data)
        if mode is not None:
            os.chmod(staged, mode)
        if mtime is not None:
            os.utime(staged, (mtime, mtime))
        os.replace(staged, path)
        self.expected[marker] = (outcome, words, os.fsdecode(path.relative_to(self.inbox)))
        return path

    def spec(self, category: str, text: str | bytes, words: str) -> None:
        folder = self.inbox / category
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spec.toml").write_bytes(text.encode() if isinstance(text, str) else text)
        self.drop(f"{category}/part.png", words=words)


def build_corpus(corpus: Corpus) -> None:
    c = corpus
    # Category folders whose names cannot be categories.
    for folder, words in [
        ("_..", "ends with '.'"), ("_.", "ends with '.'"), ("-.", "starts with '.' or '-'"),
        ("_-_", "is empty"),
        ("Trajectories", "is reserved"), ("contact_sheet", "is reserved"),
        ("CON", "is reserved"), ("nul.stuff", "is reserved"), ("trailing.", "ends with '.'"),
        ("bidi\u202eoof", "print nothing"), ("c1\x85cat", "print nothing"),
        ("zero\u200bwidth", "print nothing"), ("colon:cat", "contains :"),
        ("back\\slash", "contains \\"), ("x" * 70, "at most 64"), ("   ", "ends with '.' or a space"),
    ]:
        c.drop(f"{folder}/part.png", words=words)
    # Two spellings of one category: neither folder is taken, both are named.
    for folder in ("Gear", "gear"):
        (c.inbox / folder).mkdir()
        (c.inbox / folder / "spec.toml").write_text('defects = ["crack"]\n')
        c.drop(f"{folder}/part.png", words="are both category 'gear'")
    # Specs: names that lead outside, reserved or repeated names, unbounded or malformed values.
    specs = [
        (f'defects = ["../../escape_{TOKEN}"]\n', "contains /"),
        (f'defects = ["/tmp/abs_{TOKEN}"]\n', "contains /"),
        ('defects = ["good"]\n', "is reserved"),
        ('defects = ["Crack", "crack"]\n', "are the same defect name"),
        ('defects = ["cr\u202eack"]\n', "print nothing"),
        ('defects = ["a:b"]\n', "contains :"),
        ('defects = ["crack"]\nper_image = 1000000000\n', "between 1 and 100"),
        ('defects = ["crack"]\nper_image = -1\n', "between 1 and 100"),
        ('defects = ["crack"]\nper_image = "many"\n', "must be an integer"),
        ('defects = ["crack"]\nper_image = 1e308\n', "must be an integer"),
        ('defects = "crack"\n', "must be a list"),
        ("defects = [" + ", ".join(f'"d{i}"' for i in range(33)) + "]\n", "at most 32"),
        ('material = "../glass"\n', "contains /"),
        ('defectz = ["crack"]\n', "unknown key"),
        (b"\xff\xfe\x00garbage\x00", "cannot read|not valid TOML"),
        ("# " + "x" * 100_000 + "\n", "a spec is at most 64 kB"),
        ("a = " + "[" * 20_000 + "]" * 20_000 + "\n", "not valid TOML"),
    ]
    for n, (text, words) in enumerate(specs):
        c.spec(f"spec_{n:02d}", text, words)
    link = c.inbox / "spec_link"
    link.mkdir()
    (link / "spec.toml").symlink_to("/etc/passwd")
    c.drop("spec_link/part.png", words="must be a plain file")
    pipe = c.inbox / "spec_pipe"
    pipe.mkdir()
    os.mkfifo(pipe / "spec.toml")
    c.drop("spec_pipe/part.png", words="must be a plain file")
    folder_spec = c.inbox / "spec_folder"
    (folder_spec / "spec.toml").mkdir(parents=True)
    c.drop("spec_folder/part.png", words="must be a plain file")
    # File names.
    tile = "magnetic_tile"
    for name, words in [
        ("bidi\u202egnp.png", "print nothing"), ("c1_\x9b.png", "print nothing"),
        ("zwj\u200d.png", "print nothing"), ("tab\there.png", "print nothing"),
        ("bell\x07.png", "print nothing"), ("trailing.png.", "ends with '.'"),
        ("n" * 236 + ".png", "at most 240"),
    ]:
        c.drop(f"{tile}/{name}", words=words)
    c.drop(f"{tile}/12:04:31.png", outcome="processed")  # a camera's name is a fine name
    c.drop(f"{tile}/con.png", outcome="processed")
    c.drop(f"{tile}/\u6fc0\u5149.png", data=png_bytes(photo(2)), outcome="processed")
    # A name that starts with a dash, made outside the corpus's marker prefix.
    dash = c.inbox / tile / "-h99_dash.png"
    dash.write_bytes(c.good)
    os.utime(dash, (OLD, OLD))
    c.expected["h99"] = ("quarantined", "starts with '.' or '-'", f"{tile}/-h99_dash.png")
    # Contents and links.
    c.drop(f"{tile}/big.png", data=c.good + b"\0" * 1_000_001, words="above the limit of 1 MB")
    secret = c.outside / f"secret_{TOKEN}.txt"
    secret.write_text("outside the inbox\n")
    hard = c.inbox / tile / "h98_hardlink.png"
    os.link(secret, hard)
    os.utime(hard, (OLD, OLD))
    c.expected["h98"] = ("quarantined", "not an image", f"{tile}/h98_hardlink.png")
    (c.inbox / tile / "h97_dirlink.png").symlink_to(c.outside, target_is_directory=True)
    c.expected["h97"] = ("quarantined", "symbolic link", f"{tile}/h97_dirlink.png")
    # Timestamps.
    c.drop(f"{tile}/future.png", data=png_bytes(photo(3)), outcome="processed",
           mtime=time.time() + 365 * 86400)
    c.drop(f"{tile}/epoch.png", data=png_bytes(photo(4)), outcome="processed", mtime=0)
    c.drop(f"{tile}/future_cut.png", data=c.good[:200], mtime=time.time() + 365 * 86400,
           words="truncated or corrupt|not an image")
    # Names that already exist in done/: a file of another content, and a folder.
    (c.done / tile).mkdir(parents=True)
    c.drop(f"{tile}/seen.png", data=png_bytes(photo(5)), outcome="processed")
    c.older = c.done / tile / f"h{c.count:02d}_seen.png"
    c.older.write_bytes(b"an older file of that name")
    c.drop(f"{tile}/taken_as_folder.png", data=png_bytes(photo(6)), outcome="processed")
    c.folder = c.done / tile / f"h{c.count:02d}_taken_as_folder.png"
    c.folder.mkdir()
    # A folder of the inbox whose name is a file in done/ (inbox/c/x taken, then inbox/c/x/y).
    (c.done / tile / "sub_as_file").write_text("an earlier photo called sub_as_file")
    c.drop(f"{tile}/sub_as_file/p.png", data=png_bytes(photo(10)), outcome="processed")
    # done/<category> is a file: moving there fails on every try, so the tries are counted and
    # the photo ends in quarantine with the last error after service.max_tries.
    (c.inbox / "blocked").mkdir()
    (c.inbox / "blocked" / "spec.toml").write_text('defects = ["crack"]\n')
    (c.done / "blocked").write_text("not a folder")
    c.drop("blocked/part.png", data=png_bytes(photo(7)), words="failed 2 times")
    # Permissions: only meaningful for a service that is not root.
    if REAL_PERMISSIONS:
        c.drop(f"{tile}/unreadable.png", mode=0o000, words="permission denied")
        c.drop(f"{tile}/unreadable_young.png", mode=0o000, mtime=None, words="permission denied")


def snapshot(base: Path, skip: Path) -> dict[str, tuple]:
    """Every path under ``base`` but ``skip``, with its size and mtime."""
    found = {}
    for folder, dirs, files in os.walk(base):
        if Path(folder) == skip or Path(folder).is_relative_to(skip):
            dirs[:] = []
            continue
        for name in files + dirs:
            path = os.path.join(folder, name)
            if Path(path) == skip:
                continue
            info = os.lstat(path)
            found[path] = (info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def hostile():
    base = Path(tempfile.mkdtemp(prefix="hostile-", dir="/tmp"))
    os.chmod(base, 0o755)
    root, outside = base / "root", base / "outside"
    for folder in (root / "inbox" / "magnetic_tile", root / "done", outside):
        folder.mkdir(parents=True)
    corpus = Corpus(root / "inbox", root / "done", outside)
    build_corpus(corpus)
    left_folders = []
    if REAL_PERMISSIONS:
        # The service may read the photo in the first but not move it out; nor list the second.
        for name, mode in (("locked", 0o555), ("unlisted", 0o000)):
            folder = root / "inbox" / name
            folder.mkdir()
            (folder / "spec.toml").write_text('defects = ["crack"]\n')
            photo_path = folder / "part.png"
            photo_path.write_bytes(png_bytes(photo(8)))
            os.utime(photo_path, (OLD, OLD))
            os.chmod(folder, mode)
            left_folders.append(name)
    before = snapshot(base, root)
    watcher = Watcher(root, CONFIG, prefix=UNPRIVILEGED if AS_ROOT_UNPRIVILEGED else None)
    watcher.wait_for(lambda: "READY=1" in "".join(watcher.listener.messages), timeout=120,
                     what="READY=1")
    yield watcher, corpus, base, before, left_folders
    if watcher.process.poll() is None:
        watcher.stop()
    subprocess.run(["rm", "-rf", str(base)], check=False)


def _settled(watcher, corpus: Corpus):
    quarantine = watcher.root / "quarantine"
    found = reasons(quarantine) if quarantine.exists() else {}
    wanted = [m for m, (outcome, _, _) in corpus.expected.items() if outcome == "quarantined"]
    got = {m for m in wanted if any(m in name for name in found)}
    processed = [m for m, (outcome, _, _) in corpus.expected.items() if outcome == "processed"]
    moved = {m for m in processed
             if any(m in p.name for p in (watcher.root / "done").rglob("*") if p.is_file())}
    return found if len(got) == len(wanted) and len(moved) == len(processed) else None


def test_every_hostile_input_ends_processed_quarantined_or_left_with_a_reason(hostile):
    watcher, corpus, base, before, left_folders = hostile
    assert len(corpus.expected) + len(left_folders) >= 50
    found = watcher.wait_for(lambda: _settled(watcher, corpus), timeout=150,
                             what="every hostile input settled")
    for marker, (outcome, words, _) in corpus.expected.items():
        if outcome != "quarantined":
            continue
        matches = [reason for name, reason in found.items() if f"{marker}_" in name]
        assert len(matches) == 1, f"{marker}: {matches}"
        assert any(w in matches[0] for w in words.split("|")), f"{marker}: {matches[0]}"
    watcher.wait_for(watcher.idle, timeout=120, what="the queue to drain")
    root = watcher.root
    # Processed photos are in done/, never over an older file or folder of their name.
    assert corpus.older.read_bytes() == b"an older file of that name"
    assert len(list(corpus.older.parent.glob(corpus.older.stem + "*.png"))) == 2
    assert corpus.folder.is_dir() and len(list(corpus.folder.parent.glob(
        corpus.folder.stem + "-*.png"))) == 1
    # Nothing was written outside the root: no new path, no changed file, no escaped name.
    assert snapshot(base, root) == before
    assert not list(Path("/tmp").glob(f"*{TOKEN}*")), "a name escaped to /tmp"
    assert (corpus.outside / f"secret_{TOKEN}.txt").read_text() == "outside the inbox\n"
    # The dataset holds only validated names, all inside it.
    dataset = (root / "dataset").resolve()
    for path in dataset.rglob("*"):
        assert path.resolve().is_relative_to(dataset), path
        name = path.name
        assert name.isprintable() and not name.startswith("-"), repr(name)
    for line in (dataset / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        # "blocked" was queued before its move to done/ failed: its samples are fine.
        assert record["category"] in ("magnetic_tile", "blocked") and record["defect"] == "crack"
    # What is left in the inbox is left on purpose, and says why.
    left = sorted(str(p.relative_to(root / "inbox")) for p in (root / "inbox").rglob("*")
                  if p.is_file() and p.name != "spec.toml" and "unlisted" not in str(p))
    expected_left = ["locked/part.png"] if "locked" in left_folders else []
    assert left == expected_left, left
    status = subprocess.run([sys.executable, "-m", "appliance.cli.service_commands", "status"],
                            capture_output=True, text=True,
                            env={**os.environ, "APPLIANCE_CONFIG": str(watcher.config)})
    assert status.returncode == 0, status.stderr
    if left_folders:
        assert "locked/part.png" in status.stdout and "may not move files out" in status.stdout
        assert "unlisted: cannot be listed by the service" in status.stdout
        assert "cannot list inbox folder" in watcher.output()
    assert watcher.process.poll() is None


def test_the_watcher_answers_sigterm_with_the_store_consistent(hostile):
    watcher = hostile[0]
    started = time.monotonic()
    watcher.process.send_signal(signal.SIGTERM)
    code = watcher.process.wait(timeout=60)
    assert code == 0, watcher.output()[-2000:]
    assert time.monotonic() - started < 60
    db = sqlite3.connect(watcher.root / "dataset" / ".appliance" / "jobs.db")
    try:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        stuck = db.execute("select count(*) from episodes where status in "
                           "('running', 'writing')").fetchone()[0]
        assert stuck == 0
    finally:
        db.close()


def test_a_watcher_started_on_a_full_disk_waits_and_resumes(tiny_disk, tmp_path):
    """Under systemd an exit would only restart into the same full disk: it must wait."""
    root = tiny_disk / "root"
    (root / "inbox" / "magnetic_tile").mkdir(parents=True)
    filler = fill(tiny_disk, 0)
    watcher = Watcher(tmp_path, CONFIG.replace('root = "{root}"', f'root = "{root}"'))
    try:
        watcher.wait_for(lambda: "disk full" in watcher.output(), timeout=120,
                         what="the disk-full message")
        time.sleep(2.0)
        assert watcher.process.poll() is None, watcher.output()[-2000:]
        assert any("waiting for disk space" in m or "disk full" in m
                   for m in watcher.listener.messages)
        filler.unlink()
        watcher.wait_for(lambda: "READY=1" in "".join(watcher.listener.messages), timeout=120,
                         what="READY=1 once space is back")
        photo_path = root / "inbox" / "magnetic_tile" / "part.png"
        photo_path.write_bytes(png_bytes(photo(9)))
        os.utime(photo_path, (OLD, OLD))
        watcher.wait_for(lambda: (root / "done" / "magnetic_tile" / "part.png").exists(),
                         timeout=60, what="the photo taken")
        assert watcher.stop() == 0
    finally:
        if watcher.process.poll() is None:
            watcher.process.kill()


def test_reason_files_sit_beside_their_files(hostile):
    quarantine = hostile[0].root / "quarantine"
    for note in quarantine.rglob(f"*{REASON_SUFFIX}"):
        assert os.path.lexists(note.parent / note.name[: -len(REASON_SUFFIX)]), note


def test_appliance_batch_reads_inputs_with_the_same_guards(tmp_path):
    """`appliance batch` reads a folder it was pointed at, not the watched inbox, but a link, a
    pipe or a huge file there must not make it read elsewhere, block or allocate without bound."""
    from appliance.batch import plan_inbox
    from appliance.imaging import ImageReadError, read_plain_file
    from appliance.tools.knowledge.base import load_knowledge_base

    inbox = tmp_path / "inbox"
    (inbox / "magnetic_tile").mkdir(parents=True)
    (inbox / "magnetic_tile" / "a.png").write_bytes(png_bytes(photo(1)))
    (inbox / "linked").symlink_to(inbox / "magnetic_tile", target_is_directory=True)
    (inbox / "Trajectories").mkdir()
    (inbox / "Trajectories" / "b.png").write_bytes(png_bytes(photo(2)))
    plans, skipped = plan_inbox(inbox, load_knowledge_base(), 1, ["crack"])
    assert [p.category for p in plans] == ["magnetic_tile"]
    reasons_by_folder = dict(skipped)
    assert "symbolic link" in reasons_by_folder["linked"]
    assert "is reserved" in reasons_by_folder["Trajectories"]
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "link.png").symlink_to(inbox / "magnetic_tile" / "a.png")
    for name, words in (("pipe.png", "not a regular file"), ("link.png", "symbolic link")):
        with pytest.raises(ImageReadError, match=words):
            read_plain_file(tmp_path / name, 1_000_000)
    with pytest.raises(ImageReadError, match="above the limit"):
        read_plain_file(inbox / "magnetic_tile" / "a.png", 100)
