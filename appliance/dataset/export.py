"""Exporting the reviewed part of a dataset: what people approved, in the MVTec-AD layout.

::

    OUT/<category>/train/good/*.png          every normal synthesis source, as in the dataset
    OUT/<category>/test/good/*.png           every held-back normal photo
    OUT/<category>/test/<defect>/000.png     approved samples, renumbered from 000
    OUT/<category>/ground_truth/<defect>/000_mask.png
    OUT/trajectories/<category>/<defect>/000/
    OUT/manifest.jsonl, OUT/normals.jsonl    the dataset's records, paths rewritten; each
                                             sample's record names its dataset image and review
    OUT/review_feedback.jsonl                rejected samples with who rejected them and why,
    OUT/feedback/<category>/<defect>/...     and their image and mask: negative examples

The export is built in a hidden sibling folder and renamed into place, so OUT is either absent
or complete. Files are copied, not linked: the export is handed on and must not change when the
dataset does.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from appliance.dataset.check import check_dataset
from appliance.imaging import fsync_dir
from appliance.names import Name, path_under
from appliance.storage import JobStore
from appliance.storage.exports import jsonl_line, normal_record
from appliance.storage.layout import MANIFEST, NORMALS
from appliance.storage.reviews import ReviewLog

FEEDBACK = "review_feedback.jsonl"
FEEDBACK_DIR = "feedback"


class ExportError(RuntimeError):
    """An export that cannot be made (target not empty, no store, nothing to export)."""


@dataclass
class ExportReport:
    out: Path
    samples: int = 0
    normals: int = 0
    test_good: int = 0
    feedback: int = 0
    left_out: int = 0  # not approved (with --approved) and not rejected
    by_group: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        lines = [f"exported {self.samples} samples, {self.normals} normal photos "
                 f"({self.test_good} in test/good) to {self.out}"]
        lines += [f"  {group}: {n}" for group, n in sorted(self.by_group.items())]
        lines.append(f"{self.feedback} rejected samples with their reasons in "
                     f"{self.out / FEEDBACK}")
        if self.left_out:
            lines.append(f"{self.left_out} samples not reviewed yet were left out")
        return lines


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def export_reviewed(root: Path, out: Path, approved_only: bool = True) -> ExportReport:
    """Write the dataset's approved samples (``approved_only``) or all but the rejected ones
    to ``out``, with the rejected ones as feedback."""
    root, out = Path(root), Path(out)
    if not (root / ".appliance").is_dir():
        raise ExportError(f"{root} is not a dataset written by the appliance (no job store)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not empty; choose a new folder")
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise ExportError(f"{out} lies inside the dataset {root}; choose a folder outside it")
    store = JobStore.for_dataset(root)
    try:
        decisions = ReviewLog(store).latest()
        samples = store.samples("ok")
        normals = store.normals("ok")
    finally:
        store.close()
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    report = ExportReport(out)
    try:
        try:
            _export_into(root, partial, samples, normals, decisions, approved_only, report)
        except OSError as exc:
            raise ExportError(f"the export could not copy the dataset's files: {exc}") from exc
        if report.samples:
            check = check_dataset(partial)
            if check.problems:
                raise ExportError("the export did not pass its own check:\n  "
                                  + "\n  ".join(check.problems[:10]))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(partial, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def _export_into(root: Path, target: Path, samples: list[dict], normals: list[dict],
                 decisions: dict[int, dict], approved_only: bool, report: ExportReport) -> None:
    target.mkdir(parents=True)
    normal_lines = []
    for row in normals:
        _copy(root / row["path"], target / row["path"])
        normal_lines.append(jsonl_line(normal_record(row)))
        report.normals += 1
        report.test_good += row.get("split") == "test"
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    feedback_lines = []
    for row in sorted(samples, key=lambda r: (r["category"], r["defect"], r["number"])):
        decision = decisions.get(row["id"])
        state = decision["decision"] if decision else None
        if state == "rejected":
            feedback_lines.append(jsonl_line(_feedback(root, target, row, decision)))
            report.feedback += 1
        elif state == "approved" or not approved_only:
            groups[(row["category"], row["defect"])].append(row)
        else:
            report.left_out += 1
    manifest_lines = []
    for (category, defect), rows in sorted(groups.items()):
        names = Name(category, "category"), Name(defect, "defect")
        for number, row in enumerate(rows):
            record = json.loads(row["record"])
            stem = f"{number:03d}"
            image = path_under(target, names[0], "test", names[1]) / f"{stem}.png"
            mask = path_under(target, names[0], "ground_truth", names[1]) / f"{stem}_mask.png"
            trajectory = path_under(target, "trajectories", *names) / stem
            _copy(root / row["image"], image)
            _copy(root / row["mask"], mask)
            if (root / row["trajectory"]).is_dir():
                shutil.copytree(root / row["trajectory"], trajectory)
            decision = decisions.get(row["id"])
            record.update({
                "image": str(image.relative_to(target)), "mask": str(mask.relative_to(target)),
                "trajectory": str(trajectory.relative_to(target)),
                "dataset_image": row["image"],
                "human_review": None if decision is None else _review(decision)})
            manifest_lines.append(jsonl_line(record))
        report.by_group[f"{category}/{defect}"] = len(rows)
        report.samples += len(rows)
    (target / MANIFEST).write_text("".join(manifest_lines), encoding="utf-8")
    (target / NORMALS).write_text("".join(normal_lines), encoding="utf-8")
    (target / FEEDBACK).write_text("".join(feedback_lines), encoding="utf-8")
    (target / "export.json").write_text(json.dumps({
        "dataset": str(root.resolve()), "approved_only": approved_only,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "samples": report.samples,
        "feedback": report.feedback, "left_out": report.left_out}, indent=2) + "\n",
        encoding="utf-8")


def _review(decision: dict) -> dict:
    return {"decision": decision["decision"], "reason": decision["reason"],
            "reviewer": decision["reviewer"],
            "decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                        time.localtime(decision["decided_at"]))}


def _feedback(root: Path, target: Path, row: dict, decision: dict) -> dict:
    """A rejected sample as a negative example: its record, the review, its image and mask."""
    record = json.loads(row["record"])
    names = Name(row["category"], "category"), Name(row["defect"], "defect")
    folder = path_under(target, FEEDBACK_DIR, *names)
    stem = Path(row["image"]).stem
    _copy(root / row["image"], folder / f"{stem}.png")
    _copy(root / row["mask"], folder / f"{stem}_mask.png")
    keep = ("key", "category", "defect", "prompt", "score", "location_score", "quality_score",
            "policy", "backends", "source_sha256", "seed", "mask_area_ratio")
    return {**{k: record.get(k) for k in keep}, "judge_review": record.get("review"),
            "dataset_image": row["image"], "image": f"{FEEDBACK_DIR}/{names[0]}/{names[1]}/{stem}.png",
            "mask": f"{FEEDBACK_DIR}/{names[0]}/{names[1]}/{stem}_mask.png",
            "human_review": _review(decision)}
