"""The code sandbox: escapes are contained and typed, state persists and forks apart.

Every test runs real model-style code in a real worker process. Limits are short so that
the time-limit tests take about a second each; the fork bomb is bounded by the process cap
and by its own deadline, so it can neither hang CI nor exhaust the machine.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from tracetune.sandbox import ExecResult, Sandbox, SandboxLimits, ToolReply
from tracetune.schema import ErrorKind
from tracetune.tools import Tool, ToolContext, ToolError, tool

pytestmark = pytest.mark.timeout(60)

# Generous by default, so that a loaded CI machine never trips a limit by accident; the
# tests of the time limit itself use FAST.
ROOMY = SandboxLimits(timeout_s=20.0)
FAST = SandboxLimits(timeout_s=1.0, grace_s=1.0)


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


@tool(register=False)
def scale(value: float, factor: float = 2.0) -> float:
    """Multiply a number.

    Args:
        value: The number.
        factor: The multiplier.
    """
    return value * factor


@tool(register=False)
def lookup(key: str) -> dict:
    """Look a key up in a small table.

    Args:
        key: The key.
    """
    table = {"pi": {"value": 3.14159, "digits": [3, 1, 4]}}
    if key not in table:
        raise ToolError(f"no entry {key!r}; known keys: {', '.join(table)}")
    return table[key]


TOOLS: list[Tool] = [scale, lookup]


class Host:
    """The host side of tool calls: runs the real tools, remembers what it was asked."""

    def __init__(self, workdir: Path) -> None:
        self.ctx = ToolContext(workdir=workdir)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, name: str, arguments: dict[str, Any]) -> ToolReply:
        self.calls.append((name, arguments))
        t = {t.name: t for t in TOOLS}[name]
        try:
            result = await t.acall(self.ctx, arguments)
        except ToolError as exc:
            return ToolReply(error=str(exc))
        return ToolReply(value=result.data if result.data is not None else result.text)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


async def start(workdir: Path, limits: SandboxLimits = ROOMY, host: Host | None = None) -> Sandbox:
    return await Sandbox.start(workdir, TOOLS, host or Host(workdir), limits)


def refused(result: ExecResult, kind: ErrorKind, *words: str) -> None:
    assert result.error is not None, f"expected {kind}, got output {result.stdout!r}"
    assert result.error.kind == kind, result.error
    for word in words:
        assert word in result.error.message, result.error.message


async def still_works(sandbox: Sandbox) -> None:
    result = await sandbox.execute("print(6 * 7)")
    assert result.error is None and result.stdout == "42\n"


# -- files ------------------------------------------------------------------------------------


@async_test
async def test_reading_etc_passwd_is_refused(workdir: Path) -> None:
    async with await start(workdir) as sb:
        result = await sb.execute("data = open('/etc/passwd').read()\nprint(data)")
        refused(result, ErrorKind.SANDBOX, "/etc/passwd", "line 1")
        assert "root:" not in result.stdout
        await still_works(sb)


@async_test
async def test_reading_a_file_outside_the_workdir_is_refused(workdir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the launch code is 0000")
    (workdir / "notes.txt").write_text("inside")
    async with await start(workdir) as sb:
        inside = await sb.execute("print(open('notes.txt').read())")
        assert inside.error is None and inside.stdout == "inside\n"
        for path in (str(secret), "../secret.txt"):
            result = await sb.execute(f"print(open({path!r}).read())")
            refused(result, ErrorKind.SANDBOX, "secret.txt")
            assert "launch" not in result.stdout
        link = await sb.execute(f"import os\nos.symlink({str(secret)!r}, 'alias.txt')")
        refused(link, ErrorKind.SANDBOX)
        listing = await sb.execute("import os\nprint(os.listdir('..'))")
        refused(listing, ErrorKind.SANDBOX, "listing")


@async_test
async def test_writing_outside_the_workdir_is_refused(workdir: Path, tmp_path: Path) -> None:
    target = tmp_path / "planted.txt"
    async with await start(workdir) as sb:
        result = await sb.execute(f"open({str(target)!r}, 'w').write('x')")
        refused(result, ErrorKind.SANDBOX, "writing")
        result = await sb.execute("open('/tmp/planted-by-sandbox.txt', 'w').write('x')")
        refused(result, ErrorKind.SANDBOX)
        ok = await sb.execute("open('out.txt', 'w').write('kept')")
        assert ok.error is None
    assert not target.exists()
    assert not Path("/tmp/planted-by-sandbox.txt").exists()
    assert (workdir / "out.txt").read_text() == "kept"


# -- network and processes --------------------------------------------------------------------


@async_test
async def test_opening_a_socket_is_refused(workdir: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        async with await start(workdir) as sb:
            code = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))"
            refused(await sb.execute(code), ErrorKind.SANDBOX, "network")
            url = await sb.execute(
                "import urllib.request\nurllib.request.urlopen('http://example.com')"
            )
            refused(url, ErrorKind.SANDBOX)
            await still_works(sb)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


@async_test
async def test_os_system_and_subprocess_are_refused(workdir: Path) -> None:
    async with await start(workdir) as sb:
        refused(
            await sb.execute("import os\nos.system('touch pwned')"), ErrorKind.SANDBOX, "os.system"
        )
        result = await sb.execute("import subprocess\nsubprocess.run(['touch', 'pwned'])")
        refused(result, ErrorKind.SANDBOX, "subprocess")
        result = await sb.execute("import os\nos.execv('/bin/sh', ['sh', '-c', 'touch pwned'])")
        refused(result, ErrorKind.SANDBOX)
        await still_works(sb)
    assert not (workdir / "pwned").exists()


@async_test
async def test_fork_bomb_is_refused(workdir: Path) -> None:
    async with await start(workdir) as sb:
        result = await sb.execute("import os\nwhile True:\n    os.fork()")
        refused(result, ErrorKind.SANDBOX, "os.fork")
        await still_works(sb)


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            line = next(x for x in status.splitlines() if x.startswith("Uid:"))
            if int(line.split()[1]) == uid:
                pids.append(int(entry))
    return pids


BOMB = """
import os, time
end = time.time() + 2
forks = refused = 0
while time.time() < end:
    try:
        if os.fork() == 0:
            forks = 0  # every child keeps forking too
        else:
            forks += 1
    except OSError:
        refused += 1
        time.sleep(0.005)
print("forks", forks, "refused", refused)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the kernel process cap needs a root host")
@async_test
async def test_fork_bomb_is_contained_by_the_process_cap_without_the_audit_hook(
    workdir: Path,
) -> None:
    limits = SandboxLimits(timeout_s=10, audit_hook=False, max_processes=16)
    sb = await start(workdir, limits)
    try:
        assert sb.isolation["process_cap"] and sb.isolation["uid"] != 0
        result = await sb.execute(BOMB)
        assert result.error is None, result.error
        forks, refused_count = (int(x) for x in result.stdout.split()[1::2])
        assert refused_count > 0  # the kernel said no
        assert forks < 16
        await still_works(sb)
        uid = sb.isolation["uid"]
    finally:
        await sb.close()
    deadline = time.time() + 5
    while _pids_of(uid) and time.time() < deadline:
        await asyncio.sleep(0.05)
    assert _pids_of(uid) == []  # nothing of the bomb outlives the sandbox


# -- limits ------------------------------------------------------------------------------------


@async_test
async def test_infinite_loop_is_interrupted_and_state_survives(workdir: Path) -> None:
    async with await start(workdir, FAST) as sb:
        t0 = time.perf_counter()
        result = await sb.execute("x = 41\nwhile True:\n    pass")
        assert time.perf_counter() - t0 < 5
        refused(result, ErrorKind.TIMEOUT, "1 s time limit", "stopped at line 2 of <step 1>")
        assert not result.state_lost
        after = await sb.execute("x + 1")
        assert after.error is None and after.stdout == "42\n"


@async_test
async def test_code_that_ignores_the_interrupt_is_killed_and_restarted(workdir: Path) -> None:
    async with await start(workdir, FAST) as sb:
        first_pid = sb.pid
        await sb.execute("x = 1")
        stubborn = (
            "while True:\n"
            "    try:\n"
            "        n = 0\n"
            "        while True:\n"
            "            n += 1\n"
            "    except BaseException:\n"  # swallows the interrupt, keeps looping
            "        pass"
        )
        result = await sb.execute(stubborn)
        refused(result, ErrorKind.TIMEOUT, "variables from earlier steps are lost")
        assert result.state_lost
        assert sb.pid != first_pid
        gone = await sb.execute("print('x' in globals())")
        assert gone.stdout == "False\n"


@async_test
async def test_cpu_limit(workdir: Path) -> None:
    limits = SandboxLimits(timeout_s=20, cpu_s=1)
    async with await start(workdir, limits) as sb:
        t0 = time.perf_counter()
        result = await sb.execute("n = 0\nwhile True:\n    n += 1")
        refused(result, ErrorKind.TIMEOUT, "CPU time limit")
        assert time.perf_counter() - t0 < 6
        await still_works(sb)


@async_test
async def test_allocating_20_gb_is_a_memory_error(workdir: Path) -> None:
    async with await start(workdir) as sb:
        result = await sb.execute("x = bytearray(20 * 1024**3)")
        refused(result, ErrorKind.MEMORY, "MemoryError", "2048 MB")
        result = await sb.execute("import numpy as np\nx = np.ones(20 * 1024**3 // 8)")
        refused(result, ErrorKind.MEMORY)
        await still_works(sb)


@async_test
async def test_printing_100_mb_is_cut_inside_the_worker(workdir: Path) -> None:
    async with await start(workdir, SandboxLimits(timeout_s=20)) as sb:
        tracemalloc.start()
        try:
            result = await sb.execute("for _ in range(100):\n    print('x' * 1_000_000)")
            _, host_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        refused(result, ErrorKind.OUTPUT_LIMIT, "65536")
        assert result.stdout.startswith("x" * 1000)
        assert len(result.stdout) < 65536 + 200
        assert "[output truncated: 99934564 more characters" in result.stdout
        assert host_peak < 5_000_000  # the host never held the 100 MB
        await still_works(sb)


# -- state, tools, answers ----------------------------------------------------------------------


@async_test
async def test_state_is_kept_between_steps(workdir: Path) -> None:
    async with await Sandbox.start(workdir, TOOLS, Host(workdir), ROOMY, preload=["numpy"]) as sb:
        preloaded = await sb.execute("import sys\nprint('numpy' in sys.modules)")
        assert preloaded.stdout == "True\n"
        await sb.execute("import statistics\ndef mean_of(xs):\n    return statistics.mean(xs)")
        await sb.execute("data = [1, 2, 3, 6]")
        result = await sb.execute("print(mean_of(data))")
        assert result.error is None and result.stdout == "3\n"


@async_test
async def test_forks_do_not_see_each_others_changes(workdir: Path) -> None:
    async with await start(workdir) as sb:
        await sb.execute("x = [1]\ncounter = 0")
        a, b = await sb.fork(), await sb.fork()
        try:
            assert len({sb.pid, a.pid, b.pid}) == 3
            await a.execute("x.append('a')\ncounter += 1")
            await b.execute("x.append('b')\ncounter += 10")
            assert (await a.execute("print(x, counter)")).stdout == "[1, 'a'] 1\n"
            assert (await b.execute("print(x, counter)")).stdout == "[1, 'b'] 10\n"
            assert (await sb.execute("print(x, counter)")).stdout == "[1] 0\n"
            # Candidates run at the same time, each calling tools through the one host.
            results = await asyncio.gather(
                *(f.execute(f"print(scale(counter, {k}))") for k, f in ((2, a), (3, b), (4, sb)))
            )
            assert [r.stdout for r in results] == ["2\n", "30\n", "0\n"]
            grandchild = await a.fork()
            await grandchild.execute("counter = -1")
            assert (await a.execute("print(counter)")).stdout == "1\n"
            await grandchild.close()
            await sb.close()  # candidates outlive the prefix they came from
            assert (await b.execute("print(counter)")).stdout == "10\n"
        finally:
            await a.close()
            await b.close()


@async_test
async def test_tool_calls_go_through_the_host(workdir: Path) -> None:
    host = Host(workdir)
    async with await start(workdir, host=host) as sb:
        result = await sb.execute(
            "import numpy as np\n"
            "a = scale(21)\n"
            "b = scale(value=3, factor=3)\n"
            "c = scale(np.float64(1.5), np.int64(4))\n"
            "entry = lookup('pi')\n"
            "print(a, b, c, entry['digits'][2])"
        )
        assert result.error is None, result.error
        assert result.stdout == "42.0 9 6.0 4\n"  # ints stay ints, as the tool got them
        assert host.calls == [
            ("scale", {"value": 21}),
            ("scale", {"value": 3, "factor": 3}),
            ("scale", {"value": 1.5, "factor": 4}),
            ("lookup", {"key": "pi"}),
        ]
        assert [c["name"] for c in result.tool_calls] == ["scale", "scale", "scale", "lookup"]
        assert result.tool_calls[0]["reply"] == "42.0"

        caught = await sb.execute(
            "try:\n    lookup('tau')\nexcept ToolError as e:\n    print('caught:', e)"
        )
        assert caught.error is None
        assert caught.stdout == "caught: no entry 'tau'; known keys: pi\n"
        uncaught = await sb.execute("lookup('tau')")
        refused(uncaught, ErrorKind.TOOL, "no entry 'tau'", "line 1")
        assert uncaught.tool_calls[0]["error"] == "no entry 'tau'; known keys: pi"

        wrong = await sb.execute("scale()")
        refused(wrong, ErrorKind.CODE, "TypeError", "value")
        opaque = await sb.execute("scale(object())")
        refused(opaque, ErrorKind.CODE, "cannot pass a object to a tool")
        assert len(host.calls) == 6  # bad calls never reached the host


@async_test
async def test_a_slow_tool_counts_against_the_time_limit(workdir: Path) -> None:
    async def slow(name: str, arguments: dict[str, Any]) -> ToolReply:
        await asyncio.sleep(30)
        return ToolReply(value=0)

    async with await Sandbox.start(workdir, TOOLS, slow, FAST) as sb:
        t0 = time.perf_counter()
        result = await sb.execute("y = 1\nscale(2)")
        assert time.perf_counter() - t0 < 5
        refused(result, ErrorKind.TIMEOUT)
        assert not result.state_lost
        assert (await sb.execute("y")).stdout == "1\n"


@async_test
async def test_final_answer_ends_the_step(workdir: Path) -> None:
    async with await start(workdir) as sb:
        result = await sb.execute(
            "total = scale(10.5)\nprint('total', total)\nfinal_answer(total)\nprint('after')"
        )
        assert result.error is None
        assert result.final_answer == "21"
        assert result.stdout == "total 21.0\n"
        assert result.tool_calls[-1] == {
            "name": "final_answer",
            "arguments": {"answer": "21"},
            "reply": None,
            "error": None,
        }
        nothing = await sb.execute("x = 1")
        assert nothing.final_answer is None


@async_test
async def test_code_errors_show_the_models_own_lines(workdir: Path) -> None:
    async with await start(workdir) as sb:
        result = await sb.execute("def f(n):\n    return 10 / n\n\nvalues = [f(2), f(0)]")
        refused(result, ErrorKind.CODE, "line 4", "line 2", "return 10 / n", "ZeroDivisionError")
        assert "_worker.py" not in result.error.message  # type: ignore[union-attr]
        syntax = await sb.execute("x = (1,\nprint(x)")
        refused(syntax, ErrorKind.CODE, "SyntaxError")
        quit_ = await sb.execute("y = 5\nexit()")
        assert quit_.error is None
        assert (await sb.execute("y")).stdout == "5\n"


@async_test
async def test_a_dead_worker_is_replaced(workdir: Path) -> None:
    async with await start(workdir) as sb:
        await sb.execute("x = 1")
        result = await sb.execute("import os\nos._exit(3)")
        refused(result, ErrorKind.SANDBOX, "lost")
        assert result.state_lost
        await still_works(sb)


# -- the kernel layers on their own -----------------------------------------------------------


@async_test
async def test_kernel_layers_hold_without_the_audit_hook(workdir: Path) -> None:
    limits = SandboxLimits(timeout_s=5, audit_hook=False)
    async with await start(workdir, limits) as sb:
        layers = sb.isolation
        if not layers["landlock_abi"] and not layers["network_namespace"]:
            pytest.skip("neither Landlock nor network namespaces on this kernel")
        if layers["landlock_abi"]:
            passwd = await sb.execute("print(open('/etc/passwd').read())")
            refused(passwd, ErrorKind.SANDBOX, "Permission denied")
            run = await sb.execute("import subprocess\nsubprocess.run(['/bin/true'])")
            refused(run, ErrorKind.SANDBOX, "Permission denied")
        net = await sb.execute(
            "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', 9))"
        )
        assert net.error is not None and net.error.kind in (ErrorKind.CODE, ErrorKind.SANDBOX)
        assert "unreachable" in net.error.message or "Permission denied" in net.error.message
