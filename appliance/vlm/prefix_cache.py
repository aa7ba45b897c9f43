"""Prefix reuse: the system prompt, the tools block and the normal photo open every turn of an
episode (and every episode of that photo), so their KV cache is computed once and kept.

Both runtimes count what they really evaluate: ``PrefillCount`` (prompt tokens, and the prefill
tokens among them that went through the model) ends up in the reply's ``BudgetUse``.

**llama.cpp** (``MtmdPrefixWalk``). llama-cpp-python's multimodal chat handler clears the KV
cache and evaluates every chunk of the prompt (text runs and pictures) from the start. The walk
stands in for the ``Llama`` object and the mtmd module the handler talks to while it evaluates
the chunks: it compares each chunk with what the KV cache already holds, position by position
(text: the same token; picture: the same picture id, which is a hash of its encoded bytes, and
the same token and position counts), skips what matches, and at the first difference removes the
cells from that position on (``llama_memory_seq_rm``) and evaluates the rest for real. What the
cache holds is the previous prompt plus the tokens generated after it (``Llama.input_ids``). With
``prefix_cache`` off the walk never matches: the handler clears the cache and evaluates every
chunk, as llama-cpp-python does. Anything unexpected (a cache that cannot remove a tail, a
position that does not add up) falls back to the full evaluation.

Positions, not tokens: llama.cpp gives a Qwen3-VL picture max(width, height) positions in the
grid (M-RoPE) but one KV cell per visual token; ``Llama.n_tokens`` and ``input_ids`` are indexed
by position, so the walk is too. The prompt never ends in a picture (the generation prompt is
text), so ``Llama.generate`` always has the last text token to refresh the logits from.

**transformers** (``PrefixKVStore``). The prefix is the prompt up to and including the first
``<|vision_end|>``: system prompt, tools block and the first picture. Its ``DynamicCache`` is
computed once per (prefix tokens, picture pixels, adapter) and kept in a small LRU; each
``generate`` gets a copy and prefills only the rest. Rows of a left-padded batch of different
lengths would hold their prefixes at different offsets, so reuse needs every row of the
``generate`` call unpadded (one conversation, or conversations of the same length); otherwise
the batch is prefilled in full, as before. The whole prompt's M-RoPE positions are computed as
``generate`` would without a cache and passed in; the pixels of each row's first picture are left
out of ``pixel_values`` (its visual tokens are in the cache). A prefix computed for a call counts
as prefilled in that call. Each kept prefix holds its KV on the device (about 150 kB per token on
Qwen3-VL-4B/8B in bf16: some 350 MB for a 2.4k-token prefix), up to ``max_batch`` of them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class PrefillCount:
    """One prompt: its tokens (text plus visual tokens) and those the model evaluated."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0

    @property
    def reused(self) -> int:
        return self.prompt_tokens - self.prefill_tokens


class PrefixUnavailable(Exception):
    """The cache cannot be reused for this prompt: evaluate it in full instead."""


def image_id(image_bytes: bytes) -> bytes:
    """The id mtmd carries with a picture (``mtmd_bitmap_set_id``): a hash of its bytes."""
    return hashlib.sha256(image_bytes).hexdigest().encode("ascii")


# --- llama.cpp ----------------------------------------------------------------------------------

class _ContextView:
    """``Llama._ctx`` for the handler: the KV cache is not cleared, the walk decides."""

    def __init__(self, walk: "MtmdPrefixWalk") -> None:
        self._walk = walk

    def kv_cache_clear(self) -> None:
        self._walk.begin()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._walk.llama._ctx, name)


class _LlamaView:
    """The ``Llama`` object as the chat handler sees it while the walk runs: ``n_tokens`` is the
    walk's position, ``reset``/``kv_cache_clear`` start the walk, ``eval`` skips what is cached;
    everything else is the real object."""

    def __init__(self, walk: "MtmdPrefixWalk") -> None:
        object.__setattr__(self, "_walk", walk)
        object.__setattr__(self, "_ctx", _ContextView(walk))

    @property
    def n_tokens(self) -> int:
        return self._walk.position

    def reset(self) -> None:
        self._walk.begin()

    def eval(self, tokens) -> None:
        self._walk.eval_text(list(tokens))

    def create_completion(self, *args, **kwargs):
        self._walk.finish()
        return self._walk.llama.create_completion(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._walk.llama, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "n_tokens":  # the handler sets it after a picture: it must agree
            if value != self._walk.position:
                raise PrefixUnavailable(f"position {value} != {self._walk.position}")
            return
        setattr(self._walk.llama, name, value)


class _MtmdView:
    """The mtmd bindings module with picture evaluation going through the walk."""

    def __init__(self, module, walk: "MtmdPrefixWalk") -> None:
        self._module = module
        self._walk = walk

    def mtmd_helper_eval_chunk_single(self, mtmd_ctx, lctx, chunk, n_past, seq_id, n_batch,
                                      logits_last, new_n_past) -> int:
        return self._walk.eval_picture(mtmd_ctx, chunk, seq_id, n_batch, logits_last, new_n_past)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class MtmdPrefixWalk:
    """One prompt's evaluation against the KV cache of the previous one (see the module doc).

    ``cached`` is what the cache holds, one entry per position: a token id for text, a tuple
    for each position of a picture. ``signature`` is built the same way for this prompt.
    """

    def __init__(self, llama, module, cached: list) -> None:
        self.llama = llama
        self.module = module
        self.cached = cached
        self.signature: list = []
        self.position = 0
        self.diverged = False
        self.count = PrefillCount()
        self.finished = False

    def begin(self) -> None:
        if self.position or self.signature:
            raise PrefixUnavailable("the handler restarted the prompt")

    def _diverge(self, position: int) -> None:
        """From ``position`` on the cache differs: drop its cells there and evaluate for real."""
        self.diverged = True
        llama = self.llama
        if position == 0:
            llama.reset()
            llama._ctx.kv_cache_clear()
            return
        if not llama._ctx.kv_cache_seq_rm(-1, position, -1):
            raise PrefixUnavailable("the KV cache cannot remove a tail")
        llama.n_tokens = position
        llama._requires_eval = True

    def eval_text(self, tokens: list[int]) -> None:
        self.count.prompt_tokens += len(tokens)
        if not self.diverged:
            start = self.position
            same = 0
            while (same < len(tokens) and start + same < len(self.cached)
                   and self.cached[start + same] == tokens[same]):
                same += 1
            self.signature.extend(tokens[:same])
            self.position += same
            tokens = tokens[same:]
            if not tokens:
                return
            self._diverge(self.position)
        if self.llama.n_tokens != self.position:
            raise PrefixUnavailable(f"llama at {self.llama.n_tokens}, prompt at {self.position}")
        self.llama.eval(tokens)
        self.signature.extend(tokens)
        self.position += len(tokens)
        self.count.prefill_tokens += len(tokens)

    def eval_picture(self, mtmd_ctx, chunk, seq_id, n_batch, logits_last, new_n_past) -> int:
        module = self.module
        n_tokens = int(module.mtmd_input_chunk_get_n_tokens(chunk))
        n_pos = int(module.mtmd_input_chunk_get_n_pos(chunk))
        key = module.mtmd_input_chunk_get_id(chunk) or object()  # no id: never the same
        entries = [("picture", key, n_tokens, n_pos, k) for k in range(n_pos)]
        self.count.prompt_tokens += n_tokens
        out = getattr(new_n_past, "_obj", None)  # the c_int behind ctypes.byref
        if out is None:
            raise PrefixUnavailable("unexpected new_n_past argument")
        start = self.position
        if not self.diverged and self.cached[start:start + n_pos] == entries:
            self.signature.extend(entries)
            self.position += n_pos
            out.value = self.position
            return 0
        if not self.diverged:
            self._diverge(start)
        if self.llama.n_tokens != start:
            raise PrefixUnavailable(f"llama at {self.llama.n_tokens}, prompt at {start}")
        result = module.mtmd_helper_eval_chunk_single(
            mtmd_ctx, self.llama._ctx.ctx, chunk, start, seq_id, n_batch, logits_last, new_n_past)
        if result != 0:
            return result
        if out.value != start + n_pos:
            raise PrefixUnavailable(f"a picture took {out.value - start} positions, not {n_pos}")
        self.llama.n_tokens = out.value
        self.signature.extend(entries)
        self.position = out.value
        self.count.prefill_tokens += n_tokens
        return 0

    def finish(self) -> None:
        """The prompt is walked; ``Llama.generate`` follows. When nothing differed, the cache may
        hold more than this prompt (the previous reply): generate keeps the prompt's cells and
        evaluates its last token again for fresh logits, unless the cache ends exactly there."""
        self.finished = True
        if not self.diverged:
            llama = self.llama
            if llama.n_tokens < self.position:
                raise PrefixUnavailable("the cache is shorter than the matched prompt")
            exact = llama.n_tokens == self.position and not getattr(llama, "_requires_eval", True)
            if not exact:
                self.count.prefill_tokens += 1


class MtmdPrefixCache:
    """What the KV cache of one ``Llama`` holds, kept by the chat handler between calls."""

    def __init__(self) -> None:
        self._owner: int | None = None
        self._signature: list = []
        self._text: tuple[list[int], list[int]] = ([], [])  # positions and tokens, to check

    def forget(self) -> None:
        self._owner, self._signature, self._text = None, [], ([], [])

    def cached(self, llama) -> list:
        """Per position, what ``llama``'s cache holds now; [] when unknown or changed since."""
        if self._owner != id(llama) or not self._signature:
            return []
        held = int(llama.n_tokens)
        if held < len(self._signature):
            return []
        input_ids = llama.input_ids
        positions, tokens = self._text
        if positions and input_ids[positions].tolist() != tokens:
            return []  # someone else evaluated here since
        return self._signature + input_ids[len(self._signature):held].tolist()

    def remember(self, llama, walk: MtmdPrefixWalk) -> None:
        self._owner = id(llama)
        self._signature = list(walk.signature)
        positions = [i for i, entry in enumerate(self._signature) if isinstance(entry, int)]
        self._text = (positions, [self._signature[i] for i in positions])


def call_with_prefix(handler, llama, call, enabled: bool, store: MtmdPrefixCache):
    """Run the MTMD handler's ``call(llama=...)`` through a walk; returns (response, count).

    ``enabled=False`` walks against an empty cache: the handler's own full evaluation, counted.
    On ``PrefixUnavailable`` the prompt is evaluated in full by the unmodified handler (count None).
    """
    module = handler._mtmd_cpp
    walk = MtmdPrefixWalk(llama, module, store.cached(llama) if enabled else [])
    handler._mtmd_cpp = _MtmdView(module, walk)
    try:
        response = call(_LlamaView(walk))
    except PrefixUnavailable:
        handler._mtmd_cpp = module
        store.forget()
        return call(llama), None
    except BaseException:
        store.forget()
        raise
    finally:
        handler._mtmd_cpp = module
    store.remember(llama, walk)
    return response, walk.count


# --- transformers -------------------------------------------------------------------------------

class PrefixKVStore:
    """Prefix KV caches (``DynamicCache`` layers' key and value tensors), least recently used
    dropped first; keyed by prefix tokens, the first picture's pixels and the adapter."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._entries: OrderedDict = OrderedDict()

    def get(self, key):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key, layers) -> None:
        self._entries[key] = layers
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def prefix_key(token_ids, pixel_rows, adapter: str | None) -> tuple:
    """The store key: the prefix's token ids, a hash of its picture's pixel rows, the adapter."""
    import numpy as np

    pixels = np.ascontiguousarray(pixel_rows.detach().float().cpu().numpy())
    digest = hashlib.sha256(pixels.tobytes()).hexdigest() + str(pixels.shape)
    return tuple(int(t) for t in token_ids), digest, adapter


def cache_layers(cache) -> list[tuple]:
    """(keys, values) per layer of a ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def stacked_cache(rows: list[list[tuple]]):
    """A fresh ``DynamicCache`` holding the rows' prefix caches (all the same length) as a batch;
    a copy, so ``generate`` can extend it without touching the stored ones."""
    import torch
    from transformers import DynamicCache

    layers = []
    for per_layer in zip(*rows):
        keys = torch.cat([k for k, _ in per_layer], dim=0)
        values = torch.cat([v for _, v in per_layer], dim=0)
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers)

