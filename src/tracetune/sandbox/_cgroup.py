"""A control group per sandbox: one process cap and one memory cap for its whole process
tree, and a kill that reaches every process in it (a ``setsid`` daemon included).

Both layouts are supported and detected at start:

* **cgroup v2** (unified, what systemd machines run): the sandbox gets
  ``<base>/tt-<id>`` with ``pids.max``, ``memory.max`` (and ``memory.swap.max = 0``) and
  optionally ``cpu.max``; it is killed through ``cgroup.kill`` (Linux >= 5.14), or frozen
  (``cgroup.freeze``) and then killed process by process. ``<base>`` is
  ``$TRACETUNE_CGROUP`` when set (a delegated directory for a non-root user, e.g. from
  ``systemd-run --user -p Delegate=yes``), else ``/sys/fs/cgroup/tracetune`` for root.
* **cgroup v1** (separate hierarchies): a ``tt-<id>`` group below the host's own group in
  the ``pids``, ``memory``, ``cpu`` and ``freezer`` hierarchies; killed by freezing it
  (``freezer.state``), signalling every task and thawing.

Where neither can be created (no root and no delegation, a read-only /sys/fs/cgroup), the
sandbox runs without this layer and says why in ``Sandbox.isolation``.

**Swap.** A memory cap that counts only RAM lets a group on a host with swap hold far more
than its cap (the excess is swapped out). The cap covers swap through ``memory.swap.max = 0``
(v2) or ``memory.memsw.limit_in_bytes`` (v1), and on v1 also ``memory.swappiness = 0`` (no
swapping when the group reaches its cap). Where the kernel offers none of these (swap
accounting switched off) and the host has swap, a watchdog thread sums each such group's RAM
and its members' swap every 50 ms and SIGKILLs the largest member when the sum passes the cap,
as the kernel's OOM killer would. ``Cgroup.swap`` says which of these holds.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
_V1_CONTROLLERS = ("pids", "memory", "cpu", "freezer")


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _own_groups() -> dict[str, str]:
    """controller (``""`` for v2) -> this process's group path, from /proc/self/cgroup."""
    groups: dict[str, str] = {}
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return groups
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            groups[name] = path
    return groups


def detect() -> tuple[str, str]:
    """(``"v2"``, ``"v1"`` or ``""``, why): which layout this host can give a sandbox."""
    if os.environ.get("TRACETUNE_CGROUP"):
        base = Path(os.environ["TRACETUNE_CGROUP"])
        if (base / "cgroup.controllers").exists():
            return "v2", f"delegated cgroup {base}"
        return "", f"TRACETUNE_CGROUP={base} is not a cgroup v2 directory"
    if (ROOT / "cgroup.controllers").exists():
        controllers = (ROOT / "cgroup.controllers").read_text().split()
        missing = {"pids", "memory"} - set(controllers)
        if missing:
            return "", f"cgroup v2 without the {', '.join(sorted(missing))} controller"
        if os.geteuid() != 0:
            return "", (
                "cgroup v2 needs root or a delegated directory (set TRACETUNE_CGROUP, e.g. "
                "under `systemd-run --user -p Delegate=yes`)"
            )
        return "v2", "cgroup v2"
    if all((ROOT / c / "cgroup.procs").exists() for c in ("pids", "memory")):
        if not os.access(ROOT / "pids", os.W_OK):
            return "", "cgroup v1 hierarchies are not writable (not root)"
        return "v1", "cgroup v1 (pids, memory, cpu, freezer hierarchies)"
    return "", "no cgroup v1 or v2 hierarchy found at /sys/fs/cgroup"


class Cgroup:
    """One sandbox's group: created, joined by the worker, killed whole, removed."""

    def __init__(self, version: str, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs  # controller -> group directory ("" for v2)
        # How swap is kept inside the memory cap (see the module docstring).
        self.swap = ""

    @classmethod
    def create(
        cls, memory_bytes: int, pids_max: int, cpus: float | None = None
    ) -> tuple[Cgroup | None, str]:
        """A new group with these limits, or (None, why not)."""
        version, why = detect()
        if not version:
            return None, why
        name = f"tt-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            if version == "v2":
                group = cls._create_v2(name, memory_bytes, pids_max, cpus)
            else:
                group = cls._create_v1(name, memory_bytes, pids_max, cpus)
        except OSError as exc:
            return None, f"{why}: could not create a group ({exc.strerror or exc})"
        if not group.swap:
            if _host_swap_bytes() == 0:
                group.swap = "no swap on this host"
            else:
                _GUARD.watch(group, memory_bytes)
                group.swap = "watchdog (the kernel does not account swap per group)"
        return group, why

    @classmethod
    def _create_v2(cls, name: str, memory_bytes: int, pids_max: int, cpus: float | None) -> Cgroup:
        delegated = os.environ.get("TRACETUNE_CGROUP")
        base = Path(delegated) if delegated else ROOT / "tracetune"
        if not delegated:
            _enable(ROOT, [c for c in ("pids", "memory", "cpu") if c in _controllers(ROOT)])
            base.mkdir(exist_ok=True)
        # The sandbox groups' controllers are enabled in their parent (which must hold no
        # process itself: a delegated directory is an empty group made for tracetune).
        _enable(base, [c for c in ("pids", "memory", "cpu") if c in _controllers(base)])
        group = base / name
        group.mkdir()
        made = cls("v2", {"": group})
        try:
            _write(group / "pids.max", str(pids_max))
            _write(group / "memory.max", str(memory_bytes))
            if (group / "memory.swap.max").exists():
                _write(group / "memory.swap.max", "0")
                made.swap = "memory.swap.max = 0"
            if cpus is not None and (group / "cpu.max").exists():
                _write(group / "cpu.max", f"{int(cpus * 100_000)} 100000")
        except OSError:
            made.remove()
            raise
        return made

    @classmethod
    def _create_v1(cls, name: str, memory_bytes: int, pids_max: int, cpus: float | None) -> Cgroup:
        own = _own_groups()
        dirs: dict[str, Path] = {}
        made = cls("v1", dirs)
        try:
            for controller in _V1_CONTROLLERS:
                hierarchy = _v1_hierarchy(controller)
                if hierarchy is None:
                    if controller in ("pids", "memory"):
                        raise OSError(f"no {controller} hierarchy")
                    continue
                parent = hierarchy / own.get(controller, "/").lstrip("/")
                group = parent / name
                group.mkdir()
                dirs[controller] = group
            _write(dirs["pids"] / "pids.max", str(pids_max))
            _write(dirs["memory"] / "memory.limit_in_bytes", str(memory_bytes))
            swap = []
            memsw = dirs["memory"] / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                with contextlib.suppress(OSError):
                    _write(memsw, str(memory_bytes))
                    swap.append("memory.memsw.limit_in_bytes")
            with contextlib.suppress(OSError):
                _write(dirs["memory"] / "memory.swappiness", "0")
                swap.append("memory.swappiness = 0")
            made.swap = ", ".join(swap)
            if cpus is not None and "cpu" in dirs:
                _write(dirs["cpu"] / "cpu.cfs_quota_us", str(int(cpus * 100_000)))
        except OSError:
            made.remove()
            raise
        return made

    # -- membership ---------------------------------------------------------------------
    def add(self, pid: int) -> None:
        """Move ``pid`` (a process the host verified) into this group, in every hierarchy."""
        for group in self.dirs.values():
            _write(group / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for group in self.dirs.values():
            with contextlib.suppress(OSError):
                found.update(int(x) for x in (group / "cgroup.procs").read_text().split())
        return sorted(found)

    def memory_used(self) -> int:
        """RAM charged to the group now, in bytes (0 where the kernel does not say)."""
        group = self.dirs.get("memory", self.dirs.get(""))
        for name in ("memory.current", "memory.usage_in_bytes"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if group is not None:
                    return int((group / name).read_text().split()[0])
        return 0

    def memory_peak(self) -> int | None:
        """Most memory the group has held, in bytes (None where the kernel does not say)."""
        group = self.dirs.get("memory", self.dirs.get(""))
        if group is None:
            return None
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            with contextlib.suppress(OSError, ValueError):
                return int((group / name).read_text().split()[0])
        return None

    # -- ending -------------------------------------------------------------------------
    def kill(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process in the group; True once it is empty."""
        deadline = time.monotonic() + timeout_s
        if self.version == "v2" and (self.dirs[""] / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                _write(self.dirs[""] / "cgroup.kill", "1")
        else:
            self._freeze(True, deadline)
            for pid in self.pids():
                _kill_member(pid, self)
            self._freeze(False, deadline)
        while time.monotonic() < deadline:
            members = self.pids()
            if not members:
                return True
            for pid in members:  # joined after the kill (a fork in flight)
                _kill_member(pid, self)
            time.sleep(0.005)
        return not self.pids()

    def _freeze(self, frozen: bool, deadline: float) -> None:
        if self.version == "v2":
            control, value, state = self.dirs[""] / "cgroup.freeze", "1" if frozen else "0", None
        elif "freezer" in self.dirs:
            control = self.dirs["freezer"] / "freezer.state"
            value = state = "FROZEN" if frozen else "THAWED"
        else:
            return
        try:
            _write(control, value)
        except OSError:
            return
        while frozen and time.monotonic() < deadline:
            try:
                if state is None:
                    events = (self.dirs[""] / "cgroup.events").read_text()
                    if "frozen 1" in events:
                        return
                elif control.read_text().strip() == state:
                    return
            except OSError:
                return
            time.sleep(0.002)

    def remove(self) -> None:
        """Kill what is left and delete the group's directories."""
        _GUARD.forget(self)
        if self.pids():
            self.kill()
        for group in self.dirs.values():
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _kill_member(pid: int, group: Cgroup) -> None:
    """SIGKILL ``pid`` through a pidfd, after checking (on the pinned process) that it is
    still in ``group``: a number read from cgroup.procs is never signalled blindly."""
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return
    try:
        if pid in group.pids():
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _host_swap_bytes() -> int:
    """SwapTotal of this host, in bytes (0 without swap or without /proc/meminfo)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _proc_memory(pid: int) -> tuple[int, int]:
    """(resident, swapped-out) bytes of one process ((0, 0) once it is gone)."""
    found = {"VmRSS:": 0, "VmSwap:": 0}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in found:
                found[key] = int(line.split()[1]) * 1024
    return found["VmRSS:"], found["VmSwap:"]


class _SwapGuard:
    """One daemon thread that keeps RAM plus swap of each watched group under its cap."""

    interval_s = 0.05

    def __init__(self) -> None:
        self._groups: dict[int, tuple[Cgroup, int]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def watch(self, group: Cgroup, cap_bytes: int) -> None:
        with self._lock:
            self._groups[id(group)] = (group, cap_bytes)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="tracetune-swap-guard", daemon=True
                )
                self._thread.start()

    def forget(self, group: Cgroup) -> None:
        with self._lock:
            self._groups.pop(id(group), None)

    def _run(self) -> None:
        while True:
            with self._lock:
                watched = list(self._groups.values())
            for group, cap in watched:
                self.check(group, cap)
            time.sleep(self.interval_s)

    @staticmethod
    def check(group: Cgroup, cap_bytes: int) -> int | None:
        """SIGKILL the largest member if the group holds more than ``cap_bytes`` of RAM and
        swap together; the pid killed, or None."""
        members = {pid: _proc_memory(pid) for pid in group.pids()}
        if not members:
            return None
        # RAM from the kernel's count (pages shared after fork counted once), swap per process.
        swapped = sum(swap for _, swap in members.values())
        if group.memory_used() + swapped <= cap_bytes:
            return None
        victim = max(members, key=lambda pid: sum(members[pid]))
        _kill_member(victim, group)
        return victim


_GUARD = _SwapGuard()


def _controllers(group: Path) -> list[str]:
    try:
        return (group / "cgroup.controllers").read_text().split()
    except OSError:
        return []


def _enable(group: Path, controllers: list[str]) -> None:
    try:
        enabled = set((group / "cgroup.subtree_control").read_text().split())
    except OSError:
        enabled = set()
    todo = [c for c in controllers if c not in enabled]
    if todo:
        _write(group / "cgroup.subtree_control", " ".join(f"+{c}" for c in todo))


def _v1_hierarchy(controller: str) -> Path | None:
    for candidate in (ROOT / controller, ROOT / "cpu,cpuacct" if controller == "cpu" else None):
        if candidate is not None and (candidate / "cgroup.procs").exists():
            return candidate
    return None
