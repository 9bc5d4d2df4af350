"""Import of MAT / M-TRACE training JSON (the MATRIX agent's SFT data).

A MAT record is ``{"id", "image", "conversations", ...}``: ``image`` is ``""``, one path, or
``{"<image_00>": path, ...}``; ``conversations`` are ``{"from", "value"}`` turns: the system
prompt (a ReAct code-agent prompt listing the tools as ``- name: description`` with
``Takes inputs:``), the user turn (``Picture k: <img>path</img>`` lines, ``Task: ...`` and
``Attachment: path; ...``), then assistant turns (a thought, then ``Code:`` and a fenced
Python block calling tools) answered by user turns ``[OUTPUT OF STEP i] Observation: ...``
or ``[OUTPUT OF STEP i] Error: ...``. The last assistant turn calls ``final_answer(...)``.

As trajectories (the default), each record becomes a code-action :class:`Trajectory` with
its :class:`Task`; the paths of the attached files are rewritten to the file names the
tracetune agent's working directory uses (the originals are kept in metadata). The tools keep
MAT's names, which tracetune's registry does not have: to render these trajectories, register
tools under those names; ``--as dialogue`` keeps each record verbatim as a plain chat instead.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal

from tracetune.agent.formats import get_format
from tracetune.agent.render import file_names
from tracetune.formats.registry import FormatError, ImportContext, Importer, register_importer
from tracetune.formats.turns import PendingMedia, code_final_answer
from tracetune.schema import (
    Action,
    ContentPart,
    Dialogue,
    ErrorKind,
    FileRef,
    Message,
    Observation,
    Provenance,
    Record,
    Step,
    StepError,
    Task,
    Trajectory,
)
from tracetune.store import guess_mime

_CODE = re.compile(r"```(?:py|python)?[ \t]*\n(.*?)(?:```|<end_action>|\Z)", re.S | re.I)
_CODE_LABEL = re.compile(r"[*\s]*Code\s*:[*\s]*$", re.I)
_THOUGHT_LABEL = re.compile(r"[*]*\s*Thought\s*:[*]*[ \t]*", re.I)
_OUTPUT = re.compile(r"\s*\[OUTPUT OF STEP (\d+)\]\s*(Observation|Error)\s*:?[ \t]*\n?", re.I)
_IMG = re.compile(r"<img>(.*?)</img>", re.S)
_TOOL = re.compile(r"^- ([A-Za-z_]\w*): .*?\n\s+Takes inputs:", re.M | re.S)
_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


def parse_mat_step(text: str) -> tuple[str, str | None]:
    """The thought and the code of a MAT assistant turn (``None`` when it has no code)."""
    match = _CODE.search(text)
    before = text if match is None else text[: match.start()]
    before = _CODE_LABEL.sub("", before.rstrip())
    thought = _THOUGHT_LABEL.sub("", before, count=1).strip()
    if match is None or not match.group(1).strip():
        return thought, None
    return thought, match.group(1).rstrip()


def mat_tools(system: str) -> list[str]:
    """The tool names a MAT system prompt lists (``- name: ...`` then ``Takes inputs:``)."""
    marker = system.rfind("only have access to")
    return _TOOL.findall(system[marker:] if marker >= 0 else system)


def mat_images(value: Any) -> list[str]:
    """The record's image paths in order (a dict is ordered by its ``<image_NN>`` keys)."""
    if value in (None, "", {}, []):
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value)]
    raise FormatError(
        f"image must be a path, a list or a dict of paths, got {type(value).__name__}"
    )


def _task_parts(text: str) -> tuple[str, list[str]]:
    """The task query and the attachment paths of MAT's first user turn."""
    body = _IMG.sub("", text)
    task_at = body.find("Task:")
    if task_at >= 0:
        body = body[task_at + len("Task:") :]
    else:
        body = re.sub(r"^\s*Picture \d+:\s*$", "", body, flags=re.M)
    attach_at = body.find("Attachment:")
    attachments: list[str] = []
    if attach_at >= 0:
        listing = body[attach_at + len("Attachment:") :]
        attachments = [p.strip() for p in listing.split(";") if p.strip()]
        body = body[:attach_at]
    return body.strip(), attachments


def _conversation(row: dict[str, Any]) -> list[tuple[str, str]]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise FormatError("a MAT record needs a conversations list")
    out = []
    for t in turns:
        role = _ROLES.get(str(t.get("from"))) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            raise FormatError(f"turn {str(t)[:80]!r} is not a {{from, value}} pair")
        out.append((role, t["value"]))
    return out


def _rewrite(text: str, paths: dict[str, str]) -> str:
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, paths[path])
    return text


@register_importer("mat")
class MatImporter(Importer):
    """MAT / M-TRACE training JSON into code-action trajectories (or verbatim dialogues)."""

    description: ClassVar[str] = "MAT / M-TRACE SFT JSON (conversations with Thought/Code turns)"
    record_kinds: ClassVar[tuple[str, ...]] = ("trajectory", "dialogue")

    def kind_of(self, row: dict[str, Any]) -> Literal["chat", "pair"]:
        return "chat"

    def convert(self, row: dict[str, Any], ctx: ImportContext, want: str, record_id: str) -> Record:
        turns = _conversation(row)
        images = mat_images(row.get("image"))
        if want == "dialogue":
            return self._dialogue(turns, images, ctx, record_id, row)
        return self._trajectory(turns, images, ctx, record_id, row)

    # -- as a trajectory --------------------------------------------------------------------
    def _trajectory(
        self,
        turns: list[tuple[str, str]],
        images: list[str],
        ctx: ImportContext,
        rid: str,
        row: dict[str, Any],
    ) -> Trajectory:
        system = turns[0][1] if turns[0][0] == "system" else ""
        body = turns[1:] if system else turns
        if not body or body[0][0] != "user":
            raise FormatError("the first turn after the system prompt must be the user's task")
        query, attachments = _task_parts(body[0][1])
        # Store the files first: a missing one fails the record before anything else is built.
        refs: list[FileRef] = [ctx.store(PendingMedia(p)) for p in images]
        sources = list(images)
        seen = {PurePosixPath(p).name for p in images}
        for path in attachments:
            if PurePosixPath(path).name in seen:
                continue  # MAT lists each image again as an attachment, under another prefix
            kind: Literal["image", "file"] = (
                "image" if guess_mime(path).startswith("image/") else "file"
            )
            refs.append(ctx.store(PendingMedia(path, kind)))
            sources.append(path)
            seen.add(PurePosixPath(path).name)
        names = file_names(refs)
        renamed = {}
        for i, name in enumerate(names):
            if name != refs[i].name:
                kind = "image" if refs[i].is_image else "file"
                refs[i] = ctx.store(PendingMedia(sources[i], kind), name)
        # Code and text refer to files by their MAT paths; the agent's working directory holds
        # them by name, so point every mention at the name.
        by_name = {PurePosixPath(s).name: n for s, n in zip(sources, names, strict=True)}
        for path in [*images, *attachments]:
            renamed[path] = by_name.get(PurePosixPath(path).name, PurePosixPath(path).name)
        tools = mat_tools(system)
        task = Task(
            id=rid,
            query=_rewrite(query, renamed),
            files=refs,
            tools=[t for t in tools if t != "final_answer"],
            provenance=Provenance(source="import:mat"),
            metadata={"source_paths": dict(zip(names, sources, strict=True))},
        )
        steps = self._steps(body[1:], renamed, row)
        last = steps[-1] if steps else None
        final = last if last and last.action and last.action.answer is not None else None
        return Trajectory(
            id=rid,
            task=task,
            controller="import:mat",
            action_format="code",
            tools=tools,
            steps=steps,
            final_answer=final.action.answer if final and final.action else None,
            status="completed" if final is not None else "max_steps",
            prompt_hash=get_format("code").prompt_hash,
            metadata={
                "imported_from": "mat",
                **{k: row[k] for k in ("correct", "answer", "traj_verification") if k in row},
            },
        )

    def _steps(
        self, turns: list[tuple[str, str]], renamed: dict[str, str], row: dict[str, Any]
    ) -> list[Step]:
        steps: list[Step] = []
        i = 0
        while i < len(turns):
            role, text = turns[i]
            if role != "assistant":
                raise FormatError(
                    f"turn {i + 2} is a {role} turn where the agent's step was expected"
                )
            raw = _rewrite(text, renamed)
            thought, code = parse_mat_step(raw)
            step = Step(index=len(steps), raw=raw, thought=thought)
            if code is None:
                step.error = StepError(kind=ErrorKind.PARSE, message="no code block in the step")
            else:
                answer = code_final_answer(code)
                is_last = i + 1 >= len(turns)
                if answer is not None and is_last and isinstance(row.get("answer"), str):
                    answer = row["answer"]
                step.action = Action(type="code", code=code, answer=answer)
            i += 1
            if i < len(turns) and turns[i][0] == "user":
                self._observe(step, _rewrite(turns[i][1], renamed))
                i += 1
            steps.append(step)
        return steps

    @staticmethod
    def _observe(step: Step, text: str) -> None:
        match = _OUTPUT.match(text)
        if match is None:
            step.observation = Observation(text=text.strip())
            return
        rest = text[match.end() :].strip()
        if match.group(2).lower() == "error":
            step.error = StepError(kind=ErrorKind.CODE, message=rest)
            if step.action is not None:
                step.action = Action(type="code", code=step.action.code)  # it did not finish
        else:
            step.observation = Observation(text=rest)

    # -- as a dialogue ----------------------------------------------------------------------
    def _dialogue(
        self,
        turns: list[tuple[str, str]],
        images: list[str],
        ctx: ImportContext,
        rid: str,
        row: dict[str, Any],
    ) -> Dialogue:
        pending = [ctx.store(PendingMedia(p)) for p in images]
        messages = []
        for role, text in turns:
            parts: list[ContentPart] = []
            if role == "user" and pending:
                # Qwen-VL spelling: each <img>path</img> is where an image goes.
                pieces = _IMG.split(text)
                for k, piece in enumerate(pieces):
                    if k % 2 == 1:
                        if pending:
                            parts.append(ContentPart(type="image", image=pending.pop(0)))
                    elif piece:
                        parts.append(ContentPart(type="text", text=piece))
            else:
                parts.append(ContentPart(type="text", text=text))
            messages.append(Message(role=role, content=parts))  # type: ignore[arg-type]
        if pending:
            raise FormatError(f"{len(pending)} images but fewer <img> tags in the user turns")
        users = [i for i, (role, _) in enumerate(turns) if role == "user"]
        if not users:
            raise FormatError("the conversation has no user turn (the task)")
        first_user = messages[users[0]]
        query, _ = _task_parts(turns[users[0]][1])
        return Dialogue(
            id=rid,
            task=Task(
                id=rid,
                query=query,
                files=[p.image for p in first_user.content if p.image is not None],
                provenance=Provenance(source="import:mat"),
            ),
            format="chat",
            messages=messages,
            provenance=Provenance(source="import:mat"),
            metadata={
                "imported_from": "mat",
                **{k: row[k] for k in ("correct", "answer", "traj_verification") if k in row},
            },
        )
