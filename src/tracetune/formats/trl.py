"""TRL's conversational formats: ``messages`` for SFT, ``prompt``/``chosen``/``rejected`` for DPO.

Rows hold the chat exactly as tracetune's agent renders it (system prompt with the tools,
the task with its images, each step's text and observation), with ``{"type": "image"}``
placeholders whose images are listed, in order, as paths in ``images``. ``tools`` is the
tools' JSON schemas as a JSON string: Arrow cannot store schemas of different shapes in one
column without padding them with nulls, and TRL's trainers decode a string ``tools`` value
themselves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from tracetune.formats.chat import tool_schemas
from tracetune.formats.registry import (
    DATA_FILE,
    Exporter,
    ExportReport,
    FormatError,
    ImportContext,
    Importer,
    MediaWriter,
    register_exporter,
    register_importer,
)
from tracetune.formats.turns import (
    PendingMedia,
    Turn,
    convert_chat,
    pair_turns,
    parse_call,
    record_turns,
    task_attachments,
    tool_names,
    turns_to_pair,
)
from tracetune.schema import Dialogue, PreferencePair, Record, Trajectory


def _messages(turns: list[Turn], media: MediaWriter) -> tuple[list[dict[str, Any]], list[str]]:
    messages, images = [], []
    for turn in turns:
        content: list[dict[str, Any]] = []
        for part in turn.parts:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            else:
                content.append({"type": "image"})
                images.append(media.image(part))  # type: ignore[arg-type]
        messages.append({"role": turn.role, "content": content})
    return messages, images


def _tools(record: Trajectory | PreferencePair | Dialogue) -> str:
    if isinstance(record, Dialogue):
        return "[]"
    return json.dumps(tool_schemas(record.tools or record.task.tools), ensure_ascii=False)


_LOADING = """\
```python
import datasets
from tracetune.formats import load_trl_dataset

ds = load_trl_dataset("{out}")  # images as PIL images, paths resolved against this folder
# the same with datasets alone:
# ds = datasets.load_dataset("json", data_files="{out}/{data}", split="train")
# ds = ds.map(lambda r: {{"images": ["{out}/" + p for p in r["images"]]}})
# ds = ds.cast_column("images", datasets.List(datasets.Image()))
```
"""


@register_exporter("trl-sft")
class TrlSftExporter(Exporter):
    """TRL SFT rows: ``messages``, ``images`` (paths), ``tools`` (JSON string)."""

    description: ClassVar[str] = "TRL conversational SFT rows (messages, images, tools)"
    record_kinds: ClassVar[tuple[str, ...]] = ("trajectory", "dialogue")

    def row(self, record: Record, media: MediaWriter) -> dict[str, Any]:
        assert isinstance(record, Trajectory | Dialogue)
        messages, images = _messages(record_turns(record, structured=False), media)
        return {
            "id": record.id,
            "messages": messages,
            "images": images,
            "tools": _tools(record),
            "files": [media.file(f) for f in task_attachments(record)],
        }

    def readme(self, report: ExportReport) -> str:
        return f"""# {report.rows} tracetune {report.record_type} records for TRL SFT

`{DATA_FILE}`: one conversational row per record: `messages` (system prompt with the tools,
the task with its images, then each step's assistant text and its observation as a user
turn), `images` (paths relative to this folder, in the order of the `{{"type": "image"}}`
placeholders), `tools` (the tools' JSON schemas as a JSON string), `id`, and `files`
(non-image attachments, kept so `tracetune import --format trl-sft` restores the records).
Rows end on the last assistant turn.

{_LOADING.format(out=report.out_dir, data=DATA_FILE)}
Train with `trl.SFTTrainer(model, train_dataset=ds, processing_class=processor,
args=SFTConfig(assistant_only_loss=True, max_length=None, ...))` (or `tracetune train sft`):
loss belongs on the assistant turns only, which needs a chat template with
`{{% generation %}}` markers. TRL's vision collator renders the chat without `tools`; the
system prompt already lists them, exactly as the agent sees them at inference.
"""


@register_exporter("trl-dpo")
class TrlDpoExporter(Exporter):
    """TRL DPO rows: ``prompt`` (the shared episode prefix), ``chosen``, ``rejected``."""

    description: ClassVar[str] = "TRL conversational preference rows (prompt, chosen, rejected)"
    record_kinds: ClassVar[tuple[str, ...]] = ("pair",)

    def row(self, record: Record, media: MediaWriter) -> dict[str, Any]:
        assert isinstance(record, PreferencePair)
        prompt, chosen, rejected = pair_turns(record, structured=False)
        messages, images = _messages(prompt, media)
        return {
            "id": record.id,
            "prompt": messages,
            "chosen": _messages([chosen], media)[0],
            "rejected": _messages([rejected], media)[0],
            "images": images,
            "tools": _tools(record),
            "files": [media.file(f) for f in task_attachments(record)],
        }

    def readme(self, report: ExportReport) -> str:
        return f"""# {report.rows} tracetune step-wise preference pairs for TRL DPO

`{DATA_FILE}`: one row per pair: `prompt` (system prompt, task with images, and the steps
committed before the fork, ending on the last observation), `chosen` and `rejected` (one
assistant turn each: the next step), `images` (paths relative to this folder, in placeholder
order), `tools` (JSON string), `id`, `files`.

{_LOADING.format(out=report.out_dir, data=DATA_FILE)}
Train with `trl.DPOTrainer(model, train_dataset=ds, processing_class=processor,
args=DPOConfig(max_length=None, ...))` (or `tracetune train dpo`), starting from the SFT
checkpoint (merge its LoRA adapter first: with `peft_config` the reference model is the base
with the adapter disabled).
"""


# -- import -----------------------------------------------------------------------------------
def _image_path(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return value["path"]  # a datasets Image cell
    raise FormatError(f"images must be file paths, got {type(value).__name__}")


def trl_turns(messages: Any, images: list[PendingMedia]) -> list[Turn]:
    """TRL messages (string or part-list content, optional ``tool_calls``) as turns."""
    if not isinstance(messages, list):
        raise FormatError("messages must be a list of {role, content} objects")
    turns = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant", "tool"):
            raise FormatError(f"unknown role {role!r}: use system, user, assistant or tool")
        content = m.get("content")
        parts: list[Any] = []
        if isinstance(content, str):
            parts = [content]
        elif isinstance(content, list):
            for p in content:
                if p.get("type") == "image":
                    if not images:
                        raise FormatError("more image placeholders than images")
                    parts.append(images.pop(0))
                elif p.get("type") == "text":
                    parts.append(p.get("text") or "")
                else:
                    raise FormatError(f"unsupported content part type {p.get('type')!r}")
        elif content is not None:
            raise FormatError("message content must be a string or a list of parts")
        calls = m.get("tool_calls") or []
        if calls:
            if len(calls) != 1:
                raise FormatError("an assistant turn with several tool calls")
            fn = calls[0].get("function", calls[0])
            arguments = fn.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            _, call = parse_call(
                f'{{"name": {json.dumps(fn.get("name"))}, "arguments": {arguments}}}'
            )
            thought = "".join(p for p in parts if isinstance(p, str))
            turns.append(Turn(role="assistant", call=call, thought=thought))
        else:
            turns.append(Turn(role=role, parts=parts))
    return turns


def _pending(row: dict[str, Any]) -> tuple[list[PendingMedia], list[PendingMedia]]:
    images = [PendingMedia(_image_path(v)) for v in row.get("images") or []]
    if row.get("image") is not None and not images:
        images = [PendingMedia(_image_path(row["image"]))]
    files = [PendingMedia(_image_path(v), "file") for v in row.get("files") or []]
    return images, files


@register_importer("trl-sft")
class TrlSftImporter(Importer):
    """TRL conversational SFT rows back into trajectories (or dialogues)."""

    description: ClassVar[str] = "TRL conversational SFT rows (messages, images, tools)"
    record_kinds: ClassVar[tuple[str, ...]] = ("trajectory", "dialogue")

    def kind_of(self, row: dict[str, Any]) -> Literal["chat", "pair"]:
        if "messages" not in row:
            raise FormatError("a TRL SFT row needs a messages column")
        return "chat"

    def convert(self, row: dict[str, Any], ctx: ImportContext, want: str, record_id: str) -> Record:
        images, files = _pending(row)
        turns = trl_turns(row["messages"], images)
        if images:
            raise FormatError(f"{len(images)} more images than image placeholders")
        return convert_chat(turns, tool_names(row.get("tools")), files, record_id, ctx, want)


@register_importer("trl-dpo")
class TrlDpoImporter(Importer):
    """TRL conversational preference rows back into step-wise preference pairs."""

    description: ClassVar[str] = "TRL conversational preference rows (prompt, chosen, rejected)"
    record_kinds: ClassVar[tuple[str, ...]] = ("pair",)

    def kind_of(self, row: dict[str, Any]) -> Literal["chat", "pair"]:
        if not all(k in row for k in ("prompt", "chosen", "rejected")):
            raise FormatError("a TRL preference row needs prompt, chosen and rejected columns")
        return "pair"

    def convert(self, row: dict[str, Any], ctx: ImportContext, want: str, record_id: str) -> Record:
        images, files = _pending(row)
        prompt = trl_turns(row["prompt"], images)
        if images:
            raise FormatError(f"{len(images)} more images than image placeholders")
        chosen, rejected = trl_turns(row["chosen"], []), trl_turns(row["rejected"], [])
        if len(chosen) != 1 or len(rejected) != 1:
            raise FormatError("chosen and rejected must be one assistant turn each")
        return turns_to_pair(
            prompt, chosen[0], rejected[0], tool_names(row.get("tools")), files, record_id, ctx
        )


def load_trl_dataset(export_dir: str | os.PathLike[str], split: str = "train") -> Any:
    """A ``trl-sft``/``trl-dpo`` export as a ``datasets.Dataset`` with images decoded.

    Image paths are made absolute against ``export_dir`` (TRL's collators open path strings
    relative to the working directory) and cast to ``datasets.Image``.
    """
    import datasets  # type: ignore[import-untyped]

    root = Path(export_dir).resolve()
    data = root / DATA_FILE
    if not data.is_file():
        raise FormatError(f"{root} has no {DATA_FILE}; is it a trl-sft or trl-dpo export?")
    ds = datasets.load_dataset("json", data_files=str(data), split=split)

    def absolute(row: dict[str, Any]) -> dict[str, Any]:
        return {"images": [p if os.path.isabs(p) else str(root / p) for p in row["images"]]}

    ds = ds.map(absolute)
    return ds.cast_column("images", datasets.List(datasets.Image()))
