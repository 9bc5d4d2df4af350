"""VQA-style answer matching and multiple-choice accuracy, with answer extraction.

``normalize_vqa_answer`` follows the VQA evaluation's answer processing: punctuation is
removed (or replaced by a space, depending on context), periods not followed by a digit are
dropped, text is lowercased, number words up to ten become digits, the articles a/an/the are
dropped and apostrophe-less contractions ("dont") get their apostrophe back.

Open-ended items: with exactly 10 reference answers (VQAv2), the score is the VQAv2
consensus accuracy ``min(#matching humans / 3, 1)``, averaged, as in the official code, over
the ten leave-one-out subsets of nine answers; with any other number of references it is 1
when the normalized prediction equals any normalized reference.

Multiple-choice items: the option letter is extracted from free text ("(B)", "B.",
"Answer: B", "The answer is: B", and MMAT RR/ORR outputs ``<ANSWER>The answer is: X</ANSWER>``),
or, failing that, from the option text the answer repeats.

Gold rows (JSON lines, or a JSON list): ``{"id", "answers": [...]}`` or ``{"id", "answer"}``
for open-ended items; ``{"id", "options"|"choices": [...] or {"A": ...}, "answer": "B"}`` for
multiple choice. Predictions: ``{"id", "prediction"}`` (``answer``/``response`` accepted).
"""

from __future__ import annotations

from pathlib import Path

from tracetune.evaluate.base import (
    ItemScore,
    ScoreReport,
    ScoringInputError,
    paired_rows,
    percent,
    require,
)
from tracetune.judge.vqa import extract_answer, extract_choice, option_letters, vqa_accuracy

# -- scorer --------------------------------------------------------------------------------------
_PRED_KEYS = ("prediction", "answer", "response", "model_answer")


def score_vqa(gold: str | Path, predictions: str | Path) -> ScoreReport:
    """VQA-style accuracy on open-ended items and multiple-choice accuracy, in percent."""
    gold_rows, pred_rows = paired_rows(
        gold,
        predictions,
        "VQA",
        ("id", "question_id"),
        "item",
        'prediction lines are {"id", "prediction"}',
    )
    items = []
    for item_id, (where, row) in gold_rows.items():
        raw = ""
        if item_id in pred_rows:
            pwhere, prow = pred_rows[item_id]
            raw = str(require(prow, _PRED_KEYS, pwhere) or "")
        options = row.get("options", row.get("choices"))
        if options is not None:
            gold_letter = str(require(row, "answer", where)).strip().upper()
            if gold_letter not in option_letters(options):
                raise ScoringInputError(
                    f"{where}: answer {gold_letter!r} is not one of the option letters "
                    f"{sorted(option_letters(options))}"
                )
            choice = extract_choice(raw, options)
            items.append(
                ItemScore(
                    id=item_id,
                    scores={"mc_accuracy": float(choice == gold_letter)},
                    prediction=raw,
                    details={"type": "multiple_choice", "extracted": choice, "gold": gold_letter},
                )
            )
        else:
            answers = require(row, ("answers", "answer"), where)
            answers = [answers] if isinstance(answers, str) else list(answers)
            answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
            extracted = extract_answer(raw)
            items.append(
                ItemScore(
                    id=item_id,
                    scores={"vqa_accuracy": vqa_accuracy(extracted, answers)},
                    prediction=raw,
                    details={"type": "open", "extracted": extracted, "n_answers": len(answers)},
                )
            )
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metric in ("vqa_accuracy", "mc_accuracy"):
        values = [v for i in items if (v := i.scores.get(metric)) is not None]
        if values:
            metrics[metric] = percent(sum(values), len(values))
            counts[metric] = len(values)
    # Each item has exactly one metric, so overall accuracy pools both kinds.
    metrics["accuracy"] = percent(
        sum(v for i in items for v in i.scores.values() if v is not None), len(items)
    )
    return ScoreReport(
        benchmark="vqa",
        metrics=metrics,
        n_items=len(items),
        details={
            "items_per_metric": counts,
            "missing_predictions": [i for i in gold_rows if i not in pred_rows],
        },
        items=items,
    )
