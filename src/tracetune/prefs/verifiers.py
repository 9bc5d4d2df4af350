"""Step verifiers: rank one step's executed candidates, with a reason for each.

- ``gold``: for task programs (gold answer and gold tool chain). A candidate is checked by
  execution: completed greedily by the policy from its own branch, does the episode still
  reach the gold answer (with the tools the task needs)? Does its tool output show what the
  gold chain's next call shows? Does it call the gold chain's next tool? Is it well-formed?
  Score = 5 (reaches the gold answer) + 3 (output matches the gold output) + 1 (right tool)
  + 1 (well-formed), so 0-10.
- ``llm-best`` / ``llm-rank`` / ``llm-score``: a judge model sees the task (images as
  images), the prefix with its observations, and every candidate with its observation, and
  picks the best, ranks them, or scores each 0-10 (criteria in the prompt templates under
  ``tracetune/prompts/prefs/``). A malformed reply is sent back with the problem, up to
  ``max_retries`` times; then the recorded default ranks well-formed candidates first, in
  sampling order, and the ranking says ``fallback: true``.
- ``gold+llm-*``: gold first; the judge orders candidates the gold checks cannot tell apart.
  Both rankings are recorded, which is what ``prefs stats`` compares.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from tracetune.agent.render import observation_text, task_text
from tracetune.errors import ConfigError
from tracetune.judge.answers import check_answer
from tracetune.judge.arguments import arguments_match
from tracetune.models.base import ChatMessage, ChatModel, Sampling
from tracetune.models.replies import JudgeReplyError, find_json
from tracetune.prefs.base import (
    Candidate,
    Ranking,
    StepContext,
    apply_step,
    called_tool_calls,
    called_tool_names,
    close_branch,
    fork_episode,
    step_is_final,
)
from tracetune.prompts import prompt_hash, render
from tracetune.rollout import check_trajectory, divergences
from tracetune.schema import Step, Task, Trajectory, Usage
from tracetune.tools import get_tool

JUDGE_MODES = ("best", "rank", "score")
VERIFIERS = (
    "gold",
    "llm-best",
    "llm-rank",
    "llm-score",
    "gold+llm-best",
    "gold+llm-rank",
    "gold+llm-score",
)
PROMPTS = ("prefs/system.jinja", "prefs/judge.jinja", "prefs/repair.jinja")


class StepVerifier(Protocol):
    name: str

    async def rank(self, ctx: StepContext) -> Ranking: ...


def prompts_hash() -> str:
    """One hash over the judge templates, recorded on every judged step."""
    return prompt_hash(PROMPTS[0]) + prompt_hash(PROMPTS[1])[:8] + prompt_hash(PROMPTS[2])[:8]


# -- gold ----------------------------------------------------------------------------------
def gold_matches(task: Task, steps: list[Step]) -> list[int]:
    """For each gold call the steps have made, in order and with the gold output, the index
    of the step that made it.

    A code step may make several gold calls at once; a step that fails, calls another tool,
    or gets an output that differs from the gold one advances nothing.
    """
    notes = task.metadata.get("gold_steps") or []
    tolerance = task.gold.tolerance if task.gold else None
    matched: list[int] = []
    for i, step in enumerate(steps):
        if step.error is not None:
            continue
        names = called_tool_names(step)
        while len(matched) < len(task.gold_chain):
            j = len(matched)
            if task.gold_chain[j].name not in names:
                break
            note = notes[j] if j < len(notes) else {}
            if divergences(j, task.gold_chain[j], note, step, tolerance):
                break
            names.remove(task.gold_chain[j].name)
            matched.append(i)
    return matched


def gold_position(task: Task, steps: list[Step]) -> int:
    """How many calls of the gold chain the steps have made (see :func:`gold_matches`)."""
    return len(gold_matches(task, steps))


def _has_expectations(note: dict[str, Any]) -> bool:
    return (
        bool(note.get("expect"))
        or note.get("expect_number") is not None
        or (note.get("expect_count") is not None)
    )


class GoldVerifier:
    """Ranks candidates by executing them against a task program's gold answer and chain."""

    name = "gold"

    def __init__(
        self, policy: ChatModel, sampling: Sampling, max_steps: int = 8, max_errors: int = 3
    ) -> None:
        self.policy = policy
        self.sampling = sampling  # greedy: the completion shows where the policy would go
        self.max_steps = max_steps
        self.max_errors = max_errors

    async def complete(self, candidate: Candidate) -> tuple[Trajectory, Usage]:
        """The candidate's episode, continued greedily on a branch of its own branch."""
        branch = await fork_episode(candidate.branch)
        usage = Usage()
        status = "max_steps"
        try:
            while branch.final_answer is None and len(branch.steps) < self.max_steps:
                generation = await self.policy.generate(
                    branch.messages(), n=1, sampling=self.sampling, tools=branch.tool_schemas()
                )
                usage = usage.add(generation.usage)
                raw = branch.fmt.raw(generation.completions[0]) if generation.completions else ""
                step = await apply_step(branch, raw, generation.usage, generation.latency_s)
                if step.error is not None and branch.errors >= self.max_errors:
                    status = "max_errors"
                    break
            if branch.final_answer is not None:
                status = "completed"
        finally:
            await close_branch(branch)
        trajectory = Trajectory(
            id=f"completion-{candidate.index}",
            task=branch.task,
            controller=self.policy.spec,
            action_format=branch.fmt.name,
            steps=branch.steps,
            final_answer=branch.final_answer,
            status=status,  # type: ignore[arg-type]
        )
        return trajectory, usage

    async def rank(self, ctx: StepContext) -> Ranking:
        task = ctx.task
        if task.gold is None or not task.gold_chain:
            raise ValueError(
                f"task {task.id} has no gold answer and gold chain; the gold step verifier "
                "needs task programs (tracetune tasks programs), or use an llm-* verifier"
            )
        chain = task.gold_chain
        notes = task.metadata.get("gold_steps") or []
        position = gold_position(task, ctx.prefix)
        usage = Usage()
        completions: dict[str, tuple[bool, str]] = {}  # same text from the same prefix
        scores: list[float] = []
        reasons: list[str] = []
        checks: list[dict[str, Any]] = []
        for cand in ctx.candidates:
            step = cand.step
            parts: list[str] = []
            well_formed = step.error is None
            right_tool = output_match = reaches = False
            if not well_formed:
                assert step.error is not None
                what = "format fault" if cand.fault == "format" else "execution error"
                parts.append(f"{what} ({step.error.kind.value}): {_short(step.error.message)}")
            final = step_is_final(step)
            if well_formed and position < len(chain):
                want = chain[position]
                names = called_tool_names(step)
                right_tool = want.name in names
                if final:
                    parts.append(
                        f"answers before the gold chain is done (next gold call: {want.name})"
                    )
                elif not right_tool:
                    got = ", ".join(names) or "no tool"
                    parts.append(f"calls {got} where the gold chain calls {want.name}")
                else:
                    note = notes[position] if position < len(notes) else {}
                    diverged = divergences(position, want, note, step, task.gold.tolerance)
                    if not diverged and not _has_expectations(note):
                        # Nothing to check the output against (e.g. a crop): the call's
                        # arguments must then be the gold call's.
                        calls = [a for n, a in called_tool_calls(step) if n == want.name]
                        if not any(arguments_match(want.arguments, a) for a in calls):
                            diverged = [
                                f"its {want.name} arguments differ from the gold "
                                f"call's {json.dumps(want.arguments)}"
                            ]
                    output_match = not diverged
                    parts.append(
                        f"calls {want.name} as the gold chain does"
                        + (
                            "; its output matches the gold output"
                            if output_match
                            else f"; {diverged[0]}"
                        )
                    )
            elif well_formed:
                right_tool = final  # every gold call is made: answering is the right move
                if not final:
                    parts.append("the gold chain is done but it does not answer")
            if well_formed and final:
                check = check_answer(cand.final_answer, task.gold)
                output_match = output_match or (position >= len(chain) and check.passed)
            if well_formed:
                key = step.raw
                if key not in completions:
                    completions[key] = await self._reaches(cand, usage_box := [Usage()])
                    usage = usage.add(usage_box[0])
                reaches, how = completions[key]
                parts.append(how)
                parts.append("well-formed")
            score = 5.0 * reaches + 3.0 * output_match + 1.0 * right_tool + 1.0 * well_formed
            scores.append(score)
            reasons.append("; ".join(parts))
            checks.append(
                {
                    "reaches_gold": reaches,
                    "output_matches_gold": output_match,
                    "right_tool": right_tool,
                    "well_formed": well_formed,
                }
            )
        return Ranking.from_scores(
            self.name,
            scores,
            reasons,
            usage=usage,
            details={"gold_position": position, "checks": checks},
        )

    async def _reaches(self, cand: Candidate, usage_box: list[Usage]) -> tuple[bool, str]:
        if step_is_final(cand.step):
            trajectory = Trajectory(
                id=f"candidate-{cand.index}",
                task=cand.branch.task,
                controller=self.policy.spec,
                action_format=cand.branch.fmt.name,
                steps=cand.branch.steps,
                final_answer=cand.final_answer,
                status="completed",
            )
            how = "its answer"
        else:
            trajectory, usage_box[0] = await self.complete(cand)
            how = "completed greedily, it"
        verdict = check_trajectory(trajectory, "gold", require_tools=True)
        gold = cand.branch.task.gold.value if cand.branch.task.gold else "?"
        if verdict.passed:
            return True, f"{how} reaches the gold answer {gold}"
        why = verdict.reasons[0] if verdict.reasons else "wrong answer"
        return False, f"{how} does not reach the gold answer ({_short(why)})"


# -- LLM judge -----------------------------------------------------------------------------
def parse_judge_reply(text: str, mode: str, k: int) -> tuple[list[float], list[str], str]:
    """Scores (higher is better), per-candidate reasons and the judge's thought."""
    found = find_json(text, dict)
    if found is None:
        raise JudgeReplyError("the reply holds no JSON object")
    obj = found.value
    thought = str(obj.get("thought", ""))
    raw_reasons = obj.get("reasons")
    reasons = ["" for _ in range(k)]
    if isinstance(raw_reasons, list):
        for i, r in enumerate(raw_reasons[:k]):
            reasons[i] = str(r)
    elif isinstance(raw_reasons, dict):
        for key, r in raw_reasons.items():
            if str(key).isdigit() and 1 <= int(key) <= k:
                reasons[int(key) - 1] = str(r)
    if mode == "best":
        best = obj.get("best")
        if isinstance(best, str) and best.strip().isdigit():
            best = int(best.strip())
        if not isinstance(best, int) or isinstance(best, bool) or not 1 <= best <= k:
            raise JudgeReplyError(f'"best" must be a candidate number from 1 to {k}')
        scores = [1.0 if i == best - 1 else 0.0 for i in range(k)]
    elif mode == "rank":
        ranking = obj.get("ranking")
        if not isinstance(ranking, list) or sorted(_ints(ranking)) != list(range(1, k + 1)):
            raise JudgeReplyError(
                f'"ranking" must list every candidate number from 1 to {k} once, best first'
            )
        order = [int(x) - 1 for x in _ints(ranking)]
        scores = [0.0] * k
        for position, i in enumerate(order):
            scores[i] = float(k - position)
    elif mode == "score":
        raw = obj.get("scores")
        if isinstance(raw, dict):
            raw = [raw.get(str(i + 1), raw.get(i + 1)) for i in range(k)]
        if not isinstance(raw, list) or len(raw) != k:
            raise JudgeReplyError(f'"scores" must be a list of {k} numbers, one per candidate')
        scores = []
        for value in raw:
            if isinstance(value, dict):
                value = value.get("score")
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value <= 10
            ):
                raise JudgeReplyError('every entry of "scores" must be a number from 0 to 10')
            scores.append(float(value))
    else:
        raise ValueError(f"unknown judge mode {mode!r}; choose one of {', '.join(JUDGE_MODES)}")
    return scores, reasons, thought


def _ints(values: list[Any]) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        elif isinstance(v, str) and v.strip().isdigit():
            out.append(int(v.strip()))
        else:
            return []
    return out


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _observation(step: Step) -> str:
    return observation_text(step).removeprefix("Observation: ").removeprefix("Observation:")


class JudgeVerifier:
    """An LLM judge that picks the best candidate, ranks them, or scores each 0-10."""

    def __init__(
        self,
        judge: ChatModel,
        mode: str = "best",
        max_retries: int = 2,
        max_tokens: int = 768,
        max_observation_chars: int = 1500,
    ) -> None:
        if mode not in JUDGE_MODES:
            raise ConfigError(
                f"unknown judge mode {mode!r}; choose one of {', '.join(JUDGE_MODES)}"
            )
        self.judge = judge
        self.mode = mode
        self.name = f"llm-{mode}"
        self.max_retries = max_retries
        self.sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
        self.max_observation_chars = max_observation_chars

    def messages(self, ctx: StepContext) -> list[ChatMessage]:
        """System prompt with the criteria; one user turn with every image and the step."""
        images: list[dict[str, Any]] = []
        labels: list[str] = []

        def add(refs: list[Any], where: str) -> None:
            for ref in refs:
                images.append({"type": "image", "image": ctx.resolve(ref)})
                labels.append(f"image {len(images)}: {ref.name} ({where})")

        add(ctx.task.images, "attached to the task")
        limit = self.max_observation_chars

        def shown(step: Step) -> dict[str, Any]:
            obs = step.observation
            refs = obs.images if obs is not None and step.error is None else []
            return {
                "raw": step.raw.strip() or "(empty output)",
                "observation": _short(_observation(step), limit),
                "images": [r.name for r in refs],
                "refs": refs,
            }

        prefix = []
        for step in ctx.prefix:
            item = shown(step)
            add(item.pop("refs"), f"output of step {step.index + 1}")
            prefix.append(item)
        candidates = []
        for cand in ctx.candidates:
            item = shown(cand.step)
            add(item.pop("refs"), f"output of candidate {cand.index + 1}")
            candidates.append(item)
        tools = [get_tool(n) for n in ctx.tool_names]
        text = render(
            PROMPTS[1],
            task=task_text(ctx.task),
            tools=tools,
            prefix=prefix,
            candidates=candidates,
            mode=self.mode,
            k=len(candidates),
            image_labels=labels,
        )
        return [
            {"role": "system", "content": render(PROMPTS[0], mode=self.mode)},
            {"role": "user", "content": [*images, {"type": "text", "text": text}]},
        ]

    async def rank(self, ctx: StepContext) -> Ranking:
        k = len(ctx.candidates)
        messages = self.messages(ctx)
        usage = Usage()
        problems: list[str] = []
        replies: list[str] = []
        for _attempt in range(self.max_retries + 1):
            generation = await self.judge.generate(messages, n=1, sampling=self.sampling)
            usage = usage.add(generation.usage)
            reply = generation.text
            replies.append(reply)
            try:
                scores, reasons, thought = parse_judge_reply(reply, self.mode, k)
            except JudgeReplyError as exc:
                problems.append(str(exc))
                messages = [
                    *messages,
                    {"role": "assistant", "content": reply},
                    {
                        "role": "user",
                        "content": render(PROMPTS[2], problem=str(exc), mode=self.mode, k=k),
                    },
                ]
                continue
            return Ranking.from_scores(
                self.name,
                scores,
                reasons,
                usage=usage,
                graded=self.mode == "score",
                details={
                    "judge": self.judge.spec,
                    "thought": thought,
                    "reply": reply,
                    "attempts": len(replies),
                    "prompt_hash": prompts_hash(),
                },
            )
        # The recorded default: executable candidates first, then sampling order.
        scores = [5.0 if c.step.error is None else 0.0 for c in ctx.candidates]
        reasons = ["judge fallback: " + ("well-formed" if s else "failed step") for s in scores]
        return Ranking.from_scores(
            self.name,
            scores,
            reasons,
            usage=usage,
            fallback=True,
            graded=False,
            details={
                "judge": self.judge.spec,
                "problems": problems,
                "replies": replies,
                "attempts": len(replies),
                "prompt_hash": prompts_hash(),
            },
        )


class CombinedVerifier:
    """Gold first; the judge orders candidates whose gold scores tie.

    With ``tie_break=False`` the judge only audits: it ranks too and is recorded (for
    agreement statistics), but the gold ranking decides.
    """

    def __init__(self, gold: GoldVerifier, judge: JudgeVerifier, tie_break: bool = True) -> None:
        self.gold = gold
        self.judge = judge
        self.tie_break = tie_break
        self.name = f"gold+{judge.name}" if tie_break else "gold"

    async def rank(self, ctx: StepContext) -> Ranking:
        gold = await self.gold.rank(ctx)
        judged = await self.judge.rank(ctx)
        k = len(gold.scores)
        judge_top = max(judged.scores) or 1.0
        if self.tie_break:
            # Judge scores are squeezed into [0, 0.5): they reorder only equal gold scores.
            scores = [
                g + 0.49 * (j / judge_top) for g, j in zip(gold.scores, judged.scores, strict=True)
            ]
        else:
            scores = list(gold.scores)
        reasons = [
            f"gold: {gold.reasons[i]}"
            + (f" | judge: {judged.reasons[i]}" if judged.reasons[i] else "")
            for i in range(k)
        ]
        return Ranking.from_scores(
            self.name,
            scores,
            reasons,
            usage=gold.usage.add(judged.usage),
            fallback=judged.fallback and self.tie_break,
            details={"gold": gold.model_dump(mode="json"), "judge": judged.model_dump(mode="json")},
        )


def make_verifier(
    name: str,
    policy: ChatModel,
    judge: ChatModel | None,
    greedy: Sampling,
    max_steps: int,
    max_errors: int = 3,
    judge_retries: int = 2,
) -> StepVerifier:
    """The verifier ``name`` names; ``gold`` with a judge also records the judge's ranking."""
    if name not in VERIFIERS:
        raise ConfigError(f"unknown step verifier {name!r}; choose one of: {', '.join(VERIFIERS)}")
    needs_judge = "llm-" in name
    if needs_judge and judge is None:
        raise ConfigError(f"the {name} verifier needs a judge model: pass --judge SPEC")
    gold = GoldVerifier(policy, greedy, max_steps, max_errors) if "gold" in name else None
    if judge is not None:
        mode = name.rsplit("llm-", 1)[1] if needs_judge else "rank"
        judged = JudgeVerifier(judge, mode, max_retries=judge_retries)
        if gold is None:
            return judged
        return CombinedVerifier(gold, judged, tie_break=needs_judge)
    assert gold is not None
    return gold


def ranking_summary(ranking: Ranking) -> dict[str, Any]:
    """A ranking as stored on an explored step (JSON)."""
    return json.loads(ranking.model_dump_json())
