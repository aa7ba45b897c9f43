"""``appliance status``: what the appliance is doing, from the job store alone."""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime

from appliance.config import Config
from appliance.service.intake import REASON_SUFFIX
from appliance.service.schedule import Window
from appliance.service.watcher import InboxScanner
from appliance.storage import JobStore
from appliance.storage.reviews import ReviewLog

RATE_WINDOW_SECONDS = 3600.0  # the rate is measured over the last hour's finished episodes


def _alive(beat: dict | None, updated: float | None, now: float) -> bool:
    if not beat or updated is None or beat.get("state") == "stopped":
        return False
    # Between chunks and polls the loop beats every few seconds; a long GPU chunk may be slow.
    limit = max(120.0, 10 * float(beat.get("poll_seconds", 2.0)))
    return now - updated <= limit


def collect_status(config: Config) -> dict:
    now = time.time()
    store = JobStore.for_dataset(config.dataset)
    try:
        counts = store.counts()
        recent = store.recent_finished(now - RATE_WINDOW_SECONDS)
        report: dict = {"dataset": str(config.dataset), "counts": counts,
                        "paused": store.paused, "last_error": store.get("last_error"),
                        "intake_failures": store.intake_failures(),
                        "review": ReviewLog(store).counts().as_dict()}
        report["cluster"] = store.get("cluster") or {}
        for role in ("watcher", "runner"):
            beat, updated = store.get_with_time(role)
            report[role] = {"alive": _alive(beat, updated, now), "heartbeat": beat,
                            "seconds_ago": None if updated is None else round(now - updated, 1)}
    finally:
        store.close()
    total = sum(counts.values())
    finished = sum(counts[s] for s in ("accepted", "rejected", "failed", "removed"))
    pending = counts["queued"] + counts["running"] + counts["writing"]
    rate = None
    if len(recent) >= 2:
        span = recent[-1]["finished_at"] - min(r["started_at"] or r["finished_at"] for r in recent)
        rate = len(recent) / span if span > 0 else None
    report["progress"] = {
        "total": total, "finished": finished, "pending": pending,
        "per_episode_seconds": None if not rate else round(1 / rate, 2),
        "eta_seconds": None if not rate else round(pending / rate),
    }
    window = Window.parse(config.schedule.window)
    opens = window.opens_at(datetime.now())
    report["window"] = {"window": str(window), "open": window.contains(datetime.now()),
                        "opens_at": None if opens is None else opens.isoformat(timespec="minutes")}
    engine = (report["watcher"]["heartbeat"] or report["runner"]["heartbeat"] or {}).get("engine")
    if not engine:
        engine_config = config.engine_config()
        engine = f"engine={engine_config.name}, " + ", ".join(
            f"{k}={v}" for k, v in engine_config.backend_names().items()) + " (configured)"
    report["engine"] = engine
    inbox = config.inbox
    report["inbox_files"] = len(InboxScanner(inbox).entries()) if inbox.is_dir() else 0
    quarantine = config.path("quarantine")
    report["quarantined_files"] = sum(
        1 for _, _, files in os.walk(quarantine) for f in files
        if not f.endswith(REASON_SUFFIX)) if quarantine.is_dir() else 0
    usage = shutil.disk_usage(config.dataset if config.dataset.exists() else config.root)
    report["disk"] = {"free_bytes": usage.free, "total_bytes": usage.total,
                      "min_free_bytes": int(config.service.min_free_mb * 1e6)}
    return report


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status_lines(report: dict) -> list[str]:
    counts, progress = report["counts"], report["progress"]
    lines = [f"engine      {report['engine']}"]
    for role in ("watcher", "runner"):
        info = report[role]
        beat = info["heartbeat"] or {}
        if info["alive"]:
            lines.append(f"{role:11s} running (pid {beat.get('pid')}, {beat.get('state')}, "
                         f"seen {info['seconds_ago']:.0f} s ago)")
        elif beat:
            lines.append(f"{role:11s} not running (last state {beat.get('state')!r}, "
                         f"{_duration(info['seconds_ago'] or 0)} ago)")
    window = report["window"]
    lines.append(f"window      {window['window']} ({'open now' if window['open'] else 'closed; opens ' + str(window['opens_at'])})")
    lines.append(f"paused      {'yes (appliance resume)' if report['paused'] else 'no'}")
    lines.append(f"queue       {counts['queued']} queued, {counts['running']} running")
    text = (f"progress    {progress['finished']}/{progress['total']} done "
            f"({counts['accepted']} samples, {counts['rejected']} rejected, "
            f"{counts['failed']} failed)")
    if progress["per_episode_seconds"] is not None:
        text += f", {progress['per_episode_seconds']:.1f} s avg"
        if progress["pending"]:
            text += f", ~{_duration(progress['eta_seconds'])} left"
    lines.append(text)
    for node in report.get("cluster", {}).values():
        rate = node.get("episodes_per_second")
        ago = _duration(max(0.0, time.time() - node.get("updated", time.time())))
        lines.append(f"node        {node['name']}: {node['state']}, {node['engines']} engine(s), "
                     f"{node['episodes']} episodes" + (f", {rate:.2f}/s" if rate else "")
                     + f" (as of {ago} ago)")
    review = report["review"]
    lines.append(f"review      {review['approved']} approved, {review['rejected']} rejected, "
                 f"{review['unreviewed']} not reviewed (appliance review)")
    lines.append(f"inbox       {report['inbox_files']} file(s) not yet taken")
    lines.append(f"quarantine  {report['quarantined_files']} file(s)")
    for failure in report.get("intake_failures", []):
        lines.append(f"inbox file  {failure['file']}: {failure['tries']} tr"
                     f"{'y' if failure['tries'] == 1 else 'ies'}, {failure['error']}")
    beat = (report["watcher"]["heartbeat"] or {}) if report["watcher"]["alive"] else {}
    for folder in beat.get("unreadable_folders", []):
        lines.append(f"inbox folder {folder}: cannot be listed by the service (permission "
                     f"denied); its files wait")
    disk = report["disk"]
    low = " (LOW: no new work starts)" if disk["free_bytes"] < disk["min_free_bytes"] else ""
    lines.append(f"disk        {disk['free_bytes'] / 1e9:.1f} GB free of "
                 f"{disk['total_bytes'] / 1e9:.1f} GB{low}")
    if report["last_error"]:
        lines.append(f"last error  {report['last_error']}")
    return lines
