"""Tools of one episode: runs calls with typed errors and stores returned images."""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracetune.agent.render import file_names
from tracetune.models.base import BackendError
from tracetune.schema import ErrorKind, FileRef, Observation, StepError, Task, ToolCall
from tracetune.store import AssetStore
from tracetune.tools import Tool, ToolContext, ToolError, ToolResult, ToolUnavailable
from tracetune.tools.spec import ToolFatal, ToolTimeout


@dataclass
class CallOutcome:
    """A tool call's result as the episode records it."""

    observation: Observation
    error: StepError | None = None
    result: ToolResult | None = None
    saved_images: list[str] = field(default_factory=list)  # file names in the workdir


class ToolBox:
    """The tools an episode may call, its working directory, and where images are stored."""

    def __init__(
        self,
        tools: Iterable[Tool],
        workdir: Path,
        assets: AssetStore,
        model: Any = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.tools = {t.name: t for t in tools}
        self.workdir = workdir
        self.assets = assets
        self.context = ToolContext(workdir=workdir, model=model, options=options or {})

    @classmethod
    def for_task(
        cls,
        task: Task,
        tools: Iterable[Tool],
        source: AssetStore,
        assets: AssetStore,
        model: Any = None,
        options: dict[str, Any] | None = None,
        workdir: Path | None = None,
    ) -> ToolBox:
        """A toolbox with the task's files copied into a fresh working directory."""
        workdir = workdir or Path(tempfile.mkdtemp(prefix="tracetune-episode-"))
        workdir.mkdir(parents=True, exist_ok=True)
        for name, ref in zip(file_names(task.files), task.files, strict=True):
            shutil.copyfile(source.path(ref), workdir / name)
        return cls(tools, workdir, assets, model=model, options=options)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    async def call(self, call: ToolCall, step_index: int) -> CallOutcome:
        """Run one tool call; every failure becomes a typed error the model can read."""
        tool = self.tools.get(call.name)
        if tool is None:
            return _error(
                ErrorKind.UNKNOWN_TOOL,
                f"there is no tool {call.name!r}; available: {', '.join(sorted(self.tools))}",
            )
        try:
            arguments = tool.validate_arguments(call.arguments)
        except ToolError as exc:
            return _error(ErrorKind.TOOL_ARGUMENTS, str(exc))
        try:
            result = await tool.acall(self.context, arguments)
        except ToolUnavailable as exc:
            return _error(ErrorKind.TOOL, str(exc))
        except ToolTimeout as exc:
            return _error(ErrorKind.TIMEOUT, f"{call.name}: {exc}")
        except ToolError as exc:
            return _error(ErrorKind.TOOL, f"{call.name}: {exc}")
        except ToolFatal:  # the tool's server is gone: the item fails, and is retried later
            raise
        except BackendError:  # the tool's model is down: the item fails, retried on a rerun
            raise
        except Exception as exc:  # a tool bug must not end the run; the model sees it
            return _error(ErrorKind.TOOL, f"{call.name} failed: {type(exc).__name__}: {exc}")
        return self.record(result, call.name, step_index)

    def record(self, result: ToolResult, tool_name: str, step_index: int) -> CallOutcome:
        """Save a result's images in the workdir and the asset store; build the observation."""
        refs: list[FileRef] = []
        names: list[str] = []
        for i, image in enumerate(result.images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
            # A new file, created beneath the workdir's fd: if the code planted a link or a
            # file at the expected name, the image gets another name instead of following it.
            name = self.context.write_file(f"{tool_name}_step{step_index}_{i}.png", data)
            refs.append(self.assets.put_bytes(data, name))
            names.append(name)
        text = result.text
        if names:
            saved = ", ".join(names)
            text = f"{text}\n[image saved as {saved}]" if text else f"[image saved as {saved}]"
        return CallOutcome(
            observation=Observation(text=text, images=refs, data=_jsonable(result.data)),
            result=result,
            saved_images=names,
        )


def _error(kind: ErrorKind, message: str) -> CallOutcome:
    return CallOutcome(
        observation=Observation(text=""), error=StepError(kind=kind, message=message)
    )


def _jsonable(value: Any) -> Any:
    import json

    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)
