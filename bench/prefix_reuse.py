"""Prefix reuse: prompt tokens vs. tokens actually prefilled per episode, with and without.

    python bench/prefix_reuse.py                       # tiny random-weight Qwen3-VL, CPU, ~1 min
    python bench/prefix_reuse.py --gguf M.gguf MMPROJ.gguf --hf QWEN_DIR --image-size 640

Each episode is a scripted conversation shaped like the agent's: the system prompt, the tools
block and the normal photo, then a tool call per turn and its response (an edited picture after
each image generation, the mask at the end). Every turn asks the runtime for a short reply (the
conversation itself is scripted, so both settings see the same prompts). ``--episodes`` episodes
of the same photo and category (different defect types) run turn by turn, interleaved, as the
agent's batch does. Each runtime runs the same episodes with ``prefix_cache`` on and off and
prints, per episode, the prompt tokens summed over its turns, the tokens prefilled, their ratio,
and the wall time; and whether the replies (greedy) were identical.

llama.cpp keeps one KV cache: a turn reuses what it shares with the request run just before it.
transformers reuses each photo's prefix (up to the first picture) only in unpadded batches, so it
runs here with ``--batch 1`` (conversations one at a time) unless told otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.agent.protocol import format_answer, format_tool_call, tool_response_text  # noqa: E402
from appliance.agent.schemas import TOOL_SCHEMAS, system_prompt, task_prompt  # noqa: E402
from appliance.vlm.chat import ChatRequest, to_chat_request  # noqa: E402

DEFECTS = ["crack", "scratch", "stain", "hole"]


def _picture(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _script(defect: str) -> list[tuple[str, dict, dict, bool]]:
    """(tool, arguments, response, returns a picture) per turn, as an accepted episode runs."""
    return [
        ("prompt_gen", {"image": 1, "item_name": "tile", "anomaly_type": defect},
         {"prompt": f"a thin {defect} across the tile surface, dark and irregular"}, False),
        ("image_gen", {"image": 1, "prompt": f"a thin {defect}"}, {"image": 2}, True),
        ("quality_eval", {"image": 2}, {"location": 2, "quality": 2, "comment": "too faint"}, False),
        ("knowledge_retrieval", {"query": f"{defect} on tile"},
         {"entries": [f"{defect}: sharp edges, high contrast against the glaze"]}, False),
        ("image_gen", {"image": 1, "prompt": f"a sharp {defect}, high contrast"}, {"image": 3}, True),
        ("quality_eval", {"image": 3}, {"location": 4, "quality": 4, "comment": "good"}, False),
        ("mask_gen", {"anomaly_image": 3}, {"mask": 4}, True),
    ]


def episode_requests(defect: str, turns: int, size: int, photo_seed: int = 0) -> list[ChatRequest]:
    """The request of every turn of one scripted episode (the conversation grows each turn)."""
    images = [_picture(size, photo_seed)]
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt(3, 12)}]},
                {"role": "user", "content": [{"type": "image", "image_index": 1},
                                             {"type": "text", "text": task_prompt("tile", defect)}]}]
    requests = [to_chat_request(messages, images, tools=TOOL_SCHEMAS)]
    script = _script(defect)
    for turn in range(1, turns):
        name, arguments, response, picture = script[(turn - 1) % len(script)]
        messages.append({"role": "assistant", "content": [{"type": "text", "text": format_tool_call(
            f"Turn {turn}: next, {name}.", name, arguments)}]})
        content = [{"type": "text", "text": tool_response_text(name, response)}]
        if picture:
            images.append(_picture(size, photo_seed * 1000 + turn))
            content.append({"type": "image", "image_index": len(images)})
        messages.append({"role": "tool", "content": content})
        requests.append(to_chat_request(messages, images, tools=TOOL_SCHEMAS))
    if turns > len(script):
        messages.append({"role": "assistant", "content": [{"type": "text", "text": format_answer(
            "done", {"status": "success"})}]})
    return requests


def run_episodes(runtime, episodes: list[list[ChatRequest]], max_new_tokens: int,
                 batch: int | None) -> dict:
    """Turn by turn, the episodes' requests together (``batch``: per chat() call; None: all)."""
    totals = [{"prompt": 0, "prefill": 0} for _ in episodes]
    texts: list[str] = []
    start = time.perf_counter()
    for turn in range(max(len(e) for e in episodes)):
        live = [(i, e[turn]) for i, e in enumerate(episodes) if turn < len(e)]
        step = batch or len(live)
        for at in range(0, len(live), step):
            group = live[at:at + step]
            replies = runtime.chat([r for _, r in group], max_new_tokens=max_new_tokens,
                                   sampling={"do_sample": False})
            for (index, _), reply in zip(group, replies):
                if reply.error:
                    raise RuntimeError(reply.error)
                totals[index]["prompt"] += reply.use.prompt_tokens
                totals[index]["prefill"] += reply.use.prefill_tokens
                texts.append(reply.text)
    return {"episodes": totals, "seconds": time.perf_counter() - start, "texts": texts}


def _report(name: str, results: dict) -> list[dict]:
    rows = []
    print(f"\n{name}")
    print(f"{'prefix_cache':>12} {'episode':>7} {'prompt tok':>10} {'prefilled':>10} {'ratio':>6} "
          f"{'wall s (all)':>12}")
    for setting in ("off", "on"):
        result = results[setting]
        for index, episode in enumerate(result["episodes"]):
            ratio = episode["prefill"] / max(1, episode["prompt"])
            print(f"{setting:>12} {index:>7} {episode['prompt']:>10} {episode['prefill']:>10} "
                  f"{ratio:>6.2f} {result['seconds'] if index == 0 else '':>12.6}")
            rows.append({"runtime": name, "prefix_cache": setting == "on", "episode": index,
                         **episode, "seconds": result["seconds"]})
    same = results["on"]["texts"] == results["off"]["texts"]
    print(f"replies identical with and without (greedy): {same}")
    return rows


def bench_llamacpp(model: Path, mmproj: Path, episodes, args) -> dict:
    from appliance.vlm.llamacpp_runtime import LlamaCppVLMConfig, QwenLlamaCppRuntime

    results = {}
    for setting in ("off", "on"):
        runtime = QwenLlamaCppRuntime(LlamaCppVLMConfig(
            model, mmproj, n_ctx=args.n_ctx, do_sample=False, max_pixels=args.image_size ** 2,
            prefix_cache=setting == "on"))
        try:
            results[setting] = run_episodes(runtime, episodes, args.max_new_tokens, None)
        finally:
            runtime.close()
    return results


def bench_transformers(model_dir: Path, episodes, args) -> dict:
    from appliance.vlm.transformers_runtime import QwenTransformersRuntime, TransformersVLMConfig

    results = {}
    for setting in ("off", "on"):
        runtime = QwenTransformersRuntime(TransformersVLMConfig(
            model_dir, do_sample=False, max_pixels=args.image_size ** 2,
            prefix_cache=setting == "on"))
        try:
            results[setting] = run_episodes(runtime, episodes, args.max_new_tokens, args.batch)
        finally:
            runtime.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", nargs=2, type=Path, metavar=("MODEL", "MMPROJ"),
                        help="a GGUF model and its mmproj (default: the tiny kit's)")
    parser.add_argument("--hf", type=Path, help="a transformers Qwen3-VL folder (default: tiny)")
    parser.add_argument("--runtime", choices=("both", "llamacpp", "transformers"), default="both")
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1,
                        help="transformers: conversations per chat() call (reuse needs unpadded rows)")
    args = parser.parse_args(argv)

    episodes = [episode_requests(DEFECTS[i % len(DEFECTS)], args.turns, args.image_size)
                for i in range(args.episodes)]
    temporary = None
    if (args.gguf is None and args.runtime != "transformers") or \
            (args.hf is None and args.runtime != "llamacpp"):
        from appliance.models.tiny_kit import build_tiny_kit

        temporary = tempfile.TemporaryDirectory(prefix="prefix-bench-")
        kit = build_tiny_kit(Path(temporary.name), seed=0, gguf=args.runtime != "transformers"
                             and args.gguf is None)
        args.hf = args.hf or kit.hf_dir
        if args.gguf is None and kit.gguf is not None:
            args.gguf = (kit.gguf, kit.mmproj)
    print(f"{args.episodes} episode(s) x {args.turns} turns, {args.image_size} px pictures, "
          f"{args.max_new_tokens} new tokens per turn")
    same = True
    try:
        if args.runtime in ("both", "llamacpp"):
            results = bench_llamacpp(args.gguf[0], args.gguf[1], episodes, args)
            _report(f"llama.cpp: {args.gguf[0].name}", results)
            same &= results["on"]["texts"] == results["off"]["texts"]
        if args.runtime in ("both", "transformers"):
            results = bench_transformers(args.hf, episodes, args)
            _report(f"transformers: {args.hf.name} (batch {args.batch})", results)
            same &= results["on"]["texts"] == results["off"]["texts"]
    finally:
        if temporary is not None:
            temporary.cleanup()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
