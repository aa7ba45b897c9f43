"""A category's spec.toml and a [categories.NAME] config table are one schema with one set of bounds."""

from __future__ import annotations

import pytest

from appliance.batch import InboxError, read_spec
from appliance.config import ConfigError, parse_config


@pytest.mark.parametrize("body, message", [
    ("per_image = 1000000000\n", "per_image: must be between 1 and 100, not 1000000000"),
    ("per_image = 0\n", "per_image: must be between 1 and 100, not 0"),
    ('defects = ["../../etc"]\n', "defects: '../../etc' contains /: a defect name is one folder"),
    ('defects = ["/tmp/x"]\n', "defects: '/tmp/x' contains /"),
    ('defects = ["_.."]\n', "defects: '_..' starts with '.' or '-' (as '..')"),
    ('defects = ["good"]\n', "defects: 'good' is reserved"),
    ('defects = ["Crack", "crack"]\n', "defects: 'Crack' and 'crack' are the same defect name"),
    ('defects = ["a\u202eb"]\n', "defects: 'a\\u202eb' contains characters that print nothing"),
    ('defects = ["' + "x" * 65 + '"]\n', "defects: '" + "x" * 40 + "...' is 65 characters long; at most 64"),
    ("defects = [" + ", ".join(f'"d{i}"' for i in range(33)) + "]\n",
     "defects: has 33 items; at most 32"),
    ('material = "../glass"\n', "material: '../glass' contains /"),
    ("per_image = 2.5\n", "per_image: must be an integer, not a number"),
    ('defects = ["crack", ""]\n', "defects: must be a list of non-empty strings"),
    ('defectz = ["crack"]\n', "defectz: unknown key (allowed: defects, material, per_image)"),
])
def test_spec_and_config_refuse_the_same_values_with_the_same_words(tmp_path, body, message):
    (tmp_path / "spec.toml").write_text(body)
    with pytest.raises(InboxError) as spec_error:
        read_spec(tmp_path)
    assert f"spec.toml:1: {message}" in str(spec_error.value)
    with pytest.raises(ConfigError) as config_error:
        parse_config("[categories.bottle]\n" + body)
    assert f"<config>:2: categories.bottle.{message}" in str(config_error.value)


def test_a_valid_spec_reads_as_the_config_table_does(tmp_path):
    body = 'defects = ["Broken-Large", "crack"]\nper_image = 3\nmaterial = "glass"\n'
    (tmp_path / "spec.toml").write_text(body)
    spec = read_spec(tmp_path)
    assert (spec.defects, spec.per_image, spec.material) == (["broken_large", "crack"], 3, "glass")
    assert parse_config("[categories.bottle]\n" + body).categories["bottle"] == spec


def test_no_spec_is_an_empty_spec_and_a_broken_file_is_named(tmp_path):
    spec = read_spec(tmp_path)
    assert (spec.defects, spec.per_image, spec.material) == ([], None, None)
    (tmp_path / "spec.toml").write_bytes(b"defects = [\n")
    with pytest.raises(InboxError, match=r"spec\.toml: not valid TOML"):
        read_spec(tmp_path)
