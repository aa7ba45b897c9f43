"""The one validated name type: what it accepts, what it refuses and why, and path_under."""

from __future__ import annotations

import os

import pytest

from appliance.dataset.contact_sheet import SHEET
from appliance.names import DATASET_FILES, InvalidName, Name, path_under, unique_names
from appliance.storage.layout import MANIFEST, NORMALS, NOT_CATEGORIES, REJECTED


@pytest.mark.parametrize("raw, kind, expected", [
    ("Metal Nut", "category", "metal_nut"), ("metal-nut", "category", "metal_nut"),
    ("Straße", "category", "strasse"), ("\u01f0x", "category", "\u01f0x"),
    ("12:04:31.png", "file", "12:04:31.png"), ("(1) photo.png", "file", "(1) photo.png"),
    ("con.png", "file", "con.png"), ("\u6fc0\u5149", "defect", "\u6fc0\u5149"),
])
def test_names_that_are_accepted_and_how_they_are_spelled(raw, kind, expected):
    name = Name(raw, kind)
    assert name == expected and name.kind == kind
    assert Name(name, kind) == name  # idempotent


@pytest.mark.parametrize("raw, kind, words", [
    ("../x", "defect", "contains /"), ("/etc/x", "category", "contains /"),
    ("_..", "category", "starts with '.' or '-' (as '..')"), ("-.", "category", "starts with"),
    ("..", "file", "starts with '.' or '-'"), ("x.", "file", "ends with '.'"),
    ("Trajectories", "category", "is reserved"), ("manifest.jsonl", "category", "is reserved"),
    ("good", "defect", "is reserved"), ("COM1", "category", "is reserved"),
    ("a\u202eb", "file", "U+202E"), ("a\x85b", "category", "U+0085"),
    ("a\u3164b", "category", "U+3164"), ("\u0301x", "category", "must start with a letter"),
    ("+x", "category", "must start with a letter"), ("a:b", "defect", "contains :"),
    ("x" * 65, "category", "at most 64"), ("n" * 241, "file", "at most 240"),
    ("   ", "category", "is empty"), (os.fsdecode(b"\xe9t\xe9"), "file", "not valid UTF-8"),
])
def test_names_that_are_refused_say_why(raw, kind, words):
    with pytest.raises(InvalidName, match=None) as error:
        Name(raw, kind)
    assert words in str(error.value)


def test_the_dataset_s_own_files_and_folders_cannot_be_categories():
    assert {MANIFEST, REJECTED, NORMALS, SHEET} <= DATASET_FILES
    for name in NOT_CATEGORIES - {".appliance"} | DATASET_FILES:
        with pytest.raises(InvalidName):
            Name(name, "category")


def test_two_spellings_of_one_name_are_an_error():
    assert unique_names(["Crack", "scratch"], "defect") == ["crack", "scratch"]
    with pytest.raises(InvalidName, match="'Crack' and 'crack' are the same defect name"):
        unique_names(["Crack", "crack"], "defect")


def test_path_under_refuses_a_link_that_leads_outside(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    assert path_under(root, Name("bottle"), "train") == root / "bottle" / "train"
    (root / "bottle").symlink_to(outside)
    with pytest.raises(InvalidName, match="leads outside"):
        path_under(root, Name("bottle"), "train")
    with pytest.raises(InvalidName):
        path_under(root, "..", "x")
