"""GTA scorers: GTA's own step-by-step and end-to-end metrics, and the MAT/MATRIX protocol.

Gold is GTA's ``dataset.json`` (id -> ``{tools, files, dialogs, gt_answer}``). Predictions are
GTA's own OpenCompass prediction file (``{"0": {"origin_prompt", "prediction", "gold"}}``,
keyed by the row's position in dataset.json; ``prediction`` is ``[[message, ...]]`` in the
``every`` (e2e) config and one assistant message per gold turn in ``every_with_gt`` (step)),
or JSON lines in GTA's message shapes:

- step mode: ``{"id", "steps": [assistant message, ...]}``, one predicted assistant message
  per gold assistant turn (the model saw the gold history before each turn);
- e2e mode: ``{"id", "dialog": [message, ...]}``, the whole episode (assistant messages with
  ``tool_calls`` or ``content``, tool messages). Any message may carry ``"error"``.

A tool call is ``{"type": "function", "function": {"name", "arguments"}}`` (or the bare
``{"name", "arguments"}``); ``arguments`` may be a dict or its JSON text.

How the rules are read (checked against GTA's evaluator,
``GTABenchEvaluator`` in open-compass/GTA):

- *Objective answers* (``gt_answer = {whitelist, blacklist}``): correct when, for every
  whitelist group, the case-insensitive regex ``\\b(?:alias|alias...)\\b`` of the group's
  escaped aliases matches, and (if a blacklist is given) the same kind of pattern over all
  blacklist aliases does not match. *Subjective answers* (a list of reference sentences): the
  largest cosine similarity to a reference, clipped at 0 (see ``embeddings``). Queries whose
  ``gt_answer`` is empty (null) are the image-generation queries.
- *Step mode*, per gold assistant turn with its predicted message: ``inst_align`` counts
  turns whose predicted kind (tool call / answer) equals the gold kind and that carry no
  error, over (gold tool turns + queries with a non-null answer). As in GTA, the numerator
  counts every matching turn, the final answer turns of image-generation queries included,
  although the denominator does not count those queries. ``tool_acc``: tool turns with the
  gold tool name (an error on the call does not matter), over gold tool turns; ``arg_acc``:
  of those, argument dicts equal to the gold ones; ``answer_acc`` (SummAcc): answer scores of
  answer turns over queries with a non-null answer. ``tool_call``/``tool_call_error`` are raw
  counts of predicted tool calls and of those carrying an error.
- *End-to-end mode*: ``answer_acc`` scores the last message of the dialog when it is a
  non-empty answer (a dialog that ends in a tool call scores 0), over queries with a text
  answer. ``answer_acc_w_imggen`` adds the image-generation queries, each scoring the
  product over its gold DrawBox/AddText/Plot/TextToImage/ImageStylization calls of the
  similarity between ``json.dumps`` of the gold arguments and of the arguments of the last
  error-free predicted call of that tool (0 if there is none; 1 if it has no such gold call),
  over all queries. The predicted arguments are dumped with the gold's keys first, in the
  gold's order, so equal arguments always give equal texts (similarity 1). Tool F1 per
  category (P/O/L/C): every predicted call counts toward its category's predictions; a gold
  call is a hit when its tool name appears among the query's predicted calls; precision,
  recall and F1 pool the counts over the dataset and keep GTA's ``1e-5`` terms
  (``p = hits / (pred + 1e-5)``, ``f1 = 2pr / (p + r + 1e-5)``).
- *MAT protocol* (the MAT/MATRIX papers' numbers): objective queries only; correct when every
  whitelist group has an alias that is a case-insensitive substring of the answer; no
  blacklist. Reported as ``mat_answer_acc`` and never mixed with the official metrics.

Where this code departs from GTA's evaluator it is because that code would crash or depend
on an accident; every such choice is listed here:

- Only the first call of a message counts (as in GTA); an empty ``tool_calls`` list means no
  call (GTA would raise). A message carries an error when its ``"error"`` value is truthy
  (``"error": null`` is no error).
- GTA rewrites gold file arguments to absolute paths under the data root, and models see
  those paths. Here a string argument that is, or ends with ``/`` + one of the query's file
  paths is compared as that relative path, on both sides, so results do not depend on where
  the data lives.
- Step mode: GTA stops at the shorter of the predicted and gold turn lists; here a missing
  predicted turn (or a query with no prediction line) counts as wrong and every gold tool turn
  stays in the denominators. More predicted than gold turns is an input error.
- A category with no gold calls (a subset of the queries, such as the runnable subset of an
  end-to-end run) is reported as GTA's evaluator reports it: ``p_f1``, ``o_f1``, ``l_f1`` and
  ``c_f1`` are always present; with no gold call there is no hit, so its precision, recall
  and F1 are 0 (GTA's recall divides 0 by 0 there; it is taken as 0).
  ``details.categories_without_gold_calls`` names such categories, so a 0 there is not read
  as a failure of the agent.
- Cosine similarities are computed in float64 from each text's own embedding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tracetune.errors import ConfigError
from tracetune.evaluate.base import (
    ItemScore,
    ScoreReport,
    ScoringInputError,
    index_unique,
    percent,
    read_json,
    read_jsonl,
    require,
)
from tracetune.evaluate.embeddings import SentenceEmbedder, load_embedder
from tracetune.models.replies import content_text

Mode = Literal["step", "e2e"]
Protocol = Literal["official", "mat"]

TOOL_CATEGORIES: dict[str, tuple[str, ...]] = {
    "perception": ("OCR", "ImageDescription", "RegionAttributeDescription", "TextToBbox"),
    "operation": ("DrawBox", "AddText", "GoogleSearch"),
    "logic": ("Calculator", "Solver", "Plot", "MathOCR", "CountGivenObject"),
    "creativity": ("TextToImage", "ImageStylization"),
}
CATEGORY_OF: dict[str, str] = {t: c for c, tools in TOOL_CATEGORIES.items() for t in tools}
IMAGE_GENERATION_TOOLS = ("DrawBox", "AddText", "Plot", "TextToImage", "ImageStylization")
_PREFIX = {"perception": "p", "operation": "o", "logic": "l", "creativity": "c"}
_F1_EPS = 1e-5  # GTA's evaluator adds this to precision's and F1's denominators

AnswerKind = Literal["objective", "subjective", "image_generation"]
MessageKind = Literal["tool", "answer", "tool_return"]


@dataclass(frozen=True)
class ToolCallView:
    name: str
    arguments: Any


@dataclass
class GTAQuery:
    """One GTA query: its gold dialog, answer and attached file paths."""

    id: str
    dialogs: list[dict[str, Any]]
    gt_answer: Any
    files: tuple[str, ...] = ()
    where: str = ""
    gold_turns: list[dict[str, Any]] = field(default_factory=list)

    @property
    def answer_kind(self) -> AnswerKind:
        if not self.gt_answer:
            return "image_generation"
        return "objective" if isinstance(self.gt_answer, dict) else "subjective"

    @property
    def has_text_answer(self) -> bool:
        return bool(self.gt_answer)

    def gold_calls(self) -> list[ToolCallView]:
        calls = [first_call(m, self.where) for m in self.gold_turns]
        return [c for c in calls if c is not None]


# -- answers -------------------------------------------------------------------------------
def _alternation(aliases: Sequence[Any]) -> str:
    return r"\b(?:" + "|".join(re.escape(str(a)) for a in aliases) + r")\b"


def objective_correct(answer: str, gt: dict[str, Any]) -> bool:
    """GTA's rule: every whitelist group matches as a word-bounded alternation; no blacklist
    alias matches. Case-insensitive."""
    for group in gt.get("whitelist") or []:
        if not re.search(_alternation(group), answer, re.IGNORECASE):
            return False
    blacklist = gt.get("blacklist")
    if blacklist:
        aliases = [alias for group in blacklist for alias in group]
        if re.search(_alternation(aliases), answer, re.IGNORECASE):
            return False
    return True


def mat_correct(answer: str, gt: dict[str, Any]) -> bool:
    """The MAT/MATRIX rule: every whitelist group has an alias that is a case-insensitive
    substring of the answer. Blacklists are not consulted."""
    text = answer.lower()
    return all(
        any(str(alias).lower() in text for alias in group) for group in gt.get("whitelist") or []
    )


# -- messages ------------------------------------------------------------------------------
def first_call(message: dict[str, Any], where: str) -> ToolCallView | None:
    """The first tool call of a message (the only one GTA scores), or None."""
    calls = message.get("tool_calls")
    if not calls:
        return None
    if not isinstance(calls, list) or not isinstance(calls[0], dict):
        raise ScoringInputError(f"{where}: 'tool_calls' must be a list of tool call objects")
    call = calls[0]
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ScoringInputError(
            f"{where}: tool call without a function name; write "
            '{"type": "function", "function": {"name": ..., "arguments": {...}}}'
        )
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # unparseable arguments stay a string and match nothing
    return ToolCallView(name, arguments)


def message_kind(message: dict[str, Any], where: str) -> tuple[MessageKind, Any]:
    call = first_call(message, where)
    if call is not None:
        return "tool", call
    if message.get("role", "assistant") == "assistant":
        return "answer", content_text(message.get("content"))
    return "tool_return", message.get("content")


def has_error(message: dict[str, Any]) -> bool:
    return bool(message.get("error"))


def normalize_arguments(arguments: Any, files: Sequence[str]) -> Any:
    """Arguments with file paths made relative to the data root (see the module notes)."""
    if not isinstance(arguments, dict):
        return arguments
    out = {}
    for key, value in arguments.items():
        if isinstance(value, str):
            for path in files:
                if value == path or value.endswith("/" + path):
                    value = path
                    break
        out[key] = value
    return out


# -- gold ----------------------------------------------------------------------------------
def load_gta_gold(path: str | Path) -> dict[str, GTAQuery]:
    """Read GTA's ``dataset.json`` (a directory holding it may be given too)."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    data = read_json(path, "GTA gold")
    if not isinstance(data, dict):
        raise ScoringInputError(
            f"{path}: GTA's dataset.json maps query ids to {{tools, files, dialogs, gt_answer}}; "
            f"got a JSON {type(data).__name__}"
        )
    queries: dict[str, GTAQuery] = {}
    for qid, item in data.items():
        where = f"{path}[{qid!r}]"
        if not isinstance(item, dict):
            raise ScoringInputError(f"{where}: expected a JSON object")
        dialogs = require(item, "dialogs", where)
        gt = require(item, "gt_answer", where, "use null for image-generation queries")
        if not isinstance(dialogs, list) or not all(isinstance(m, dict) for m in dialogs):
            raise ScoringInputError(f"{where}: 'dialogs' must be a list of message objects")
        for i, m in enumerate(dialogs):
            require(m, "role", f"{where}.dialogs[{i}]")
        _check_gt(gt, where)
        files = tuple(
            str(f["path"]) for f in item.get("files") or [] if isinstance(f, dict) and "path" in f
        )
        query = GTAQuery(str(qid), dialogs, gt, files, where)
        query.gold_turns = [m for m in dialogs if m.get("role") == "assistant"]
        for i, m in enumerate(query.gold_turns):
            first_call(m, f"{where} assistant turn {i}")
        queries[str(qid)] = query
    return queries


def _check_gt(gt: Any, where: str) -> None:
    if gt is None or isinstance(gt, list) and all(isinstance(s, str) for s in gt):
        return
    if isinstance(gt, dict):
        whitelist = require(gt, "whitelist", f"{where}.gt_answer")
        blacklist = gt.get("blacklist")
        for name, groups in (("whitelist", whitelist), ("blacklist", blacklist or [])):
            if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
                raise ScoringInputError(
                    f"{where}.gt_answer.{name}: expected a list of alias lists, e.g. "
                    '[["4", "four"]]'
                )
        return
    raise ScoringInputError(
        f"{where}.gt_answer: expected {{whitelist, blacklist}} (objective), a list of "
        "reference sentences (subjective) or null (image generation)"
    )


# -- scorer --------------------------------------------------------------------------------
class GTAScorer:
    """Scores GTA predictions in step or e2e mode under the official or the MAT protocol."""

    def __init__(
        self,
        mode: Mode = "step",
        protocol: Protocol = "official",
        embedder: SentenceEmbedder | str = "auto",
    ) -> None:
        if mode not in ("step", "e2e"):
            raise ConfigError(f"GTA mode must be 'step' or 'e2e', not {mode!r}")
        if protocol not in ("official", "mat"):
            raise ConfigError(f"GTA protocol must be 'official' or 'mat', not {protocol!r}")
        self.mode = mode
        self.protocol = protocol
        self._embedder_spec = embedder
        self._embedder: SentenceEmbedder | None = (
            embedder if isinstance(embedder, SentenceEmbedder) else None
        )

    @property
    def benchmark(self) -> str:
        return f"gta/{self.mode}/{self.protocol}"

    @property
    def embedder(self) -> SentenceEmbedder:
        if self._embedder is None:
            assert isinstance(self._embedder_spec, str)
            self._embedder = load_embedder(self._embedder_spec)
        return self._embedder

    # answers
    def answer_score(self, answer: str, gt: Any) -> float:
        if isinstance(gt, dict):
            return float(objective_correct(answer, gt))
        return max((self.embedder.similarity(answer, ref) for ref in gt), default=0.0)

    def _arguments_json(self, arguments: Any, files: Sequence[str]) -> str:
        return json.dumps(normalize_arguments(arguments, files))

    # entry points
    def score_files(self, gold: str | Path, predictions: str | Path) -> ScoreReport:
        queries = load_gta_gold(gold)
        return self.score(queries, load_gta_predictions(predictions, self.mode, list(queries)))

    def score(
        self,
        gold: dict[str, GTAQuery],
        predictions: dict[str, tuple[str, list[dict[str, Any]]]],
    ) -> ScoreReport:
        for qid, (where, _) in predictions.items():
            if qid not in gold:
                raise ScoringInputError(
                    f"{where}: id {qid!r} is not a query of the gold file; score predictions "
                    "against the dataset.json they were made for"
                )
            if self.mode == "step":
                _check_step_count(gold[qid], predictions[qid][1], where)
        missing = [qid for qid in gold if qid not in predictions]
        if self.protocol == "mat":
            report = self._score_mat(gold, predictions)
        elif self.mode == "step":
            report = self._score_step(gold, predictions)
        else:
            report = self._score_e2e(gold, predictions)
        report.details["missing_predictions"] = missing
        if self._embedder is not None:
            report.details["embedder"] = self._embedder.describe()
        return report

    # step mode, official
    def _score_step(
        self, gold: dict[str, GTAQuery], predictions: dict[str, tuple[str, list[dict[str, Any]]]]
    ) -> ScoreReport:
        items = []
        for qid, query in gold.items():
            where, steps = predictions.get(qid, ("", []))
            items.append(self._score_step_item(query, steps, where))
        tool_steps = _total(items, "gold_tool_steps")
        answer_den = _total(items, "answer_counted")
        metrics = {
            "inst_align": percent(_total(items, "inst_align"), tool_steps + answer_den),
            "tool_acc": percent(_total(items, "tool_acc"), tool_steps),
            "arg_acc": percent(_total(items, "arg_acc"), tool_steps),
            "answer_acc": percent(_total(items, "answer_acc"), answer_den),
            "tool_call": int(_total(items, "tool_call")),
            "tool_call_error": int(_total(items, "tool_call_error")),
        }
        details = {
            "gold_tool_steps": int(tool_steps),
            "queries_with_answer": int(answer_den),
            "inst_align_denominator": int(tool_steps + answer_den),
            "percent": ["inst_align", "tool_acc", "arg_acc", "answer_acc"],
            "counts": ["tool_call", "tool_call_error"],
        }
        return ScoreReport(
            benchmark=self.benchmark,
            metrics=metrics,
            n_items=len(items),
            details=details,
            items=items,
        )

    def _score_step_item(
        self, query: GTAQuery, steps: list[dict[str, Any]], where: str
    ) -> ItemScore:
        s = dict.fromkeys(
            (
                "inst_align",
                "tool_acc",
                "arg_acc",
                "tool_call",
                "tool_call_error",
                "gold_tool_steps",
            ),
            0,
        )
        answer: float | None = None
        prediction: str | None = None
        trace: list[dict[str, Any]] = []
        for i, gold_msg in enumerate(query.gold_turns):
            gold_kind, gold_val = message_kind(gold_msg, f"{query.where} assistant turn {i}")
            if gold_kind == "tool":
                s["gold_tool_steps"] += 1
            if i >= len(steps):
                trace.append({"gold": _describe(gold_kind, gold_val), "pred": None})
                continue
            pred = steps[i]
            pred_kind, pred_val = message_kind(pred, f"{where} step {i}")
            error = has_error(pred)
            step: dict[str, Any] = {
                "gold": _describe(gold_kind, gold_val),
                "pred": _describe(pred_kind, pred_val),
            }
            if pred_kind == gold_kind and not error:
                s["inst_align"] += 1
            if pred_kind == "tool":
                s["tool_call"] += 1
                s["tool_call_error"] += int(error)
            if pred_kind == gold_kind == "tool" and pred_val.name == gold_val.name:
                s["tool_acc"] += 1
                same = normalize_arguments(pred_val.arguments, query.files) == (
                    normalize_arguments(gold_val.arguments, query.files)
                )
                s["arg_acc"] += int(same)
                step["arguments_equal"] = same
            elif pred_kind == gold_kind == "answer":
                prediction = pred_val
                if query.has_text_answer:
                    value = self.answer_score(pred_val, query.gt_answer)
                    answer = (answer or 0.0) + value
                    step["answer_score"] = value
            trace.append(step)
        if query.has_text_answer and answer is None:
            answer = 0.0
        scores: dict[str, float | int | None] = {**s, "answer_acc": answer}
        scores["answer_counted"] = int(query.has_text_answer)
        scores["missing_steps"] = max(0, len(query.gold_turns) - len(steps))
        return ItemScore(
            id=query.id,
            scores=scores,
            prediction=prediction,
            details={"answer_kind": query.answer_kind, "steps": trace},
        )

    # e2e mode, official
    def _score_e2e(
        self, gold: dict[str, GTAQuery], predictions: dict[str, tuple[str, list[dict[str, Any]]]]
    ) -> ScoreReport:
        items = []
        for qid, query in gold.items():
            where, dialog = predictions.get(qid, ("", []))
            items.append(self._score_e2e_item(query, dialog, where))
        n_text = sum(1 for q in gold.values() if q.has_text_answer)
        metrics: dict[str, float] = {
            "answer_acc": percent(_total(items, "answer_acc"), n_text),
            "answer_acc_w_imggen": percent(_total(items, "answer_acc_w_imggen"), len(items)),
            "tool_call": int(_total(items, "tool_call")),
            "tool_call_error": int(_total(items, "tool_call_error")),
        }
        no_gold = []
        for category, p in _PREFIX.items():
            hits = _total(items, f"{p}_hit")
            predicted = _total(items, f"{p}_pred")
            gold_calls = _total(items, f"{p}_gold")
            if not gold_calls:
                # GTA's evaluator always reports all four F1s; with no gold call in a
                # category it has no hit, so precision is 0, recall is taken as 0 and the F1
                # is 0. details.categories_without_gold_calls says why.
                no_gold.append(category)
            precision = hits / (predicted + _F1_EPS)
            recall = hits / gold_calls if gold_calls else 0.0
            f1 = 2 * precision * recall / (precision + recall + _F1_EPS)
            metrics[f"{p}_f1"] = 100.0 * f1
            metrics[f"{p}_precision"] = 100.0 * precision
            metrics[f"{p}_recall"] = 100.0 * recall
        details: dict[str, Any] = {
            "queries": len(items),
            "queries_with_text_answer": n_text,
            "counts": ["tool_call", "tool_call_error"],
            "categories": {c: list(t) for c, t in TOOL_CATEGORIES.items()},
        }
        if no_gold:
            details["categories_without_gold_calls"] = no_gold
        return ScoreReport(
            benchmark=self.benchmark,
            metrics=metrics,
            n_items=len(items),
            details=details,
            items=items,
        )

    def _score_e2e_item(
        self, query: GTAQuery, dialog: list[dict[str, Any]], where: str
    ) -> ItemScore:
        answer = _final_answer(dialog, where)
        scores: dict[str, float | int | None] = {}
        if query.has_text_answer:
            scores["answer_acc"] = self.answer_score(answer, query.gt_answer) if answer else 0.0
            scores["answer_acc_w_imggen"] = scores["answer_acc"]
        else:
            scores["answer_acc"] = None
            scores["answer_acc_w_imggen"] = self._image_generation_score(query, dialog, where)
        calls: list[ToolCallView] = []
        errors = 0
        for i, message in enumerate(dialog):
            call = first_call(message, f"{where} message {i}")
            if call is not None:
                calls.append(call)
                errors += int(has_error(message))
        scores["tool_call"], scores["tool_call_error"] = len(calls), errors
        predicted_names = {c.name for c in calls}
        counts = {f"{p}_{k}": 0 for p in _PREFIX.values() for k in ("pred", "gold", "hit")}
        for c in calls:
            if (category := CATEGORY_OF.get(c.name)) is not None:
                counts[f"{_PREFIX[category]}_pred"] += 1
        uncategorized: list[str] = []
        for gold_call in query.gold_calls():
            category = CATEGORY_OF.get(gold_call.name)
            if category is None:
                uncategorized.append(gold_call.name)
                continue
            counts[f"{_PREFIX[category]}_gold"] += 1
            counts[f"{_PREFIX[category]}_hit"] += int(gold_call.name in predicted_names)
        scores.update(counts)
        details: dict[str, Any] = {
            "answer_kind": query.answer_kind,
            "ended_with_answer": bool(answer),
            "predicted_tools": [c.name for c in calls],
        }
        if uncategorized:
            details["gold_tools_outside_categories"] = uncategorized
        return ItemScore(id=query.id, scores=scores, prediction=answer, details=details)

    def _image_generation_score(
        self, query: GTAQuery, dialog: list[dict[str, Any]], where: str
    ) -> float:
        last_args: dict[str, Any] = {}
        for i, message in enumerate(dialog):
            call = first_call(message, f"{where} message {i}")
            if call is not None and not has_error(message) and call.name in IMAGE_GENERATION_TOOLS:
                last_args[call.name] = call.arguments
        score = 1.0
        for gold_call in query.gold_calls():
            if gold_call.name not in IMAGE_GENERATION_TOOLS:
                continue
            if gold_call.name not in last_args:
                return 0.0
            predicted = _in_key_order(last_args[gold_call.name], gold_call.arguments)
            score *= self.embedder.similarity(
                self._arguments_json(gold_call.arguments, query.files),
                self._arguments_json(predicted, query.files),
            )
        return score

    # MAT protocol
    def _score_mat(
        self, gold: dict[str, GTAQuery], predictions: dict[str, tuple[str, list[dict[str, Any]]]]
    ) -> ScoreReport:
        items = []
        for qid, query in gold.items():
            if query.answer_kind != "objective":
                continue
            where, messages = predictions.get(qid, ("", []))
            if self.mode == "e2e":
                answer = _final_answer(messages, where)
            else:
                answer = self._step_final_answer(query, messages, where)
            correct = bool(answer) and mat_correct(answer or "", query.gt_answer)
            items.append(
                ItemScore(
                    id=qid,
                    scores={"mat_answer_acc": float(correct)},
                    prediction=answer,
                    details={"answer_kind": query.answer_kind},
                )
            )
        skipped = sum(1 for q in gold.values() if q.answer_kind != "objective")
        return ScoreReport(
            benchmark=self.benchmark,
            metrics={"mat_answer_acc": percent(_total(items, "mat_answer_acc"), len(items))},
            n_items=len(items),
            details={
                "rule": "every whitelist group has an alias that is a case-insensitive "
                "substring of the answer (MAT/MATRIX protocol; not GTA's official scorer)",
                "objective_queries": len(items),
                "queries_not_scored": skipped,
            },
            items=items,
        )

    def _step_final_answer(
        self, query: GTAQuery, steps: list[dict[str, Any]], where: str
    ) -> str | None:
        """The predicted message at the last gold answer turn, if it is an answer."""
        for i in range(len(query.gold_turns) - 1, -1, -1):
            kind, _ = message_kind(query.gold_turns[i], query.where)
            if kind == "answer":
                if i >= len(steps):
                    return None
                pred_kind, text = message_kind(steps[i], f"{where} step {i}")
                return text if pred_kind == "answer" else None
        return None


def _check_step_count(query: GTAQuery, steps: list[dict[str, Any]], where: str) -> None:
    if len(steps) > len(query.gold_turns):
        raise ScoringInputError(
            f"{where}: query {query.id!r} has {len(steps)} predicted steps but its gold "
            f"dialog has {len(query.gold_turns)} assistant turns; step mode takes one "
            "predicted assistant message per gold assistant turn"
        )


def _final_answer(dialog: list[dict[str, Any]], where: str) -> str | None:
    """The answer a dialog ends with; None if it ends in a tool call or tool output."""
    if not dialog:
        return None
    kind, value = message_kind(dialog[-1], f"{where} message {len(dialog) - 1}")
    return value if kind == "answer" and value else None


def _in_key_order(arguments: Any, reference: Any) -> Any:
    """``arguments`` with the keys ``reference`` has first, in its order, then the others.

    The JSON texts compared for image generation depend on key order, which says nothing
    about the call (and stored trajectories keep their arguments with sorted keys): equal
    arguments must give equal texts.
    """
    if not isinstance(arguments, dict) or not isinstance(reference, dict):
        return arguments
    ordered = {k: arguments[k] for k in reference if k in arguments}
    ordered.update((k, v) for k, v in arguments.items() if k not in ordered)
    return ordered


def _describe(kind: MessageKind, value: Any) -> str:
    return f"tool:{value.name}" if kind == "tool" else kind


def _total(items: list[ItemScore], key: str) -> float:
    return sum(float(v) for item in items if (v := item.scores.get(key)) is not None)


def _opencompass_rows(path: Path) -> dict[str, Any] | None:
    """The rows of an OpenCompass prediction file (``{"0": {origin_prompt, prediction,
    gold}, ...}``), or None when ``path`` is something else (JSON lines)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if (
        isinstance(data, dict)
        and data
        and all(isinstance(v, dict) and "prediction" in v for v in data.values())
    ):
        return data
    return None


def _opencompass_messages(value: Any, mode: Mode, where: str) -> list[dict[str, Any]]:
    # e2e ("every"): GTA's evaluator reads preds[0] as the dialog; step ("every_with_gt"): the
    # list itself holds one assistant message per gold assistant turn.
    if mode == "e2e" and isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        shape = "[[message, ...]] (the dialog)" if mode == "e2e" else "[assistant message, ...]"
        raise ScoringInputError(
            f"{where}: 'prediction' must be {shape} in {mode} mode, got "
            f"{type(value).__name__}; was the file made by GTA's OpenCompass config for this "
            "mode (every = e2e, every_with_gt = step)?"
        )
    return value


def load_opencompass_predictions(
    path: str | Path, mode: Mode, gold_ids: Sequence[str] | None = None
) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """GTA predictions as OpenCompass writes them (``predictions/MODEL/gta_bench.json``):
    ``{"0": {"origin_prompt", "prediction", "gold"}, ...}``, keyed by the row's position in
    ``dataset.json`` (OpenCompass numbers rows in file order), which ``gold_ids`` (the gold
    ids in file order) turns back into GTA ids."""
    path = Path(path)
    rows = _opencompass_rows(path)
    if rows is None:
        raise ScoringInputError(
            f'{path}: not an OpenCompass prediction file ({{"0": {{"origin_prompt", '
            '"prediction", "gold"}, ...})'
        )
    out: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for key, row in rows.items():
        where = f"{path}[{key!r}]"
        qid = str(key)
        if gold_ids is not None:
            if not str(key).isdigit() or int(key) >= len(gold_ids):
                raise ScoringInputError(
                    f"{where}: OpenCompass numbers rows 0..{len(gold_ids) - 1} in the order of "
                    "dataset.json; this key is not one of them (score against the dataset.json "
                    "the predictions were made for)"
                )
            qid = gold_ids[int(key)]
        out[qid] = (where, _opencompass_messages(row["prediction"], mode, where))
    return out


def load_gta_predictions(
    path: str | Path, mode: Mode, gold_ids: Sequence[str] | None = None
) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Predictions keyed by query id: (location for errors, list of messages).

    Reads tracetune's JSON lines (``{"id", "steps"|"dialog"}``) or GTA's OpenCompass
    prediction file (see ``load_opencompass_predictions``)."""
    if _opencompass_rows(Path(path)) is not None:
        return load_opencompass_predictions(path, mode, gold_ids)
    key = "steps" if mode == "step" else "dialog"
    hint = (
        'step mode wants {"id", "steps": [assistant message per gold assistant turn]}'
        if mode == "step"
        else 'e2e mode wants {"id", "dialog": [message, ...]}'
    )
    rows = [(f"{path}:{n}", row) for n, row in read_jsonl(path, "GTA predictions")]
    out: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for qid, (where, row) in index_unique(rows, "id", "query", hint).items():
        messages = require(row, key, where, hint)
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ScoringInputError(f"{where}: {key!r} must be a list of message objects")
        out[qid] = (where, messages)
    return out


def score_gta(
    gold: str | Path,
    predictions: str | Path,
    mode: Mode = "step",
    protocol: Protocol = "official",
    embedder: SentenceEmbedder | str = "auto",
) -> ScoreReport:
    """Score a GTA predictions file against GTA's ``dataset.json``."""
    return GTAScorer(mode, protocol, embedder).score_files(gold, predictions)
