"""Checking a written dataset against what its readers (anomalib, the contact sheet, SFT export)
rely on: every manifest line's image and mask exist and pair up, masks are 8-bit 0/255 and not
empty, images and masks have the same size, trajectories are readable, and no sample file sits
in the tree without a manifest line.

It also checks the layout rules of anomalib's readers (``MVTecAD`` and ``Folder``, read from
anomalib 2.x): per category only ``train/good`` under ``train``; PNG files only; test images and
masks pair one to one when both are sorted by path (anomalib pairs them by position, then checks
that the image's stem is in the mask's); ``test/good`` holds normal photos that are not also in
``train/good``, so image-level metrics have normal test images. Paths that are not printable
ASCII are a warning: anomalib's ``MVTecAD`` refuses them (its ``Folder`` reader does not).

``appliance dataset check DATASET`` runs it; the tests run it on every dataset they write.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from appliance.storage.exports import read_jsonl
from appliance.storage.layout import MANIFEST, NORMALS
from appliance.storage.reconcile import category_dirs

MANIFEST_KEYS = ("key", "image", "mask", "category", "defect", "source_sha256", "seed", "engine",
                 "policy", "backends", "location_score", "quality_score", "prompt", "trajectory")


@dataclass
class DatasetCheck:
    root: Path
    samples: int = 0
    normals: int = 0
    by_category: Counter = field(default_factory=Counter)  # (category, defect) -> samples
    engines: Counter = field(default_factory=Counter)  # policy + backends -> samples
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    test_good: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and self.samples > 0

    def lines(self) -> list[str]:
        lines = [f"{self.samples} samples, {self.normals} normal photos ({self.test_good} held "
                 f"back in test/good) in {self.root}"]
        lines += [f"  {category}/{defect}: {n}" for (category, defect), n in sorted(self.by_category.items())]
        lines += [f"  made by {engine}: {n}" for engine, n in self.engines.most_common()]
        if self.samples == 0 and not self.problems:
            lines.append("no samples yet")
        lines += [f"warning {w}" for w in self.warnings]
        lines += [f"PROBLEM {p}" for p in self.problems]
        return lines


def _check_pair(root: Path, record: dict, problems: list[str]) -> None:
    image_path, mask_path = root / record["image"], root / record["mask"]
    where = record["image"]
    if not image_path.is_file() or not mask_path.is_file():
        problems.append(f"{where}: image or mask file is missing")
        return
    if Path(record["image"]).stem not in Path(record["mask"]).stem:
        problems.append(f"{where}: mask name {record['mask']} does not pair with it")
    try:
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            if image.format != "PNG" or mask.format != "PNG":
                problems.append(f"{where}: image and mask must be PNG")
            if image.size != mask.size:
                problems.append(f"{where}: image {image.size} and mask {mask.size} differ in size")
            if mask.mode != "L":
                problems.append(f"{where}: mask mode {mask.mode}, expected 8-bit L")
            values = np.unique(np.asarray(mask))
    except OSError as exc:
        problems.append(f"{where}: unreadable ({exc})")
        return
    if not set(values.tolist()) <= {0, 255}:
        problems.append(f"{where}: mask values {values.tolist()[:6]} are not only 0 and 255")
    elif 255 not in values:
        problems.append(f"{where}: mask is empty")


def _check_trajectory(root: Path, record: dict, problems: list[str]) -> None:
    folder = root / record["trajectory"]
    try:
        messages = json.loads((folder / "messages.json").read_text(encoding="utf-8"))
        episode = json.loads((folder / "episode.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        problems.append(f"{record['trajectory']}: unreadable trajectory ({exc})")
        return
    for message in messages:
        for part in message.get("content", []):
            if part.get("type") == "image" and not (folder / part.get("image", "")).is_file():
                problems.append(f"{record['trajectory']}: image {part.get('image')} is missing")
                return
    if episode.get("policy") != record.get("policy"):
        problems.append(f"{record['trajectory']}: its policy {episode.get('policy')!r} is not "
                        f"the manifest's {record.get('policy')!r}")


def check_dataset(root: Path) -> DatasetCheck:
    root = Path(root)
    report = DatasetCheck(root)
    if not root.is_dir():
        report.problems.append(f"{root} is not a folder")
        return report
    records = read_jsonl(root / MANIFEST, report.problems)
    normals = read_jsonl(root / NORMALS, report.problems)
    report.normals = len(normals)
    listed: set[Path] = set()
    for number, record in enumerate(records, start=1):
        missing = [key for key in MANIFEST_KEYS if key not in record]
        if missing:
            report.problems.append(f"{MANIFEST}:{number}: missing {', '.join(missing)}")
            continue
        report.samples += 1
        report.by_category[(record["category"], record["defect"])] += 1
        backends = ", ".join(f"{k}={v}" for k, v in sorted(record["backends"].items()))
        report.engines[f"policy={record['policy']}, {backends}"] += 1
        listed.update({(root / record["image"]).resolve(), (root / record["mask"]).resolve()})
        _check_pair(root, record, report.problems)
        _check_trajectory(root, record, report.problems)
    duplicates = [key for key, n in Counter(r.get("image") for r in records).items() if n > 1]
    report.problems += [f"{image}: listed more than once in {MANIFEST}" for image in duplicates]
    for category in sorted(p for p in root.iterdir() if (p / "test").is_dir()):
        for kind in ("test", "ground_truth"):
            for path in sorted((category / kind).glob("*/*.png")):
                if kind == "test" and path.parent.name == "good":
                    continue  # normal photos, checked against normals.jsonl below
                if path.resolve() not in listed:
                    report.problems.append(f"{path.relative_to(root)}: not in {MANIFEST}")
    _check_layout(root, records, normals, report)
    return report


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_layout(root: Path, records: list[dict], normals: list[dict],
                  report: DatasetCheck) -> None:
    """What anomalib's MVTecAD and Folder readers need of each category's folders."""
    problems, warnings = report.problems, report.warnings
    sources = {(r.get("category"), r.get("source_sha256")) for r in records}
    for normal in normals:
        if not (root / normal.get("path", "")).is_file():
            problems.append(f"{normal.get('path')}: in {NORMALS} but missing")
        if normal.get("split") == "test":
            report.test_good += 1
            if (normal.get("category"), normal.get("source_sha256")) in sources:
                problems.append(f"{normal.get('path')}: held back in test/good but also the "
                                "source of a sample")
    for category in category_dirs(root):
        name = category.name
        if not name.isascii() or not name.isprintable():
            warnings.append(f"{name}/: not a printable ASCII name; anomalib's MVTecAD reader "
                            "refuses such paths (its Folder reader takes them)")
        train = category / "train"
        if train.is_dir():
            others = sorted(p.name for p in train.iterdir() if p.name != "good")
            if others:
                problems.append(f"{name}/train/: only good/ belongs here, found "
                                f"{', '.join(others[:5])}")
        for folder in sorted(category.glob("*/*")):
            if folder.is_dir():
                odd = sorted(p.name for p in folder.iterdir() if p.suffix != ".png"
                             and not p.name.startswith("."))
                if odd:
                    problems.append(f"{folder.relative_to(root)}/: anomalib reads .png files "
                                    f"only; found {', '.join(odd[:5])}")
        test, truth = category / "test", category / "ground_truth"
        images = sorted(p for p in test.glob("*/*.png") if p.parent.name != "good") \
            if test.is_dir() else []
        masks = sorted(truth.glob("*/*.png")) if truth.is_dir() else []
        if len(images) != len(masks):
            problems.append(f"{name}/: {len(images)} defect images but {len(masks)} masks; "
                            "anomalib pairs them one to one")
        for image, mask in zip(images, masks):
            if image.parent.name != mask.parent.name or image.stem not in mask.stem:
                problems.append(f"{image.relative_to(root)}: sorted by path, anomalib would "
                                f"pair it with {mask.relative_to(root)}")
                break
        good = test / "good"
        train_files = {_digest(p): p for p in (train / "good").glob("*.png")} \
            if train.is_dir() else {}
        for path in sorted(good.glob("*.png")) if good.is_dir() else []:
            twin = train_files.get(_digest(path))
            if twin is not None:
                problems.append(f"{path.relative_to(root)}: the same file is in train/good "
                                f"({twin.name}); a test photo must not be trained on")
        if images and not (good.is_dir() and any(good.glob("*.png"))):
            warnings.append(f"{name}/test/good/ is empty: a detector's image-level metrics "
                            "need normal test photos (anomalib borrows some from train/good); "
                            "add photos or raise the test/good share")
