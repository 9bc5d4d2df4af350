"""What every benchmark scorer returns, and the readers that check its input files.

A ``ScoreReport`` holds the aggregate metrics *and* the per-item scores they were computed
from, so any number in a report can be traced back to the items behind it. Input readers
fail with a ``ScoringInputError`` that names the file, the line and the missing key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tracetune.errors import TracetuneError
from tracetune.schema import EvalRecord

Score = float | int | None


class ScoringInputError(TracetuneError, ValueError):
    """A gold or prediction file does not have the shape a scorer expects."""


class ItemScore(BaseModel):
    """The scores of one benchmark item (``None``: the metric does not apply to it)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    scores: dict[str, Score] = Field(default_factory=dict)
    prediction: str | None = Field(default=None, description="The answer that was scored.")
    details: dict[str, Any] = Field(default_factory=dict)


class ScoreReport(BaseModel):
    """Aggregate metrics of one benchmark run, with the per-item scores behind them."""

    model_config = ConfigDict(extra="forbid")

    benchmark: str = Field(description="Benchmark, mode and protocol, e.g. 'gta/e2e/official'.")
    metrics: dict[str, float | int] = Field(
        description="Aggregate metrics, named as the benchmark does (counts stay integers)."
    )
    n_items: int
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="How the metrics were computed: denominators, models used, notes.",
    )
    items: list[ItemScore] = Field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-item scores: what ``eval score`` prints."""
        return self.model_dump(exclude={"items"})

    def eval_records(self, model: str | None = None) -> list[EvalRecord]:
        return [
            EvalRecord(
                id=f"eval:{self.benchmark}:{item.id}",
                benchmark=self.benchmark,
                item_id=item.id,
                model=model,
                prediction=item.prediction,
                scores=dict(item.scores),
                metadata=dict(item.details),
            )
            for item in self.items
        ]

    def write_records(self, path: str | Path, model: str | None = None) -> None:
        """One JSON line per item: an ``EvalRecord`` (``item_id`` and its ``scores``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for record in self.eval_records(model):
                f.write(record.model_dump_json() + "\n")


def percent(numerator: float, denominator: float) -> float:
    """``100 * numerator / denominator``, and 0 for an empty denominator."""
    return 100.0 * numerator / denominator if denominator else 0.0


def _text(path: Path) -> str:
    from tracetune.inputs import InputError, read_text

    try:
        return read_text(path)
    except InputError as exc:
        raise ScoringInputError(str(exc)) from None


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ScoringInputError(f"{what} file {path} does not exist")
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as exc:
        hint = ""
        if exc.msg == "Extra data":  # one object per line: a JSON-lines file given for JSON
            hint = f"; {what} is one JSON document, and this looks like JSON lines"
        raise ScoringInputError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}){hint}"
        ) from exc


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """The objects of a JSON-lines file with their 1-based line numbers (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise ScoringInputError(f"{what} file {path} does not exist")
    rows: list[tuple[int, dict[str, Any]]] = []
    # One reader for user text: a file that is not UTF-8 is named, not a traceback.
    for lineno, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ScoringInputError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}); {what} must be JSON lines, "
                "one object per line"
            ) from exc
        if not isinstance(obj, dict):
            raise ScoringInputError(
                f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
            )
        rows.append((lineno, obj))
    return rows


def read_records(path: str | Path, what: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a JSON-lines file, or of a JSON list/object, each with where it came from.

    The location string (``file:line`` or ``file[key]``) is what errors should quote.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return [(f"{path}:{n}", row) for n, row in read_jsonl(path, what)]
    data = read_json(path, what)
    if isinstance(data, list):
        out: list[tuple[str, dict[str, Any]]] = []
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise ScoringInputError(f"{path}[{i}]: expected a JSON object")
            out.append((f"{path}[{i}]", row))
        return out
    if isinstance(data, dict):
        return [(f"{path}[{k!r}]", {"id": k, **_unwrap(v, path, k)}) for k, v in data.items()]
    raise ScoringInputError(f"{path}: expected a JSON list or object of {what}")


def _unwrap(value: Any, path: Path, key: str) -> dict[str, Any]:
    # Some benchmarks (Agent-X) store each record as a one-element list under its id.
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict):
        raise ScoringInputError(f"{path}[{key!r}]: expected a JSON object")
    return value


def require(row: dict[str, Any], keys: str | Sequence[str], where: str, hint: str = "") -> Any:
    """``row[key]`` for the first of ``keys`` present; else an error naming file, line and key."""
    names = [keys] if isinstance(keys, str) else list(keys)
    for key in names:
        if key in row:
            return row[key]
    wanted = " or ".join(repr(k) for k in names)
    have = ", ".join(repr(k) for k in row) or "none"
    message = f"{where}: missing key {wanted} (keys present: {have})"
    raise ScoringInputError(message + (f"; {hint}" if hint else ""))


def index_unique(
    rows: Iterable[tuple[str, dict[str, Any]]], keys: str | Sequence[str], what: str, hint: str = ""
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Rows keyed by their id (stringified); a repeated id is an error."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for where, row in rows:
        key = str(require(row, keys, where, hint))
        if key in out:
            raise ScoringInputError(
                f"{where}: {what} id {key!r} appears twice (first at {out[key][0]})"
            )
        out[key] = (where, row)
    return out


def paired_rows(
    gold: str | Path,
    predictions: str | Path,
    bench: str,
    keys: Sequence[str],
    what: str,
    hint: str,
) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, tuple[str, dict[str, Any]]]]:
    """Gold and prediction rows keyed by id; a prediction for an unknown id is an error."""
    gold_rows = index_unique(read_records(gold, f"{bench} gold"), keys, what)
    pred_rows = index_unique(read_records(predictions, f"{bench} predictions"), keys, what, hint)
    for pid, (where, _) in pred_rows.items():
        if pid not in gold_rows:
            raise ScoringInputError(f"{where}: {keys[0]} {pid!r} is not in the gold file {gold}")
    return gold_rows, pred_rows
