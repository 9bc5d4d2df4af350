"""Learning metrics: how close a controller's actions are to a task's gold tool chain.

Answer accuracy is the last number to move when a controller is trained from scratch: the
model must first write parsable actions, then pick the right tool, then the right
arguments, and only then can an answer come out right. These metrics measure each stage,
against the gold chain a task program knows by construction:

- ``valid_actions``: the share of all steps whose output is an action the toolbox accepts
  (it parses, names a tool the task offers or ``final_answer``, and its arguments fit the
  tool's schema).
- ``first_tool``: the share of episodes whose first step calls the gold chain's first tool;
  ``first_tool_macro`` averages it per family, so that the frequent families do not hide
  the rare ones. ``majority_first_tool`` / ``majority_first_tool_macro`` are what a
  controller that always calls the split's most common first tool would score: learning
  shows as first-tool numbers *above* these baselines.
- ``tool_accuracy``: per gold step (the chain, then ``final_answer``), the share where the
  step at the same position calls the same tool; ``argument_accuracy``: the same tool
  *and* matching arguments (:func:`tracetune.judge.arguments.arguments_match`, the rule the
  step-wise verifiers use too; a final answer is checked with the answer checker).
- ``accuracy`` (answer accuracy), ``accuracy_given_gold_tools`` (among episodes that called
  every gold tool) and ``completed`` (episodes that gave any final answer).

In step mode (teacher forcing, like GTA's step-by-step mode) every gold step is predicted
once from the gold prefix (the real tool outputs of the gold chain), so the step numbers
measure the next action alone, without earlier mistakes compounding.

All metrics are percentages.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from tracetune.judge.answers import check_answer
from tracetune.judge.arguments import arguments_match
from tracetune.schema import ErrorKind, GoldAnswer, Step, Trajectory

FINAL = "final_answer"
_INVALID = {ErrorKind.PARSE, ErrorKind.UNKNOWN_TOOL, ErrorKind.TOOL_ARGUMENTS}

LEARNING_PERCENT = [
    "valid_actions",
    "first_tool",
    "first_tool_macro",
    "majority_first_tool",
    "majority_first_tool_macro",
    "tool_accuracy",
    "argument_accuracy",
    "accuracy_given_gold_tools",
    "completed",
]


def step_action(step: Step) -> dict[str, Any]:
    """What a step did, for scoring: valid or not, the tool it called and its arguments."""
    valid = step.action is not None and (step.error is None or step.error.kind not in _INVALID)
    name: str | None = None
    arguments: dict[str, Any] | None = None
    if step.action is not None:
        if step.action.type == "final_answer":
            name, arguments = FINAL, {"answer": step.action.answer or ""}
        elif step.action.tool_call is not None:
            name, arguments = step.action.tool_call.name, dict(step.action.tool_call.arguments)
        elif step.action.type == "code":
            name = "code"
    return {"valid": valid, "name": name, "arguments": arguments}


def trajectory_actions(trajectory: Trajectory) -> list[dict[str, Any]]:
    return [step_action(s) for s in trajectory.steps]


def gold_steps(task_gold_chain: list[dict[str, Any]], gold: dict[str, Any]) -> list[dict[str, Any]]:
    """The gold chain as ``{name, arguments}`` dicts, ending with the final answer."""
    steps = [
        {"name": c["name"], "arguments": dict(c.get("arguments") or {})} for c in task_gold_chain
    ]
    if not steps or steps[-1]["name"] != FINAL:
        steps.append({"name": FINAL, "arguments": {"answer": gold.get("value", "")}})
    return steps


def step_correct(
    action: dict[str, Any], gold_step: dict[str, Any], gold_row: dict[str, Any]
) -> tuple[bool, bool]:
    """(right tool, right tool and arguments) of one predicted action against one gold step."""
    if not action.get("valid") or action.get("name") != gold_step["name"]:
        return False, False
    arguments = action.get("arguments") or {}
    if gold_step["name"] == FINAL:
        check = check_answer(
            str(arguments.get("answer", "")),
            GoldAnswer.model_validate(gold_row["gold"]),
            ordered=bool(gold_row.get("ordered")),
            choices=gold_row.get("choices"),
        )
        return True, bool(check.score)
    return True, arguments_match(gold_step["arguments"], arguments)


def _macro(per_family: dict[str, list[float]]) -> float:
    rates = [100.0 * sum(v) / len(v) for v in per_family.values() if v]
    return sum(rates) / len(rates) if rates else 0.0


def majority_baseline(gold_rows: list[dict[str, Any]]) -> tuple[str | None, float, float]:
    """The most common gold first tool, and what always calling it scores (micro, macro)."""
    firsts = [gold_steps(r["gold_chain"], r["gold"])[0]["name"] for r in gold_rows]
    if not firsts:
        return None, 0.0, 0.0
    tool = Counter(firsts).most_common(1)[0][0]
    per_family: dict[str, list[float]] = defaultdict(list)
    for row, first in zip(gold_rows, firsts, strict=True):
        per_family[str(row.get("family"))].append(float(first == tool))
    micro = 100.0 * sum(f == tool for f in firsts) / len(firsts)
    return tool, micro, _macro(per_family)


def episode_scores(row: dict[str, Any], pred: dict[str, Any] | None) -> dict[str, float | int]:
    """Per-episode learning numbers (counts, so that they pool over episodes)."""
    gold = gold_steps(row["gold_chain"], row["gold"])
    actions = (pred or {}).get("actions") or []
    tools = args = 0
    for i, gold_step in enumerate(gold):
        if i < len(actions):
            tool_ok, args_ok = step_correct(actions[i], gold_step, row)
            tools += tool_ok
            args += args_ok
    first_ok = bool(actions) and step_correct(actions[0], gold[0], row)[0]
    return {
        "n_steps": len(actions),
        "valid_steps": sum(bool(a.get("valid")) for a in actions),
        "first_tool": float(first_ok),
        "gold_steps": len(gold),
        "tool_hits": tools,
        "argument_hits": args,
    }


def learning_metrics(
    gold_rows: list[dict[str, Any]], items: list[dict[str, Any]]
) -> dict[str, float | int | str | None]:
    """Pool per-episode numbers into the learning metrics.

    ``items`` are ``{"family", "learning": episode_scores(...), "accuracy", "used_gold_tools",
    "completed"}`` in the order of ``gold_rows``.
    """
    n = len(items)
    steps = sum(int(i["learning"]["n_steps"]) for i in items)
    valid = sum(int(i["learning"]["valid_steps"]) for i in items)
    gold_total = sum(int(i["learning"]["gold_steps"]) for i in items)
    per_family: dict[str, list[float]] = defaultdict(list)
    for item in items:
        per_family[str(item["family"])].append(float(item["learning"]["first_tool"]))
    with_tools = [i for i in items if i["used_gold_tools"]]
    tool, base_micro, base_macro = majority_baseline(gold_rows)
    pct = lambda a, b: 100.0 * a / b if b else 0.0  # noqa: E731
    return {
        "valid_actions": pct(valid, steps),
        "first_tool": pct(sum(float(i["learning"]["first_tool"]) for i in items), n),
        "first_tool_macro": _macro(per_family),
        "majority_first_tool": base_micro,
        "majority_first_tool_macro": base_macro,
        "majority_tool": tool,
        "tool_accuracy": pct(sum(int(i["learning"]["tool_hits"]) for i in items), gold_total),
        "argument_accuracy": pct(
            sum(int(i["learning"]["argument_hits"]) for i in items), gold_total
        ),
        "accuracy_given_gold_tools": pct(
            sum(float(i["accuracy"]) for i in with_tools), len(with_tools)
        ),
        "completed": pct(sum(float(i["completed"]) for i in items), n),
    }


def step_mode_metrics(
    gold_rows: list[dict[str, Any]], predictions: dict[str, dict[str, Any]]
) -> tuple[dict[str, float | int | str | None], list[dict[str, Any]]]:
    """Teacher-forced numbers: one predicted action per gold step, from the gold prefix.

    ``predictions[task_id]["step_predictions"]`` holds, per gold step, the action predicted
    from the gold prefix (``{"valid", "name", "arguments"}``). Returns the metrics and one
    row per task (its counts and family).
    """
    rows = []
    per_family_first: dict[str, list[float]] = defaultdict(list)
    per_family_tool: dict[str, list[float]] = defaultdict(list)
    totals = Counter[str]()
    for row in gold_rows:
        gold = gold_steps(row["gold_chain"], row["gold"])
        predicted = (predictions.get(row["id"]) or {}).get("step_predictions") or []
        counts = Counter[str]()
        for i, gold_step in enumerate(gold):
            action = predicted[i] if i < len(predicted) else {"valid": False}
            tool_ok, args_ok = step_correct(action, gold_step, row)
            counts["steps"] += 1
            counts["valid"] += bool(action.get("valid"))
            counts["tool"] += tool_ok
            counts["arguments"] += args_ok
            if gold_step["name"] == FINAL:
                counts["answer_steps"] += 1
                counts["answer"] += args_ok
            if i == 0:
                counts["first"] += tool_ok
            per_family_tool[str(row.get("family"))].append(float(tool_ok))
        per_family_first[str(row.get("family"))].append(float(counts["first"]))
        totals.update(counts)
        rows.append({"id": row["id"], "family": row.get("family"), **counts})
    tool, base_micro, base_macro = majority_baseline(gold_rows)
    pct = lambda a, b: 100.0 * a / b if b else 0.0  # noqa: E731
    metrics: dict[str, float | int | str | None] = {
        "valid_actions": pct(totals["valid"], totals["steps"]),
        "tool_accuracy": pct(totals["tool"], totals["steps"]),
        "tool_accuracy_macro": _macro(per_family_tool),
        "argument_accuracy": pct(totals["arguments"], totals["steps"]),
        "first_tool": pct(totals["first"], len(gold_rows)),
        "first_tool_macro": _macro(per_family_first),
        "majority_first_tool": base_micro,
        "majority_first_tool_macro": base_macro,
        "majority_tool": tool,
        "final_answer_accuracy": pct(totals["answer"], totals["answer_steps"]),
        "gold_steps": totals["steps"],
    }
    for family, values in sorted(per_family_tool.items()):
        metrics[f"tool_accuracy/{family}"] = 100.0 * sum(values) / len(values)
    return metrics, rows


STEP_PERCENT = [
    "valid_actions",
    "tool_accuracy",
    "tool_accuracy_macro",
    "argument_accuracy",
    "first_tool",
    "first_tool_macro",
    "majority_first_tool",
    "majority_first_tool_macro",
    "final_answer_accuracy",
]

__all__ = [
    "LEARNING_PERCENT",
    "STEP_PERCENT",
    "episode_scores",
    "gold_steps",
    "learning_metrics",
    "majority_baseline",
    "step_action",
    "step_mode_metrics",
    "trajectory_actions",
]
