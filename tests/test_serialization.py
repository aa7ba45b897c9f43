"""The one TOML reader, TOML written by tomli-w, and the one JSON default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from appliance.config import load_config, parse_config, render
from appliance.models.manifest import FileEntry, Manifest, ModelEntry, load_manifest, write_manifest
from appliance.serialization import (TomlError, dumps_toml, json_default, load_toml, parse_toml,
                                     toml_value)

AWKWARD = ["plain", "a\x7fb (DEL)", "tab\there", 'quote " and \\ backslash', "ünïcode ✓",
           "line\nbreak", "\x00nul"]


@pytest.mark.parametrize("text", AWKWARD)
def test_every_string_round_trips_through_tomllib(text):
    """The hand-written writer emitted DEL raw, which tomllib then refused."""
    assert parse_toml(f"k = {toml_value(text)}", "t")["k"] == text
    assert parse_toml(dumps_toml({"k": text, "t": {"k": [text]}}), "t") == {"k": text, "t": {"k": [text]}}


def test_values_that_toml_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="null"):
        toml_value(None)
    with pytest.raises(ValueError, match="table"):
        toml_value({"a": 1})
    with pytest.raises(ValueError):
        dumps_toml({"k": object()})


def test_load_toml_names_the_file_for_each_kind_of_bad_file(tmp_path):
    missing, binary, broken = tmp_path / "missing.toml", tmp_path / "binary.toml", tmp_path / "broken.toml"
    binary.write_bytes(b"k = \"\xff\xfe\"\n")
    broken.write_text("[table\n")
    for path, words in ((missing, "no such file"), (binary, "not UTF-8"), (broken, "not valid TOML")):
        with pytest.raises(TomlError) as caught:
            load_toml(path)
        assert str(caught.value).startswith(str(path)) and words in str(caught.value)


def test_load_toml_raises_the_callers_error(tmp_path):
    class SpecError(ValueError):
        pass

    (tmp_path / "x.toml").write_text("k = = 1\n")
    with pytest.raises(SpecError, match=r"^inbox/x\.toml: not valid TOML"):
        load_toml(tmp_path / "x.toml", SpecError, where="inbox/x.toml")


def test_the_rendered_configuration_reads_back_as_the_same_configuration(tmp_path):
    text = ('[paths]\nroot = "/srv/appliance \\u007f odd"\n[engine]\nchunk = 4\n'
            '[categories.bottle]\ndefects = ["crack", "broken_large"]\nper_image = 3\n')
    config = parse_config(text)
    shown = render(config)
    path = tmp_path / "config.toml"
    path.write_text(shown, encoding="utf-8")
    again = load_config(path)
    assert again.root == config.root == Path("/srv/appliance \x7f odd")
    assert again.engine.chunk == 4
    assert again.categories["bottle"].defects == ["crack", "broken_large"]
    assert again.categories["bottle"].per_image == 3


def test_a_manifest_with_awkward_text_is_written_and_read_back(tmp_path):
    entry = ModelEntry(name="m", repo="org/m", revision="a" * 40, licence="MIT", format="onnx",
                       backends={"mask_gen": "metauas-onnx"},
                       files=(FileEntry("weights/m.onnx", "b" * 64, 12),),
                       settings={"threshold": 0.4, "note": "a\x7fb"}, notes='said "hi"\nthen left')
    write_manifest(Manifest([entry], bundle={"made_by": "test"}), tmp_path, header="first\n\nthird")
    text = (tmp_path / "manifest.toml").read_text()
    assert text.startswith("# first\n#\n# third\n")
    back = load_manifest(tmp_path)
    assert back.models == [entry]
    assert back.bundle == {"made_by": "test"}


def test_json_default_writes_numpy_and_paths_and_refuses_the_rest():
    record = {"f": np.float32(0.5), "i": np.int64(3), "b": np.bool_(True), "a": np.arange(3),
              "p": Path("/x/y")}
    assert json.loads(json.dumps(record, default=json_default)) == {
        "f": 0.5, "i": 3, "b": True, "a": [0, 1, 2], "p": "/x/y"}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        json.dumps({"o": object()}, default=json_default)
