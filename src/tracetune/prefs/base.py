"""What exploration hands a step verifier: the prefix, the candidates, and how they ranked.

A *branch* is an ``Episode`` forked from the committed prefix: its own copy of the
sandbox's Python state (code actions) over the episode's shared working directory, and its
own list of steps. Every candidate action is applied on its own branch, so what one
candidate's code does to variables can never show up in another candidate's observation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tracetune.agent.loop import Episode
from tracetune.schema import ErrorKind, Step, Task, Usage


async def fork_episode(episode: Episode) -> Episode:
    """An episode with the same steps so far and its own copy of the execution state.

    JSON tool calls keep no state between steps (the toolbox and working directory are
    shared, and tools name the files they write by step), so their branches share the
    executor; code actions get a forked sandbox.
    """
    from tracetune.agent.code import CodeExecutor

    executor = episode.executor
    if isinstance(executor, CodeExecutor):
        executor = await executor.fork()
    twin = Episode(
        episode.task,
        episode.model,
        episode.fmt,
        episode.tools,
        executor,
        episode.toolbox,
        episode.source,
    )
    twin.steps = list(episode.steps)
    twin.final_answer = episode.final_answer
    twin.errors = episode.errors
    return twin


async def close_branch(episode: Episode) -> None:
    """Stop a branch's own sandbox; the episode's working directory stays for the others."""
    from tracetune.agent.code import CodeExecutor

    if isinstance(episode.executor, CodeExecutor) and episode.executor.branch:
        await episode.executor.close_branch()


@dataclass
class Candidate:
    """One sampled next step, executed on its own branch."""

    index: int
    step: Step
    temperature: float | None  # None: not sampled (the gold anchor)
    branch: Episode
    source: str = "policy"  # or "gold": the gold chain's next step (ExploreConfig.gold_anchor)

    @property
    def final_answer(self) -> str | None:
        return self.branch.final_answer if self.step.error is None else None

    @property
    def fault(self) -> str | None:
        """'format' for output with no valid action, 'error' when executing it failed."""
        if self.step.error is None:
            return None
        return "format" if self.step.error.kind == ErrorKind.PARSE else "error"


@dataclass
class StepContext:
    """Everything a verifier may look at for one step."""

    task: Task
    prefix: list[Step]
    candidates: list[Candidate]
    action_format: str
    tool_names: list[str]
    resolve: Any  # FileRef -> image path (the episode's resolver)
    extra: dict[str, Any] = field(default_factory=dict)


class Ranking(BaseModel):
    """A verifier's judgement of one step's candidates: scores (higher is better), the
    order best first, and a reason for each candidate."""

    model_config = ConfigDict(extra="forbid")

    verifier: str = Field(description="Which verifier ranked, e.g. 'gold' or 'llm-rank'.")
    scores: list[float] = Field(description="One score per candidate, in candidate order.")
    order: list[int] = Field(description="Candidate indices, best first.")
    reasons: list[str] = Field(description="Why each candidate scored as it did.")
    fallback: bool = Field(
        default=False, description="The verifier failed and this is the recorded default."
    )
    details: dict[str, Any] = Field(
        default_factory=dict, description="Verifier-specific evidence (judge reply, checks)."
    )
    usage: Usage = Field(default_factory=Usage)

    @property
    def best(self) -> int:
        return self.order[0]

    @classmethod
    def from_scores(
        cls, verifier: str, scores: list[float], reasons: list[str], **kwargs: Any
    ) -> Ranking:
        """Order by score, ties kept in sampling order (the low-temperature sample first)."""
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return cls(verifier=verifier, scores=scores, order=order, reasons=reasons, **kwargs)


def called_tool_names(step: Step) -> list[str]:
    """Tools a step actually called: its JSON tool call, or the calls its code made."""
    action = step.action
    if action is None:
        return []
    if action.type == "tool_call" and action.tool_call is not None:
        return [action.tool_call.name]
    if action.type == "final_answer":
        return []
    data = step.observation.data if step.observation else None
    if isinstance(data, dict) and isinstance(data.get("tool_calls"), list):
        return [str(c.get("name")) for c in data["tool_calls"] if isinstance(c, dict)]
    return []


def step_is_final(step: Step) -> bool:
    action = step.action
    return action is not None and (
        action.type == "final_answer" or (action.type == "code" and action.answer is not None)
    )
