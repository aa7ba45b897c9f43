"""The TOML configuration: defaults, validation that names the bad key and line, `config show`."""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli.service_commands import service_cli
from appliance.config import (CONFIG_ENV, HOME_ENV, ConfigError, load_config, parse_config,
                              render)
from appliance.service.schedule import Window, parse_until

GOOD = """\
[paths]
root = "{root}"
dataset = "/data/out"

[engine]
name = "cpu"
max_attempts = 2
chunk = 8

[thresholds]
min_quality = 4

[intake]
poll_seconds = 0.5
oversize = "reject"

[schedule]
window = "22:00-06:00"

[categories."Magnetic Tile"]
defects = ["crack", "Blow Hole"]
per_image = 3
"""


def test_defaults_without_a_file(monkeypatch, tmp_path):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.setenv(HOME_ENV, str(tmp_path))
    monkeypatch.setattr("appliance.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    config = load_config(None)
    assert config.source is None
    assert config.inbox == tmp_path / "inbox"
    assert config.dataset == tmp_path / "dataset"
    engine = config.engine_config()
    assert engine.name == "cpu" and engine.env.max_image_gen == 3


def test_a_full_file_is_read_and_applied(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(GOOD.format(root=tmp_path))
    config = load_config(path)
    assert config.source == path.resolve()
    assert config.inbox == tmp_path / "inbox" and config.dataset == Path("/data/out")
    spec = config.category_spec("magnetic_tile")
    assert spec.defects == ["crack", "blow_hole"] and spec.per_image == 3
    engine = config.engine_config()
    assert engine.env.max_image_gen == 2 and engine.env.min_quality == 4
    assert engine.cache_dir == tmp_path / "cache"
    assert Window.parse(config.schedule.window).contains(datetime(2025, 1, 1, 23, 30))
    assert not Window.parse(config.schedule.window).contains(datetime(2025, 1, 1, 12, 0))


def test_relative_root_is_taken_from_the_file_location(tmp_path):
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "config.toml"
    path.write_text('[paths]\nroot = "../state"\n')
    assert load_config(path).inbox == (tmp_path / "etc" / "../state").resolve() / "inbox"


@pytest.mark.parametrize("text, expected", [
    ("[engine]\nchunks = 4\n", "<config>:2: engine.chunks: unknown key (allowed: chunk,"),
    ("[enginee]\nchunk = 4\n", "<config>:1: enginee: unknown key"),
    ("[engine]\nworkers = \"two\"\n", "<config>:2: engine.workers: must be an integer, not a string"),
    ("[engine]\nmax_attempts = 0\n", "engine.max_attempts: must be between 1 and 10, not 0"),
    ("[engine]\nname = \"warp-drive\"\n",
     "engine.name: unknown engine 'warp-drive' (available: auto, cpu"),
    ("[engine]\nimage_gen = \"crayons\"\n", "engine.image_gen: unknown backend 'crayons'"),
    ("[schedule]\nwindow = \"25:00-06:00\"\n", "schedule.window: '25:00-06:00' is not a valid time range"),
    ("[schedule]\nwindow = \"nightly\"\n", "schedule.window: must be \"always\" or \"HH:MM-HH:MM\""),
    ("[schedule]\nwatcher_processes = 1\n", "schedule.watcher_processes: must be true or false"),
    ("[intake]\noversize = \"crop\"\n", "intake.oversize: must be one of downscale, reject, not 'crop'"),
    ("[intake]\nmin_side = 5000\n", "intake.min_side: must not exceed intake.max_side"),
    ("[paths]\ninbox = \"\"\n", "paths.inbox: must not be empty"),
    ("[defaults]\ndefects = \"crack\"\n", "defaults.defects: must be a list of non-empty strings"),
    ("[categories.bottle]\ndefectz = [\"crack\"]\n",
     "<config>:2: categories.bottle.defectz: unknown key (allowed: defects, material, per_image)"),
    ("[categories.bottle]\nper_image = 2\n", "categories.bottle: needs defects = [...] or material"),
    ("paths = 3\n", "paths: must be a table, not an integer"),
    ("[engine\n", "not valid TOML"),
    ("[intake]\npoll_seconds = nan\n", "intake.poll_seconds: must be a finite number, not nan"),
    ("[service]\nmin_free_mb = inf\n", "service.min_free_mb: must be a finite number, not inf"),
    ("[engine]\nseed = 99999999999\n", "engine.seed: must be between 0 and 2147483647"),
    ("[paths]\nroot = \"/\"\n", "paths.root: / is a system folder"),
    ("[cluster]\naddress = \"10.0.0.5\"\n",
     "<config>:2: cluster.address: must be HOST:PORT of the cluster's head, not '10.0.0.5'"),
    ("[cluster]\nchunks_per_engine = 0\n", "cluster.chunks_per_engine: must be between 1 and 16"),
    ("[paths]\nroot = \"/srv/a\"\ninbox = \"/etc/in\"\n", "paths.inbox: /etc/in is a system folder"),
    ("[paths]\nroot = \"/srv/a\"\ninbox = \"../x\"\n", "paths.inbox: must not contain '..'"),
    ("[paths]\nroot = \"/srv/a\"\ndataset = \"inbox/d\"\n",
     "paths.dataset: /srv/a/inbox/d lies inside paths.inbox (/srv/a/inbox)"),
    ("[paths]\nroot = \"/srv/a\"\ndone = \"inbox\"\n", "paths.inbox: is the same folder as paths.done"),
    ("[categories.\"_..\"]\ndefects = [\"crack\"]\n", "categories: '_..' starts with '.' or '-'"),
    ("[categories.Bottle]\ndefects = [\"crack\"]\n[categories.bottle]\ndefects = [\"x\"]\n",
     "'Bottle' and 'bottle' are the same category name"),
])
def test_errors_name_the_key_and_line(text, expected):
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert any(expected in error for error in caught.value.errors), caught.value.errors


def test_a_link_cannot_put_the_dataset_inside_the_inbox(tmp_path):
    (tmp_path / "inbox").mkdir()
    (tmp_path / "ds").symlink_to(tmp_path / "inbox")
    with pytest.raises(ConfigError, match="paths.dataset: .* is the same folder as paths.inbox|"
                                          "paths.inbox: is the same folder as paths.dataset"):
        parse_config(f'[paths]\nroot = "{tmp_path}"\ndataset = "ds"\n')


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        parse_config("[engine]\nchunk = 0\nworker = 2\n[intake]\npoll_seconds = \"fast\"\n")
    assert len(caught.value.errors) == 3
    assert str(caught.value).startswith("invalid configuration:")


def test_config_show_prints_a_valid_effective_config(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text(GOOD.format(root=tmp_path))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    result = CliRunner().invoke(service_cli, ["config", "show"])
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.output)
    assert shown["paths"]["inbox"] == str(tmp_path / "inbox")
    assert shown["engine"]["chunk"] == 8 and shown["schedule"]["window"] == "22:00-06:00"
    assert shown["categories"]["magnetic_tile"]["defects"] == ["crack", "blow_hole"]
    # What it prints is itself a config that loads to the same values.
    again = parse_config(result.output)
    assert render(again).splitlines()[1:] == render(load_config(path)).splitlines()[1:]


def test_a_bad_config_stops_commands_with_exit_78(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text("[engine]\nchunk = -1\n")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    result = CliRunner().invoke(service_cli, ["status"])
    assert result.exit_code == 78
    assert f"{path}:2: engine.chunk: must be between 1 and 256" in result.output
    checked = CliRunner().invoke(service_cli, ["config", "check", str(path)])
    assert checked.exit_code == 78
    missing = CliRunner().invoke(service_cli, ["config", "check", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 78 and "no such file" in missing.output


def test_window_and_until_arithmetic():
    night = Window.parse("22:00-06:00")
    assert night.contains(datetime(2025, 3, 1, 22, 0)) and night.contains(datetime(2025, 3, 2, 5, 59))
    assert not night.contains(datetime(2025, 3, 2, 6, 0))
    assert night.closes_at(datetime(2025, 3, 1, 23, 0)) == datetime(2025, 3, 2, 6, 0)
    assert night.opens_at(datetime(2025, 3, 2, 9, 0)) == datetime(2025, 3, 2, 22, 0)
    day = Window.parse("08:00-17:30")
    assert day.contains(datetime(2025, 3, 1, 12, 0)) and not day.contains(datetime(2025, 3, 1, 18, 0))
    assert Window.parse("always").contains(datetime(2025, 3, 1, 3, 0))
    assert parse_until("06:00", datetime(2025, 3, 1, 23, 0)) == datetime(2025, 3, 2, 6, 0)
    assert parse_until("23:30", datetime(2025, 3, 1, 23, 0)) == datetime(2025, 3, 1, 23, 30)
    with pytest.raises(ValueError):
        parse_until("6 am", datetime(2025, 3, 1))
