"""Names of categories, defect types and input files: the one validated name type.

Every name that becomes a folder or file under the dataset root, or a key in the store, comes
from outside (an inbox folder, a ``spec.toml``, the config, the command line, a file someone
dropped). ``Name`` is the one place that decides what is acceptable, and ``path_under`` the one
place that turns names into paths, re-checking that the result stays inside its root.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

MAX_NAME_LENGTH = 64  # categories and defect types: a folder name, readable in a report
MAX_FILE_NAME_BYTES = 240  # input files: below the 255-byte limit with room for "-2" suffixes

# Folders at the dataset root that are not categories (``storage.layout`` adds its state dir),
# and the files there: a category may be called neither.
DATASET_FOLDERS = frozenset({"trajectories", "contact_sheet", "batches"})
DATASET_FILES = frozenset({"manifest.jsonl", "rejected.jsonl", "normals.jsonl", "index.html"})
# Windows device names: a dataset on an SMB share cannot hold a folder called so.
_DEVICES = frozenset({"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
                      *(f"lpt{i}" for i in range(10))})
RESERVED = {
    "category": DATASET_FOLDERS | DATASET_FILES | _DEVICES,
    # test/good holds the normal test photos in the MVTec layout: no defect may be called so.
    "defect": frozenset({"good"}) | _DEVICES,
    "material": _DEVICES,
    "file": frozenset(),
}
# Characters no category or defect name may hold: path separators, what Windows or a shell
# treats specially, and ':' (it separates the parts of an episode key). A file name may hold
# all but the separators: a camera's "12:04:31.png" is a fine photo.
_FORBIDDEN = {kind: set('/\\:*?"<>|\0') for kind in ("category", "defect", "material")}
_FORBIDDEN["file"] = set("/\\\0")
# Unicode categories that print nothing or reorder text: control (C0 and C1), format (the
# bidirectional overrides, zero-width joiners), surrogates (undecodable bytes), private use,
# unassigned, and the line and paragraph separators.
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
# Letters and marks that draw nothing (Hangul fillers, braille blank, combining grapheme joiner):
# two names that differ only by them would look the same in every report.
_INVISIBLE = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800", "\u034f"}


class InvalidName(ValueError):
    """A name that cannot be used; the message says why and what would be accepted."""


def normalize_name(name: str) -> str:
    """Folder names, user input and KB keys meet in one spelling: NFC, lower_snake_case."""
    text = unicodedata.normalize("NFC", name).casefold()
    # casefold can decompose (U+01F0 becomes j + caron): compose again.
    return unicodedata.normalize("NFC", "_".join(
        text.strip().replace("-", " ").replace("_", " ").split()))


def printable(name: str) -> str:
    """A name safe to log and write into a report: bytes that are not UTF-8 and characters that
    print nothing are shown as escapes."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(f"\\u{ord(ch):04x}" if unicodedata.category(ch) in _UNPRINTABLE else ch
                   for ch in text)


class Name(str):
    """A validated name of one kind: ``Name("Metal Nut", "category") == "metal_nut"``.

    Categories and defect types are normalised (NFC, case-folded, lower_snake_case), so two
    spellings that differ only in case or separators are the same name. File names keep their
    spelling (the user's photo is called what they called it) but pass the same checks:
    printable, no path separators, not ``.`` or ``..``, no leading dot or dash, bounded length,
    not reserved.
    """

    kind: str

    def __new__(cls, raw: str, kind: str = "category") -> "Name":
        if kind not in RESERVED:
            raise ValueError(f"unknown kind of name {kind!r}")
        value = str.__new__(cls, _checked(raw, kind))
        value.kind = kind
        return value


def unique_names(raws, kind: str) -> list[Name]:
    """Names that must differ within one parent (a spec's defect list, the config's categories):
    two spellings of the same name are an error, not a silent merge."""
    seen: dict[str, str] = {}
    names = []
    for raw in raws:
        name = Name(raw, kind)
        if name in seen:
            raise InvalidName(f"'{printable(seen[name])}' and '{printable(raw)}' are the same "
                              f"{kind} name ({name!r}); keep one")
        seen[name] = raw
        names.append(name)
    return names


def path_under(root: Path, *parts: str) -> Path:
    """``root/part/...`` for validated names only, checked (symbolic links resolved) to stay
    inside ``root``: the one way a path under the dataset root is made from a name."""
    root = Path(root)
    path = root
    for part in parts:
        kind = part.kind if isinstance(part, Name) else "file"
        path = path / Name(part, kind)
    base = root.resolve()
    if not path.resolve().is_relative_to(base):
        raise InvalidName(f"{printable(str(path))} leads outside {base} (a symbolic link?); "
                          f"refusing to write there")
    return path


def _checked(raw: str, kind: str) -> str:
    if not isinstance(raw, str):
        raise InvalidName(f"a {kind} name must be text, not {type(raw).__name__}")
    shown = printable(raw)
    if any("\udc80" <= ch <= "\udcff" for ch in raw):  # os.fsdecode of bytes that are not UTF-8
        raise InvalidName(f"'{shown}' is not valid UTF-8")
    bad = sorted({ch for ch in raw
                  if unicodedata.category(ch) in _UNPRINTABLE or ch in _INVISIBLE})
    if bad:
        codes = ", ".join(f"U+{ord(ch):04X}" for ch in bad)
        raise InvalidName(f"'{shown}' contains characters that print nothing or reorder text "
                          f"({codes}: control, bidirectional or invisible)")
    separators = sorted(set(raw) & _FORBIDDEN[kind])
    if separators:
        allowed = "" if kind == "file" else " or : * ? \" < > |"
        raise InvalidName(f"'{shown}' contains {' '.join(separators)}: a {kind} name is one "
                          f"folder or file name, without path separators{allowed}")
    name = unicodedata.normalize("NFC", raw)
    if kind != "file":
        name = normalize_name(name)
    if not name:
        raise InvalidName(f"'{shown}' is empty once spaces and separators are removed")
    if name in (".", "..") or name.startswith((".", "-")):
        spelled = "" if name == raw else f" (as {name!r})"
        raise InvalidName(f"'{shown}' starts with '.' or '-'{spelled}; a {kind} name must "
                          f"start with a letter, digit or '_'")
    if kind != "file" and unicodedata.category(name[0])[0] not in "LN" and name[0] != "_":
        raise InvalidName(f"'{shown}' starts with {name[0]!r}; a {kind} name must start with a "
                          f"letter, digit or '_'")
    if name.endswith((".", " ")):
        raise InvalidName(f"'{shown}' ends with '.' or a space, which Windows shares drop")
    limit = MAX_FILE_NAME_BYTES if kind == "file" else MAX_NAME_LENGTH
    size = len(name.encode("utf-8")) if kind == "file" else len(name)
    if size > limit:
        unit = "bytes" if kind == "file" else "characters"
        raise InvalidName(f"'{shown[:40]}...' is {size} {unit} long; at most {limit}")
    stem = name.split(".", 1)[0].casefold()
    if name.casefold() in RESERVED[kind] or (kind != "file" and stem in _DEVICES):
        raise InvalidName(f"'{shown}' is reserved ({kind} names may not be "
                          f"{', '.join(sorted(RESERVED[kind] - _DEVICES)) or 'device names'} "
                          f"or a Windows device name such as con, nul, com1)")
    return name
