"""Checking answers against gold: numbers with tolerance, aliases, units, lists, verbose text.

One checker for every place a task has a gold answer (gold rollouts, teacher rollouts,
evaluation of task programs), so "correct" means the same thing everywhere::

    check_answer("The total is $1,204.50.", GoldAnswer(value="1204.5", kind="number",
                 tolerance=0.01)).passed  # True

Rules, in order:
1. A final answer is extracted from verbose text (``FINAL ANSWER: x``, ``Answer: x``,
   ``\\boxed{x}``, "the answer is x"); otherwise the whole text is the candidate.
2. ``number``: currency symbols, thousands separators, ``%`` and a trailing unit are
   stripped; a unit that contradicts the gold unit fails. When the candidate holds several
   numbers, the one after the last "=", ":" or "is" counts, else the last one. Equal within
   ``tolerance`` (absolute; exact when None).
3. ``text`` / ``choice``: case, accents, punctuation, articles and spacing are ignored; the
   value or any alias must equal the candidate, or appear as whole words in a short answer.
   A ``choice`` answer that names more than one of the choices fails.
   Any answer that hedges ("12 or 13", "maybe Lisbon") fails.
4. ``list``: items split on commas, semicolons, "and" or newlines (or a JSON list); the
   same items in any order (in order when ``ordered``), each item compared as a number or
   as text.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from tracetune.schema import GoldAnswer, Trajectory, Verdict

# -- extraction ----------------------------------------------------------------------------
_FINAL_PATTERNS = [
    re.compile(r"final\s+answer\s*(?:is|:|=)\s*(.+)", re.I | re.S),
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"(?:^|\n)\s*\**answer\**\s*[:=]\s*(.+)", re.I | re.S),
    re.compile(r"\bthe\s+answer\s+is\s*:?\s*(.+)", re.I | re.S),
]


def extract_final_answer(text: str) -> str:
    """The answer part of a verbose reply, or the reply itself when it has no marker."""
    text = text.strip()
    for pattern in _FINAL_PATTERNS:
        matches = list(pattern.finditer(text))
        if matches:
            text = matches[-1].group(1).strip()
            text = text.splitlines()[0] if text else ""  # the answer, not what follows it
            break
    wrappers = r"^[*_`\"'“”‘’\s]+|[*_`\"'“”‘’\s]+$"
    text = re.sub(wrappers, "", re.sub(wrappers, "", text).rstrip("."))
    return text.strip()


# -- numbers and units ---------------------------------------------------------------------
_UNITS: dict[str, tuple[str, ...]] = {
    "km": ("km", "kms", "kilometer", "kilometers", "kilometre", "kilometres"),
    "m": ("m", "meter", "meters", "metre", "metres"),
    "cm": ("cm", "centimeter", "centimeters", "centimetre", "centimetres"),
    "kg": ("kg", "kgs", "kilo", "kilos", "kilogram", "kilograms"),
    "g": ("g", "gram", "grams"),
    "%": ("%", "percent", "pct", "per cent"),
    "h": ("h", "hr", "hrs", "hour", "hours"),
    "min": ("min", "mins", "minute", "minutes"),
    "s": ("s", "sec", "secs", "second", "seconds"),
    "years": ("y", "yr", "yrs", "year", "years"),
    "usd": ("$", "usd", "dollar", "dollars"),
    "eur": ("€", "eur", "euro", "euros"),
    "gbp": ("£", "gbp", "pound", "pounds"),
}
_UNIT_OF = {alias: canonical for canonical, aliases in _UNITS.items() for alias in aliases}

_NUMBER = re.compile(
    r"(?P<sign>[-−+])?\s?(?P<cur>[$€£¥])?\s?(?P<sign2>[-−])?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s?(?P<unit>%|per cent|[A-Za-z€$£]+))?"
)
_CUE = re.compile(r"=|:|\b(?:is|are|was|were|equals|of|to)\b", re.I)


def canonical_unit(unit: str | None) -> str | None:
    """'kilometres' -> 'km'; unknown words (e.g. 'items') -> None."""
    if not unit:
        return None
    return _UNIT_OF.get(unit.strip().lower().rstrip("."))


@dataclass
class NumberFound:
    value: float
    unit: str | None  # canonical unit or currency, if one was written
    text: str


def numbers_in(text: str) -> list[NumberFound]:
    """Every number in ``text`` with its currency or unit (thousands separators removed)."""
    text = re.sub(r"(?<=\d)[\u00a0\u202f\u2009](?=\d{3}\b)", "", text)
    found = []
    for m in _NUMBER.finditer(text):
        start = m.start("num")
        if start > 0 and (text[start - 1].isalpha() or text[start - 1] == "_"):
            continue  # part of a word or code such as 'KT-4821' or 'Q3'
        value = float(m.group("num").replace(",", ""))
        if (m.group("sign") or m.group("sign2") or "") in ("-", "−"):
            if m.group("sign") and m.start("sign") > 0 and text[m.start("sign") - 1].isalnum():
                pass  # a hyphen inside a code or range ('KT-4821', '9-17'), not a minus
            else:
                value = -value
        unit = canonical_unit(m.group("cur")) or canonical_unit(m.group("unit"))
        found.append(NumberFound(value, unit, m.group(0).strip()))
    return found


def pick_number(text: str) -> NumberFound | None:
    """The number a sentence answers with: the first after the last cue, else the last.

    Parenthesised asides ('9 (5 + 4)') are ignored when a number stands outside them.
    """
    bare = re.sub(r"\([^()]*\)", " ", text)
    if bare != text and numbers_in(bare):
        text = bare
    numbers = numbers_in(text)
    if len(numbers) <= 1:
        return numbers[0] if numbers else None
    cues = list(_CUE.finditer(text))
    if cues:
        after = numbers_in(text[cues[-1].end() :])
        if after:
            return after[0]
    return numbers[-1]


def parse_number(text: str) -> float | None:
    found = pick_number(text)
    return found.value if found else None


def numbers_equal(a: float, b: float, tolerance: float | None) -> bool:
    if tolerance is not None:
        return abs(a - b) <= tolerance + 1e-9
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# -- text ----------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Case, accents, punctuation, leading articles and spacing removed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"^\s*(?:the|a|an)\s+", "", text)
    return " ".join(text.split())


def _contains_words(haystack: str, needle: str) -> bool:
    return bool(needle) and re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) is not None


_HEDGE = re.compile(r"\b(?:or|either|maybe|perhaps|possibly)\b", re.I)

SHORT_ANSWER_WORDS = 12
"""A gold phrase found inside a reply counts only in replies this short (no essays)."""


# -- checking ------------------------------------------------------------------------------
@dataclass
class AnswerCheck:
    """The outcome of checking one answer: passed, why, and what was compared."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    extracted: str | None = None
    expected: str = ""

    @property
    def score(self) -> float:
        return 1.0 if self.passed else 0.0


def check_answer(
    prediction: str | None,
    gold: GoldAnswer,
    *,
    ordered: bool = False,
    choices: list[str] | None = None,
) -> AnswerCheck:
    """Whether ``prediction`` is a correct answer to a task with gold answer ``gold``."""
    expected = gold.value
    if prediction is None or not str(prediction).strip():
        return AnswerCheck(False, ["no answer was given"], None, expected)
    prediction = str(prediction)
    candidate = extract_final_answer(prediction)
    if _HEDGE.search(candidate) and not any(_HEDGE.search(v) for v in [gold.value, *gold.aliases]):
        return AnswerCheck(
            False, [f"{candidate!r} hedges between alternatives"], candidate, expected
        )
    if gold.kind == "number":
        return _check_number(candidate, gold)
    if gold.kind == "list":
        return _check_list(candidate, gold, ordered)
    return _check_text(prediction, candidate, gold, choices if gold.kind == "choice" else None)


def _check_number(candidate: str, gold: GoldAnswer) -> AnswerCheck:
    expected = gold.value
    targets = []
    for value in [gold.value, *gold.aliases]:
        number = parse_number(value)
        if number is not None:
            targets.append(number)
    if not targets:
        raise ValueError(f"gold answer {gold.value!r} is marked numeric but holds no number")
    found = pick_number(candidate)
    if found is None:
        return AnswerCheck(
            False, [f"expected a number ({expected}), got {candidate!r}"], candidate, expected
        )
    gold_unit = canonical_unit(gold.unit) if gold.unit else None
    if gold.unit and gold_unit is None:
        gold_unit = gold.unit.strip().lower()
    if found.unit and gold_unit and found.unit != gold_unit:
        return AnswerCheck(
            False,
            [f"unit {found.unit!r} does not match the gold unit {gold_unit!r}"],
            candidate,
            expected,
        )
    tolerance = gold.tolerance
    if any(numbers_equal(found.value, t, tolerance) for t in targets):
        return AnswerCheck(
            True,
            [
                f"{_fmt(found.value)} matches {expected}"
                + (f" (tolerance {tolerance:g})" if tolerance else "")
            ],
            candidate,
            expected,
        )
    off = min(abs(found.value - t) for t in targets)
    return AnswerCheck(
        False,
        [
            f"{_fmt(found.value)} != {expected} (off by {_fmt(off)}"
            + (f", tolerance {tolerance:g})" if tolerance else ")")
        ],
        candidate,
        expected,
    )


def _fmt(value: float) -> str:
    return f"{value:.10g}"


def _check_text(
    prediction: str, candidate: str, gold: GoldAnswer, choices: list[str] | None
) -> AnswerCheck:
    accepted = [normalize_text(v) for v in [gold.value, *gold.aliases] if v.strip()]
    said = normalize_text(candidate)
    whole = normalize_text(prediction)
    if choices:
        named = [c for c in choices if _contains_words(whole, normalize_text(c))]
        if len(named) > 1 and said not in accepted:
            return AnswerCheck(
                False,
                [f"names several choices ({', '.join(named)}) instead of one"],
                candidate,
                gold.value,
            )
    if said in accepted:
        return AnswerCheck(True, [f"{candidate!r} matches {gold.value!r}"], candidate, gold.value)
    for alias in accepted:
        for text in (said, whole):
            if len(text.split()) <= SHORT_ANSWER_WORDS and _contains_words(text, alias):
                return AnswerCheck(
                    True,
                    [f"{gold.value!r} found in the short answer {candidate!r}"],
                    candidate,
                    gold.value,
                )
    return AnswerCheck(
        False,
        [
            f"{candidate!r} does not match {gold.value!r}"
            + (f" or its aliases {gold.aliases}" if gold.aliases else "")
        ],
        candidate,
        gold.value,
    )


def split_list(text: str) -> list[str]:
    """Items of a list answer: a JSON list, or text split on , ; newlines and 'and'."""
    text = text.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
            if isinstance(items, list):
                return [str(i).strip() for i in items if str(i).strip()]
        except json.JSONDecodeError:
            pass
        text = text.strip("[]")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # thousands separators are not commas
    parts = re.split(r"\s*(?:[;,\n]|\band\b)\s*", text)
    return [p.strip(" .'\"") for p in parts if p.strip(" .'\"")]


def _item_key(item: str) -> tuple[str, Any]:
    numbers = numbers_in(item)
    if len(numbers) == 1 and re.fullmatch(r"[^A-Za-z]*(?:[A-Za-z%€$£]+)?[^A-Za-z]*", item):
        return ("number", numbers[0].value)
    return ("text", normalize_text(item))


def _items_equal(a: tuple[str, Any], b: tuple[str, Any], tolerance: float | None) -> bool:
    if a[0] == b[0] == "number":
        return numbers_equal(a[1], b[1], tolerance)
    return a[0] == b[0] and a[1] == b[1]


def _check_list(candidate: str, gold: GoldAnswer, ordered: bool) -> AnswerCheck:
    got = [_item_key(i) for i in split_list(candidate)]
    reasons = []
    for option in [gold.value, *gold.aliases]:
        want = [_item_key(i) for i in split_list(option)]
        if len(want) != len(got):
            reasons.append(f"{len(got)} items given, {len(want)} expected ({option!r})")
            continue
        if ordered:
            if all(_items_equal(a, b, gold.tolerance) for a, b in zip(got, want, strict=True)):
                return AnswerCheck(
                    True, [f"same items in order as {option!r}"], candidate, gold.value
                )
            reasons.append(f"items differ from {option!r} (order matters)")
            continue
        remaining = list(want)
        missing = []
        for item in got:
            match = next((w for w in remaining if _items_equal(item, w, gold.tolerance)), None)
            if match is None:
                missing.append(item[1])
            else:
                remaining.remove(match)
        if not missing:
            return AnswerCheck(True, [f"same items as {option!r}"], candidate, gold.value)
        reasons.append(f"items {missing} are not in {option!r}")
    return AnswerCheck(False, reasons, candidate, gold.value)


# -- verdicts ------------------------------------------------------------------------------
def verdict_id(target_id: str, judge: str) -> str:
    return "verdict-" + hashlib.sha256(f"{target_id}|{judge}".encode()).hexdigest()[:16]


def judge_answer(trajectory: Trajectory, judge: str = "gold") -> Verdict:
    """A verdict on whether a trajectory's final answer matches its task's gold answer."""
    task = trajectory.task
    if task.gold is None:
        raise ValueError(f"task {task.id} has no gold answer to check against")
    if trajectory.final_answer is None:
        check = AnswerCheck(
            False, [f"no final answer (episode ended: {trajectory.status})"], None, task.gold.value
        )
    else:
        check = check_answer(
            trajectory.final_answer,
            task.gold,
            ordered=bool(task.metadata.get("answer_ordered", False)),
            choices=task.metadata.get("choices"),
        )
    return Verdict(
        id=verdict_id(trajectory.id, judge),
        target_id=trajectory.id,
        target_kind="trajectory",
        judge=judge,
        passed=check.passed,
        score=check.score,
        reasons=check.reasons,
        details={
            "task_id": task.id,
            "prediction": trajectory.final_answer,
            "extracted": check.extracted,
            "gold": task.gold.value,
        },
    )
