"""The systemd units (verified by systemd-analyze), the install command, and sd_notify."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import service_commands
from appliance.cli.service_commands import (INBOX_GROUP, MAX_EXPOSURE, UNIT_BINARY, UNITS,
                                            install_service_command, plan_install)
from appliance.config import load_config
from appliance.service.notify import Notifier, sd_notify

REPO = Path(__file__).resolve().parents[1]
SYSTEMD = REPO / "systemd"


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}; keys may repeat, as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def one(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}: {found}"
    return found[0]


def environment(section) -> dict[str, str]:
    env = {}
    for line in values(section, "Environment"):
        for item in line.split():
            name, _, value = item.partition("=")
            env[name] = value
    return env


def test_the_watcher_unit_is_a_hardened_notify_service():
    service = unit("appliance-watch.service")["Service"]
    assert one(service, "Type") == "notify" and one(service, "NotifyAccess") == "main"
    assert one(service, "Restart") == "on-failure"
    assert one(service, "WatchdogSec") and one(service, "TimeoutStartSec")
    assert one(service, "ExecStart") == f"{UNIT_BINARY} watch"
    assert one(service, "User") == one(service, "Group") == "appliance"
    assert one(service, "ProtectSystem") == "strict"
    assert "/var/lib/appliance" in one(service, "ReadWritePaths")
    assert one(service, "NoNewPrivileges") == "yes"
    assert values(service, "PrivateDevices") in ([], ["no"])  # it would hide the GPU
    allowed = " ".join(values(service, "DeviceAllow"))
    for device in ("char-nvidia ", "char-nvidiactl", "char-nvidia-uvm"):
        assert device in allowed + " "
    assert one(service, "SyslogIdentifier") == "appliance-watch"
    env = environment(service)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert env["APPLIANCE_CONFIG"] == "/etc/appliance/config.toml"
    assert one(service, "IPAddressDeny") == "any"
    assert one(service, "RestrictAddressFamilies") == "AF_UNIX"
    assert unit("appliance-watch.service")["Install"] == [("WantedBy", "multi-user.target")]


SERVICES = [name for name in UNITS if name.endswith(".service")]


@pytest.mark.parametrize("name", SERVICES)
def test_the_services_are_sandboxed(name):
    service = unit(name)["Service"]
    assert one(service, "PrivateNetwork") == "yes" and one(service, "IPAddressDeny") == "any"
    assert one(service, "RestrictAddressFamilies") == "AF_UNIX"  # journald, sd_notify
    assert one(service, "CapabilityBoundingSet") == "" and one(service, "AmbientCapabilities") == ""
    assert values(service, "SystemCallFilter") == ["@system-service", "~@privileged"]
    assert one(service, "SystemCallErrorNumber") == "EPERM"  # fail softly, never kill
    assert one(service, "SystemCallArchitectures") == "native"
    assert one(service, "ProtectProc") == "invisible" and one(service, "RemoveIPC") == "yes"
    assert one(service, "ProtectHome") == "yes" and one(service, "PrivateTmp") == "yes"
    assert one(service, "RestrictNamespaces") == "yes" and one(service, "LockPersonality") == "yes"
    # JIT code (oneDNN, llama.cpp, CUDA) needs W+X memory; PrivateUsers= would unmap the
    # droppers' group; ProcSubset=pid would hide /proc/driver/nvidia.
    for key in ("MemoryDenyWriteExecute", "PrivateUsers", "ProcSubset", "PrivateDevices"):
        assert values(service, key) in ([], ["no"]), key
    allowed = " ".join(values(service, "DeviceAllow")) + " "
    for device in ("char-nvidia ", "char-nvidiactl", "char-nvidia-uvm"):
        assert device in allowed
    assert one(service, "DevicePolicy") == "closed"


@pytest.mark.parametrize("name", SERVICES)
def test_the_droppers_group_cannot_write_service_files(name):
    service = unit(name)["Service"]
    # Created files: at most group-readable (0640, folders 0750).
    assert one(service, "UMask") == "0027"
    # Member of the droppers' group only to take files out of their inbox sub-folders.
    assert one(service, "SupplementaryGroups") == INBOX_GROUP
    assert one(service, "Group") == "appliance" != INBOX_GROUP
    # systemd applies this mode at every start: it must be the one install-service sets.
    assert one(service, "StateDirectoryMode") == "0751"
    assert one(service, "ReadWritePaths") == "/var/lib/appliance"


def test_the_nightly_batch_is_bounded_and_caught_up():
    service = unit("appliance-batch.service")["Service"]
    # RuntimeMaxSec= has no effect on Type=oneshot: the bound must be on a running service.
    assert one(service, "Type") in ("exec", "simple", "notify")
    assert one(service, "RuntimeMaxSec")
    assert one(service, "ExecStart") == f"{UNIT_BINARY} run"
    assert one(service, "ProtectSystem") == "strict" and one(service, "NoNewPrivileges") == "yes"
    assert environment(service)["HF_HUB_OFFLINE"] == "1"
    assert one(service, "SyslogIdentifier") == "appliance-batch"
    timer = unit("appliance-batch.timer")["Timer"]
    assert one(timer, "Persistent") == "true" and one(timer, "OnCalendar")
    assert one(timer, "Unit") == "appliance-batch.service"


def _appliance_binary() -> Path:
    found = Path(sys.executable).parent / "appliance"
    return found if found.exists() else Path(sys.executable)


def _systemd_analyze() -> str:
    """systemd-analyze, which CI always installs (.ci/run): missing there fails, elsewhere skips."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI: .ci/run must install systemd",
                        pytrace=False)
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return analyze


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = _systemd_analyze()
    # As install-service writes them: ExecStart names this installation's executable.
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace(UNIT_BINARY, str(_appliance_binary()))
        (tmp_path / name).write_text(text)
    done = subprocess.run([analyze, "verify", *(str(tmp_path / n) for n in UNITS)],
                          capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    output = done.stdout + done.stderr
    # verify exits 0 on unknown keys and unparsable values, but says so: treat any mention of
    # our files as a failure.
    complaints = [line for line in output.splitlines() if "appliance-" in line]
    assert done.returncode == 0 and not complaints, output


_EXPOSURE = re.compile(r"Overall exposure level for (\S+): ([0-9.]+)")


def _exposure(analyze: str, path: Path) -> float:
    done = subprocess.run([analyze, "security", "--offline=true", str(path)],
                          capture_output=True, text=True)
    found = _EXPOSURE.search(done.stdout)
    assert found and found.group(1) == path.name, done.stdout[-2000:] + done.stderr
    return float(found.group(2))


def test_services_rate_an_exposure_of_at_most_2_5(tmp_path):
    analyze = _systemd_analyze()
    for name in SERVICES:
        path = tmp_path / name
        path.write_text((SYSTEMD / name).read_text().replace(UNIT_BINARY,
                                                             str(_appliance_binary())))
        exposure = _exposure(analyze, path)
        assert exposure <= MAX_EXPOSURE == 2.5, (name, exposure)


def test_verify_would_catch_a_broken_unit(tmp_path):
    analyze = _systemd_analyze()
    text = (SYSTEMD / "appliance-watch.service").read_text().replace(
        UNIT_BINARY, str(_appliance_binary())).replace("Type=notify", "Type=notifyy")
    (tmp_path / "appliance-watch.service").write_text(text)
    done = subprocess.run([analyze, "verify", str(tmp_path / "appliance-watch.service")],
                          capture_output=True, text=True)
    assert "appliance-watch.service" in done.stdout + done.stderr


def test_install_service_lays_out_a_prefix(tmp_path):
    result = CliRunner().invoke(install_service_command,
                                ["--prefix", str(tmp_path), "--binary", "/usr/bin/appliance-x"])
    assert result.exit_code == 0, result.output
    state = tmp_path / "var/lib/appliance"
    for name in ("inbox", "done", "quarantine", "dataset", "models", "cache"):
        assert (state / name).is_dir()
    assert stat.S_IMODE(state.stat().st_mode) == 0o751
    assert stat.S_IMODE((state / "inbox").stat().st_mode) == 0o2770
    for name in ("done", "quarantine", "dataset", "models", "cache"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o750
    config = tmp_path / "etc/appliance/config.toml"
    loaded = load_config(config)  # the template is a valid config
    assert loaded.inbox == state / "inbox" and loaded.schedule.window == "22:00-06:00"
    for name in UNITS:
        text = (tmp_path / "etc/systemd/system" / name).read_text()
        assert UNIT_BINARY not in text
        if name.endswith(".service"):
            assert "ExecStart=/usr/bin/appliance-x " in text
            assert f"ReadWritePaths={state}" in text
    assert "systemctl daemon-reload" in result.output
    # Running it again keeps an edited config.
    config.write_text("[engine]\nchunk = 2\n")
    assert CliRunner().invoke(install_service_command, ["--prefix", str(tmp_path)]).exit_code == 0
    assert config.read_text() == "[engine]\nchunk = 2\n"


def test_install_service_dry_run_changes_nothing(tmp_path):
    result = CliRunner().invoke(install_service_command, ["--dry-run", "--prefix", str(tmp_path)])
    assert result.exit_code == 0
    assert "would create" in result.output and "would install" in result.output
    assert "would check" in result.output and "systemd-analyze security" in result.output
    assert list(tmp_path.iterdir()) == []


def test_install_service_plans_the_droppers_group():
    # The plan for the real system, never run: a service user and a droppers' group.
    plan = [text for text, _ in plan_install(Path("/"), "appliance-test-nobody",
                                             Path("/usr/bin/appliance-x"))]
    assert any("useradd --system --user-group" in text for text in plan)
    if not service_commands._group_exists(INBOX_GROUP):
        assert f"create the droppers' group: groupadd --system {INBOX_GROUP}" in plan
    inbox = next(text for text in plan if text.startswith("create /var/lib/appliance/inbox "))
    assert "mode 2770" in inbox and f"appliance-test-nobody:{INBOX_GROUP}" in inbox
    dataset = next(text for text in plan if text.startswith("create /var/lib/appliance/dataset "))
    assert "mode 750" in dataset and "appliance-test-nobody:appliance-test-nobody" in dataset
    assert "create /var/lib/appliance (mode 751, appliance-test-nobody:appliance-test-nobody)" \
        in plan


def test_install_service_inbox_keeps_droppers_folders_usable(tmp_path):
    """Whatever a dropper's umask, what they create in the inbox stays group rwx (default ACL,
    setgid), so the service (in the droppers' group) can take files out of it."""
    assert CliRunner().invoke(install_service_command, ["--prefix", str(tmp_path)]).exit_code == 0
    inbox = tmp_path / "var/lib/appliance/inbox"
    try:
        os.getxattr(inbox, "system.posix_acl_default")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
            pytest.skip(f"no POSIX ACLs on {tmp_path}'s file system")
        raise
    old = os.umask(0o077)  # the most unhelpful dropper
    try:
        (inbox / "bottle" / "batch-1").mkdir(parents=True)
        (inbox / "bottle" / "batch-1" / "a.png").write_bytes(b"x")
    finally:
        os.umask(old)
    for folder in (inbox / "bottle", inbox / "bottle" / "batch-1"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o2770, folder
    assert stat.S_IMODE((inbox / "bottle" / "batch-1" / "a.png").stat().st_mode) == 0o660


def test_install_service_takes_group_write_from_older_files(tmp_path):
    """An install from before UMask=0027 left group-writable samples and store: fixed."""
    dataset = tmp_path / "var/lib/appliance/dataset"
    (dataset / ".appliance").mkdir(parents=True)
    store = dataset / ".appliance" / "jobs.db"
    store.write_bytes(b"")
    os.chmod(store, 0o666)
    os.chmod(dataset / ".appliance", 0o777)
    outside = tmp_path / "outside"
    outside.write_bytes(b"")
    os.chmod(outside, 0o666)
    (dataset / "link").symlink_to(outside)  # not followed
    assert CliRunner().invoke(install_service_command, ["--prefix", str(tmp_path)]).exit_code == 0
    assert stat.S_IMODE(store.stat().st_mode) == 0o644
    assert stat.S_IMODE((dataset / ".appliance").stat().st_mode) == 0o755
    assert stat.S_IMODE(outside.stat().st_mode) == 0o666


def test_install_service_rates_the_installed_services(tmp_path):
    _systemd_analyze()
    result = CliRunner().invoke(install_service_command,
                                ["--prefix", str(tmp_path), "--binary", str(_appliance_binary())])
    assert result.exit_code == 0, result.output
    for name in SERVICES:
        found = re.search(rf"security: Overall exposure level for {re.escape(name)}: "
                          rf"([0-9.]+) \w+ \(at most 2.5 allowed\)", result.output)
        assert found and float(found.group(1)) <= 2.5, result.output


def test_install_service_refuses_an_exposed_service(tmp_path, monkeypatch):
    _systemd_analyze()
    # A checkout whose watcher unit lost its sandbox.
    checkout = tmp_path / "checkout"
    (checkout / "systemd").mkdir(parents=True)
    sandbox = re.compile(r"^(Private|Protect|Restrict|SystemCall|Capability|Ambient|NoNew|"
                         r"Lock|RemoveIPC|IPAddress|Device|ReadWrite|UMask|ProcSubset)")
    for name in UNITS:
        lines = (SYSTEMD / name).read_text().splitlines()
        if name == "appliance-watch.service":
            lines = [line for line in lines if not sandbox.match(line)]
        (checkout / "systemd" / name).write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(service_commands, "REPO", checkout)
    result = CliRunner().invoke(install_service_command,
                                ["--prefix", str(tmp_path / "root"), "--binary",
                                 str(_appliance_binary())])
    assert result.exit_code != 0
    assert re.search(r"appliance-watch\.service rates [0-9.]+ \w+: above the allowed exposure "
                     r"of 2\.5", result.output), result.output
    assert "appliance-batch.service rates" not in result.output
    assert "systemctl enable" not in result.output


def test_install_service_without_systemd_analyze_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(service_commands, "find_systemd_analyze", lambda: None)
    result = CliRunner().invoke(install_service_command, ["--prefix", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "note: systemd-analyze not found: the services' sandbox was not rated" in result.output


# sd_notify ---------------------------------------------------------------------------------------

@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(1.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock) -> list[str]:
    out = []
    sock.settimeout(0.05)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            return out


def test_notifier_speaks_the_protocol(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")  # WatchdogSec=4: ping every 2 s at most
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier()
    assert notifier.interval == 2.0
    notifier.ready("idle; queue 0")
    notifier.status("idle; queue 0")  # unchanged: not sent again
    notifier.status("processing; queue 3")
    notifier.ping()  # too soon after the ready ping
    notifier.stopping("bye")
    assert received(notify_socket) == ["READY=1\nSTATUS=idle; queue 0", "WATCHDOG=1",
                                       "STATUS=processing; queue 3", "STOPPING=1\nSTATUS=bye"]


def test_notify_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert sd_notify("READY=1") is False
    assert Notifier().interval is None


def test_abstract_notify_socket(monkeypatch):
    name = f"appliance-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(1.0)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert sd_notify("READY=1")
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()
