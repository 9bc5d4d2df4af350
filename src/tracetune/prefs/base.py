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
        for entry in os.scandir(self.workdir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        _copy_tree(snapshot, self.workdir)
        self._current = snapshot

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _copy_tree(source: Path, target: Path, same_as: Path | None = None) -> None:
    """Copy files, directories and links with their modes and owners (sockets are skipped).

    A file equal to its counterpart under ``same_as`` (an earlier snapshot) is hard-linked
    to it instead of copied.
    """
    target.mkdir(parents=True, exist_ok=True)
    _keep_owner(source, target)
    for entry in os.scandir(source):
        dest = target / entry.name
        earlier = same_as / entry.name if same_as is not None else None
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dest)
        elif entry.is_dir(follow_symlinks=False):
            _copy_tree(Path(entry.path), dest, earlier)
        elif stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
            if earlier is not None and _unchanged(Path(entry.path), earlier):
                try:
                    os.link(earlier, dest)
                    continue
                except OSError:  # no hard links here: copy
                    pass
            shutil.copy2(entry.path, dest)
            _keep_owner(Path(entry.path), dest)


def _unchanged(path: Path, earlier: Path) -> bool:
    """Same bytes, mode and owner (a snapshot's file is never a link to anything else)."""
    try:
        a, b = path.stat(), earlier.lstat()
    except OSError:
        return False
    same = stat.S_ISREG(b.st_mode) and (a.st_size, a.st_mode, a.st_uid, a.st_gid) == (
        b.st_size,
        b.st_mode,
        b.st_uid,
        b.st_gid,
    )
    if not same:
        return False
    # Bytes, not mtimes: a branch may rewrite a file within the clock's resolution.
    with path.open("rb") as f, earlier.open("rb") as g:
        while True:
            a_block, b_block = f.read(1 << 20), g.read(1 << 20)
            if a_block != b_block:
                return False
            if not a_block:
                return True


def _keep_owner(source: Path, target: Path) -> None:
    info = source.stat()
    shutil.copystat(source, target)
    if hasattr(os, "chown") and (info.st_uid, info.st_gid) != (os.getuid(), os.getgid()):
        try:
            os.chown(target, info.st_uid, info.st_gid)
        except PermissionError:  # not root: everything is ours anyway
            pass


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
