"""Dyn-VQA's answer score: token recall against the best alias (OmniSearch's Dyn-VQA evaluation).

Per question: prediction and each gold alias are normalized VQA-style
(``normalize_vqa_answer``: punctuation, number words to digits, articles dropped, lowercase)
and split on whitespace; the score is ``|gold tokens ∩ predicted tokens|`` (as multisets)
divided by the number of gold tokens, maximized over aliases. The benchmark score is the mean
times 100. Papers call it "F1-Recall"; it is recall: a long answer that contains the gold
tokens scores 1.

Gold rows: ``{"question_id", "answer": [alias, ...]}`` (Dyn-VQA's fields; ``id`` and a single
string answer are accepted). Predictions: ``{"question_id" | "id", "prediction"}``; RR/ORR
outputs are reduced to their answer first (``extract_answer``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tracetune.evaluate.base import (
    ItemScore,
    ScoreReport,
    ScoringInputError,
    paired_rows,
    percent,
    require,
)
from tracetune.evaluate.vqa import extract_answer, normalize_vqa_answer


def token_recall(prediction: str, aliases: list[str]) -> float:
    """Max over aliases of multiset token overlap / gold token count (aliases with no
    tokens after normalization are skipped)."""
    pred = Counter(normalize_vqa_answer(prediction).split())
    best = 0.0
    for alias in aliases:
        gold = Counter(normalize_vqa_answer(str(alias)).split())
        n = sum(gold.values())
        if n:
            best = max(best, sum((gold & pred).values()) / n)
    return best


def score_dynvqa(gold: str | Path, predictions: str | Path) -> ScoreReport:
    gold_rows, pred_rows = paired_rows(
        gold,
        predictions,
        "Dyn-VQA",
        ("question_id", "id"),
        "question",
        'prediction lines are {"question_id", "prediction"}',
    )
    items = []
    for qid, (where, row) in gold_rows.items():
        aliases = require(row, "answer", where, "Dyn-VQA answers are a list of aliases")
        aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        if not aliases:
            raise ScoringInputError(f"{where}: 'answer' has no aliases")
        raw = ""
        if qid in pred_rows:
            pwhere, prow = pred_rows[qid]
            raw = str(require(prow, ("prediction", "response", "model_answer"), pwhere) or "")
        answer = extract_answer(raw)
        items.append(
            ItemScore(
                id=qid,
                scores={"token_recall": token_recall(answer, aliases)},
                prediction=answer,
                details={"aliases": aliases},
            )
        )
    total = sum(i.scores["token_recall"] or 0.0 for i in items)
    return ScoreReport(
        benchmark="dynvqa",
        metrics={"token_recall": percent(total, len(items))},
        n_items=len(items),
        details={
            "rule": "mean over questions of max over aliases of multiset token recall, x100",
            "missing_predictions": [q for q in gold_rows if q not in pred_rows],
        },
        items=items,
    )
