"""What exploration hands a step verifier: the prefix, the candidates, and how they ranked.

A *branch* is an ``Episode`` forked from the committed prefix: its own copy of the
sandbox's Python state (code actions), its own copy of the working directory's files (both
formats: code may write any file, and JSON tools save their images under names that depend
only on the tool and the step, so two candidates' crops would overwrite each other), and
its own list of steps. Every candidate action is applied on its own branch (with
:func:`apply_step`), so what one candidate's code does to variables or files can never show
up in another candidate's observation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import stat
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tracetune.agent.loop import Episode
from tracetune.schema import ErrorKind, Step, Task, Usage


class Workspace:
    """Snapshots of an episode's working directory, one per branch state.

    The branches of one task share one working directory (each task has its own), and
    their steps write files in it: code may write anything (and in its HOME,
    ``.sandbox/``), JSON tools save images by tool and step. Before a branch runs its
    snapshot is restored into the directory, and after it runs the result is saved as the
    branch's new snapshot. ``lock`` makes that restore-run-save exclusive, so branches of
    one task run one at a time even if a caller starts several at once. Owners and modes
    are kept: the sandbox may run as another user, who must still be able to write its
    files.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.root = Path(tempfile.mkdtemp(prefix="tracetune-branches-"))
        self._count = 0
        self._current: Path | None = None  # the snapshot the directory holds now
        self.lock = asyncio.Lock()

    def save(self) -> Path:
        snapshot = self.root / str(self._count)
        self._count += 1
        # Files the branch left as they were are hard links to the snapshot it started
        # from: a task explores hundreds of branches (candidates and greedy completions),
        # and copying its PDFs and images each time would fill the disk. Snapshots are
        # never written after they are saved; `load` copies them out.
        _copy_tree(self.workdir, snapshot, self._current)
        self._current = snapshot
        return snapshot

    def load(self, snapshot: Path) -> None:
        if snapshot == self._current:
            return
        # The working directory belongs to sandboxed code, which may plant links in it at
        # any moment: entries are removed and created through a directory fd, never
        # followed (rmtree with dir_fd does not follow links either).
        with _dirfd(self.workdir) as work:
            for name in os.listdir(work):
                if stat.S_ISDIR(os.stat(name, dir_fd=work, follow_symlinks=False).st_mode):
                    shutil.rmtree(name, dir_fd=work)
                else:
                    os.unlink(name, dir_fd=work)
        _copy_tree(snapshot, self.workdir)
        self._current = snapshot

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _dirfd:
    """A descriptor of a directory, opened without following a link (context manager)."""

    def __init__(self, path: Path | str, dir_fd: int | None = None) -> None:
        self.fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _copy_tree(source: Path, target: Path, same_as: Path | None = None) -> None:
    """Copy files, directories and links with their modes and owners (sockets are skipped).

    A file equal to its counterpart under ``same_as`` (an earlier snapshot) is hard-linked
    to it instead of copied. One side is a working directory that sandboxed code can change
    while this runs: everything is read and created through directory fds, links are
    copied as links (never followed), and files are created new (``O_EXCL``).
    """
    target.mkdir(parents=True, exist_ok=True)
    with _dirfd(source) as src, _dirfd(target) as dst:
        earlier = None
        if same_as is not None:
            try:
                earlier = os.open(same_as, _DIR_FLAGS)
            except OSError:
                earlier = None
        try:
            _copy_fd_tree(src, dst, earlier)
        finally:
            if earlier is not None:
                os.close(earlier)


def _copy_fd_tree(src: int, dst: int, earlier: int | None) -> None:
    _keep_owner(os.fstat(src), dst)
    for name in os.listdir(src):
        try:
            info = os.stat(name, dir_fd=src, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            target = os.readlink(name, dir_fd=src)
            _create(name, dst, functools.partial(os.symlink, target, name, dir_fd=dst))
        elif stat.S_ISDIR(info.st_mode):
            _create(name, dst, functools.partial(os.mkdir, name, 0o700, dir_fd=dst))
            inner_earlier = None
            if earlier is not None:
                with contextlib.suppress(OSError):
                    inner_earlier = os.open(name, _DIR_FLAGS, dir_fd=earlier)
            try:
                with _dirfd(name, src) as inner_src, _dirfd(name, dst) as inner_dst:
                    _copy_fd_tree(inner_src, inner_dst, inner_earlier)
            finally:
                if inner_earlier is not None:
                    os.close(inner_earlier)
        elif stat.S_ISREG(info.st_mode):
            _copy_file(name, src, dst, earlier)


def _copy_file(name: str, src: int, dst: int, earlier: int | None) -> None:
    fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src)
    try:
        info = os.fstat(fin)
        if not stat.S_ISREG(info.st_mode):
            return  # swapped for something else since it was listed
        if earlier is not None and _unchanged(fin, info, name, earlier):
            try:
                os.link(name, name, src_dir_fd=earlier, dst_dir_fd=dst, follow_symlinks=False)
                return
            except OSError:  # no hard links here: copy
                pass
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fout = _create(name, dst, lambda: os.open(name, flags, 0o600, dir_fd=dst))
        try:
            os.lseek(fin, 0, os.SEEK_SET)
            while os.sendfile(fout, fin, None, 1 << 24):
                pass
            _keep_owner(info, fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _create(name: str, dst: int, make: Any) -> Any:
    """``make()``, which creates ``name`` in ``dst``; if sandboxed code put something there
    meanwhile, that thing is removed (never followed) and creation is tried again."""
    for _ in range(3):
        try:
            return make()
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.stat(name, dir_fd=dst, follow_symlinks=False).st_mode):
                    shutil.rmtree(name, dir_fd=dst)
                else:
                    os.unlink(name, dir_fd=dst)
    return make()


def _unchanged(fin: int, info: os.stat_result, name: str, earlier: int) -> bool:
    """Same bytes, mode and owner (a snapshot's file is never a link to anything else)."""
    try:
        other = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=earlier)
    except OSError:
        return False
    try:
        b = os.fstat(other)
        same = stat.S_ISREG(b.st_mode) and (
            info.st_size,
            info.st_mode,
            info.st_uid,
            info.st_gid,
        ) == (b.st_size, b.st_mode, b.st_uid, b.st_gid)
        if not same:
            return False
        # Bytes, not mtimes: a branch may rewrite a file within the clock's resolution.
        offset = 0
        while True:
            a_block, b_block = os.pread(fin, 1 << 20, offset), os.pread(other, 1 << 20, offset)
            if a_block != b_block:
                return False
            if not a_block:
                return True
            offset += len(a_block)
    finally:
        os.close(other)


def _keep_owner(info: os.stat_result, fd: int) -> None:
    """Give ``fd`` the mode, times and (where allowed) owner of ``info``."""
    os.fchmod(fd, stat.S_IMODE(info.st_mode))
    with contextlib.suppress(OSError):
        os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))
    if (info.st_uid, info.st_gid) != (os.getuid(), os.getgid()):
        with contextlib.suppress(PermissionError):  # not root: everything is ours anyway
            os.fchown(fd, info.st_uid, info.st_gid)


# Each branch's (workspace, snapshot); episodes outside exploration have none.
_SNAPSHOTS: weakref.WeakKeyDictionary[Episode, tuple[Workspace, Path]] = weakref.WeakKeyDictionary()


def track_files(episode: Episode) -> Workspace:
    """Give an episode's branches their own files from now on."""
    workspace = Workspace(episode.toolbox.workdir)
    _SNAPSHOTS[episode] = (workspace, workspace.save())
    return workspace


async def apply_step(branch: Episode, raw: str, usage: Any = None, latency_s: float = 0.0) -> Step:
    """``branch.apply`` with the branch's own files in the working directory."""
    tracked = _SNAPSHOTS.get(branch)
    if tracked is None:
        return await branch.apply(raw, usage, latency_s)
    workspace = tracked[0]
    async with workspace.lock:  # another branch of this task must not swap the files mid-run
        workspace.load(_SNAPSHOTS[branch][1])
        step = await branch.apply(raw, usage, latency_s)
        _SNAPSHOTS[branch] = (workspace, workspace.save())
    return step


async def fork_episode(episode: Episode) -> Episode:
    """An episode with the same steps so far and its own copy of the execution state.

    JSON tool calls keep no Python state between steps, so their branches share the
    executor; code actions get a forked sandbox. Either way, a branch of an episode under
    :func:`track_files` gets its own copy of the working directory's files.
    """
    from tracetune.agent.code import CodeExecutor

    executor = episode.executor
    if isinstance(executor, CodeExecutor):
        executor = await executor.fork()
    twin = Episode(
        episode.task,
        episode.model,
        episode.fmt,
        episode.tools,
        executor,
        episode.toolbox,
        episode.source,
    )
    twin.steps = list(episode.steps)
    twin.final_answer = episode.final_answer
    twin.errors = episode.errors
    if episode in _SNAPSHOTS:
        _SNAPSHOTS[twin] = _SNAPSHOTS[episode]
    return twin


async def close_branch(episode: Episode) -> None:
    """Stop a branch's own sandbox; the episode's working directory stays for the others."""
    from tracetune.agent.code import CodeExecutor

    if isinstance(episode.executor, CodeExecutor) and episode.executor.branch:
        await episode.executor.close_branch()


@dataclass
class Candidate:
    """One sampled next step, executed on its own branch."""

    index: int
    step: Step
    temperature: float | None  # None: not sampled (the gold anchor)
    branch: Episode
    source: str = "policy"  # or "gold": the gold chain's next step (ExploreConfig.gold_anchor)

    @property
    def final_answer(self) -> str | None:
        return self.branch.final_answer if self.step.error is None else None

    @property
    def fault(self) -> str | None:
        """'format' for output with no valid action, 'error' when executing it failed."""
        if self.step.error is None:
            return None
        return "format" if self.step.error.kind == ErrorKind.PARSE else "error"


@dataclass
class StepContext:
    """Everything a verifier may look at for one step."""

    task: Task
    prefix: list[Step]
    candidates: list[Candidate]
    action_format: str
    tool_names: list[str]
    resolve: Any  # FileRef -> image path (the episode's resolver)
    extra: dict[str, Any] = field(default_factory=dict)


class Ranking(BaseModel):
    """A verifier's judgement of one step's candidates: scores (higher is better), the
    order best first, and a reason for each candidate."""

    model_config = ConfigDict(extra="forbid")

    verifier: str = Field(description="Which verifier ranked, e.g. 'gold' or 'llm-rank'.")
    scores: list[float] = Field(description="One score per candidate, in candidate order.")
    order: list[int] = Field(description="Candidate indices, best first.")
    reasons: list[str] = Field(description="Why each candidate scored as it did.")
    fallback: bool = Field(
        default=False, description="The verifier failed and this is the recorded default."
    )
    graded: bool = Field(
        default=True,
        description="Score differences measure how much better a candidate is (gold, "
        "llm-score); False when they only encode an order or a pick (llm-rank, llm-best), "
        "so the pair builder's margin rule does not apply.",
    )
    details: dict[str, Any] = Field(
        default_factory=dict, description="Verifier-specific evidence (judge reply, checks)."
    )
    usage: Usage = Field(default_factory=Usage)

    @property
    def best(self) -> int:
        return self.order[0]

    @classmethod
    def from_scores(
        cls, verifier: str, scores: list[float], reasons: list[str], **kwargs: Any
    ) -> Ranking:
        """Order by score, ties kept in sampling order (the low-temperature sample first)."""
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return cls(verifier=verifier, scores=scores, order=order, reasons=reasons, **kwargs)


def called_tool_names(step: Step) -> list[str]:
    """Tools a step actually called: its JSON tool call, or the calls its code made."""
    action = step.action
    if action is None:
        return []
    if action.type == "tool_call" and action.tool_call is not None:
        return [action.tool_call.name]
    if action.type == "final_answer":
        return []
    data = step.observation.data if step.observation else None
    if isinstance(data, dict) and isinstance(data.get("tool_calls"), list):
        return [str(c.get("name")) for c in data["tool_calls"] if isinstance(c, dict)]
    return []


def called_tool_calls(step: Step) -> list[tuple[str, dict[str, Any]]]:
    """(name, arguments) of each tool call a step made, in order."""
    action = step.action
    if action is None or action.type == "final_answer":
        return []
    if action.type == "tool_call" and action.tool_call is not None:
        return [(action.tool_call.name, dict(action.tool_call.arguments))]
    data = step.observation.data if step.observation else None
    if isinstance(data, dict) and isinstance(data.get("tool_calls"), list):
        return [
            (str(c.get("name")), dict(c.get("arguments") or {}))
            for c in data["tool_calls"]
            if isinstance(c, dict)
        ]
    return []


def step_is_final(step: Step) -> bool:
    action = step.action
    return action is not None and (
        action.type == "final_answer" or (action.type == "code" and action.answer is not None)
    )
