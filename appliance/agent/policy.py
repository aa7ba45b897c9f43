"""What a policy is: something that writes the next assistant message of many episodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from appliance.agent.episode import EpisodeState


@dataclass
class PolicyReply:
    """An assistant message with what making it cost, for the trajectory."""

    text: str
    # What the model spent (prompt, reasoning and action tokens, budget hits); empty for policies
    # that run no model.
    generation: dict = field(default_factory=dict)
    # Set when the episode cannot go on (its conversation no longer fits the model): the reason.
    abort: str | None = None


class Policy(Protocol):
    name: str

    def act(self, states: Sequence[EpisodeState]) -> Sequence[str | PolicyReply]:
        """One assistant message per episode, given each episode's messages and images so far.

        A policy reads ``state.messages`` (and ``state.images`` for a VLM) and the task in
        ``state.spec``; it must not modify the state: the environment does that.
        """
        ...
