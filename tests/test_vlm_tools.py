"""PG and QE on a local VLM: reply parsing, the JSON retry, fallbacks, and batching on the tiny
random-weight Qwen3-VL (driven by forced decoding, so the real model runs every token)."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_qwen import tiny_qwen_hf

from appliance.tools.interfaces import Issue, PromptRequest, QualityRequest, ToolFailure
from appliance.tools.prompt_gen.vlm import VLMPromptGenerator, clean_instruction
from appliance.tools.quality_eval.vlm import (
    RETRY_PROMPT,
    VLMQualityEvaluator,
    first_json_object,
    issues_from_review,
    parse_judgement,
)
from appliance.vlm.budget import Budget
from appliance.vlm.chat import GuidedRuntime

INSTRUCTION = ("In this photo change only a short stretch of the tile's upper face near its left "
               "edge: add a thin dark hairline crack that branches once. Keep everything else "
               "exactly as it is.")


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from appliance.vlm.transformers_runtime import QwenTransformersRuntime, TransformersVLMConfig

    hf_dir = tiny_qwen_hf(tmp_path_factory)
    loaded = QwenTransformersRuntime(TransformersVLMConfig(hf_dir, do_sample=False))
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def pair(texture_image):
    normal = np.ascontiguousarray(texture_image[:128, :128])
    edited = normal.copy()
    edited[60:66, 20:100] = 30  # a dark scratch-like line
    return normal, edited


class Recorder:
    """Counts how the tool batches its model calls and keeps what the model replied (the calls
    still reach the real runtime)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.batches: list[list] = []
        self.replies: list[list[str]] = []
        self.uses: list[list] = []  # what each reply spent (BudgetUse)

    def chat(self, requests, **kwargs):
        self.batches.append(list(requests))
        replies = self.inner.chat(requests, **kwargs)
        self.replies.append([reply.text for reply in replies])
        self.uses.append([reply.use for reply in replies])
        return replies

    def close(self):
        pass


# --- parsing ---------------------------------------------------------------------------------


def test_the_first_json_object_is_found_in_prose_and_fences():
    assert first_json_object('Sure! ```json\n{"a": 1}\n``` and {"b": 2}') == {"a": 1}
    assert first_json_object('{broken {"ok": {"nested": true}}') == {"ok": {"nested": True}}
    assert first_json_object("no object [1, 2]") is None


def test_judgements_are_clamped_and_reasoning_is_ignored():
    reply = ('<think>maybe {"location_score": 0}</think>Here it is: {"location_score": 7, '
             '"quality_score": "3/5", "review": "Thin crack, slightly too faint.", '
             '"issues": ["too faint", "made_up"]}')
    judgement = parse_judgement(reply)
    assert (judgement.location_score, judgement.quality_score) == (5, 3)
    assert judgement.issues == [Issue.TOO_FAINT]  # normalised, unknown codes dropped
    assert parse_judgement('{"location_score": -2, "quality_score": 2.6, "review": "x"}').location_score == 0
    assert parse_judgement('{"location_score": 2.6, "quality_score": 1}').location_score == 3
    assert parse_judgement('{"quality_score": 4, "review": "no location"}') is None
    assert parse_judgement('{"location_score": true, "quality_score": 4}') is None
    assert parse_judgement("I cannot grade this.") is None


def test_issues_come_from_the_review_wording_unless_negated():
    review = "The crack sits on the background and looks pasted; there are no seams though."
    found = issues_from_review(review)
    assert Issue.OFF_OBJECT in found
    assert Issue.HARD_SEAMS in found  # "pasted" names it even though "seams" is negated
    assert issues_from_review("No visible seams, not faint, realistic.") == []


def test_instructions_are_cleaned_of_reasoning_labels_and_quotes():
    assert clean_instruction(f'<think>where?</think>\n**Instruction:** "{INSTRUCTION}"') == INSTRUCTION
    assert clean_instruction(f"planning...</think>{INSTRUCTION}\n\nWhy: it fits.") == INSTRUCTION
    assert clean_instruction("ok") is None
    assert clean_instruction("<think>only thinking</think>") is None


# --- PG on the tiny model --------------------------------------------------------------------


def test_prompt_gen_batches_and_falls_back_on_an_unusable_reply(runtime, pair, engine):
    from appliance.tools.prompt_gen.composer import KnowledgePromptGenerator

    recorder = Recorder(runtime)
    replies = iter([f"<think>the upper face</think>{INSTRUCTION}", "crack"])
    guided = GuidedRuntime(recorder, lambda request: next(replies))
    fallback = KnowledgePromptGenerator(engine.knowledge_base)
    tool = VLMPromptGenerator(guided, engine.knowledge_base, fallback=fallback, budget=Budget(0, 8))
    requests = [PromptRequest(pair[0], "magnetic_tile", "crack"),
                PromptRequest(pair[1], "magnetic_tile", "crack")]
    prompts = tool.generate_prompts(requests)
    assert prompts[0] == INSTRUCTION
    assert prompts[1] == fallback.generate_prompts(requests[1:])[0]
    assert tool.fallbacks_used == 1
    assert len(recorder.batches) == 1 and len(recorder.batches[0]) == 2  # one batched call
    # The knowledge base entry went into the model's context.
    user_text = recorder.batches[0][0].messages[1]["content"][1]["text"]
    assert "knowledge base" in user_text and "crack" in user_text


# --- QE on the tiny model --------------------------------------------------------------------


def test_quality_eval_retries_once_on_malformed_json(runtime, pair):
    recorder = Recorder(runtime)

    def judge(request):
        if request.messages[-1]["content"][-1].get("text") == RETRY_PROMPT:
            return ('{"location_score": 4, "quality_score": 2, "review": "On the face, but the '
                    'line looks pasted with a hard edge."}')
        if np.array_equal(np.asarray(request.images[0]), np.asarray(request.images[1])):
            return '{"location_score": 1, "quality_score": 0, "review": "No change.", "issues": []}'
        return '{"location_score": 4, "quality_score": '  # the edited pair: malformed first

    tool = VLMQualityEvaluator(GuidedRuntime(recorder, judge), budget=Budget(0, 8))
    normal, edited = pair
    reports = tool.evaluate([QualityRequest(normal, edited, "magnetic_tile", "crack"),
                             QualityRequest(normal, normal, "magnetic_tile", "crack")])
    retried, direct = reports
    assert (retried.location_score, retried.quality_score) == (4, 2)
    assert retried.issues == [Issue.HARD_SEAMS]  # from the review: the judge listed none
    assert retried.measurements["replies"] == 2
    assert (direct.location_score, direct.quality_score, direct.issues) == (1, 0, [])
    assert direct.measurements["replies"] == 1
    # First a batch of both, then a retry of only the malformed one, which saw its bad reply.
    assert [len(batch) for batch in recorder.batches] == [2, 1]
    retry = recorder.batches[1][0]
    assert retry.messages[-2]["role"] == "assistant"
    # (the runtime hands back the reply trimmed of surrounding whitespace)
    assert retry.messages[-2]["content"][0]["text"] == '{"location_score": 4, "quality_score":'
    assert len(retry.images) == 2


def test_quality_eval_falls_back_after_the_retry(runtime, pair):
    from appliance.tools.quality_eval.heuristic import HeuristicQualityEvaluator

    normal, edited = pair
    request = QualityRequest(normal, edited, "magnetic_tile", "crack")
    unreadable = GuidedRuntime(runtime, lambda r: "I think it looks fine.")
    with_fallback = VLMQualityEvaluator(unreadable, fallback=HeuristicQualityEvaluator(),
                                        budget=Budget(0, 8)).evaluate([request])[0]
    expected = HeuristicQualityEvaluator().evaluate([request])[0]
    assert (with_fallback.location_score, with_fallback.quality_score) == \
        (expected.location_score, expected.quality_score)
    assert with_fallback.measurements["fallback"] == "heuristic"
    assert with_fallback.measurements["replies"] == 2
    # Without a fallback no grade is invented: the item is the judge's error, for the policy.
    alone = VLMQualityEvaluator(unreadable, budget=Budget(0, 8)).evaluate([request])[0]
    assert isinstance(alone, ToolFailure)
    assert "2 replies held no grade" in str(alone) and "I think it looks fine." in str(alone)


def test_unguided_tools_run_on_the_random_model(runtime, pair, engine):
    """No forcing: whatever the random model writes, each tool acts on it as specified."""
    from appliance.tools.prompt_gen.composer import KnowledgePromptGenerator

    normal, edited = pair
    request = PromptRequest(normal, "magnetic_tile", "crack")
    recorder, fallback = Recorder(runtime), KnowledgePromptGenerator(engine.knowledge_base)
    tool = VLMPromptGenerator(recorder, fallback=fallback, budget=Budget(0, 12))
    [prompt] = tool.generate_prompts([request])
    [[reply]], [[use]] = recorder.replies, recorder.uses  # one call, one reply
    # A usable instruction is a cleaned one the budget did not cut (half an instruction is not).
    cleaned = None if use.action_budget_hit else clean_instruction(reply)
    # The model's instruction when it wrote a usable one, else the knowledge fallback, counted.
    assert prompt == (cleaned if cleaned is not None else fallback.generate_prompts([request])[0])
    assert tool.fallbacks_used == (1 if cleaned is None else 0)

    recorder = Recorder(runtime)
    report = VLMQualityEvaluator(recorder, budget=Budget(0, 12)).evaluate(
        [QualityRequest(normal, edited, "magnetic_tile", "crack")])[0]
    replies = [batch_replies[0] for batch_replies in recorder.replies]
    judgements = [parse_judgement(text) for text in replies]
    # One retry, and only after an unreadable first reply.
    assert len(replies) == (1 if judgements[0] is not None else 2)
    judged = judgements[-1]
    if judged is None:  # unreadable twice: no grade was invented, the judge's error instead
        assert isinstance(report, ToolFailure) and "2 replies held no grade" in str(report)
    else:  # the grade is the model's own, parsed from its last reply
        assert report.measurements["replies"] == len(replies)
        assert report.measurements["raw_reply"] == replies[-1][:2000]
        assert (report.location_score, report.quality_score, report.review) == \
            (judged.location_score, judged.quality_score, judged.review)
        assert report.issues == (judged.issues if judged.issues is not None
                                 else issues_from_review(judged.review))
        assert "unreadable" not in report.measurements
