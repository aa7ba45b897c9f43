"""Commands for the unattended appliance: watch, run, pause, resume, status, config, install.

Register them on the main group with ``register(cli)``. Until then (and in tests) they run as
``python -m appliance.cli.service_commands COMMAND``.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import stat
import struct
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable

import click

from appliance.cli.options import CATEGORY, DEFECT

import appliance  # noqa: F401  (forces offline mode before any HF import)
from appliance.config import CONFIG_ENV, Config, ConfigError, load_config, render
from appliance.serialization import json_default

REPO = Path(__file__).resolve().parents[2]
UNITS = ("appliance-watch.service", "appliance-batch.service", "appliance-batch.timer")
UNIT_BINARY = "/opt/appliance/.venv/bin/appliance"  # what the shipped unit files name
DATA_DIRS = ("inbox", "done", "quarantine", "dataset", "models", "cache")


def _config_option(command):
    return click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                        default=None, help=f"Config file (default: ${CONFIG_ENV}, else "
                                           f"/etc/appliance/config.toml, else built-in defaults)."
                        )(command)


def _load(config_file: Path | None) -> Config:
    try:
        config = load_config(config_file)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(78)  # EX_CONFIG: systemd shows it as a configuration error
    _act_as_owner(config.root)
    return config


def _act_as_owner(root: Path) -> None:
    """Run as the owner of the data folder when started by root (``sudo appliance pause``).

    Otherwise root would create the store's -wal/-shm files, and the service user could no
    longer open its own job store.
    """
    if os.geteuid() != 0:
        return
    try:
        info = root.stat()
    except OSError:
        return
    if info.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(info.st_gid)
    os.setuid(info.st_uid)


def _store(config: Config):
    from appliance.storage import JobStore

    return JobStore.for_dataset(config.dataset)


@click.command("watch")
@_config_option
@click.option("--intake-only", is_flag=True, help="Only take files into the queue; never run "
                                                  "episodes (another process runs them).")
@click.option("-v", "--verbose", is_flag=True)
def watch_command(config_file: Path | None, intake_only: bool, verbose: bool) -> None:
    """Watch the inbox and work through the queue (the systemd service).

    Scans the whole inbox at start, then polls it; takes a file once it is complete, queues its
    episodes and moves it to done/, or moves a bad file to quarantine/ with a .reason.txt.
    Runs queued episodes while the configured time window is open and the queue is not
    paused. Stops cleanly on SIGTERM after the chunk in progress.
    """
    from appliance.service.daemon import EXIT_CONFIG, Service, ServiceError, configure_logging

    configure_logging(verbose)
    config = _load(config_file)
    service = Service(config, role="watcher", process=not intake_only)
    service.install_signals()
    try:
        code = service.watch()
    except ServiceError as exc:
        click.echo(str(exc), err=True)
        code = EXIT_CONFIG
    finally:
        service.close()
    sys.exit(code)


@click.command("run")
@_config_option
@click.option("--until", "until_text", metavar="HH:MM", default=None,
              help="Stop starting new work at this time (default: the end of the configured "
                   "window; none when the window is \"always\").")
@click.option("-v", "--verbose", is_flag=True)
def run_command(config_file: Path | None, until_text: str | None, verbose: bool) -> None:
    """Take what is in the inbox, then run the queue until it is empty or time is up.

    This is what the nightly timer starts. Outside the configured window (and without
    --until) it does nothing. Exit status 75 means the disk stayed full or the configured
    cluster could not run episodes; the work is queued.
    """
    from appliance.service.daemon import EXIT_CONFIG, Service, ServiceError, configure_logging
    from appliance.service.schedule import parse_until

    configure_logging(verbose)
    config = _load(config_file)
    until = None
    if until_text:
        try:
            until = parse_until(until_text, datetime.now())
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--until") from None
    service = Service(config, role="runner")
    service.install_signals()
    try:
        result = service.run(until)
    except ServiceError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_CONFIG)
    finally:
        service.close()
    for line in result.summary.lines():
        click.echo(line)
    if result.exit_code:
        click.echo(f"stopped: {result.message}", err=True)
    sys.exit(result.exit_code)


@click.command("pause")
@_config_option
def pause_command(config_file: Path | None) -> None:
    """Stop starting new episodes (the chunk in progress finishes); intake goes on."""
    store = _store(_load(config_file))
    store.set("paused", True)
    click.echo("paused: no new episodes start until `appliance resume`")


@click.command("resume")
@_config_option
def resume_command(config_file: Path | None) -> None:
    """Start running episodes again after `appliance pause`."""
    store = _store(_load(config_file))
    store.set("paused", False)
    click.echo("resumed")


@click.command("retry")
@_config_option
@click.option("--dataset", "dataset_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="A dataset written by `appliance batch` (default: the "
                                 "configured service dataset).")
@click.option("--rejected", "include_rejected", is_flag=True,
              help="Also retry episodes the judge rejected (worth it after changing the engine "
                   "or the thresholds; the same engine and seed reject them again).")
@click.option("--category", default=None, type=CATEGORY, help="Only this category.")
@click.option("--defect", default=None, type=DEFECT, help="Only this defect type.")
@click.option("--dry-run", is_flag=True, help="Only list what would be retried.")
def retry_command(config_file: Path | None, dataset_dir: Path | None, include_rejected: bool,
                  category: str | None, defect: str | None, dry_run: bool) -> None:
    """Put failed episodes back in the queue, with a fresh try count.

    An episode fails after it crashed or errored service.max_tries times (a model that would
    not load, a full disk, a bad input). Once the cause is fixed, this re-queues them; the
    watcher, the next `appliance run` or re-running the same `appliance batch` picks them up.
    Accepted episodes are never re-run, so no sample is duplicated.
    """
    from appliance.storage import JobStore
    from appliance.storage.exports import sync_exports

    if dataset_dir is not None:
        if not (dataset_dir / ".appliance").is_dir():
            raise click.ClickException(f"{dataset_dir} has no job store (.appliance/): "
                                       "not a dataset written by the appliance")
        store = JobStore.for_dataset(dataset_dir)
    else:
        store = _store(_load(config_file))
    statuses = ("failed", "rejected") if include_rejected else ("failed",)
    if dry_run:
        rows = store.episodes_with_status(statuses, category, defect)
    else:
        rows = store.requeue_finished(statuses, category=category, defect=defect)
        with store.dataset_lock(timeout=120):
            sync_exports(store)
    for row in rows:
        click.echo(f"{row['status']:8s} {row['category']}/{row['defect']}  "
                   f"{(row['error'] or '').splitlines()[0][:100] if row['error'] else ''}")
    verb = "would re-queue" if dry_run else "re-queued"
    click.echo(f"{verb} {len(rows)} episode(s)" + ("" if rows else
               f" (no {' or '.join(statuses)} episodes" +
               (f" for {category or '*'}/{defect or '*'}" if category or defect else "") + ")"))


@click.command("status")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--health", is_flag=True, help="Exit 0 only if a watcher or runner is alive "
                                              "(for container health checks).")
def status_command(config_file: Path | None, as_json: bool, health: bool) -> None:
    """Queue depth, progress with rate and ETA, engine, window, pause state, last error."""
    from appliance.service.status import collect_status, status_lines

    config = _load(config_file)
    report = collect_status(config)
    if health:
        alive = [name for name in ("watcher", "runner") if report[name]["alive"]]
        click.echo(f"healthy: {', '.join(alive)} alive" if alive else
                   "unhealthy: no watcher or runner has reported recently")
        sys.exit(0 if alive else 1)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=json_default))
        return
    for line in status_lines(report):
        click.echo(line)


@click.group("config")
def config_group() -> None:
    """Show or check the configuration file."""


@config_group.command("show")
@_config_option
def config_show(config_file: Path | None) -> None:
    """Print the effective configuration (file values over defaults, paths resolved)."""
    click.echo(render(_load(config_file)), nl=False)


@config_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), required=False)
def config_check(path: Path | None) -> None:
    """Validate a config file; exit 78 with every problem listed if it is invalid."""
    config = _load(path)
    click.echo(f"ok: {config.source or 'built-in defaults'}")


# install-service ---------------------------------------------------------------------------------

CONFIG_TEMPLATE = """\
# Anomaly synthesis appliance. Every key is optional; `appliance config show` prints the
# effective configuration with all defaults and what each key means.

[paths]
root = "/var/lib/appliance"   # inbox/, done/, quarantine/, dataset/, models/, cache/ below it

[engine]
name = "cpu"                  # the embedded engine; GPU engines once models are installed
chunk = 4

[schedule]
window = "22:00-06:00"        # episodes run only inside this window ("always" for no limit)

[service]
min_free_mb = 2000            # no new work below this much free disk space

# Per-category defect types (else the knowledge base's list, or inbox/<category>/spec.toml):
# [categories.bottle]
# defects = ["broken_large", "contamination"]
# per_image = 2
"""


@click.command("install-service")
@click.option("--prefix", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
              show_default=True, help="Install below this root (for packaging and tests: "
                                      "no user is created and systemctl is not called).")
@click.option("--user", default="appliance", show_default=True, help="Dedicated service user.")
@click.option("--binary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The appliance executable the units start (default: this installation's).")
@click.option("--no-enable", is_flag=True, help="Install the files, do not enable the units.")
@click.option("--dry-run", is_flag=True, help="Print what would be done, change nothing.")
def install_service_command(prefix: Path, user: str, binary: Path | None, no_enable: bool,
                            dry_run: bool) -> None:
    """Create the service user, lay out /var/lib/appliance, install and enable the units.

    The installed services are rated with `systemd-analyze security --offline=true` (where it
    exists); one above an exposure of 2.5 stops the command before anything is enabled.
    """
    actions = plan_install(prefix, user, binary or default_binary())
    for description, action in actions:
        click.echo(("would " if dry_run else "") + description)
        if not dry_run:
            action()
    services = [unit_dir(prefix) / unit for unit in UNITS if unit.endswith(".service")]
    if dry_run:
        click.echo(f"would check {', '.join(map(str, services))} with systemd-analyze security "
                   f"--offline=true (exposure at most {MAX_EXPOSURE})")
    else:
        check_exposure(services)
    if prefix == Path("/") and not no_enable:
        for command in (["systemctl", "daemon-reload"],
                        ["systemctl", "enable", "--now", "appliance-watch.service",
                         "appliance-batch.timer"]):
            click.echo(("would run " if dry_run else "running ") + " ".join(command))
            if not dry_run:
                subprocess.run(command, check=True)
    elif not dry_run:
        click.echo("then, on the target: systemctl daemon-reload && systemctl enable --now "
                   "appliance-watch.service appliance-batch.timer")


def default_binary() -> Path:
    """This installation's executable (not whatever `appliance` comes first on PATH)."""
    own = Path(sys.prefix) / "bin" / "appliance"
    if own.exists():
        return own
    found = shutil.which("appliance")
    return Path(found) if found else own


def unit_dir(prefix: Path) -> Path:
    return prefix / "etc/systemd/system"


# Who may write where (docs/service.md, "Users, groups and permissions"):
#   /var/lib/appliance  appliance:appliance  0751  others may traverse to inbox/, not list
#   inbox/              appliance:INBOX_GROUP 2770 + default ACL group rwx: droppers create
#   everything else     appliance:appliance  0750, files 0640 (UMask=0027): group reads only
INBOX_GROUP = "appliance-inbox"  # the droppers; also SupplementaryGroups= of both services
STATE_MODE = 0o751
INBOX_MODE = 0o2770
DATA_MODE = 0o750
MAX_EXPOSURE = 2.5  # systemd-analyze security's overall exposure (0 safe .. 10 unsafe)


def plan_install(prefix: Path, user: str, binary: Path) -> list[tuple[str, Callable[[], object]]]:
    """(description, action) pairs; nothing happens until the actions are called."""
    actions: list[tuple[str, Callable[[], object]]] = []
    system = prefix == Path("/")
    units_src = REPO / "systemd"
    if not all((units_src / unit).exists() for unit in UNITS):
        raise click.ClickException(f"unit files not found in {units_src}; run this from the "
                                   f"appliance checkout (e.g. /opt/appliance)")
    if system and not _user_exists(user):
        command = ["useradd", "--system", "--user-group", "--home-dir", "/var/lib/appliance",
                   "--shell", "/usr/sbin/nologin", user]
        actions.append((f"create user: {' '.join(command)}",
                        lambda: subprocess.run(command, check=True)))
    if system and not _group_exists(INBOX_GROUP):
        group_command = ["groupadd", "--system", INBOX_GROUP]
        actions.append((f"create the droppers' group: {' '.join(group_command)}",
                        lambda: subprocess.run(group_command, check=True)))
    state = prefix / "var/lib/appliance"
    actions.append((f"create {state} (mode {STATE_MODE:o}, {user}:{user})",
                    lambda: _make_dir(state, STATE_MODE, user, user, system)))
    for name in DATA_DIRS:
        folder = state / name
        if name == "inbox":
            # Droppers (INBOX_GROUP) create files here and nowhere else. setgid keeps the group
            # on their sub-folders; the default ACL gives the group rwx on them whatever the
            # dropper's umask, so the service (a member) can move files out of them.
            actions.append((f"create {folder} (mode {INBOX_MODE:o}, {user}:{INBOX_GROUP}, "
                            f"default ACL group rwx, other none)",
                            lambda folder=folder: _make_inbox(folder, user, system)))
        else:
            actions.append((f"create {folder} (mode {DATA_MODE:o}, {user}:{user}, no group "
                            f"or other write below it)",
                            lambda folder=folder: _make_dir(folder, DATA_MODE, user, user, system,
                                                            tighten=True)))
    config = prefix / "etc/appliance/config.toml"
    actions.append((f"write {config} unless it exists",
                    lambda: _write_config(config, state if not system else None)))
    target = unit_dir(prefix)
    for unit in UNITS:
        text = (units_src / unit).read_text().replace(UNIT_BINARY, str(binary))
        if not system:
            text = text.replace("/var/lib/appliance", str(state)).replace(
                "/etc/appliance/config.toml", str(config))
        actions.append((f"install {target / unit} (ExecStart {binary})",
                        lambda unit=unit, text=text: _write_file(target / unit, text)))
    return actions


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def _group_exists(group: str) -> bool:
    try:
        grp.getgrnam(group)
        return True
    except KeyError:
        return False


def _make_dir(folder: Path, mode: int, user: str, group: str, chown: bool,
              tighten: bool = False) -> None:
    """Create ``folder`` with ``mode``; as root, owned by user:group. ``tighten``: take group
    and other write away from everything already below it (left by an older install whose
    UMask=0007 let the group rewrite samples and the store)."""
    folder.mkdir(parents=True, exist_ok=True)
    if chown and os.geteuid() == 0 and _user_exists(user) and _group_exists(group):
        shutil.chown(folder, user, group)
    os.chmod(folder, mode)  # after chown, which may clear setgid
    if tighten:
        _drop_shared_write(folder)


def _drop_shared_write(folder: Path) -> None:
    failed = 0
    for top, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            path = os.path.join(top, name)
            try:
                info = os.lstat(path)
                if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o022:
                    os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o022)
            except OSError:
                failed += 1
    if failed:
        click.echo(f"warning: {failed} file(s) below {folder} are still group- or "
                   f"other-writable (not ours to change): chmod -R g-w,o-w {folder}", err=True)


def _make_inbox(folder: Path, user: str, chown: bool) -> None:
    _make_dir(folder, INBOX_MODE, user, INBOX_GROUP, chown)
    for top, dirs, _files in os.walk(folder):
        for path in (top, *(os.path.join(top, d) for d in dirs)):
            problem = _set_default_acl(Path(path))
            if problem:
                click.echo(f"note: no default ACL on {path} ({problem}): droppers must "
                           f"create folders with umask 002 so that the service can take "
                           f"files out of them", err=True)
                return


# A POSIX default ACL in the kernel's xattr format (no setfacl needed): user::rwx, group::rwx,
# other::---. Entries created below get group rwx (the create mode permitting) and nothing for
# others, whatever the creator's umask; sub-folders inherit the default ACL.
_ACL_UNDEFINED_ID = 0xFFFFFFFF
_DEFAULT_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, _ACL_UNDEFINED_ID)
    for tag, perm in ((0x01, 0o7), (0x04, 0o7), (0x20, 0o0)))  # USER_OBJ, GROUP_OBJ, OTHER


def _set_default_acl(folder: Path) -> str | None:
    """Set the inbox's default ACL on ``folder``; why not, or None once it is set."""
    try:
        os.setxattr(folder, "system.posix_acl_default", _DEFAULT_ACL)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def find_systemd_analyze() -> str | None:
    return shutil.which("systemd-analyze")


_EXPOSURE = re.compile(r"Overall exposure level for (\S+): ([0-9]+(?:\.[0-9]+)?) ?(\w*)")


def check_exposure(services: list[Path]) -> None:
    """Rate installed services with `systemd-analyze security --offline=true`; print each
    overall exposure line; fail if one rates above MAX_EXPOSURE. Without systemd-analyze (or
    one too old for --offline, before systemd 250) say so and go on."""
    analyze = find_systemd_analyze()
    if analyze is None:
        click.echo("note: systemd-analyze not found: the services' sandbox was not rated "
                   f"(it should be at most {MAX_EXPOSURE}: systemd-analyze security "
                   "--offline=true UNIT)")
        return
    too_exposed = []
    for path in services:
        done = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(path)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "SYSTEMD_COLORS": "0"})
        found = _EXPOSURE.search(done.stdout)
        if found is None:
            last = (done.stderr.strip().splitlines() or ["no exposure line in its output"])[-1]
            click.echo(f"note: systemd-analyze could not rate {path}: {last}")
            continue
        exposure = float(found.group(2))
        click.echo(f"security: {found.group(0).strip()} (at most {MAX_EXPOSURE} allowed)")
        if exposure > MAX_EXPOSURE:
            too_exposed.append(f"{path.name} rates {exposure} {found.group(3)}".rstrip())
    if too_exposed:
        raise click.ClickException(
            f"{'; '.join(too_exposed)}: above the allowed exposure of {MAX_EXPOSURE}. The unit "
            f"files were installed but nothing was enabled; restore the sandbox from the "
            f"shipped units (systemd-analyze security --offline=true UNIT lists every setting).")


def _write_config(path: Path, root: Path | None) -> None:
    if path.exists():
        return
    text = CONFIG_TEMPLATE
    if root is not None:
        text = text.replace('root = "/var/lib/appliance"', f'root = "{root}"')
    _write_file(path, text)


def _write_file(path: Path, text: str) -> None:
    from appliance.imaging import write_atomic

    write_atomic(path, text.encode("utf-8"))
    os.chmod(path, 0o644)


SERVICE_COMMANDS = (watch_command, run_command, pause_command, resume_command, retry_command,
                    status_command, config_group, install_service_command)


def register(cli: click.Group) -> None:
    """Add the service commands to the main ``appliance`` group."""
    for command in SERVICE_COMMANDS:
        cli.add_command(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def service_cli() -> None:
    """The appliance's service commands (also available as `appliance COMMAND`)."""


register(service_cli)

if __name__ == "__main__":  # pragma: no cover
    service_cli()
