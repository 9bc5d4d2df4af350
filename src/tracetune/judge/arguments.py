"""Whether a tool call's arguments are a gold call's: one rule for every place that compares.

Step-wise preference verifiers (is this candidate the gold chain's next call?) and the
learning metrics (argument accuracy per step) ask the same question, so they share this
answer. A given call matches when every gold argument is present and its value matches;
extra arguments (optional ones the gold call left out) are allowed. Values match when:

- the gold value names an image an earlier step produced (``..._step1_0.png``): any
  non-empty file name does, since each episode or branch names its own outputs;
- the gold value is a box (four numbers): the given box overlaps it by at least
  ``min_iou`` (intersection over union);
- lists: same length, element by element; dicts: recursively, as arguments;
- numbers: by value (``"1,200"`` matches ``1200``);
- text: without case and spacing; a calculator ``expression`` without any spaces;
- anything else: equal.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["arguments_match", "box_iou", "value_matches"]

_PRODUCED_IMAGE = re.compile(r"_step\d+_\d+\.png$")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.replace(",", "").strip())
        except ValueError:
            return None
    return None


def _box(value: Any) -> list[float] | None:
    if isinstance(value, list | tuple) and len(value) == 4:
        numbers = [_number(v) for v in value]
        if all(n is not None for n in numbers):
            return [n for n in numbers if n is not None]
    return None


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (0 when either is empty)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _norm_text(value: str, compact: bool = False) -> str:
    text = " ".join(value.lower().split())
    return text.replace(" ", "") if compact else text


def value_matches(gold: Any, given: Any, key: str = "", min_iou: float = 0.5) -> bool:
    """Whether one argument value matches the gold one (rules in the module docstring)."""
    if isinstance(gold, str) and _PRODUCED_IMAGE.search(gold):
        return isinstance(given, str) and bool(given.strip())
    gold_box = _box(gold)
    if gold_box is not None and not isinstance(gold, str):
        given_box = _box(given)
        return given_box is not None and box_iou(gold_box, given_box) >= min_iou
    if isinstance(gold, list | tuple):
        return (
            isinstance(given, list | tuple)
            and len(given) == len(gold)
            and all(value_matches(g, v, min_iou=min_iou) for g, v in zip(gold, given, strict=True))
        )
    if isinstance(gold, dict):
        return isinstance(given, dict) and arguments_match(gold, given, min_iou=min_iou)
    gold_num, given_num = _number(gold), _number(given)
    if gold_num is not None and given_num is not None and not isinstance(gold, str):
        return math.isclose(gold_num, given_num, rel_tol=1e-6, abs_tol=1e-9)
    if (
        isinstance(gold, str)
        and isinstance(given, str | int | float)
        and not isinstance(given, bool)
    ):
        compact = key == "expression"
        return _norm_text(str(given), compact) == _norm_text(gold, compact)
    return bool(given == gold)


def arguments_match(gold: dict[str, Any], given: dict[str, Any], min_iou: float = 0.5) -> bool:
    """Every gold argument present in ``given`` with a matching value; extras are allowed."""
    return all(
        key in given and value_matches(want, given[key], key, min_iou) for key, want in gold.items()
    )
