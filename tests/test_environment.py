"""The agent loop: rules, error observations, batching, and the scripted policy's refinement."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from appliance.agent.environment import AgentEnvironment
from appliance.agent.episode import EnvConfig, EpisodeSpec
from appliance.agent.protocol import format_answer, format_tool_call, parse_tool_response
from appliance.agent.runner import run_episodes
from appliance.imaging import changed_pixels, mask_iou


class ReplayPolicy:
    """Writes pre-recorded assistant messages, one per turn: a stand-in for a model's output."""

    name = "replay"

    def __init__(self, messages: list[str]):
        self.messages = list(messages)

    def act(self, states):
        return [self.messages.pop(0) for _ in states]


def _responses(state_or_result) -> list[dict]:
    found = []
    for message in state_or_result.messages:
        if message["role"] == "tool":
            parsed = parse_tool_response(message["content"][0]["text"])
            found.append(parsed[1] | {"_tool": parsed[0]})
    return found


def _spec(image, defect="crack", category="magnetic_tile", seed=1) -> EpisodeSpec:
    return EpisodeSpec(image=image, category=category, defect=defect, seed=seed)


TASK = {"item_name": "magnetic_tile", "anomaly_type": "crack"}


def test_rule_violations_become_error_observations(engine, tile_image):
    messages = [
        "I think I should draw.",  # no action
        format_tool_call("skip ahead", "image_gen", {"prompt": "a crack", "target_image": 1}),
        format_tool_call("unknown", "paint_defect", {"x": 1}),
        format_tool_call("wrong defect", "prompt_gen", {"image": 1, "item_name": "magnetic_tile",
                                                        "anomaly_type": "scratch"}),
        format_tool_call("too early", "knowledge_retrieval", TASK),
        format_tool_call("ok", "prompt_gen", {"image": 1, **TASK}),
        format_tool_call("again", "prompt_gen", {"image": 1, **TASK}),
        format_tool_call("judge nothing", "quality_eval", {"anomaly_image": 2, **TASK}),
        format_answer("done?", {"status": "success", "final_image_index": 2}),
        format_tool_call("mask nothing", "mask_gen", {"anomaly_image": 2}),
    ]
    env = AgentEnvironment(engine.tools, EnvConfig(max_turns=len(messages)))
    result = env.run([_spec(tile_image)], ReplayPolicy(messages))[0]
    responses = _responses(result)
    errors = [r for r in responses if r["status"] == "error"]
    assert len(errors) == len(messages) - 1 == len(result.errors)  # only the good prompt_gen passed
    assert result.tool_sequence == ["prompt_gen"]
    assert result.status == "failed" and "turn limit" in result.end_reason
    text = " | ".join(e["error"] for e in errors)
    for words in ("no <tool_call>", "call prompt_gen before", "unknown tool", "exactly as the task",
                  "is for improving a rejected attempt", "called only once",
                  "not an edited image", "after mask_gen", "has not been judged"):
        assert words in text


def test_a_tool_that_raises_becomes_an_error_observation(engine, tile_image):
    class Exploding:
        name = "exploding"

        def generate(self, requests):
            raise RuntimeError("out of GPU memory")

    tools = replace(engine.tools, image_gen=Exploding())
    env = AgentEnvironment(tools, EnvConfig(max_turns=3))
    messages = [format_tool_call("p", "prompt_gen", {"image": 1, **TASK}),
                format_tool_call("g", "image_gen", {"prompt": "a thin crack", "target_image": 1}),
                format_tool_call("g", "image_gen", {"prompt": "a thin crack", "target_image": 1})]
    result = env.run([_spec(tile_image)], ReplayPolicy(messages))[0]
    assert [r["status"] for r in _responses(result)] == ["success", "error", "error"]
    assert "RuntimeError: out of GPU memory" in result.errors[0]
    assert result.status == "failed"


def test_attempt_budget_and_mask_of_best_rejected_attempt(engine, tile_image):
    env = AgentEnvironment(engine.tools, EnvConfig(max_turns=12, max_image_gen=1, min_quality=6))
    tile = _spec(tile_image)
    messages = [format_tool_call("p", "prompt_gen", {"image": 1, **TASK}),
                format_tool_call("g", "image_gen", {"prompt": "a long dark crack", "target_image": 1}),
                format_tool_call("g2", "image_gen", {"prompt": "a long dark crack", "target_image": 1}),
                format_tool_call("q", "quality_eval", {"anomaly_image": 2, **TASK}),
                format_tool_call("m", "mask_gen", {"anomaly_image": 2}),
                format_answer("a", {"status": "rejected", "final_image_index": 2})]
    result = env.run([tile], ReplayPolicy(messages))[0]
    assert "attempts are used" in result.errors[0]
    # An impossible bar (quality >= 6) rejects every attempt: the episode ends "rejected".
    assert result.status == "rejected" and result.mask is not None


def test_messages_are_recorded_in_chat_format_with_images_by_index(engine, tile_image):
    result = engine.environment.run([_spec(tile_image)], engine.policy)[0]
    roles = [m["role"] for m in result.messages]
    assert roles[:3] == ["system", "user", "assistant"]
    assert set(roles) <= {"system", "user", "assistant", "tool"}
    image_refs = [p["image_index"] for m in result.messages for p in m["content"] if p["type"] == "image"]
    assert image_refs == list(range(1, len(result.images) + 1))
    assert result.tool_sequence[0] == "prompt_gen" and result.tool_sequence[-1] == "mask_gen"
    assert result.status in ("accepted", "rejected")


def test_batched_episodes_match_single_runs(engine, tile_image, texture_image):
    specs = [_spec(tile_image, seed=3), _spec(texture_image, "stain", "brick", seed=4),
             _spec(tile_image, "blowhole", seed=5)]
    batched = engine.environment.run(specs, engine.policy)
    for spec, together in zip(specs, batched):
        alone = engine.environment.run([spec], engine.policy)[0]
        assert alone.tool_sequence == together.tool_sequence
        assert np.array_equal(alone.final_image, together.final_image)


def test_scripted_policy_refines_from_feedback_over_a_batch(engine, tile_images):
    specs = [_spec(image, defect, seed=i) for i, image in enumerate(tile_images)
             for defect in ("crack", "blowhole", "uneven")]
    results = list(run_episodes(engine, specs))
    refined = [r for r in results if r.accepted and len(r.attempts) > 1]
    first_try = [r for r in results if r.accepted and len(r.attempts) == 1]
    assert refined, "some episodes should fail the judge first and pass after a revised prompt"
    assert first_try, "some episodes should pass at once"
    for result in refined:
        prompts = [a.prompt for a in result.attempts]
        assert len(set(prompts)) == len(prompts), "each retry must change the instruction"
        assert not result.attempts[0].passed and result.attempts[-1].passed
    for result in results:
        seq = result.tool_sequence
        for i, name in enumerate(seq):
            if name == "knowledge_retrieval":
                judged = [a for a in result.attempts if a.report is not None]
                assert seq[i - 1] == "quality_eval" and judged and not judged[0].passed
        # Masks agree with where the image changed (the per-render bar of test_renderers).
        if result.accepted:
            changed = changed_pixels(result.spec.image, result.final_image)
            assert result.mask.mask.any() and changed.any()
            iou = mask_iou(result.mask.mask, changed)
            assert iou >= 0.8, (result.spec.defect, result.spec.seed, iou)


@pytest.mark.parametrize("bad", [[0, 0, 0, 0], [900, 900, 100, 100]])
def test_empty_region_is_refused(engine, tile_image, bad):
    env = AgentEnvironment(engine.tools, EnvConfig(max_turns=2))
    messages = [format_tool_call("p", "prompt_gen", {"image": 1, **TASK}),
                format_tool_call("g", "image_gen", {"prompt": "a crack", "target_image": 1,
                                                    "region": bad})]
    result = env.run([_spec(tile_image)], ReplayPolicy(messages))[0]
    assert "region" in result.errors[0]


def test_policy_region_confines_the_edit(engine, tile_image):
    env = AgentEnvironment(engine.tools, EnvConfig(max_turns=2))
    task = {**TASK, "anomaly_type": "blowhole"}
    messages = [format_tool_call("p", "prompt_gen", {"image": 1, **task}),
                format_tool_call("g", "image_gen", {"prompt": "a small dark pit", "target_image": 1,
                                                    "region": [100, 100, 500, 500]})]
    state = env.reset(_spec(tile_image, "blowhole"))
    for message in messages:
        env.step([state], [message])
    edited = state.images[-1]
    changed = changed_pixels(tile_image, edited)
    h, w = changed.shape
    outside = changed.copy()
    outside[int(0.1 * h):int(0.5 * h) + 1, int(0.1 * w):int(0.5 * w) + 1] = False
    assert changed.any() and not outside.any()
