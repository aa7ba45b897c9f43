"""MetaUAS: our network against upstream's, its ONNX export, and the mask generator."""

from __future__ import annotations

import warnings
import zlib

import cv2
import numpy as np
import pytest
import torch
from conftest import require_module
from torch import nn

require_module("onnxruntime")

from appliance.imaging import changed_pixels, mask_iou  # noqa: E402
from appliance.models import metauas_export  # noqa: E402
from appliance.models.metauas_export import (  # noqa: E402
    MetaUAS,
    MetaUASConfig,
    SameConv2d,
    export_checkpoint,
    export_onnx,
    load_checkpoint,
    verify_onnx,
)
from appliance.tools.interfaces import MaskRequest  # noqa: E402
from appliance.tools.mask_gen.metauas import MetaUASMaskGenerator, resize_like_upstream  # noqa: E402

SIZE = 64  # the tiny exported graph's input size: fast to trace and to run

# --- what upstream builds, written down by hand ---------------------------------------------------
# Read from gaobb/MetaUAS metauas.py at commit 228de8972ffb (MetaUAS.__init__ with the released
# settings of app.py/test.py: efficientnet-b4, unet, depths 5/5, 3 alignment layers, "sa", "cat"):
# smp get_encoder("efficientnet-b4"), UnetDecoder(encoder_channels=[3, 48, 32, 56, 160, 448],
# decoder_channels=[256, 128, 64, 64, 48], attention_type="scse", num_coam_layers=3),
# AlignmentModule widths [448, 160, 56] -> [224, 80, 28], mask_head Conv2d(48, 1, 1). The library
# code behind those calls: segmentation_models_pytorch 0.2.1 (EfficientNetEncoder deletes `_fc`),
# the efficientnet_pytorch 0.6.3 it pins (EfficientNet-B4: width 1.4, depth 1.8, image size 380),
# and the change-detection fork's UnetDecoder (ragavsachdeva/segmentation_models.pytorch, the one
# the MetaUAS author names in gaobb/MetaUAS issue #2; same code as The-Change-You-Want-to-See
# models/unet.py @506bb9737fee): the deepest map and two skips enter doubled, and a block without
# a skip gets no attention.

# EfficientNet-B4 stages: (first block, blocks, in, out, kernel, stride, expand ratio).
B4_STAGES = [(0, 2, 48, 24, 3, 1, 1), (2, 4, 24, 32, 3, 2, 6), (6, 4, 32, 56, 5, 2, 6),
             (10, 6, 56, 112, 3, 2, 6), (16, 6, 112, 160, 5, 1, 6), (22, 8, 160, 272, 5, 2, 6),
             (30, 2, 272, 448, 3, 1, 6)]
B4_STEM, B4_HEAD = 48, 1792
# UNet decoder blocks: (conv1 input = upsampled + skip, output, scSE attention).
DECODER_BLOCKS = [(896 + 320, 256, True), (256 + 112, 128, True), (128 + 32, 64, True),
                  (64 + 48, 64, True), (64, 48, False)]
ALIGNMENT = [(448, 224), (160, 80), (56, 28)]
# efficientnet_pytorch 0.6.3 pads every conv for the nominal 380 px, whatever the block's input:
# (kernel, stride) -> (before, after).
PADDING_AT_380 = {(1, 1): (0, 0), (3, 1): (1, 1), (3, 2): (0, 1), (5, 1): (2, 2), (5, 2): (1, 2)}


def upstream_state_dict_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The published state dict's keys and shapes, in order, expanded from the tables above."""
    keys: list[tuple[str, tuple[int, ...]]] = []

    def batchnorm(prefix: str, n: int) -> None:
        keys.extend([(f"{prefix}.weight", (n,)), (f"{prefix}.bias", (n,)),
                     (f"{prefix}.running_mean", (n,)), (f"{prefix}.running_var", (n,)),
                     (f"{prefix}.num_batches_tracked", ())])

    def scse(prefix: str, n: int) -> None:
        keys.extend([(f"{prefix}.cSE.1.weight", (n // 16, n, 1, 1)), (f"{prefix}.cSE.1.bias", (n // 16,)),
                     (f"{prefix}.cSE.3.weight", (n, n // 16, 1, 1)), (f"{prefix}.cSE.3.bias", (n,)),
                     (f"{prefix}.sSE.0.weight", (1, n, 1, 1)), (f"{prefix}.sSE.0.bias", (1,))])

    keys.append(("encoder._conv_stem.weight", (B4_STEM, 3, 3, 3)))
    batchnorm("encoder._bn0", B4_STEM)
    for first, count, c_in, c_out, kernel, _, expand in B4_STAGES:
        for j in range(count):
            block, inp = f"encoder._blocks.{first + j}", c_in if j == 0 else c_out
            mid, squeezed = inp * expand, max(1, int(inp * 0.25))
            if expand != 1:
                keys.append((f"{block}._expand_conv.weight", (mid, inp, 1, 1)))
                batchnorm(f"{block}._bn0", mid)
            keys.append((f"{block}._depthwise_conv.weight", (mid, 1, kernel, kernel)))
            batchnorm(f"{block}._bn1", mid)
            keys.extend([(f"{block}._se_reduce.weight", (squeezed, mid, 1, 1)),
                         (f"{block}._se_reduce.bias", (squeezed,)),
                         (f"{block}._se_expand.weight", (mid, squeezed, 1, 1)),
                         (f"{block}._se_expand.bias", (mid,)),
                         (f"{block}._project_conv.weight", (c_out, mid, 1, 1))])
            batchnorm(f"{block}._bn2", c_out)
    keys.append(("encoder._conv_head.weight", (B4_HEAD, 448, 1, 1)))
    batchnorm("encoder._bn1", B4_HEAD)
    for i, (c_in, c_out, attend) in enumerate(DECODER_BLOCKS):
        block = f"decoder.blocks.{i}"
        keys.append((f"{block}.conv1.0.weight", (c_out, c_in, 3, 3)))
        batchnorm(f"{block}.conv1.1", c_out)
        if attend:
            scse(f"{block}.attention1.attention", c_in)
        keys.append((f"{block}.conv2.0.weight", (c_out, c_out, 3, 3)))
        batchnorm(f"{block}.conv2.1", c_out)
        if attend:
            scse(f"{block}.attention2.attention", c_out)
    for i, (c_in, hidden) in enumerate(ALIGNMENT):
        layer = f"alignment.{i}.alignment_layer.dimensionality_reduction"
        keys.extend([(f"{layer}.weight", (hidden, c_in, 1, 1)), (f"{layer}.bias", (hidden,))])
    keys.extend([("mask_head.weight", (1, 48, 1, 1)), ("mask_head.bias", (1,))])
    return keys


# --- the same weights for any implementation -----------------------------------------------------


def golden_state_dict(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Deterministic weights keyed by parameter name (seed = crc32 of the name), scaled so the
    random network stays in its working range: any implementation with upstream's keys gets
    exactly these tensors, whatever order it lists them in."""
    state = {}
    for key, shape in shapes.items():
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        if key.endswith("num_batches_tracked"):
            value = np.zeros(shape, np.int64)
        elif key.endswith("running_var"):
            value = 0.5 + rng.random(shape)
        elif key.endswith("running_mean"):
            value = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:  # batch-norm scales and shifts, conv biases
            value = (1.0 if key.endswith(".weight") else 0.0) + 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
            if key == "mask_head.weight":  # spread the map over most of (0, 1), not around 0.5
                value = 10 * value
        state[key] = torch.from_numpy(np.asarray(value, np.int64 if value.dtype == np.int64
                                                 else np.float32))
    return state


def golden_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A real texture (skimage's brick) as the prompt; the query has a dark ellipse on it."""
    from skimage import data

    gray = data.brick()[::2, ::2].astype(np.float32) / 255.0  # 512 -> 256, no resampling filter
    prompt = np.stack([gray, 0.9 * gray, 0.8 * gray + 0.1])
    yy, xx = np.mgrid[:256, :256]
    blob = ((xx - 170) / 30.0) ** 2 + ((yy - 90) / 18.0) ** 2 <= 1
    query = prompt.copy()
    query[:, blob] = 0.1
    return torch.from_numpy(prompt)[None], torch.from_numpy(query)[None]


# Upstream's output for golden_pair() with golden_state_dict(): computed once with upstream's own
# building blocks (efficientnet_pytorch 0.6.3 and segmentation_models_pytorch 0.2.1 from PyPI,
# the fork's decoder rule, metauas.py's alignment), not with our code; 8x8 means of 32x32 tiles.
UPSTREAM_GOLDEN_TILES = [
    [0.583412, 0.556703, 0.546682, 0.548511, 0.559431, 0.553107, 0.549141, 0.550898],
    [0.566219, 0.536684, 0.540760, 0.534049, 0.531368, 0.528814, 0.524953, 0.523161],
    [0.570314, 0.529295, 0.528574, 0.534358, 0.482758, 0.473640, 0.544902, 0.526613],
    [0.576312, 0.544291, 0.528818, 0.538573, 0.524845, 0.490067, 0.522325, 0.519671],
    [0.561850, 0.531217, 0.539004, 0.538345, 0.529135, 0.540504, 0.528157, 0.532007],
    [0.580041, 0.537808, 0.523586, 0.535642, 0.535358, 0.536632, 0.539006, 0.525096],
    [0.565755, 0.545249, 0.536538, 0.537296, 0.534936, 0.541341, 0.526679, 0.533930],
    [0.591930, 0.571309, 0.539565, 0.556190, 0.561944, 0.555819, 0.557289, 0.552034],
]


@pytest.fixture(scope="module")
def full_model() -> MetaUAS:
    model = MetaUAS().eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    load_checkpoint(model, golden_state_dict(shapes))
    return model


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


# --- the full-size network -----------------------------------------------------------------------


def test_full_size_state_dict_is_upstreams_key_for_key(full_model):
    expected = upstream_state_dict_shapes()
    ours = [(k, tuple(v.shape)) for k, v in full_model.state_dict().items()]
    assert len(expected) == 820
    missing = sorted(set(dict(expected)) - set(dict(ours)))
    extra = sorted(set(dict(ours)) - set(dict(expected)))
    assert not missing and not extra, (missing[:5], extra[:5])
    assert [k for k, s in ours if dict(expected)[k] != s] == []
    assert [k for k, _ in ours] == [k for k, _ in expected]  # same order, so same file layout
    # Parameters plus batch-norm statistics: the 89,318,681-byte published file minus the
    # pickle and zip overhead of its 820 records.
    assert sum(v.numel() * v.element_size() for v in full_model.state_dict().values()) == 89_031_828


def test_encoder_pads_every_conv_for_380_px_as_efficientnet_pytorch_0_6_3(full_model):
    encoder = full_model.encoder
    assert encoder.out_channels == [3, 48, 32, 56, 160, 448]
    assert encoder.stage_ends == [6, 10, 22, 32]
    convs = [m for m in encoder.modules() if isinstance(m, SameConv2d)]
    assert len(convs) == 1 + 2 * 2 + 30 * 3 + 1  # stem, blocks 0-1 (no expansion), 30 more, head
    for conv in convs:
        before, after = PADDING_AT_380[(conv.kernel_size[0], conv.stride[0])]
        assert conv.pads == (before, after, before, after)


def test_last_decoder_block_has_no_attention(full_model):
    last = full_model.decoder.blocks[-1]
    assert isinstance(last.attention1.attention, nn.Identity)
    assert isinstance(last.attention2.attention, nn.Identity)


def test_full_size_forward_matches_upstream_golden_values(full_model):
    prompt, query = golden_pair()
    with torch.no_grad():
        out = full_model(prompt, query)
    assert out.shape == (1, 1, 256, 256)
    tiles = out[0, 0].reshape(8, 32, 8, 32).mean(dim=(1, 3)).numpy()
    # 5e-5: float noise between implementations is ~1e-6; padding one stage-3 downsampling the way
    # later efficientnet_pytorch releases do moves these tiles by 3.5e-4.
    np.testing.assert_allclose(tiles, np.asarray(UPSTREAM_GOLDEN_TILES), atol=5e-5)


def test_full_size_onnx_at_256_px_matches_torch(full_model, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "metauas.onnx"
    export_onnx(full_model, path)
    assert verify_onnx(full_model, path, batch_sizes=(2,)) < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape[1:] for i in session.get_inputs()] == [[3, 256, 256], [3, 256, 256]]


# --- checkpoint loading --------------------------------------------------------------------------


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
    state = source.state_dict()
    broken = {k: v for k, v in state.items() if "mask_head" not in k}
    with pytest.raises(ValueError, match="2 missing"):
        load_checkpoint(MetaUAS(config), {"state_dict": broken})
    # Upstream loads with strict=True: a key we do not have is an error too (e.g. the scSE
    # weights stock segmentation_models_pytorch would give the last decoder block).
    extra = {**state, "decoder.blocks.4.attention1.attention.sSE.0.bias": torch.zeros(1)}
    with pytest.raises(ValueError, match="1 unexpected"):
        load_checkpoint(MetaUAS(config), extra)
    wrong = {**state, "mask_head.weight": torch.zeros(1, 3, 1, 1)}
    with pytest.raises(ValueError, match="1 mismatched"):
        load_checkpoint(MetaUAS(config), wrong)


def test_a_published_checkpoint_is_refused_at_the_other_resolution(tmp_path, monkeypatch):
    from appliance.imaging import sha256_file

    config = MetaUASConfig.tiny(SIZE)
    path = tmp_path / "metauas-512.ckpt"
    torch.save(MetaUAS(config).state_dict(), path)
    monkeypatch.setattr(metauas_export, "PUBLISHED_CHECKPOINT_BYTES", path.stat().st_size)
    monkeypatch.setattr(metauas_export, "PUBLISHED_CHECKPOINTS",
                        {sha256_file(path): ("metauas-512.ckpt", 512)})
    assert metauas_export.published_checkpoint(path) == ("metauas-512.ckpt", 512)
    with pytest.raises(ValueError, match="trained at 512 px"):
        export_checkpoint(tmp_path / "m.onnx", path, config)
    assert not (tmp_path / "m.onnx").exists()


# --- the tiny export and the mask generator ------------------------------------------------------


def test_onnx_export_matches_torch_with_a_dynamic_batch(tiny_onnx):
    import onnxruntime as ort

    assert tiny_onnx.max_abs_diff < 1e-4
    assert tiny_onnx.batch_sizes == (1, 3) and tiny_onnx.published is None
    session = ort.InferenceSession(str(tiny_onnx.path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["prompt"][1:] == [3, SIZE, SIZE] and not isinstance(shapes["prompt"][0], int)
    x = np.random.default_rng(0).random((5, 3, SIZE, SIZE), dtype=np.float32)
    (out,) = session.run(None, {"prompt": x, "query": x})
    assert out.shape == (5, 1, SIZE, SIZE) and 0 <= out.min() and out.max() <= 1


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


def test_inputs_are_resized_the_way_upstream_resizes(texture_image):
    """kornia.augmentation.Resize as upstream calls it: bilinear, corners aligned, no filter."""
    image = texture_image[:150, :230].astype(np.float32) / 255.0
    image[..., 1] = image[..., 1][::-1]  # three different channels
    for size in (256, 100):
        ours = resize_like_upstream(image, size)
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None], size=(size, size), mode="bilinear",
            align_corners=True)[0].permute(1, 2, 0).numpy()
        assert ours.shape == (size, size, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-4)
        assert np.allclose(ours[[0, -1]][:, [0, -1]], image[[0, -1]][:, [0, -1]])


def test_mask_follows_a_model_that_sees_the_change(tmp_path, pair):
    normal, edited = pair
    generator = MetaUASMaskGenerator(_export(_MapNet("change"), tmp_path / "change.onnx"))
    assert generator.size == 128 and "CPUExecutionProvider" in generator.providers
    results = generator.generate_masks([MaskRequest(normal, edited), MaskRequest(normal, edited)])
    truth = changed_pixels(normal, edited)
    reference = generator.fallback.generate_one(MaskRequest(normal, edited)).mask
    for result in results:
        assert result.method == "metauas"
        assert result.mask.shape == normal.shape[:2] and result.mask.dtype == bool
        assert mask_iou(result.mask, truth) > 0.7
        assert result.threshold == 0.5
        # Kept because it covers enough of the change; its confidence is its agreement with it.
        assert (result.mask & reference).sum() >= generator.min_recall * reference.sum()
        assert result.confidence == pytest.approx(mask_iou(result.mask, truth))


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
    reference = generator.fallback.generate_one(MaskRequest(normal, edited)).mask
    for result in (results[0], results[2]):
        if "fallback" in result.method:  # (what the seed-3 tiny model gets today)
            assert np.array_equal(result.mask, reference)  # the difference mask, as it is
            assert mask_iou(result.mask, truth) > 0.7
        else:
            # The model's mask is kept only when it covers enough of the change, and its
            # confidence is then its agreement with the changed pixels.
            assert result.method == "metauas" and result.mask.any()
            assert (result.mask & reference).sum() >= generator.min_recall * reference.sum()
            assert result.confidence == pytest.approx(mask_iou(result.mask, truth))
    assert results[0].method == results[2].method
