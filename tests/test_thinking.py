"""A Qwen3 Thinking model's replies: parsed after the reasoning, kept within budgets, given the
native tool block, sampled as the checkpoint says; on the tiny random-weight Qwen3-VL kit."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from _tiny_qwen import tiny_qwen_gguf, tiny_qwen_hf, tiny_qwen_thinking_hf

from appliance.agent.environment import AgentEnvironment
from appliance.agent.episode import EnvConfig, EpisodeSpec
from appliance.agent.policy import PolicyReply
from appliance.agent.protocol import (REASONING_NOT_FINISHED, Answer, ProtocolError, ToolCall,
                                      format_tool_call, parse_assistant_message)
from appliance.agent.schemas import TOOL_SCHEMAS, system_prompt
from appliance.engine import build_engine
from appliance.tools.interfaces import QualityRequest, ToolFailure
from appliance.vlm.budget import Budget, BudgetTracker
from appliance.vlm.chat import ChatRequest, GuidedRuntime, finish_text, split_reasoning, to_chat_request
from appliance.vlm.sampling import Sampling, resolve_sampling

CALL = {"name": "prompt_gen", "arguments": {"image": 1, "item_name": "bottle",
                                            "anomaly_type": "crack"}}
NATIVE_CALL = f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>"


# --- the parser, on the shapes Qwen3 Thinking models really write ------------------------------

def test_a_reply_without_the_opening_tag_is_reasoning_then_action():
    """The template opened <think>; the model only closes it."""
    parsed = parse_assistant_message(f"The photo shows a bottle.\nA crack first.\n</think>\n\n{NATIVE_CALL}")
    assert parsed.action == ToolCall("prompt_gen", CALL["arguments"])
    assert parsed.thinking == "The photo shows a bottle. A crack first."


def test_a_call_drafted_in_the_reasoning_is_not_an_action():
    draft = '<tool_call>{"name": "mask_gen", "arguments": {"anomaly_image": 2}}</tool_call>'
    text = f"<think>\nMaybe {draft}? No: the instruction comes first.\n</think>\n\n{NATIVE_CALL}"
    parsed = parse_assistant_message(text)
    assert parsed.action == ToolCall("prompt_gen", CALL["arguments"])
    assert "mask_gen" in parsed.thinking  # the reasoning is kept, draft and all


def test_reasoning_cut_off_is_not_finished_whatever_it_mentions():
    cut = f"<think>\nI will call {NATIVE_CALL} and then"
    parsed = parse_assistant_message(cut)
    assert parsed.action == ProtocolError(REASONING_NOT_FINISHED)
    assert parsed.thinking.startswith("I will call")
    # The same, as a runtime hands it over when the prompt opened the block.
    raw = f"I will call {NATIVE_CALL} and then"
    assert parse_assistant_message(finish_text(raw, prompt_opened_reasoning=True)).action == \
        ProtocolError(REASONING_NOT_FINISHED)


@pytest.mark.parametrize("body", [
    f"```json\n{json.dumps(CALL)}\n```",
    f"```\n{json.dumps(CALL)}\n```",
    json.dumps({"name": "prompt_gen", "arguments": json.dumps(CALL["arguments"])}),
])
def test_fenced_json_and_string_arguments_are_read(body):
    parsed = parse_assistant_message(f"ok\n</think>\n\n<tool_call>\n{body}\n</tool_call>")
    assert parsed.action == ToolCall("prompt_gen", CALL["arguments"])


def test_after_the_reasoning_exactly_one_action_counts():
    two = parse_assistant_message(f"x</think>\n{NATIVE_CALL}\n{NATIVE_CALL}")
    assert isinstance(two.action, ProtocolError) and "more than one" in two.action.message
    answer = parse_assistant_message('<think>done</think>\n\n<answer>{"status": "success"}</answer>')
    assert answer.action == Answer({"status": "success"})
    nothing = parse_assistant_message("<think>thinking</think>\n\nI am not sure.")
    assert isinstance(nothing.action, ProtocolError) and "no <tool_call>" in nothing.action.message


def test_a_second_reasoning_block_left_open_is_not_finished():
    draft = '<tool_call>{"name": "mask_gen", "arguments": {"anomaly_image": 2}}</tool_call>'
    parsed = parse_assistant_message(f"<think>first</think>\n<think>then maybe {draft}")
    assert parsed.action == ProtocolError(REASONING_NOT_FINISHED)


def test_our_messages_are_in_the_native_form_and_parse_back():
    text = format_tool_call("A crack first.", "prompt_gen", CALL["arguments"])
    assert text == f"<think>\nA crack first.\n</think>\n\n{NATIVE_CALL}"
    assert parse_assistant_message(text).action == ToolCall("prompt_gen", CALL["arguments"])
    assert split_reasoning(text).finished and split_reasoning("<think>open").finished is False


# --- budgets, token by token -------------------------------------------------------------------

def _drive(tracker: BudgetTracker, model: list[int]) -> list[int]:
    """Generate as a runtime does: at most the budget's max_new_tokens, forced tokens first."""
    generated: list[int] = []
    markers = len(tracker.open_ids) + len(tracker.close_text_ids)
    for step in range(tracker.budget.max_new_tokens(markers)):
        tracker.observe(generated)
        forced = tracker.forced()
        token = forced if forced is not None else (model[step] if step < len(model) else 8)
        generated.append(token)
        if token == 9:
            break
    return generated


def test_a_reasoning_that_never_closes_is_closed_for_the_model():
    # ids: 1 <think>, 2 </think>, 5 "\n", 9 end; the model only ever writes 7.
    tracker = BudgetTracker(Budget(3, 2), [1], [2], [5, 2, 5], 9, reasoning=True)
    assert _drive(tracker, [7] * 40) == [7, 7, 7, 5, 2, 5, 7, 7, 9]
    assert tracker.use.reasoning_budget_hit and tracker.use.action_budget_hit
    assert (tracker.use.reasoning_tokens, tracker.use.action_tokens) == (3, 2)


def test_a_model_that_closes_in_time_and_acts_briefly_is_left_alone():
    tracker = BudgetTracker(Budget(5, 4), [1], [2], [5, 2, 5], 9, reasoning=True)
    assert _drive(tracker, [7, 7, 2, 6, 9]) == [7, 7, 2, 6, 9]
    assert not tracker.use.reasoning_budget_hit and not tracker.use.action_budget_hit


def test_a_model_that_opens_its_own_reasoning_gets_the_reasoning_budget():
    tracker = BudgetTracker(Budget(2, 3), [1], [2], [5, 2, 5], 9, reasoning=False)
    assert _drive(tracker, [1, 7, 7, 7, 7]) == [1, 7, 7, 5, 2, 5, 8, 8, 8, 9]
    assert tracker.use.reasoning_budget_hit and tracker.use.action_budget_hit


def test_the_forced_end_always_fits_and_is_counted():
    """max_new_tokens leaves room for the forced end: a cut action is seen as cut."""
    tracker = BudgetTracker(Budget(6, 4), [1], [2], [5, 2, 5], 9, reasoning=True)
    generated = _drive(tracker, [7] * 100)
    assert generated[-1] == 9 and len(generated) == tracker.budget.max_new_tokens(4) - 1
    assert tracker.use.action_budget_hit and tracker.use.action_tokens == 4


def test_reasoning_reopened_after_a_forced_close_is_not_closed_again_forever():
    # The model writes <think> (1) right after the forced close, then keeps writing 7.
    tracker = BudgetTracker(Budget(2, 3), [1], [2], [5, 2, 5], 9, reasoning=True)
    generated = _drive(tracker, [7, 7, 0, 0, 0, 1, 7, 7, 7, 7, 7, 7])
    assert generated == [7, 7, 5, 2, 5, 1, 7, 7, 9]  # the <think> counts as action text
    assert generated.count(2) == 1 and tracker.use.action_budget_hit


def test_a_reply_that_does_not_reason_may_spend_the_whole_budget_on_its_action():
    """An Instruct model's long instruction is not cut at the budget meant for after reasoning."""
    tracker = BudgetTracker(Budget(4, 2), [1], [2], [5, 2, 5], 9, reasoning=False)
    generated = _drive(tracker, [7] * 100)
    assert generated == [7] * 6 + [9]
    assert tracker.use.action_tokens == 6 and not tracker.use.reasoning_budget_hit


def test_padding_after_the_stop_token_is_not_counted():
    """A batched runtime keeps feeding a finished row padding; the reply ended at its stop."""
    tracker = BudgetTracker(Budget(4, 3), [1], [2], [5, 2, 5], 9, reasoning=False, stop_ids=(9, 0))
    tracker.observe([7, 7, 9])
    assert tracker.forced() is None
    tracker.observe([7, 7, 9, 0, 0, 0, 0, 0, 0, 0])
    assert tracker.forced() is None
    assert tracker.use.action_tokens == 2 and not tracker.use.action_budget_hit


# --- the tiny models ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def thinking_runtime(tmp_path_factory):
    from appliance.vlm.transformers_runtime import QwenTransformersRuntime, TransformersVLMConfig

    runtime = QwenTransformersRuntime(TransformersVLMConfig(
        tiny_qwen_thinking_hf(tmp_path_factory), do_sample=False))
    yield runtime
    runtime.close()


def _request(tools=TOOL_SCHEMAS) -> ChatRequest:
    image = np.full((64, 64, 3), 120, np.uint8)
    return to_chat_request([
        {"role": "system", "content": [{"type": "text", "text": system_prompt(3, 12)}]},
        {"role": "user", "content": [{"type": "image", "image_index": 1},
                                     {"type": "text", "text": "Add a crack."}]}], [image], tools=tools)


def _assert_native_tool_block(prompt: str) -> None:
    assert "# Tools" in prompt and "<tools>" in prompt and "</tools>" in prompt
    for schema in TOOL_SCHEMAS:
        assert json.dumps(schema, ensure_ascii=False) in prompt  # each tool, as the template's tojson
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in prompt
    assert "You are the planner of an industrial defect synthesis station" in prompt


def test_transformers_renders_the_tools_through_the_real_template(thinking_runtime):
    prompt = thinking_runtime.render(_request())
    _assert_native_tool_block(prompt)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert "# Tools" not in thinking_runtime.render(_request(tools=None))


def test_transformers_closes_a_reasoning_the_model_never_closes(thinking_runtime):
    [reply] = thinking_runtime.chat([_request()], budget=Budget(reasoning=6, action=4))
    use = reply.use
    assert use.reasoning_budget_hit and use.reasoning_tokens == 6
    assert use.action_tokens <= 4 and use.prompt_tokens > 100
    assert reply.text.startswith("<think>\n") and reply.text.count("</think>") == 1
    parsed = parse_assistant_message(reply.text)
    assert parsed.action != ProtocolError(REASONING_NOT_FINISHED)  # the close was written


def test_transformers_without_a_budget_leaves_the_reasoning_unfinished(thinking_runtime):
    [reply] = thinking_runtime.chat([_request()], max_new_tokens=6)
    assert "</think>" not in reply.text
    assert parse_assistant_message(reply.text).action == ProtocolError(REASONING_NOT_FINISHED)


def test_a_budgeted_row_in_a_batch_counts_only_its_own_reply(tmp_path_factory):
    """The other row is forced to write 40 tokens, so the budgeted row, cut after 2, is fed
    padding for the rest of the batch: none of it counts."""
    from appliance.vlm.transformers_runtime import QwenTransformersRuntime, TransformersVLMConfig

    runtime = QwenTransformersRuntime(TransformersVLMConfig(tiny_qwen_hf(tmp_path_factory),
                                                            do_sample=False))
    try:
        long = format_tool_call("x " * 15, "prompt_gen", CALL["arguments"])
        cut, forced = runtime.chat([_request(), replace(_request(), forced=long)],
                                   budget=Budget(reasoning=0, action=2))
        assert forced.text == long
        assert cut.use.action_tokens == 2 and cut.use.action_budget_hit
        assert not cut.use.reasoning_budget_hit and cut.use.reasoning_tokens == 0
    finally:
        runtime.close()


def test_a_sampling_setting_the_runtime_would_refuse_stops_the_engine_build(tmp_path_factory, tmp_path):
    """temperature = 0 with sampling on would raise in every generate() of a nightly batch."""
    import shutil

    from appliance.engine import EngineConfig, EngineError
    from appliance.models.bundle import describe_folder
    from appliance.models.manifest import Manifest, ModelEntry, write_manifest

    models = tmp_path / "models"
    folder = models / "qwen"
    shutil.copytree(tiny_qwen_hf(tmp_path_factory), folder)
    for settings, words in (({"temperature": 0.0}, "temperature must be a number above 0"),
                            ({"roles": {"policy": {"top_p": 1.5}}}, "settings.roles.policy: top_p")):
        entry = ModelEntry("qwen", "org/qwen", "a" * 40, "MIT", "transformers",
                           {"policy": "qwen-transformers"}, describe_folder(folder),
                           settings={"quantization": "none", **settings})
        write_manifest(Manifest([entry]), models)
        with pytest.raises(EngineError, match=words):
            build_engine(replace(EngineConfig(), name="t", models_dir=models, policy="qwen-transformers"))


def test_an_unguided_policy_records_its_budget_use_in_the_trajectory(tmp_path_factory, tile_paths):
    from appliance.imaging import load_rgb
    from appliance.policies.vlm import QwenTransformersPolicy
    from appliance.vlm.transformers_runtime import TransformersVLMConfig

    engine = build_engine()
    environment = AgentEnvironment(engine.tools, EnvConfig(max_turns=2))
    policy = QwenTransformersPolicy(TransformersVLMConfig(tiny_qwen_thinking_hf(tmp_path_factory),
                                                          do_sample=False),
                                    budget=Budget(reasoning=5, action=3))
    try:
        [result] = environment.run([EpisodeSpec(load_rgb(tile_paths[0]), "magnetic_tile",
                                                "crack", seed=1)], policy)
    finally:
        policy.close()
        engine.close()
    assert result.status == "failed" and result.turns == 2
    assert [g["turn"] for g in result.generation] == [1, 2]
    assert all(g["reasoning_budget_hit"] and g["reasoning_tokens"] == 5 and not g["guided"]
               for g in result.generation)
    assert len(result.errors) == 2  # a random model writes no valid action: told so each turn


def test_llamacpp_renders_tools_and_keeps_the_budget(tmp_path_factory):
    from appliance.models.tiny_kit import thinking_template
    from appliance.vlm.llamacpp_runtime import LlamaCppVLMConfig, QwenLlamaCppRuntime

    model, mmproj = tiny_qwen_gguf(tmp_path_factory)
    runtime = QwenLlamaCppRuntime(LlamaCppVLMConfig(model, mmproj, n_ctx=4096,
                                                    chat_template=thinking_template(),
                                                    do_sample=False))
    try:
        _assert_native_tool_block(runtime.render(_request()))
        handler = runtime.llm.chat_handler
        rendered = []
        original = handler._postprocess_template_text
        handler._postprocess_template_text = lambda text, *a: rendered.append(text) or original(text, *a)
        try:
            [reply] = runtime.chat([_request()], budget=Budget(reasoning=6, action=4))
        finally:
            del handler._postprocess_template_text
        # What llama.cpp's own handler rendered holds the same tool block.
        _assert_native_tool_block(rendered[0])
        assert reply.use.reasoning_budget_hit and reply.use.reasoning_tokens == 6
        assert reply.use.action_tokens <= 4
        assert reply.text.startswith("<think>\n") and reply.text.count("</think>") == 1
    finally:
        runtime.close()


def test_llamacpp_drops_old_pictures_to_fit_the_context_then_refuses(tmp_path_factory):
    from appliance.vlm.llamacpp_runtime import IMAGE_OMITTED, LlamaCppVLMConfig, QwenLlamaCppRuntime

    model, mmproj = tiny_qwen_gguf(tmp_path_factory)
    images = [np.full((256, 256, 3), 40 * i, np.uint8) for i in range(1, 5)]
    messages = [{"role": "user", "content": [{"type": "image", "image_index": 1},
                                             {"type": "text", "text": "Add a crack."}]}]
    for index in range(2, 5):
        messages.append({"role": "tool", "content": [
            {"type": "text", "text": "[Tool Response from image_gen]\n{}"},
            {"type": "image", "image_index": index}]})
    request = to_chat_request(messages, images)
    runtime = QwenLlamaCppRuntime(LlamaCppVLMConfig(model, mmproj, n_ctx=1024, do_sample=False))
    try:
        full = runtime.prompt_tokens(request)
        per_picture = 8 * 8 + 2  # 256 px pictures: one token per 32x32 px, plus start and end
        assert full > 4 * per_picture
        # Room for all but one picture (and the note that replaces it).
        limit = full - per_picture + 60
        fitted, needed, problem = runtime.fit_context(request, runtime.config.n_ctx - limit)
        assert problem is None and len(fitted.images) == 3 and needed <= limit
        omitted = [part["text"] for m in fitted.messages for part in m["content"] if part["type"] == "text"]
        assert IMAGE_OMITTED in omitted
        assert np.array_equal(np.asarray(fitted.images[0]), np.asarray(request.images[0]))  # the normal stays
        [reply] = runtime.chat([request], max_new_tokens=runtime.config.n_ctx - 8)
        assert reply.text == "" and "n_ctx 1024" in reply.error and "lower max_pixels" in reply.error
    finally:
        runtime.close()


def test_a_context_overflow_fails_the_episode_with_its_reason_and_the_batch_goes_on():
    class Overflowing:
        name = "overflowing"

        def act(self, states):
            return [PolicyReply("", {"prompt_tokens": 99999}, abort="the conversation needs about "
                                "99999 tokens of context") for _ in states]

    engine = build_engine()
    try:
        specs = [EpisodeSpec(np.full((64, 64, 3), 100, np.uint8), "bottle", "crack", seed=s)
                 for s in (1, 2)]
        results = AgentEnvironment(engine.tools, EnvConfig()).run(specs, Overflowing())
    finally:
        engine.close()
    for result in results:
        assert result.status == "failed" and result.turns == 1
        assert result.end_reason.startswith("the conversation needs about 99999 tokens")
        assert result.generation == [{"turn": 1, "prompt_tokens": 99999}]


# --- PG and QE read their answer after the reasoning -------------------------------------------

def test_the_judge_reads_its_grade_only_after_the_reasoning(tmp_path_factory):
    from appliance.tools.quality_eval.vlm import VLMQualityEvaluator
    from appliance.vlm.transformers_runtime import QwenTransformersRuntime, TransformersVLMConfig

    runtime = QwenTransformersRuntime(TransformersVLMConfig(tiny_qwen_hf(tmp_path_factory),
                                                            do_sample=False))
    normal = np.full((64, 64, 3), 120, np.uint8)
    edited = normal.copy()
    edited[20:24, 10:50] = 30
    request = QualityRequest(normal, edited, "bottle", "crack")
    grade = '{"location_score": 4, "quality_score": 3, "review": "A thin crack on the face."}'
    try:
        drafted = GuidedRuntime(runtime, lambda r: '<think>first guess {"location_score": 0, '
                                '"quality_score": 0}</think>\n\n' + grade)
        [report] = VLMQualityEvaluator(drafted, budget=Budget(0, 8)).evaluate([request])
        assert (report.location_score, report.quality_score) == (4, 3)
        unfinished = GuidedRuntime(runtime, lambda r: '<think>it could be {"location_score": 5, '
                                   '"quality_score": 5}')
        [failure] = VLMQualityEvaluator(unfinished, budget=Budget(0, 8)).evaluate([request])
        assert isinstance(failure, ToolFailure) and "reasoning was not finished" in str(failure)
    finally:
        runtime.close()


# --- sampling ----------------------------------------------------------------------------------

def test_sampling_comes_from_the_checkpoint_then_the_settings(tmp_path):
    assert resolve_sampling(tmp_path, {}) == Sampling()  # Qwen's Thinking defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "presence_penalty": 1.5}))
    assert resolve_sampling(tmp_path, {}) == Sampling(0.7, 0.8, 20, 1.5, True)
    assert resolve_sampling(tmp_path, {"temperature": 0.3, "top_k": None}) == Sampling(0.3, 0.8, 20, 1.5, True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.0}))
    assert resolve_sampling(tmp_path, {}).do_sample is True  # never greedy by accident
    assert resolve_sampling(tmp_path, {"do_sample": False}).do_sample is False  # only when asked
    with pytest.raises(ValueError, match="unknown sampling setting"):
        Sampling().updated({"temprature": 0.5})


def test_role_settings_reach_each_role(tmp_path):
    from appliance.engine.registry import EngineError, role_options
    from appliance.models.manifest import ModelEntry

    entry = ModelEntry("m", "org/m", "main", "MIT", "transformers", {"policy": "qwen-transformers"}, (),
                       settings={"roles": {"policy": {"reasoning_budget": 2048, "temperature": 0.5},
                                           "quality_eval": {"action_budget": 64}}})
    assert role_options(entry, "policy") == (Budget(2048, 256), {"temperature": 0.5})
    assert role_options(entry, "quality_eval") == (Budget(512, 64), {})
    bad = replace(entry, settings={"roles": {"policy": {"temp": 1}}})
    with pytest.raises(EngineError, match="settings.roles.policy: unknown sampling setting"):
        role_options(bad, "policy")



# --- selftest --real tells the truth -----------------------------------------------------------

def test_selftest_real_runs_the_model_unguided_and_reports_what_it_did(tmp_path):
    """On the tiny random model the honest answer is that no episode finishes the protocol."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from appliance.models.tiny_models import build_tiny_models

    models = tmp_path / "models"
    build_tiny_models(models, parts=["qwen"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "APPLIANCE_MODELS": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-m", "appliance.cli.main", "selftest", "--backend",
                           "qwen-transformers", "--real", "--episodes", "2", "--models-dir",
                           str(models)], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=900)
    output = done.stdout
    kit = next(line for line in output.splitlines() if "qwen-transformers" in line and "policy" in line)
    assert kit.startswith("PASS") and "guided (forced decoding through the model)" in kit
    real = next(line for line in output.splitlines() if "installed (" in line)
    assert real.startswith("FAIL"), output
    assert "(guided" not in real  # the installed model ran on its own
    assert "0/2 episodes finished the protocol" in real
    replies = int(real.split("; ")[1].split(" replies")[0])
    assert replies == 24  # 2 episodes x 12 turns, each turn a reply the environment refused
    assert "protocol errors: 24" in real
    assert done.returncode == 1, output + done.stderr
