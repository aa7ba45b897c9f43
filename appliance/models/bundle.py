"""Model bundles: pulled on a connected machine, verified and installed on the air-gapped box.

* ``pull`` (connected machine): downloads each catalogue entry with huggingface_hub's
  ``snapshot_download`` at a pinned commit, runs the entry's export (MetaUAS -> ONNX), hashes
  every file and writes ``BUNDLE/manifest.toml`` with all sha256 and sizes known.
* ``install`` (the box): checks the bundle's manifest and every file's sha256 before touching
  anything, copies into a staging folder beside the models folder (hashing the copy again),
  then swaps the staging folder in with renames. Any failure leaves the installed models as they
  were: fail closed, nothing half-installed.
* ``verify``: re-hashes every installed file against the installed manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from appliance.imaging import fsync_dir, sha256_file
from appliance.models.manifest import (MANIFEST_NAME, UNKNOWN, FileEntry, Manifest, ManifestError,
                                       ModelEntry, load_manifest, safe_relative_path, write_manifest)

CHUNK = 1 << 20
Progress = Callable[[str], None]


class BundleError(RuntimeError):
    """The bundle cannot be installed (or pulled); nothing was changed."""


@dataclass
class Problem:
    model: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.model}/{self.path}: {self.reason}"


@dataclass
class InstallReport:
    installed: list[str]  # model names from the bundle
    kept: list[str]  # previously installed models the bundle did not replace
    files: int
    bytes: int
    seconds: float
    models_dir: Path
    problems: list[Problem] = field(default_factory=list)


# --- verify ------------------------------------------------------------------------------------


def verify_files(manifest: Manifest, root: Path, names: Sequence[str] | None = None,
                 progress: Progress | None = None) -> list[Problem]:
    """Every listed file present with the listed size and sha256; unknown hashes are problems."""
    problems: list[Problem] = []
    for entry in manifest.models:
        if names is not None and entry.name not in names:
            continue
        if not entry.files:
            problems.append(Problem(entry.name, "-", "lists no files"))
        for item in entry.files:
            path = Path(root) / entry.name / item.path
            if progress:
                progress(f"checking {entry.name}/{item.path}")
            if not item.known:
                problems.append(Problem(entry.name, item.path, f"sha256 or size is {UNKNOWN}"))
            elif path.is_symlink() or not path.is_file():
                problems.append(Problem(entry.name, item.path, "missing (or not a regular file)"))
            elif path.stat().st_size != item.size:
                problems.append(Problem(entry.name, item.path,
                                        f"size {path.stat().st_size} != {item.size}"))
            elif (digest := sha256_file(path)) != item.sha256:
                problems.append(Problem(entry.name, item.path,
                                        f"sha256 {digest[:12]}... != {item.sha256[:12]}..."))
    return problems


def verify(models_dir: Path, progress: Progress | None = None) -> list[Problem]:
    """Problems with the installed models; empty when every file checks out."""
    try:
        manifest = load_manifest(Path(models_dir) / MANIFEST_NAME)
    except ManifestError as exc:
        return [Problem("-", MANIFEST_NAME, str(exc))]
    return verify_files(manifest, models_dir, progress=progress)


# --- install -----------------------------------------------------------------------------------


def _copy_hashed(source: Path, target: Path) -> str:
    """Copy and return the sha256 of the bytes written (what gets installed is what is checked)."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(target, "wb") as dst:
        while block := src.read(CHUNK):
            digest.update(block)
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)  # same filesystem: no second copy of gigabytes
    except OSError:
        shutil.copy2(source, target)


def recover(models_dir: Path) -> None:
    """Finish or undo a swap that a crash interrupted (see ``install``)."""
    models_dir = Path(models_dir)
    previous = models_dir.with_name(f".{models_dir.name}.previous")
    if previous.exists() and not models_dir.exists():
        os.rename(previous, models_dir)
    elif previous.exists():
        shutil.rmtree(previous, ignore_errors=True)
    for stale in models_dir.parent.glob(f".{models_dir.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


def install(bundle: Path, models_dir: Path, progress: Progress | None = None) -> InstallReport:
    """Verify ``bundle`` completely, then make it the installed set (keeping other models)."""
    started = time.perf_counter()
    bundle, models_dir = Path(bundle), Path(models_dir)
    say = progress or (lambda _message: None)
    try:
        incoming = load_manifest(bundle / MANIFEST_NAME)
    except ManifestError as exc:
        raise BundleError(f"refusing {bundle}: {exc}") from exc
    if not incoming.models:
        raise BundleError(f"refusing {bundle}: its manifest lists no models")
    # 1. Check the bundle as it is, before anything is written.
    problems = verify_files(incoming, bundle, progress=say)
    if problems:
        raise BundleError(f"refusing {bundle}: {len(problems)} problem(s), e.g. "
                          + "; ".join(str(p) for p in problems[:5]))
    models_dir.parent.mkdir(parents=True, exist_ok=True)
    recover(models_dir)
    if models_dir.exists() and any(models_dir.iterdir()) and not (models_dir / MANIFEST_NAME).is_file():
        # The swap below renames the folder away: never do that to a folder that is not ours.
        raise BundleError(f"refusing to install into {models_dir}: it is not empty and holds no "
                          f"{MANIFEST_NAME} (not a models folder)")
    current = None
    if (models_dir / MANIFEST_NAME).is_file():
        try:
            current = load_manifest(models_dir / MANIFEST_NAME)
        except ManifestError:
            current = None  # an unreadable installed set is replaced wholesale
    staging = models_dir.with_name(f".{models_dir.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        # 2. Copy, hashing the copy: the bytes that land are the bytes that were checked.
        files = size = 0
        for entry in incoming.models:
            for item in entry.files:
                say(f"installing {entry.name}/{item.path}")
                digest = _copy_hashed(bundle / entry.name / item.path,
                                      staging / entry.name / item.path)
                if digest != item.sha256:
                    raise BundleError(f"{entry.name}/{item.path} changed while being copied")
                files += 1
                size += item.size or 0
        # 3. Keep installed models the bundle does not replace.
        kept: list[ModelEntry] = []
        if current is not None:
            names = {m.name for m in incoming.models}
            for entry in current.models:
                if entry.name in names:
                    continue
                if verify_files(current, models_dir, names=[entry.name]):
                    say(f"dropping {entry.name}: its installed files no longer verify")
                    continue
                for item in entry.files:
                    _link_or_copy(models_dir / entry.name / item.path,
                                  staging / entry.name / item.path)
                kept.append(entry)
        merged = Manifest(models=list(incoming.models) + kept, bundle={
            **incoming.bundle, "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        write_manifest(merged, staging, header="Installed models (written by `appliance "
                                               "models install`); do not edit by hand.")
        # 4. Swap. A crash between the two renames leaves ".previous", which recover() restores.
        previous = models_dir.with_name(f".{models_dir.name}.previous")
        if models_dir.exists():
            os.rename(models_dir, previous)
        os.rename(staging, models_dir)
        fsync_dir(models_dir.parent)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return InstallReport([m.name for m in incoming.models], [m.name for m in kept], files, size,
                         time.perf_counter() - started, models_dir)


# --- bundles written locally (tiny kit) ------------------------------------------------------


def describe_folder(folder: Path) -> tuple[FileEntry, ...]:
    """Every regular file under ``folder`` with its sha256 and size (hidden folders skipped)."""
    folder = Path(folder)
    entries = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        name = safe_relative_path(relative.as_posix(), str(folder))
        entries.append(FileEntry(name, sha256_file(path), path.stat().st_size))
    return tuple(entries)


# --- pull (connected machine) ------------------------------------------------------------------


@contextlib.contextmanager
def online() -> Iterator[None]:
    """Lift the appliance's offline switch for this block only (``models pull`` needs the Hub)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    for key in keys:
        os.environ[key] = "0"
    import huggingface_hub.constants as constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False  # read at import time; patch the module value too
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pull(catalogue: Path, bundle: Path, only: Sequence[str] | None = None,
         token: str | None = None, progress: Progress | None = None) -> Manifest:
    """Download the catalogue's models into a new bundle folder and write its manifest."""
    from appliance import __version__

    say = progress or (lambda _message: None)
    source = load_manifest(catalogue)
    entries = [m for m in source.models if only is None or m.name in only]
    if only is not None and len(entries) != len(set(only)):
        unknown = sorted(set(only) - {m.name for m in entries})
        raise BundleError(f"not in the catalogue: {', '.join(unknown)}")
    bundle = Path(bundle)
    if bundle.exists() and any(bundle.iterdir()):
        raise BundleError(f"{bundle} exists and is not empty; pull into a new folder")
    partial = bundle.with_name(f"{bundle.name}.partial")
    partial.mkdir(parents=True, exist_ok=True)
    pulled = []
    with online():
        from huggingface_hub import HfApi, snapshot_download

        api = HfApi(token=token)
        for entry in entries:
            say(f"resolving {entry.repo}@{entry.revision}")
            commit = api.repo_info(entry.repo, repo_type=entry.repo_type, revision=entry.revision).sha
            target = partial / entry.name
            download = partial / f".download-{entry.name}" if entry.export else target
            say(f"downloading {entry.repo}@{commit[:12]} ({', '.join(entry.include) or 'listed files'})")
            snapshot_download(entry.repo, repo_type=entry.repo_type, revision=commit,
                              allow_patterns=list(entry.include) or [f.path for f in entry.files],
                              local_dir=download, token=token)
            provenance = {"commit": commit, "pulled": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                    time.gmtime())}
            if entry.export:
                provenance.update(_export(entry, download, target, say))
                shutil.rmtree(download, ignore_errors=True)
            pulled.append(_described(entry, target, commit, provenance))
    manifest = Manifest(pulled, bundle={"appliance": __version__, "catalogue": str(catalogue),
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    write_manifest(manifest, partial, header="Model bundle written by `appliance models pull`.")
    problems = verify_files(manifest, partial)
    if problems:
        raise BundleError("the pulled bundle does not verify: " + "; ".join(map(str, problems[:5])))
    if bundle.exists():
        bundle.rmdir()
    os.rename(partial, bundle)
    return manifest


def _export(entry: ModelEntry, download: Path, target: Path, say: Progress) -> dict:
    if entry.export != "metauas-onnx":
        raise BundleError(f"{entry.name}: unknown export {entry.export!r}")
    from appliance.models.metauas_export import MetaUASConfig, export_checkpoint

    checkpoints = [p for p in download.rglob("*.ckpt") if ".cache" not in p.parts]
    if len(checkpoints) != 1:
        raise BundleError(f"{entry.name}: expected one checkpoint in the download, found "
                          f"{[p.name for p in checkpoints]}")
    expected = entry.source.get("checkpoint_lfs_sha256")
    got = sha256_file(checkpoints[0])
    if expected and got != expected:
        raise BundleError(f"{entry.name}: {checkpoints[0].name} has sha256 {got[:16]}..., the "
                          f"catalogue expects {expected[:16]}... (a different or damaged file)")
    size = int(entry.settings.get("input_size", 256))
    say(f"exporting {checkpoints[0].name} to ONNX at {size} px")
    report = export_checkpoint(target / "metauas.onnx", checkpoints[0], MetaUASConfig(input_size=size))
    say(f"torch vs onnxruntime max |diff| {report.max_abs_diff:.2e}")
    return {"checkpoint": checkpoints[0].relative_to(download).as_posix(),
            "checkpoint_sha256": got, "exporter": report.exporter,
            "max_abs_diff": float(report.max_abs_diff)}


def _described(entry: ModelEntry, folder: Path, commit: str, provenance: dict) -> ModelEntry:
    """The entry with the files actually present, checked against what the catalogue expects."""
    files = describe_folder(folder)
    have = {f.path: f for f in files}
    for expected in entry.files:
        got = have.get(expected.path)
        if got is None:
            raise BundleError(f"{entry.name}: {expected.path} is missing from {entry.repo}@{commit}")
        if expected.known and (got.sha256, got.size) != (expected.sha256, expected.size):
            raise BundleError(f"{entry.name}: {expected.path} does not match the catalogue's sha256")
    return replace(entry, revision=commit, files=files, source={**entry.source, **provenance})
