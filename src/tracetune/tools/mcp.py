"""Tools from MCP servers: any Model Context Protocol server's tools as tracetune tools.

A server is started as a subprocess speaking MCP over stdio (``"python server.py --flag"``)
or reached over streamable HTTP (``"http://host:port/mcp"``). Its tools join the tool
registry under their own names (or ``prefix + name``) with the JSON input schemas the
server declares, so they are listed by ``tracetune tools list``, written into prompts and
``tools`` arrays, callable from the json, code and tools action formats, and nameable
wherever tools are named (``--tools``, an M-TRACE catalogue, a task's tool list). The
name ``mcp`` in a tool list stands for every tool of the configured servers.

The MCP client is asynchronous: every session runs on one background event-loop thread
owned by this process, so a tool may be called from any thread or event loop. Each server
is started once per process, on first use, and closed when the process exits.

Errors:

* a server that cannot be started, does not answer the handshake in time, or describes a
  tool with a malformed schema raises :class:`McpServerError` naming the server, what went
  wrong and what it printed on stderr;
* a call that outlasts the server's ``timeout_s`` raises :class:`~tracetune.tools.ToolTimeout`
  and a tool that reports an error raises :class:`~tracetune.tools.ToolError`: the model
  reads both as a typed step error and may try again;
* a server that dies while a call is in flight raises :class:`McpServerLost` (a
  :class:`~tracetune.tools.spec.ToolFatal`): the episode stops and its item fails, to be
  retried on the next run. The next call starts the server again (at most
  ``max_restarts`` times per process), so the run's other items go on.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import io
import json
import keyword
import logging
import os
import re
import shlex
import tempfile
import threading
from collections.abc import Coroutine, Iterable
from datetime import timedelta
from typing import IO, Any, TypeVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tracetune.errors import ConfigError, TracetuneError
from tracetune.tools.spec import (
    OutputType,
    Tool,
    ToolContext,
    ToolError,
    ToolFatal,
    ToolResult,
    ToolTimeout,
    coerce_argument,
    load_builtin_tools,
    lookup_tool,
    python_name,
    register_tool,
    unregister_tool,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

#: How long closing all servers at exit may take.
CLOSE_TIMEOUT_S = 10.0


class McpServerError(TracetuneError):
    """An MCP server could not be used: it did not start, or its tool list is malformed."""


class McpServerLost(ToolFatal):
    """An MCP server died (or closed the connection) while the process was using it."""


class McpServer(BaseModel):
    """One MCP server to connect to: a command to start (stdio) or a URL (streamable HTTP).

    In YAML (``mcp_servers:``) an entry is either a string, read like ``--mcp`` (a command
    line, or a URL starting with ``http://`` / ``https://``), or a mapping of these fields.
    """

    model_config = ConfigDict(extra="forbid")

    command: str | None = Field(
        default=None,
        description="Executable to start; a whole command line is split like a shell does.",
    )
    args: list[str] = Field(default_factory=list, description="Arguments after the command.")
    url: str | None = Field(default=None, description="Streamable HTTP endpoint, e.g. .../mcp.")
    name: str | None = Field(default=None, description="Label for messages (default: derived).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for the command."
    )
    cwd: str | None = Field(default=None, description="Working directory for the command.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="HTTP headers for a URL server (e.g. authorization)."
    )
    prefix: str = Field(
        default="", description="Prepended to the server's tool names (avoids name clashes)."
    )
    tools: list[str] | None = Field(
        default=None, description="Only these of the server's tools (default: all)."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Time limit of one tool call.")
    startup_timeout_s: float = Field(
        default=30.0, gt=0, description="Time to start and answer the MCP handshake."
    )
    max_restarts: int = Field(
        default=3, ge=0, description="Restarts after the server died, per process."
    )

    @model_validator(mode="after")
    def _one_transport(self) -> McpServer:
        if (self.command is None) == (self.url is None):
            raise ValueError("an MCP server needs exactly one of command (stdio) or url (HTTP)")
        if self.command is not None:
            parts = shlex.split(self.command)
            if not parts:
                raise ValueError("the MCP server command is empty")
            if len(parts) > 1:
                self.command, self.args = parts[0], [*parts[1:], *self.args]
        if self.url is not None and not re.match(r"https?://", self.url):
            raise ValueError(f"MCP server url {self.url!r} must start with http:// or https://")
        if self.prefix and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must be a Python identifier")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.url is not None:
            return self.url
        return shlex.join([self.command or "", *self.args])

    def key(self) -> str:
        return self.model_dump_json()


def parse_server(value: str | dict[str, Any] | McpServer) -> McpServer:
    """A server from ``--mcp`` text (a command line, a URL, or a JSON object of the
    :class:`McpServer` fields) or from a YAML ``mcp_servers:`` entry."""
    if isinstance(value, McpServer):
        return value
    try:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{text!r} is not a JSON object: {exc}") from None
                return McpServer.model_validate(data)
            if re.match(r"https?://", text):
                return McpServer(url=text)
            return McpServer(command=text)
        if isinstance(value, dict):
            return McpServer.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(p) for p in e["loc"])
            + (": " if e["loc"] else "")
            + str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise ConfigError(f"invalid MCP server {value!r}: {problems}") from None
    raise ConfigError(
        f"an MCP server is a command line, a URL or a mapping of its fields, got {value!r}"
    )


# -- the background event loop ----------------------------------------------------------------
class _LoopThread:
    """One event loop in a daemon thread, where every MCP session of the process lives."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="tracetune-mcp", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it from a thread that is not the loop's."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("MCP calls cannot block the MCP loop's own thread")
        return self.submit(coro).result(timeout)

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` running on the loop from another event loop; cancelling the
        awaiting task cancels it there too."""
        return await asyncio.wrap_future(self.submit(coro))


_LOOP: _LoopThread | None = None
_LOOP_LOCK = threading.Lock()


def _loop() -> _LoopThread:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = _LoopThread()
            atexit.register(close_all)
        return _LOOP


# -- one connection (one server process or HTTP session) --------------------------------------
def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    exc = _leaf(exc)
    from mcp.shared.exceptions import McpError

    if isinstance(exc, McpError):
        return exc.error.message
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {exc.filename or exc}"
    if isinstance(exc, TimeoutError):
        return "no answer"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Connection:
    """A live MCP session, held open by one task on the background loop."""

    def __init__(self, spec: McpServer) -> None:
        self.spec = spec
        self.session: Any = None
        self.lost: str | None = None
        self.stderr: IO[bytes] | None = None
        self._wake = asyncio.Event()
        self._ready: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._owner: asyncio.Task[None] | None = None

    async def open(self) -> list[Any]:
        """Start the server, do the handshake, and return its tool list (``mcp.types.Tool``)."""
        self._owner = asyncio.create_task(self._own(), name=f"mcp:{self.spec.label}")
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), self.spec.startup_timeout_s)
        except TimeoutError:
            self._ready.cancel()  # what the owner reports later is of no interest now
            await self.close()
            raise McpServerError(
                self._message(
                    f"did not answer the MCP handshake within {self.spec.startup_timeout_s:g} s "
                    "(is it an MCP server speaking over stdio/HTTP? raise startup_timeout_s "
                    "if it is slow to start)"
                )
            ) from None
        except McpServerError:
            await self.close()
            raise

    def _message(self, what: str) -> str:
        text = f"MCP server {self.spec.label!r} {what}"
        tail = self.stderr_tail()
        return f"{text}\nits stderr ends with:\n{tail}" if tail else text

    def stderr_tail(self, lines: int = 15) -> str:
        if self.stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self.stderr.flush()
            size = self.stderr.seek(0, os.SEEK_END)
            self.stderr.seek(max(0, size - 16384))  # a long run's log: only its end
            text = self.stderr.read().decode("utf-8", errors="replace")
            return "\n".join(text.strip().splitlines()[-lines:])
        return ""

    @contextlib.asynccontextmanager
    async def _http(self) -> Any:
        import httpx
        from mcp.client.streamable_http import streamable_http_client

        spec = self.spec
        timeout = httpx.Timeout(spec.startup_timeout_s, read=max(spec.timeout_s, 300.0))
        async with (
            httpx.AsyncClient(
                headers=spec.headers, timeout=timeout, follow_redirects=True
            ) as client,
            streamable_http_client(spec.url or "", http_client=client) as streams,
        ):
            yield streams

    def _transport(self) -> Any:
        spec = self.spec
        if spec.url is not None:
            return self._http()
        from mcp import StdioServerParameters
        from mcp.client.stdio import get_default_environment, stdio_client

        # What the server prints on stderr, for error messages (not the user's terminal).
        self.stderr = tempfile.TemporaryFile(prefix="tracetune-mcp-", suffix=".log")
        params = StdioServerParameters(
            command=spec.command or "",
            args=spec.args,
            env={**get_default_environment(), **spec.env},
            cwd=spec.cwd,
        )
        return stdio_client(params, errlog=self.stderr)  # type: ignore[arg-type]  # a fileno

    async def _own(self) -> None:
        import anyio
        from mcp import ClientSession

        async def forward(source: Any, sink: Any) -> None:
            # Sits between the transport and the session: when the server's stream ends
            # (the process exited, the HTTP session closed), the connection is marked lost
            # and the session's pending requests fail at once instead of timing out.
            try:
                async with sink:
                    async for message in source:
                        await sink.send(message)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
                pass
            finally:
                self._lose("closed the connection (the server exited or was killed)")

        try:
            async with self._transport() as streams:
                read, write = streams[0], streams[1]
                sink, source = anyio.create_memory_object_stream[Any](0)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(forward, read, sink)
                    async with ClientSession(source, write) as session:
                        await session.initialize()
                        tools = await self._list_tools(session)
                        self.session = session
                        if not self._ready.done():
                            self._ready.set_result(tools)
                        await self._wake.wait()
                    tg.cancel_scope.cancel()
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits on it
            if isinstance(exc, asyncio.CancelledError) and self._ready.done():
                raise
            if isinstance(_leaf(exc), McpServerError) and not self._ready.done():
                self._ready.set_exception(_leaf(exc))
                self._lose(str(_leaf(exc)))
                return
            why = _describe(exc)
            if self.lost is not None and not isinstance(_leaf(exc), OSError | TimeoutError):
                why = (
                    "the connection closed before the MCP handshake finished (the server "
                    "exited; run the command by hand to see why)"
                    if self.spec.url is None
                    else f"the connection closed before the MCP handshake finished ({why})"
                )
            if not self._ready.done():
                self._ready.set_exception(McpServerError(self._message(f"failed to start: {why}")))
            self._lose(why)
        else:
            if not self._ready.done():
                self._ready.set_exception(
                    McpServerError(self._message(f"failed to start: {self.lost or 'it exited'}"))
                )
            self._lose("closed")

    async def _list_tools(self, session: Any) -> list[Any]:
        tools: list[Any] = []
        cursor = None
        while True:
            try:
                page = await session.list_tools(cursor)
            except ValidationError as exc:  # the SDK could not read the server's answer
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
                )
                raise McpServerError(
                    self._message(
                        f"returned a malformed tool list ({problems}); fix the server's tool "
                        "definitions"
                    )
                ) from None
            tools.extend(page.tools)
            cursor = page.nextCursor
            if not cursor:
                return tools

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
        self._wake.set()

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        from mcp.shared.exceptions import McpError
        from mcp.types import CONNECTION_CLOSED

        if self.lost is not None:
            raise McpServerLost(self._message(f"is gone: {self.lost}"))
        timeout = self.spec.timeout_s
        try:
            return await self._until_lost(
                self.session.call_tool(
                    name, arguments, read_timeout_seconds=timedelta(seconds=timeout)
                ),
                name,
                timeout + 5.0,
            )
        except TimeoutError:
            raise ToolTimeout(f"{name} timed out after {timeout:g} s") from None
        except (McpServerLost, ToolError):
            raise
        except McpError as exc:
            if exc.error.code == CONNECTION_CLOSED or self.lost is not None:
                self._lose(exc.error.message)
                raise McpServerLost(
                    self._message(f"died during a call to {name}: {exc.error.message}")
                ) from None
            if exc.error.code == 408 or "timed out" in exc.error.message.lower():
                raise ToolTimeout(f"{name} timed out after {timeout:g} s") from None
            raise ToolError(exc.error.message) from None
        except Exception as exc:
            leaf = _leaf(exc)
            if (
                self.lost is not None
                or isinstance(leaf, OSError)
                or "Closed" in type(leaf).__name__
            ):
                self._lose(_describe(exc))
                raise McpServerLost(
                    self._message(f"died during a call to {name}: {_describe(exc)}")
                ) from None
            raise

    async def _until_lost(self, coro: Coroutine[Any, Any, T], name: str, timeout: float) -> T:
        """``coro``'s result, or ``McpServerLost`` as soon as the connection is lost (the
        session may be torn down before it fails its pending requests)."""
        call = asyncio.ensure_future(coro)
        lost = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({call, lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the caller is cancelled (a step's time ran out)
            lost.cancel()
            if not call.done():
                call.cancel()
        if not call.cancelled():
            return call.result()
        if self.lost is None:
            raise TimeoutError
        raise McpServerLost(self._message(f"died during a call to {name}: {self.lost}"))

    async def close(self) -> None:
        self._lose("closed")
        if self._owner is not None and not self._owner.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._owner), CLOSE_TIMEOUT_S)
            except BaseException:  # noqa: BLE001 - closing must not raise
                self._owner.cancel()
                with contextlib.suppress(BaseException):
                    await self._owner
        if self.stderr is not None:
            with contextlib.suppress(OSError):
                self.stderr.close()


# -- a server: its tools, and the connection behind them, restarted when it died -------------
class _Server:
    def __init__(self, spec: McpServer) -> None:
        self.spec = spec
        self.connection: _Connection | None = None
        self.restarts = 0
        self.tools: list[McpTool] = []
        self._lock: asyncio.Lock | None = None

    async def start(self) -> list[Any]:
        self.connection = _Connection(self.spec)
        return await self.connection.open()

    async def live(self) -> _Connection:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            conn = self.connection
            if conn is not None and conn.lost is None:
                return conn
            why = conn.lost if conn is not None else "not started"
            if self.restarts >= self.spec.max_restarts:
                raise McpServerLost(
                    f"MCP server {self.spec.label!r} is gone ({why}) and was restarted "
                    f"{self.restarts} time(s) already (max_restarts); rerun the command"
                )
            self.restarts += 1
            if conn is not None:
                await conn.close()
            try:
                await self.start()
            except McpServerError as exc:
                raise McpServerLost(f"{exc} (restarting it after: {why})") from None
            assert self.connection is not None
            return self.connection

    async def call(self, name: str, arguments: dict[str, Any]) -> Any:
        conn = await self.live()
        return await conn.call(name, arguments)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


# -- tools ------------------------------------------------------------------------------------
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _tool_name(spec: McpServer, name: str) -> str:
    clean = re.sub(r"\W", "_", name, flags=re.ASCII)
    if not clean or clean[0].isdigit():
        clean = f"t_{clean}"
    out = spec.prefix + clean
    return f"{out}_" if keyword.iskeyword(out) else out


def _check_schema(spec: McpServer, tool_name: str, schema: Any) -> dict[str, Any]:
    """The tool's input schema, or ``McpServerError`` saying what is malformed in it."""

    def bad(why: str) -> McpServerError:
        return McpServerError(
            f"MCP server {spec.label!r} returned a malformed input schema for tool "
            f"{tool_name!r}: {why}. Fix the server's tool definition (or leave the tool out "
            "with the server's tools: list)"
        )

    if not isinstance(schema, dict):
        raise bad(f"expected a JSON object, got {schema!r}")
    if schema.get("type", "object") != "object":
        raise bad(f"the top level must have type 'object', got {schema.get('type')!r}")
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
        raise bad(f"'properties' must map argument names to schemas, got {props!r}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise bad(f"'required' must be a list of argument names, got {required!r}")
    unknown = [r for r in required if r not in props]
    if unknown:
        raise bad(f"required argument(s) {', '.join(unknown)} are not among its properties")
    from jsonschema import SchemaError  # type: ignore[import-untyped]
    from jsonschema.validators import validator_for  # type: ignore[import-untyped]

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top"
        raise bad(f"{exc.message} (at {where})") from None
    return {"type": "object", **schema, "properties": props, "required": required}


class McpTool(Tool):
    """One tool of an MCP server, called through the server's session."""

    def __init__(self, server: _Server, info: Any, name: str) -> None:
        super().__init__()
        self.server = server
        self.mcp_name: str = info.name
        self.name = name
        self.description = " ".join(
            (info.description or info.title or f"{info.name} (from MCP server)").split()
        )
        self.parameters = _check_schema(server.spec, info.name, info.inputSchema)
        output = getattr(info, "outputSchema", None)
        # Servers wrap a plain return value as {"result": value} (FastMCP does): the tool's
        # value is the value inside.
        self.wrapped = (
            isinstance(output, dict)
            and set(output.get("properties") or {}) == {"result"}
            and output.get("required") == ["result"]
        )
        if self.wrapped:
            inner = output["properties"]["result"].get("type")  # type: ignore[index]
            kinds: dict[str, OutputType] = {
                "number": "number",
                "integer": "number",
                "string": "text",
            }
            self.output_type = kinds.get(inner if isinstance(inner, str) else "", "json")
        else:
            self.output_type = "json" if output else "text"
        self._ready = True

    def available(self) -> tuple[bool, str]:
        conn = self.server.connection
        if conn is not None and conn.lost is not None:
            return False, f"MCP server {self.server.spec.label!r} is gone: {conn.lost}"
        return True, "ok"

    def validate_arguments(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(arguments, dict):
            raise ToolError(f"{self.name} expects a JSON object of arguments, got {arguments!r}")
        props: dict[str, Any] = self.parameters.get("properties", {})
        # Code actions pass Python-safe names (from_, file_path) for the schema's own.
        aliases = {python_name(k): k for k in props if python_name(k) != k}
        arguments = {aliases.get(k, k) if k not in props else k: v for k, v in arguments.items()}
        extra = self.parameters.get("additionalProperties")
        if not (extra is True or isinstance(extra, dict)):  # the schema allows no others
            unknown = sorted(set(arguments) - set(props))
            if unknown:
                raise ToolError(
                    f"{self.name} got unknown argument(s) {', '.join(unknown)}; "
                    f"it takes: {', '.join(props) or 'no arguments'}"
                )
        required = set(self.parameters.get("required", []))
        missing = sorted(required - set(arguments))
        if missing:
            raise ToolError(f"{self.name} is missing required argument(s) {', '.join(missing)}")
        out: dict[str, Any] = {}
        for key, value in arguments.items():
            if value is None and key not in required:
                continue  # "not given": the server's default applies
            kind = props.get(key, {}).get("type")
            out[key] = (
                coerce_argument(self.name, key, value, kind) if isinstance(kind, str) else value
            )
        from jsonschema import ValidationError as SchemaViolation
        from jsonschema.validators import validator_for

        try:
            validator_for(self.parameters)(self.parameters).validate(out)
        except SchemaViolation as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            raise ToolError(
                f"{self.name}: argument {where + ': ' if where else ''}{exc.message}"
            ) from None
        return out

    async def forward(self, ctx: ToolContext, **kwargs: Any) -> ToolResult:
        result = await _loop().arun(self.server.call(self.mcp_name, kwargs))
        out = _to_result(self.name, result)
        if self.wrapped and isinstance(out.data, dict) and set(out.data) == {"result"}:
            out.data = out.data["result"]
        return out

    def __reduce__(self) -> Any:
        # In another process (a Ray actor) the same server is started there, once.
        return (_remote_tool, (self.server.spec.model_dump(), self.name))


def _remote_tool(spec: dict[str, Any], name: str) -> Tool:
    for t in connect([spec]):
        if t.name == name:
            return t
    raise McpServerError(f"MCP server {McpServer.model_validate(spec).label!r} has no {name!r}")


def _to_result(name: str, result: Any) -> ToolResult:
    """An MCP ``CallToolResult`` as a ``ToolResult``: text parts joined, images decoded."""
    texts: list[str] = []
    images: list[Image.Image] = []
    for part in result.content or []:
        kind = getattr(part, "type", "")
        if kind == "text":
            texts.append(part.text)
        elif kind == "image":
            images.append(_image(name, part.data, part.mimeType))
        elif kind == "resource":
            res = part.resource
            if getattr(res, "text", None) is not None:
                texts.append(res.text)
            elif (res.mimeType or "").startswith("image/") and getattr(res, "blob", None):
                images.append(_image(name, res.blob, res.mimeType))
            else:
                texts.append(f"[resource {res.uri} ({res.mimeType or 'binary'})]")
        elif kind == "resource_link":
            texts.append(f"[resource {part.uri}]")
        elif kind == "audio":
            texts.append(f"[audio ({part.mimeType}) omitted]")
    text = "\n".join(t for t in texts if t)
    data = getattr(result, "structuredContent", None)
    if result.isError:
        raise ToolError(text or "the tool reported an error without a message")
    if data is not None and not text:
        text = json.dumps(data, ensure_ascii=False)
    return ToolResult(text=text, images=images, data=data)


def _image(name: str, data: str, mime: str | None) -> Image.Image:
    try:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            img.load()
            return img.convert("RGB") if img.mode not in ("RGB", "L", "RGBA") else img.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ToolError(f"{name} returned an image ({mime}) that cannot be read: {exc}") from None


# -- the process's servers --------------------------------------------------------------------
_SERVERS: dict[str, _Server] = {}
_PENDING: list[McpServer] = []
_STATE_LOCK = threading.RLock()

#: The servers configured in this process, as JSON, for the processes it starts that load
#: tools by name (Ray actors): importing this module there configures the same servers,
#: started on first use.
SERVERS_ENV = "TRACETUNE_MCP_SERVERS"


def _export() -> None:
    specs = [s.spec for s in _SERVERS.values()] + _PENDING
    if specs:
        os.environ[SERVERS_ENV] = json.dumps([s.model_dump(mode="json") for s in specs])
    else:
        os.environ.pop(SERVERS_ENV, None)


def _import_from_env() -> None:
    raw = os.environ.get(SERVERS_ENV)
    if not raw:
        return
    try:
        entries = json.loads(raw)
        add_servers(entries if isinstance(entries, list) else [])
    except (ValueError, TypeError) as exc:
        log.warning("ignoring %s: %s", SERVERS_ENV, exc)


def add_servers(values: Iterable[str | dict[str, Any] | McpServer]) -> list[McpServer]:
    """Configure servers to start on first use (``--mcp``, ``mcp_servers:``).

    Raises ``ValueError`` for an entry that is not a server description."""
    specs = [parse_server(v) for v in values]
    with _STATE_LOCK:
        for spec in specs:
            if spec.key() not in _SERVERS and all(p.key() != spec.key() for p in _PENDING):
                _PENDING.append(spec)
        _export()
    return specs


def connect(values: Iterable[str | dict[str, Any] | McpServer]) -> list[Tool]:
    """Start these servers (once per process) and return their tools, registered by name.

    Raises :class:`McpServerError` when a server fails to start or lists a malformed tool,
    and ``ValueError`` for an entry that is not a server description."""
    specs = add_servers(values)
    connect_pending()
    with _STATE_LOCK:
        return [t for spec in specs for t in _SERVERS[spec.key()].tools]


def connect_pending() -> None:
    """Start every configured server not started yet and register its tools."""
    with _STATE_LOCK:
        try:
            while _PENDING:
                # A server that fails is reported once, not retried by every later lookup.
                _start(_PENDING.pop(0))
        finally:
            _export()


def connected_tools() -> list[Tool]:
    """Every tool of the configured servers (starting those not started yet)."""
    connect_pending()
    with _STATE_LOCK:
        return [t for server in _SERVERS.values() for t in server.tools]


def _start(spec: McpServer) -> None:
    import importlib.util

    if importlib.util.find_spec("mcp") is None:
        raise McpServerError(
            f"MCP server {spec.label!r}: MCP tools need the mcp package: "
            "pip install 'tracetune[mcp]'"
        )
    server = _Server(spec)
    loop = _loop()
    try:
        infos = loop.run(server.start())
        tools = _make_tools(server, infos)
    except BaseException:
        with contextlib.suppress(BaseException):
            loop.run(server.close(), CLOSE_TIMEOUT_S)
        raise
    load_builtin_tools()
    for t in tools:
        existing = lookup_tool(t.name)
        if existing is not None and not (
            isinstance(existing, McpTool) and existing.server.spec.key() == spec.key()
        ):
            loop.run(server.close(), CLOSE_TIMEOUT_S)
            owner = (
                f"MCP server {existing.server.spec.label!r}"
                if isinstance(existing, McpTool)
                else "a built-in or registered tool"
            )
            raise McpServerError(
                f"MCP server {spec.label!r} has a tool {t.mcp_name!r}, named {t.name!r} here, "
                f"which clashes with {owner} of that name; give the server a prefix "
                "(mcp_servers: [{command: ..., prefix: 'x_'}] or --mcp "
                '\'{"command": "...", "prefix": "x_"}\')'
            )
    server.tools = tools
    for t in tools:
        register_tool(t)
    _SERVERS[spec.key()] = server


def _make_tools(server: _Server, infos: list[Any]) -> list[McpTool]:
    spec = server.spec
    by_name: dict[str, McpTool] = {}
    for info in infos:
        if not isinstance(getattr(info, "name", None), str) or not info.name:
            raise McpServerError(f"MCP server {spec.label!r} listed a tool without a name")
        if spec.tools is not None and info.name not in spec.tools:
            continue
        name = _tool_name(spec, info.name)
        if name in by_name:
            raise McpServerError(
                f"MCP server {spec.label!r} has tools {by_name[name].mcp_name!r} and "
                f"{info.name!r}, which both become {name!r} here; leave one out with tools:"
            )
        by_name[name] = McpTool(server, info, name)
    if spec.tools is not None:
        have = {t.mcp_name for t in by_name.values()}
        missing = [n for n in spec.tools if n not in have]
        if missing:
            raise McpServerError(
                f"MCP server {spec.label!r} has no tool(s) {', '.join(missing)}; it has: "
                + ", ".join(sorted(i.name for i in infos))
            )
    assert all(_IDENT.fullmatch(n) for n in by_name)
    return list(by_name.values())


def close_all() -> None:
    """Stop every server this process started (run at exit; safe to call twice)."""
    with _STATE_LOCK:
        servers = list(_SERVERS.values())
        _SERVERS.clear()
        _PENDING.clear()
        _export()
        for server in servers:
            for t in server.tools:
                unregister_tool(t)
    if _LOOP is None or not servers:
        return

    async def close() -> None:
        await asyncio.gather(*(s.close() for s in servers), return_exceptions=True)

    with contextlib.suppress(BaseException):
        _LOOP.run(close(), CLOSE_TIMEOUT_S * 2)


_import_from_env()
