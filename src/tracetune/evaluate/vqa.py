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

import re
from pathlib import Path
from typing import Any

from tracetune.evaluate.base import (
    ItemScore,
    ScoreReport,
    ScoringInputError,
    paired_rows,
    percent,
    require,
)

# -- VQA answer normalization ----------------------------------------------------------------
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]  # fmt: skip
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}


def _contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for stem in ("aren", "can", "couldn", "didn", "doesn", "don", "hadn", "hasn", "haven",
                 "isn", "mightn", "mustn", "needn", "shouldn", "wasn", "weren", "won",
                 "wouldn", "ain"):  # fmt: skip
        table[f"{stem}t"] = f"{stem}'t"
    for a, b in (("couldve", "could've"), ("shouldve", "should've"), ("wouldve", "would've"),
                 ("mightve", "might've"), ("mustve", "must've"), ("youre", "you're"),
                 ("theyre", "they're"), ("youve", "you've"), ("theyve", "they've"),
                 ("weve", "we've"), ("ive", "i've"), ("im", "i'm"), ("youll", "you'll"),
                 ("theyll", "they'll"), ("itll", "it'll"), ("thats", "that's"),
                 ("whats", "what's"), ("wheres", "where's"), ("whos", "who's"),
                 ("hows", "how's"), ("theres", "there's"), ("heres", "here's"),
                 ("lets", "let's"), ("shouldnt've", "shouldn't've"), ("yall", "y'all"),
                 ("oclock", "o'clock"), ("maam", "ma'am")):  # fmt: skip
        table[a] = b
    return table


_CONTRACTIONS = _contractions()


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # Punctuation touching a space, or any text with a comma inside a number, loses the
        # mark; elsewhere it separates words (e.g. "red/blue" -> "red blue").
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digits_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """VQA-style normalization (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_articles(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2 consensus accuracy for 10 answers; normalized exact match otherwise."""
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(str(a)) for a in answers]
    if len(refs) != 10:
        return float(pred in refs)
    total = 0.0
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :]
        total += min(1.0, sum(1 for r in others if r == pred) / 3.0)
    return total / len(refs)


# -- answer extraction -------------------------------------------------------------------------
_ANSWER_TAG = re.compile(r"<ANSWER>(.*?)(?:</ANSWER>|$)", re.IGNORECASE | re.DOTALL)
_ANSWER_IS = re.compile(r"the\s+(?:final\s+|correct\s+)?answer\s+is\s*[:：]?\s*", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"(?:^|\n|\b)(?:final\s+)?answer\s*[:：]\s*", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """The answer part of a model output: inside ``<ANSWER>``, after "The answer is:" or
    "Answer:" (last occurrence), else the whole text. Surrounding whitespace is stripped."""
    tag = _ANSWER_TAG.findall(text)
    if tag:
        text = tag[-1]
    for pattern in (_ANSWER_IS, _ANSWER_LABEL):
        found = list(pattern.finditer(text))
        if found:
            text = text[found[-1].end() :]
            break
    return text.strip()


def _option_letters(options: Any) -> dict[str, str]:
    if isinstance(options, dict):
        return {str(k).strip().upper(): str(v) for k, v in options.items()}
    if isinstance(options, list):
        return {chr(ord("A") + i): str(v) for i, v in enumerate(options)}
    return {}


def extract_choice(text: str, options: Any) -> str | None:
    """The option letter a model output picks, or None when it names none (or several).

    ``options``: a list (lettered A, B, ...) or a mapping letter -> option text. Tried in
    order: the whole answer is a letter ("B", "(b)", "B."); it starts with an upper-case
    letter and a delimiter ("B. Paris", "(B) Paris", "B: Paris"); exactly one letter in
    parentheses, or after "option"/"choice", anywhere; the answer equals, or contains as
    whole words, exactly one option's text.
    """
    letters = _option_letters(options)
    if not letters:
        return None
    answer = extract_answer(text)
    cls = "[" + re.escape("".join(sorted(letters))) + "]"
    whole = re.fullmatch(rf"\(?({cls})\)?[.):：]?", answer, re.IGNORECASE)
    if whole:
        return whole.group(1).upper()
    # Upper case only: a leading "A " is usually the article.
    lead = re.match(rf"(?:\(({cls})\)|({cls})[.):：])(?:\s|$)", answer)
    if lead:
        return (lead.group(1) or lead.group(2)).upper()
    for pattern in (rf"\(({cls})\)", rf"\b(?:option|choice)\s+\(?({cls})\b"):
        found = {m.group(1).upper() for m in re.finditer(pattern, answer, re.IGNORECASE)}
        if len(found) == 1:
            return found.pop()
    norm = normalize_vqa_answer(answer)
    texts = {k: normalize_vqa_answer(v) for k, v in letters.items()}
    exact = [k for k, v in texts.items() if v and v == norm]
    if len(exact) == 1:
        return exact[0]
    contained = [
        k for k, v in texts.items() if v and re.search(rf"(?:^|\s){re.escape(v)}(?:\s|$)", norm)
    ]
    return contained[0] if len(contained) == 1 else None


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
            if gold_letter not in _option_letters(options):
                raise ScoringInputError(
                    f"{where}: answer {gold_letter!r} is not one of the option letters "
                    f"{sorted(_option_letters(options))}"
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
