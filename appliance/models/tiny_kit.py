"""Tiny random-weight Qwen3-VL models, built locally from configs, for tests and ``selftest``.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on the appliance's own
prompts (so conversations stay short in tokens), the weights are random, and the GGUF + mmproj
pair comes from llama.cpp's own converter (vendored in ``third_party/llama_cpp_convert``).
The same loading and inference code then runs on these folders as on the real checkpoints.

A random model cannot follow the protocol; the tests drive it with forced decoding (see
``appliance.vlm.chat.GuidedRuntime`` and the policies' ``guide``), which still runs the
real processor, vision tower, language model and generation loop.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

from appliance.vlm.chat_template import QWEN3_VL_CHAT_TEMPLATE

# Qwen's chat and vision control tokens (special: stripped when decoding) ...
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# ... and the protocol tokens, which Qwen keeps in decoded text (added but not special).
TEXT_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>",
               "</tool_response>")

# Small images keep the tiny model fast: 16 px patches merged 2x2 -> one token per 32x32 px.
TINY_MIN_PIXELS = 32 * 32 * 4
TINY_MAX_PIXELS = 64 * 64
TINY_VOCAB_SIZE = 3000  # an upper bound: the small corpus yields about 1,100 tokens


@dataclass(frozen=True)
class TinyQwenKit:
    hf_dir: Path  # a transformers folder: config, safetensors, tokenizer, processor, template
    gguf: Path | None  # llama.cpp language model
    mmproj: Path | None  # llama.cpp vision projector


def _tokenizer_corpus() -> list[str]:
    """Text the tiny model will see: our prompts, tool schemas and protocol messages."""
    from appliance.agent import schemas
    from appliance.agent.protocol import format_answer, format_tool_call, tool_response_text
    from appliance.tools.prompt_gen import vlm as vlm_prompt_gen
    from appliance.tools.quality_eval import vlm as vlm_quality_eval

    corpus = [schemas.system_prompt(3, 12), QWEN3_VL_CHAT_TEMPLATE,
              vlm_prompt_gen.SYSTEM_PROMPT, vlm_quality_eval.SYSTEM_PROMPT]
    for category, defect in (("magnetic_tile", "crack"), ("bottle", "broken_large"),
                             ("metal_nut", "scratch"), ("screw", "thread damage")):
        corpus.append(schemas.task_prompt(category, defect))
        corpus.append(vlm_prompt_gen.user_prompt(category, defect, None))
        corpus.append(vlm_quality_eval.user_prompt(category, defect))
        task = {"item_name": category, "anomaly_type": defect}
        corpus.append(format_tool_call(f"I need a first instruction for a {defect}.",
                                       schemas.PROMPT_GEN, {"image": 1, **task}))
        corpus.append(format_tool_call("The judge should check it.", schemas.QUALITY_EVAL,
                                       {"anomaly_image": 2, **task}))
        corpus.append(tool_response_text(schemas.QUALITY_EVAL, {
            "status": "success", "anomaly_image": 2, "location_score": 4, "quality_score": 3,
            "score": 7, "passed": True, "issues": ["too_faint"], "review": "A faint mark."}))
    corpus.append(format_answer("Done.", {"status": "success", "final_image_index": 2}))
    # The phrases the scripted policy and the CPU tools write (their string literals live in
    # their source): the guided tests replay those messages, and fewer tokens is faster.
    from appliance.policies import scripted
    from appliance.tools.prompt_gen import composer
    from appliance.tools.quality_eval import heuristic

    corpus += [inspect.getsource(module) for module in (scripted, composer, heuristic)]
    return corpus


def build_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):
    """A Qwen2-style byte-level BPE tokenizer trained on the appliance's own texts."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, unk_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TEXT_TOKENS])
    tokenizer.chat_template = QWEN3_VL_CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer):
    """A Qwen3-VL config small enough for CPU tests, with every linear at least 64 wide so that
    bitsandbytes 4-bit also runs on it."""
    from transformers import Qwen3VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                max_position_embeddings=32768, tie_word_embeddings=False,
                # mrope sections must sum to head_dim / 2.
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                 "mrope_section": [6, 5, 5], "mrope_interleaved": True},
                bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    # Deepstack layers must be fewer than text layers (llama.cpp asserts); the position grid a
    # perfect square.
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision,
                         image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                         vision_start_token_id=ids("<|vision_start|>"),
                         vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)


def thinking_template(template: str = QWEN3_VL_CHAT_TEMPLATE) -> str:
    """The vendored Qwen3-VL template with the generation prompt of Qwen's Thinking checkpoints,
    which open the reasoning block for the model (``<|im_start|>assistant\n<think>\n``).

    For testing how the runtimes treat a Thinking model on the tiny kit. It is not the published
    Thinking template byte for byte (not available offline): that one also drops the reasoning of
    assistant turns before the last user message; the generation prompt, which is what the
    runtimes react to, is the same.
    """
    prompt = "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
    if not template.endswith(prompt):
        raise ValueError("the template does not end with the Qwen3-VL generation prompt")
    return template[:-len(prompt)] + prompt.replace("assistant\\n'", "assistant\\n<think>\\n'")


def build_tiny_qwen3vl_hf(folder: Path, seed: int = 0, thinking: bool = False) -> Path:
    """Write a complete transformers Qwen3-VL folder (random weights) and return it; with
    ``thinking``, its chat template opens the reasoning block as Thinking checkpoints do."""
    import torch
    from transformers import GenerationConfig, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    with torch.random.fork_rng():  # seeded weights without touching the caller's generator
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config).eval()
    eos, pad = config.text_config.eos_token_id, config.text_config.pad_token_id
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad,
                                               do_sample=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2,
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor.save_pretrained(folder)
    template = thinking_template() if thinking else QWEN3_VL_CHAT_TEMPLATE
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    return folder


def build_tiny_kit(folder: Path, seed: int = 0, gguf: bool = True) -> TinyQwenKit:
    """The HF folder under ``folder/hf`` and, when asked, its GGUF pair under ``folder/gguf``."""
    folder = Path(folder)
    hf_dir = build_tiny_qwen3vl_hf(folder / "hf", seed=seed)
    if not gguf:
        return TinyQwenKit(hf_dir, None, None)
    from appliance.models.gguf_convert import convert_qwen3vl

    model_path, mmproj_path = convert_qwen3vl(hf_dir, folder / "gguf")
    return TinyQwenKit(hf_dir, model_path, mmproj_path)
