"""What a policy is: something that writes the next assistant message of many episodes."""

from __future__ import annotations

from typing import Protocol, Sequence

from appliance.agent.episode import EpisodeState


class Policy(Protocol):
    name: str

    def act(self, states: Sequence[EpisodeState]) -> list[str]:
        """One assistant message per episode, given each episode's messages and images so far.

        A policy reads ``state.messages`` (and ``state.images`` for a VLM) and the task in
        ``state.spec``; it must not modify the state: the environment does that.
        """
        ...
