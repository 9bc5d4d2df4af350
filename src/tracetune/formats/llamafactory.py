"""LLaMA-Factory's sharegpt format, for SFT and for preference training.

Facts from LLaMA-Factory's data documentation that the rows respect:

- ``conversations`` is a list of ``{"from", "value"}`` turns; ``human``/``observation`` turns
  sit at odd positions (1st, 3rd, ...) and ``gpt``/``function_call`` turns at even ones. SFT
  conversations have an even number of turns (they end on the model); the prompt of a
  preference row has an odd number (it ends on the user or a tool result) and ``chosen`` and
  ``rejected`` are exactly one turn each.
- ``system`` holds the system prompt; ``tools`` the tool schemas as a JSON string; a
  ``function_call`` value is ``{"name": ..., "arguments": {...}}`` as JSON, optionally after
  the thought in ``<think>`` tags (LLaMA-Factory re-emits that thought before the call in the
  template's own tool-call syntax).
- ``images`` lists image paths, resolved against the dataset directory; each ``<image>`` in
  the text marks where the next one goes, and their counts must be equal.
- The dataset is registered in ``dataset_info.json`` with ``formatting: sharegpt``, the
  ``columns`` and ``tags`` mappings, and ``ranking: true`` for preference data.
"""

from __future__ import annotations

import json
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
    call_value,
    check_placeholders,
    convert_chat,
    pair_turns,
    parse_call,
    record_turns,
    split_placeholders,
    task_attachments,
    tool_names,
    turns_to_pair,
)
from tracetune.schema import Dialogue, PreferencePair, Record, Trajectory

IMAGE = "<image>"
TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
_ODD = ("human", "observation")
_EVEN = ("gpt", "function_call")


def _value(turn: Turn, media: MediaWriter, images: list[str]) -> str:
    if turn.call is not None:
        return call_value(turn)
    out = []
    for part in turn.parts:
        if isinstance(part, str):
            out.append(part)
        else:
            out.append(IMAGE)
            images.append(media.image(part))  # type: ignore[arg-type]
    return "".join(out)


def _tag(turn: Turn) -> str:
    if turn.role == "assistant":
        return "function_call" if turn.call is not None else "gpt"
    return {"user": "human", "tool": "observation"}.get(turn.role, turn.role)


def conversation(
    turns: list[Turn], media: MediaWriter, rid: str
) -> tuple[str, list[dict[str, str]], list[str]]:
    """The system prompt, the sharegpt turns and the image paths of a chat."""
    images: list[str] = []
    system = ""
    if turns and turns[0].role == "system":
        if turns[0].images:
            raise FormatError(f"record {rid}: LLaMA-Factory's system prompt cannot hold images")
        system, turns = turns[0].text, turns[1:]
    conversations = []
    for turn in turns:
        if turn.role == "system":
            raise FormatError(
                f"record {rid}: a system turn after the first; LLaMA-Factory takes one system "
                "prompt"
            )
        conversations.append({"from": _tag(turn), "value": _value(turn, media, images)})
    return system, conversations, images


def check_alternation(conversations: list[dict[str, str]], rid: str, ranking: bool) -> None:
    """LLaMA-Factory's rule: user-side and model-side turns alternate, user first."""
    for i, turn in enumerate(conversations):
        allowed = _ODD if i % 2 == 0 else _EVEN
        if turn["from"] not in allowed:
            raise FormatError(
                f"record {rid}: turn {i + 1} is {turn['from']!r} where LLaMA-Factory needs "
                f"{' or '.join(allowed)}; user-side and model-side turns must alternate"
            )
    if not conversations or (len(conversations) % 2 == 1) != ranking:
        want = "end on a user or tool turn" if ranking else "end on a model turn"
        raise FormatError(f"record {rid}: the conversation must {want}")


def check_llamafactory_row(row: dict[str, Any], rid: str = "?") -> None:
    """Check a row the way LLaMA-Factory will: turn order, one chosen and one rejected turn,
    and as many ``<image>`` markers as images."""
    ranking = "chosen" in row or "rejected" in row
    check_alternation(row["conversations"], rid, ranking)
    texts = [t["value"] for t in row["conversations"]] + [row.get("system") or ""]
    if ranking:
        for key in ("chosen", "rejected"):
            turn = row.get(key)
            if not isinstance(turn, dict) or turn.get("from") not in _EVEN:
                raise FormatError(
                    f"record {rid}: {key} must be exactly one gpt or function_call turn"
                )
            texts.append(turn["value"])
    check_placeholders(texts, len(row.get("images") or []), rid, IMAGE)


def _tools(record: Trajectory | PreferencePair | Dialogue) -> str:
    if isinstance(record, Dialogue):
        return ""
    return json.dumps(tool_schemas(record.tools or record.task.tools), ensure_ascii=False)


def _dataset_info(name: str, ranking: bool, tools: bool) -> str:
    columns = {"messages": "conversations", "system": "system"}
    if tools:
        columns["tools"] = "tools"
    columns["images"] = "images"
    if ranking:
        columns.update({"chosen": "chosen", "rejected": "rejected"})
    entry: dict[str, Any] = {"file_name": DATA_FILE, "formatting": "sharegpt"}
    if ranking:
        entry["ranking"] = True
    entry["columns"] = columns
    entry["tags"] = TAGS
    return json.dumps({name: entry}, indent=2) + "\n"


_README = """\
# {rows} tracetune {kind} records for LLaMA-Factory ({what})

`{data}` holds sharegpt rows: `conversations` ({turns}), `system` (tracetune's agent prompt,
which lists the tools), {tools}`images` (paths relative to this folder; every `<image>` marks
where the next one goes), plus `id` and `files`, which LLaMA-Factory ignores and
`tracetune import --format {fmt}` uses.
{tool_note}
`dataset_info.json` registers the data as `{name}`. Use this folder as the dataset directory
(images resolve against it):

```yaml
dataset: {name}
dataset_dir: {out}
template: qwen2_vl        # the template of your model
stage: {stage}
finetuning_type: lora
cutoff_len: 16384         # long enough for whole episodes: truncation can cut image tokens
```

If you merge the entry into another `dataset_info.json`, keep `dataset_dir` pointing here or
make the image paths absolute (`--absolute-paths`).
"""


class _LlamaFactoryExporter(Exporter):
    ranking: ClassVar[bool] = False

    def extra_files(self, report: ExportReport) -> dict[str, str]:
        structured = self.options.tool_turns == "structured"
        info = _dataset_info(self.dataset_name(report), self.ranking, tools=structured)
        return {"dataset_info.json": info}

    def tools(self, record: Trajectory | PreferencePair | Dialogue) -> dict[str, str]:
        """The ``tools`` column, for structured tool turns only: given tools, LLaMA-Factory
        adds its template's tool-calling instructions to the system prompt, which plain-text
        steps do not follow (the system prompt already lists the tools)."""
        if self.options.tool_turns != "structured":
            return {}
        return {"tools": _tools(record)}

    def readme(self, report: ExportReport) -> str:
        structured = self.options.tool_turns == "structured"
        tool_note = (
            "\nJSON-action steps are `function_call` turns (the thought in `<think>` tags, then "
            "the call) answered by `observation` turns: LLaMA-Factory renders them in the "
            "template's own tool-call syntax, so the model learns that syntax rather than "
            "tracetune's `Action:` text. Export with `--tool-turns text` to train on the exact "
            "text the agent generates.\n"
            if structured
            else "\nEvery step is a `gpt` turn with the text the agent generated; there is no "
            "`tools` column, so LLaMA-Factory adds no tool-calling instructions of its own.\n"
        )
        return _README.format(
            rows=report.rows,
            kind=report.record_type,
            what="preference" if self.ranking else "SFT",
            data=DATA_FILE,
            turns=(
                "the episode up to the fork, ending on a human or observation turn; `chosen` "
                "and `rejected` are one model turn each"
                if self.ranking
                else "human and gpt/function_call/observation turns, ending on the model"
            ),
            fmt=self.name,
            tool_note=tool_note,
            tools="`tools` (the tools' JSON schemas as a JSON string), " if structured else "",
            name=self.dataset_name(report),
            out=report.out_dir.resolve(),
            stage="dpo" if self.ranking else "sft",
        )


@register_exporter("llamafactory")
class LlamaFactoryExporter(_LlamaFactoryExporter):
    """LLaMA-Factory sharegpt SFT rows, with their ``dataset_info.json`` entry."""

    description: ClassVar[str] = "LLaMA-Factory sharegpt SFT rows + dataset_info.json"
    record_kinds: ClassVar[tuple[str, ...]] = ("trajectory", "dialogue")

    def row(self, record: Record, media: MediaWriter) -> dict[str, Any]:
        assert isinstance(record, Trajectory | Dialogue)
        turns = record_turns(record, self.options.tool_turns == "structured")
        system, conversations, images = conversation(turns, media, record.id)
        row = {
            "id": record.id,
            "conversations": conversations,
            "system": system,
            **self.tools(record),
            "images": images,
            "files": [media.file(f) for f in task_attachments(record)],
        }
        check_llamafactory_row(row, record.id)
        return row


@register_exporter("llamafactory-dpo")
class LlamaFactoryDpoExporter(_LlamaFactoryExporter):
    """LLaMA-Factory sharegpt preference rows (``ranking: true``)."""

    description: ClassVar[str] = "LLaMA-Factory sharegpt preference rows + dataset_info.json"
    record_kinds: ClassVar[tuple[str, ...]] = ("pair",)
    ranking: ClassVar[bool] = True

    def row(self, record: Record, media: MediaWriter) -> dict[str, Any]:
        assert isinstance(record, PreferencePair)
        prompt, chosen, rejected = pair_turns(record, self.options.tool_turns == "structured")
        system, conversations, images = conversation(prompt, media, record.id)
        row = {
            "id": record.id,
            "conversations": conversations,
            "chosen": {"from": _tag(chosen), "value": _value(chosen, media, images)},
            "rejected": {"from": _tag(rejected), "value": _value(rejected, media, images)},
            "system": system,
            **self.tools(record),
            "images": images,
            "files": [media.file(f) for f in task_attachments(record)],
        }
        check_llamafactory_row(row, record.id)
        return row


# -- import -----------------------------------------------------------------------------------
def _info_entry(path: Path) -> dict[str, Any] | None:
    """The ``dataset_info.json`` entry describing ``path``, if one sits beside it."""
    info = path.parent / "dataset_info.json"
    if not info.is_file():
        return None
    entries = json.loads(info.read_text(encoding="utf-8"))
    for entry in entries.values():
        if isinstance(entry, dict) and entry.get("file_name") == path.name:
            return entry
    return None


class _LlamaFactoryImporter(Importer):
    def locate(self, path: Path) -> Path:
        if path.is_dir() and (path / "dataset_info.json").is_file():
            entries = json.loads((path / "dataset_info.json").read_text(encoding="utf-8"))
            names = [e["file_name"] for e in entries.values() if "file_name" in e]
            if len(names) == 1:
                return path / names[0]
        return super().locate(path)

    def _mapping(self, path: Path | None) -> tuple[dict[str, str], dict[str, str]]:
        columns = {
            "messages": "conversations",
            "system": "system",
            "tools": "tools",
            "images": "images",
            "chosen": "chosen",
            "rejected": "rejected",
        }
        tags = dict(TAGS)
        entry = _info_entry(path) if path is not None else None
        if entry is not None:
            if entry.get("formatting", "alpaca") != "sharegpt":
                raise FormatError(f"{path}: only sharegpt-formatted LLaMA-Factory data is read")
            columns.update(entry.get("columns") or {})
            tags.update(entry.get("tags") or {})
        return columns, tags

    def rows(self, path: Path) -> Any:
        self._columns, self._tags = self._mapping(path)
        return super().rows(path)

    def _turn(self, message: Any, images: list[PendingMedia]) -> Turn:
        tags = self._tags
        if not isinstance(message, dict):
            raise FormatError("each conversation turn must be an object")
        tag, value = str(message.get(tags["role_tag"])), message.get(tags["content_tag"])
        if not isinstance(value, str):
            raise FormatError(f"turn {message!r} has no text")
        if tag == tags["function_tag"]:
            thought, call = parse_call(value)
            return Turn(role="assistant", call=call, thought=thought)
        role = {
            tags["user_tag"]: "user",
            tags["assistant_tag"]: "assistant",
            tags["observation_tag"]: "tool",
            tags["system_tag"]: "system",
        }.get(tag)
        if role is None:
            raise FormatError(f"unknown turn tag {tag!r}")
        return Turn(role=role, parts=split_placeholders(value, images, IMAGE))  # type: ignore[arg-type]

    def _parse(
        self, row: dict[str, Any]
    ) -> tuple[list[Turn], list[PendingMedia], list[PendingMedia], list[str]]:
        if not hasattr(self, "_columns"):
            self._columns, self._tags = self._mapping(None)
        cols = self._columns
        conversations = row.get(cols["messages"])
        if not isinstance(conversations, list):
            raise FormatError(f"a sharegpt row needs a {cols['messages']!r} list")
        images = [PendingMedia(p) for p in row.get(cols["images"]) or []]
        files = [PendingMedia(p, "file") for p in row.get("files") or []]
        turns: list[Turn] = []
        system = row.get(cols["system"]) or ""
        if system:
            turns.append(Turn(role="system", parts=split_placeholders(system, images, IMAGE)))
        turns.extend(self._turn(m, images) for m in conversations)
        return turns, images, files, tool_names(row.get(cols["tools"]))


@register_importer("llamafactory")
class LlamaFactoryImporter(_LlamaFactoryImporter):
    """LLaMA-Factory sharegpt SFT rows back into trajectories (or dialogues)."""

    description: ClassVar[str] = "LLaMA-Factory sharegpt SFT rows"
    record_kinds: ClassVar[tuple[str, ...]] = ("trajectory", "dialogue")

    def kind_of(self, row: dict[str, Any]) -> Literal["chat", "pair"]:
        return "chat"

    def convert(self, row: dict[str, Any], ctx: ImportContext, want: str, record_id: str) -> Record:
        turns, images, files, tools = self._parse(row)
        if images:
            raise FormatError(f"{len(images)} more images than {IMAGE} markers")
        return convert_chat(turns, tools, files, record_id, ctx, want)


@register_importer("llamafactory-dpo")
class LlamaFactoryDpoImporter(_LlamaFactoryImporter):
    """LLaMA-Factory sharegpt preference rows back into step-wise preference pairs."""

    description: ClassVar[str] = "LLaMA-Factory sharegpt preference rows"
    record_kinds: ClassVar[tuple[str, ...]] = ("pair",)

    def kind_of(self, row: dict[str, Any]) -> Literal["chat", "pair"]:
        return "pair"

    def convert(self, row: dict[str, Any], ctx: ImportContext, want: str, record_id: str) -> Record:
        prompt, images, files, tools = self._parse(row)
        chosen = self._turn(row.get(self._columns["chosen"]), images)
        rejected = self._turn(row.get(self._columns["rejected"]), images)
        if images:
            raise FormatError(f"{len(images)} more images than {IMAGE} markers")
        return turns_to_pair(prompt, chosen, rejected, tools, files, record_id, ctx)
