"""The evaluation report: one side-by-side table (text, Markdown, JSON) and PNG figures.

A run over several seeds (``aggregate``) has the same shape, with every number replaced by
``{"mean", "std", "per_seed"}``; the tables show it as "mean ± std". Figures are drawn with
Pillow and OpenCV (matplotlib is not a dependency of the appliance).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from appliance.imaging import save_png_atomic, write_atomic
from appliance.serialization import json_default

if TYPE_CHECKING:
    from appliance.evaluation.data import EvalData
    from appliance.evaluation.generators import GeneratorOutcome

DETECTION_ROWS = (
    ("pixel_auroc", "pixel AUROC"), ("pixel_ap", "pixel AP"), ("pixel_f1_max", "pixel F1-max"),
    ("image_auroc", "image AUROC"), ("image_ap", "image AP"), ("image_f1_max", "image F1-max"),
    ("pixel_auroc_class_mean", "pixel AUROC, mean over classes"),
    ("pixel_ap_class_mean", "pixel AP, mean over classes"),
    ("image_auroc_class_mean", "image AUROC, mean over classes"),
)
# (key, label, higher is better)
GENERATION_ROWS = (
    ("diversity_mean_over_types", "feature diversity, mean over defect types (up)", True),
    ("diversity_all", "feature diversity, all samples (up)", True),
    ("kernel_distance_to_real", "feature kernel distance to real defects (down)", False),
    ("mask_change_iou", "mask/change IoU (up)", True),
    ("mask_area_percent", "mask area, % of image", True),
    ("acceptance_rate", "judge acceptance rate", True),
    ("kept", "training samples kept", True),
)
TIMING_ROWS = (
    ("seconds_per_kept_sample", "synthesis s per kept sample"),
    ("synthesis_s", "synthesis s"), ("train_s", "UNet training s"), ("predict_s", "prediction s"),
)
COLOURS = ((220, 50, 47), (38, 139, 210), (133, 153, 0), (211, 54, 130), (181, 137, 0),
           (108, 113, 196), (42, 161, 152))


def _best_baseline(values: dict[str, float], higher: bool) -> tuple[str, float] | None:
    candidates = {k: v for k, v in values.items()
                  if k != "ours" and v is not None and math.isfinite(v)}
    if not candidates:
        return None
    name = (max if higher else min)(candidates, key=candidates.get)
    return name, candidates[name]


def _mean(value):
    """A number, or the mean of a multi-seed ``{"mean", "std", "per_seed"}``."""
    return value["mean"] if isinstance(value, dict) else value


def _defined(value) -> bool:
    """A metric that has a value: not missing, not NaN (or null, read back from JSON)."""
    value = _mean(value) if value is not None else None
    return value is not None and math.isfinite(value)


def ratios(metrics_by_generator: dict[str, dict]) -> dict[str, dict]:
    """ours / best baseline for every detection metric (> 1 means ours is better)."""
    if "ours" not in metrics_by_generator:
        return {}
    out = {}
    for key, _ in DETECTION_ROWS:
        best = _best_baseline({g: m.get(key) for g, m in metrics_by_generator.items()}, True)
        ours = metrics_by_generator["ours"].get(key)
        if best and ours is not None and best[1] > 0:
            out[key] = {"ratio": ours / best[1], "best_baseline": best[0]}
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _combine(values: list, plain_if_equal: bool = False):
    """One report field over seeds: dicts key by key (the keys every seed has), numbers as
    ``{"mean", "std", "per_seed"}``, anything else as is where every seed agrees, else listed
    as ``{"per_seed"}``. ``plain_if_equal``: numbers every seed agrees on stay plain too (the
    protocol's sizes and budgets)."""
    if all(isinstance(v, dict) for v in values):
        return {key: _combine([v[key] for v in values], plain_if_equal)
                for key in values[0] if all(key in v for v in values)}
    same = all(v == values[0] for v in values)
    if _is_number(values[0]) and all(_is_number(v) for v in values) and not (plain_if_equal and same):
        array = np.array(values, dtype=float)
        # Sample standard deviation: a few seeds estimate the spread of all possible seeds.
        std = float(array.std(ddof=1)) if len(array) > 1 else float("nan")
        return {"mean": float(array.mean()), "std": std, "per_seed": list(values)}
    return values[0] if same else {"per_seed": list(values)}


def aggregate(reports: dict[int, dict]) -> dict:
    """One report over several runs of the same comparison, ``{seed: report}``. Every number
    becomes ``{"mean", "std", "per_seed"}`` (std: sample, ddof=1; per_seed in the order of
    ``seeds``). The ratio to the best baseline is taken of the means, with the per-seed ratios
    beside it."""
    seeds = list(reports)
    runs = list(reports.values())
    names = [g for g in runs[0]["generators"] if all(g in r["generators"] for r in runs)]
    generators = {g: {section: _combine([r["generators"][g][section] for r in runs])
                      for section in ("metrics", "per_class", "generation", "timings")}
                  for g in names}
    ratio = ratios({g: {k: _mean(v) for k, v in generators[g]["metrics"].items()} for g in names})
    for key, cell in ratio.items():
        per_seed = [r["ratio_ours_to_best_baseline"].get(key) for r in runs]
        cell["per_seed"] = [c["ratio"] if c else None for c in per_seed]
        cell["best_baseline_per_seed"] = [c["best_baseline"] if c else None for c in per_seed]
    protocol = _combine([r["protocol"] for r in runs], plain_if_equal=True)
    protocol.pop("seed", None)
    protocol.get("train", {}).pop("seed", None)
    return {"category": runs[0]["category"], "seeds": seeds,
            "spread": "std is the sample standard deviation over the seeds (ddof=1)",
            "protocol": protocol, "generators": generators,
            "ratio_ours_to_best_baseline": ratio, "environment": runs[0]["environment"],
            "wall_seconds": None}


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, dict):  # over seeds
        if all(isinstance(v, (int, np.integer)) for v in value["per_seed"]):
            digits = 1  # a mean count
        spread = _fmt(value["std"], digits)
        return _fmt(value["mean"], digits) + ("" if spread in ("nan", "n/a") else f" ± {spread}")
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    value = float(value)
    return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"


def _rows(report: dict) -> list[tuple[str, list[str], str]]:
    """(label, one cell per generator, ratio cell) for every row of the main table."""
    gens = report["generators"]
    names = list(gens)
    ratio = report.get("ratio_ours_to_best_baseline", {})
    rows = []
    for key, label in DETECTION_ROWS:
        if not any(_defined(gens[g]["metrics"][key]) for g in names):
            continue  # a pixel metric where no real defect has a mask
        cell = ratio.get(key)
        rows.append((label, [_fmt(gens[g]["metrics"][key]) for g in names],
                     f"{cell['ratio']:.3f} ({cell['best_baseline']})" if cell else ""))
    for key, label, higher in GENERATION_ROWS:
        cells = {g: gens[g]["generation"].get(key) for g in names}
        values = {g: _mean(v) for g, v in cells.items()}
        ratio_cell = ""
        best = _best_baseline(values, higher)
        if ("ours" in values and values["ours"] is not None and best and best[1]
                and key not in ("kept", "mask_area_percent")):
            ratio_cell = f"{values['ours'] / best[1]:.3f} ({best[0]})"
        rows.append((label, [_fmt(cells[g]) for g in names], ratio_cell))
    for key, label in TIMING_ROWS:
        cells = {g: gens[g]["timings"].get(key) for g in names}
        values = {g: _mean(v) for g, v in cells.items()}
        best = _best_baseline(values, False)
        ratio_cell = (f"{values['ours'] / best[1]:.1f}x ({best[0]})"
                      if "ours" in values and best and best[1] else "")
        rows.append((label, [_fmt(cells[g], 2 if "per" not in key else 4) for g in names],
                     ratio_cell))
    return rows


def format_table(report: dict) -> str:
    names = list(report["generators"])
    header = ["metric"] + names + ["ours / best baseline"]
    body = [[label] + cells + [ratio] for label, cells, ratio in _rows(report)]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in body]
    protocol = report["protocol"]
    if protocol.get("normal_reference_distance") is not None:
        lines.append(f"(feature kernel distance of untouched normal crops to real defects: "
                     f"{_fmt(protocol['normal_reference_distance'])})")
    key, label = headline(report)
    if "seeds" in report and key in report["ratio_ours_to_best_baseline"]:
        cell = report["ratio_ours_to_best_baseline"][key]
        lines.append(f"({label}, ours / best baseline per seed: "
                     f"{', '.join(_fmt(r) for r in cell['per_seed'])}; of the means: "
                     f"{cell['ratio']:.3f})")
    lines += [f"({line})" for line in _interval_lines(report) + _detector_lines(report)]
    lines.append(f"({report['category']}: {_run_summary(report)}; {report['wall_seconds']:.0f} s)")
    return "\n".join(lines)


def _interval_lines(report: dict) -> list[str]:
    """The pixel-AP ratio's bootstrap range, where the run measured one."""
    cell = report.get("ratio_ours_to_best_baseline", {}).get("pixel_ap", {})
    if cell.get("interval_90") is None or None in cell["interval_90"]:
        return []
    low, high = cell["interval_90"]
    photos = ("every seed's test photos drawn again within its seed" if "seeds" in report
              else "the test photos drawn again")
    detectors = report["protocol"].get("detector_seeds", 1)
    if detectors > 1:
        drawn = f"{photos}, and each generator's {detectors} detector trainings"
        cause = "the choice of test photos and the luck of training move the ratio that much"
    else:
        drawn = photos
        cause = ("the choice of test photos alone moves the ratio that much; the luck of one "
                 "detector training, as large, is not in this range (--detector-seeds)")
    return [f"pixel AP, ours / best baseline ({cell['best_baseline']}) {cell['ratio']:.3f}: "
            f"in {cell['resamples']} resamples ({drawn}) 90 % of the ratios lie between "
            f"{low:.3f} and {high:.3f}, and ours is ahead in {cell['ahead']:.0%}; {cause}"]


def _detector_lines(report: dict) -> list[str]:
    """The headline metric of each detector trained on a generator's samples, in a run that
    trained several (a run over seeds lists them in each seed's report)."""
    key, label = headline(report)
    cells = {name: g["generation"].get("detectors") for name, g in report["generators"].items()}
    cells = {name: c for name, c in cells.items() if c and isinstance(c.get(key), list)}
    if not cells or "seeds" in report:
        return []
    parts = [f"{name} {', '.join(_fmt(v) for v in c[key])}" for name, c in cells.items()]
    return [f"{label} of each detector (seeds "
            f"{', '.join(map(str, next(iter(cells.values()))['seeds']))}): " + "; ".join(parts)]


def headline(report: dict) -> tuple[str, str]:
    """(key, label) of the headline metric: pixel AP, or image AUROC when no real defect of the
    test set has a mask (image-level labels only, so no pixel metric is defined)."""
    metrics = [g["metrics"] for g in report["generators"].values()]
    defined = any(_defined(m.get("pixel_ap")) for m in metrics)
    return ("pixel_ap", "pixel AP") if defined else ("image_auroc", "image AUROC")


def _run_summary(report: dict) -> str:
    protocol = report["protocol"]
    seeds = (f"mean ± sample std over seeds {', '.join(map(str, report['seeds']))}"
             if "seeds" in report else f"seed {protocol['seed']}")
    shots = f"{protocol['few_shot']}-shot" if protocol.get("few_shot") else "zero-shot"
    detectors = protocol.get("detector_seeds", 1)
    trained = (f"{protocol['train']['epochs']} epochs, mean of {detectors} detectors per "
               "generator" if detectors > 1 else f"{protocol['train']['epochs']} epochs")
    return (f"{_fmt(protocol['train_normals'])} train normals, "
            f"{_fmt(protocol['test_normals'])} test normals, "
            f"{_fmt(protocol['test_defects'])} real defects, {protocol['size']} px, {shots}, "
            f"{trained}, {seeds}")


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def format_markdown(report: dict) -> str:
    gens = report["generators"]
    names = list(gens)
    protocol = report["protocol"]
    seeds = report.get("seeds")
    runs = (f"seeds {', '.join(map(str, seeds))} (each its own split, synthesis and training: "
            "seed-N/report.md; cells are mean ± sample standard deviation over the seeds)"
            if seeds else f"seed {protocol['seed']}")
    lines = [f"# Synthetic data evaluation: {report['category']}", "",
             f"Same UNet ({protocol['unet']}), same {protocol['train']['epochs']} epochs, batch "
             f"{protocol['train']['batch_size']}, {runs}, {protocol['size']} px, "
             + (f"{protocol['detector_seeds']} detectors trained (metrics: their mean), "
                if protocol.get("detector_seeds", 1) > 1 else "") + "for every "
             f"generator. Train normals: {_fmt(protocol['train_normals'])}; test: "
             f"{_fmt(protocol['test_normals'])} held-out normals + "
             f"{_fmt(protocol['test_defects'])} real defects.", ""]
    lines += _markdown_table(["metric"] + names + ["ours / best baseline"],
                             [[label] + cells + [ratio] for label, cells, ratio in _rows(report)])
    spread = _interval_lines(report) + _detector_lines(report)
    if spread:
        lines += [""] + [f"- {line}." for line in spread]
    if seeds:
        lines += _seed_ratio_section(report)
    lines += _few_shot_section(protocol, bool(seeds))
    lines += _image_level_section(report)
    lines += _acceptance_section(gens)
    classes = sorted({c for g in gens.values() for c in g["per_class"]})
    for key, label in (("pixel_ap", "Pixel AP"), ("pixel_auroc", "Pixel AUROC"),
                       ("image_auroc", "Image AUROC")):
        if not any(_defined(g["per_class"][c][key]) for g in gens.values() for c in classes):
            continue  # pixel tables where no real defect has a mask
        lines += ["", f"## {label} per defect class (class images + all held-out normals)", ""]
        lines += _markdown_table(["class", "images"] + names,
                                 [[c, _fmt(_mean(next(iter(gens.values()))["per_class"][c]["images"]), 0)]
                                  + [_fmt(gens[g]["per_class"][c][key]) for g in names]
                                  for c in classes])
    lines += ["", "## How to read this", "",
              "- Detection rows: a UNet trained only on each generator's synthetic anomalies (and "
              "the clean normals they came from), tested on real defects. Higher is better. "
              "The ratio column is ours divided by the best baseline: above 1 means ours taught "
              "the detector more.",
              ("- Pixel AP is the headline: it is what segmentation quality on real defects "
               "depends on, and it is not inflated by the many easy background pixels as AUROC is."
               if headline(report)[0] == "pixel_ap" else
               "- Image AUROC is the headline here: no real defect has a mask, so no pixel metric "
               "is defined. It says how well the detector tells defective photos from good ones, "
               "not whether it finds the defect in them."),
              "- Generation rows are measurements of the samples themselves, in the feature space "
              "of an ImageNet EfficientNet-Lite0. They are stand-ins, not the paper's Inception "
              "Score or IC-LPIPS. Diversity: mean pairwise cosine distance of defect crops (per "
              "defect type, then averaged). Kernel distance: KID-style squared MMD between "
              "synthetic and real defect crops, lower is closer to real. Mask/change IoU: how "
              "exactly the label covers what changed (change = any channel moved by more than "
              "8 grey levels). Acceptance: share of episodes the engine's own judge accepted "
              "(the baselines have no judge). Mask area: how many defect pixels a training "
              "sample carries.",
              f"- Kernel distance anchor: clean test normals cropped at the real defects' boxes "
              f"score {_fmt(protocol.get('normal_reference_distance'))}. Real defect crops are "
              "mostly ordinary surface, so a generator that changes little scores low too; only "
              "a distance below this anchor says the samples look more like real defects than "
              "an untouched part does.",
              "- When one class holds most defect pixels (on the magnetic tiles, 'uneven' marks "
              "whole bands), the overall pixel metrics mostly measure that class: read the "
              "'mean over classes' rows and the per-class tables too.",
              "- Timing rows are measured in this run, on this machine."]
    if seeds:
        lines.append("- Over seeds, the ratio column is the ratio of the means (not the mean of "
                     "the per-seed ratios, which are listed above).")
    if protocol.get("grayscale_training"):
        lines.append("- The normals are greyscale, so every generator's training images were "
                     "converted to greyscale before training (a colour cue would not transfer).")
    return "\n".join(lines) + "\n"


def _seed_ratio_section(report: dict) -> list[str]:
    ratio = report["ratio_ours_to_best_baseline"]
    if not ratio:
        return []

    def cell(value, best) -> str:
        return f"{_fmt(value)} ({best})" if value is not None else "n/a"

    rows = [[label] + [cell(v, b) for v, b in zip(ratio[key]["per_seed"],
                                                   ratio[key]["best_baseline_per_seed"])]
            + [cell(ratio[key]["ratio"], ratio[key]["best_baseline"])]
            for key, label in DETECTION_ROWS if key in ratio]
    return (["", "## Ours / best baseline per seed", ""]
            + _markdown_table(["metric"] + [f"seed {s}" for s in report["seeds"]]
                              + ["of the means"], rows))


def _image_level_section(report: dict) -> list[str]:
    classes = report["protocol"].get("image_level_classes") or []
    if not classes:
        return []
    key, label = headline(report)
    return ["", "## Image-level labels", "",
            f"The photos of {', '.join(classes)} have no masks: they are known to be defective, "
            "not where. They count in the image metrics and are left out of the pixel metrics, "
            "which cover only the classes with masks (and the held-out normals), as do the "
            "feature-space measurements against real defect crops. In examples.png their "
            "ground truth has no outline."
            + (f" No class has masks, so the headline is {label}." if key != "pixel_ap" else "")]


def _few_shot_section(protocol: dict, over_seeds: bool) -> list[str]:
    k = protocol.get("few_shot")
    if not k:
        return []
    shots = protocol.get("shots_per_class", {})
    tested = protocol.get("test_defects_per_class", {})
    lines = ["", "## Few-shot protocol", "",
             f"{k} real defect{'s' if k > 1 else ''} per type (drawn with the seed) were taken "
             "out of the test set and "
             "given to the generators that can use them (ours, copypaste); the other generators "
             "never see them. The test set is the rest.", ""]
    lines += _markdown_table(["defect type", "shots", "test images"],
                             [[d, _fmt(_mean(shots.get(d, 0)), 0), _fmt(_mean(n), 0)]
                              for d, n in tested.items()])
    lines.append("")
    for defect, taken in protocol.get("shots_capped", {}).items():
        lines.append(f"- {defect} has too few images for {k} shots: {_fmt(_mean(taken), 0)} "
                     "taken, so that at least one stays in the test set.")
    if over_seeds:
        lines.append("- Each seed drew its own shots: the files are listed in seed-N/report.md.")
    else:
        lines += ["Shot files:", ""] + [f"- `{path}`" for path in protocol.get("shots", [])]
    return lines


def _acceptance_section(gens: dict) -> list[str]:
    judged = [g for g in gens if gens[g]["generation"].get("acceptance_by_defect")]
    if not judged:
        return []
    defects = sorted({d for g in judged for d in gens[g]["generation"]["acceptance_by_defect"]})

    def passed(g: str, d: str, key: str):
        cell = (gens[g]["generation"].get("judge_pass_by_defect") or {}).get(d)
        return _fmt(cell.get(key)) if isinstance(cell, dict) else "n/a"

    header = ["defect type"]
    for g in judged:
        header += [f"{g}: episodes accepted", f"{g}: first attempts passed",
                   f"{g}: all attempts passed"]
    rows = [[d] + [cell for g in judged
                   for cell in (_fmt(gens[g]["generation"]["acceptance_by_defect"].get(d)),
                                passed(g, d, "first_attempt"), passed(g, d, "all_attempts"))]
            for d in defects]
    return (["", "## Judge acceptance per defect type", "",
             "Episodes accepted (after the policy's retries) over episodes that made a sample, and "
             "the judge's own verdicts: the share of first attempts and of all image_gen attempts "
             "it passed. A judge that passes everything is not judging.", ""]
            + _markdown_table(header, rows))


def _clean(value):
    """NaN is not JSON: write null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value


def write_reports(out_dir: Path, report: dict) -> None:
    text = json.dumps(_clean(report), indent=2, default=json_default, allow_nan=False)
    write_atomic(out_dir / "report.json", text.encode())
    write_atomic(out_dir / "report.md", format_markdown(report).encode())


# --- figures -----------------------------------------------------------------------------------


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _pr_panel(title: str, curves: list[tuple[str, np.ndarray, np.ndarray, float]],
              size: tuple[int, int] = (520, 440)) -> Image.Image:
    width, height = size
    left, right, top, bottom = 50, 20, 30, 40
    panel = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(panel)
    font = _font()
    x0, y0, x1, y1 = left, top, width - right, height - bottom

    def to_px(recall: float, precision: float) -> tuple[float, float]:
        return x0 + recall * (x1 - x0), y1 - precision * (y1 - y0)

    for tick in np.linspace(0, 1, 6):
        tx, ty = to_px(tick, tick)
        draw.line([(tx, y0), (tx, y1)], fill=(230, 230, 230))
        draw.line([(x0, ty), (x1, ty)], fill=(230, 230, 230))
        draw.text((tx - 8, y1 + 5), f"{tick:.1f}", fill="black", font=font)
        draw.text((x0 - 30, ty - 6), f"{tick:.1f}", fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((x0, 8), title, fill="black", font=font)
    draw.text(((x0 + x1) / 2 - 15, height - 18), "recall", fill="black", font=font)
    draw.text((4, y0 - 18), "precision", fill="black", font=font)
    for index, (name, recall, precision, ap) in enumerate(curves):
        colour = COLOURS[index % len(COLOURS)]
        points = [to_px(float(r), float(p)) for r, p in zip(recall, precision)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((x1 - 150, y0 + 8 + 14 * index), f"{name}  AP {ap:.3f}", fill=colour, font=font)
    return panel


def _heat(anomaly_map: np.ndarray) -> np.ndarray:
    grey = np.clip(anomaly_map * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def _outlined(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.ascontiguousarray(image.copy())
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (255, 40, 40), 1)
    return out


def _grid(rows: list[list[np.ndarray]], labels_top: Sequence[str], labels_left: Sequence[str],
          cell: int = 128) -> Image.Image:
    n_cols = max(len(r) for r in rows)
    pad_left, pad_top = 90, 18
    canvas = Image.new("RGB", (pad_left + n_cols * (cell + 4), pad_top + len(rows) * (cell + 4)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for c, label in enumerate(labels_top):
        draw.text((pad_left + c * (cell + 4) + 2, 3), label[:20], fill="black", font=font)
    for r, (row, label) in enumerate(zip(rows, labels_left)):
        y = pad_top + r * (cell + 4)
        draw.text((3, y + cell // 2 - 6), label[:14], fill="black", font=font)
        for c, tile in enumerate(row):
            pil = Image.fromarray(tile).resize((cell, cell), Image.Resampling.BILINEAR)
            canvas.paste(pil, (pad_left + c * (cell + 4), y))
    return canvas


def write_figures(out_dir: Path, data: "EvalData", outcomes: Sequence["GeneratorOutcome"],
                  examples: Sequence[int]) -> None:
    pixel = [(o.name, *o.pr_pixel, o.metrics["pixel_ap"]) for o in outcomes]
    image = [(o.name, *o.pr_image, o.metrics["image_ap"]) for o in outcomes]
    panels = [_pr_panel("image-level PR", image)]
    if any(_defined(o.metrics["pixel_ap"]) for o in outcomes):  # else no real defect has a mask
        panels.insert(0, _pr_panel("pixel-level PR, real defects", pixel))
    both = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for i, panel in enumerate(panels):
        both.paste(panel, (sum(p.width for p in panels[:i]), 0))
    save_png_atomic(out_dir / "pr_curves.png", both)

    test = data.test_set
    rows, labels = [], []
    for row_index, test_index in enumerate(examples):
        item = test[test_index]
        rows.append([item.image, _outlined(item.image, item.mask)]
                    + [_heat(o.example_maps[row_index]) for o in outcomes])
        labels.append(item.defect)
    save_png_atomic(out_dir / "examples.png",
                    _grid(rows, ["image", "ground truth"] + [o.name for o in outcomes], labels))

    sample_rows = [[_outlined(image, mask) for image, mask in o.train_examples] for o in outcomes]
    save_png_atomic(out_dir / "training_samples.png",
                    _grid(sample_rows, [], [o.name for o in outcomes]))
