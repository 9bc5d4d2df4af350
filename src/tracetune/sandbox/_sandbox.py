"""Host side of the sandbox: starts, drives, forks and kills episode workers."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tracetune.errors import ConfigError, TracetuneError
from tracetune.sandbox._cgroup import Cgroup
from tracetune.sandbox._workdir import CappedWorkdir
from tracetune.schema import ErrorKind, StepError

if TYPE_CHECKING:
    from tracetune.tools import Tool

logger = logging.getLogger("tracetune.sandbox")

WORKER_SCRIPT = Path(__file__).with_name("_worker.py")
_HEADER = struct.Struct(">I")
# Worker frames larger than this are a protocol violation: the host never buffers more.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Per-sandbox uids for a root host, far above any real account, so that RLIMIT_NPROC
# counts one sandbox (and its forks) alone.
_UID_BASE = 1_900_000_000
_UID_SPAN = 100_000_000
_warned: set[str] = set()
_LINUX = sys.platform.startswith("linux")


# Layers each isolation level needs, beyond the process and rlimits every sandbox has.
LEVELS: dict[str, tuple[str, ...]] = {
    "basic": (),
    "standard": ("network_namespace", "landlock"),
    "strict": ("network_namespace", "landlock", "seccomp", "cgroup", "process_cap"),
}


def _env_level() -> Literal["basic", "standard", "strict"]:
    value = os.environ.get("TRACETUNE_SANDBOX_MIN_LEVEL", "basic").strip().lower() or "basic"
    if value not in LEVELS:
        raise ConfigError(
            f"TRACETUNE_SANDBOX_MIN_LEVEL={value!r}: choose one of {', '.join(LEVELS)}"
        )
    return value  # type: ignore[return-value]


def layers(isolation: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(layer, active, detail) for every layer, from a sandbox's ``isolation`` report."""
    notes = " ".join(str(n) for n in isolation.get("notes", []))
    uid = isolation.get("uid")
    cap = isolation.get("process_cap")
    rows = [
        ("process", True, "own session, stripped environment, killed on close"),
        ("rlimits", True, "address space, CPU per step, file size, open files, no core"),
        (
            "network_namespace",
            bool(isolation.get("network_namespace")),
            "no interfaces, not even loopback"
            if isolation.get("network_namespace")
            else "refused by the kernel: " + (notes or "unknown"),
        ),
        (
            "own_uid",
            bool(isolation.get("own_uid")),
            f"uid {uid}, no capabilities"
            if isolation.get("own_uid")
            else f"the host's uid {uid}"
            + (", capabilities dropped" if isolation.get("capabilities_dropped") else ""),
        ),
        (
            "landlock",
            bool(isolation.get("landlock_abi")),
            f"ABI {isolation.get('landlock_abi')}: reads, writes, exec, TCP, signals confined"
            if isolation.get("landlock_abi")
            else "not available (Linux >= 5.13)",
        ),
        (
            "seccomp",
            bool(isolation.get("seccomp")),
            f"{isolation.get('seccomp')} filter: no namespaces, mounts, io_uring, keys, bpf, "
            "ptrace, personality, Unix sockets"
            if isolation.get("seccomp")
            else "not applied",
        ),
        (
            "cgroup",
            bool(isolation.get("cgroup")),
            f"{isolation.get('cgroup')}: pids and memory for the whole tree (swap kept inside "
            f"the cap by {isolation.get('cgroup_swap') or 'nothing'}), killed whole"
            if isolation.get("cgroup")
            else str(isolation.get("cgroup_detail") or "not available"),
        ),
        (
            "process_cap",
            bool(cap) or bool(isolation.get("cgroup")),
            "cgroup pids.max"
            if isolation.get("cgroup")
            else (f"RLIMIT_NPROC ({cap})" if isinstance(cap, str) else "RLIMIT_NPROC (own uid)")
            if cap
            else "none",
        ),
        (
            "workdir_cap",
            bool(isolation.get("workdir_cap")),
            str(isolation.get("workdir_cap_detail") or "none: only each file is capped"),
        ),
        (
            "audit_hook",
            bool(isolation.get("audit_hook")),
            "clear refusals for the model (convenience, not a boundary)",
        ),
    ]
    return rows


def isolation_level(isolation: dict[str, Any]) -> str:
    """The highest level of ``LEVELS`` whose layers are all active."""
    active = {name for name, on, _ in layers(isolation) if on}
    best = "basic"
    for level, needed in LEVELS.items():
        if set(needed) <= active:
            best = level
    return best


async def probe(limits: SandboxLimits | None = None) -> dict[str, Any]:
    """Start a sandbox in a scratch directory and return its ``isolation`` report."""
    import shutil
    import tempfile

    async def no_tools(name: str, arguments: dict[str, Any]) -> ToolReply:
        return ToolReply(error="no tools")

    workdir = Path(tempfile.mkdtemp(prefix="tracetune-probe-"))
    limits = (limits or SandboxLimits()).model_copy(update={"min_level": "basic"})
    try:
        async with await Sandbox.start(workdir, [], no_tools, limits) as sandbox:
            return dict(sandbox.isolation)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class SandboxLimits(BaseModel):
    """Limits enforced on model-written code; every one is per sandbox (per fork)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(
        default=30.0, gt=0, description="Wall-clock seconds per code step, tool calls included."
    )
    cpu_s: int = Field(default=30, gt=0, description="CPU seconds per code step (RLIMIT_CPU).")
    memory_mb: int = Field(
        default=2048, ge=256, description="Address-space cap of the worker process (RLIMIT_AS), MB."
    )
    max_processes: int = Field(
        default=64,
        ge=4,
        description="Tasks (processes and threads) the sandbox's uid may run (RLIMIT_NPROC); "
        "enforced when the host runs as root and drops the worker to a uid of its own.",
    )
    output_chars: int = Field(
        default=65536, ge=1024, description="Printed output kept per step; the rest is cut off."
    )
    tool_args_bytes: int = Field(
        default=65536,
        ge=1024,
        description="Largest tool call (its arguments as JSON, in bytes) the host accepts from "
        "the code; a larger one is refused inside the code without reaching the tool.",
    )
    max_file_mb: int = Field(
        default=1024, ge=1, description="Largest file the code may write (RLIMIT_FSIZE), MB."
    )
    max_open_files: int = Field(
        default=256, ge=32, description="Open file descriptors (RLIMIT_NOFILE)."
    )
    grace_s: float = Field(
        default=2.0,
        gt=0,
        description="After the time limit, seconds the interrupted code gets to unwind before "
        "the worker is killed (and its state lost).",
    )
    startup_timeout_s: float = Field(
        default=30.0, gt=0, description="Seconds a worker may take to start."
    )
    min_level: Literal["basic", "standard", "strict"] = Field(
        default_factory=lambda: _env_level(),
        description="Refuse to run code below this isolation level (see "
        "``tracetune.sandbox.LEVELS``): 'basic' runs anywhere; 'standard' needs a network "
        "namespace and Landlock; 'strict' also the seccomp filter, a cgroup and a process "
        "cap. Defaults to $TRACETUNE_SANDBOX_MIN_LEVEL, else 'basic'.",
    )
    cpus: float | None = Field(
        default=None,
        gt=0,
        description="CPU cores the whole sandbox may use at once (cgroup cpu quota); None: "
        "no quota. Needs the cgroup layer.",
    )
    seccomp: bool = Field(
        default=True,
        description="Install the seccomp filter (no namespaces, mounts, io_uring, keys, bpf, "
        "ptrace, personality or Unix sockets) in the worker.",
    )
    workdir_mb: int | None = Field(
        default=1024,
        ge=16,
        description="Size cap of the working directory while the sandbox runs (a tmpfs "
        "mounted over it, its files copied in and back; root hosts only). None: no cap.",
    )
    cgroup: bool = Field(
        default=True,
        description="Put each sandbox in a control group of its own (pids.max and memory for "
        "the whole process tree, killed whole on close) where the host can create one.",
    )
    read_paths: tuple[str, ...] = Field(
        default=(),
        description="Extra directories the code may read (besides the Python installation).",
    )
    uid: int | None = Field(
        default=None,
        ge=1,
        description="uid the worker runs as when the host is root (None: a fresh one per "
        "sandbox). Ignored for a non-root host.",
    )
    audit_hook: bool = Field(
        default=True,
        description="The Python-level policy layer that turns refused operations into clear "
        "errors. Switch off only to test the kernel layers beneath it.",
    )


@dataclass
class ToolStub:
    """What the sandbox needs to expose a tool as a Python function."""

    name: str
    parameters: list[str] = field(default_factory=list)  # in schema order
    required: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def from_tool(cls, tool: Tool) -> ToolStub:
        props: dict[str, Any] = tool.parameters.get("properties", {})
        return cls(
            name=tool.name,
            parameters=list(props),
            required=list(tool.parameters.get("required", [])),
            defaults={k: p["default"] for k, p in props.items() if "default" in p},
            description=tool.description,
        )


@dataclass
class ToolReply:
    """The host's answer to a tool call made by sandboxed code.

    ``value`` is returned into the code (plain JSON data, or a string such as the file name
    of a saved image); ``error`` is raised there as ``ToolError(error)`` instead.
    """

    value: Any = None
    error: str | None = None


ToolHandler = Callable[[str, dict[str, Any]], Awaitable[ToolReply]]


@dataclass
class ExecResult:
    """What one code step produced."""

    stdout: str
    error: StepError | None = None
    final_answer: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0
    state_lost: bool = False  # the worker was restarted: earlier variables are gone


class SandboxError(TracetuneError, RuntimeError):
    """The sandbox itself could not be started or used (not an error of the code)."""


class _WorkerGone(Exception):
    pass


class _Worker:
    """One worker process and its channel."""

    def __init__(
        self,
        sock: socket.socket,
        pid: int,
        proc: asyncio.subprocess.Process | None,
        uid: int | None = None,
    ) -> None:
        self.sock = sock
        self.pid = pid  # from the host's own spawn, or kernel-checked credentials (forks)
        self.uid = uid  # real uid, read from /proc once the worker is ready
        self.cgroup: Cgroup | None = None  # killed whole with the worker
        # The largest frame an honest worker sends (set from the limits): a bigger one is
        # refused before it is buffered or parsed.
        self.max_frame = MAX_MESSAGE_BYTES
        self.netns: tuple[int, int] | None = None  # its own network namespace (no cgroup)
        self.proc = proc  # set for a worker this process started; forks are grandchildren
        self.buf = bytearray()
        self.pidfd: int | None = None
        self.dead = False
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self.pidfd = os.pidfd_open(pid)  # signals reach this process, never a reused pid

    async def send(self, obj: dict[str, Any]) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode()
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, _HEADER.pack(len(body)) + body)
        except OSError as exc:
            raise _WorkerGone(str(exc)) from None

    def send_fd(self, obj: dict[str, Any], fd: int) -> None:
        body = json.dumps(obj).encode()
        try:
            # A tiny frame to an idle worker: the socket buffer is empty, this cannot block.
            socket.send_fds(self.sock, [_HEADER.pack(len(body)) + body], [fd])
        except OSError as exc:
            raise _WorkerGone(str(exc)) from None

    async def recv(self) -> dict[str, Any]:
        """One frame; cancellation-safe, since bytes read are kept in ``buf``."""
        loop = asyncio.get_running_loop()
        while True:
            if len(self.buf) >= 4:
                (size,) = _HEADER.unpack_from(self.buf)
                if size > self.max_frame:
                    raise _ProtocolError(
                        f"worker sent a {size} byte message (at most {self.max_frame} expected)"
                    )
                if len(self.buf) >= 4 + size:
                    body = bytes(self.buf[4 : 4 + size])
                    del self.buf[: 4 + size]
                    try:
                        msg = json.loads(body)
                    except ValueError as exc:
                        raise _ProtocolError(f"worker sent invalid JSON: {exc}") from None
                    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                        raise _ProtocolError("worker sent a message without an 'op'")
                    return msg
            try:
                data = await loop.sock_recv(self.sock, 1 << 16)
            except OSError as exc:
                raise _WorkerGone(str(exc)) from None
            if not data:
                raise _WorkerGone("the worker closed its channel")
            self.buf += data

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            elif self.proc is not None:
                if self.proc.returncode is None:
                    self.proc.send_signal(sig)
            # A fork without a pidfd is never signalled by its number: the number is only
            # what the kernel vouched for once, and may name another process by now.

    def alive(self) -> bool:
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, 0)
                return True
            except OSError:
                return False
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> int | None:
        """Kill the worker and anything left in its process group; its exit status if known."""
        self.dead = True
        # The group first, while its leader (the worker) still holds the group id: once the
        # leader is gone the number could name someone else's group.
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                os.killpg(self.pid, signal.SIGKILL)
        self.signal(signal.SIGKILL)
        if self.cgroup is not None:
            # Every process the code started, in any session or process group.
            await asyncio.to_thread(self.cgroup.kill)
        elif self.netns is not None:
            # No cgroup: the worker's network namespace holds exactly its processes.
            await asyncio.to_thread(_kill_namespace, self.netns)
        self.sock.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                return await self.proc.wait()
        return None


class _ProtocolError(Exception):
    pass


def _json_value(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


_RECORDED_ARGS_BYTES = 4096


def _preview(arguments: dict[str, Any]) -> dict[str, Any]:
    """Long tool arguments as the trajectory records them: each value cut to 200 characters."""
    return {str(k)[:100]: _summary(v) for k, v in list(arguments.items())[:20]}


def _summary(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Sandbox:
    """A worker process that runs one episode's code, keeping its Python state.

    Start one per episode with ``await Sandbox.start(workdir, tools, handler)``; ``execute``
    runs a code step; ``fork`` copies the state into an independent sandbox; ``close`` (or
    ``async with``) kills the worker. If a worker dies or must be killed (time limit not
    heeded, crash), the next worker starts fresh and the step's error says that earlier
    variables were lost: the episode may go on.
    """

    def __init__(
        self,
        workdir: Path,
        tools: list[ToolStub],
        handler: ToolHandler,
        limits: SandboxLimits,
        preload: Sequence[str],
        uid: int | None,
    ) -> None:
        self.workdir = workdir
        self.tools = tools
        self.handler = handler
        self.limits = limits
        self.preload = list(preload)
        self.uid = uid
        self.isolation: dict[str, Any] = {}
        self.startup_s = 0.0
        self.cgroup: Cgroup | None = None
        self._cgroup_note = ""
        self._capped: CappedWorkdir | None = None  # owned by the sandbox that mounted it
        self._capped_note = ""
        self._worker: _Worker | None = None
        self._lock = asyncio.Lock()
        self._steps = 0
        self._closed = False
        self._lost_note = ""

    # -- lifecycle ----------------------------------------------------------------------
    @classmethod
    async def start(
        cls,
        workdir: Path,
        tools: Sequence[ToolStub | Tool],
        handler: ToolHandler,
        limits: SandboxLimits | None = None,
        preload: Sequence[str] = (),
    ) -> Sandbox:
        """Start a worker for ``workdir``; ``tools`` become functions inside the code.

        ``preload`` names modules (e.g. ``["numpy"]``) imported before the first step, so that
        steps, and forks, do not pay for them.
        """
        if sys.platform == "win32":
            raise SandboxError("the code sandbox needs Linux (or macOS, with fewer guarantees)")
        workdir = Path(workdir)
        if not workdir.is_dir():
            raise SandboxError(
                f"sandbox working directory {workdir} does not exist; create it first"
            )
        limits = limits or SandboxLimits()
        stubs = [t if isinstance(t, ToolStub) else ToolStub.from_tool(t) for t in tools]
        names = [s.name for s in stubs]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        uid = None
        if os.geteuid() == 0:
            uid = limits.uid or _UID_BASE + random.randrange(_UID_SPAN)
        sandbox = cls(workdir.resolve(), stubs, handler, limits, preload, uid)
        if limits.workdir_mb is not None:
            sandbox._capped, sandbox._capped_note = await asyncio.to_thread(
                CappedWorkdir.mount, sandbox.workdir, limits.workdir_mb
            )
        else:
            sandbox._capped_note = "off (SandboxLimits.workdir_mb=None)"
        sandbox._make_cgroup()
        try:
            sandbox._worker = await sandbox._spawn()
        except BaseException:
            sandbox._drop_cgroup()
            sandbox._unmount()
            raise
        if sandbox.cgroup is not None or sandbox._capped is not None:
            _live.add(sandbox)
        return sandbox

    def _unmount(self) -> None:
        capped, self._capped = self._capped, None
        if capped is not None:
            capped.unmount()

    def _max_frame(self) -> int:
        """A tool request (capped arguments) or a step's end (capped output, 4 bytes per
        character at most), plus room for the frame's other fields."""
        limits = self.limits
        return min(MAX_MESSAGE_BYTES, max(limits.tool_args_bytes, 4 * limits.output_chars) + 65536)

    def _make_cgroup(self) -> None:
        if not _LINUX or not self.limits.cgroup:
            self._cgroup_note = "off (SandboxLimits.cgroup=False)" if _LINUX else "not Linux"
            return
        self.cgroup, self._cgroup_note = Cgroup.create(
            self.limits.memory_mb * 1024 * 1024, self.limits.max_processes, self.limits.cpus
        )

    def _drop_cgroup(self) -> None:
        group, self.cgroup = self.cgroup, None
        if group is not None:
            group.remove()

    async def _spawn(self) -> _Worker:
        t0 = time.perf_counter()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        home = str(self.workdir / ".sandbox")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": home,
            "TMPDIR": home,
            "MPLCONFIGDIR": home,
            "MPLBACKEND": "Agg",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            # One thread per BLAS library: threads count against the process cap and the
            # worker's address space.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "MALLOC_ARENA_MAX": "2",
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                str(WORKER_SCRIPT),
                str(child.fileno()),
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, killed as a whole
            )
        finally:
            child.close()
        parent.setblocking(False)
        worker = _Worker(parent, proc.pid, proc)
        worker.max_frame = self._max_frame()
        if self.cgroup is not None:
            # Before the config is sent: the worker does nothing until it reads it.
            try:
                self.cgroup.add(proc.pid)
                worker.cgroup = self.cgroup
            except OSError as exc:
                self._cgroup_note = f"could not join the group ({exc.strerror or exc})"
                self._drop_cgroup()
        config = {
            "workdir": str(self.workdir),
            "limits": self.limits.model_dump(mode="json"),
            "tools": [vars(t) for t in self.tools],
            "read_paths": list(self.limits.read_paths),
            "uid": self.uid,
            "host_pid": os.getpid(),
            "host_home": os.path.expanduser("~"),
            "preload": self.preload,
            "max_message_bytes": MAX_MESSAGE_BYTES // 2,
            "max_tool_bytes": self.limits.tool_args_bytes,
        }
        try:
            await worker.send(config)
            msg = await asyncio.wait_for(worker.recv(), self.limits.startup_timeout_s)
        except (_WorkerGone, _ProtocolError, TimeoutError) as exc:
            await worker.kill()
            stderr = b""
            if proc.stderr is not None:
                with contextlib.suppress(Exception):
                    stderr = await asyncio.wait_for(proc.stderr.read(8192), 1.0)
            raise SandboxError(
                f"the sandbox worker did not start ({type(exc).__name__}: {exc}); "
                f"its stderr: {stderr.decode(errors='replace').strip() or '(empty)'}"
            ) from None
        if msg.get("op") != "ready":
            await worker.kill()
            raise SandboxError(f"the sandbox worker failed to start:\n{msg.get('message', msg)}")
        if _LINUX:
            ids = _proc_ids(proc.pid)
            if ids is None:
                await worker.kill()
                raise SandboxError("the sandbox worker exited right after it started")
            worker.uid = ids[1]
            ns = _ns_id(proc.pid)
            if ns is not None and ns != _ns_id(os.getpid()):
                worker.netns = ns
        isolation = msg.get("isolation", {})
        self.isolation = dict(isolation) if isinstance(isolation, dict) else {}
        self.isolation["cgroup"] = self.cgroup.version if self.cgroup is not None else ""
        self.isolation["cgroup_detail"] = self._cgroup_note
        self.isolation["cgroup_swap"] = self.cgroup.swap if self.cgroup is not None else ""
        self.isolation["workdir_cap"] = self._capped_note if self._capped is not None else ""
        self.isolation["workdir_cap_detail"] = self._capped_note
        level = isolation_level(self.isolation)
        self.isolation["level"] = level
        needed = LEVELS[self.limits.min_level]
        missing = [(n, d) for n, on, d in layers(self.isolation) if n in needed and not on]
        if missing:
            await worker.kill()
            raise SandboxError(
                f"the sandbox reached the '{level}' isolation level, below the required "
                f"'{self.limits.min_level}'; missing: "
                + "; ".join(f"{n} ({d})" for n, d in missing)
                + ". Run as root or with user namespaces, cgroup delegation and Landlock, or "
                "lower SandboxLimits.min_level / TRACETUNE_SANDBOX_MIN_LEVEL."
            )
        self.startup_s = time.perf_counter() - t0
        _warn_missing_layers(self.isolation)
        return worker

    async def close(self) -> None:
        """Kill the worker; the sandbox cannot be used afterwards. Safe to call twice."""
        self._closed = True
        _live.discard(self)
        worker, self._worker = self._worker, None
        if worker is not None and not worker.dead:
            await worker.kill()
        # Whatever the code left running (a setsid daemon, a fork's children) goes too.
        self._drop_cgroup()
        if self._capped is not None:
            # Every process is dead: the files go back to the directory, the tmpfs away.
            await asyncio.to_thread(self._unmount)

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    # -- steps --------------------------------------------------------------------------
    async def execute(self, code: str) -> ExecResult:
        """Run one block of code in the episode's state; never raises for the code's faults."""
        async with self._lock:
            if self._closed:
                raise SandboxError("this sandbox is closed")
            if self._worker is None or self._worker.dead:
                await self._restart()
            worker = self._worker
            assert worker is not None
            self._steps += 1
            t0 = time.perf_counter()
            calls: list[dict[str, Any]] = []
            try:
                return await self._drive(worker, code, t0, calls)
            except _WorkerGone as exc:
                status = await worker.kill()
                kind, why = _death(status, self.limits, str(exc))
                return await self._lost(t0, calls, kind, why)
            except (_ProtocolError, ValueError, TypeError, KeyError) as exc:
                # A frame that is not what the protocol allows (forged by code that reached
                # the channel): the worker cannot be trusted any more, so it goes.
                await worker.kill()
                return await self._lost(
                    t0, calls, ErrorKind.SANDBOX, f"the sandbox broke protocol: {exc}"
                )
            except BaseException:
                # Cancelled (or failed) mid-step: the worker's state is unknown, so it goes.
                await worker.kill()
                self._lost_note = "the previous step was cancelled"
                raise

    async def _drive(
        self, worker: _Worker, code: str, t0: float, calls: list[dict[str, Any]]
    ) -> ExecResult:
        limits = self.limits
        await worker.send({"op": "exec", "code": code, "step": self._steps, "cpu_s": limits.cpu_s})
        deadline = t0 + limits.timeout_s
        interrupted = False

        def interrupt() -> float:
            # Ask the code to stop (it keeps its state); kill only if it does not.
            worker.signal(signal.SIGUSR1)
            return time.perf_counter() + limits.grace_s

        while True:
            remaining = deadline - time.perf_counter()
            try:
                msg = await asyncio.wait_for(worker.recv(), max(remaining, 0.0))
            except TimeoutError:
                if interrupted:
                    await worker.kill()
                    return await self._lost(
                        t0,
                        calls,
                        ErrorKind.TIMEOUT,
                        f"TimeoutError: the code ran past the {limits.timeout_s:g} s time limit "
                        "and did not stop when interrupted, so the sandbox was restarted",
                    )
                deadline, interrupted = interrupt(), True
                continue
            op = msg["op"]
            if op == "done":
                return self._result(msg, calls, t0)
            if op == "tool":
                if interrupted:
                    await worker.send({"op": "tool_result", "interrupted": True})
                    continue
                reply = await self._call_tool(msg, deadline - time.perf_counter(), calls)
                if reply is None:  # the step's time ran out inside the tool
                    await worker.send({"op": "tool_result", "interrupted": True})
                    deadline, interrupted = interrupt(), True
                    continue
                await worker.send({"op": "tool_result", **reply})
                continue
            raise _ProtocolError(f"unexpected message {op!r} during a step")

    async def _call_tool(
        self, msg: dict[str, Any], budget: float, calls: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        name, arguments = msg.get("name"), msg.get("arguments")
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise _ProtocolError("malformed tool request")
        if len(name) > 200:
            raise _ProtocolError("a tool request with a 200+ character name")
        size = len(json.dumps(arguments, ensure_ascii=False).encode("utf-8", "replace"))
        record: dict[str, Any] = {
            "name": name,
            # What the trajectory keeps: the arguments, or a preview of each when they are long.
            "arguments": arguments if size <= _RECORDED_ARGS_BYTES else _preview(arguments),
            "reply": None,
            "error": None,
        }
        calls.append(record)
        cap = self.limits.tool_args_bytes
        if size > cap:
            # Never reaches the tool.
            record["error"] = (
                f"{name}(): the arguments are {size} bytes, over the {cap} byte limit for one "
                "tool call; write large data to a file and pass its name"
            )
            return {"error": record["error"]}
        if name not in {t.name for t in self.tools}:
            record["error"] = f"unknown tool {name!r}"
            return {"error": record["error"]}
        t0 = time.perf_counter()
        try:
            reply = await asyncio.wait_for(self.handler(name, arguments), max(budget, 0.0))
        except TimeoutError:
            record["error"] = "interrupted: the step's time limit was reached"
            return None
        except Exception as exc:  # a handler bug must not break the episode's protocol
            logger.exception("tool handler failed for %s", name)
            reply = ToolReply(error=f"{name} failed: {type(exc).__name__}: {exc}")
        record["duration_s"] = round(time.perf_counter() - t0, 6)
        if reply.error is not None:
            record["error"] = reply.error
            return {"error": str(reply.error)}
        value = _json_value(reply.value)
        record["reply"] = _summary(value)
        return {"value": value}

    def _result(self, msg: dict[str, Any], calls: list[dict[str, Any]], t0: float) -> ExecResult:
        stdout, dropped, error, final = _parse_done(msg)
        if dropped:
            note = (
                f"[output truncated: {dropped} more characters not shown; the limit is "
                f"{self.limits.output_chars} per step]"
            )
            stdout = f"{stdout}\n{note}"
            if error is None:
                error = StepError(kind=ErrorKind.OUTPUT_LIMIT, message=note)
            else:
                error = StepError(kind=error.kind, message=f"{error.message}\n{note}")
        if final is not None:
            calls.append(
                {
                    "name": "final_answer",
                    "arguments": {"answer": str(final)},
                    "reply": None,
                    "error": None,
                }
            )
        return ExecResult(
            stdout=stdout,
            error=error,
            final_answer=None if final is None else str(final),
            tool_calls=calls,
            duration_s=time.perf_counter() - t0,
        )

    async def _lost(
        self, t0: float, calls: list[dict[str, Any]], kind: ErrorKind, why: str
    ) -> ExecResult:
        self._worker = None
        try:
            await self._restart()
            tail = "a fresh sandbox was started: variables from earlier steps are lost"
        except SandboxError as exc:
            tail = f"the sandbox could not be restarted ({exc})"
        return ExecResult(
            stdout="",
            error=StepError(kind=kind, message=f"{why}; {tail}."),
            tool_calls=calls,
            duration_s=time.perf_counter() - t0,
            state_lost=True,
        )

    async def _restart(self) -> None:
        if self._worker is not None and not self._worker.dead:
            await self._worker.kill()
        self._worker = None
        self._worker = await self._spawn()

    # -- fork ---------------------------------------------------------------------------
    async def fork(self) -> Sandbox:
        """A new sandbox whose state is a copy of this one's (copy-on-write ``os.fork``).

        The two never see each other's later changes. Both use the same working
        directory: files written by one are seen by the other.
        """
        async with self._lock:
            if self._closed:
                raise SandboxError("this sandbox is closed")
            if self._worker is None or self._worker.dead:
                await self._restart()
            worker = self._worker
            assert worker is not None
            child = await self._fork_child(worker)
            twin = Sandbox(
                self.workdir, self.tools, self.handler, self.limits, self.preload, self.uid
            )
            twin.isolation = dict(self.isolation)  # the workdir (and its cap) is shared
            twin._make_cgroup()
            if twin.cgroup is not None:
                _live.add(twin)
            if twin.cgroup is not None:
                try:
                    twin.cgroup.add(child.pid)  # verified above, and pinned by its pidfd
                    child.cgroup = twin.cgroup
                except OSError:
                    twin._drop_cgroup()  # it stays in (and dies with) the parent's group
            twin._worker = child
            twin._steps = self._steps
            return twin

    async def _fork_child(self, worker: _Worker) -> _Worker:
        """Ask ``worker`` to fork; the child, verified to be that worker's own child.

        The child's pid is never taken from what the worker says: the kernel attaches the
        sender's credentials to the child's first message, and the host checks that this
        pid is a child of ``worker`` running under its uid before it opens a pidfd on it.
        Any failure closes every socket and kills the parent worker, whose state can no
        longer be trusted: the next step starts a fresh one.
        """
        if not _LINUX:
            raise SandboxError("fork needs Linux (the kernel's credentials verify the child)")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child: _Worker | None = None
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            ours.setblocking(False)
            try:
                worker.send_fd({"op": "fork"}, theirs.fileno())
            finally:
                theirs.close()
            timeout = self.limits.startup_timeout_s
            reply = await asyncio.wait_for(worker.recv(), timeout)
            if reply["op"] != "forked":
                raise _ProtocolError(f"fork failed: {str(reply.get('message', reply))[:2000]}")
            data, pid, uid = await _recv_with_credentials(ours, timeout)
            if pid <= 0 or pid == worker.pid:
                raise _ProtocolError(f"the fork's first message came from pid {pid}, not a child")
            ids = _proc_ids(pid)
            if ids is None or ids != (worker.pid, worker.uid) or uid != worker.uid:
                raise _ProtocolError(
                    f"pid {pid} (parent, uid {ids}) is not a child of the sandbox worker "
                    f"{worker.pid} under its uid {worker.uid}"
                )
            child = _Worker(ours, pid, None, uid=uid)
            child.max_frame = self._max_frame()
            if child.pidfd is None or _proc_ids(pid) != (worker.pid, worker.uid):
                raise _ProtocolError(f"pid {pid} could not be pinned (pidfd) as the fork")
            child.buf += data
            hello = await asyncio.wait_for(child.recv(), timeout)
            if hello["op"] != "ready":
                raise _ProtocolError(f"forked worker failed: {hello.get('message', hello)}")
            return child
        except (_WorkerGone, _ProtocolError, TimeoutError, ValueError, TypeError, KeyError) as exc:
            if child is not None:
                await child.kill()
            else:
                ours.close()
            await worker.kill()
            self._worker = None
            self._lost_note = "the previous fork broke protocol"
            raise SandboxError(f"fork failed: {type(exc).__name__}: {exc}") from None
        except BaseException:
            if child is not None:
                await child.kill()
            else:
                ours.close()
            raise


# Error kinds a worker may report for a step; anything else is a forged frame.
_WORKER_KINDS = {
    ErrorKind.TIMEOUT,
    ErrorKind.MEMORY,
    ErrorKind.SANDBOX,
    ErrorKind.CODE,
    ErrorKind.TOOL,
    ErrorKind.OUTPUT_LIMIT,
}


def _parse_done(msg: dict[str, Any]) -> tuple[str, int, StepError | None, str | None]:
    """(stdout, dropped, error, final answer) of a ``done`` frame; _ProtocolError if forged."""
    stdout = msg.get("stdout", "")
    dropped = msg.get("dropped", 0)
    raw = msg.get("error")
    final = msg.get("final_answer")
    if not isinstance(stdout, str) or len(stdout) > MAX_MESSAGE_BYTES:
        raise _ProtocolError("a 'done' frame whose stdout is not text")
    if type(dropped) is not int or dropped < 0:
        raise _ProtocolError("a 'done' frame whose 'dropped' is not a count")
    if final is not None and not isinstance(final, str):
        raise _ProtocolError("a 'done' frame whose final answer is not text")
    error = None
    if raw is not None:
        if not isinstance(raw, dict) or not isinstance(raw.get("message"), str):
            raise _ProtocolError("a 'done' frame with a malformed error")
        try:
            kind = ErrorKind(str(raw.get("kind")))
        except ValueError:
            raise _ProtocolError(
                f"a 'done' frame with an unknown error kind {raw.get('kind')!r}"
            ) from None
        if kind not in _WORKER_KINDS:
            raise _ProtocolError(f"a 'done' frame with the error kind {kind.value!r}")
        error = StepError(kind=kind, message=raw["message"])
    return stdout, dropped, error, final


def _ns_id(pid: int | str) -> tuple[int, int] | None:
    """The network namespace of ``pid`` (device, inode), or None where /proc does not say."""
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _kill_namespace(ns: tuple[int, int], timeout_s: float = 2.0) -> None:
    """SIGKILL every process in the network namespace ``ns``: a worker's own, made for it
    alone, so whatever runs in it (a ``setsid`` daemon included) is the sandbox's."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or _ns_id(entry) != ns:
                continue
            try:
                pidfd = os.pidfd_open(int(entry))
            except OSError:
                continue
            try:
                if _ns_id(entry) == ns:  # the pinned process is still in it
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    found = True
            except OSError:
                pass
            finally:
                os.close(pidfd)
        if not found:
            return
        time.sleep(0.01)


# Sandboxes holding a cgroup or a tmpfs: if the host exits without closing them, their
# processes are killed, groups removed and files put back at exit all the same.
_live: set[Sandbox] = set()


@atexit.register
def _close_live_sandboxes() -> None:
    for sandbox in list(_live):
        with contextlib.suppress(Exception):
            sandbox._drop_cgroup()
        with contextlib.suppress(Exception):
            sandbox._unmount()


def _proc_ids(pid: int) -> tuple[int, int] | None:
    """(parent pid, real uid) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        return int(fields["PPid"].split()[0]), int(fields["Uid"].split()[0])
    except (KeyError, ValueError, IndexError):
        return None


async def _recv_with_credentials(sock: socket.socket, timeout: float) -> tuple[bytes, int, int]:
    """The first bytes on ``sock`` and the pid and uid the kernel vouches sent them.

    ``SO_PASSCRED`` was set on ``sock`` before its other end was handed out, so every
    message carries ``SCM_CREDENTIALS`` filled in (and checked) by the kernel: a process can
    claim only its own pid unless it holds CAP_SYS_ADMIN, which no sandbox process has.
    """
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(sock.fileno())
    try:
        data, ancillary, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(12))
    except OSError as exc:
        raise _WorkerGone(str(exc)) from None
    if not data:
        raise _WorkerGone("the forked worker closed its channel")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
            pid, uid, _gid = struct.unpack("3i", payload[:12])
            return data, pid, uid
    raise _ProtocolError("the forked worker's first message carried no credentials")


def _death(status: int | None, limits: SandboxLimits, detail: str) -> tuple[ErrorKind, str]:
    """Why a worker died, from its exit status (known only for workers we started)."""
    if status is not None and status < 0:
        sig = -status
        if sig == signal.SIGKILL:
            return ErrorKind.MEMORY, (
                "the sandbox was killed (SIGKILL), most likely for running out of memory "
                f"(limit {limits.memory_mb} MB)"
            )
        if sig == signal.SIGXCPU:
            return ErrorKind.TIMEOUT, f"the code exceeded its {limits.cpu_s} s CPU time limit"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return ErrorKind.SANDBOX, f"the sandbox crashed ({name})"
    if status is not None:
        return ErrorKind.SANDBOX, f"the sandbox exited (status {status}), e.g. by os._exit()"
    return ErrorKind.SANDBOX, f"the sandbox stopped unexpectedly ({detail})"


def _warn_missing_layers(isolation: dict[str, Any]) -> None:
    """Say once per process which isolation layers are active, and warn about missing ones."""
    rows = layers(isolation)
    summary = ", ".join(name for name, on, _ in rows if on)
    key = f"active:{summary}"
    if key not in _warned:
        _warned.add(key)
        logger.info("sandbox level %s; active layers: %s", isolation.get("level"), summary)
    for name, on, detail in rows:
        if not on and name != "audit_hook" and name not in _warned:
            _warned.add(name)
            logger.warning("sandbox isolation without %s: %s", name, detail)
    for note in isolation.get("notes", []):
        if note not in _warned:
            _warned.add(note)
            logger.warning("sandbox: %s", note)
