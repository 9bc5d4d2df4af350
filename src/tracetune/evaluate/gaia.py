"""GAIA's quasi-exact-match scorer, with accuracy per level and overall.

Gold is GAIA's metadata JSONL (``task_id``, ``Question``, ``Level``, ``Final answer``, ...);
predictions are its submission JSONL (``task_id``, ``model_answer``). The rules are those of
the leaderboard's ``question_scorer``:

1. If the gold answer parses as a float, the prediction is stripped of ``$``, ``%`` and ``,``
   and compared as a float, exactly. A prediction that does not parse is wrong ("12 km" for
   12 is wrong).
2. Else, if the gold answer contains ``,`` or ``;``, both are split on ``[,;]``; the lists must
   have the same length and match elementwise: numeric gold elements as in rule 1, other
   elements after removing all whitespace and lowercasing, *punctuation kept*.
3. Else both are compared after removing all whitespace, lowercasing and removing all ASCII
   punctuation.

A missing answer is scored as the string ``"None"``. One departure: the leaderboard turns an
unparseable number into ``inf``, which would equal a gold answer of ``inf``; here an
unparseable number is always wrong.

When a prediction holds free text with a ``FINAL ANSWER:`` marker (GAIA's answer format),
the text after the last marker is scored; this is switched off with ``extract=False``.
"""

from __future__ import annotations

import math
import re
import string
from pathlib import Path
from typing import Any

from tracetune.evaluate.base import (
    ItemScore,
    ScoreReport,
    ScoringInputError,
    index_unique,
    percent,
    read_jsonl,
    require,
)

_FINAL_ANSWER = re.compile(r"final\s*answer\s*:", re.IGNORECASE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def extract_final_answer(text: str | None) -> str | None:
    """The text after the last ``FINAL ANSWER:`` marker, or the text itself if it has none."""
    if text is None:
        return None
    matches = list(_FINAL_ANSWER.finditer(text))
    if not matches:
        return text.strip()
    return text[matches[-1].end() :].strip()


def _is_float(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _number(text: str) -> float | None:
    for char in ("$", "%", ","):
        text = text.replace(char, "")
    try:
        value = float(text)
    except ValueError:
        return None
    return value


def _numbers_equal(prediction: str, gold: str) -> bool:
    value = _number(prediction)
    if value is None or math.isnan(value):
        return False
    return value == float(gold)


def normalize_str(text: str, remove_punct: bool = True) -> str:
    """Remove all whitespace, lowercase, and (optionally) remove ASCII punctuation."""
    text = re.sub(r"\s", "", text).lower()
    return text.translate(_PUNCTUATION) if remove_punct else text


def question_scorer(prediction: str | None, gold: str) -> bool:
    """GAIA's exact-match rules (see the module docstring)."""
    if prediction is None:
        prediction = "None"
    if _is_float(gold):
        return _numbers_equal(prediction, gold)
    if "," in gold or ";" in gold:
        gold_items = re.split(r"[,;]", gold)
        pred_items = re.split(r"[,;]", prediction)
        if len(gold_items) != len(pred_items):
            return False
        for pred_item, gold_item in zip(pred_items, gold_items, strict=True):
            if _is_float(gold_item):
                if not _numbers_equal(pred_item, gold_item):
                    return False
            elif normalize_str(pred_item, False) != normalize_str(gold_item, False):
                return False
        return True
    return normalize_str(prediction) == normalize_str(gold)


def score_gaia(gold: str | Path, predictions: str | Path, extract: bool = True) -> ScoreReport:
    """Accuracy (percent) overall and per level of a GAIA submission file."""
    gold_rows = index_unique(
        [(f"{gold}:{n}", r) for n, r in read_jsonl(gold, "GAIA gold")],
        "task_id",
        "task",
        "gold is GAIA's metadata.jsonl",
    )
    pred_rows = index_unique(
        [(f"{predictions}:{n}", r) for n, r in read_jsonl(predictions, "GAIA predictions")],
        "task_id",
        "task",
        'predictions are GAIA submission lines {"task_id", "model_answer"}',
    )
    unknown = [tid for tid in pred_rows if tid not in gold_rows]
    if unknown:
        where = pred_rows[unknown[0]][0]
        raise ScoringInputError(
            f"{where}: task_id {unknown[0]!r} is not in the gold file {gold} "
            f"({len(unknown)} such predictions)"
        )
    items = []
    for task_id, (where, row) in gold_rows.items():
        answer = require(row, "Final answer", where, "the test split has no public answers")
        level = str(require(row, "Level", where))
        if task_id in pred_rows:
            pred_where, pred = pred_rows[task_id]
            raw = require(pred, "model_answer", pred_where)
            raw = None if raw is None else str(raw)
        else:
            raw = None
        prediction = extract_final_answer(raw) if extract else raw
        correct = question_scorer(prediction, str(answer))
        items.append(
            ItemScore(
                id=task_id,
                scores={"accuracy": float(correct)},
                prediction=prediction,
                details={"level": level, "gold": str(answer), "missing": task_id not in pred_rows},
            )
        )
    metrics = {"accuracy": percent(sum(i.scores["accuracy"] or 0 for i in items), len(items))}
    counts: dict[str, int] = {}
    for level in sorted({i.details["level"] for i in items}):
        chosen = [i for i in items if i.details["level"] == level]
        metrics[f"level_{level}"] = percent(
            sum(i.scores["accuracy"] or 0 for i in chosen), len(chosen)
        )
        counts[f"level_{level}"] = len(chosen)
    return ScoreReport(
        benchmark="gaia",
        metrics=metrics,
        n_items=len(items),
        details={
            "questions_per_level": counts,
            "missing_predictions": [i.id for i in items if i.details["missing"]],
            "final_answer_extraction": extract,
        },
        items=items,
    )
