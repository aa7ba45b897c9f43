"""The HTML contact sheet a quality engineer scans in the morning.

One card per sample: the normal photo, the synthesized defect, the mask drawn over it, the
judge's scores and review, and the instruction that produced it. Thumbnails and overlays are
small PNGs beside the page, so it opens from a file share without a server.
"""

from __future__ import annotations

import html
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from appliance.dataset.writer import DatasetWriter
from appliance.imaging import WORKING_PNG_LEVEL, save_png_atomic, write_atomic

SHEET = "index.html"
THUMBS = "contact_sheet"
THUMB_SIZE = 256

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#f4f4f4;color:#222}
h1{margin:0 0 .3rem}h2{margin:1.6rem 0 .5rem;border-bottom:1px solid #ccc}
.summary{color:#555;margin-bottom:1rem}.grid{display:flex;flex-wrap:wrap;gap:.8rem}
.card{background:#fff;border-radius:6px;padding:.5rem;box-shadow:0 1px 3px #0002;width:560px}
.card img{width:180px;height:180px;object-fit:contain;background:#111;margin-right:2px}
.meta{font-size:.8rem;margin-top:.3rem}.score{font-weight:600}
.prompt,.review{font-size:.75rem;color:#555;margin-top:.2rem}
.labels{font-size:.7rem;color:#888;display:flex;gap:130px;padding-left:4px}
"""


def _thumbnail(source: Path, target: Path) -> None:
    with Image.open(source) as image:
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        save_png_atomic(target, image.convert("RGB"), WORKING_PNG_LEVEL)


def _overlay(image_path: Path, mask_path: Path, target: Path) -> None:
    """The defect image with its mask tinted red and outlined, for a quick visual check."""
    with Image.open(image_path) as image, Image.open(mask_path) as mask:
        image = image.convert("RGB")
        mask = mask.convert("L")
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        mask = mask.resize(image.size, Image.NEAREST)
    rgb = np.asarray(image, dtype=np.float32)
    inside = np.asarray(mask) > 127
    rgb[inside] = 0.55 * rgb[inside] + 0.45 * np.array([255, 40, 40])
    save_png_atomic(target, Image.fromarray(rgb.clip(0, 255).astype(np.uint8)), WORKING_PNG_LEVEL)


def write_contact_sheet(root: Path, title: str = "Synthesized defects",
                        thumbs: Path | None = None) -> Path:
    """(Re)build ``index.html`` from the manifest; returns its path. Thumbnails are made once
    per sample in ``thumbs`` (default ``root/contact_sheet``; a batch's page uses the dataset's)."""
    root = Path(root)
    writer = DatasetWriter(root)
    records = writer.records()
    normals = {json.dumps([n["source_sha256"], n["category"]]): n["path"]
               for n in writer.normals()}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["category"], record["defect"])].append(record)
    thumbs = Path(thumbs) if thumbs is not None else root / THUMBS
    sections = []
    for (category, defect), items in sorted(groups.items()):
        cards = []
        for record in items:
            stem = f"{category}__{defect}__{Path(record['image']).stem}"
            image_thumb = thumbs / f"{stem}.png"
            overlay = thumbs / f"{stem}_overlay.png"
            if not overlay.exists():
                _thumbnail(root / record["image"], image_thumb)
                _overlay(root / record["image"], root / record["mask"], overlay)
            normal = normals.get(json.dumps([record["source_sha256"], category]))
            normal_src = normal or f"{record['trajectory']}/images/1.png"
            cards.append(f"""<div class="card">
<div class="labels"><span>normal</span><span>defect</span><span>mask</span></div>
<img src="{html.escape(normal_src)}" alt="normal" loading="lazy"><img src="{html.escape(os.path.relpath(image_thumb, root))}" alt="defect" loading="lazy"><img src="{html.escape(os.path.relpath(overlay, root))}" alt="mask overlay" loading="lazy">
<div class="meta"><span class="score">score {record['score']}/10</span> (location {record['location_score']}/5, quality {record['quality_score']}/5) &middot; {record['turns']} turns &middot; {record['image_gen_attempts']} attempt(s){' &middot; knowledge used' if record.get('knowledge_retrieved') else ''} &middot; <a href="{html.escape(record['image'])}">{html.escape(record['image'])}</a> &middot; <a href="{html.escape(record['trajectory'])}/messages.json">trajectory</a></div>
<div class="prompt"><b>Instruction:</b> {html.escape(record['prompt'])}</div>
<div class="review"><b>Judge:</b> {html.escape(record['review'])}</div>
<div class="review">source {html.escape(record['source'])} &middot; seed {record['seed']}</div>
</div>""")
        sections.append(f"<h2>{html.escape(category)} / {html.escape(defect)} ({len(items)})</h2>"
                        f"<div class=\"grid\">{''.join(cards)}</div>")
    rejected = writer.rejected()
    engines = sorted({r.get("engine", "") for r in records})
    summary = (f"{len(records)} samples in {len(groups)} (category, defect) groups; "
               f"{len(rejected)} episodes rejected; engine {', '.join(engines) or 'n/a'}")
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<div class=\"summary\">{html.escape(summary)}</div>{''.join(sections)}</body></html>")
    path = root / SHEET
    write_atomic(path, page.encode("utf-8"))
    return path

