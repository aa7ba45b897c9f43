"""Reasoning and action budgets: how many tokens a reply may spend thinking, and then acting.

A Qwen3 Thinking model can reason for thousands of tokens per turn. Each role gets a budget: when
its reasoning reaches ``reasoning`` tokens without closing, the runtime makes the model write
``CLOSE_REASONING`` (forced tokens, through the real model) and lets it write its action within
``action`` further tokens; when the action reaches its budget the reply ends there. A reply that
does not reason (no ``<think>`` in the prompt, none opened at the start of the reply) may spend
the whole budget, reasoning and action together, on its action: an Instruct model writing a long
instruction is not cut at a budget meant for what follows a Thinking model's reasoning.

``BudgetTracker`` is the per-reply state machine both runtimes drive, token by token, from their
logits processors; it knows token ids only, so it works the same on transformers and llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

CLOSE_REASONING = "\n</think>\n\n"


@dataclass(frozen=True)
class Budget:
    reasoning: int = 768  # tokens of reasoning before it is closed for the model
    action: int = 256  # tokens after the reasoning (the tool call or the answer)

    def __post_init__(self) -> None:
        if self.reasoning < 0 or self.action < 1:
            raise ValueError(f"a budget needs reasoning >= 0 and action >= 1 tokens, not {self}")

    def max_new_tokens(self, marker_tokens: int) -> int:
        """The most tokens a reply under this budget can take: an opening ``<think>`` the model
        writes itself, its reasoning, the forced close (``marker_tokens`` counts both markers),
        the action and the forced end."""
        return self.reasoning + marker_tokens + self.action + 1


# Defaults per role.
ROLE_BUDGETS = {"policy": Budget(768, 256), "prompt_gen": Budget(384, 128),
                "quality_eval": Budget(512, 256)}
BUDGET_KEYS = {"reasoning_budget": "reasoning", "action_budget": "action"}


def role_budget(role: str, role_settings: dict | None = None) -> Budget:
    """The role's budget: ``ROLE_BUDGETS[role]`` with ``reasoning_budget``/``action_budget``
    from a manifest entry's ``settings.roles.<role>`` table."""
    values = {BUDGET_KEYS[k]: v for k, v in (role_settings or {}).items() if k in BUDGET_KEYS}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}_budget must be a whole number of tokens, not {value!r}")
    return replace(ROLE_BUDGETS[role], **values)


@dataclass
class BudgetUse:
    """What one reply spent, for the trajectory."""

    reasoning_tokens: int = 0
    action_tokens: int = 0
    reasoning_budget_hit: bool = False
    action_budget_hit: bool = False
    prompt_tokens: int = 0
    # Of the prompt's tokens, those the model evaluated (the rest came from a cached prefix).
    # It depends on what the runtime ran before, not on the conversation, so it is left out of
    # as_dict (the trajectory's record, which a replayed episode reproduces exactly).
    prefill_tokens: int = 0

    def as_dict(self) -> dict:
        return {key: value for key, value in vars(self).items() if key != "prefill_tokens"}


@dataclass
class BudgetTracker:
    """Follows one reply token by token and says which token, if any, must come next.

    ``open_ids``/``close_ids`` are the token sequences of ``<think>`` and ``</think>``;
    ``close_text_ids`` those of ``CLOSE_REASONING``; ``reasoning`` is True when the prompt itself
    opened the reasoning block (Thinking templates do). The reply ends at any of ``stop_ids``:
    what a batched runtime feeds a finished row afterwards (padding) is not the reply.
    """

    budget: Budget
    open_ids: Sequence[int]
    close_ids: Sequence[int]
    close_text_ids: Sequence[int]
    end_id: int
    reasoning: bool = False
    stop_ids: Sequence[int] = ()
    use: BudgetUse = field(default_factory=BudgetUse)
    _seen: list[int] = field(default_factory=list)
    _queue: list[int] = field(default_factory=list)
    _unseen_forced: int = 0  # forced close tokens handed out but not yet observed
    _in_action: bool = False
    _may_open: bool = False  # the model may still open a reasoning block itself
    _stopped: bool = False

    def __post_init__(self) -> None:
        self._in_action = not self.reasoning
        self._may_open = not self.reasoning

    @property
    def action_limit(self) -> int:
        return self.budget.action if self.reasoning else self.budget.reasoning + self.budget.action

    def _ends_with(self, marker: Sequence[int]) -> bool:
        return bool(marker) and self._seen[-len(marker):] == list(marker)

    def observe(self, generated: Sequence[int]) -> None:
        """Take in the tokens generated since the last call (the whole reply so far is given)."""
        for token in generated[len(self._seen):]:
            if self._stopped:
                return
            self._seen.append(token)
            if token in self.stop_ids:
                self._stopped = True
                return
            if self._unseen_forced:
                self._unseen_forced -= 1
                continue  # the forced close: counted as neither reasoning nor action
            if self.reasoning and not self._in_action:
                if self._ends_with(self.close_ids):
                    self._in_action = True
                else:
                    self.use.reasoning_tokens += 1
            elif (self._may_open and self._ends_with(self.open_ids)
                  and self.use.action_tokens < len(self.open_ids) + 1):
                # The model opened reasoning itself, at the start of its reply (only once).
                self.reasoning, self._in_action, self._may_open = True, False, False
                self.use.action_tokens = 0
            else:
                self.use.action_tokens += 1

    def forced(self) -> int | None:
        """The token the model must write next, or None when it is free to choose."""
        if self._stopped:
            return None
        if self.reasoning and not self._in_action and self.use.reasoning_tokens >= self.budget.reasoning:
            self.use.reasoning_budget_hit = True
            self._queue = list(self.close_text_ids)
            self._in_action, self._may_open = True, False
        if self._queue:
            self._unseen_forced += 1
            return self._queue.pop(0)
        if self._in_action and self.use.action_tokens >= self.action_limit:
            self.use.action_budget_hit = True
            return self.end_id
        return None
