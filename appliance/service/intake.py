"""Taking one file from the inbox: check it, queue its work, move it to done/ or quarantine/.

Bad input never stops the service: every refusal is a move to ``quarantine/<category>/`` with a
``NAME.reason.txt`` beside it that says what was wrong and what to do. Odd but usable images are
normalised instead (16-bit, CMYK, palette, alpha, EXIF rotation; oversize ones downscaled).
A file that cannot be decoded while it is still young may be a copy in progress: it is left
alone until it has been unchanged for ``quarantine_after_seconds``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

from appliance.batch import (SPEC_FILE, InboxError, inbox_category, intake_image, read_spec,
                             resolve_defects)
from appliance.config import Config
from appliance.imaging import ImageReadError, read_plain_file, to_rgb_array, write_atomic
from appliance.names import InvalidName, Name, printable
from appliance.tools.knowledge.base import KnowledgeBase

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "BMP": "BMP", "TIFF": "TIFF",
                    "WEBP": "WebP"}
REASON_SUFFIX = ".reason.txt"


class Refused(Exception):
    """The file is bad; the message is the reason written beside it in quarantine."""


class NotReady(Exception):
    """The file may still be being written: look again later."""


@dataclass
class Outcome:
    status: str  # "queued" | "known" | "quarantined" | "wait" | "error" | "left"
    source: str  # the inbox-relative name, printable
    reason: str = ""
    moved_to: Path | None = None
    episodes: int = 0


def safe_name(name: str, limit: int = 120) -> str:
    """A quarantine file name: printable ASCII-ish, no separators, bounded length."""
    clean = re.sub(r"[^A-Za-z0-9._+-]", "_", printable(name)).lstrip(".-") or "unnamed"
    stem, suffix = os.path.splitext(clean)
    return stem[:limit] + suffix[:16]


class Intake:
    def __init__(self, config: Config, writer, knowledge_base: KnowledgeBase):
        self.config = config
        self.writer = writer
        self.knowledge_base = knowledge_base
        self.inbox = config.inbox
        self.done = config.path("done")
        self.quarantine = config.path("quarantine")

    # The one entry point -----------------------------------------------------------------------

    def take(self, path: Path, now: float | None = None, age: float | None = None) -> Outcome:
        """Check ``path`` and either queue it (moved to done/) or quarantine it.

        ``age`` is how long the file has been as it is now (default: from its mtime; the
        scanner passes the time since it first saw it, which a future mtime cannot fool).
        Raises DiskFullError (the file stays in the inbox) when the dataset's disk is full.
        """
        now = time.time() if now is None else now
        relative = path.relative_to(self.inbox)
        shown = printable(str(relative))
        if not os.access(path.parent, os.W_OK | os.X_OK):
            # Neither done/ nor quarantine/ could take it: say so once, leave it be.
            return Outcome("left", shown, f"the service may not move files out of "
                                          f"inbox/{printable(str(relative.parent))} (no write "
                                          f"permission on that folder); make the folder "
                                          f"writable by the service's group")
        try:
            category, defects, per_image = self._category(relative)
            image, data, original = self._read(path, now, age)
        except NotReady as exc:
            return Outcome("wait", shown, str(exc))
        except Refused as exc:
            return self._quarantine(path, relative, str(exc))
        sha = hashlib.sha256(data).hexdigest()
        known = self.writer.store.normal(sha, category) is not None
        added, finished = intake_image(self.writer, category, image, sha, str(relative),
                                       len(data), defects, per_image, self.config.engine.seed,
                                       original_size=original)
        target = self._move(path, relative, sha)
        status = "known" if known and not added else "queued"
        held = self.writer.store.normal(sha, category)["split"] == "test"
        log.info("%s: %s, %d episode(s) queued%s", shown,
                 "held back in test/good (never edited)" if held else status, added,
                 f", {len(finished)} already done" if finished else "")
        return Outcome(status, shown, moved_to=target, episodes=added)

    def give_up(self, path: Path, reason: str) -> Outcome:
        """Move a file to quarantine/ with its reason, whatever it is (e.g. after N failed tries)."""
        return self._quarantine(path, path.relative_to(self.inbox), reason)

    # Checks -------------------------------------------------------------------------------------

    def _category(self, relative: Path) -> tuple[str, list[str], int]:
        for part in relative.parts:
            try:
                Name(part, "file")
            except InvalidName as exc:
                raise Refused(f"unusable name: {exc}; rename it and drop it again") from None
        if len(relative.parts) < 2:
            raise Refused("not in a category folder: put photos in inbox/<category>/")
        folder = relative.parts[0]
        try:
            category = inbox_category(self.inbox, folder)
        except InvalidName as exc:
            raise Refused(f"the folder cannot be a category: {exc}") from None
        configured = self.config.category_spec(category)
        try:
            spec = read_spec(self.inbox / folder)
        except InboxError as exc:
            raise Refused(f"the category's {SPEC_FILE} is unusable: {exc}") from None
        if configured is not None:
            spec = replace(spec, **{k: v for k, v in (("defects", configured.defects),
                                                      ("per_image", configured.per_image),
                                                      ("material", configured.material)) if v})
        if not spec.defects and self.config.defaults.defects:
            spec = replace(spec, defects=self.config.defaults.defects)
        # The category's own settings, then its spec.toml, then [defaults], then the knowledge base.
        try:
            defects = resolve_defects(category, self.knowledge_base, spec)
        except InvalidName as exc:
            raise Refused(f"a defect type cannot be used: {exc}") from None
        if not defects:
            raise Refused(f"unknown category {folder!r}: the knowledge base and the config have "
                          f"no defect types for it; add [categories.{category}] defects = [...] "
                          f"to the config or inbox/{folder}/{SPEC_FILE}")
        return category, defects, int(spec.per_image or self.config.defaults.per_image)

    def _read(self, path: Path, now: float,
              age: float | None = None) -> tuple[np.ndarray, bytes, tuple[int, int]]:
        limits = self.config.intake
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            target = os.path.realpath(path)
            inside = Path(target).is_relative_to(self.inbox.resolve())
            raise Refused(f"a symbolic link ({'inside the inbox' if inside else 'pointing outside the inbox'}, "
                          f"to {printable(target)}); copy the file itself instead")
        if not stat.S_ISREG(info.st_mode):
            raise Refused(f"not a regular file ({_file_kind(info.st_mode)})")
        young = (now - info.st_mtime if age is None else age) < limits.quarantine_after_seconds
        if info.st_size == 0:
            if young:
                raise NotReady("empty so far")
            raise Refused("empty file (0 bytes)")
        if info.st_size > limits.max_file_mb * 1e6:
            raise Refused(f"file is {info.st_size / 1e6:.1f} MB, above the limit of "
                          f"{limits.max_file_mb:g} MB (intake.max_file_mb)")
        try:
            data = read_plain_file(path, int(limits.max_file_mb * 1e6))
        except ImageReadError as exc:
            raise Refused(str(exc)) from None
        except PermissionError:
            if young:  # a copy tool may set the mode last
                raise NotReady("not readable yet (permission denied)") from None
            raise Refused(f"the service cannot read it (permission denied: mode "
                          f"{stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid}); make it "
                          f"readable by the service's group and drop it again") from None
        try:
            image, original = self._decode(data)
        except Refused:
            if young:
                raise NotReady("not decodable yet (maybe still being copied)") from None
            raise
        return image, data, original

    def _decode(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        limits = self.config.intake
        try:
            with Image.open(io.BytesIO(data)) as opened:
                kind = opened.format or "unknown"
                if kind not in ACCEPTED_FORMATS:
                    raise Refused(f"unsupported image format {kind}; use PNG, JPEG, BMP, TIFF or WebP")
                width, height = opened.size
                if width * height > limits.max_pixels:
                    raise Refused(f"decompression bomb guard: {width}x{height} = "
                                  f"{width * height} pixels, above the limit of "
                                  f"{limits.max_pixels} (intake.max_pixels)")
                upright = ImageOps.exif_transpose(opened)
                image = to_rgb_array(upright)
        except Refused:
            raise
        except Image.DecompressionBombError as exc:
            raise Refused(f"decompression bomb guard: {exc}") from None
        except Image.UnidentifiedImageError:
            raise Refused("not an image: the content is not in any known image format") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise Refused(f"truncated or corrupt image data: {exc}") from None
        height, width = image.shape[:2]
        original = (width, height)
        if min(width, height) < limits.min_side:
            raise Refused(f"image is {width}x{height}, smaller than the minimum side of "
                          f"{limits.min_side} px (intake.min_side)")
        if max(width, height) > limits.max_side:
            if limits.oversize == "reject":
                raise Refused(f"image is {width}x{height}, above the maximum side of "
                              f"{limits.max_side} px (intake.max_side, oversize = \"reject\")")
            scale = limits.max_side / max(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            if min(size) < limits.min_side:
                raise Refused(f"image is {width}x{height}: downscaled to fit {limits.max_side} px "
                              f"it would be thinner than {limits.min_side} px")
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            log.info("downscaled %dx%d to %dx%d (intake.max_side)", width, height, *size)
        return np.ascontiguousarray(image), original

    # Moving -------------------------------------------------------------------------------------

    def _quarantine(self, path: Path, relative: Path, reason: str) -> Outcome:
        shown = printable(str(relative))
        folder = relative.parts[0] if len(relative.parts) > 1 else "_inbox_root"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target_dir = self.quarantine / safe_name(folder, 60)
        name = f"{stamp}-{safe_name(relative.name)}"
        target = _free_name(target_dir / name)
        note = (f"file:    inbox/{shown}\nreason:  {reason}\n"
                f"when:    {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
                f"action:  fix or replace the file, then drop it into the inbox again; "
                f"this copy is kept here only for inspection\n")
        note_path = target.with_name(target.name + REASON_SUFFIX)
        try:
            write_atomic(note_path, note.encode("utf-8"))
            _move_file(path, target)
        except OSError as exc:
            try:  # no note without its file: the next try writes a new one
                note_path.unlink()
            except OSError:
                pass
            log.error("cannot quarantine inbox/%s (%s): %s", shown, reason, exc)
            return Outcome("error", shown, f"{reason}; quarantine failed: {exc}")
        log.warning("quarantined inbox/%s: %s", shown, reason)
        return Outcome("quarantined", shown, reason, moved_to=target)

    def _move(self, path: Path, relative: Path, sha: str) -> Path:
        """To done/, never over anything already there: a name that exists (a file or a folder)
        gets the content's hash added."""
        target = self.done / relative
        if os.path.lexists(target):
            target = target.with_name(f"{target.stem}-{sha[:8]}{target.suffix}")
        target = _free_name(target)
        try:
            _move_file(path, target)
        except (FileExistsError, NotADirectoryError):
            # A folder on the way is a file in done/ (inbox/c/x taken, then inbox/c/x/y.png):
            # keep the photo flat in its category's folder instead.
            flat = Path("_".join(relative.parts[1:]))
            target = _free_name(self.done / relative.parts[0] /
                                f"{flat.stem}-{sha[:8]}{flat.suffix}")
            _move_file(path, target)
        return target


def _move_file(path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(path, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:  # done/ or quarantine/ on another filesystem
            raise
        shutil.move(str(path), str(target))


def _free_name(target: Path) -> Path:
    candidate, n = target, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
    return candidate


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unknown kind of file"
