"""Preference pairs from explored trajectories (``tracetune prefs build``).

At every explored step, chosen = the verifier's best candidate (it must be well-formed and
have run cleanly, else the step gives no pair). A candidate is rejected against it when:

- ``format``: its output holds no valid action (a parse error), or
- ``error``: executing its action failed (unknown tool, bad arguments, raising tool or code),
- ``margin``: the verifier scored it at least ``margin`` below the chosen one (verifiers
  whose scores measure quality: gold, llm-score, gold+llm-*; a pick or a rank says
  nothing of how much worse), or
- ``dissimilar``: it ranks below the chosen one and its action is unlike the chosen one's
  (``similarity`` below ``threshold``; the reference used BLEU < 0.3). By default the
  actions are compared (tool and arguments, or code), not the raw text, whose fixed
  markers make any two steps of one format look alike.

Candidates whose text equals the chosen one's, and those ranked below it that are neither
far enough behind nor different enough, give no pair. Each pair carries the shared prefix
(with its observation images), both candidate steps with their observations, their scores,
and why the rejected one lost.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tracetune.cliflag import CliFlag
from tracetune.runner import Drop, StageResult, run_stage
from tracetune.schema import PreferencePair, Step, Trajectory
from tracetune.store import Dataset, DatasetError

STAGE = "pairs"
Similarity = Literal["bleu", "jaccard", "ratio"]


class BuildConfig(BaseModel):
    """Configuration of ``tracetune prefs build`` (YAML keys are these field names)."""

    model_config = ConfigDict(extra="forbid")

    inputs: Annotated[list[Path], CliFlag("--in", "--inputs")] = Field(
        min_length=1, description="Explored trajectory directories (from prefs explore)."
    )
    out: Path = Field(description="Output preference-pair dataset directory (resumable).")
    margin: float = Field(
        default=1.0,
        ge=0,
        description="Reject candidates scored at least this far below the chosen one.",
    )
    similarity: Similarity = Field(
        default="bleu",
        description="How alike two candidates' texts are: 'bleu' (sentence BLEU-4 over "
        "words, smoothed), 'jaccard' (word-set overlap) or 'ratio' (difflib character ratio).",
    )
    threshold: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="Candidates ranked below the chosen one with similarity under this are "
        "rejected as dissimilar (set 0 to disable).",
    )
    compare: Literal["action", "raw"] = Field(
        default="action",
        description="What the similarity compares: 'action' (the tool call's name and "
        "arguments, the code, or the answer; the thought and the format's fixed markers "
        "would make any two steps look alike) or 'raw' (the whole output).",
    )
    include_faults: bool = Field(
        default=True, description="Pair candidates with format faults or execution errors."
    )
    max_pairs_per_step: int | None = Field(
        default=None, ge=1, description="Keep at most this many pairs per step (worst first)."
    )


# -- similarity ----------------------------------------------------------------------------
_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU of ``candidate`` against ``reference``: geometric mean of clipped n-gram
    precisions (n = 1..4, add-one smoothing for n > 1) times the brevity penalty."""
    cand, ref = _words(candidate), _words(reference)
    if not cand or not ref:
        return 1.0 if cand == ref else 0.0
    logs = []
    for n in range(1, max_n + 1):
        c = Counter(tuple(cand[i : i + n]) for i in range(len(cand) - n + 1))
        r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        total = sum(c.values())
        matched = sum(min(v, r[g]) for g, v in c.items())
        if n == 1:
            if matched == 0:
                return 0.0
            logs.append(math.log(matched / total))
        else:
            logs.append(math.log((matched + 1) / (total + 1)))
    penalty = 1.0 if len(cand) >= len(ref) else math.exp(1 - len(ref) / len(cand))
    return penalty * math.exp(sum(logs) / max_n)


def jaccard(a: str, b: str) -> float:
    wa, wb = set(_words(a)), set(_words(b))
    return 1.0 if not wa and not wb else len(wa & wb) / len(wa | wb)


def ratio(a: str, b: str) -> float:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio()


SIMILARITIES: dict[str, Callable[[str, str], float]] = {
    "bleu": bleu,
    "jaccard": jaccard,
    "ratio": ratio,
}


def action_text(step: Step) -> str:
    """What a step does, without its thought or the action format's scaffolding."""
    action = step.action
    if action is None:
        return step.raw
    if action.type == "tool_call" and action.tool_call is not None:
        values = " ".join(f"{k} {v}" for k, v in action.tool_call.arguments.items())
        return f"{action.tool_call.name} {values}"
    if action.type == "code" and action.code:
        return action.code
    return f"final_answer {action.answer or ''}"


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def pair_id(trajectory_id: str, step_index: int, chosen: int, rejected: int) -> str:
    blob = f"{trajectory_id}|{step_index}|{chosen}|{rejected}"
    return "pair-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def step_pairs(
    trajectory: Trajectory, config: BuildConfig
) -> tuple[list[PreferencePair], Counter[str]]:
    """Every pair one explored trajectory yields, and why its other candidates gave none."""
    entries = trajectory.metadata.get("exploration")
    if not isinstance(entries, list):
        raise ValueError(
            f"trajectory {trajectory.id} has no metadata['exploration']; build pairs from the "
            "output of `tracetune prefs explore`"
        )
    similarity = SIMILARITIES[config.similarity]
    verifier = str(trajectory.metadata.get("verifier", ""))
    pairs: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    committed = trajectory.steps
    for entry in entries:
        index = int(entry["index"])
        candidates = [Step.model_validate(c["step"]) for c in entry["candidates"]]
        ranking = entry["ranking"]
        scores: list[float] = ranking["scores"]
        reasons: list[str] = ranking["reasons"]
        position = {c: p for p, c in enumerate(ranking["order"])}
        graded = bool(ranking.get("graded", True))
        best = int(entry["chosen"])
        chosen = candidates[best]
        if chosen.error is not None:
            skipped["step without a well-formed candidate"] += 1
            continue
        prefix = committed[:index]
        found: list[tuple[float, PreferencePair]] = []
        seen: set[str] = set()
        for i, cand in enumerate(candidates):
            if i == best:
                continue
            if _same(cand.raw, chosen.raw):
                skipped["same text as the chosen step"] += 1
                continue
            if not cand.raw.strip():
                skipped["empty output"] += 1  # nothing to push down; trainers reject it
                continue
            text = " ".join(cand.raw.split())
            if text in seen:  # one sample per (prefix, chosen, rejected)
                skipped["same text as another rejected step"] += 1
                continue
            seen.add(text)
            kinds: list[str] = []
            why: list[str] = []
            if cand.error is not None:
                if not config.include_faults:
                    skipped["fault (faults excluded)"] += 1
                    continue
                kinds.append("format" if cand.error.kind.value == "parse" else "error")
                why.append(f"{kinds[0]}: {cand.error.kind.value}: {cand.error.message[:200]}")
            gap = scores[best] - scores[i]
            if config.compare == "action":
                sim = similarity(action_text(cand), action_text(chosen))
            else:
                sim = similarity(cand.raw, chosen.raw)
            below = position[i] > position[best]
            if below and graded and gap >= config.margin and gap > 0:
                kinds.append("margin")
                why.append(f"scored {scores[i]:g} vs {scores[best]:g} (margin {gap:g})")
            if below and sim < config.threshold:
                kinds.append("dissimilar")
                why.append(f"{config.similarity} similarity {sim:.2f} < {config.threshold:g}")
            if not kinds:
                skipped[
                    "ranked below but close to the chosen step"
                    if below
                    else "not ranked below the chosen step"
                ] += 1
                continue
            pair = PreferencePair(
                id=pair_id(trajectory.id, index, best, i),
                task=trajectory.task,
                action_format=trajectory.action_format,
                tools=trajectory.tools,
                prefix=prefix,
                chosen=chosen,
                rejected=cand,
                chosen_score=scores[best],
                rejected_score=scores[i],
                verifier=verifier,
                reasons=why + ([f"verifier: {reasons[i]}"] if reasons[i] else []),
                metadata={
                    "trajectory_id": trajectory.id,
                    "task_id": trajectory.task.id,
                    "step_index": index,
                    "chosen_candidate": best,
                    "rejected_candidate": i,
                    "rejection": kinds,
                    "similarity": round(sim, 4),
                    "similarity_measure": config.similarity,
                    "chosen_reason": reasons[best],
                    "chosen_source": entry["candidates"][best].get("source", "policy"),
                    "chosen_temperature": entry["candidates"][best].get("temperature"),
                    "rejected_temperature": entry["candidates"][i].get("temperature"),
                    "verifier_fallback": bool(ranking.get("fallback")),
                },
            )
            found.append((gap, pair))
        found.sort(key=lambda gp: -gp[0])
        if config.max_pairs_per_step is not None:
            skipped["over max_pairs_per_step"] += max(0, len(found) - config.max_pairs_per_step)
            found = found[: config.max_pairs_per_step]
        pairs.extend(p for _, p in found)
    return pairs, skipped


async def run_build(
    config: BuildConfig, progress: bool = True
) -> tuple[StageResult, Dataset[PreferencePair]]:
    """Pairs from every explored trajectory; trajectories already built are skipped (build
    into a new directory to apply other rules)."""
    out: Dataset[PreferencePair] = Dataset.create(config.out, PreferencePair)
    inputs: list[Dataset[Trajectory]] = []
    for path in config.inputs:
        ds = Dataset.open(path)
        if ds.record_type is not Trajectory:
            raise DatasetError(
                f"{path} holds {ds.record_type.kind} records; prefs build reads the explored "
                "trajectories written by `tracetune prefs explore`"
            )
        inputs.append(ds)
    items = [(ds, t) for ds in inputs for t in ds]
    if not items:
        raise DatasetError(f"no explored trajectories in {', '.join(map(str, config.inputs))}")
    skipped_total: Counter[str] = Counter()

    async def process(item: tuple[Dataset[Trajectory], Trajectory]) -> list[Any] | Drop:
        pairs, skipped = step_pairs(item[1], config)
        skipped_total.update(skipped)
        if not pairs:
            return Drop("no pair", {"skipped": dict(skipped)})
        return list(pairs)

    result = await run_stage(
        STAGE,
        items,
        key=lambda item: item[1].id,
        process=process,
        out=out,
        concurrency=1,
        sources=[ds.assets for ds in inputs],
        progress=progress,
        total=len(items),
    )
    result.drop_reasons.update({f"candidate: {k}": v for k, v in skipped_total.items()})
    return result, out
