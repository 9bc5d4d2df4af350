"""File association ("query first"): each query gets a solving scenario and its files.

Stage ``files`` (OUT/queries -> OUT/tasks). For each query the generator writes a scenario:
the information the query needs and a description of each file (``file_type``,
``file_name``, ``file_content``). Then

* images are retrieved from the pool: the description's embedding against the captions',
  top-1 among images used by fewer than ``image_reuse_cap`` tasks;
* every other file (pdf, docx, xlsx, csv, pptx, txt, json, html, md, charts) is created by
  code the generator writes, run in the sandbox (never in this process); failing code is
  shown its error and rewritten up to ``code_retries`` times.

A task whose scenario cannot be read or whose files cannot be produced is dropped with the
reason. Scenario and code are concurrent per task; the image choice is made in query
order (``Turns``), so the reuse cap gives the same assignment after any resume.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from tracetune.errors import ConfigError
from tracetune.models.base import ChatMessage, Sampling
from tracetune.prompts import prompt_hash, render
from tracetune.runner import Drop, StageResult
from tracetune.safefs import UnsafePath, read_beneath
from tracetune.schema import FileRef, Provenance, Task
from tracetune.store import Dataset
from tracetune.synth.mtrace.common import (
    MalformedOutput,
    Turns,
    extract_code,
    extract_json,
    run_synth_stage,
    stage_model,
)
from tracetune.synth.mtrace.config import SynthConfig
from tracetune.synth.mtrace.pool import Pool

STAGE = "files"
SCENARIO_PROMPT = "mtrace/scenario.jinja"
CODE_PROMPT = "mtrace/file_code.jinja"

IMAGE_TYPES = {"image", "photo", "picture", "screenshot", "png", "jpg", "jpeg", "webp"}
GENERATED_TYPES = {
    "pdf": ".pdf",
    "docx": ".docx",
    "xlsx": ".xlsx",
    "csv": ".csv",
    "pptx": ".pptx",
    "txt": ".txt",
    "json": ".json",
    "html": ".html",
    "md": ".md",
    "chart": ".png",
}
_ALIASES = {
    "excel": "xlsx",
    "spreadsheet": "xlsx",
    "word": "docx",
    "powerpoint": "pptx",
    "text": "txt",
    "markdown": "md",
    "htm": "html",
    "plot": "chart",
    "graph": "chart",
}

# Imports in the sandbox must not read /etc/mime.types (outside the working directory):
# openpyxl and matplotlib initialise the mimetypes table when they load. SOURCE_DATE_EPOCH
# makes matplotlib stamp a fixed date into PDFs, so the same code gives the same bytes.
CODE_PRELUDE = (
    "import os\nos.environ['SOURCE_DATE_EPOCH'] = '946684800'\n"
    "import mimetypes\nmimetypes.knownfiles = []\nmimetypes.init()\n"
)
# Office files are zips whose entries carry the time of writing, and whose core.xml says
# when they were created: both are pinned, so that a file made again after a resume has the
# same content address as the first time. This runs in the host on the bytes it read (by fd,
# after the sandbox stopped): code in the sandbox can patch any library it imports, so no
# step after ``check_file`` may run there.
MAX_FILE_BYTES = 64 * 1024 * 1024
_MAX_UNPACKED_BYTES = 256 * 1024 * 1024
_MAX_ENTRIES = 10_000


def normalize_file(data: bytes) -> bytes:
    """``data`` with its zip entries' dates (and Office core.xml dates) pinned; other bytes
    unchanged. Raises ``ValueError`` for a zip too large to unpack."""
    if not data.startswith(b"PK"):
        return data
    try:
        src = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return data
    with src:
        infos = src.infolist()
        if len(infos) > _MAX_ENTRIES:
            raise ValueError(f"the zip package has {len(infos)} entries")
        if sum(i.file_size for i in infos) > _MAX_UNPACKED_BYTES:
            raise ValueError(f"the zip package unpacks to over {_MAX_UNPACKED_BYTES} bytes")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in infos:
                # ZipExtFile stops at the declared size, so the sum above bounds the memory.
                content = src.read(info.filename)
                if info.filename == "docProps/core.xml":
                    content = re.sub(
                        rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*",
                        rb"\g<1>2000-01-01T00:00:00Z",
                        content,
                    )
                fixed = zipfile.ZipInfo(info.filename, date_time=(2000, 1, 1, 0, 0, 0))
                fixed.compress_type = zipfile.ZIP_DEFLATED
                fixed.external_attr = info.external_attr
                dst.writestr(fixed, content)
    return buf.getvalue()


# What a file of each generated kind must be, checked on its bytes in the host (no code
# of the model's runs here): a name ending in .xlsx says nothing about what was written.
_ZIP_PARTS = {
    "xlsx": "xl/workbook.xml",
    "docx": "word/document.xml",
    "pptx": "ppt/presentation.xml",
}
_TEXT_KINDS = {"csv", "txt", "md", "html", "json"}


def read_produced(path: Path, workdir: Path) -> bytes | str:
    """The bytes of the file the code made at ``path`` (in ``workdir``), or why not.

    Read by a descriptor of ``workdir``, never through a link (anywhere on the way), and only
    from a regular file with one link: the code could otherwise point the host at any file.
    """
    name = path.name
    try:
        rel = path.relative_to(workdir).as_posix()
    except ValueError:
        return f"{name} is not in the working directory"
    try:
        return read_beneath(workdir, rel, MAX_FILE_BYTES)
    except UnsafePath as exc:
        if exc.errno == errno.EMLINK:
            return f"{name} is a hard link; write the file itself in the current directory"
        if exc.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
            return f"{name} is a link; write the file itself in the current directory"
        if exc.errno == errno.EFBIG:
            return f"{name} is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB"
        return f"{name} is not a regular file"
    except FileNotFoundError:
        return f"{name} does not exist"
    except OSError as exc:
        return f"{name} cannot be read: {exc.strerror}"


def check_file(path: Path, kind: str, workdir: Path) -> str | None:
    """Why the file the code made at ``path`` is not a ``kind`` file in ``workdir``, or None.

    A link (which could point anywhere on the host) or a file outside ``workdir`` is
    refused before its bytes are read.
    """
    data = read_produced(path, workdir)
    if isinstance(data, str):
        return data
    return check_bytes(path.name, data, kind)


def check_bytes(name: str, data: bytes, kind: str) -> str | None:
    """Why ``data`` (the file ``name``) is not a ``kind`` file, or None."""
    if not data:
        return f"the script created {name} but left it empty"
    if kind == "pdf" and not data.startswith(b"%PDF-"):
        return f"{name} is not a PDF (it does not start with %PDF-)"
    if kind == "chart" and not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return f"{name} is not a PNG image; save the chart with format='png'"
    if kind in _ZIP_PARTS:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as package:
                parts = set(package.namelist())
        except zipfile.BadZipFile:
            return f"{name} is not a {kind} file (an Office Open XML file is a zip package)"
        if _ZIP_PARTS[kind] not in parts or "[Content_Types].xml" not in parts:
            return (
                f"{name} is not a {kind} package: it lacks [Content_Types].xml or "
                f"{_ZIP_PARTS[kind]}"
            )
    if kind in _TEXT_KINDS:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return f"{name} is not UTF-8 text"
        if "\x00" in text:
            return f"{name} holds NUL bytes; a {kind} file is text"
        if kind == "json":
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                return f"{name} is not valid JSON ({exc.msg} at line {exc.lineno})"
    return None


def _files_in(workdir: Path) -> dict[str, tuple[int, int]]:
    """Files in ``workdir`` (not the sandbox's own dot-directories) with their mtime and
    size: what changed across a run is what the code wrote, for its error message."""
    found = {}
    for folder, dirs, names in os.walk(workdir):  # links are not followed
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            info = (Path(folder) / n).lstat()
            found[(Path(folder) / n).relative_to(workdir).as_posix()] = (
                info.st_mtime_ns,
                info.st_size,
            )
    return found


def file_kind(file_type: str) -> str | None:
    """``image``, a generated type (``pdf``, ``xlsx``, ... ``chart``), or None if unsupported."""
    kind = file_type.strip().lower().lstrip(".")
    kind = _ALIASES.get(kind, kind)
    if kind in IMAGE_TYPES:
        return "image"
    return kind if kind in GENERATED_TYPES else None


def safe_name(name: str, suffix: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name or "file").stem).strip("._") or "file"
    candidate = f"{stem[:60]}{suffix}"
    n = 2
    while candidate in taken:
        candidate = f"{stem[:60]}_{n}{suffix}"
        n += 1
    taken.add(candidate)
    return candidate


def read_scenario(text: str, max_files: int) -> tuple[list[str], list[dict[str, str]]]:
    """(information needed, file specs) from the generator's scenario; MalformedOutput if bad."""
    scenario = extract_json(text, dict)
    files = scenario.get("files")
    if not isinstance(files, list) or not files:
        raise MalformedOutput("scenario has no 'files' list")
    if len(files) > max_files:
        raise MalformedOutput(f"scenario has {len(files)} files, more than max_files={max_files}")
    specs = []
    for i, spec in enumerate(files):
        if not isinstance(spec, dict):
            raise MalformedOutput(f"files[{i}] is not an object")
        missing = [k for k in ("file_type", "file_content") if not isinstance(spec.get(k), str)]
        if missing:
            raise MalformedOutput(f"files[{i}] lacks {', '.join(missing)}")
        specs.append(
            {
                "file_type": spec["file_type"],
                "file_content": spec["file_content"],
                "file_name": str(spec.get("file_name") or f"file{i + 1}"),
            }
        )
    info = scenario.get("information_needed") or []
    return [str(x) for x in info] if isinstance(info, list) else [str(info)], specs


async def associate_files(config: SynthConfig, progress: bool = True) -> StageResult:
    """Stage ``files``: OUT/queries -> OUT/tasks."""
    fc = config.files
    if fc.pool is None:
        raise ConfigError(
            "synth files needs an image pool: set files.pool (or --pool); build "
            "one with `tracetune pool build`"
        )
    pool = Pool.load(fc.pool)
    spec = config.need("generator", "files")
    queries: Dataset[Task] = Dataset.open(config.dir("queries"), Task)
    out: Dataset[Task] = Dataset.create(config.dir("tasks"), Task)
    existing = {t.id: t for t in out}
    usage: Counter[str] = Counter(
        str(f["pool_entry"])
        for t in existing.values()
        for f in t.metadata.get("file_sources", [])
        if f.get("pool_entry")
    )
    items = sorted(queries, key=lambda t: t.id)
    done = out.state.keys(STAGE, "done") | out.state.keys(STAGE, "dropped")
    turns = Turns([t.id for t in items if t.id not in done])
    model = stage_model(spec, config.backend.for_stage(config.concurrency), out.state, STAGE)
    sampling = Sampling(temperature=fc.temperature, max_tokens=fc.max_tokens)
    hashes = {"scenario": prompt_hash(SCENARIO_PROMPT), "file_code": prompt_hash(CODE_PROMPT)}

    async def ask(messages: list[ChatMessage]) -> str:
        return (await model.generate(messages, sampling=sampling)).text

    async def make_file(
        start: Any, workdir: Path, spec_: dict[str, str], kind: str, name: str
    ) -> tuple[bytes | None, str, str | None]:
        """(normalized bytes, code, error) after up to 1 + code_retries attempts.

        Each attempt runs in a sandbox of its own that is closed (every process of it
        killed) before the host reads the file: nothing the code left running can swap
        the file, or patch what the host does with it, while it is read.
        """
        error = None
        code = ""
        for _ in range(1 + fc.code_retries):
            prompt = render(
                CODE_PROMPT,
                file_name=name,
                file_type=kind,
                file_content=spec_["file_content"],
                error=error,
            )
            try:
                code = extract_code(await ask([{"role": "user", "content": prompt}]))
            except MalformedOutput as exc:
                error = str(exc)
                continue
            target = workdir / name
            # A file left by an earlier attempt (or another file's code) must not pass
            # for this attempt's output.
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            before = _files_in(workdir)
            async with await start() as sandbox:
                result = await sandbox.execute(CODE_PRELUDE + code)
            if result.error is not None:
                error = f"{result.error.kind.value}: {result.error.message}"[-3000:]
                continue
            if not target.exists() and not target.is_symlink():
                made = [f for f, st in _files_in(workdir).items() if before.get(f) != st]
                error = f"the script ran but did not create {name} in the current directory" + (
                    f" (it created: {', '.join(made[:10])})" if made else ""
                )
                continue
            data = read_produced(target, workdir)
            if isinstance(data, str):
                error = data
            elif (wrong := check_bytes(name, data, kind)) is not None:
                error = wrong
            else:
                try:
                    return normalize_file(data), code, None
                except (ValueError, zipfile.BadZipFile, OSError, EOFError) as exc:
                    error = f"{name} is not a well-formed file: {exc}"[-3000:]
        return None, code, error

    async def produce(task: Task) -> Task | Drop:
        text = await ask(
            [
                {
                    "role": "user",
                    "content": render(
                        SCENARIO_PROMPT,
                        query=task.query,
                        tools=task.tools,
                        max_files=fc.max_files,
                        file_types=sorted(GENERATED_TYPES),
                    ),
                }
            ]
        )
        try:
            information, specs = read_scenario(text, fc.max_files)
        except MalformedOutput as exc:
            return Drop("malformed scenario", {"error": str(exc), "output": text[:2000]})
        found = [file_kind(s["file_type"]) for s in specs]
        if None in found:
            bad = specs[found.index(None)]["file_type"]
            return Drop("unsupported file type", {"file_type": bad})
        kinds = [k for k in found if k is not None]
        taken: set[str] = set()
        names = [
            safe_name(s["file_name"], GENERATED_TYPES[k], taken) if k != "image" else ""
            for s, k in zip(specs, kinds, strict=True)
        ]
        generated: dict[int, FileRef] = {}
        sources: list[dict[str, Any]] = [{} for _ in specs]
        if any(k != "image" for k in kinds):
            from tracetune.sandbox import Sandbox, SandboxLimits, ToolReply

            async def no_tools(name: str, arguments: dict[str, Any]) -> ToolReply:
                return ToolReply(error="no tools are available while creating files")

            workdir = Path(tempfile.mkdtemp(prefix="mtrace-files-"))
            limits = SandboxLimits(timeout_s=fc.code_timeout_s, cpu_s=int(fc.code_timeout_s))

            async def start() -> Sandbox:
                nonlocal limits
                sandbox = await Sandbox.start(workdir, [], no_tools, limits)
                if sandbox.uid is not None and limits.uid is None:
                    # Every attempt of this task runs as one uid: files and folders an
                    # earlier attempt made stay writable for the next one.
                    limits = limits.model_copy(update={"uid": sandbox.uid})
                return sandbox

            try:
                for i, (s, kind) in enumerate(zip(specs, kinds, strict=True)):
                    if kind == "image":
                        continue
                    data, code, error = await make_file(start, workdir, s, kind, names[i])
                    if data is None:
                        return Drop(
                            "file code failed",
                            {"file": names[i], "error": error, "code": code[:3000]},
                        )
                    generated[i] = out.assets.put_bytes(
                        data, names[i], description=s["file_content"]
                    )
                    sources[i] = {"name": names[i], "kind": "generated", "code": code}
            finally:
                shutil.rmtree(workdir, ignore_errors=True)

        # The image choice: in query order, so the reuse cap sees the same history on resume.
        await turns.wait(task.id)
        chosen: dict[int, tuple[Any, float]] = {}
        for i, (s, kind) in enumerate(zip(specs, kinds, strict=True)):
            if kind != "image":
                continue
            taken_here = {e.id for e, _ in chosen.values()}
            pick = next(
                (
                    (e, score)
                    for e, score in pool.ranked(s["file_content"])
                    if usage[e.id] < fc.image_reuse_cap and e.id not in taken_here
                ),
                None,
            )
            if pick is None:
                return Drop(
                    "no pool image left",
                    {"description": s["file_content"], "cap": fc.image_reuse_cap},
                )
            if fc.min_image_similarity is not None and pick[1] < fc.min_image_similarity:
                return Drop(
                    "no pool image similar enough",
                    {
                        "description": s["file_content"],
                        "best": pick[0].source,
                        "similarity": round(pick[1], 4),
                    },
                )
            chosen[i] = pick
        files = []
        for i, s in enumerate(specs):
            if i in chosen:
                entry, score = chosen[i]
                usage[entry.id] += 1
                files.append(entry.file.model_copy(update={"description": s["file_content"]}))
                sources[i] = {
                    "name": entry.file.name,
                    "kind": "retrieved",
                    "pool_entry": entry.id,
                    "pool_source": entry.source,
                    "caption": entry.caption,
                    "similarity": round(score, 4),
                }
            else:
                files.append(generated[i])
        return Task(
            id=task.id,
            query=task.query,
            files=files,
            tools=task.tools,
            provenance=Provenance(
                source="mtrace:files",
                model=spec,
                prompt_hash=hashes["scenario"],
                parent_id=task.id,
                extra={"prompt_hashes": hashes},
            ),
            metadata={
                **task.metadata,
                "information_needed": information,
                "scenario": specs,
                "file_sources": sources,
            },
        )

    async def process(task: Task) -> Task | Drop:
        if task.id in existing:  # written before a kill, not yet marked done
            await turns.done(task.id)
            return existing[task.id]
        try:
            return await produce(task)
        finally:
            await turns.done(task.id)

    try:
        return await run_synth_stage(
            config,
            STAGE,
            items,
            lambda t: t.id,
            process,
            out,
            progress=progress,
            sources=[pool.assets],
        )
    finally:
        await model.aclose()
