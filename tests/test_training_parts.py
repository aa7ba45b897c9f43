"""The parts of retraining that need no training: rewards, the adapter registry, the SFT labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import require_tiles


@pytest.fixture(scope="module")
def engine():
    from appliance.engine import EngineConfig, build_engine

    built = build_engine(EngineConfig())
    yield built
    built.close()


def _normal():
    from appliance.evaluation.data import resize_image
    from appliance.imaging import load_rgb

    return resize_image(load_rgb(sorted(require_tiles("MT_Free", "Imgs").glob("*.jpg"))[0]), 256)


class _Babbler:
    name = "babbler"

    def act(self, states):
        return ["I am not sure what to do."] * len(states)


def test_rewards_score_a_good_episode_above_a_broken_one(engine):
    from appliance.agent.episode import EpisodeSpec
    from appliance.policies.scripted import ScriptedPolicy
    from appliance.training.rewards import area_plausibility, rewards

    spec = EpisodeSpec(image=_normal(), category="magnetic_tile", defect="crack", seed=3)
    good = engine.environment.run([spec], ScriptedPolicy())[0]
    broken = engine.environment.run([spec], _Babbler())[0]
    area = good.mask.area_ratio
    scored = rewards([good, broken], engine.environment.config, {"crack": area * 2})
    assert good.accepted and scored[0].complete and not scored[1].complete
    assert scored[0].task == pytest.approx(good.report.score / 10 * 0.5)  # half the real median
    assert scored[1].task == 0 and scored[1].reflection == 0
    assert scored[1].behaviour < 0.2 < scored[0].behaviour  # every babbled message was refused
    assert scored[0].total > scored[1].total
    assert area_plausibility(0.01, 0.01) == 1 and area_plausibility(0.0, 0.01) == 0
    assert area_plausibility(0.04, 0.01) == pytest.approx(math.exp(-math.log(4)))


def test_adapter_registry_promotes_atomically_and_rolls_back(tmp_path):
    from appliance.models.adapters import (AdapterError, active_adapter, active_adapters,
                                           adapter_hash, promote, rollback, store_adapter)

    def adapter(name: str, payload: bytes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(payload)
        return folder

    models = tmp_path / "models"
    first = store_adapter(models, "Magnetic Tile", adapter("a", b"one"), {"reward": 0.1})
    second = store_adapter(models, "magnetic_tile", adapter("b", b"two"), {"reward": 0.2})
    assert first != second and first == adapter_hash(tmp_path / "a")
    assert active_adapter(models, "magnetic_tile") is None
    promote(models, "magnetic_tile", first)
    promote(models, "magnetic_tile", second)
    active = active_adapters(models)["magnetic_tile"]
    assert active.hash == second and active.figures == {"reward": 0.2}
    assert rollback(models, "magnetic_tile") == first
    assert rollback(models, "magnetic_tile") is None
    with pytest.raises(AdapterError, match="nothing to roll back"):
        rollback(models, "magnetic_tile")
    with pytest.raises(AdapterError, match="no stored adapter"):
        promote(models, "magnetic_tile", "0" * 16)
    (models / "adapters" / "magnetic_tile" / "active.json").write_text("{broken")
    with pytest.raises(AdapterError, match="unreadable"):
        active_adapter(models, "magnetic_tile")


def test_sft_labels_cover_exactly_the_assistant_turns(tmp_path_factory, engine):
    from _tiny_qwen import tiny_qwen_hf

    from appliance.agent.episode import EpisodeSpec
    from appliance.dataset.trajectory import save_trajectory
    from appliance.policies.scripted import ScriptedPolicy
    from appliance.training.sft import IGNORE_INDEX, TrajectoryCollator
    from appliance.vlm.transformers_runtime import load_processor

    spec = EpisodeSpec(image=_normal(), category="magnetic_tile", defect="crack", seed=5)
    result = engine.environment.run([spec], ScriptedPolicy())[0]
    folder = save_trajectory(result, tmp_path_factory.mktemp("traj") / "t")
    processor = load_processor(tiny_qwen_hf(tmp_path_factory))
    batch = TrajectoryCollator(processor)([{"trajectory": str(folder)}])
    labels = batch["labels"][0]
    trained = processor.tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=False)
    assistant = [m["content"][0]["text"] for m in json.loads((folder / "messages.json").read_text())
                 if m["role"] == "assistant"]
    assert trained == "".join(f"{text}<|im_end|>" for text in assistant)
    assert "pixel_values" in batch and int((batch["input_ids"][0] ==
            processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) > 0


def test_reverse_synthesis_fills_only_the_defect(engine):
    from appliance.training.reverse_synthesis import partial_defect, reverse_synthesize

    image = _normal().copy()
    mask = np.zeros(image.shape[:2], bool)
    mask[100:110, 50:150] = True
    image[mask] = 10  # a dark scratch
    normal = reverse_synthesize(image, mask)
    ring = np.zeros_like(mask)
    ring[90:120, 40:160] = True
    ring &= ~mask
    # the scratch is gone: the hole looks like the surface around it
    assert abs(float(normal[mask].mean()) - float(image[ring].mean())) < 8
    far = np.ones_like(mask)
    far[90:120, 40:160] = False
    assert np.array_equal(normal[far], image[far])  # nothing else moved
    half = partial_defect(normal, image, mask, 0.5)
    assert np.array_equal(half[~mask], normal[~mask])
    assert abs(int(half[mask].mean()) - (int(normal[mask].mean()) + 10) // 2) <= 2


def test_reverse_synthesis_from_normals_borrows_the_matching_photo():
    """``--normal``: the photo the defect was made on is among the normals; it is found, and its
    own pixels come back under the mask (the rim matches, so no brightness shift)."""
    from appliance.evaluation.data import resize_image
    from appliance.imaging import load_rgb
    from appliance.training.reverse_synthesis import reverse_synthesize_from

    paths = sorted(require_tiles("MT_Free", "Imgs").glob("*.jpg"))[:6]
    normals = [resize_image(load_rgb(p), 256) for p in paths]
    image = normals[3].copy()
    mask = np.zeros(image.shape[:2], bool)
    mask[120:130, 60:140] = True
    image[mask] = 5
    normal, index = reverse_synthesize_from(image, mask, normals)
    assert index == 3
    assert np.abs(normal.astype(int) - normals[3]).max() <= 1  # the real surface, not a guess
    far = np.ones_like(mask)
    far[100:150, 40:160] = False
    assert np.array_equal(normal[far], image[far])
    with pytest.raises(ValueError, match="differ in size"):
        reverse_synthesize_from(image, mask, [normals[0][:128]])
    with pytest.raises(ValueError, match="no normal photo"):
        reverse_synthesize_from(image, mask, [])


def test_expert_instructions_state_the_real_defects_length(engine):
    """An expert trajectory's instruction asks for the size of the real defect it ends with, so
    the judge (which holds a defect to its instruction's size) can accept the real one."""
    from appliance.evaluation.data import load_mask, resize_image
    from appliance.imaging import load_rgb
    from appliance.tools.image_gen.calibration import major_axis
    from appliance.tools.image_gen.placement import object_extent
    from appliance.tools.image_gen.prompt_params import parse_prompt
    from appliance.tools.interfaces import PromptRequest
    from appliance.tools.object_map import find_object
    from appliance.training.replay_tools import RealSizePromptGenerator

    photo = sorted(require_tiles("MT_Crack", "Imgs").glob("*.jpg"))[0]
    image = resize_image(load_rgb(photo), 256)
    mask = load_mask(photo.with_suffix(".png"), 256)
    generator = RealSizePromptGenerator(engine.tools.prompt_gen, image, mask)
    prompt = generator.generate_prompts([PromptRequest(_normal(), "magnetic_tile", "crack")])[0]
    low, high = parse_prompt(prompt, np.random.default_rng(0)).size_band
    share = major_axis(mask) / object_extent(find_object(image))
    assert low <= share * 1.05 and share * 0.95 <= high and "Size:" in prompt
    assert generator.name == engine.tools.prompt_gen.name


def test_the_expert_gets_the_real_mask_reported_as_the_engine_reports_it(engine):
    """Alg. 2's mask tool answers with the real mask, but its reply carries the confidence and
    method the engine's own mask tool gives for the same edit: a reply no live episode can get
    (always "confidence 1.0, real-mask") was a cue the tiny policy learned its answer from."""
    from appliance.evaluation.data import LabeledImage, load_mask, resize_image
    from appliance.imaging import load_rgb
    from appliance.tools.interfaces import MaskRequest
    from appliance.training.trajectories import example_from, expert_episode

    photo = sorted(require_tiles("MT_Blowhole", "Imgs").glob("*.jpg"))[0]
    item = LabeledImage(resize_image(load_rgb(photo), 256), load_mask(photo.with_suffix(".png"), 256),
                        "blowhole", str(photo))
    example = example_from(item, photo.stem)
    result = expert_episode(engine.environment, example, "magnetic_tile", 1, seed=5)
    assert result.accepted and result.mask is not None
    assert np.array_equal(result.mask.mask, item.mask)  # the ground truth, as Alg. 2 says
    reply = next(json.loads(m["content"][0]["text"].split("\n", 1)[1]) for m in result.messages
                 if m["role"] == "tool" and "Tool Response from mask_gen" in m["content"][0]["text"])
    edited = result.images[result.final_image_index - 1]
    live = engine.tools.mask_gen.generate_masks([MaskRequest(example.normal, edited, item.mask)])[0]
    assert reply["method"] == live.method != "real-mask"
    assert reply["confidence"] == round(live.confidence, 3)
    assert reply["mask_pixels"] == int(item.mask.sum())


def test_groups_whose_rollouts_tied_leave_the_grpo_loss():
    torch = pytest.importorskip("torch")
    from appliance.training.grpo import drop_tied_groups

    # Two groups of G = 2: the first tied (TRL leaves ~2e-3 there: float32 rounding of the mean
    # over std + 1e-4), the second varied. Three completion tokens each; the policy wrote two.
    output = {"advantages": torch.tensor([2.4e-3, -2.4e-3, 0.7, -0.7]),
              "completion_mask": torch.ones(4, 3, dtype=torch.int64),
              "tool_mask": torch.tensor([[1, 1, 0]] * 4),
              "num_items_in_batch": torch.tensor(8)}
    out, tied = drop_tied_groups(output, group_size=2)
    assert tied == 0.5
    assert out["tool_mask"].tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert int(out["num_items_in_batch"]) == 4
    varied = {"advantages": torch.tensor([0.7, -0.7]), "completion_mask": torch.ones(2, 3),
              "tool_mask": torch.ones(2, 3), "num_items_in_batch": torch.tensor(6)}
    out, tied = drop_tied_groups(dict(varied), group_size=2)
    assert tied == 0.0 and out["tool_mask"].sum() == 6
