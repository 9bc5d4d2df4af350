"""The sandbox boundary seen from the host: model-written code attacks the host side.

Each test is written as an attacker would write it: the code plants or races links at the
names the host will use, forges protocol frames, hides daemons, hogs memory and disk, or
calls the kernel directly. Every test asserts that the host's files, processes and memory
are untouched, and that the step's error (if any) is typed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tracetune.agent.code import CodeExecutor
from tracetune.agent.toolbox import ToolBox
from tracetune.sandbox import Sandbox, SandboxError, SandboxLimits, ToolReply, ToolStub
from tracetune.schema import Action, ErrorKind
from tracetune.store import AssetStore
from tracetune.tools import get_tool

pytestmark = pytest.mark.timeout(90)

# The audit hook is off in every attack: it gives the model clear errors, but code can get
# past it, so the host side and the kernel layers must hold without it.
LIMITS = SandboxLimits(timeout_s=20.0, audit_hook=False)
SECRET = "TOP-SECRET-HOST-CONTENT-8d1f"


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Host files the code must never reach: a secret text, a secret image, a config."""
    root = tmp_path / "host"
    root.mkdir(mode=0o700)
    (root / "secret.txt").write_text(SECRET)
    Image.new("RGB", (64, 64), (7, 7, 7)).save(root / "secret.png")
    (root / "config.ini").write_text("owner=host\n")
    for p in root.iterdir():
        p.chmod(0o600)
    return root


def host_unchanged(root: Path) -> None:
    assert sorted(p.name for p in root.iterdir()) == ["config.ini", "secret.png", "secret.txt"]
    assert (root / "config.ini").read_text() == "owner=host\n"
    assert (root / "secret.txt").read_text() == SECRET


async def executor(tmp_path: Path, *tools: str) -> tuple[CodeExecutor, AssetStore]:
    workdir = tmp_path / "work"
    workdir.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(workdir / "photo.png")
    (workdir / "docs").mkdir()
    (workdir / "docs" / "secret.txt").write_text("public notes")
    assets = AssetStore(tmp_path / "assets")
    toolbox = ToolBox([get_tool(t) for t in tools], workdir, assets)
    return await CodeExecutor.start(toolbox, LIMITS), assets


def code(source: str) -> Action:
    return Action(type="code", code=source)


# -- 1. host writes through planted and raced links ------------------------------------------


@async_test
async def test_tool_output_never_follows_a_link_planted_at_its_name(
    tmp_path: Path, host: Path
) -> None:
    ex, assets = await executor(tmp_path, "image_crop")
    try:
        dangling = host / "created_by_host.png"
        attack = f"""
import os
for k in range(3):
    os.symlink({str(dangling)!r}, f"image_crop_step1_{{k}}.png")
    os.symlink({str(host / "config.ini")!r}, f"image_crop-2_step1_{{k}}.png")
name = image_crop(image="photo.png", box=[0, 0, 16, 16])
print(name, os.path.islink(name))
"""
        out = await ex.execute(code(attack), 1)
        assert out.error is None, out.error
        name, is_link = out.observation.text.split()[:2]
        assert is_link == "False" and name.endswith(".png")
        saved = ex.toolbox.workdir / name
        assert not saved.is_symlink() and Image.open(saved).size == (16, 16)
        assert not dangling.exists() and not dangling.is_symlink()
        host_unchanged(host)
        assert assets.open_image(out.observation.images[0]).size == (16, 16)
    finally:
        await ex.close()


RACE = """
import os, threading, time
stop = time.time() + {seconds}
def flip(names, target):
    while time.time() < stop:
        for n in names:
            try:
                os.symlink(target, n + ".tmp")
                os.replace(n + ".tmp", n)
                os.unlink(n)
                open(n, "wb").close()
                os.unlink(n)
            except OSError:
                pass
names = [f"image_crop{{tag}}_step{{i}}_0.png" for i in range(1, 4) for tag in ("", "-2", "-3")]
t = threading.Thread(target=flip, args=(names, {target!r}), daemon=True)
t.start()
made = 0
while time.time() < stop:
    try:
        image_crop(image="photo.png", box=[0, 0, 8, 8])
        made += 1
    except ToolError:
        pass
t.join()
print("crops", made)
"""


@async_test
async def test_a_thread_flipping_output_names_between_link_and_file_never_reaches_the_host(
    tmp_path: Path, host: Path
) -> None:
    ex, _ = await executor(tmp_path, "image_crop")
    try:
        config = host / "config.ini"
        for step in (1, 2):
            src = RACE.format(seconds=1.5, target=str(config))
            out = await ex.execute(code(src), step)
            assert out.error is None, out.error
            made = re.search(r"crops (\d+)", out.observation.text)
            assert made is not None and int(made.group(1)) > 0, out.observation.text
        host_unchanged(host)
    finally:
        await ex.close()


# -- 4. a directory swapped for a link between the host's check and its open ---------------


SWAP = """
import os, threading, time
stop = time.time() + {seconds}
errors = set()
def swap():
    while time.time() < stop:
        for step in (lambda: os.rename("docs", "docs.real"),
                     lambda: os.symlink({host!r}, "docs"),
                     lambda: os.unlink("docs"),
                     lambda: os.rename("docs.real", "docs")):
            try:
                step()
            except OSError as exc:
                errors.add(repr(exc))
        time.sleep(0.001)
t = threading.Thread(target=swap, daemon=True)
t.start()
seen = set()
while time.time() < stop:
    for call in (lambda: inspect_file(path="docs/secret.txt")["markdown"],
                 lambda: str(image_crop(image="docs/secret.png", box=[0, 0, 4, 4]))):
        try:
            seen.add(call())
        except ToolError as exc:
            seen.add(type(exc).__name__)
t.join()
print(sorted(seen), sorted(errors)[:3])
"""


@async_test
async def test_a_directory_swapped_during_tool_calls_never_shows_host_files(
    tmp_path: Path, host: Path
) -> None:
    ex, assets = await executor(tmp_path, "inspect_file", "image_crop")
    try:
        out = await ex.execute(code(SWAP.format(seconds=2.0, host=str(host))), 1)
        assert out.error is None, out.error
        assert SECRET not in out.observation.text
        assert "public notes" in out.observation.text  # the real file was read
        # No crop of the host's secret image was made: every crop came from a workdir file.
        for ref in out.observation.images:
            assert assets.open_image(ref).getpixel((0, 0)) != (7, 7, 7)
        host_unchanged(host)
    finally:
        await ex.close()


# -- 2. M-TRACE file code that patches what the host runs next and swaps its output ----------


def test_file_code_cannot_patch_normalization_or_swap_its_output_for_a_host_file(
    tmp_path: Path, host: Path
) -> None:
    from mtrace_script import XLSX_CODE, Script
    from test_mtrace_stages import _config

    from tracetune.schema import Task
    from tracetune.store import Dataset
    from tracetune.synth.mtrace.pipeline import STAGES
    from tracetune.testing.openai_server import ScriptedOpenAIServer

    secret = str(host / "secret.txt")

    class Exfiltrate(Script):
        def code(self, text: str) -> str:
            if "budget.xlsx" in text:
                # Valid xlsx first; then every zipfile entry point the host might call
                # afterwards swaps the output for a link to a host file, and a thread does
                # the same a moment later, after the code step has returned.
                attack = (
                    XLSX_CODE
                    + f"""
import os, threading, time, zipfile
def swap(*args, **kwargs):
    try:
        os.replace("budget.xlsx", ".sandbox/kept.xlsx")
        os.symlink({secret!r}, "budget.xlsx")
    except OSError:
        pass
    return False
zipfile.is_zipfile = swap
zipfile.ZipFile.__init__ = lambda self, *a, **k: swap()
threading.Thread(target=lambda: (time.sleep(0.05), swap()), daemon=True).start()
"""
                )
                return f"```python\n{attack}\n```"
            return super().code(text)

    with ScriptedOpenAIServer(Exfiltrate()) as srv:
        config = _config(tmp_path, srv.base_url)

        async def up_to_files() -> None:
            for _, stage in STAGES[:3]:
                await stage(config, False)

        asyncio.run(up_to_files())
    tasks = Dataset.open(tmp_path / "run" / "tasks", Task)
    found = 0
    for task in tasks.records():
        for ref in task.files:
            data = tasks.assets.read_bytes(ref)
            assert SECRET.encode() not in data
            if ref.name == "budget.xlsx":
                found += 1
                assert data[:2] == b"PK"  # the real workbook, read before anything swapped it
    assert found == 1
    for blob in (tmp_path / "run").rglob("*"):
        if blob.is_file():
            assert SECRET.encode() not in blob.read_bytes(), blob
    host_unchanged(host)


# -- 3 and 10. a worker taken over by the code: forged fork replies and forged frames --------

EVIL_WORKER = """
import json, os, socket, sys
sys.path.insert(0, {worker_dir!r})
import _worker

VICTIM = {victim}


class Evil(_worker.Worker):
    def fork(self):
        mode = open({mode_file!r}).read().strip()
        fd = self.channel.fds.pop(0)
        sock = socket.socket(fileno=fd)
        if mode == "claim":  # say the victim is the fork; answer for it from here
            self.channel.send({{"op": "forked", "pid": VICTIM}})
            _worker.Channel(sock).send({{"op": "ready", "pid": VICTIM}})
        elif mode == "grandchild":  # the ready comes from a grandchild, not a child
            if os.fork() == 0:
                if os.fork() == 0:
                    _worker.Channel(sock).send({{"op": "ready", "pid": VICTIM}})
                    os._exit(0)
                os._exit(0)
            self.channel.send({{"op": "forked", "pid": VICTIM}})
        elif mode == "badpid":  # a real child, but a pid that is not a number
            if os.fork() == 0:
                _worker.Channel(sock).send({{"op": "ready", "pid": "x"}})
                os._exit(0)
            self.channel.send({{"op": "forked", "pid": "not a pid"}})
        sock.close()

    def run(self, code, step, cpu_s):
        forged = {{
            "kind": {{"op": "done", "stdout": "", "error": {{"kind": "bogus", "message": "m"}}}},
            "nokind": {{"op": "done", "stdout": "", "error": {{"message": 1}}}},
            "dropped": {{"op": "done", "stdout": "", "dropped": "many"}},
            "stdout": {{"op": "done", "stdout": 5}},
            "final": {{"op": "done", "stdout": "", "final_answer": {{"a": 1}}}},
            "op": {{"op": "forked", "pid": VICTIM}},
            "nodict": [1, 2],
        }}
        if code in forged:
            return forged[code]
        if code in ("bigtool", "midtool"):  # past the worker's check, onto the channel
            expression = "1+" * (3_500_000 if code == "bigtool" else 50_000) + "1"
            self.channel.send({{"op": "tool", "name": "calculator",
                               "arguments": {{"expression": expression}}}})
            reply = self.channel.recv()
            return {{"op": "done", "stdout": str(reply.get("error")), "error": None}}
        return super().run(code, step, cpu_s)

    def serve(self):
        while True:
            msg = self.channel.recv()
            if msg.get("op") == "exec" and msg["code"] == "nodict":
                self.channel.send_raw(b"[1, 2]")
                continue
            if msg.get("op") == "exec":
                self.channel.send(self.run(msg["code"], int(msg["step"]), int(msg["cpu_s"])))
            elif msg.get("op") == "fork":
                self.fork()


_worker.Worker = Evil
_worker.main()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def evil_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import tracetune.sandbox._sandbox as host_side

    victim = subprocess.Popen(["sleep", "60"])  # a process of the host user
    mode_file = tmp_path / "mode"
    script = tmp_path / "evil_worker.py"
    script.write_text(
        EVIL_WORKER.format(
            worker_dir=str(Path(host_side.WORKER_SCRIPT).parent),
            victim=victim.pid,
            mode_file=str(mode_file),
        )
    )
    script.chmod(0o644)
    monkeypatch.setattr(host_side, "WORKER_SCRIPT", script)
    yield victim, mode_file
    victim.kill()
    victim.wait()


async def _noop(name: str, arguments: dict[str, Any]) -> ToolReply:
    return ToolReply(value=None)


@async_test
async def test_a_forged_fork_reply_never_makes_the_host_signal_another_process(
    tmp_path: Path, evil_worker: tuple[subprocess.Popen[bytes], Path]
) -> None:
    victim, mode_file = evil_worker
    workdir = tmp_path / "work"
    workdir.mkdir()
    limits = SandboxLimits(timeout_s=10.0, startup_timeout_s=5.0, read_paths=(str(tmp_path),))
    fds = _open_fds()
    sb = await Sandbox.start(workdir, [], _noop, limits)
    try:
        for mode in ("claim", "grandchild", "badpid"):
            mode_file.write_text(mode)
            try:
                twin = await sb.fork()
            except SandboxError as exc:
                assert "fork failed" in str(exc)
            else:  # only a verified child can become a fork; closing it spares the victim
                assert mode == "badpid" and twin.pid != victim.pid
                await twin.close()
            assert _alive(victim.pid), mode
            result = await sb.execute("print('still here')")  # a fresh worker if needed
            assert result.stdout.strip() == "still here", result
    finally:
        await sb.close()
    time.sleep(0.2)
    assert _alive(victim.pid) and victim.poll() is None
    assert _open_fds() == fds  # no socket, pidfd or pipe left behind


@async_test
async def test_forged_frames_are_typed_sandbox_errors_without_leaks(
    tmp_path: Path, evil_worker: tuple[subprocess.Popen[bytes], Path]
) -> None:
    victim, _ = evil_worker
    workdir = tmp_path / "work"
    workdir.mkdir()
    limits = SandboxLimits(timeout_s=10.0, startup_timeout_s=5.0, read_paths=(str(tmp_path),))
    fds = _open_fds()
    sb = await Sandbox.start(workdir, [], _noop, limits)
    try:
        for forged in ("kind", "nokind", "dropped", "stdout", "final", "op", "nodict"):
            result = await sb.execute(forged)
            assert result.error is not None and result.error.kind == ErrorKind.SANDBOX, forged
            assert "protocol" in result.error.message and result.state_lost, result.error
            assert (await sb.execute("print(1)")).stdout == "1\n"
    finally:
        await sb.close()
    assert _alive(victim.pid)
    assert _open_fds() == fds


# -- 8. host DoS through the tool proxy ---------------------------------------------------------


@async_test
async def test_a_huge_calculator_expression_costs_the_host_nothing(tmp_path: Path) -> None:
    import resource

    ex, _ = await executor(tmp_path, "calculator")
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu = time.process_time()
        attack = """
results = []
for expr in ["1+" * 3_500_000 + "1", "9*" * 30_000 + "9", "(" * 5000 + "1" + ")" * 5000,
             "((10**100)**100)**100", "2**100*" * 200 + "1"]:
    try:
        results.append(str(calculator(expression=expr))[:50])
    except ToolError as exc:
        results.append("refused: " + str(exc)[:80])
print("\\n".join(results))
"""
        t0 = time.perf_counter()
        out = await ex.execute(code(attack), 1)
        took = time.perf_counter() - t0
        assert out.error is None, out.error
        lines = out.observation.text.splitlines()
        assert len(lines) == 5 and all(line.startswith("refused") for line in lines), lines
        assert "byte limit" in lines[0] and "characters long" in lines[1]
        assert took < 5 and time.process_time() - cpu < 3
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
        assert grown_mb < 300
        # The trajectory keeps a short preview of the 7 MB argument, not the argument.
        recorded = out.observation.data["tool_calls"]
        assert len(str(recorded)) < 5000
    finally:
        await ex.close()


@async_test
async def test_a_host_tool_thread_stops_at_the_steps_time_limit(tmp_path: Path) -> None:
    import threading

    from tracetune.tools import ToolContext, tool

    @tool(register=False)
    def spin(n: int) -> int:
        """Count forever.

        Args:
            n: Start.
        """
        while True:
            n += 1

    ctx = ToolContext(workdir=tmp_path)

    async def handler(name: str, arguments: dict[str, Any]) -> ToolReply:
        return ToolReply(value=(await spin.acall(ctx, arguments)).data)

    workdir = tmp_path / "work"
    workdir.mkdir()
    limits = SandboxLimits(timeout_s=1.0, grace_s=1.0, audit_hook=False)
    async with await Sandbox.start(workdir, [spin], handler, limits) as sb:
        result = await sb.execute("spin(1)")
        assert result.error is not None and result.error.kind == ErrorKind.TIMEOUT
        deadline = time.time() + 3
        while any(t.name == "tool:spin" for t in threading.enumerate()):
            assert time.time() < deadline, "the tool's thread kept running after the step"
            await asyncio.sleep(0.05)
        assert (await sb.execute("print(2)")).stdout == "2\n"


@async_test
async def test_an_oversized_tool_call_sent_past_the_worker_never_reaches_the_tool(
    tmp_path: Path, evil_worker: tuple[subprocess.Popen[bytes], Path]
) -> None:
    import resource

    calls: list[dict[str, Any]] = []

    async def calculator(name: str, arguments: dict[str, Any]) -> ToolReply:
        calls.append(arguments)
        return ToolReply(value=0)

    workdir = tmp_path / "work"
    workdir.mkdir()
    limits = SandboxLimits(timeout_s=10.0, read_paths=(str(tmp_path),))
    stub = ToolStub("calculator", ["expression"], ["expression"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with await Sandbox.start(workdir, [stub], calculator, limits) as sb:
        t0 = time.perf_counter()
        result = await sb.execute("bigtool")
        assert time.perf_counter() - t0 < 3
        middle = await sb.execute("midtool")  # 100 KB: a frame size allowed, the call not
    assert middle.error is None and "byte limit" in middle.stdout
    (call,) = middle.tool_calls
    assert call["error"] and len(str(call["arguments"])) < 1000  # recorded as a preview
    assert calls == []
    # The frame itself is over what an honest worker sends: refused before it is parsed.
    assert result.error is not None and result.error.kind == ErrorKind.SANDBOX
    assert "protocol" in result.error.message and "byte message" in result.error.message
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024 < 200


# -- 7. resources: daemons, memory of the whole tree, disk, processes ---------------------------


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


DAEMON = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open("daemon.pid", "w").write(str(os.getpid()))
        while True:
            with open("beat", "a") as f:
                f.write("x")
            time.sleep(0.02)
    os._exit(0)
while not os.path.exists("daemon.pid"):
    time.sleep(0.01)
time.sleep(0.1)
print("daemon", open("daemon.pid").read())
"""


@pytest.mark.parametrize("cgroup", [True, False], ids=["cgroup", "namespace-sweep"])
@async_test
async def test_a_setsid_daemon_does_not_survive_close(tmp_path: Path, cgroup: bool) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    sb = await Sandbox.start(workdir, [], _noop, LIMITS.model_copy(update={"cgroup": cgroup}))
    try:
        result = await sb.execute(DAEMON)
        assert result.error is None, result.error
        pid = int(result.stdout.split()[-1])
        assert not _gone(pid)
    finally:
        await sb.close()
    deadline = time.time() + 3
    while not _gone(pid):
        assert time.time() < deadline, f"daemon {pid} outlived the sandbox"
        time.sleep(0.02)
    size = (workdir / "beat").stat().st_size
    time.sleep(0.2)
    assert (workdir / "beat").stat().st_size == size


HOG = """
import os, time
for i in range(4):
    if os.fork() == 0:
        block = b"x" * (200 << 20)
        time.sleep(2.5)
        open(f"held{i}", "w").write("ok")  # only a child that kept its 200 MB to the end
        os._exit(0)
    time.sleep(0.3)
time.sleep(3)
print(sorted(n for n in os.listdir(".") if n.startswith("held")))
"""


@async_test
async def test_memory_is_capped_for_the_whole_process_tree(tmp_path: Path) -> None:
    """RAM and swap together: on a host with swap, a cap on RAM alone lets all four children
    keep their memory (swapped out), which is how this once failed on a CI host."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    limits = SandboxLimits(timeout_s=20.0, memory_mb=512, audit_hook=False)
    sb = await Sandbox.start(workdir, [], _noop, limits)
    try:
        if not sb.isolation.get("cgroup"):
            pytest.skip(f"no cgroup on this host: {sb.isolation.get('cgroup_detail')}")
        result = await sb.execute(HOG)
        if result.error is not None:  # the worker itself was one of those killed
            assert result.error.kind == ErrorKind.MEMORY, result.error
        held = len(list(workdir.glob("held*")))
        assert held <= 2, result  # 4 x 200 MB against a 512 MB cap for all of them
        assert sb.cgroup is not None
        peak = sb.cgroup.memory_peak()
        assert peak is None or peak <= 512 * 1024 * 1024
        # On a host with swap, the cap must hold for RAM and swap together; the report says how.
        assert sb.isolation["cgroup_swap"] == sb.cgroup.swap != ""
    finally:
        await sb.close()


HOG_REPORT = """
import os, sys, time
sys.stdin.read(1)  # wait until the test has put this process in the group
pids = []
for i in range(4):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (200 << 20)
        time.sleep(4)
        os._exit(0)
    pids.append(pid)
    time.sleep(0.3)
print(sum(os.waitpid(pid, 0)[1] == 9 for pid in pids))  # children ended by SIGKILL
"""


def test_the_swap_watchdog_keeps_a_group_under_its_cap(tmp_path: Path) -> None:
    """Where the kernel cannot count swap per group, the watchdog must: here the kernel's cap
    (2 GB) never fires, so only the watchdog's 512 MB cap can stop 4 x 200 MB."""
    from tracetune.sandbox import _cgroup

    group, why = _cgroup.Cgroup.create(2048 << 20, 16)
    if group is None:
        pytest.skip(f"no cgroup on this host: {why}")
    guard = _cgroup._SwapGuard()
    hog = subprocess.Popen(
        [sys.executable, "-c", HOG_REPORT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        group.add(hog.pid)
        guard.watch(group, 512 << 20)
        out, _ = hog.communicate("x", timeout=30)
        assert hog.returncode == 0, out
        assert int(out) >= 2, out  # 600 MB would be over the cap: two of the four must go
        assert group.memory_used() <= 512 << 20
    finally:
        guard.forget(group)
        hog.kill()
        group.remove()


# -- 5. Unix sockets of the host user ------------------------------------------------------------


@async_test
async def test_unix_sockets_of_the_host_user_are_unreachable(tmp_path: Path) -> None:
    import socket

    sockdir = tmp_path / "run"
    sockdir.mkdir(mode=0o755)
    path = str(sockdir / "agent.sock")
    listeners = []
    for address in (path, f"\0tracetune-test-{os.getpid()}"):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen(4)
        server.setblocking(False)
        listeners.append(server)
    os.chmod(path, 0o600)  # like ssh-agent's: the host user's alone
    workdir = tmp_path / "work"
    workdir.mkdir()
    attack = f"""
import socket, _socket
results = []
for address in ({path!r}, "\\0tracetune-test-{os.getpid()}"):
    for make in (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
                 lambda: _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM),
                 lambda: socket.socketpair()[0]):
        try:
            s = make()
            s.connect(address)
            results.append("connected")
        except OSError as exc:
            results.append(type(exc).__name__)
print(results)
"""
    try:
        async with await Sandbox.start(workdir, [], _noop, LIMITS) as sb:
            result = await sb.execute(attack)
            assert result.error is None, result.error
            assert "connected" not in result.stdout and "PermissionError" in result.stdout
        for server in listeners:
            with pytest.raises(BlockingIOError):
                server.accept()  # nobody ever connected
    finally:
        for server in listeners:
            server.close()


# -- 9. the kernel surface, called directly through ctypes -----------------------------------


KERNEL = """
import ctypes, errno, os, platform
libc = ctypes.CDLL(None, use_errno=True)
x86 = platform.machine() == "x86_64"
nr = {"io_uring_setup": 425, "keyctl": 250 if x86 else 219, "bpf": 321 if x86 else 280,
      "clone": 56 if x86 else 220, "personality": 135 if x86 else 92}
params = ctypes.create_string_buffer(128)
calls = {
    "unshare_user_ns": lambda: libc.unshare(0x10000000 | 0x00020000),
    "unshare_net": lambda: libc.unshare(0x40000000),
    "chroot": lambda: libc.chroot(b"."),
    "mount": lambda: libc.mount(b"none", b".", b"tmpfs", 0, None),
    "io_uring_setup": lambda: libc.syscall(nr["io_uring_setup"], 8, params),
    "keyctl": lambda: libc.syscall(nr["keyctl"], 0, -3, 0),
    "bpf": lambda: libc.syscall(nr["bpf"], 0, None, 0),
    "personality": lambda: libc.syscall(nr["personality"], 0x0040000),
    "ptrace_attach_parent": lambda: libc.ptrace(16, os.getppid(), None, None),
    "clone_newuser": lambda: libc.syscall(nr["clone"], 0x10000000 | 17, None, None, None, None),
    "setns": lambda: libc.setns(os.open("/proc/self/ns/net", os.O_RDONLY), 0),
}
out = {}
for name, call in calls.items():
    ctypes.set_errno(0)
    try:
        rc = call()
    except OSError as exc:
        out[name] = "os:" + errno.errorcode.get(exc.errno, "?")
        continue
    out[name] = "ok" if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
    if rc == 0 and name == "clone_newuser":
        os._exit(0)
print(out)
"""


@async_test
async def test_kernel_calls_through_ctypes_are_refused(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    async with await Sandbox.start(workdir, [], _noop, LIMITS) as sb:
        assert sb.isolation["seccomp"] in ("x86_64", "aarch64"), sb.isolation
        result = await sb.execute(KERNEL)
        assert result.error is None, result.error
        out = eval(result.stdout)
        assert "ok" not in out.values(), out
        for name in ("unshare_user_ns", "chroot", "io_uring_setup", "keyctl", "personality"):
            assert out[name] == "EPERM", (name, out)
        assert (await sb.execute("print('alive')")).stdout == "alive\n"


# -- 6. switching the audit hook off through what the code is given -------------------------


HOOK_SWITCH = """
import signal
seen, queue, found = set(), [final_answer, scale, signal.getsignal(signal.SIGUSR1)], []
while queue:
    obj = queue.pop()
    if id(obj) in seen or len(seen) > 20000:
        continue
    seen.add(id(obj))
    if hasattr(obj, "trusted") or hasattr(obj, "policy") or hasattr(obj, "hook"):
        found.append(type(obj).__name__)
        for target in (obj, getattr(obj, "policy", None)):
            try:
                target.trusted = True
            except Exception:
                pass
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            queue.append(cell.cell_contents)
        except ValueError:
            pass
    for attr in ("__self__", "__func__", "__wrapped__"):
        if hasattr(obj, attr):
            queue.append(getattr(obj, attr))
    if isinstance(obj, (list, tuple, set)):
        queue.extend(obj)
    elif isinstance(obj, dict):
        queue.extend(obj.values())
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        queue.extend(vars(obj).values())
print("found", found)
try:
    open({secret!r}).read()
    print("read the secret")
except PermissionError as exc:
    print("refused")
"""


@async_test
async def test_the_audit_hook_cannot_be_switched_off_through_closures(
    tmp_path: Path, host: Path
) -> None:
    from tracetune.tools import tool

    @tool(register=False)
    def scale(value: float) -> float:
        """Double a number.

        Args:
            value: The number.
        """
        return value * 2

    workdir = tmp_path / "work"
    workdir.mkdir()
    limits = SandboxLimits(timeout_s=20.0)  # the hook on, as in normal use
    async with await Sandbox.start(workdir, [scale], _noop, limits) as sb:
        result = await sb.execute(HOOK_SWITCH.format(secret=str(host / "secret.txt")))
        assert result.error is None, result.error
        assert "found []" in result.stdout, result.stdout
        assert "refused" in result.stdout and SECRET not in result.stdout
        # The hook still refuses what it refused before the attempt.
        refused = await sb.execute("import os\nos.system('true')")
        assert refused.error is not None and refused.error.kind == ErrorKind.SANDBOX
    host_unchanged(host)


BOMB = """
import os, time
end = time.time() + 1.5
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
if refused:
    print("refused", refused)
"""


@async_test
async def test_a_fork_bomb_is_capped_and_gone_after_close(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    limits = LIMITS.model_copy(update={"max_processes": 16, "timeout_s": 15.0})
    sb = await Sandbox.start(workdir, [], _noop, limits)
    try:
        assert sb.isolation.get("process_cap") or sb.isolation.get("cgroup"), sb.isolation
        result = await sb.execute(BOMB)
        assert result.error is None or result.error.kind in (ErrorKind.TIMEOUT, ErrorKind.MEMORY)
        assert "refused" in result.stdout  # the kernel said no
        ns = os.stat(f"/proc/{sb.pid}/ns/net").st_ino
    finally:
        await sb.close()
    time.sleep(0.1)
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == ns and not _gone(int(entry)):
                    left.append(entry)
            except OSError:
                pass
    assert left == []


# -- the key attacks again, from a host that is not root ---------------------------------------

NON_ROOT_KEYS = (
    "planted or flipping or swapped or forged or oversized or daemon or unix or kernel "
    "or closures or fork_bomb or calculator or hidden"
)


def _python_for(uid: int) -> str | None:
    """A Python of this version that ``uid`` can execute (this one may live under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        probe = subprocess.run(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                candidate,
                "-c",
                "import subprocess, sys; subprocess.run([sys.executable, '-c', ''], check=True)",
            ],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 65534 needs a root test run")
@pytest.mark.skipif(bool(os.environ.get("TRACETUNE_NON_ROOT_RUN")), reason="already non-root")
@pytest.mark.timeout(300)
def test_key_attacks_also_fail_from_a_non_root_host() -> None:
    import shutil
    import site
    import tempfile

    import tracetune

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    python = _python_for(65534)
    if python is None:
        pytest.skip("no Python of this version is executable by uid 65534")
    # Outside pytest's per-user base directory, which is 0700.
    base = Path(tempfile.mkdtemp(prefix="tracetune-nonroot-"))
    base.chmod(0o777)
    src = str(Path(tracetune.__file__).parents[1])
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(base),
        "LANG": "C.UTF-8",
        "TRACETUNE_NON_ROOT_RUN": "1",
        "PYTHONPATH": os.pathsep.join([src, *site.getsitepackages()]),
    }
    command = [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-m", "pytest",
        str(Path(__file__)), "-q", "-x", "-p", "no:cacheprovider", "-k", NON_ROOT_KEYS,
        f"--basetemp={base / 'pytest'}",
    ]  # fmt: skip
    try:
        run = subprocess.run(
            command, env=env, cwd=str(base), capture_output=True, text=True, timeout=280,
            check=False,
        )  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-2000:]


FILLER = """
import os
written = 0
try:
    for i in range(1000):
        with open(f"fill{i}.bin", "wb") as f:
            for _ in range(16):
                f.write(b"x" * (1 << 20))
                written += 1 << 20
except OSError as exc:
    print("stopped", exc.errno, written >> 20)
"""


@async_test
async def test_a_disk_filler_stops_at_the_workdir_cap(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "task.txt").write_text("the task's file")
    limits = LIMITS.model_copy(update={"workdir_mb": 64})
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    sb = await Sandbox.start(workdir, [], _noop, limits)
    try:
        if not sb.isolation.get("workdir_cap"):
            pytest.skip(f"no size-capped workdir here: {sb.isolation.get('workdir_cap_detail')}")
        result = await sb.execute(FILLER)
        assert result.error is None, result.error
        _, errno_, megabytes = result.stdout.split()
        assert int(errno_) == 28 and int(megabytes) <= 64  # ENOSPC at the cap
        uncaught = await sb.execute("open('more.bin', 'wb').write(b'x' * (80 << 20))")
        assert uncaught.error is not None and uncaught.error.kind == ErrorKind.SANDBOX
        assert "64 MB" in uncaught.error.message
        await sb.execute(
            "import os\nfor n in os.listdir('.'):\n    n.endswith('.bin') and os.remove(n)\n"
            "open('answer.txt', 'w').write('42')"
        )
    finally:
        await sb.close()
    # The host's disk never held the filler; the files the code kept are back in place.
    now = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert free - now < 32 << 20
    assert not os.path.ismount(workdir)
    assert (workdir / "task.txt").read_text() == "the task's file"
    assert (workdir / "answer.txt").read_text() == "42"


# -- snapshots of the working directory (exploration branches) ---------------------------------


def test_workspace_snapshots_never_follow_links_raced_into_the_workdir(
    tmp_path: Path, host: Path
) -> None:
    import threading

    from tracetune.prefs.base import Workspace

    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    (workdir / "sub").mkdir()
    workspace = Workspace(workdir)
    first = workspace.save()
    stop = time.time() + 2.0

    def flip() -> None:  # what a thread left running by the code would do
        while time.time() < stop:
            for name in ("notes.txt", "sub", "fresh.txt"):
                target = host / ("config.ini" if name != "sub" else "")
                try:
                    os.symlink(target, workdir / (name + ".tmp"))
                    os.replace(workdir / (name + ".tmp"), workdir / name)
                except OSError:
                    pass

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        saves = 0
        while time.time() < stop:
            try:
                snapshot = workspace.save()
                saves += 1
                workspace.load(first)
                workspace.load(snapshot)
            except OSError:
                pass  # the race may break a copy; it must never leak or overwrite
    finally:
        flipper.join()
    assert saves > 0
    for path in workspace.root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET not in path.read_text(errors="replace")
            assert "owner=host" not in path.read_text(errors="replace")
    host_unchanged(host)
    workspace.cleanup()


@async_test
async def test_host_tmp_run_and_home_are_hidden(tmp_path: Path) -> None:
    import tempfile

    planted = Path(tempfile.mkdtemp(prefix="tracetune-hidden-"))  # another user's /tmp file
    (planted / "note.txt").write_text(SECRET)
    planted.chmod(0o755)
    (planted / "note.txt").chmod(0o644)  # world-readable: only hiding keeps it away
    workdir = tmp_path / "work"
    workdir.mkdir()
    attack = f"""
import os
seen = {{}}
for d in ("/tmp", "/run", "/dev/shm", {str(Path.home())!r}, {str(planted)!r}):
    try:
        seen[d] = sorted(os.listdir(d))[:5]
    except OSError as exc:
        seen[d] = type(exc).__name__
try:
    seen["note"] = open({str(planted / "note.txt")!r}).read()
except OSError as exc:
    seen["note"] = type(exc).__name__
print(seen)
"""
    try:
        async with await Sandbox.start(workdir, [], _noop, LIMITS) as sb:
            if not sb.isolation.get("mount_namespace"):
                pytest.skip(f"no mount namespace here: {sb.isolation.get('notes')}")
            assert "/tmp" in sb.isolation["hidden"]
            result = await sb.execute(attack)
            assert result.error is None, result.error
            assert SECRET not in result.stdout
            seen = eval(result.stdout)
            assert seen[str(planted)] in ("FileNotFoundError", "PermissionError", [])
            # The working directory (under /tmp here) is still there and writable.
            assert (await sb.execute("open('ok', 'w').write('1')")).error is None
        assert (workdir / "ok").read_text() == "1"
    finally:
        import shutil

        shutil.rmtree(planted, ignore_errors=True)


def test_cgroup_v2_layout_is_created_limited_and_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cgroup v2 code path on a stand-in tree (this CI host runs v1 for pids and memory;
    the kernel's own files are plain files here, so this checks what is written and that
    every listed member is killed, not the kernel's enforcement, which the v1 tests do)."""
    from tracetune.sandbox import _cgroup

    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (root / "cgroup.subtree_control").write_text("")
    monkeypatch.setattr(_cgroup, "ROOT", root)
    monkeypatch.delenv("TRACETUNE_CGROUP", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert _cgroup.detect()[0] == "v2"
    group, why = _cgroup.Cgroup.create(512 << 20, 16, cpus=0.5)
    assert group is not None, why
    directory = group.dirs[""]
    assert directory.parent == root / "tracetune"
    assert (root / "cgroup.subtree_control").read_text() == "+pids +memory +cpu"
    assert (directory / "pids.max").read_text() == "16"
    assert (directory / "memory.max").read_text() == str(512 << 20)
    victim = subprocess.Popen(["sleep", "30"])
    try:
        group.add(victim.pid)
        assert group.pids() == [victim.pid]
        (directory / "cgroup.kill").write_text("")
        group.kill(timeout_s=0.3)
        assert victim.wait(timeout=5) == -9
    finally:
        victim.kill()
    # Without a delegated directory, a non-root host is told how to get one.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    version, why = _cgroup.detect()
    assert version == "" and "TRACETUNE_CGROUP" in why


# -- the layer report and the minimum level ------------------------------------------------------


@async_test
async def test_a_sandbox_below_the_required_level_refuses_to_start(tmp_path: Path) -> None:
    from tracetune.sandbox import isolation_level, layers

    workdir = tmp_path / "work"
    workdir.mkdir()
    weak = SandboxLimits(seccomp=False, min_level="strict")
    with pytest.raises(SandboxError, match="missing: seccomp"):
        await Sandbox.start(workdir, [], _noop, weak)
    async with await Sandbox.start(workdir, [], _noop, SandboxLimits()) as sb:
        rows = {name: on for name, on, _ in layers(sb.isolation)}
        assert rows["process"] and rows["rlimits"]
        assert set(rows) >= {"seccomp", "cgroup", "landlock", "network_namespace"}
        assert sb.isolation["level"] == isolation_level(sb.isolation)


def test_tools_sandbox_command_reports_layers_and_enforces_a_level(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from tracetune.cli import app

    result = CliRunner().invoke(app, ["tools", "sandbox", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["level"] in ("basic", "standard", "strict")
    assert {row["layer"] for row in report["layers"]} >= {"seccomp", "cgroup", "audit_hook"}
    monkeypatch.setenv("TRACETUNE_SANDBOX_MIN_LEVEL", "bogus")
    with pytest.raises(ValueError, match="TRACETUNE_SANDBOX_MIN_LEVEL"):
        SandboxLimits()
    bad = CliRunner().invoke(app, ["tools", "sandbox", "--min-level", "extreme"])
    assert bad.exit_code == 2 and "choose one of" in bad.output
