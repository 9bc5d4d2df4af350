"""ms-swift's standard dataset format, for SFT and for preference training.

Facts from ms-swift's custom-dataset documentation that the rows respect:

- ``messages`` holds ``{"role", "content"}`` turns with roles ``system``, ``user``,
  ``assistant``, ``tool_call`` and ``tool_response`` (``tool`` is accepted as a synonym);
  consecutive assistant-side turns are joined into one model turn, so a step's thought is an
  ``assistant`` turn followed by its ``tool_call`` turn, whose content is the call as JSON.
- ``tools`` is the tool schemas as a JSON string; ``images`` the image paths, each
  ``<image>`` in the text marking where the next one goes (counts must match).
- Preference rows carry ``rejected_response`` (text replacing the last assistant turn), or,
  from ms-swift 3.8, ``rejected_messages`` with ``rejected_images``/``rejected_tools`` for a
  rejected answer that is not a single text turn.
"""

from __future__ import annotations

import json
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


def swift_messages(turns: list[Turn], media: MediaWriter) -> tuple[list[dict[str, str]], list[str]]:
    """A chat as ms-swift messages and its image paths in marker order."""
    messages: list[dict[str, str]] = []
    images: list[str] = []
    for turn in turns:
        if turn.call is not None:
            if turn.thought:
                # ms-swift joins the thought and the call with nothing between them.
                messages.append({"role": "assistant", "content": turn.thought + "\n"})
            call = {"name": turn.call.name, "arguments": turn.call.arguments}
            messages.append({"role": "tool_call", "content": json.dumps(call, ensure_ascii=False)})
            continue
        text = []
        for part in turn.parts:
            if isinstance(part, str):
                text.append(part)
            else:
                text.append(IMAGE)
                images.append(media.image(part))  # type: ignore[arg-type]
        role = "tool_response" if turn.role == "tool" else turn.role
        messages.append({"role": role, "content": "".join(text)})
    return messages, images


def _tools(record: Trajectory | PreferencePair | Dialogue) -> str:
    if isinstance(record, Dialogue):
        return "[]"
    return json.dumps(tool_schemas(record.tools or record.task.tools), ensure_ascii=False)


@register_exporter("swift")
class SwiftExporter(Exporter):
    """ms-swift rows: ``messages`` with tool_call/tool_response turns, ``tools``, ``images``;
    preference pairs with ``rejected_response`` or ``rejected_messages``."""

    description: ClassVar[str] = (
        "ms-swift messages/tools/images rows; pairs with rejected_response or rejected_messages"
    )
    record_kinds: ClassVar[tuple[str, ...]] = ("trajectory", "dialogue", "pair")

    def row(self, record: Record, media: MediaWriter) -> dict[str, Any]:
        structured = self.options.tool_turns == "structured"
        files = [media.file(f) for f in task_attachments(record)]  # type: ignore[arg-type]
        if isinstance(record, PreferencePair):
            return self._pair_row(record, media, structured, files)
        assert isinstance(record, Trajectory | Dialogue)
        messages, images = swift_messages(record_turns(record, structured), media)
        check_placeholders([m["content"] for m in messages], len(images), record.id, IMAGE)
        return {
            "id": record.id,
            "messages": messages,
            **self._tools_column(record),
            "images": images,
            "files": files,
        }

    def _tools_column(self, record: Trajectory | PreferencePair | Dialogue) -> dict[str, str]:
        """``tools`` for structured tool turns only: given tools, ms-swift's agent template
        adds its own tool-calling instructions, which plain-text steps do not follow (the
        system prompt already lists the tools)."""
        if self.options.tool_turns != "structured":
            return {}
        return {"tools": _tools(record)}

    def _pair_row(
        self, pair: PreferencePair, media: MediaWriter, structured: bool, files: list[str]
    ) -> dict[str, Any]:
        prompt, chosen, rejected = pair_turns(pair, structured)
        messages, images = swift_messages([*prompt, chosen], media)
        check_placeholders([m["content"] for m in messages], len(images), pair.id, IMAGE)
        row: dict[str, Any] = {
            "id": pair.id,
            "messages": messages,
            **self._tools_column(pair),
            "images": images,
            "files": files,
        }
        if chosen.call is None and rejected.call is None and chosen.text == rejected.text:
            # ms-swift drops such rows; say so here, naming the record.
            raise FormatError(f"record {pair.id}: the chosen and rejected steps are the same text")
        # One spelling for the whole file: ms-swift reads a row with a null rejected_response
        # (what a missing key becomes once the rows share one schema) as an error and drops it.
        if not structured:
            row["rejected_response"] = rejected.text
        else:
            row["rejected_messages"] = swift_messages([*prompt, rejected], media)[0]
            row["rejected_images"] = images
            row["rejected_tools"] = row["tools"]
        return row

    def readme(self, report: ExportReport) -> str:
        pair = report.record_type == "pair"
        structured = self.options.tool_turns == "structured"
        rlhf = (
            "\nPreference rows: `messages` ends with the chosen step; "
            + (
                "`rejected_messages` (with `rejected_images` and `rejected_tools`) holds the "
                "whole rejected conversation, since a step may be a structured tool call "
                "(needs ms-swift 3.8 or later; `--tool-turns text` writes `rejected_response` "
                "instead).\n"
                if structured
                else "`rejected_response` holds the rejected step's text.\n"
            )
            if pair
            else ""
        )
        steps = (
            "JSON-action steps as an `assistant` thought plus a `tool_call` turn answered by a "
            "`tool_response` turn, other steps as `assistant` text answered by a `user` "
            "observation), `tools` (JSON string)"
            if structured
            else "every step as the `assistant` text the agent generated, answered by a `user` "
            "observation; no `tools` column, so ms-swift adds no tool-calling instructions of "
            "its own)"
        )
        command = "swift rlhf --rlhf_type dpo" if pair else "swift sft"
        command += f" --model <model> --dataset {DATA_FILE} --train_type lora"
        if structured:
            command += " --agent_template hermes"
        note = (
            "\n`--agent_template` decides how `tool_call` turns are spelled for the model; "
            "export with `--tool-turns text` to train on the exact text tracetune's agent "
            "generates instead.\n"
            if structured
            else ""
        )
        return f"""# {report.rows} tracetune {report.record_type} records for ms-swift

`{DATA_FILE}` holds ms-swift rows: `messages` (system prompt listing the tools, the task with
`<image>` markers, then {steps}, `images` (paths relative to this folder, in marker order),
plus `id` and `files` for `tracetune import --format swift`.
{rlhf}
Run from this folder, or export with `--absolute-paths` (ms-swift opens image paths as
given):

```bash
cd {report.out_dir.resolve()}
{command}
```
{note}"""


# -- import -----------------------------------------------------------------------------------
_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool_response": "tool",
    "tool": "tool",
}


def swift_turns(messages: Any, images: list[PendingMedia]) -> list[Turn]:
    """ms-swift messages as turns; an assistant turn right before a tool_call is its thought."""
    if not isinstance(messages, list):
        raise FormatError("messages must be a list of {role, content} objects")
    turns: list[Turn] = []
    for m in messages:
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if not isinstance(content, str):
            raise FormatError(f"message {m!r} has no text content")
        if role == "tool_call":
            thought, call = parse_call(content)
            previous = turns[-1] if turns else None
            if (
                previous is not None
                and previous.role == "assistant"
                and previous.call is None
                and not previous.images
            ):
                thought = previous.text.removesuffix("\n")
                turns.pop()
            turns.append(Turn(role="assistant", call=call, thought=thought))
        elif role in _ROLES:
            turns.append(Turn(role=_ROLES[role], parts=split_placeholders(content, images, IMAGE)))  # type: ignore[arg-type]
        else:
            raise FormatError(
                f"unknown role {role!r}: use system, user, assistant, tool_call or tool_response"
            )
    return turns


@register_importer("swift")
class SwiftImporter(Importer):
    """ms-swift rows back into trajectories, dialogues or step-wise preference pairs."""

    description: ClassVar[str] = "ms-swift messages/tools/images rows (and preference rows)"
    record_kinds: ClassVar[tuple[str, ...]] = ("trajectory", "dialogue", "pair")

    def kind_of(self, row: dict[str, Any]) -> Literal["chat", "pair"]:
        if "messages" not in row:
            raise FormatError("an ms-swift row needs a messages column")
        rejected = row.get("rejected_response") is not None or row.get("rejected_messages")
        return "pair" if rejected else "chat"

    def convert(self, row: dict[str, Any], ctx: ImportContext, want: str, record_id: str) -> Record:
        images = [PendingMedia(p) for p in row.get("images") or []]
        files = [PendingMedia(p, "file") for p in row.get("files") or []]
        turns = swift_turns(row["messages"], images)
        if images:
            raise FormatError(f"{len(images)} more images than {IMAGE} markers")
        tools = tool_names(row.get("tools"))
        if want != "pair":
            return convert_chat(turns, tools, files, record_id, ctx, want)
        if not turns or turns[-1].role != "assistant":
            raise FormatError("a preference row's messages must end with the chosen answer")
        prompt, chosen = turns[:-1], turns[-1]
        if row.get("rejected_response") is not None:
            rejected = Turn(role="assistant", parts=[str(row["rejected_response"])])
        else:
            rejected_images = [PendingMedia(p) for p in row.get("rejected_images") or []]
            rejected_turns = swift_turns(row["rejected_messages"], rejected_images)
            if not rejected_turns or rejected_turns[-1].role != "assistant":
                raise FormatError("rejected_messages must end with the rejected answer")
            rejected = rejected_turns[-1]
        return turns_to_pair(prompt, chosen, rejected, tools, files, record_id, ctx)
