"""``tracetune prefs stats``: what exploration found and what the pairs are made of.

For explored trajectories: steps, candidates, faults, judge fallbacks, and, where a step
was ranked by both the gold checks and an LLM judge (``gold+llm-*``, or ``gold`` with
``--judge``), how often the judge agrees with gold:

- ``top1``: the judge's best candidate is one of the candidates gold scores highest;
- ``pairwise``: over candidate pairs that both gold and the judge tell apart, the share
  the judge orders the same way as gold.

For pair datasets: pairs per task and per step index, and rejection reasons.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tracetune.schema import PreferencePair, Trajectory
from tracetune.store import Dataset, DatasetError


def agreement(gold: dict[str, Any], judge: dict[str, Any]) -> tuple[bool, int, int]:
    """(top-1 agrees, pairs ordered alike, pairs gold tells apart) for one step."""
    g: list[float] = gold["scores"]
    s: list[float] = judge["scores"]
    top1 = g[judge["order"][0]] == max(g)
    agree = total = 0
    for i in range(len(g)):
        for j in range(i + 1, len(g)):
            # Only pairs both tell apart: 'best' judges leave the others tied.
            if g[i] == g[j] or s[i] == s[j]:
                continue
            total += 1
            agree += (g[i] > g[j]) == (s[i] > s[j])
    return top1, agree, total


def explore_stats(dataset: Dataset[Trajectory]) -> dict[str, Any]:
    steps = candidates = fallbacks = anchored = 0
    faults: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    top1 = compared = agree = pairs_total = 0
    verifiers: Counter[str] = Counter()
    seconds = 0.0
    tokens = memo_hits = 0
    for trajectory in dataset:
        statuses[trajectory.status] += 1
        seconds += trajectory.duration_s
        tokens += trajectory.usage.total_tokens
        memo_hits += int(trajectory.metadata.get("tool_memo_hits") or 0)
        verifiers[str(trajectory.metadata.get("verifier"))] += 1
        for entry in trajectory.metadata.get("exploration") or []:
            steps += 1
            candidates += len(entry["candidates"])
            for c in entry["candidates"]:
                if c.get("fault"):
                    faults[c["fault"]] += 1
            ranking = entry["ranking"]
            anchored += entry["candidates"][entry["chosen"]].get("source") == "gold"
            details = ranking.get("details") or {}
            judged = details.get("judge")
            if ranking.get("fallback") or (isinstance(judged, dict) and judged.get("fallback")):
                fallbacks += 1
            if isinstance(details.get("gold"), dict) and isinstance(judged, dict):
                if judged.get("fallback"):
                    continue  # a default ranking says nothing about the judge
                t, a, n = agreement(details["gold"], judged)
                compared += 1
                top1 += t
                agree += a
                pairs_total += n
    report: dict[str, Any] = {
        "kind": "explored",
        "trajectories": len(dataset),
        "status": dict(statuses),
        "verifiers": dict(verifiers),
        "steps": steps,
        "candidates": candidates,
        "faults": dict(faults),
        "judge_fallbacks": fallbacks,
        "chosen_from_gold_anchor": anchored,
        "tool_calls_reused": memo_hits,
        "seconds_per_task": round(seconds / len(dataset), 2) if len(dataset) else 0.0,
        "tokens": tokens,
    }
    if compared:
        report["judge_agreement_with_gold"] = {
            "steps": compared,
            "top1": round(top1 / compared, 4),
            "pairwise": round(agree / pairs_total, 4) if pairs_total else None,
            "pairs_compared": pairs_total,
        }
    return report


def pair_stats(dataset: Dataset[PreferencePair]) -> dict[str, Any]:
    per_task: Counter[str] = Counter()
    per_step: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    verifiers: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    for pair in dataset:
        sources[str(pair.metadata.get("chosen_source", "policy"))] += 1
        per_task[pair.task.id] += 1
        per_step[pair.step_index] += 1
        verifiers[pair.verifier] += 1
        for kind in pair.metadata.get("rejection") or ["?"]:
            reasons[kind] += 1
    return {
        "kind": "pairs",
        "pairs": len(dataset),
        "tasks": len(per_task),
        "per_task": dict(sorted(per_task.items())),
        "per_step": {str(k): v for k, v in sorted(per_step.items())},
        "rejection_reasons": dict(reasons.most_common()),
        "verifiers": dict(verifiers),
        "chosen_source": dict(sources),
    }


def prefs_stats(path: Path) -> dict[str, Any]:
    """Statistics of an explored-trajectory or a preference-pair dataset, with the stage
    runner's counts (items done, dropped and failed, tokens, cost) under ``runs``."""
    from tracetune.runner.stats import stage_stats

    dataset = Dataset.open(path)
    runs = [r.to_dict() for r in stage_stats(path)]
    if dataset.record_type is PreferencePair:
        return {"path": str(path), **pair_stats(dataset), "runs": runs}
    if dataset.record_type is Trajectory:
        return {"path": str(path), **explore_stats(dataset), "runs": runs}
    raise DatasetError(
        f"{path} holds {dataset.record_type.kind} records; prefs stats reads explored "
        "trajectories (prefs explore) or pairs (prefs build)"
    )
