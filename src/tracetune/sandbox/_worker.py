"""The sandbox worker: runs one episode's model-written Python, away from the host.

The host starts it as ``python -I _worker.py FD`` (see ``tracetune.sandbox``), where FD is
one end of a socketpair. It imports only the standard library so that it starts in a few
tens of milliseconds, and it never imports tracetune: nothing of the host lives here.

Protocol: frames of a 4-byte big-endian length and a UTF-8 JSON object, both ways. The
host sends ``config`` once, then ``exec`` / ``fork`` / ``exit``; during an ``exec`` the
worker may send ``tool`` requests and waits for each ``tool_result``; every ``exec`` ends
with one ``done``. A ``fork`` request carries a new socket as SCM_RIGHTS ancillary data;
the forked child talks to the host over it.

Setup order matters: namespaces and mounts need root (or a user namespace); rlimits are set
while still privileged; the uid drop removes capabilities; Landlock needs no_new_privs; the
audit hook comes last because it refuses the very calls the setup makes.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import json
import linecache
import os
import resource
import signal
import socket
import struct
import sys
import time
import traceback
import types
from collections.abc import Iterator
from typing import Any

_HEADER = struct.Struct(">I")
_MAX_FDS = 4

# -- channel --------------------------------------------------------------------------------


class Channel:
    """Blocking framed JSON over a Unix socket; collects file descriptors passed to it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []

    def send(self, obj: dict[str, Any]) -> None:
        self.send_raw(json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace"))

    def send_raw(self, body: bytes) -> None:
        self.sock.sendall(_HEADER.pack(len(body)) + body)

    def recv(self) -> dict[str, Any]:
        while True:
            if len(self.buf) >= 4:
                (size,) = _HEADER.unpack_from(self.buf)
                if len(self.buf) >= 4 + size:
                    body = bytes(self.buf[4 : 4 + size])
                    del self.buf[: 4 + size]
                    message: dict[str, Any] = json.loads(body)
                    return message
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, _MAX_FDS)
            self.fds.extend(fds)
            if not data:
                raise EOFError("host closed the channel")
            self.buf += data

    def close(self) -> None:
        self.sock.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


# -- isolation: namespaces, mounts, Landlock (Linux) ----------------------------------------

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_SYS_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self (generic table)

# Landlock filesystem rights, by the ABI version that introduced them.
_LL_EXECUTE = 1 << 0
_LL_WRITE_FILE = 1 << 1
_LL_READ_FILE = 1 << 2
_LL_READ_DIR = 1 << 3
_LL_REMOVE_DIR = 1 << 4
_LL_REMOVE_FILE = 1 << 5
_LL_MAKE_CHAR = 1 << 6
_LL_MAKE_DIR = 1 << 7
_LL_MAKE_REG = 1 << 8
_LL_MAKE_SOCK = 1 << 9
_LL_MAKE_FIFO = 1 << 10
_LL_MAKE_BLOCK = 1 << 11
_LL_MAKE_SYM = 1 << 12
_LL_REFER = 1 << 13  # ABI 2
_LL_TRUNCATE = 1 << 14  # ABI 3
_LL_IOCTL_DEV = 1 << 15  # ABI 5
_LL_NET_ALL = (1 << 0) | (1 << 1)  # bind/connect TCP, ABI 4
_LL_SCOPE_ALL = (1 << 0) | (1 << 1)  # abstract unix sockets, signals, ABI 6


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _errno_text() -> str:
    import ctypes

    return os.strerror(ctypes.get_errno())


def _write_proc(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _traversable(path: str, uid: int, gid: int) -> bool:
    """Whether ``uid`` may search ``path`` by its mode bits (root's DAC override aside)."""
    st = os.stat(path)
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _blocked_ancestor(path: str, uid: int, gid: int) -> str | None:
    parts = path.split(os.sep)
    for i in range(1, len(parts)):
        ancestor = os.sep.join(parts[:i]) or os.sep
        if not _traversable(ancestor, uid, gid):
            return ancestor
    return None


def _expose(libc: Any, paths: list[str], uid: int, gid: int) -> list[str]:
    """Make ``paths`` reachable for ``uid`` inside this (private) mount namespace.

    A Python installed under /root (pyenv, a venv in a home directory) or a pytest tmp dir
    under /tmp/pytest-of-root sits below a 0700 directory that the unprivileged uid cannot
    search. Mounting a small tmpfs over that ancestor hides everything else in it, and bind
    mounts put back exactly the paths the sandbox needs. Returns the ancestors covered.
    """
    by_ancestor: dict[str, list[str]] = {}
    for path in sorted(set(paths)):
        ancestor = _blocked_ancestor(path, uid, gid)
        if ancestor is not None:
            by_ancestor.setdefault(ancestor, []).append(path)
    for ancestor, inside in by_ancestor.items():
        kept: list[str] = []
        for path in inside:  # sorted: a parent comes before its children
            if not any(path == k or path.startswith(k + os.sep) for k in kept):
                kept.append(path)
        handles = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in kept}
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        if libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", flags, b"mode=0755,size=64k") != 0:
            raise OSError(f"mount tmpfs on {ancestor}: {_errno_text()}")
        for path, fd in handles.items():
            os.makedirs(path, mode=0o755, exist_ok=True)
            source = f"/proc/self/fd/{fd}".encode()
            if libc.mount(source, path.encode(), None, _MS_BIND | _MS_REC, None) != 0:
                raise OSError(f"bind mount {path}: {_errno_text()}")
            os.close(fd)
    return sorted(by_ancestor)


def _hidden_dirs(config: dict[str, Any]) -> list[str]:
    """Host directories a sandbox must not see: temporary files, runtime sockets, homes."""
    dirs = ["/tmp", "/var/tmp", "/run", "/var/run", "/dev/shm", "/root", "/home"]
    home = config.get("host_home")
    if isinstance(home, str) and home.startswith("/") and home != "/":
        dirs.append(home)
    return dirs


def _hide(libc: Any, hidden: list[str], keep: list[str]) -> list[str]:
    """Cover each of ``hidden`` with an empty tmpfs in this (private) mount namespace and
    bind back the ``keep`` paths inside it; returns the directories covered.

    A directory that holds a kept path's ancestor, or lies inside a kept path, stays as it
    is (covering it would hide what must stay visible).
    """
    real: list[str] = []
    for path in dict.fromkeys(os.path.realpath(h) for h in hidden):
        if not os.path.isdir(path) or os.path.ismount(path) and path in ("/", "/proc", "/sys"):
            continue
        if any(k == path or path.startswith(k.rstrip(os.sep) + os.sep) for k in keep):
            continue
        if any(path.startswith(r + os.sep) for r in real):
            continue  # inside one already covered
        real.append(path)
    covered = []
    for path in real:
        inside = sorted(k for k in keep if k.startswith(path + os.sep))
        kept: list[str] = []
        for k in inside:  # a parent comes before its children
            if not any(k == p or k.startswith(p + os.sep) for p in kept):
                kept.append(k)
        handles = {}
        for k in kept:
            with contextlib.suppress(OSError):
                handles[k] = os.open(k, os.O_PATH | os.O_CLOEXEC)
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        if libc.mount(b"tmpfs", path.encode(), b"tmpfs", flags, b"mode=0755,size=64k") != 0:
            for fd in handles.values():
                os.close(fd)
            continue
        for k, fd in handles.items():
            try:
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.makedirs(k, mode=0o755, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(k), mode=0o755, exist_ok=True)
                    open(k, "a").close()
                source = f"/proc/self/fd/{fd}".encode()
                if libc.mount(source, k.encode(), None, _MS_BIND | _MS_REC, None) != 0:
                    raise OSError(f"bind mount {k}: {_errno_text()}")
            finally:
                os.close(fd)
        covered.append(path)
    return covered


def _landlock(libc: Any, read_paths: list[str], write_paths: list[str]) -> int:
    """Confine this process (and its forks) to the given paths; returns the ABI used (0: none)."""
    import ctypes

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    create, add_rule, restrict = _SYS_LANDLOCK
    abi = libc.syscall(create, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return 0
    handled = (1 << 13) - 1
    if abi >= 2:
        handled |= _LL_REFER
    if abi >= 3:
        handled |= _LL_TRUNCATE
    if abi >= 5:
        handled |= _LL_IOCTL_DEV
    attr = RulesetAttr(handled, _LL_NET_ALL if abi >= 4 else 0, _LL_SCOPE_ALL if abi >= 6 else 0)
    size = ctypes.sizeof(RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = libc.syscall(create, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise OSError(f"landlock_create_ruleset: {_errno_text()}")
    file_rights = _LL_READ_FILE | _LL_WRITE_FILE | (_LL_TRUNCATE if abi >= 3 else 0)
    write_rights = handled & ~(_LL_EXECUTE | _LL_MAKE_CHAR | _LL_MAKE_BLOCK | _LL_IOCTL_DEV)
    try:
        for paths, rights in (
            (read_paths, _LL_READ_FILE | _LL_READ_DIR),
            (write_paths, write_rights),
        ):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = rights if os.path.isdir(path) else rights & file_rights
                    rule = PathBeneath(allowed, fd)
                    if libc.syscall(add_rule, ruleset, 1, ctypes.byref(rule), 0) != 0:
                        raise OSError(f"landlock_add_rule {path}: {_errno_text()}")
                finally:
                    os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(f"no_new_privs: {_errno_text()}")
        if libc.syscall(restrict, ruleset, 0) != 0:
            raise OSError(f"landlock_restrict_self: {_errno_text()}")
    finally:
        os.close(ruleset)
    return int(abi)


# -- seccomp: a small BPF filter, no library ------------------------------------------------

_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# Denied outright: namespaces and mounts, io_uring (a second way to every syscall), keys,
# bpf, ptrace and memory of other processes, personality, kernel modules, kexec, handles.
_DENIED_SYSCALLS = {
    "x86_64": {
        "unshare": 272,
        "setns": 308,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "bpf": 321,
        "ptrace": 101,
        "personality": 135,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "perf_event_open": 298,
        "userfaultfd": 323,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "open_by_handle_at": 304,
        "name_to_handle_at": 303,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "acct": 163,
        "swapon": 167,
        "swapoff": 168,
        "quotactl": 179,
    },
    "aarch64": {
        "unshare": 97,
        "setns": 268,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "bpf": 280,
        "ptrace": 117,
        "personality": 92,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "perf_event_open": 241,
        "userfaultfd": 282,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "open_by_handle_at": 265,
        "name_to_handle_at": 264,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "acct": 89,
        "swapon": 224,
        "swapoff": 225,
        "quotactl": 60,
    },
}
# Checked by argument: clone with a CLONE_NEW* flag; socket/socketpair of AF_UNIX (a
# pathname socket of the host user, e.g. ssh-agent or docker, is reachable by connect(),
# which seccomp cannot inspect: so no Unix socket can be made at all). clone3 passes its
# flags in memory that a filter cannot read: it answers ENOSYS, and libc falls back to clone.
_ARG_SYSCALLS = {
    "x86_64": {"clone": 56, "clone3": 435, "socket": 41, "socketpair": 53},
    "aarch64": {"clone": 220, "clone3": 435, "socket": 198, "socketpair": 199},
}
_CLONE_NEW_ANY = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def _bpf_program(arch: str) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions for ``arch`` (x86_64 or aarch64)."""
    import errno as errnos

    ld_w_abs, jeq_k, jset_k, jge_k, ret_k = 0x20, 0x15, 0x45, 0x35, 0x06
    eperm = _SECCOMP_RET_ERRNO | errnos.EPERM
    enosys = _SECCOMP_RET_ERRNO | errnos.ENOSYS
    denied = sorted(set(_DENIED_SYSCALLS[arch].values()))
    args = _ARG_SYSCALLS[arch]
    prog: list[tuple[int, int, int, int]] = [
        (ld_w_abs, 0, 0, 4),  # seccomp_data.arch
        (jeq_k, 1, 0, _AUDIT_ARCH[arch]),
        (ret_k, 0, 0, eperm),  # any other ABI (i386 compat calls on x86_64): refused
        (ld_w_abs, 0, 0, 0),  # seccomp_data.nr
    ]
    if arch == "x86_64":
        prog += [(jge_k, 0, 1, 0x40000000), (ret_k, 0, 0, eperm)]  # the x32 ABI
    for nr in denied:
        prog += [(jeq_k, 0, 1, nr), (ret_k, 0, 0, eperm)]
    prog += [(jeq_k, 0, 1, args["clone3"]), (ret_k, 0, 0, enosys)]
    # clone: refuse when the flags (args[0], low word) ask for a new namespace.
    prog += [
        (jeq_k, 0, 4, args["clone"]),
        (ld_w_abs, 0, 0, 16),
        (jset_k, 0, 1, _CLONE_NEW_ANY),
        (ret_k, 0, 0, eperm),
        (ret_k, 0, 0, _SECCOMP_RET_ALLOW),
    ]
    for name in ("socket", "socketpair"):
        prog += [
            (jeq_k, 0, 4, args[name]),
            (ld_w_abs, 0, 0, 16),  # args[0]: the address family
            (jeq_k, 0, 1, socket.AF_UNIX),
            (ret_k, 0, 0, eperm),
            (ret_k, 0, 0, _SECCOMP_RET_ALLOW),
        ]
    prog.append((ret_k, 0, 0, _SECCOMP_RET_ALLOW))
    return prog


def _seccomp(libc: Any) -> str:
    """Install the filter on this process (inherited by its forks); the arch, or why not."""
    import ctypes

    arch = os.uname().machine.lower()  # not `platform`: it imports `re`, 20 ms of startup
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)
    if arch not in _AUDIT_ARCH or sys.byteorder != "little":
        raise OSError(f"no seccomp filter for the {arch} architecture")

    class SockFilter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    prog = _bpf_program(arch)
    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(f"no_new_privs: {_errno_text()}")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(f"seccomp: {_errno_text()}")
    return arch


def _drop_capabilities(libc: Any) -> bool:
    """Empty the bounding, effective, permitted and inheritable sets of a uid-0 process."""
    import ctypes

    for cap in range(64):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails past the last cap: fine

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [
            ("effective", ctypes.c_uint32),
            ("permitted", ctypes.c_uint32),
            ("inheritable", ctypes.c_uint32),
        ]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    return bool(libc.capset(ctypes.byref(header), data) == 0)


def _python_roots() -> list[str]:
    """Directories imports read from: the stdlib and site-packages, not editable checkouts."""
    prefixes = {
        os.path.realpath(p)
        for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    }
    roots = []
    for entry in sys.path:
        if not entry:
            continue
        real = os.path.realpath(entry)
        if os.path.exists(real) and any(real == p or real.startswith(p + os.sep) for p in prefixes):
            roots.append(real)
    return roots


_SYSTEM_READ = (
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/usr/share/fonts",
    "/usr/share/locale",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
    "/proc/cpuinfo",
    "/sys/devices/system/cpu",
)
_SYSTEM_WRITE = ("/dev/null",)


def isolate(config: dict[str, Any]) -> dict[str, Any]:
    """Apply every isolation layer this machine supports; report which ones took."""
    report: dict[str, Any] = {
        "network_namespace": False,
        "mount_namespace": False,
        "exposed": [],
        "uid": os.getuid(),
        "process_cap": False,
        "landlock_abi": 0,
        "seccomp": "",
        "audit_hook": False,
        "notes": [],
    }
    limits = config["limits"]
    workdir = os.path.realpath(config["workdir"])
    sandbox_dir = os.path.join(workdir, ".sandbox")
    read_paths = (
        _python_roots()
        + list(_SYSTEM_READ)
        + [os.path.realpath(p) for p in config.get("read_paths", [])]
    )
    read_paths = [p for p in dict.fromkeys(read_paths) if os.path.exists(p)]
    linux = sys.platform.startswith("linux")
    root = os.geteuid() == 0
    uid = gid = int(config["uid"]) if root and config.get("uid") is not None else -1
    libc: Any = _libc() if linux else None

    if linux and root:
        if libc.unshare(_CLONE_NEWNET) == 0:
            report["network_namespace"] = True
        else:
            report["notes"].append(f"unshare(CLONE_NEWNET) failed: {_errno_text()}")
        if (
            libc.unshare(_CLONE_NEWNS) == 0
            and libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0
        ):
            report["mount_namespace"] = True
            report["hidden"] = _hide(libc, _hidden_dirs(config), [workdir, *read_paths])
            if uid > 0:
                report["exposed"] = _expose(libc, [workdir, *read_paths], uid, gid)
        elif uid > 0 and any(_blocked_ancestor(p, uid, gid) for p in [workdir, *read_paths]):
            # e.g. Docker's default seccomp profile: without a mount namespace the
            # Python under a closed directory stays unreachable for another uid.
            report["notes"].append(
                f"no mount namespace ({_errno_text()}), and Python or the working "
                "directory is not reachable for another uid: the worker stays uid 0 "
                "without capabilities, and without a process cap"
            )
            uid = gid = -1
        else:
            report["notes"].append(f"no mount namespace ({_errno_text()})")
    elif linux:
        my_uid, my_gid = os.getuid(), os.getgid()
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
            _write_proc("/proc/self/setgroups", "deny")
            _write_proc("/proc/self/uid_map", f"{my_uid} {my_uid} 1")
            _write_proc("/proc/self/gid_map", f"{my_gid} {my_gid} 1")
            report["network_namespace"] = True
            # Since Linux 5.14 RLIMIT_NPROC is counted per user namespace: in this fresh one
            # it counts the sandbox's own processes, not the user's others.
            _setrlimit(resource.RLIMIT_NPROC, int(limits["max_processes"]))
            report["process_cap"] = "user namespace"
            if (
                libc.unshare(_CLONE_NEWNS) == 0
                and libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0
            ):
                report["mount_namespace"] = True
                report["hidden"] = _hide(libc, _hidden_dirs(config), [workdir, *read_paths])
            else:
                report["notes"].append(f"no mount namespace ({_errno_text()})")
        else:
            report["notes"].append(f"unshare(CLONE_NEWUSER|CLONE_NEWNET) failed: {_errno_text()}")

    os.chdir(workdir)
    os.makedirs(sandbox_dir, exist_ok=True)
    if uid > 0:
        for path in (workdir, sandbox_dir):
            os.chown(path, uid, gid)

    mb = 1024 * 1024
    _setrlimit(resource.RLIMIT_AS, int(limits["memory_mb"]) * mb)
    _setrlimit(resource.RLIMIT_FSIZE, int(limits["max_file_mb"]) * mb)
    _setrlimit(resource.RLIMIT_NOFILE, int(limits["max_open_files"]))
    _setrlimit(resource.RLIMIT_CORE, 0)
    resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    if uid > 0:
        # RLIMIT_NPROC counts every task (threads too) of the real uid, and root is exempt:
        # it caps this sandbox alone only under a uid of its own. A non-root host's uid also
        # runs the user's other processes, so there it is left alone.
        _setrlimit(resource.RLIMIT_NPROC, int(limits["max_processes"]))
        report["process_cap"] = True

    if uid > 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # all uids non-zero: the kernel clears every capability
        report["uid"] = uid
        report["own_uid"] = True
    elif linux and root:
        report["capabilities_dropped"] = _drop_capabilities(libc)

    if linux:
        # Die with the host: a worker stuck in time.sleep() would never see its channel
        # close. Set after the uid change, which clears it; the ppid check closes the race.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != config["host_pid"]:
            os._exit(1)

    if linux:
        try:
            report["landlock_abi"] = _landlock(libc, read_paths, [workdir, *_SYSTEM_WRITE])
        except OSError as exc:
            report["notes"].append(f"Landlock not applied: {exc}")
        if not report["landlock_abi"] and libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            report["notes"].append(f"no_new_privs: {_errno_text()}")
        if limits.get("seccomp", True):
            try:
                report["seccomp"] = _seccomp(libc)
            except OSError as exc:
                report["notes"].append(f"seccomp filter not applied: {exc}")
    report["read_paths"] = read_paths
    report["workdir"] = workdir
    return report


def _setrlimit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


# -- policy: the audit hook -----------------------------------------------------------------


class SandboxViolation(PermissionError):
    """Raised inside the sandbox when the code tries something it may not do."""


class _Interrupt(BaseException):
    """Raised into running code when the host's time limit or the CPU limit is reached.

    A BaseException, so that ``except Exception`` in model code does not swallow it.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unset:
    """Default of a tool parameter that was not given: the host's tool fills it in."""

    def __repr__(self) -> str:
        return "<tool default>"


class _FinalAnswer(BaseException):
    """Unwinds the step after ``final_answer`` was called."""


class Policy:
    """What the code may touch, checked on CPython audit events.

    This layer explains refusals in words the model can act on; the kernel layers (network
    namespace, Landlock, uid and rlimits) are what hold when Python-level checks are
    sidestepped, e.g. by C extensions that open files themselves.
    """

    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def __init__(self, workdir: str, read_paths: list[str]) -> None:
        self.workdir = workdir
        self.read_roots = tuple(read_paths)
        self.trusted = False  # the worker's own fork / channel work
        self.violations: list[str] = []

    @staticmethod
    def _under(path: str, roots: tuple[str, ...]) -> bool:
        return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

    def _real(self, path: Any) -> str | None:
        if path is None:
            return os.getcwd()
        if isinstance(path, int):
            return None  # an already-open descriptor: it was checked when it was opened
        try:
            name = os.fsdecode(os.fspath(path))
        except TypeError:
            return None
        return os.path.realpath(name)

    def _deny(self, message: str) -> None:
        self.violations.append(message)
        raise SandboxViolation(13, message)

    def may_write(self, path: Any) -> bool:
        real = self._real(path)
        return real is None or self._under(real, (self.workdir, *_SYSTEM_WRITE))

    def check_read(self, path: Any, what: str = "reading") -> None:
        real = self._real(path)
        if real is None or self._under(real, (self.workdir, *self.read_roots, *_SYSTEM_WRITE)):
            return
        self._deny(
            f"sandbox: {what} {os.fsdecode(path)!r} is not allowed; only files in the "
            "working directory can be used"
        )

    def check_write(self, path: Any, what: str = "writing") -> None:
        if self.may_write(path):
            return
        self._deny(
            f"sandbox: {what} {os.fsdecode(path)!r} is not allowed; write files in the "
            "working directory (use relative names)"
        )

    def no_processes(self, what: str) -> None:
        self._deny(
            f"sandbox: {what} is not allowed; starting processes or running shell commands "
            "is disabled, do the work in Python"
        )

    def no_network(self, what: str) -> None:
        self._deny(f"sandbox: {what} is not allowed; there is no network access")

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.trusted:
            return
        check = _CHECKS.get(event)
        if check is not None:
            check(self, args)


def _open(p: Policy, args: tuple[Any, ...]) -> None:
    path, _mode, flags = args
    if isinstance(flags, int) and flags & Policy._WRITE_FLAGS:
        p.check_write(path)
    else:
        p.check_read(path)


def _socket_new(p: Policy, args: tuple[Any, ...]) -> None:
    family = args[1] if len(args) > 1 else None
    if family != socket.AF_UNIX:
        p.no_network("opening a network socket")


def _socket_address(p: Policy, args: tuple[Any, ...]) -> None:
    sock, address = args[0], args[1]
    if getattr(sock, "family", None) == socket.AF_UNIX and isinstance(address, str | bytes):
        if address[:1] not in ("\0", b"\0"):
            p.check_write(address, "using the socket file")
            return
    p.no_network("connecting a socket")


def _kill(p: Policy, args: tuple[Any, ...]) -> None:
    if args[0] != os.getpid():
        p.no_processes("signalling other processes")


def _read_first(what: str) -> Any:
    return lambda p, args: p.check_read(args[0], what)


def _write_first(what: str) -> Any:
    return lambda p, args: p.check_write(args[0], what)


def _write_both(what: str) -> Any:
    def check(p: Policy, args: tuple[Any, ...]) -> None:
        p.check_write(args[0], what)
        p.check_write(args[1], what)

    return check


def _copy(p: Policy, args: tuple[Any, ...]) -> None:
    p.check_read(args[0], "copying")
    p.check_write(args[1], "copying to")


def _sqlite(p: Policy, args: tuple[Any, ...]) -> None:
    database = args[0]
    if isinstance(database, str | bytes | os.PathLike) and os.fsdecode(database) not in (
        "",
        ":memory:",
    ):
        p.check_write(database, "opening the database")


def _refuse(kind: str, what: str) -> Any:
    if kind == "process":
        return lambda p, args: p.no_processes(what)
    if kind == "network":
        return lambda p, args: p.no_network(what)
    return lambda p, args: p._deny(f"sandbox: {what} is not allowed")


_CHECKS: dict[str, Any] = {
    "open": _open,
    "os.listdir": _read_first("listing"),
    "os.scandir": _read_first("listing"),
    "os.chdir": _write_first("changing directory to"),
    "os.mkdir": _write_first("creating"),
    "os.remove": _write_first("removing"),
    "os.rmdir": _write_first("removing"),
    "os.truncate": _write_first("truncating"),
    "os.chmod": _write_first("changing permissions of"),
    "os.chown": _write_first("changing the owner of"),
    "os.utime": _write_first("changing times of"),
    "os.chflags": _write_first("changing flags of"),
    "os.lchflags": _write_first("changing flags of"),
    "os.setxattr": _write_first("changing attributes of"),
    "os.removexattr": _write_first("changing attributes of"),
    "os.getxattr": _read_first("reading attributes of"),
    "os.listxattr": _read_first("reading attributes of"),
    "os.mkfifo": _write_first("creating"),
    "os.mknod": _write_first("creating"),
    "os.rename": _write_both("renaming"),
    "os.link": _write_both("linking"),
    "os.symlink": _write_both("linking"),
    "shutil.copyfile": _copy,
    "shutil.copymode": _copy,
    "shutil.copystat": _copy,
    "shutil.copytree": _copy,
    "shutil.move": _copy,
    "shutil.rmtree": _write_first("removing"),
    "shutil.chown": _write_first("changing the owner of"),
    "shutil.make_archive": _write_first("writing"),
    "shutil.unpack_archive": lambda p, args: (p.check_read(args[0]), p.check_write(args[1])),
    "tempfile.mkstemp": _write_first("creating"),
    "tempfile.mkdtemp": _write_first("creating"),
    "sqlite3.connect": _sqlite,
    "os.system": _refuse("process", "os.system"),
    "os.exec": _refuse("process", "executing a program"),
    "os.posix_spawn": _refuse("process", "spawning a process"),
    "os.spawn": _refuse("process", "spawning a process"),
    "os.fork": _refuse("process", "os.fork"),
    "os.forkpty": _refuse("process", "os.forkpty"),
    "subprocess.Popen": _refuse("process", "subprocess"),
    "pty.spawn": _refuse("process", "pty.spawn"),
    "os.kill": _kill,
    "os.killpg": _refuse("process", "signalling other processes"),
    "socket.__new__": _socket_new,
    "socket.connect": _socket_address,
    "socket.bind": _socket_address,
    "socket.sendto": _refuse("network", "sending on a socket"),
    "socket.getaddrinfo": _refuse("network", "resolving host names"),
    "socket.gethostbyname": _refuse("network", "resolving host names"),
    "socket.gethostbyaddr": _refuse("network", "resolving host names"),
    "socket.getnameinfo": _refuse("network", "resolving host names"),
    "socket.sethostname": _refuse("network", "setting the host name"),
    "urllib.Request": _refuse("network", "opening a URL"),
    "http.client.connect": _refuse("network", "an HTTP connection"),
    "ftplib.connect": _refuse("network", "an FTP connection"),
    "smtplib.connect": _refuse("network", "an SMTP connection"),
    "imaplib.open": _refuse("network", "an IMAP connection"),
    "poplib.connect": _refuse("network", "a POP connection"),
    "nntplib.connect": _refuse("network", "an NNTP connection"),
    "telnetlib.Telnet.open": _refuse("network", "a telnet connection"),
    "webbrowser.open": _refuse("network", "opening a browser"),
    # ctypes calls C directly, past every check above; it is loaded before the hook, so
    # libraries that import it still work, but no new library or call can be made.
    "ctypes.dlopen": _refuse("other", "loading a C library with ctypes"),
    "ctypes.dlsym": _refuse("other", "looking up C functions with ctypes"),
    "ctypes.dlsym/handle": _refuse("other", "looking up C functions with ctypes"),
    "ctypes.call_function": _refuse("other", "calling C functions with ctypes"),
    "ctypes.cdata": _refuse("other", "reading raw memory with ctypes"),
    "ctypes.cdata/buffer": _refuse("other", "reading raw memory with ctypes"),
    "ctypes.string_at": _refuse("other", "reading raw memory with ctypes"),
    "ctypes.wstring_at": _refuse("other", "reading raw memory with ctypes"),
    "ctypes.PyObj_FromPtr": _refuse("other", "reading raw memory with ctypes"),
    "resource.setrlimit": _refuse("other", "changing resource limits"),
    "resource.prlimit": _refuse("other", "changing resource limits"),
    "sys._current_frames": _refuse("other", "inspecting the sandbox's own frames"),
    "sys.settrace": _refuse("other", "tracing (it exposes the sandbox's own frames)"),
    "sys.setprofile": _refuse("other", "profiling hooks (they expose the sandbox's own frames)"),
    "gc.get_objects": _refuse("other", "gc.get_objects"),
    "gc.get_referrers": _refuse("other", "gc.get_referrers"),
    "gc.get_referents": _refuse("other", "gc.get_referents"),
}


# -- output capture -------------------------------------------------------------------------


class Capture(io.TextIOBase):
    """stdout/stderr of the code: keeps the first ``limit`` characters, counts the rest.

    The cap applies here, inside the worker, so printing 100 MB costs the host nothing.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0

    def reset(self) -> None:
        self.parts, self.kept, self.dropped = [], 0, 0

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.limit - self.kept
        if room > 0:
            piece = s[:room]
            self.parts.append(piece)
            self.kept += len(piece)
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def text(self) -> str:
        return "".join(self.parts).encode("utf-8", "replace").decode("utf-8")


# -- the worker -----------------------------------------------------------------------------


class Port:
    """What model code can reach from the functions it is given (tools, ``final_answer``,
    the signal handler): the channel's tool requests and the step's interrupt state.

    It holds no reference to the ``Worker`` or the audit hook's ``Policy``: a function's
    closure cells, ``__self__`` or ``signal.getsignal()`` lead here and no further. (Code
    that walks the interpreter's frames can still reach the worker: the audit hook is a
    convenience layer, and every boundary is held by the kernel layers.)
    """

    def __init__(self, channel: Channel, max_tool_bytes: int) -> None:
        self.channel = channel
        self.max_tool_bytes = max_tool_bytes
        self.armed = False  # an interrupt may be raised into running code
        self.pending: str | None = None  # an interrupt that arrived while not armed
        self.final: str | None = None
        self.tool_error: type[Exception] = Exception

    def on_signal(self, signum: int, _frame: Any) -> None:
        reason = "cpu" if signum in (signal.SIGXCPU, signal.SIGPROF) else "time"
        if self.armed:
            self.armed = False  # one raise per step: the next signal cannot unwind our code
            raise _Interrupt(reason)
        self.pending = self.pending or reason

    def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        try:
            body = json.dumps(
                {"op": "tool", "name": name, "arguments": arguments},
                ensure_ascii=False,
                default=_to_plain,
            )
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}(): {exc}") from None
        limit = self.max_tool_bytes
        if len(body) > limit + 256:
            raise self.tool_error(
                f"{name}(): the arguments are about {len(body)} bytes, over the {limit} byte "
                "limit for one tool call; write large data to a file and pass its name"
            )
        was_armed, self.armed = self.armed, False
        try:
            self.channel.send_raw(body.encode("utf-8", "replace"))
            reply = self.channel.recv()
        finally:
            self.armed = was_armed
        if reply.get("interrupted") or self.pending:
            reason, self.pending = self.pending or "time", None
            self.armed = False
            raise _Interrupt(reason)
        if reply.get("error") is not None:
            raise self.tool_error(reply["error"])
        return reply.get("value")


def _make_namespace(port: Port, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The code's globals: tool functions and ``final_answer``, closing over ``port`` only."""
    import inspect

    module = types.ModuleType("__main__")
    ns = module.__dict__
    ns["__builtins__"] = builtins
    # Model code may use `if __name__ == "__main__":`, and user classes pickle by module.
    sys.modules["__main__"] = module

    class ToolError(Exception):
        """A tool call failed; the message says why."""

    ToolError.__module__ = "builtins"
    ToolError.__qualname__ = "ToolError"
    ns["ToolError"] = ToolError
    port.tool_error = ToolError
    missing = _Unset()

    def make(stub: dict[str, Any]) -> Any:
        name = stub["name"]
        required = set(stub["required"])
        params = []
        optional_seen = False
        for pname in stub["parameters"]:
            if pname in required and not optional_seen:
                default: Any = inspect.Parameter.empty
            else:
                optional_seen = True
                default = stub["defaults"].get(pname, missing) if pname not in required else missing
            params.append(
                inspect.Parameter(pname, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
            )
        sig = inspect.Signature(params)
        parameters = list(stub["parameters"])

        def call(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            arguments = {k: v for k, v in bound.arguments.items() if v is not missing}
            absent = [k for k in parameters if k in required and k not in arguments]
            if absent:
                raise TypeError(f"{name}() missing required argument(s): {', '.join(absent)}")
            return port.call_tool(name, arguments)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = stub.get("description") or None
        call.__signature__ = sig  # type: ignore[attr-defined]
        call.__module__ = "tools"
        return call

    for stub in tools:
        if stub["name"] != "final_answer":
            ns[stub["name"]] = make(stub)
    answer_param = next(
        (s["parameters"][0] for s in tools if s["name"] == "final_answer" and s["parameters"]),
        "answer",
    )

    def final_answer(*args: Any, **kwargs: Any) -> None:
        values = list(args) + list(kwargs.values())
        if len(values) != 1:
            raise TypeError(f"final_answer() takes exactly one argument ({answer_param})")
        port.final = values[0] if isinstance(values[0], str) else _plain_text(values[0])
        raise _FinalAnswer

    final_answer.__doc__ = "Give the final answer to the task; ends this code step."
    final_answer.__module__ = "tools"
    ns["final_answer"] = final_answer
    return ns


class Worker:
    def __init__(self, channel: Channel, config: dict[str, Any], policy: Policy) -> None:
        self.config = config
        self.limits = config["limits"]
        self.policy = policy
        self.capture = Capture(int(self.limits["output_chars"]))
        limit = int(config.get("max_tool_bytes") or config["max_message_bytes"])
        self.port = Port(channel, limit)
        self.step_pid = os.getpid()
        self.namespace = _make_namespace(self.port, config["tools"])

    @property
    def channel(self) -> Channel:
        return self.port.channel

    @channel.setter
    def channel(self, channel: Channel) -> None:
        self.port.channel = channel

    # -- steps ----------------------------------------------------------------------------
    def run(self, code: str, step: int, cpu_s: int) -> dict[str, Any]:
        self.capture.reset()
        self.port.final = None
        self.port.pending = None
        self.step_pid = os.getpid()
        filename = f"<step {step}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        error: dict[str, str] | None = None
        try:
            tree = ast.parse(code, filename, "exec")
        except (SyntaxError, ValueError) as exc:
            return self._done({"kind": "code", "message": _format_exception(exc, filename)})
        # Like a notebook cell, a trailing expression's value is shown.
        last = None
        final_stmt = tree.body[-1] if tree.body else None
        if isinstance(final_stmt, ast.Expr):
            tree.body.pop()
            last = ast.Expression(final_stmt.value)
        used = resource.getrusage(resource.RUSAGE_SELF)
        self._cpu_limit(int(used.ru_utime + used.ru_stime + cpu_s) + 1)
        try:
            try:
                body = compile(tree, filename, "exec")
                tail = compile(last, filename, "eval") if last is not None else None
                self.port.armed = True
                exec(body, self.namespace)
                if tail is not None:
                    value = eval(tail, self.namespace)
                    if value is not None:
                        print(repr(value), file=self.capture)
            finally:
                self.port.armed = False
        except _FinalAnswer:
            pass
        except _Interrupt as exc:
            error = {"kind": "timeout", "message": self._interrupt_message(exc)}
        except SystemExit:
            pass  # exit() ends the code step, not the sandbox
        except BaseException as exc:  # noqa: BLE001 - model code may raise anything
            error = self._classify(exc, filename)
        finally:
            self.port.armed = False
            self._cpu_limit(resource.RLIM_INFINITY)
        if os.getpid() != self.step_pid:
            os._exit(0)  # a process forked by the code (when allowed) must not answer the host
        return self._done(error)

    def _cpu_limit(self, soft: int) -> None:
        # The hard limit stays infinite so that later steps can move the soft one; the
        # host's wall-clock kill is the backstop. The audit hook refuses this call to code.
        with self.trusted():
            resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))

    @contextlib.contextmanager
    def trusted(self) -> Iterator[None]:
        self.policy.trusted = True
        try:
            yield
        finally:
            self.policy.trusted = False

    def _interrupt_message(self, exc: _Interrupt) -> str:
        where = _last_user_line(exc)
        at = f" at line {where[1]} of {where[0]}" if where else ""
        if exc.reason == "cpu":
            limit = f"{self.limits['cpu_s']} s CPU time limit"
        else:
            limit = f"{self.limits['timeout_s']:g} s time limit"
        return (
            f"TimeoutError: the code ran past the {limit} and was stopped{at}. Variables set "
            "before that point are kept."
        )

    def _classify(self, exc: BaseException, filename: str) -> dict[str, str]:
        message = _format_exception(exc, filename)
        if isinstance(exc, MemoryError):
            return {
                "kind": "memory",
                "message": message
                + (f"\n(the sandbox has a {self.limits['memory_mb']} MB memory limit)"),
            }
        if isinstance(exc, SandboxViolation):
            return {"kind": "sandbox", "message": message}
        if isinstance(exc, PermissionError) and exc.filename is not None:
            # Refused by the kernel (Landlock, uid) rather than the hook: still the sandbox.
            if not self.policy.may_write(exc.filename):
                return {"kind": "sandbox", "message": message}
        if isinstance(exc, OSError) and exc.errno in (28, 122):  # ENOSPC, EDQUOT
            cap = self.limits.get("workdir_mb")
            note = f"\n(the working directory holds at most {cap} MB)" if cap else ""
            return {"kind": "sandbox", "message": message + note}
        if isinstance(exc, PermissionError) and exc.filename is None and exc.errno == 1:
            # EPERM with no file: the seccomp filter or a dropped capability.
            return {"kind": "sandbox", "message": message}
        if isinstance(exc, self.port.tool_error):
            return {"kind": "tool", "message": message}
        return {"kind": "code", "message": message}

    def _done(self, error: dict[str, str] | None) -> dict[str, Any]:
        return {
            "op": "done",
            "stdout": self.capture.text(),
            "dropped": self.capture.dropped,
            "error": error,
            "final_answer": self.port.final,
        }

    # -- fork -----------------------------------------------------------------------------
    def fork(self) -> None:
        if not self.channel.fds:
            self.channel.send({"op": "error", "message": "fork request without a socket"})
            return
        fd = self.channel.fds.pop(0)
        with self.trusted():
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, 0)  # killing this fork's group must spare its parent, and back
                self.channel.close()
                self.channel = Channel(socket.socket(fileno=fd))
        if pid == 0:
            self.channel.send({"op": "ready", "pid": os.getpid()})
        else:
            os.close(fd)
            self.channel.send({"op": "forked", "pid": pid})

    def serve(self) -> None:
        while True:
            try:
                msg = self.channel.recv()
            except (EOFError, OSError):
                os._exit(0)
            op = msg.get("op")
            if op == "exec":
                self.channel.send(self.run(msg["code"], int(msg["step"]), int(msg["cpu_s"])))
            elif op == "fork":
                self.fork()
            elif op == "exit":
                os._exit(0)
            elif op == "tool_result":
                continue  # a late reply to a call that was interrupted
            else:
                self.channel.send({"op": "error", "message": f"unknown request {op!r}"})


def _to_plain(value: Any) -> Any:
    """JSON fallback for tool arguments: numpy scalars/arrays and paths become plain data."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(
        f"cannot pass a {type(value).__name__} to a tool; use str, int, float, bool, "
        "list or dict (images and files are passed by file name)"
    )


def _plain_text(value: Any) -> str:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _user_frames(exc: BaseException) -> list[traceback.FrameSummary]:
    return [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith("<step ")]


def _last_user_line(exc: BaseException) -> tuple[str, int] | None:
    frames = _user_frames(exc)
    if not frames or frames[-1].lineno is None:
        return None
    return frames[-1].filename, frames[-1].lineno


def _format_exception(exc: BaseException, filename: str) -> str:
    """A traceback of the model's own code only: its frames, lines and the exception."""
    lines = traceback.format_exception_only(type(exc), exc)
    frames = _user_frames(exc) if not isinstance(exc, SyntaxError) else []
    text = ""
    if frames:
        text = "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
    text += "".join(lines)
    if len(text) > 4000:
        text = text[:2000] + "\n[...]\n" + text[-2000:]
    return text.rstrip()


def main() -> None:
    fd = int(sys.argv[1])
    channel = Channel(socket.socket(fileno=fd))
    try:
        config = channel.recv()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forks are reaped by the kernel
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write raises instead
        report = isolate(config)
        policy = Policy(report["workdir"], report["read_paths"])
        worker = Worker(channel, config, policy)
        signal.signal(signal.SIGUSR1, worker.port.on_signal)
        signal.signal(signal.SIGXCPU, worker.port.on_signal)
        for stream in ("stdout", "stderr", "__stdout__", "__stderr__"):
            setattr(sys, stream, worker.capture)
        if config["limits"].get("audit_hook", True):
            sys.addaudithook(policy.hook)
            report["audit_hook"] = True
        for module in config.get("preload", []):
            __import__(module)
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):  # C-level output must not reach the host's terminal
            os.dup2(devnull, target)
        os.close(devnull)
    except BaseException:  # noqa: BLE001 - the host must learn why the start failed
        channel.send({"op": "fatal", "message": traceback.format_exc()})
        raise SystemExit(1) from None
    report.pop("read_paths")
    channel.send({"op": "ready", "pid": os.getpid(), "isolation": report, "started": time.time()})
    worker.serve()


if __name__ == "__main__":
    main()
