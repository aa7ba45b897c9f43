"""MetaUAS: our network, its ONNX export, and the mask generator with its fallback."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from appliance.imaging import changed_pixels, mask_iou  # noqa: E402
from appliance.models.metauas_export import (MetaUAS, MetaUASConfig, export_checkpoint,  # noqa: E402
                                             load_checkpoint)
from appliance.tools.interfaces import MaskRequest  # noqa: E402
from appliance.tools.mask_gen_metauas import MetaUASMaskGenerator  # noqa: E402

SIZE = 64  # the tiny exported graph's input size: fast to trace and to run


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("metauas")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = export_checkpoint(folder / "metauas.onnx", None, MetaUASConfig.tiny(SIZE), seed=3)
    finally:
        torch.set_num_threads(threads)
    return report


@pytest.fixture(scope="module")
def pair(texture_image):
    """A real texture and the same with a dark blob painted on it (the known change)."""
    normal = np.ascontiguousarray(texture_image[:160, :200])
    edited = normal.copy()
    cv2.ellipse(edited, (120, 70), (22, 14), 30, 0, 360, (25, 25, 25), -1)
    return normal, edited


def test_full_size_network_has_the_published_shape():
    model = MetaUAS()
    # efficientnet-b4 feature widths as segmentation_models_pytorch reports them for MetaUAS.
    assert model.encoder.out_channels == [3, 48, 32, 56, 160, 448]
    assert len(model.encoder._blocks) == 32 and model.encoder.stage_ends == [6, 10, 22, 32]
    params = sum(p.numel() for p in model.parameters())
    # metauas-256.ckpt is about 89 MB of float32 (parameters plus batch-norm statistics).
    assert 21e6 < params < 22.5e6


def test_onnx_export_matches_torch_with_a_dynamic_batch(tiny_onnx):
    import onnxruntime as ort

    assert tiny_onnx.max_abs_diff < 1e-4
    assert tiny_onnx.batch_sizes == (1, 3)
    session = ort.InferenceSession(str(tiny_onnx.path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["prompt"][1:] == [3, SIZE, SIZE] and not isinstance(shapes["prompt"][0], int)
    x = np.random.default_rng(0).random((5, 3, SIZE, SIZE), dtype=np.float32)
    (out,) = session.run(None, {"prompt": x, "query": x})
    assert out.shape == (5, 1, SIZE, SIZE) and 0 <= out.min() and out.max() <= 1


def test_checkpoint_loads_by_name_and_refuses_a_mismatch(tmp_path):
    config = MetaUASConfig.tiny(SIZE)
    torch.manual_seed(1)
    source = MetaUAS(config).eval()
    for module in source.modules():  # non-default statistics, so a failed load would show
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
    path = tmp_path / "metauas.ckpt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    target = MetaUAS(config).eval()
    report = load_checkpoint(target, path)
    assert report.ok and report.loaded == len(source.state_dict())
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(source(x, x.flip(-1)), target(x, x.flip(-1)))
    broken = {k: v for k, v in source.state_dict().items() if "mask_head" not in k}
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(MetaUAS(config), {"state_dict": broken})


class _MapNet(nn.Module):
    """A stand-in segmenter with a known answer: ``mode`` decides what it reports as anomalous."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, prompt: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        change = torch.sigmoid(((query - prompt).abs().amax(dim=1, keepdim=True) - 0.1) * 60)
        if self.mode == "inverted":
            return 1 - change
        if self.mode == "nothing":
            return change * 0
        return change


def _export(net: nn.Module, path, size: int = 128):
    example = (torch.rand(1, 3, size, size), torch.rand(1, 3, size, size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, on purpose
        torch.onnx.export(net, example, str(path), dynamo=False, input_names=["prompt", "query"],
                          output_names=["anomaly"], opset_version=18,
                          dynamic_axes={"prompt": {0: "batch"}, "query": {0: "batch"},
                                        "anomaly": {0: "batch"}})
    return path


def test_mask_follows_a_model_that_sees_the_change(tmp_path, pair):
    normal, edited = pair
    generator = MetaUASMaskGenerator(_export(_MapNet("change"), tmp_path / "change.onnx"))
    assert generator.size == 128 and "CPUExecutionProvider" in generator.providers
    results = generator.generate_masks([MaskRequest(normal, edited), MaskRequest(normal, edited)])
    truth = changed_pixels(normal, edited)
    for result in results:
        assert result.method == "metauas"
        assert result.mask.shape == normal.shape[:2] and result.mask.dtype == bool
        assert mask_iou(result.mask, truth) > 0.7
        assert result.threshold == 0.5


@pytest.mark.parametrize("mode, reason", [("inverted", "off the change"),
                                          ("nothing", "empty model mask")])
def test_falls_back_to_the_difference_mask(tmp_path, pair, mode, reason):
    normal, edited = pair
    generator = MetaUASMaskGenerator(_export(_MapNet(mode), tmp_path / f"{mode}.onnx"))
    result = generator.generate_masks([MaskRequest(normal, edited)])[0]
    assert result.method.startswith("difference (metauas fallback:") and reason in result.method
    assert mask_iou(result.mask, changed_pixels(normal, edited)) > 0.7


def test_tiny_random_model_runs_batched_with_a_sound_answer(tiny_onnx, pair):
    normal, edited = pair
    generator = MetaUASMaskGenerator(tiny_onnx.path, max_batch=2)
    requests = [MaskRequest(normal, edited), MaskRequest(normal, normal), MaskRequest(normal, edited)]
    results = generator.generate_masks(requests)
    assert len(results) == 3
    assert all(r.mask.shape == normal.shape[:2] for r in results)
    # No change at all: nothing to mask, whatever a random model says.
    assert not results[1].mask.any() and "no visible change" in results[1].method
    # A random model cannot be trusted; either it agrees with the pixels or the fallback answers.
    truth = changed_pixels(normal, edited)
    for result in (results[0], results[2]):
        if "fallback" in result.method:
            assert mask_iou(result.mask, truth) > 0.7
        else:
            assert result.method == "metauas" and result.mask.any()
    assert results[0].method == results[2].method
