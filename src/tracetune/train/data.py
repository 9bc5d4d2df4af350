"""Training rows from tracetune datasets, checked against the model before any step runs.

SFT rows are TRL conversational rows (``messages`` with ``{"type": "image"}`` placeholders,
``images`` as file paths in placeholder order) plus what TRL does not know about agents:

- ``train_turns``: one flag per assistant turn. A step whose action failed (no parsable
  action, unknown tool, bad arguments, a raising tool) stays in the context, so the model
  learns to recover from the error message, but gets no loss, so it does not learn to make
  the mistake.
- ``length``: the tokenized length with images expanded, from the check below, so batches
  can be grouped by length (less padding).

The rows carry no ``tools`` column on purpose: the agent's system prompt already lists the
tools, and the agent calls the model without a ``tools`` argument, so training renders
exactly what inference renders.

:func:`check_sft_rows` / :func:`check_pair_rows` process every sample once, the way the
collator will, and stop with an error naming the record when its image placeholders, image
tokens and image features disagree; samples longer than ``max_length`` are reported and
dropped, or (SFT) cut after the last assistant turn that fits, never inside an image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tracetune.errors import TracetuneError
from tracetune.formats.chat import (
    ChatFormatError,
    asset_loader,
    check_chat,
    dialogue_chat,
    pair_chat,
    trajectory_chat,
)
from tracetune.formats.selection import NOTHING_TO_TRAIN, skip_reason, trained_steps
from tracetune.schema import Dialogue, PreferencePair, Trajectory
from tracetune.store import Dataset, DatasetError
from tracetune.train.families import (
    IMAGE_TOKEN_COUNTERS,
    image_token_id,
    image_token_strings,
)

log = logging.getLogger(__name__)

Row = dict[str, Any]
Overlong = Literal["drop", "truncate"]


class TrainingDataError(TracetuneError, ValueError):
    """Training data that would crash or silently corrupt training; names the records."""


@dataclass
class DataReport:
    """What the checks did to a dataset: kept, dropped and truncated samples, token counts."""

    records: int = 0
    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(record id, why) for records not turned into rows (e.g. unfinished trajectories)."""
    dropped: list[tuple[str, str]] = field(default_factory=list)
    """(record id, why) for rows removed by the checks (over-long)."""
    truncated: list[tuple[str, int, int]] = field(default_factory=list)
    """(record id, assistant turns kept, assistant turns before) for rows cut at a turn."""
    lengths: list[int] = field(default_factory=list)
    images: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.records} records kept"]
        if self.lengths:
            ordered = sorted(self.lengths)
            parts.append(
                f"tokens per sample: median {ordered[len(ordered) // 2]}, max {ordered[-1]}"
            )
        parts.append(f"{self.images} images")
        if self.trained_tokens:
            parts.append(f"{self.trained_tokens} tokens with loss")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped as over-long")
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated at a turn boundary")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "kept": self.kept,
            "skipped": [{"id": i, "why": w} for i, w in self.skipped],
            "dropped": [{"id": i, "why": w} for i, w in self.dropped],
            "truncated": [{"id": i, "turns_kept": k, "turns": n} for i, k, n in self.truncated],
            "images": self.images,
            "trained_tokens": self.trained_tokens,
            "max_length_seen": max(self.lengths, default=0),
        }


# -- rows from records ---------------------------------------------------------------------
def _open(path: Path) -> Dataset[Any]:
    try:
        return Dataset.open(path)
    except DatasetError as exc:
        raise TrainingDataError(str(exc)) from exc


def _end_on_assistant(messages: list[Row], images: list[Any]) -> tuple[list[Row], list[Any]]:
    """Drop trailing non-assistant turns (e.g. the final answer's echo) and their images."""
    end = len(messages)
    while end and messages[end - 1]["role"] != "assistant":
        end -= 1
    dropped = sum(1 for m in messages[end:] for p in m["content"] if p.get("type") == "image")
    return messages[:end], images[: len(images) - dropped]


def trajectory_row(traj: Trajectory, dataset: Dataset[Any], mask_failed_steps: bool) -> Row:
    chat = trajectory_chat(traj, asset_loader(dataset.assets, as_pil=False))
    messages, images = _end_on_assistant(chat["messages"], chat["images"])
    turns = trained_steps(traj, mask_failed_steps=mask_failed_steps)
    return {"id": traj.id, "messages": messages, "images": images, "train_turns": turns}


def dialogue_row(dialogue: Dialogue, dataset: Dataset[Any]) -> Row:
    chat = dialogue_chat(dialogue, asset_loader(dataset.assets, as_pil=False))
    messages, images = _end_on_assistant(chat["messages"], chat["images"])
    turns = [True] * sum(1 for m in messages if m["role"] == "assistant")
    return {"id": dialogue.id, "messages": messages, "images": images, "train_turns": turns}


def pair_row(pair: PreferencePair, dataset: Dataset[Any]) -> Row:
    chat = pair_chat(pair, asset_loader(dataset.assets, as_pil=False))
    return {
        "id": pair.id,
        "prompt": chat["prompt"],
        "chosen": chat["chosen"],
        "rejected": chat["rejected"],
        "images": chat["images"],
    }


def sft_rows(
    paths: Sequence[str | Path],
    *,
    only_completed: bool = True,
    mask_failed_steps: bool = True,
    report: DataReport | None = None,
) -> list[Row]:
    """SFT rows from trajectory and/or dialogue datasets.

    Args:
        paths: Dataset directories holding ``trajectory`` or ``dialogue`` records.
        only_completed: Skip trajectories that did not end in a final answer or whose
            verdict failed (:func:`tracetune.formats.selection.skip_reason`).
        mask_failed_steps: No loss on assistant turns whose step failed (see module doc).
        report: Collects skipped records and counts.
    """
    report = report if report is not None else DataReport()
    rows: list[Row] = []
    for path in paths:
        dataset = _open(Path(path))
        kind = dataset.record_type.kind
        if kind not in ("trajectory", "dialogue"):
            hint = " (use `tracetune train dpo --pairs` for pairs)" if kind == "pair" else ""
            raise TrainingDataError(
                f"{path} holds {kind} records; SFT trains on trajectory or dialogue datasets{hint}"
            )
        for record in dataset:
            report.records += 1
            try:
                if isinstance(record, Trajectory):
                    if why := skip_reason(record, only_completed=only_completed):
                        report.skipped.append((record.id, why))
                        continue
                    row = trajectory_row(record, dataset, mask_failed_steps)
                else:
                    row = dialogue_row(record, dataset)
            except ChatFormatError as exc:
                raise TrainingDataError(f"{path}: {exc}") from exc
            if not any(row["train_turns"]):
                report.skipped.append((record.id, NOTHING_TO_TRAIN))
                continue
            rows.append(row)
    return rows


def pair_rows(paths: Sequence[str | Path], report: DataReport | None = None) -> list[Row]:
    """DPO rows (``prompt``/``chosen``/``rejected``/``images``) from pair datasets."""
    report = report if report is not None else DataReport()
    rows: list[Row] = []
    for path in paths:
        dataset = _open(Path(path))
        if dataset.record_type is not PreferencePair:
            raise TrainingDataError(
                f"{path} holds {dataset.record_type.kind} records; DPO trains on pair datasets "
                "(written by the preference stage)"
            )
        for pair in dataset:
            report.records += 1
            try:
                rows.append(pair_row(pair, dataset))
            except ChatFormatError as exc:
                raise TrainingDataError(f"{path}: {exc}") from exc
    return rows


# -- checks against the processor and the model --------------------------------------------
def _load_images(row: Row) -> list[Any]:
    from tracetune.models.base import load_image

    out = []
    for image in row["images"]:
        try:
            out.append(load_image(image))
        except (OSError, TypeError, ValueError) as exc:
            raise TrainingDataError(
                f"record {row['id']}: cannot read image {image}: {exc}"
            ) from exc
    return out


def _texts(messages: list[Row]) -> Iterator[tuple[int, str]]:
    for i, m in enumerate(messages):
        content = m["content"]
        if isinstance(content, str):
            yield i, content
            continue
        for part in content:
            if part.get("type") == "text" and part.get("text"):
                yield i, part["text"]


def mask_spans(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    spans, start = [], None
    for i, v in enumerate(mask):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(mask)))
    return spans


@dataclass
class _Checker:
    """Processes samples as the collators will and checks image tokens against the model."""

    processor: Any
    model_config: Any
    chat_template: str | None = None

    def __post_init__(self) -> None:
        self.model_type = getattr(self.model_config, "model_type", "")
        self.counter = IMAGE_TOKEN_COUNTERS.get(self.model_type)
        self.image_token = image_token_id(self.model_config, self.processor)
        self.literal_tokens = image_token_strings(self.processor)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if self.counter is None:
            log.warning(
                "no image-token arithmetic for model type %r: placeholders and literal image "
                "tokens are checked, image features only when the first batch runs",
                self.model_type,
            )

    def check_text(self, record_id: str, messages: list[Row], images: list[Any]) -> None:
        try:
            check_chat({"messages": messages, "images": images}, record_id)
        except ChatFormatError as exc:
            raise TrainingDataError(str(exc)) from exc
        for index, text in _texts(messages):
            for token in self.literal_tokens:
                if token in text:
                    raise TrainingDataError(
                        f"record {record_id}: message {index} ({messages[index]['role']}) "
                        f"contains the literal image token {token!r} in its text, which the "
                        "processor would expand as an image; remove or escape it in the record"
                    )

    def check_image_tokens(
        self, record_id: str, ids: list[int], inputs: dict[str, Any], n_images: int
    ) -> None:
        if self.image_token is None:
            return
        found = ids.count(self.image_token)
        if self.counter is None:
            if n_images == 0 and found:
                raise TrainingDataError(
                    f"record {record_id}: {found} image tokens in the text but no images"
                )
            return
        expected = self.counter(self.model_config, inputs)
        if found != expected:
            raise TrainingDataError(
                f"record {record_id}: the tokenized sample holds {found} image tokens but its "
                f"{n_images} image(s) give {expected} image features for this "
                f"{self.model_type} model; the processor's settings (patch size, merge size, "
                "image size, image_seq_len) must match the model config"
            )

    def encode_chat(self, messages: list[Row], images: list[Any]) -> dict[str, Any]:
        from trl.data_utils import prepare_multimodal_messages

        prepared = prepare_multimodal_messages(messages, images=images)
        return dict(
            self.processor.apply_chat_template(
                prepared,
                chat_template=self.chat_template,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                return_assistant_tokens_mask=True,
                processor_kwargs={"add_special_tokens": False, "padding": False},
            )
        )


def _cut(row: Row, keep_turns: int) -> Row:
    """The row up to and including its ``keep_turns``-th assistant message."""
    seen, end = 0, 0
    for i, m in enumerate(row["messages"]):
        if m["role"] == "assistant":
            seen += 1
            if seen == keep_turns:
                end = i + 1
                break
    messages = row["messages"][:end]
    n_images = sum(1 for m in messages for p in m["content"] if p.get("type") == "image")
    return {
        **row,
        "messages": messages,
        "images": row["images"][:n_images],
        "train_turns": row["train_turns"][:keep_turns],
    }


def check_sft_rows(
    rows: list[Row],
    processor: Any,
    model_config: Any,
    *,
    max_length: int,
    overlong: Overlong = "drop",
    chat_template: str | None = None,
    report: DataReport | None = None,
) -> list[Row]:
    """Verify every row against the processor and the model; returns the rows to train on.

    Raises :class:`TrainingDataError` (listing the records) when placeholders, image tokens or
    image features disagree, or when the chat template does not mark exactly one span per
    assistant turn. Over-long rows are dropped, or with ``overlong="truncate"`` cut after
    the last assistant turn that fits (never inside an image, since images sit in user
    turns before it). Adds a ``length`` column.
    """
    report = report if report is not None else DataReport()
    checker = _Checker(processor, model_config, chat_template)
    errors: list[str] = []
    kept: list[Row] = []
    for row in rows:
        try:
            checked = _check_sft_row(row, checker, max_length, overlong, report)
        except TrainingDataError as exc:
            errors.append(str(exc))
            continue
        if checked is not None:
            kept.append(checked)
    _raise_if(errors)
    report.kept = len(kept)
    return kept


def _check_sft_row(
    row: Row,
    checker: _Checker,
    max_length: int,
    overlong: Overlong,
    report: DataReport,
    quiet: bool = False,
) -> Row | None:
    checker.check_text(row["id"], row["messages"], row["images"])
    images = _load_images(row)
    enc = checker.encode_chat(row["messages"], images)
    ids = enc["input_ids"][0].tolist()
    checker.check_image_tokens(row["id"], ids, enc, len(images))
    spans = mask_spans(enc["assistant_masks"][0].tolist())
    if len(spans) != len(row["train_turns"]):
        raise TrainingDataError(
            f"record {row['id']}: the chat template marks {len(spans)} assistant spans for "
            f"{len(row['train_turns'])} assistant turns; its {{% generation %}} markers must "
            "wrap each assistant message once"
        )
    length = len(ids)
    if length > max_length:
        # Candidate cuts: after each assistant turn that ends within the budget, latest first.
        fits = [i + 1 for i, (_, end) in enumerate(spans) if end <= max_length]
        if overlong == "truncate":
            for keep in reversed(fits):
                cut = _cut(row, keep)
                if not any(cut["train_turns"]):
                    break
                checked = _check_sft_row(cut, checker, max_length, "drop", report, quiet=True)
                if checked is not None:
                    report.truncated.append((row["id"], keep, len(spans)))
                    return checked
        if not quiet:
            why = f"{length} tokens > max_length {max_length}"
            report.dropped.append((row["id"], why))
            log.warning("dropping record %s: %s", row["id"], why)
        return None
    report.lengths.append(length)
    report.images += len(images)
    report.trained_tokens += sum(
        e - s for (s, e), t in zip(spans, row["train_turns"], strict=True) if t
    )
    return {**row, "length": length}


def check_pair_rows(
    rows: list[Row],
    processor: Any,
    model_config: Any,
    *,
    max_length: int,
    report: DataReport | None = None,
) -> list[Row]:
    """Verify DPO rows as :func:`check_sft_rows` does; over-long pairs are dropped."""
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    report = report if report is not None else DataReport()
    checker = _Checker(processor, model_config)
    tokenizer = checker.tokenizer
    errors: list[str] = []
    kept: list[Row] = []
    for row in rows:
        try:
            checker.check_text(row["id"], row["prompt"], row["images"])
            for key in ("chosen", "rejected"):
                checker.check_text(row["id"], row[key], [])
            images = _load_images(row)
            example = apply_chat_template(
                {
                    "prompt": prepare_multimodal_messages(row["prompt"], images=images),
                    "chosen": prepare_multimodal_messages(row["chosen"]),
                    "rejected": prepare_multimodal_messages(row["rejected"]),
                },
                processor,
            )
            enc = dict(
                processor(
                    images=[images] if images else None,
                    text=[example["prompt"]],
                    add_special_tokens=False,
                    return_tensors="pt",
                )
            )
            ids = enc["input_ids"][0].tolist()
            checker.check_image_tokens(row["id"], ids, enc, len(images))
            completion = [
                len(tokenizer(example[k], add_special_tokens=False)["input_ids"])
                for k in ("chosen", "rejected")
            ]
            if min(completion) == 0:
                raise TrainingDataError(f"record {row['id']}: empty chosen or rejected step")
        except TrainingDataError as exc:
            errors.append(str(exc))
            continue
        length = len(ids) + max(completion)
        if length > max_length:
            why = f"{length} tokens > max_length {max_length}"
            report.dropped.append((row["id"], why))
            log.warning("dropping pair %s: %s", row["id"], why)
            continue
        report.lengths.append(length)
        report.images += len(images)
        kept.append({**row, "length": length})
    _raise_if(errors)
    report.kept = len(kept)
    return kept


def _raise_if(errors: list[str], shown: int = 10) -> None:
    if not errors:
        return
    more = f"\n... and {len(errors) - shown} more" if len(errors) > shown else ""
    raise TrainingDataError(
        f"{len(errors)} record(s) cannot be trained on; fix or remove them:\n"
        + "\n".join(f"- {e}" for e in errors[:shown])
        + more
    )
