"""Host-side file access inside a sandbox's working directory, by directory fd.

Sandboxed code owns its working directory: it can plant a symbolic link at any name, or
swap a directory for a link while the host is between a check and an open. So the host
never opens a working-directory file by path. Every open goes through a descriptor of the
working directory and resolves the name *beneath* it without following any link:

* ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` (Linux >= 5.6,
  syscall 437 on x86_64 and aarch64) when the kernel has it;
* otherwise a walk of the name's components with ``openat(O_DIRECTORY | O_NOFOLLOW)`` from
  the directory fd, and ``O_NOFOLLOW`` on the last one.

Reads check the opened descriptor (``fstat``): a regular file with one link, of at most a
given size. Writes create a new file (``O_CREAT | O_EXCL``): the host never writes into a
file that already exists, so a planted file or link at the name makes the host pick another
name instead of writing through it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_O_PATH = getattr(os, "O_PATH", 0)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = {"x86_64": 437, "amd64": 437, "aarch64": 437, "arm64": 437}
_openat2_state: dict[str, Any] = {}


class UnsafePath(OSError):
    """A name in the working directory the host refuses to follow (a link, a non-file,
    a name leaving the directory); the message says which and why."""


def _check_name(name: str) -> list[str]:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePath(
            errno.EINVAL, f"expected a file name in the working directory, got {name!r}"
        )
    if name.startswith("/"):
        raise UnsafePath(errno.EXDEV, f"{name!r} is outside the working directory (absolute)")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise UnsafePath(errno.EISDIR, f"{name!r} names the working directory itself")
    if ".." in parts:
        raise UnsafePath(errno.EXDEV, f"{name!r} is outside the working directory ('..')")
    return parts


def _openat2(dirfd: int, name: str, flags: int, mode: int) -> int | None:
    """fd from openat2 with beneath/no-symlink resolution, or None where it is unavailable."""
    if _openat2_state.get("missing"):
        return None
    nr = _SYS_OPENAT2.get(platform.machine().lower())
    if nr is None or not hasattr(os, "O_CLOEXEC"):
        _openat2_state["missing"] = True
        return None
    import ctypes

    libc = _openat2_state.get("libc")
    if libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        _openat2_state["libc"] = libc

    class OpenHow(ctypes.Structure):
        _fields_ = [
            ("flags", ctypes.c_uint64),
            ("mode", ctypes.c_uint64),
            ("resolve", ctypes.c_uint64),
        ]

    how = OpenHow(
        flags | os.O_CLOEXEC,
        mode if flags & os.O_CREAT else 0,
        _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS,
    )
    fd = libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(name)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and "works" not in _openat2_state:
        # No openat2 (kernel < 5.6), or a seccomp profile that refuses it: walk instead.
        _openat2_state["missing"] = True
        return None
    raise OSError(err, os.strerror(err), name)


def _walk_open(dirfd: int, parts: list[str], flags: int, mode: int) -> int:
    current = dirfd
    try:
        for part in parts[:-1]:
            nxt = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current
            )
            if current != dirfd:
                os.close(current)
            current = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=current)
    finally:
        if current != dirfd:
            os.close(current)


def open_beneath(dirfd: int, name: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """Open ``name`` beneath the directory ``dirfd`` without following any link.

    Raises ``UnsafePath`` for a link anywhere on the way or a name that leaves the directory,
    ``FileNotFoundError`` for a missing name, and other ``OSError``\\ s as the kernel gives them.
    """
    parts = _check_name(name)
    try:
        fd = _openat2(dirfd, "/".join(parts), flags, mode)
        if fd is None:
            fd = _walk_open(dirfd, parts, flags, mode)
        else:
            _openat2_state["works"] = True
    except UnsafePath:
        raise
    except OSError as exc:
        link = exc.errno in (errno.ELOOP, errno.EXDEV) or (
            exc.errno == errno.ENOTDIR and _any_link(dirfd, parts)
        )
        if link:
            raise UnsafePath(
                exc.errno,
                f"{name!r} is (or goes through) a link; the host does not follow links in the "
                "working directory",
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise UnsafePath(errno.ENOTDIR, f"{name!r}: a part of it is not a folder") from None
        raise
    return fd


def _any_link(dirfd: int, parts: list[str]) -> bool:
    current = dirfd
    opened: list[int] = []
    try:
        for part in parts:
            st = os.stat(part, dir_fd=current, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                return True
            if not stat.S_ISDIR(st.st_mode):
                return False
            current = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=current)
            opened.append(current)
        return False
    except OSError:
        return True
    finally:
        for fd in opened:
            os.close(fd)


@contextlib.contextmanager
def directory(path: str | os.PathLike[str]) -> Iterator[int]:
    """A descriptor of the (host-made) directory ``path``, closed on exit."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def fstat_regular(fd: int, name: str, max_bytes: int | None = None) -> os.stat_result:
    """``fstat`` of an opened file: a regular file with one link, at most ``max_bytes``."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise UnsafePath(errno.EINVAL, f"{name!r} is {kind}")
    if st.st_nlink != 1:
        raise UnsafePath(
            errno.EMLINK, f"{name!r} is a hard link; write the file itself in the working directory"
        )
    if max_bytes is not None and st.st_size > max_bytes:
        raise UnsafePath(
            errno.EFBIG, f"{name!r} is {st.st_size} bytes, over the {max_bytes} byte limit"
        )
    return st


def open_regular(dirfd: int, name: str, max_bytes: int | None = None) -> int:
    """A read-only fd of the regular file ``name`` beneath ``dirfd`` (checked with fstat).

    ``O_NONBLOCK`` keeps a FIFO planted at the name from blocking the host on open.
    """
    fd = open_beneath(dirfd, name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        fstat_regular(fd, name, max_bytes)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, limit: int | None = None) -> bytes:
    """Everything in ``fd`` from its start, at most ``limit`` bytes (more raises)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        block = os.read(fd, 1 << 20)
        if not block:
            return b"".join(chunks)
        total += len(block)
        if limit is not None and total > limit:
            raise UnsafePath(errno.EFBIG, f"the file grew past the {limit} byte limit while read")
        chunks.append(block)


def read_beneath(root: str | os.PathLike[str], name: str, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``name`` in the directory ``root``, read by fd."""
    with directory(root) as dirfd:
        fd = open_regular(dirfd, name, max_bytes)
        try:
            return read_fd(fd, max_bytes)
        finally:
            os.close(fd)


def write_new(
    root: str | os.PathLike[str], name: str, data: bytes, owner: tuple[int, int] | None = None
) -> str:
    """Create a new file beneath ``root`` holding ``data``; returns the name used.

    ``name``'s folder must exist; the file is created with ``O_EXCL``: when something (a
    file, a link, a FIFO) already sits at ``name``, a random suffix is added to the stem
    instead of writing through or over it.
    """
    _check_name(name)
    stem, dot, suffix = name.rpartition(".")
    if not dot or "/" in suffix:
        stem, suffix = name, ""
    candidate = name
    with directory(root) as dirfd:
        for _ in range(8):
            try:
                fd = open_beneath(dirfd, candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                token = secrets.token_hex(4)
                candidate = f"{stem}_{token}.{suffix}" if suffix else f"{stem}_{token}"
                continue
            except UnsafePath:
                token = secrets.token_hex(4)
                candidate = f"{stem}_{token}.{suffix}" if suffix else f"{stem}_{token}"
                if "/" in name:
                    raise
                continue
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if owner is not None:
                    with contextlib.suppress(OSError):
                        os.fchown(fd, *owner)
            finally:
                os.close(fd)
            return candidate
    raise UnsafePath(errno.EEXIST, f"could not create a new file named like {name!r}")


def exists_beneath(root: str | os.PathLike[str], name: str) -> bool:
    """Whether anything (a link included) sits at ``name`` in ``root``, without following."""
    try:
        parts = _check_name(name)
    except UnsafePath:
        return False
    with directory(root) as dirfd:
        try:
            if len(parts) > 1:
                fd = open_beneath(dirfd, "/".join(parts[:-1]), os.O_RDONLY | os.O_DIRECTORY)
            else:
                fd = os.dup(dirfd)
        except OSError:
            return False
        try:
            os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)


def workdir_path(root: Path, name: str) -> Path:
    """``root / name`` after a syntactic check only (for messages and names, never for I/O)."""
    return root.joinpath(*_check_name(name))
