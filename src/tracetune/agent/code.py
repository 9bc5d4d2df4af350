"""Code actions: the model's Python runs in the episode's sandbox, tools run on the host.

Inside the code a tool is a plain function. Calling one sends its name and arguments to
``CodeExecutor._handle``, which runs the real tool through the episode's toolbox and returns
what the code can use next: the file name of an image the tool made (saved in the working
directory and the asset store), the tool's structured data, or else its text.
"""

from __future__ import annotations

import secrets
from typing import Any

from tracetune.agent.loop import Outcome
from tracetune.agent.toolbox import ToolBox
from tracetune.safefs import exists_beneath
from tracetune.sandbox import Sandbox, SandboxLimits, ToolReply, ToolStub
from tracetune.schema import Action, ErrorKind, FileRef, Observation, StepError
from tracetune.tools import ToolError, ToolResult, ToolUnavailable
from tracetune.tools.spec import Tool, ToolFatal, python_name

NO_OUTPUT = "(the code printed nothing; print() what you want to see)"


class CodeExecutor:
    """Runs an episode's code actions in one sandbox that keeps variables between steps.

    Start it with ``await CodeExecutor.start(toolbox)``. ``fork`` gives an independent copy
    of the state for step-wise exploration; every copy shares the toolbox (and so the
    working directory and asset store), and names the images its tools save apart from the
    others' so that no copy overwrites another's files.
    """

    def __init__(self, toolbox: ToolBox, branch: str = "") -> None:
        self.toolbox = toolbox
        self.branch = branch  # "" for the episode itself, a short tag for each fork
        self.sandbox: Sandbox | None = None
        self._step_index = 0
        self._step_images: list[FileRef] = []
        self._step_names: list[str] = []
        self._forks: list[CodeExecutor] = []
        self._fatal: ToolFatal | None = None  # a tool's server died during the step

    @classmethod
    async def start(cls, toolbox: ToolBox, limits: SandboxLimits | None = None) -> CodeExecutor:
        executor = cls(toolbox)
        # final_answer is built into the sandbox: it ends the code step with the answer.
        stubs = [_stub(t) for name, t in toolbox.tools.items() if name != "final_answer"]
        executor.sandbox = await Sandbox.start(toolbox.workdir, stubs, executor._handle, limits)
        return executor

    # -- tools ---------------------------------------------------------------------------
    async def _handle(self, name: str, arguments: dict[str, Any]) -> ToolReply:
        """Run a tool the code called; failures become errors raised inside the code."""
        tool = self.toolbox.tools.get(name)
        if tool is None:  # the sandbox only exposes known tools; this guards a mismatch
            return ToolReply(error=f"there is no tool {name!r}")
        try:
            result = await tool.acall(self.toolbox.context, arguments)
        except ToolUnavailable as exc:
            return ToolReply(error=str(exc))
        except ToolError as exc:
            return ToolReply(error=f"{name}: {exc}")
        except ToolFatal as exc:  # the step ends with the code's error; execute() raises it
            self._fatal = exc
            return ToolReply(error=f"{name}: {exc}")
        except Exception as exc:  # a tool bug must not end the run; the code sees it
            return ToolReply(error=f"{name} failed: {type(exc).__name__}: {exc}")
        return ToolReply(value=self._value(name, result))

    def _value(self, name: str, result: ToolResult) -> Any:
        if result.images:
            recorded = self.toolbox.record(
                result, self._image_label(name, len(result.images)), self._step_index
            )
            self._step_images.extend(recorded.observation.images)
            self._step_names.extend(recorded.saved_images)
            names = recorded.saved_images
            return names[0] if len(names) == 1 else names
        if result.data is not None:
            return result.data
        return result.text

    def _image_label(self, name: str, count: int) -> str:
        """The tool-name part of saved image names, unique in the shared working directory.

        ``ToolBox.record`` names images ``{label}_step{i}_{k}.png``; a tool called twice in one
        step, or by two forks at the same step, would overwrite the earlier file.
        """
        base = f"{name}{self.branch}"
        label, n = base, 1
        while any(
            exists_beneath(self.toolbox.workdir, f"{label}_step{self._step_index}_{k}.png")
            for k in range(count)
        ):
            n += 1
            label = f"{base}-{n}"
        return label

    # -- steps ---------------------------------------------------------------------------
    async def execute(self, action: Action, step_index: int) -> Outcome:
        if self.sandbox is None:
            raise RuntimeError("CodeExecutor was not started; use await CodeExecutor.start(...)")
        if action.type == "final_answer":  # e.g. a JSON-format step replayed as code
            return Outcome(Observation(text=action.answer or ""), final_answer=action.answer or "")
        if action.type != "code" or not action.code:
            return Outcome(
                None,
                StepError(
                    kind=ErrorKind.PARSE,
                    message="expected Python code in a ```py block, not a JSON tool call",
                ),
            )
        self._step_index = step_index
        self._step_images, self._step_names = [], []
        self._fatal = None
        result = await self.sandbox.execute(action.code)
        if self._fatal is not None:
            # The model cannot recover from a tool whose server is gone: the item fails.
            raise self._fatal
        text = result.stdout.rstrip("\n")
        if self._step_names:
            note = f"[image saved as {', '.join(self._step_names)}]"
            text = f"{text}\n{note}" if text else note
        if not text and result.error is None and result.final_answer is None:
            text = NO_OUTPUT
        calls = [
            {"name": c["name"], "arguments": c["arguments"]}
            | ({"error": c["error"]} if c.get("error") else {})
            for c in result.tool_calls
        ]
        observation = Observation(
            text=text, images=list(self._step_images), data={"tool_calls": calls}
        )
        return Outcome(observation, result.error, result.final_answer)

    async def fork(self) -> CodeExecutor:
        """A new executor whose Python state is a copy of this one's; the toolbox is shared."""
        if self.sandbox is None:
            raise RuntimeError("CodeExecutor was not started; use await CodeExecutor.start(...)")
        twin = CodeExecutor(self.toolbox, branch=f"_f{secrets.token_hex(3)}")
        twin.sandbox = await self.sandbox.fork()
        # The forked sandbox inherits our handler; its tool calls must land in its own steps.
        twin.sandbox.handler = twin._handle
        self._forks.append(twin)
        return twin

    async def close(self) -> None:
        """Close this sandbox and every fork made from it, then remove the working directory."""
        for twin in self._forks:
            await twin.close_branch()
        await self.close_branch()
        if not self.branch:
            self.toolbox.cleanup()

    async def close_branch(self) -> None:
        """Close this executor's sandbox only; the shared working directory stays."""
        if self.sandbox is not None:
            await self.sandbox.close()


def _stub(tool: Tool) -> ToolStub:
    """The tool as a sandbox function, its parameters under Python-safe names (a schema's
    ``from`` or ``file-path`` cannot be a parameter); the tool maps them back."""
    stub = ToolStub.from_tool(tool)
    stub.parameters = [python_name(p) for p in stub.parameters]
    stub.required = [python_name(p) for p in stub.required]
    stub.defaults = {python_name(k): v for k, v in stub.defaults.items()}
    return stub
