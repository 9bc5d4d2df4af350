"""One tool specification, derived from type hints and a docstring.

The same ``Tool`` renders into the agent prompt (JSON and code action formats), into an
OpenAI ``tools`` array, and into the ``tools`` column of training data, so training and
evaluation always see the same tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import importlib.util
import inspect
import json
import keyword
import os
import re
import threading
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Union, get_args, get_origin, get_type_hints, overload

from PIL import Image

from tracetune import safefs
from tracetune.errors import ConfigError, TracetuneError

OutputType = Literal["text", "number", "json", "image", "file"]


class UnknownToolError(TracetuneError, KeyError):
    """A tool name that is neither registered nor a loadable ``package.module:tool``."""


class ToolError(TracetuneError):
    """A tool could not do what was asked; the message is shown to the model."""


class ToolUnavailable(ToolError):
    """A tool's optional dependency or model is missing; the message names the fix."""


class ToolTimeout(ToolError):
    """A tool call took longer than its time limit; the model reads it as a timeout."""


class ToolFatal(TracetuneError):
    """The service behind a tool is gone (e.g. an MCP server process died).

    Not a ``ToolError``: the model cannot recover from it, so the episode stops and the
    item fails (and is retried on the next run) instead of continuing without the tool.
    """


class ToolInterrupted(BaseException):
    """Raised inside a tool's thread when the call was cancelled (e.g. the step's time ran
    out): a BaseException, so that a tool's ``except Exception`` does not swallow it."""


def _interrupt_thread(ident: int) -> bool:
    """Raise ``ToolInterrupted`` in the thread ``ident`` at its next Python instruction.

    A thread cannot be killed; this stops one that runs Python code. A single long C call
    (one huge regex or integer operation) finishes first: tools bound their inputs for that.
    """
    import ctypes

    set_async = ctypes.pythonapi.PyThreadState_SetAsyncExc
    set_async.argtypes = (ctypes.c_ulong, ctypes.py_object)
    return bool(set_async(ident, ToolInterrupted) == 1)


async def run_stoppable(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a thread of its own that stops when the call is cancelled.

    Like ``asyncio.to_thread``, but cancelling the awaiting task (a step's time limit,
    ``asyncio.wait_for``) also interrupts the thread, so a host tool never keeps running,
    and holding CPU and memory, after the code step that called it has ended.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(ok: bool, value: Any) -> None:
        if done.done():
            return
        if ok:
            done.set_result(value)
        else:
            done.set_exception(value)

    def target() -> None:
        try:
            result = context.run(fn, *args, **kwargs)
        except ToolInterrupted:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(settle, False, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, True, result)

    thread = threading.Thread(target=target, name=f"tool:{getattr(fn, '__name__', 'call')}")
    thread.daemon = True
    thread.start()
    try:
        return await done
    except asyncio.CancelledError:
        if thread.ident is not None and thread.is_alive():
            _interrupt_thread(thread.ident)
        raise


@dataclass
class ToolResult:
    """What a tool returns: text for the model, images, structured data, files written."""

    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    data: Any = None
    files: list[Path] = field(default_factory=list)
    final: bool = False  # set by final_answer


@dataclass
class ToolContext:
    """What a tool may touch during an episode: its working directory and the chat model."""

    workdir: Path
    model: Any = None  # a tracetune.models.ChatModel, for visual_qa / inspect_file questions
    options: dict[str, Any] = field(default_factory=dict)  # per-tool settings, e.g. corpus path

    # Largest working-directory file a tool reads (a file the code wrote can be any size).
    max_file_bytes: int = 512 * 1024 * 1024

    def resolve(self, path: str) -> Path:
        """The full name of ``path`` inside the working directory, for messages and names.

        A name check only: sandboxed code may swap what the name points to at any moment,
        so a tool must not open the returned path. Read through ``open_file`` /
        ``read_bytes`` / ``image`` and write through ``write_file``, which never follow a
        link in the working directory.
        """
        if not isinstance(path, str) or not path:
            raise ToolError(f"expected a file name in the working directory, got {path!r}")
        root = self.workdir.resolve()
        try:
            full = safefs.workdir_path(root, path)
        except safefs.UnsafePath as exc:
            raise ToolError(exc.strerror or str(exc)) from None
        if not safefs.exists_beneath(root, path):
            raise ToolError(self._missing(path))
        return full

    def _missing(self, path: str) -> str:
        root = self.workdir
        names = (
            sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
            if root.exists()
            else []
        )
        return f"no file {path!r}; files available: {', '.join(names) or 'none'}"

    def open_file(self, path: str) -> BinaryIO:
        """``path`` in the working directory, opened for reading by a directory fd: never
        through a link, only a regular file of at most ``max_file_bytes``."""
        if not isinstance(path, str) or not path:
            raise ToolError(f"expected a file name in the working directory, got {path!r}")
        try:
            with safefs.directory(self.workdir) as dirfd:
                fd = safefs.open_regular(dirfd, path, self.max_file_bytes)
        except FileNotFoundError:
            raise ToolError(self._missing(path)) from None
        except OSError as exc:
            raise ToolError(
                (exc.strerror or str(exc))
                if isinstance(exc, safefs.UnsafePath)
                else f"cannot open {path!r}: {exc.strerror}"
            ) from None
        return os.fdopen(fd, "rb")

    def read_bytes(self, path: str) -> bytes:
        """The bytes of ``path`` in the working directory (see ``open_file``)."""
        with self.open_file(path) as f:
            data = f.read(self.max_file_bytes + 1)
        if len(data) > self.max_file_bytes:
            raise ToolError(f"{path!r} is over the {self.max_file_bytes} byte limit")
        return data

    def write_file(self, name: str, data: bytes) -> str:
        """Create a new file in the working directory; returns the name it got.

        Never writes through a link or into an existing file: if something already sits at
        ``name``, a random suffix is added to it.
        """
        try:
            return safefs.write_new(self.workdir, name, data)
        except OSError as exc:
            raise ToolError(f"cannot write {name!r}: {exc}") from None

    def image(self, path: str) -> Image.Image:
        try:
            with self.open_file(path) as f, Image.open(f) as img:
                img.load()
                return img.convert("RGB") if img.mode not in ("RGB", "L", "RGBA") else img
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ToolError(f"{path!r} is not a readable image: {exc}") from exc


_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
}


def _json_schema(annotation: Any) -> dict[str, Any]:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _json_schema(args[0]) if len(args) == 1 else {}
    if origin is Literal:
        values = list(get_args(annotation))
        return {"type": _JSON_TYPES.get(type(values[0]), "string"), "enum": values}
    if origin is list:
        items = get_args(annotation)
        return {"type": "array", **({"items": _json_schema(items[0])} if items else {})}
    if origin is dict:
        return {"type": "object"}
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    return {}


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its description and per-argument help."""
    doc = inspect.cleandoc(doc or "")
    parts = re.split(r"^\s*(?:Args|Arguments|Parameters):\s*$", doc, maxsplit=1, flags=re.M)
    description = parts[0].strip()
    args: dict[str, str] = {}
    if len(parts) == 2:
        section = re.split(r"^\s*(?:Returns|Raises|Yields|Examples?):\s*$", parts[1], flags=re.M)[0]
        current = None
        for line in section.splitlines():
            m = re.match(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
            if m:
                current = m.group(1)
                args[current] = m.group(2).strip()
            elif current and line.strip():
                args[current] += " " + line.strip()
    return description, args


def _output_type(annotation: Any) -> OutputType:
    if annotation in (int, float):
        return "number"
    if annotation in (dict, list) or get_origin(annotation) in (dict, list):
        return "json"
    if isinstance(annotation, type) and issubclass(annotation, Image.Image):
        return "image"
    if annotation is Path:
        return "file"
    return "text"


class Tool:
    """A named capability with a JSON-schema input and a typed output.

    Subclass and override ``forward`` (and ``setup`` for heavy resources, loaded once per
    process on first use), or build one from a function with ``@tool``.
    """

    name: str = ""
    description: str = ""
    parameters: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
    output_type: OutputType = "text"
    requires: tuple[str, ...] = ()  # importable modules this tool needs
    extra: str | None = None  # the pip extra that provides them

    def __init__(self) -> None:
        self._ready = False
        self._setup_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------
    def setup(self) -> None:
        """Load heavy resources (models, indexes). Called once, lazily."""

    def available(self) -> tuple[bool, str]:
        """Whether this tool can run here, and if not, what to install."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            hint = (
                f"pip install 'tracetune[{self.extra}]'"
                if self.extra
                else "pip install " + (" ".join(missing))
            )
            return False, f"needs {', '.join(missing)}: {hint}"
        return True, "ok"

    def ensure_ready(self) -> None:
        if self._ready:
            return
        # Concurrent episodes share one tool instance: set it up once, not once per thread.
        with self._setup_lock:
            if self._ready:
                return
            ok, why = self.available()
            if not ok:
                raise ToolUnavailable(f"tool {self.name!r} is not available: {why}")
            self.setup()
            self._ready = True

    # -- calling -----------------------------------------------------------------------
    def forward(self, ctx: ToolContext, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement forward()")

    def validate_arguments(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Check arguments against the schema, coercing numbers given as strings."""
        if not isinstance(arguments, dict):
            raise ToolError(f"{self.name} expects a JSON object of arguments, got {arguments!r}")
        props = self.parameters.get("properties", {})
        unknown = sorted(set(arguments) - set(props))
        if unknown:
            raise ToolError(
                f"{self.name} got unknown argument(s) {', '.join(unknown)}; "
                f"it takes: {', '.join(props) or 'no arguments'}"
            )
        missing = [k for k in self.parameters.get("required", []) if k not in arguments]
        if missing:
            raise ToolError(f"{self.name} is missing required argument(s) {', '.join(missing)}")
        required = set(self.parameters.get("required", []))
        out = dict(arguments)
        for key, value in arguments.items():
            if value is None and key not in required:
                # Models write `question=None` / JSON null for "not given": use the default.
                del out[key]
                continue
            out[key] = coerce_argument(self.name, key, value, props[key].get("type"))
        return out

    async def acall(self, ctx: ToolContext, arguments: dict[str, Any]) -> ToolResult:
        """Validate, run (in a worker thread unless async) and normalize the result."""
        kwargs = self.validate_arguments(arguments)
        if not self._ready:
            # setup() loads models for seconds: keep it off the event loop that other
            # episodes are running on.
            await asyncio.to_thread(self.ensure_ready)
        if inspect.iscoroutinefunction(self.forward):
            value = await self.forward(ctx, **kwargs)
        else:
            value = await run_stoppable(self.forward, ctx, **kwargs)
        return to_result(value)

    def __call__(self, ctx: ToolContext, **kwargs: Any) -> ToolResult:
        """Synchronous call, for scripts and ``tracetune tools run``."""
        return asyncio.run(self.acall(ctx, kwargs))

    # -- rendering ---------------------------------------------------------------------
    def openai_schema(self) -> dict[str, Any]:
        """This tool as an entry of an OpenAI/TRL ``tools`` array."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def signature(self) -> str:
        """A Python signature line for the code action format, e.g. ``ocr(image: str) -> str``."""
        names = {
            "string": "str",
            "integer": "int",
            "number": "float",
            "boolean": "bool",
            "object": "dict",
            "array": "list",
        }
        required = set(self.parameters.get("required", []))
        args = []
        for key, prop in self.parameters.get("properties", {}).items():
            kind = prop.get("type")
            arg = (
                f"{python_name(key)}: {names.get(kind, 'Any') if isinstance(kind, str) else 'Any'}"
            )
            if key not in required:
                arg += f" = {prop.get('default')!r}"
            args.append(arg)
        returns = {"text": "str", "number": "float", "json": "dict", "image": "str", "file": "str"}[
            self.output_type
        ]
        return f"{self.name}({', '.join(args)}) -> {returns}"

    def describe(self) -> str:
        """Multi-line description with per-argument help, for prompts and ``tools list``."""
        lines = [f"{self.signature()}", f"    {self.description}"]
        for key, prop in self.parameters.get("properties", {}).items():
            if prop.get("description"):
                lines.append(f"    {python_name(key)}: {prop['description']}")
        return "\n".join(lines)


def python_name(key: str) -> str:
    """``key`` as a Python parameter name: ``from`` becomes ``from_``, ``file-path``
    ``file_path``. Signatures show these names, and tools whose schema uses other names
    (MCP tools) accept them for the originals, so code actions can pass every argument."""
    if key.isidentifier() and not keyword.iskeyword(key):
        return key
    name = re.sub(r"\W", "_", key, flags=re.ASCII) or "arg"
    if name[0].isdigit():
        name = f"_{name}"
    return f"{name}_" if keyword.iskeyword(name) else name


def coerce_argument(tool: str, key: str, value: Any, kind: Any) -> Any:
    """A model's argument converted to the JSON-schema type ``kind`` where that is lossless
    (``"3"`` for an integer), else a :class:`ToolError` that says what was expected."""
    if not isinstance(kind, str):  # a union of types (["string", "null"]) or none given
        return value
    try:
        if kind == "integer" and isinstance(value, str | float) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value))
        if kind == "number" and isinstance(value, str):
            return float(value)
        if kind == "boolean" and isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise ValueError
            return value.lower() == "true"
        if kind in ("array", "object") and isinstance(value, str):
            return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        raise ToolError(
            f"{tool}: argument {key!r} should be of type {kind}, got {value!r}"
        ) from None
    expected = {
        "string": str,
        "integer": int,
        "number": (int, float),
        "boolean": bool,
        "array": list,
        "object": dict,
    }.get(kind or "")
    if expected is not None and not isinstance(value, expected):  # type: ignore[arg-type]
        raise ToolError(f"{tool}: argument {key!r} should be of type {kind}, got {value!r}")
    return value


def to_result(value: Any) -> ToolResult:
    """Normalize whatever a tool returned into a ``ToolResult``."""
    if isinstance(value, ToolResult):
        return value
    if isinstance(value, Image.Image):
        return ToolResult(text="", images=[value])
    if isinstance(value, bool | int | float):
        return ToolResult(text=_format_number(value), data=value)
    if isinstance(value, dict | list):
        return ToolResult(text=json.dumps(value, ensure_ascii=False), data=value)
    if isinstance(value, Path):
        return ToolResult(text=value.name, files=[value])
    return ToolResult(text="" if value is None else str(value))


def _format_number(value: bool | int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


class FunctionTool(Tool):
    """A tool built by ``@tool`` from a typed, documented function."""

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str | None,
        output_type: OutputType | None,
        requires: tuple[str, ...],
        extra: str | None,
    ) -> None:
        super().__init__()
        self.fn = fn
        self.name = name or fn.__name__
        description, arg_help = parse_docstring(fn.__doc__ or "")
        if not description:
            raise ConfigError(
                f"tool {self.name!r} needs a docstring: it is the model-facing description"
            )
        self.description = description
        hints = get_type_hints(fn)
        sig = inspect.signature(fn)
        properties: dict[str, Any] = {}
        required: list[str] = []
        self._wants_ctx = False
        for pname, param in sig.parameters.items():
            annotation = hints.get(pname, str)
            if annotation is ToolContext:
                self._wants_ctx = True
                continue
            prop = _json_schema(annotation)
            if pname in arg_help:
                prop["description"] = arg_help[pname]
            if param.default is inspect.Parameter.empty:
                required.append(pname)
            else:
                prop["default"] = param.default
            properties[pname] = prop
        self.parameters = {"type": "object", "properties": properties, "required": required}
        self.output_type = output_type or _output_type(hints.get("return", str))
        self.requires = requires
        self.extra = extra
        if inspect.iscoroutinefunction(fn):
            self.forward = self._aforward  # type: ignore[method-assign]

    def forward(self, ctx: ToolContext, **kwargs: Any) -> Any:
        return self.fn(ctx, **kwargs) if self._wants_ctx else self.fn(**kwargs)

    async def _aforward(self, ctx: ToolContext, **kwargs: Any) -> Any:
        coro: Awaitable[Any] = self.fn(ctx, **kwargs) if self._wants_ctx else self.fn(**kwargs)
        return await coro


@overload
def tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    output_type: OutputType | None = None,
    requires: tuple[str, ...] = (),
    extra: str | None = None,
    register: bool = True,
) -> Tool: ...


@overload
def tool(
    fn: None = None,
    *,
    name: str | None = None,
    output_type: OutputType | None = None,
    requires: tuple[str, ...] = (),
    extra: str | None = None,
    register: bool = True,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    output_type: OutputType | None = None,
    requires: tuple[str, ...] = (),
    extra: str | None = None,
    register: bool = True,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a ``Tool`` from a typed function whose docstring describes it and its Args.

    A parameter annotated ``ToolContext`` receives the episode context and is not shown to
    the model. The tool is registered by name unless ``register=False``.
    """

    def wrap(f: Callable[..., Any]) -> Tool:
        t = FunctionTool(f, name, output_type, requires, extra)
        if register:
            register_tool(t)
        return t

    return wrap(fn) if fn is not None else wrap


# -- registry ------------------------------------------------------------------------------
_REGISTRY: dict[str, Tool] = {}


def register_tool(t: Tool) -> Tool:
    """Make ``t`` nameable in configs; a later registration under the same name wins."""
    if not t.name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t.name):
        raise ConfigError(f"tool name {t.name!r} must be a Python identifier")
    _REGISTRY[t.name] = t
    return t


def lookup_tool(name: str) -> Tool | None:
    """The tool registered under ``name`` now, if any (nothing is loaded or started)."""
    return _REGISTRY.get(name)


def unregister_tool(t: Tool) -> None:
    """Forget ``t``, if it is still the tool registered under its name."""
    if _REGISTRY.get(t.name) is t:
        del _REGISTRY[t.name]


def registered_tools() -> dict[str, Tool]:
    load_builtin_tools()
    _connect_pending_mcp()
    return dict(sorted(_REGISTRY.items()))


def _connect_pending_mcp() -> None:
    """Start the MCP servers configured but not started yet, so their tools are known."""
    import sys

    mcp = sys.modules.get("tracetune.tools.mcp")
    if mcp is None and os.environ.get("TRACETUNE_MCP_SERVERS"):
        # A process started by one that was given MCP servers (a Ray actor, a worker).
        mcp = importlib.import_module("tracetune.tools.mcp")
    if mcp is not None:
        mcp.connect_pending()


def load_builtin_tools() -> None:
    """Import the built-in tools, which registers them."""
    importlib.import_module("tracetune.tools.builtin")


def get_tool(name: str) -> Tool:
    """A tool by registered name, or ``package.module:attr`` for a user's tool."""
    load_builtin_tools()
    if ":" in name:
        module, attr = name.split(":", 1)
        obj = getattr(_import_user_module(module, f"tool {name!r}"), attr, None)
        if obj is None:
            raise UnknownToolError(
                f"tool {name!r}: module {module} has no attribute {attr!r}",
                hint="name a user tool 'package.module:tool_name'",
            )
        t = obj if isinstance(obj, Tool) else obj()
        if not isinstance(t, Tool):
            raise UnknownToolError(f"{name} is not a Tool (got {type(obj).__name__})")
        return register_tool(t)
    if name not in _REGISTRY:
        _connect_pending_mcp()
    if name not in _REGISTRY:
        raise UnknownToolError(
            f"unknown tool {name!r}; known tools: {', '.join(sorted(_REGISTRY))}. "
            "User tools are named 'package.module:tool_name'; an MCP server's tools are "
            "known once the server is given (--mcp CMD or mcp_servers: in the config)"
        )
    return _REGISTRY[name]


def _import_user_module(module: str, what: str) -> Any:
    """Import a module the user named; one that does not exist is a user error (an
    ImportError raised inside an existing module is not: it keeps its traceback)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
            raise
        raise UnknownToolError(
            f"{what}: no module named {module!r}",
            hint="install the package, or run from the folder that holds the module",
        ) from None


def load_tools(names: list[str], modules: list[str] = ()) -> list[Tool]:  # type: ignore[assignment]
    """Import user tool modules (which register tools on import), then look tools up.

    The name ``mcp`` stands for every tool of the MCP servers configured in this process
    (``--mcp`` / ``mcp_servers:``, see :mod:`tracetune.tools.mcp`).
    """
    for module in modules:
        _import_user_module(module, "tool module")
    out: list[Tool] = []
    for n in names:
        found = _mcp_tools() if n == "mcp" else [get_tool(n)]
        out.extend(t for t in found if all(t is not o for o in out))
    return out


def _mcp_tools() -> list[Tool]:
    from tracetune.tools import mcp

    return mcp.connected_tools()
