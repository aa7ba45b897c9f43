"""Prefix reuse (appliance/vlm/prefix_cache.py): with greedy decoding, a runtime that keeps the
KV cache of the shared prefix writes exactly the tokens of one that prefills everything, and
prefills fewer; on the tiny random-weight Qwen3-VL kit, through both runtimes."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _tiny_qwen import tiny_qwen_gguf, tiny_qwen_hf, tiny_qwen_thinking_hf

from appliance.vlm.budget import Budget, BudgetUse
from appliance.vlm.prefix_cache import PrefixKVStore

BENCH = Path(__file__).resolve().parents[1] / "bench" / "prefix_reuse.py"
GREEDY = {"do_sample": False}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_prefix_reuse", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def episodes():
    """Two scripted episodes of the same photo (crack, scratch), 4 turns each, pictures growing."""
    bench = _bench()
    return [bench.episode_requests(defect, 4, 128) for defect in ("crack", "scratch")]


def _interleaved(runtime, episodes, **options):
    """Turn by turn, episode after episode, one request per call: (text, use) per call."""
    out = []
    for turn in range(len(episodes[0])):
        for episode in episodes:
            [reply] = runtime.chat([episode[turn]], max_new_tokens=6, sampling=GREEDY, **options)
            assert reply.error is None
            out.append((reply.text, reply.use))
    return out


def test_the_lru_keeps_the_most_recent_prefixes():
    store = PrefixKVStore(2)
    store.put("a", 1)
    store.put("b", 2)
    assert store.get("a") == 1  # a is now the most recent
    store.put("c", 3)
    assert store.get("b") is None and store.get("a") == 1 and store.get("c") == 3 and len(store) == 2


def test_the_prefill_count_stays_out_of_the_trajectory_record():
    """It depends on what ran before, not on the conversation; a replay records the same."""
    use = BudgetUse(prompt_tokens=100, prefill_tokens=3)
    assert "prefill_tokens" not in use.as_dict() and use.as_dict()["prompt_tokens"] == 100


# --- llama.cpp -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_runtimes(tmp_path_factory):
    from appliance.vlm.llamacpp_runtime import LlamaCppVLMConfig, QwenLlamaCppRuntime

    model, mmproj = tiny_qwen_gguf(tmp_path_factory)
    runtimes = {setting: QwenLlamaCppRuntime(LlamaCppVLMConfig(
        model, mmproj, n_ctx=8192, do_sample=False, prefix_cache=setting)) for setting in (True, False)}
    yield runtimes
    for runtime in runtimes.values():
        runtime.close()


def test_llamacpp_reuses_the_prefix_and_writes_the_same_tokens(gguf_runtimes, episodes):
    on = _interleaved(gguf_runtimes[True], episodes)
    off = _interleaved(gguf_runtimes[False], episodes)
    assert [text for text, _ in on] == [text for text, _ in off]
    assert all(a.prompt_tokens == b.prompt_tokens for (_, a), (_, b) in zip(on, off))
    assert all(use.prefill_tokens == use.prompt_tokens for _, use in off)
    first = on[0][1]
    assert first.prefill_tokens == first.prompt_tokens  # nothing cached yet
    for _, use in on[1:]:  # system prompt, tools and the photo at least are reused
        assert use.prefill_tokens < use.prompt_tokens - 1000
    # The second episode's first turn differs from the first's only in its task text.
    assert on[1][1].prefill_tokens < 60


def test_llamacpp_the_same_prompt_twice_and_a_new_photo(gguf_runtimes, episodes):
    runtime, plain = gguf_runtimes[True], gguf_runtimes[False]
    request = episodes[0][2]
    [a] = runtime.chat([request], max_new_tokens=6, sampling=GREEDY)
    [b] = runtime.chat([request], max_new_tokens=6, sampling=GREEDY)  # all cached: the last token again
    [c] = plain.chat([request], max_new_tokens=6, sampling=GREEDY)
    assert a.text == b.text == c.text
    assert b.use.prefill_tokens == 1
    # Another photo: only the text before it (system prompt, tools) is reused.
    photo = np.full((128, 128, 3), 200, np.uint8)
    other = replace(request, images=[_pil(photo)] + list(request.images[1:]))
    [d] = runtime.chat([other], max_new_tokens=6, sampling=GREEDY)
    [e] = plain.chat([other], max_new_tokens=6, sampling=GREEDY)
    assert d.text == e.text
    assert 1000 < d.use.prompt_tokens - d.use.prefill_tokens < d.use.prompt_tokens


def _pil(array):
    from PIL import Image

    return Image.fromarray(array)


def test_llamacpp_forced_and_budgeted_replies_with_a_cached_prefix(gguf_runtimes, episodes):
    runtime, plain = gguf_runtimes[True], gguf_runtimes[False]
    forced = replace(episodes[0][1], forced="<tool_call>\n{}\n</tool_call>")
    runtime.chat([episodes[0][1]], max_new_tokens=4, sampling=GREEDY)  # cache this prompt
    [reply] = runtime.chat([forced], sampling=GREEDY)
    assert reply.text == "<tool_call>\n{}\n</tool_call>" and reply.use.prefill_tokens <= 1
    budget = Budget(reasoning=3, action=4)
    [a] = runtime.chat([episodes[1][3]], budget=budget, sampling=GREEDY)
    [b] = plain.chat([episodes[1][3]], budget=budget, sampling=GREEDY)
    assert a.text == b.text and a.use.action_tokens == b.use.action_tokens
    assert a.use.prefill_tokens < b.use.prefill_tokens == b.use.prompt_tokens


def test_llamacpp_falls_back_to_a_full_prefill(gguf_runtimes, episodes, monkeypatch):
    runtime, plain = gguf_runtimes[True], gguf_runtimes[False]
    request = episodes[1][3]
    [expected] = plain.chat([request], max_new_tokens=6, sampling=GREEDY)
    runtime.chat([episodes[1][2]], max_new_tokens=6, sampling=GREEDY)
    runtime.llm.reset()  # someone else used the model: the cache no longer says what it holds
    [after_reset] = runtime.chat([request], max_new_tokens=6, sampling=GREEDY)
    assert after_reset.text == expected.text
    assert after_reset.use.prefill_tokens == after_reset.use.prompt_tokens
    # A KV cache that cannot drop a tail: the handler's own full evaluation, still correct.
    runtime.chat([episodes[1][2]], max_new_tokens=6, sampling=GREEDY)
    monkeypatch.setattr(runtime.llm._ctx, "kv_cache_seq_rm", lambda *args: False)
    [fallback] = runtime.chat([request], max_new_tokens=6, sampling=GREEDY)
    assert fallback.text == expected.text
    assert fallback.use.prefill_tokens == fallback.use.prompt_tokens


# --- transformers --------------------------------------------------------------------------------

def _hf_runtimes(folder):
    from appliance.vlm.transformers_runtime import QwenTransformersRuntime, TransformersVLMConfig

    return {setting: QwenTransformersRuntime(TransformersVLMConfig(
        folder, do_sample=False, prefix_cache=setting)) for setting in (True, False)}


@pytest.fixture(scope="module")
def hf_runtimes(tmp_path_factory):
    runtimes = _hf_runtimes(tiny_qwen_hf(tmp_path_factory))
    yield runtimes
    for runtime in runtimes.values():
        runtime.close()


def test_transformers_reuses_the_prefix_and_writes_the_same_tokens(hf_runtimes, episodes):
    on = _interleaved(hf_runtimes[True], episodes)
    off = _interleaved(hf_runtimes[False], episodes)
    assert [text for text, _ in on] == [text for text, _ in off]
    assert all(use.prefill_tokens == use.prompt_tokens for _, use in off)
    assert on[0][1].prefill_tokens == on[0][1].prompt_tokens  # the prefix computed: counted
    prefix = on[1][1].prompt_tokens - on[1][1].prefill_tokens  # up to the first picture
    assert prefix > 1000
    assert all(use.prompt_tokens - use.prefill_tokens == prefix for _, use in on[1:])
    assert len(hf_runtimes[True].prefixes) == 1  # one photo: one prefix, computed once


def test_transformers_unpadded_batches_reuse_and_padded_ones_prefill_in_full(hf_runtimes, episodes):
    runtime, plain = hf_runtimes[True], hf_runtimes[False]
    same_length = [episodes[0][2], episodes[1][2]]  # crack / scratch: the same token count
    other_photo = replace(episodes[0][2], images=[_pil(np.full((128, 128, 3), 30, np.uint8))]
                          + list(episodes[0][2].images[1:]))
    for batch in (same_length, [episodes[0][2], other_photo], [episodes[0][1], episodes[1][3]]):
        a = runtime.chat(batch, max_new_tokens=6, sampling=GREEDY)
        b = plain.chat(batch, max_new_tokens=6, sampling=GREEDY)
        assert [r.text for r in a] == [r.text for r in b]
        assert [r.use.prompt_tokens for r in a] == [r.use.prompt_tokens for r in b]
    # The last batch is padded (turns 1 and 3): no reuse.
    assert all(r.use.prefill_tokens == r.use.prompt_tokens for r in a)
    [first, second] = runtime.chat(same_length, max_new_tokens=6, sampling=GREEDY)
    assert first.use.prefill_tokens < first.use.prompt_tokens - 1000
    assert second.use.prefill_tokens == first.use.prefill_tokens


def test_transformers_forced_and_budgeted_replies_with_a_cached_prefix(tmp_path_factory, episodes):
    runtimes = _hf_runtimes(tiny_qwen_thinking_hf(tmp_path_factory))
    try:
        budget = Budget(reasoning=4, action=3)
        for request in (episodes[0][0], episodes[0][2]):
            a = runtimes[True].chat([request], budget=budget, sampling=GREEDY)[0]
            b = runtimes[False].chat([request], budget=budget, sampling=GREEDY)[0]
            assert a.text == b.text and a.use.reasoning_budget_hit == b.use.reasoning_budget_hit
        assert a.use.prefill_tokens < a.use.prompt_tokens - 1000
        forced = replace(episodes[0][3], forced="<tool_call>\n{}\n</tool_call>")
        [reply] = runtimes[True].chat([forced], sampling=GREEDY)
        assert reply.text.endswith("<tool_call>\n{}\n</tool_call>")
        assert reply.use.prefill_tokens < reply.use.prompt_tokens
    finally:
        for runtime in runtimes.values():
            runtime.close()
