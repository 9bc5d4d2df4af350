"""A chat model that answers from a script: for unit tests of agent and pipeline logic."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tracetune.models.base import ChatMessage, ChatModel, Completion, Generation, Sampling
from tracetune.schema import Usage

Responder = Callable[[list[ChatMessage]], str]


class ScriptedChatModel(ChatModel):
    """Returns the scripted replies in order (or what ``responder(messages)`` says).

    Every call is recorded in ``calls`` so tests can assert on what the model was shown.
    """

    def __init__(self, replies: Sequence[str] | Responder, spec: str = "scripted") -> None:
        super().__init__()
        self.spec = spec
        self._replies = list(replies) if not callable(replies) else None
        self._responder = replies if callable(replies) else None
        self.calls: list[dict[str, Any]] = []

    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        n: int = 1,
        sampling: Sampling = Sampling(),
        tools: list[dict[str, Any]] | None = None,
    ) -> Generation:
        self.calls.append({"messages": messages, "n": n, "sampling": sampling, "tools": tools})
        texts = []
        for _ in range(n):
            if self._responder is not None:
                texts.append(self._responder(messages))
            elif self._replies:
                texts.append(self._replies.pop(0))
            else:
                raise RuntimeError("ScriptedChatModel ran out of scripted replies")
        usage = Usage(
            prompt_tokens=sum(len(str(m.get("content", "")).split()) for m in messages),
            completion_tokens=sum(len(t.split()) for t in texts),
            calls=1,
        )
        return Generation([Completion(t, "stop") for t in texts], usage=usage)
