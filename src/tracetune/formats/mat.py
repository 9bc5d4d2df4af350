"""Import of MAT / M-TRACE training JSON (the MATRIX agent's SFT data).

A MAT record is ``{"id", "image", "conversations", ...}``: ``image`` is ``""``, one path, or
``{"<image_00>": path, ...}``; ``conversations`` are ``{"from", "value"}`` turns: the system
prompt (a ReAct code-agent prompt listing the tools as ``- name: description`` with
``Takes inputs:``), the user turn (``Picture k: <img>path</img>`` lines, ``Task: ...`` and
``Attachment: path; ...``), then assistant turns (a thought, then ``Code:`` and a fenced
Python block calling tools) answered by user turns ``[OUTPUT OF STEP i] Observation: ...``
or ``[OUTPUT OF STEP i] Error: ...``. The last assistant turn calls ``final_answer(...)``.

The same records come in MATRIX's other layouts too, and import the same way:

- the trajectory verifier's output (``{id, image, system-prompt, answer, conversations:
  [{role, content}]}``): the system prompt lives in ``system-prompt`` and turns are
  ``{role, content}``, the images marked by ``<image_00>``-style placeholders;
- the Qwen-VL-converted file (``{from, value}`` turns with ``Picture k: <img>path</img>``),
  which keeps ``system-prompt`` as a field when the conversation has no system turn.

Either way the tools are read from the system prompt, wherever it is.

A Pref-X preference row, as MATRIX writes its DPO data for LLaMA-Factory (``{images,
conversations, chosen, rejected, system}``: ``conversations`` the episode up to the fork,
``chosen``/``rejected`` one assistant step each with the ``observation`` that running it
gave), imports as a :class:`PreferencePair` of code actions (``--format mat-dpo``; ``--format
mat`` recognizes such rows too).

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
    PreferencePair,
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
# Where an image goes: Qwen-VL's <img>path</img>, or the placeholders of the unconverted
# files (<image_00>, keys of the record's image dict; LLaMA-Factory's <image>).
_PLACEHOLDER = re.compile(r"<img>(.*?)</img>|(<image(?:_\d+)?>)", re.S)
_IMAGE_TOKEN = re.compile(r"<image(?:_\d+)?>")
_TOOL = re.compile(r"^- ([A-Za-z_]\w*): .*?\n\s+Takes inputs:", re.M | re.S)
_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    # observations come back as user turns in MAT; LLaMA-Factory rows may tag them
    "observation": "user",
    "tool": "user",
    "function": "user",
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
    body = _IMAGE_TOKEN.sub("", _IMG.sub("", text))
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


def _turn(t: Any) -> tuple[str, str]:
    """A ``{from, value}`` (MAT, Qwen-VL, LLaMA-Factory) or ``{role, content}`` (MATRIX's
    verifier output) turn as (role, text)."""
    if isinstance(t, dict):
        tag = t.get("from", t.get("role"))
        text = t.get("value", t.get("content"))
        role = _ROLES.get(str(tag).lower()) if tag is not None else None
        if role is not None and isinstance(text, str):
            return role, text
    raise FormatError(f"turn {str(t)[:80]!r} is not a {{from, value}} or {{role, content}} pair")


def _conversation(row: dict[str, Any]) -> list[tuple[str, str]]:
    """The record's turns, with its ``system-prompt`` (or ``system``) field first when the
    conversation itself has no system turn."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise FormatError("a MAT record needs a conversations list")
    out = [_turn(t) for t in turns]
    system = row.get("system-prompt", row.get("system"))
    if out[0][0] != "system" and isinstance(system, str) and system.strip():
        out.insert(0, ("system", system))
    return out


def _rewrite(text: str, paths: dict[str, str]) -> str:
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, paths[path])
    return text


# Verdict fields MATRIX's files carry beside the conversation, kept in the record's metadata.
_KEPT = ("correct", "answer", "traj_verification", "verification", "thought")


@register_importer("mat")
class MatImporter(Importer):
    """MAT / M-TRACE training JSON into code-action trajectories (or verbatim dialogues)."""

    description: ClassVar[str] = (
        "MAT / M-TRACE JSON: SFT records, the verifier's output, Qwen-VL-converted files, "
        "Pref-X DPO rows"
    )
    record_kinds: ClassVar[tuple[str, ...]] = ("trajectory", "dialogue", "pair")

    def kind_of(self, row: dict[str, Any]) -> Literal["chat", "pair"]:
        return "pair" if "chosen" in row and "rejected" in row else "chat"

    def convert(self, row: dict[str, Any], ctx: ImportContext, want: str, record_id: str) -> Record:
        images = mat_images(row.get("image", row.get("images")))
        if want == "pair":
            return self._pair(row, images, ctx, record_id)
        turns = _conversation(row)
        if want == "dialogue":
            return self._dialogue(turns, images, ctx, record_id, row)
        return self._trajectory(turns, images, ctx, record_id, row)

    # -- as a trajectory --------------------------------------------------------------------
    def _task(
        self, system: str, user: str, images: list[str], ctx: ImportContext, rid: str
    ) -> tuple[Task, dict[str, str], list[str]]:
        """The task of a record (its files stored under the agent's names), the renaming of
        MAT paths to those names, and the tools the system prompt lists."""
        query, attachments = _task_parts(user)
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
        return task, renamed, tools

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
        task, renamed, tools = self._task(system, body[0][1], images, ctx, rid)
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
                **{k: row[k] for k in _KEPT if k in row},
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

    # -- a Pref-X preference row ------------------------------------------------------------
    def _pair(
        self, row: dict[str, Any], images: list[str], ctx: ImportContext, rid: str
    ) -> PreferencePair:
        missing = [k for k in ("chosen", "rejected") if k not in row]
        if missing:
            raise FormatError(
                f"a preference row needs 'chosen' and 'rejected' (one assistant step each), "
                f"this one has no {' or '.join(repr(k) for k in missing)}; import SFT records "
                "with --format mat"
            )
        turns = _conversation(row)
        system = turns[0][1] if turns[0][0] == "system" else ""
        body = turns[1:] if system else turns
        if not body or body[0][0] != "user":
            raise FormatError("a preference row's conversations must start with the user's task")
        if len(body) % 2 == 0:
            raise FormatError(
                "a preference row's conversations must end on the user's task or an "
                f"observation (the fork), but it has {len(body)} turns after the system prompt"
            )
        task, renamed, tools = self._task(system, body[0][1], images, ctx, rid)
        prefix = self._steps(body[1:], renamed, row)
        chosen = self._candidate(row, "chosen", renamed, len(prefix))
        rejected = self._candidate(row, "rejected", renamed, len(prefix))
        return PreferencePair(
            id=rid,
            task=task,
            action_format="code",
            tools=tools,
            prefix=prefix,
            chosen=chosen,
            rejected=rejected,
            verifier=str(row.get("verifier", "matrix")),
            metadata={
                "imported_from": "mat-dpo",
                **{k: row[k] for k in ("answer", "score", "chosen_score") if k in row},
            },
        )

    def _candidate(
        self, row: dict[str, Any], key: str, renamed: dict[str, str], index: int
    ) -> Step:
        value = row.get(key)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, str):
            value = {"value": value}
        if not isinstance(value, dict):
            raise FormatError(f"{key!r} must be one assistant turn {{from, value, observation}}")
        role, text = _turn({"from": "gpt", **value})
        if role != "assistant":
            raise FormatError(f"{key!r} is a {role} turn; it must be the assistant's step")
        raw = _rewrite(text, renamed)
        thought, code = parse_mat_step(raw)
        step = Step(index=index, raw=raw, thought=thought)
        if code is None:
            step.error = StepError(kind=ErrorKind.PARSE, message="no code block in the step")
        else:
            step.action = Action(type="code", code=code, answer=code_final_answer(code))
        observation = value.get("observation")
        if isinstance(observation, str):
            self._observe(step, _rewrite(observation, renamed))
        elif observation is not None:
            raise FormatError(f"{key}.observation must be text, got {type(observation).__name__}")
        return step

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
        # A placeholder names its image: <img>path</img> by path, <image_00> by the key of
        # the record's image dict; otherwise images go in order.
        raw = row.get("image")
        by_key = {}
        if isinstance(raw, dict):
            keys = sorted(raw)
            by_key = {k: pending[i] for i, k in enumerate(keys)}
        by_path = {p: pending[i] for i, p in enumerate(images)}
        placed: set[int] = set()
        messages = []
        for role, text in turns:
            parts: list[ContentPart] = []
            if role == "user" and pending:
                at = 0
                for match in _PLACEHOLDER.finditer(text):
                    if text[at : match.start()]:
                        parts.append(ContentPart(type="text", text=text[at : match.start()]))
                    at = match.end()
                    ref = by_path.get(match.group(1) or "") or by_key.get(match.group(2) or "")
                    if ref is None or id(ref) in placed:
                        ref = next((r for r in pending if id(r) not in placed), None)
                    if ref is not None:
                        placed.add(id(ref))
                        parts.append(ContentPart(type="image", image=ref))
                if text[at:]:
                    parts.append(ContentPart(type="text", text=text[at:]))
            else:
                parts.append(ContentPart(type="text", text=text))
            messages.append(Message(role=role, content=parts))  # type: ignore[arg-type]
        left = [r for r in pending if id(r) not in placed]
        pending = left
        if pending:
            raise FormatError(
                f"{len(pending)} images but fewer <img>/<image_NN> placeholders in the user turns"
            )
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
                **{k: row[k] for k in _KEPT if k in row},
            },
        )


@register_importer("mat-dpo")
class MatDpoImporter(MatImporter):
    """MATRIX's Pref-X DPO rows (``{images, conversations, chosen, rejected, system}``) into
    code-action preference pairs."""

    description: ClassVar[str] = (
        "MATRIX Pref-X DPO rows (LLaMA-Factory sharegpt with observation on chosen/rejected)"
    )
    record_kinds: ClassVar[tuple[str, ...]] = ("pair",)

    def kind_of(self, row: dict[str, Any]) -> Literal["chat", "pair"]:
        return "pair"
