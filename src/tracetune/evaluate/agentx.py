"""Agent-X metrics: LLM-judge scores per query in [0, 1], averaged (Agent-X's evaluation protocol).

Gold: Agent-X's ``data.json`` (id -> ``[record]`` or record) or JSON lines with ``id``; a record
has ``query``, ``tool_metadata``, ``reasoning_steps`` (``{step, task, tool, input, output,
thought}``), ``final_answer`` (``{value, justification}``) and ``query_type``
(objective|subjective). A record with ``"generative": true`` (or ``query_type: generative``,
or an id passed in ``generative_ids``) is a generation task without a checkable answer.
Predictions: JSON lines (or a JSON object keyed by id) ``{"id", "reasoning_steps": [...],
"final_answer": {...} | str}``, or Agent-X's own prediction file (what its inference scripts
save): a JSON list of ``{id: {query, filename, reasoning_steps, final_answer}}``, steps naming
their tool under ``tool`` or ``tool_used``.

Metrics (Agent-X's own result keys in brackets):

- ``grounding`` [grounding_accuracy], ``context`` [context_score]: judged per step. The
  judge sees the gold and predicted steps pairwise at equal positions and scores each pair;
  steps the agent added or omitted score 0 without asking the judge; the query's score is the
  sum over pairs divided by ``max(#gold steps, #predicted steps)``.
- ``tool_precision`` [precision_score]: computed without the judge: a pair scores 1 when the
  predicted tool name equals the gold one, missing/extra steps 0, same denominator.
- ``tool_accuracy`` [tool_accuray]: judged per predicted step (is the tool output
  well-formed per the tool metadata and useful for the step), averaged over predicted steps.
- ``faithfulness`` [faithfulness_accuray], ``factual_precision``, ``semantic_accuracy``: one
  judged score per query.
- ``goal_accuracy`` [goal_accuray]: non-generative queries only. Objective: 1 without the judge
  when the answers are equal after removing whitespace and punctuation and lowercasing, else
  the judge's 0/1 for equivalence; subjective: the judge's similarity in [0, 1].
- ``goal_accuracy_generative`` (G*a): generative queries only, the mean of their
  ``tool_precision``, ``tool_accuracy`` and ``toolset_accuracy`` (as Agent-X's analysis does).
- ``toolset_accuracy`` [toolset_accuray]: without the judge, F1 of the predicted vs the gold
  set of tool names.

A query with no predicted steps and no answer scores 0 everywhere without judge calls.

Judge replies must be a JSON object (``{"score": x}`` or ``{"step_scores": [...]}`` with the
asked-for length); a malformed reply is sent back with the problem stated, up to
``max_retries`` times; after that the metric falls back to 0 and the item records the failure
(``details.judge_fallbacks``), counted in the report. Prompts are the templates under
``tracetune/prompts/agentx/``; their hashes are in the report. The judge sees text only.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracetune.evaluate.base import (
    ItemScore,
    ScoreReport,
    ScoringInputError,
    index_unique,
    read_records,
    require,
)
from tracetune.evaluate.gaia import normalize_str
from tracetune.models.base import ChatModel, Sampling
from tracetune.models.replies import JudgeReplyError, MalformedOutput, extract_json
from tracetune.prompts import prompt_hash, render

METRICS = (
    "grounding",
    "tool_precision",
    "tool_accuracy",
    "faithfulness",
    "context",
    "factual_precision",
    "semantic_accuracy",
    "goal_accuracy",
    "goal_accuracy_generative",
    "toolset_accuracy",
)
TEMPLATES = (
    "system",
    "grounding",
    "context",
    "tool_accuracy",
    "faithfulness",
    "factual_precision",
    "semantic_accuracy",
    "goal_accuracy",
    "repair",
    "_reference",
    "_step_output",
    "_score_output",
)
JUDGE_SAMPLING = Sampling(temperature=0.0, max_tokens=768)


@dataclass
class AgentXTask:
    id: str
    query: str
    steps: list[dict[str, Any]]
    final_answer: str
    query_type: str
    generative: bool
    tool_metadata: Any = None


@dataclass
class AgentXPrediction:
    id: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    final_answer: str = ""

    @property
    def empty(self) -> bool:
        return not self.steps and not self.final_answer.strip()


def _answer_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("value", value.get("answer", "")) or "")
    return "" if value is None else str(value)


def _steps(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):  # some runners store the list as JSON text
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise ScoringInputError(f"{where}: 'reasoning_steps' is text but not JSON") from exc
    if not isinstance(value, list) or not all(isinstance(s, dict) for s in value):
        raise ScoringInputError(
            f"{where}: 'reasoning_steps' must be a list of step objects "
            "{step, task, tool, input, output, thought}"
        )
    return value


def tool_name(step: dict[str, Any]) -> str:
    """A step's tool: ``tool`` (Agent-X's gold) or ``tool_used`` (what its inference scripts
    ask models to write), a name or ``{name, ...}``."""
    tool = step.get("tool")
    if tool is None or tool == "":
        tool = step.get("tool_used")
    if isinstance(tool, dict):
        tool = tool.get("name")
    return str(tool or "").strip()


def load_agentx_gold(path: str | Path, generative_ids: Iterable[str] = ()) -> dict[str, AgentXTask]:
    generative_ids = {str(i) for i in generative_ids}
    rows = index_unique(read_records(path, "Agent-X gold"), "id", "task")
    tasks = {}
    for tid, (where, row) in rows.items():
        query_type = str(require(row, "query_type", where)).strip().lower()
        tasks[tid] = AgentXTask(
            id=tid,
            query=str(require(row, "query", where)),
            steps=_steps(require(row, "reasoning_steps", where), where),
            final_answer=_answer_text(require(row, "final_answer", where)),
            query_type=query_type,
            generative=bool(row.get("generative"))
            or query_type == "generative"
            or tid in generative_ids,
            tool_metadata=row.get("tool_metadata"),
        )
    return tasks


def _keyed_rows(
    rows: list[tuple[str, dict[str, Any]]],
) -> list[tuple[str, dict[str, Any]]]:
    """Agent-X's own prediction file is a JSON list of one-key objects
    ``{id: {query, filename, reasoning_steps, final_answer}}``: give each its ``id``."""
    out = []
    for where, row in rows:
        if "id" not in row and len(row) == 1:
            ((key, value),) = row.items()
            if isinstance(value, dict):
                out.append((f"{where}[{key!r}]", {"id": key, **value}))
                continue
        out.append((where, row))
    return out


def load_agentx_predictions(path: str | Path) -> dict[str, tuple[str, AgentXPrediction]]:
    """Predictions as tracetune writes them (JSON lines ``{"id", "reasoning_steps",
    "final_answer"}``, or a JSON object keyed by id) or as Agent-X's inference scripts write
    them (a JSON list of ``{id: {query, filename, reasoning_steps, final_answer}}``, where a
    failed query has ``reasoning_steps: ""``)."""
    hint = (
        'prediction lines are {"id", "reasoning_steps": [...], "final_answer": ...}, or '
        "Agent-X's list of {id: {query, filename, reasoning_steps, final_answer}}"
    )
    rows = index_unique(_keyed_rows(read_records(path, "Agent-X predictions")), "id", "task", hint)
    out = {}
    for tid, (where, row) in rows.items():
        if "reasoning_steps" not in row and "final_answer" not in row:
            require(row, ("reasoning_steps", "final_answer"), where, hint)
        out[tid] = (
            where,
            AgentXPrediction(
                tid,
                _steps(row.get("reasoning_steps"), where),
                _answer_text(row.get("final_answer")),
            ),
        )
    return out


# -- judge replies ---------------------------------------------------------------------------
def _json_object(text: str) -> dict[str, Any]:
    try:  # judges often answer with a Python dict ('single quotes')
        value = extract_json(text, dict, python_literals=True)
    except MalformedOutput as exc:
        detail = f": {exc.message}" if "{" in text else ""
        raise JudgeReplyError(f"no JSON object found in the reply{detail}") from None
    return {str(k).lower(): v for k, v in value.items()}


def _unit_number(value: Any, what: str, binary: bool) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise JudgeReplyError(f"{what} {value!r} is not a number") from exc
    if math.isnan(number) or not 0.0 <= number <= 1.0:
        raise JudgeReplyError(f"{what} {number} is outside [0, 1]")
    if binary and number not in (0.0, 1.0):
        raise JudgeReplyError(f"{what} must be 0 or 1, got {number}")
    return number


def parse_judge_reply(
    text: str, n_steps: int | None = None, binary: bool = False
) -> tuple[float | list[float], str]:
    """The score (or per-step scores when ``n_steps`` is given) and justification."""
    obj = _json_object(text)
    justification = str(obj.get("justification", ""))
    if n_steps is None:
        if "score" not in obj:
            raise JudgeReplyError('the object has no "score" key')
        return _unit_number(obj["score"], "score", binary), justification
    scores = obj.get("step_scores")
    if not isinstance(scores, list):
        raise JudgeReplyError('the object has no "step_scores" list')
    if len(scores) != n_steps:
        raise JudgeReplyError(f'"step_scores" has {len(scores)} numbers, expected {n_steps}')
    return [_unit_number(s, f"step score {i + 1}", False) for i, s in enumerate(scores)], (
        justification
    )


@dataclass
class JudgeResult:
    value: float | list[float]
    justification: str = ""
    attempts: int = 1
    fallback: bool = False
    error: str | None = None


# -- scorer ------------------------------------------------------------------------------------
def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=1, default=str)


def _numbered(steps: list[dict[str, Any]]) -> str:
    if not steps:
        return "(no steps)"
    return "\n".join(
        f"Step {i + 1}: {json.dumps(s, ensure_ascii=False, default=str)}"
        for i, s in enumerate(steps)
    )


def toolset_f1(gold: set[str], predicted: set[str]) -> float | None:
    """F1 of the predicted vs the gold tool-name sets (None when both are empty)."""
    if not gold and not predicted:
        return None
    hits = len(gold & predicted)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(gold) if gold else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


class AgentXScorer:
    """Scores Agent-X predictions with a judge model (any tracetune ``ChatModel``)."""

    def __init__(
        self,
        judge: ChatModel,
        *,
        max_retries: int = 2,
        concurrency: int = 8,
        sampling: Sampling = JUDGE_SAMPLING,
    ) -> None:
        self.judge = judge
        self.max_retries = max_retries
        self.sampling = sampling
        self._concurrency = concurrency

    def score(
        self, gold: dict[str, AgentXTask], predictions: dict[str, tuple[str, AgentXPrediction]]
    ) -> ScoreReport:
        return asyncio.run(self.ascore(gold, predictions))

    def score_files(
        self, gold: str | Path, predictions: str | Path, generative_ids: Iterable[str] = ()
    ) -> ScoreReport:
        return self.score(
            load_agentx_gold(gold, generative_ids), load_agentx_predictions(predictions)
        )

    async def ascore(
        self, gold: dict[str, AgentXTask], predictions: dict[str, tuple[str, AgentXPrediction]]
    ) -> ScoreReport:
        for tid, (where, _) in predictions.items():
            if tid not in gold:
                raise ScoringInputError(f"{where}: id {tid!r} is not a task of the gold file")
        semaphore = asyncio.Semaphore(self._concurrency)
        items = await asyncio.gather(
            *(
                self._score_item(
                    task, predictions.get(tid, ("", AgentXPrediction(tid)))[1], semaphore
                )
                for tid, task in gold.items()
            )
        )
        metrics: dict[str, float] = {}
        counts: dict[str, int] = {}
        for metric in METRICS:
            values = [v for i in items if (v := i.scores.get(metric)) is not None]
            if values:
                metrics[metric] = sum(values) / len(values)
                counts[metric] = len(values)
        fallbacks = sum(len(i.details.get("judge_fallbacks", [])) for i in items)
        return ScoreReport(
            benchmark="agentx",
            metrics=metrics,
            n_items=len(items),
            details={
                "scale": "0-1 (Agent-X reports fractions, not percent)",
                "judge": self.judge.spec or type(self.judge).__name__,
                "items_per_metric": counts,
                "judge_fallbacks": fallbacks,
                "prompt_hashes": {t: prompt_hash(f"agentx/{t}.jinja") for t in TEMPLATES},
                "missing_predictions": [t for t in gold if t not in predictions],
                "deterministic_metrics": ["tool_precision", "toolset_accuracy"],
            },
            items=list(items),
        )

    async def _judge(
        self,
        template: str,
        semaphore: asyncio.Semaphore,
        *,
        n_steps: int | None = None,
        binary: bool = False,
        **context: Any,
    ) -> JudgeResult:
        prompt = render(f"agentx/{template}.jinja", n_pairs=n_steps, binary=binary, **context)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": render("agentx/system.jinja")},
            {"role": "user", "content": prompt},
        ]
        error = ""
        for attempt in range(1, self.max_retries + 2):
            async with semaphore:
                generation = await self.judge.generate(messages, sampling=self.sampling)
            reply = generation.text
            try:
                value, justification = parse_judge_reply(reply, n_steps, binary)
            except JudgeReplyError as exc:
                error = str(exc)
                messages = [
                    *messages,
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": self._repair(error, n_steps)},
                ]
                continue
            return JudgeResult(value, justification, attempt)
        fallback: float | list[float] = 0.0 if n_steps is None else [0.0] * n_steps
        return JudgeResult(fallback, "", self.max_retries + 1, fallback=True, error=error)

    @staticmethod
    def _repair(error: str, n_steps: int | None) -> str:
        return render("agentx/repair.jinja", error=error, n_pairs=n_steps)

    async def _score_item(
        self, task: AgentXTask, pred: AgentXPrediction, semaphore: asyncio.Semaphore
    ) -> ItemScore:
        n_gold, n_pred = len(task.steps), len(pred.steps)
        n_pairs, denom = min(n_gold, n_pred), max(n_gold, n_pred)
        scores: dict[str, float | int | None] = {
            "gold_steps": n_gold,
            "predicted_steps": n_pred,
        }
        scores["tool_precision"] = (
            sum(tool_name(g) == tool_name(p) for g, p in zip(task.steps, pred.steps, strict=False))
            / denom
            if denom
            else None
        )
        scores["toolset_accuracy"] = toolset_f1(
            {n for s in task.steps if (n := tool_name(s))},
            {n for s in pred.steps if (n := tool_name(s))},
        )
        details: dict[str, Any] = {"generative": task.generative, "query_type": task.query_type}
        judged: dict[str, JudgeResult] = {}

        if pred.empty:
            for metric in ("grounding", "context", "tool_accuracy"):
                scores[metric] = 0.0 if denom else None
            for metric in ("faithfulness", "factual_precision", "semantic_accuracy"):
                scores[metric] = 0.0
            if not task.generative:
                scores["goal_accuracy"] = 0.0
            details["no_prediction"] = True
        else:
            context: dict[str, Any] = {
                "query": task.query,
                "n_gold": n_gold,
                "gold_steps": _numbered(task.steps),
                "gold_answer": task.final_answer or "(none)",
                "n_pred": n_pred,
                "pred_steps": _numbered(pred.steps),
                "pred_answer": pred.final_answer or "(none)",
                "query_type": task.query_type,
            }
            pairs = "\n\n".join(
                f"Pair {i + 1}\n  reference: {json.dumps(g, ensure_ascii=False, default=str)}\n"
                f"  agent: {json.dumps(p, ensure_ascii=False, default=str)}"
                for i, (g, p) in enumerate(zip(task.steps, pred.steps, strict=False))
            )
            jobs: dict[str, Any] = {}
            for metric in ("grounding", "context"):
                if n_pairs:
                    jobs[metric] = self._judge(
                        metric, semaphore, n_steps=n_pairs, pairs=pairs, **context
                    )
            if n_pred:
                jobs["tool_accuracy"] = self._judge(
                    "tool_accuracy",
                    semaphore,
                    n_steps=n_pred,
                    query=task.query,
                    tool_metadata=_dump(task.tool_metadata) if task.tool_metadata else "(none)",
                    pred_steps=context["pred_steps"],
                )
            for metric in ("faithfulness", "factual_precision", "semantic_accuracy"):
                jobs[metric] = self._judge(metric, semaphore, **context)
            objective = task.query_type == "objective"
            if not task.generative:
                same = (
                    objective
                    and normalize_str(pred.final_answer) == normalize_str(task.final_answer)
                    and bool(normalize_str(task.final_answer))
                )
                if same:
                    scores["goal_accuracy"] = 1.0
                    details["goal_accuracy_exact_match"] = True
                else:
                    jobs["goal_accuracy"] = self._judge(
                        "goal_accuracy", semaphore, binary=objective, **context
                    )
            results = await asyncio.gather(*jobs.values())
            judged = dict(zip(jobs, results, strict=True))
            for metric in ("grounding", "context"):
                if metric in judged:
                    step_scores = judged[metric].value
                    assert isinstance(step_scores, list)
                    scores[metric] = sum(step_scores) / denom
                    details[f"{metric}_step_scores"] = step_scores
                else:
                    scores[metric] = 0.0 if denom else None
            if "tool_accuracy" in judged:
                step_scores = judged["tool_accuracy"].value
                assert isinstance(step_scores, list)
                scores["tool_accuracy"] = sum(step_scores) / n_pred
                details["tool_accuracy_step_scores"] = step_scores
            else:
                scores["tool_accuracy"] = 0.0 if n_gold else None
            for metric in (
                "faithfulness",
                "factual_precision",
                "semantic_accuracy",
                "goal_accuracy",
            ):
                if metric in judged:
                    value = judged[metric].value
                    assert isinstance(value, float)
                    scores[metric] = value
            details["justifications"] = {m: r.justification for m, r in judged.items()}
            fallbacks = [
                {"metric": m, "error": r.error, "attempts": r.attempts}
                for m, r in judged.items()
                if r.fallback
            ]
            if fallbacks:
                details["judge_fallbacks"] = fallbacks
            retried = {m: r.attempts for m, r in judged.items() if r.attempts > 1}
            if retried:
                details["judge_attempts"] = retried

        if task.generative:
            scores["goal_accuracy"] = None
            parts = [scores["tool_precision"], scores["tool_accuracy"], scores["toolset_accuracy"]]
            known = [float(v) for v in parts if v is not None]
            scores["goal_accuracy_generative"] = sum(known) / len(known) if known else None
        return ItemScore(
            id=task.id, scores=scores, prediction=pred.final_answer or None, details=details
        )


def score_agentx(
    gold: str | Path,
    predictions: str | Path,
    judge: ChatModel,
    *,
    generative_ids: Iterable[str] = (),
    max_retries: int = 2,
    concurrency: int = 8,
) -> ScoreReport:
    scorer = AgentXScorer(judge, max_retries=max_retries, concurrency=concurrency)
    return scorer.score_files(gold, predictions, generative_ids)
