"""A size-capped working directory: a tmpfs with ``size=`` mounted over it while a sandbox runs.

Only a root host on Linux can mount. At start the directory's files are copied into the
tmpfs (the originals stay underneath, untouched); at close, after every sandbox process is
dead, the tmpfs's content replaces the originals and the tmpfs is unmounted, so the host
finds the files where it left them. Pages of a tmpfs are also charged to the writer's memory
cgroup. Copies go through directory descriptors and never follow a link.

Without root (or with the directory already a mount point), the sandbox runs without this
layer; ``RLIMIT_FSIZE`` still caps each file, and the isolation report says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import stat
import sys
from pathlib import Path

_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class CappedWorkdir:
    """The tmpfs over one working directory (see the module docstring)."""

    def __init__(self, path: Path, under: int, size_mb: int) -> None:
        self.path = path
        self.under = under  # the original directory, reachable beneath the mount
        self.size_mb = size_mb

    @classmethod
    def mount(cls, path: Path, size_mb: int) -> tuple[CappedWorkdir | None, str]:
        """Mount a ``size_mb`` tmpfs over ``path`` holding a copy of its files; or (None, why)."""
        if not sys.platform.startswith("linux"):
            return None, "not Linux"
        if os.geteuid() != 0:
            return None, "mounting a size-capped tmpfs needs a root host"
        if os.path.ismount(path):
            return None, f"{path} is already a mount point"
        under = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        info = os.fstat(under)
        options = f"size={size_mb}m,mode={stat.S_IMODE(info.st_mode):o},nr_inodes=100k"
        libc = _libc()
        if libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                      options.encode()) != 0:  # fmt: skip
            err = ctypes.get_errno()
            os.close(under)
            return None, f"mount tmpfs: {os.strerror(err)}"
        made = cls(path, under, size_mb)
        try:
            top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchown(top, info.st_uid, info.st_gid)
                _copy_tree(under, top)
            finally:
                os.close(top)
        except OSError as exc:
            made._umount()
            os.close(under)
            return None, f"copying the files into the tmpfs: {exc}"
        return made, f"tmpfs, {size_mb} MB"

    def unmount(self) -> None:
        """Put the tmpfs's files back in the directory beneath it and unmount it."""
        try:
            top = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            top = -1
        try:
            if top >= 0:
                for entry in os.listdir(self.under):
                    _remove(self.under, entry)
                _copy_tree(top, self.under)
        finally:
            if top >= 0:
                os.close(top)
            self._umount()
            os.close(self.under)

    def _umount(self) -> None:
        _libc().umount2(os.fsencode(self.path), _MNT_DETACH)


def _remove(dirfd: int, name: str) -> None:
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def _copy_tree(src: int, dst: int) -> None:
    """Copy the entries of directory fd ``src`` into directory fd ``dst``: files, folders
    and links (as links: their targets are only text), with modes and owners."""
    for name in os.listdir(src):
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            with contextlib.suppress(OSError):
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
        elif stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dst)
            inner_src = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=src)
            inner_dst = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dst)
            try:
                _copy_tree(inner_src, inner_dst)
                os.fchown(inner_dst, st.st_uid, st.st_gid)
                os.fchmod(inner_dst, stat.S_IMODE(st.st_mode))
            finally:
                os.close(inner_src)
                os.close(inner_dst)
        elif stat.S_ISREG(st.st_mode):
            fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=src)
            try:
                if not stat.S_ISREG(os.fstat(fin).st_mode):
                    continue
                fout = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dst
                )
                try:
                    while True:
                        copied = os.sendfile(fout, fin, None, 1 << 24)
                        if not copied:
                            break
                    os.fchown(fout, st.st_uid, st.st_gid)
                    os.fchmod(fout, stat.S_IMODE(st.st_mode))
                    os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(fout)
            finally:
                os.close(fin)
        # FIFOs, sockets and devices are not copied.
