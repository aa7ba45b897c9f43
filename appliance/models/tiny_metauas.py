"""A tiny random-weight MetaUAS ONNX model: the real network code at a few hundred kB."""

from __future__ import annotations

import json
from pathlib import Path

ONNX_NAME = "metauas.onnx"
TINY_INPUT_SIZE = 128


def build_tiny_metauas(folder: Path, input_size: int = TINY_INPUT_SIZE, seed: int = 0) -> Path:
    """Export the MetaUAS-shaped network (random weights) to ``folder/metauas.onnx``.

    The export goes through the same ``export_checkpoint`` as the real checkpoint (dynamic batch
    axis, torch-vs-onnxruntime check), so a test of this file tests the export path too.
    """
    import torch

    from appliance.models.metauas_export import MetaUASConfig, export_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny graphs trace faster single-threaded on a busy box
    try:
        report = export_checkpoint(folder / ONNX_NAME, None, MetaUASConfig.tiny(input_size), seed)
    finally:
        torch.set_num_threads(threads)
    (folder / "export.json").write_text(json.dumps({
        "checkpoint": None, "exporter": report.exporter, "input_size": report.input_size,
        "max_abs_diff": report.max_abs_diff, "config": report.config}, indent=2), encoding="utf-8")
    return report.path
