"""The vendored llama.cpp converter in third_party/ is exactly what its SHA256SUMS records.

Vendored code is kept as taken from upstream plus the edits listed in PATCHES.md. These tests
make an unrecorded edit, an added file or a deleted file fail, and check that no second copy of
the converter lives inside the installed ``appliance`` package.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENDOR = REPO / "third_party" / "llama_cpp_convert"
SUMS = VENDOR / "SHA256SUMS"

REGENERATE = (
    "cd third_party/llama_cpp_convert && find . -type f ! -name SHA256SUMS ! -name '*.pyc' "
    "! -path '*/__pycache__/*' | sed 's|^\\./||' | LC_ALL=C sort | xargs -d '\\n' sha256sum "
    "> SHA256SUMS"
)
WHAT_TO_DO = (
    "Files in third_party/llama_cpp_convert are vendored from llama.cpp (see its README.md). "
    "Do not edit them casually. An intended change must be recorded: describe it with a "
    "diff and the reason in third_party/llama_cpp_convert/PATCHES.md (and README.md if the "
    f"file list changes), then regenerate SHA256SUMS:\n    {REGENERATE}\n"
    "If the change was not intended, restore the file (git checkout -- <path>)."
)


def _recorded() -> dict[str, str]:
    """path (relative to the vendor folder) -> sha256, from SHA256SUMS."""
    assert SUMS.is_file(), f"{SUMS.relative_to(REPO)} is missing. {WHAT_TO_DO}"
    recorded: dict[str, str] = {}
    for number, line in enumerate(SUMS.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        assert sep and len(digest) == 64 and name, (
            f"SHA256SUMS line {number} is not 'sha256  path': {line!r}. {WHAT_TO_DO}")
        assert name not in recorded, f"SHA256SUMS lists {name} twice. {WHAT_TO_DO}"
        recorded[name] = digest.lower()
    return recorded


def _present() -> set[str]:
    """Every file in the vendor folder except SHA256SUMS and Python bytecode caches."""
    return {
        path.relative_to(VENDOR).as_posix()
        for path in VENDOR.rglob("*")
        if path.is_file() and path != SUMS and path.suffix != ".pyc"
        and "__pycache__" not in path.relative_to(VENDOR).parts
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256sums_is_sorted_by_path():
    names = list(_recorded())
    assert names == sorted(names), f"SHA256SUMS is not sorted by path. {WHAT_TO_DO}"


def test_every_listed_file_exists_with_its_recorded_hash():
    recorded = _recorded()
    missing = sorted(name for name in recorded if not (VENDOR / name).is_file())
    assert not missing, (
        f"Listed in SHA256SUMS but missing from third_party/llama_cpp_convert: {missing}. "
        f"{WHAT_TO_DO}")
    changed = sorted(name for name, digest in recorded.items()
                     if _sha256(VENDOR / name) != digest)
    assert not changed, (
        f"Contents differ from SHA256SUMS: {changed}. {WHAT_TO_DO}")


def test_the_folder_holds_no_unlisted_file():
    unlisted = sorted(_present() - set(_recorded()))
    assert not unlisted, (
        f"Files in third_party/llama_cpp_convert that SHA256SUMS does not list: {unlisted}. "
        f"{WHAT_TO_DO}")


def test_the_converter_is_not_packaged_as_ours():
    """The two __init__.py files the project once added were removed: the folder is driven
    through sys.path in a child process, never imported as part of a package of ours."""
    ours = [name for name in ("__init__.py", "gguf_py/__init__.py") if (VENDOR / name).exists()]
    assert not ours, (
        f"{ours} found in third_party/llama_cpp_convert: the converter is run from a child "
        "process with gguf_py/ and the folder itself on sys.path (appliance/models/"
        "gguf_convert.py), not imported as a package. Remove them.")


def test_appliance_holds_no_copy_of_the_converter():
    appliance = REPO / "appliance"
    assert appliance.is_dir(), f"{appliance} not found"
    copies = sorted(
        path.relative_to(REPO).as_posix()
        for path in appliance.rglob("*")
        if "__pycache__" not in path.parts
        and ((path.is_file() and path.name == "gguf_writer.py")
             or (path.is_dir() and path.name == "_llama_cpp_convert"))
    )
    assert not copies, (
        f"Found a copy of llama.cpp's converter inside appliance/: {copies}. The only copy "
        "lives in third_party/llama_cpp_convert (outside the installed package). Delete the "
        "copy and use that one through appliance/models/gguf_convert.py.")
