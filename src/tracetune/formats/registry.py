"""Exporters and importers for the trainers' formats, registered by name.

An exporter turns a tracetune dataset (trajectories, dialogues or preference pairs) into a
self-contained directory a trainer reads::

    OUT/
      train.jsonl      one row per record, in the trainer's own shape
      images/          the images the rows point at (copied or hard-linked, named by content)
      files/           non-image task attachments (kept so the export imports back losslessly)
      README.md        how to train on it
      export.json      what was exported, from where, with which options; skipped records

An importer reads such a file (ours or anyone's in that format) back into tracetune records.
Both kinds are registered with a thin decorator; the built-in ones are imported on first
use so that ``tracetune --help`` stays fast.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, Field

from tracetune.errors import TracetuneError

if TYPE_CHECKING:
    from tracetune.formats.turns import PendingMedia
    from tracetune.schema import FileRef, Record
    from tracetune.store import AssetStore

DATA_FILE = "train.jsonl"

ImageMode = Literal["copy", "link"]
ToolTurns = Literal["structured", "text"]
RecordChoice = Literal["auto", "trajectory", "dialogue"]
OnMissing = Literal["error", "skip"]


class FormatError(TracetuneError, ValueError):
    """Input that a format cannot hold or read; the message names the record and the fix."""


class MissingMediaError(TracetuneError, FileNotFoundError):
    """An image or file that a row points at does not exist."""

    def __init__(self, path: Path, hint: str = "") -> None:
        self.path = path
        super().__init__(f"missing file {path}{hint}")


# -- options and reports ----------------------------------------------------------------------
class ExportOptions(BaseModel):
    """How to export: where images go and how tool calls are written."""

    images: ImageMode = Field(
        default="copy",
        description="copy the images into OUT/images, or hard-link them (falls back to a copy "
        "across file systems).",
    )
    tool_turns: ToolTurns = Field(
        default="structured",
        description="structured: JSON-action steps become the trainer's tool-call and "
        "tool-result turns (function_call/observation, tool_call/tool_response); text: every "
        "step stays the assistant text the agent generated, exactly what tracetune's agent "
        "renders at inference.",
    )
    absolute_paths: bool = Field(
        default=False,
        description="write absolute image paths instead of paths relative to OUT.",
    )
    skip_invalid: bool = Field(
        default=False,
        description="skip records the format cannot hold (listed in export.json) instead of "
        "stopping at the first one.",
    )
    overwrite: bool = Field(default=False, description="replace an existing export in OUT.")
    name: str | None = Field(
        default=None,
        description="dataset name for registries such as LLaMA-Factory's dataset_info.json "
        "(default: OUT's directory name).",
    )
    include_failed: bool = Field(
        default=False,
        description="export trajectories as they are. By default, as `tracetune train sft` "
        "selects them, only trajectories that ended in a final answer and passed their "
        "verdict (if judged) are exported, and their failed steps (an unparsable output, a "
        "bad tool call, a raising tool) are left out with the error they caused, since the "
        "trainers' formats cannot turn the loss off for one turn.",
    )


class ImportOptions(BaseModel):
    """How to import: where relative image paths live and what to do with bad rows."""

    images_root: Path | None = Field(
        default=None,
        description="directory that relative image paths are relative to (default: the "
        "input file's directory).",
    )
    record_type: RecordChoice = Field(
        default="auto",
        description="trajectory: rows must be agent episodes (system prompt, task, steps); "
        "dialogue: keep each row as a plain chat; auto: decided by the first row.",
    )
    on_missing: OnMissing = Field(
        default="error",
        description="a row whose image is missing: error stops the import naming the row and "
        "file; skip leaves the row out and lists it in the report.",
    )
    skip_invalid: bool = Field(
        default=False,
        description="skip malformed rows (listed in the report) instead of stopping.",
    )
    tasks_out: Path | None = Field(
        default=None,
        description="also write the tasks of imported trajectories as a task dataset here.",
    )


@dataclass
class ExportReport:
    """What an export wrote and what it left out."""

    format: str
    source: Path
    out_dir: Path
    record_type: str
    rows: int = 0
    images: int = 0
    files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    """(record id, why) of records not fit to train on (unfinished, failed verdict)."""
    failed_steps: dict[str, int] = field(default_factory=dict)
    """Record id -> how many failed steps were left out of its exported trajectory."""

    def summary(self) -> str:
        text = (
            f"{self.rows} {self.record_type} records -> {self.out_dir / DATA_FILE} "
            f"({self.format}; {self.images} images, {self.files} files)"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} skipped (see {self.out_dir / 'export.json'})"
        return text

    def left_out_summary(self) -> list[str]:
        """What the training selection left out, and why (empty when nothing was)."""
        lines = []
        if self.left_out:
            counts: dict[str, int] = {}
            for _, why in self.left_out:
                kind = why.split(":", 1)[0]
                counts[kind] = counts.get(kind, 0) + 1
            detail = ", ".join(f"{n} {why}" for why, n in sorted(counts.items()))
            lines.append(
                f"left out {len(self.left_out)} {self.record_type} records not fit to train "
                f"on ({detail})"
            )
        if self.failed_steps:
            steps = sum(self.failed_steps.values())
            lines.append(
                f"left out {steps} failed steps (with their errors) from "
                f"{len(self.failed_steps)} exported records"
            )
        if lines:
            lines.append("pass --include-failed to export them as they are")
        return lines


@dataclass
class ImportReport:
    """What an import wrote and which rows it left out, with why."""

    format: str
    source: Path
    out_dir: Path
    record_type: str = ""
    imported: int = 0
    already_present: int = 0
    images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.imported} {self.record_type} records -> {self.out_dir} ({self.format})"
        if self.already_present:
            text += f"; {self.already_present} already there"
        if self.skipped:
            text += f"; {len(self.skipped)} rows skipped"
        return text


# -- media ------------------------------------------------------------------------------------
def _suffix(name: str) -> str:
    return "." + name.rsplit(".", 1)[1].lower() if "." in name else ""


class MediaWriter:
    """Places a dataset's assets in an export directory, named by content (stored once)."""

    def __init__(self, source: AssetStore, out_dir: Path, mode: ImageMode, absolute: bool) -> None:
        self.source = source
        self.out_dir = out_dir
        self.mode = mode
        self.absolute = absolute
        self.written: dict[str, str] = {}
        self.images = 0
        self.files = 0

    def image(self, ref: FileRef) -> str:
        return self._place(ref, "images")

    def file(self, ref: FileRef) -> str:
        return self._place(ref, "files")

    def _place(self, ref: FileRef, folder: str) -> str:
        rel = f"{folder}/{ref.sha256}{_suffix(ref.name)}"
        if rel not in self.written:
            target = self.out_dir / rel
            if not target.exists():
                source = self.source.path(ref)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + f".tmp{os.getpid()}")
                if self.mode == "link":
                    try:
                        os.link(source, tmp)
                    except OSError:  # another file system: a copy is the only option
                        shutil.copyfile(source, tmp)
                else:
                    shutil.copyfile(source, tmp)
                os.replace(tmp, target)
            self.written[rel] = str(target.resolve()) if self.absolute else rel
            if folder == "images":
                self.images += 1
            else:
                self.files += 1
        return self.written[rel]


class ImportContext:
    """Resolves the paths rows point at and stores the bytes in the output dataset."""

    def __init__(self, assets: AssetStore, images_root: Path, format_name: str) -> None:
        self.assets = assets
        self.images_root = images_root
        self.format_name = format_name
        self.stored = 0

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.images_root / p

    def store(
        self, media: PendingMedia, name: str | None = None, *, mime: str | None = None
    ) -> FileRef:
        """The bytes of ``media`` in the output assets, as a ref named ``name``."""
        from PIL import Image, UnidentifiedImageError

        from tracetune.inputs import ImageError
        from tracetune.store import guess_mime

        path = self.resolve(media.path)
        if not path.is_file():
            raise MissingMediaError(
                path,
                f" (given as {media.path!r}; relative paths are read from {self.images_root}: "
                "pass --images-root to point elsewhere)",
            )
        name = name or Path(media.path).name
        data = path.read_bytes()
        if media.kind == "image":
            mime = mime if mime and mime.startswith("image/") else guess_mime(name)
            if not mime.startswith("image/"):
                try:
                    with Image.open(path) as img:
                        mime = Image.MIME.get(img.format or "", "image/png")
                except UnidentifiedImageError:
                    raise FormatError(f"{path} is not an image PIL can read") from None
        try:
            ref = self.assets.put_bytes(data, name, mime=mime or guess_mime(name), where=str(path))
        except UnidentifiedImageError:
            raise FormatError(f"{path} is not an image PIL can read") from None
        except ImageError as exc:  # a bomb, a truncated image: a bad row (--skip-invalid)
            raise FormatError(str(exc)) from None
        self.stored += 1
        return ref


# -- exporters and importers ------------------------------------------------------------------
class Exporter(ABC):
    """Writes records as rows of a trainer's format; one instance per export."""

    name: ClassVar[str]
    description: ClassVar[str]
    record_kinds: ClassVar[tuple[str, ...]]
    """Record kinds accepted (``trajectory``, ``dialogue``, ``pair``)."""

    def __init__(self, options: ExportOptions) -> None:
        self.options = options

    @abstractmethod
    def row(self, record: Record, media: MediaWriter) -> dict[str, Any]:
        """One record as one row; raise :class:`FormatError` when the format cannot hold it."""

    @abstractmethod
    def readme(self, report: ExportReport) -> str:
        """How to train on the export (Markdown)."""

    def extra_files(self, report: ExportReport) -> dict[str, str]:
        """Further files to write beside the data, e.g. a dataset registry entry."""
        return {}

    def export(self, source: Path, out_dir: Path) -> ExportReport | None:
        """Write the whole export in a layout of the exporter's own (e.g. Parquet shards) and
        return its report; None (the default) writes the rows as ``train.jsonl``."""
        return None

    def dataset_name(self, report: ExportReport) -> str:
        name = self.options.name or report.out_dir.resolve().name
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "tracetune"


class Importer(ABC):
    """Reads rows of a format back into tracetune records."""

    name: ClassVar[str]
    description: ClassVar[str]
    record_kinds: ClassVar[tuple[str, ...]]
    """Record kinds produced (``trajectory``, ``dialogue``, ``pair``)."""

    def __init__(self, options: ImportOptions) -> None:
        self.options = options

    def locate(self, path: Path) -> Path:
        """The data file to read when given a directory (an export's ``train.jsonl``)."""
        if path.is_dir():
            found = path / DATA_FILE
            if found.is_file():
                return found
            candidates = sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
            candidates = [
                c for c in candidates if c.name not in ("export.json", "dataset_info.json")
            ]
            if len(candidates) != 1:
                raise FormatError(
                    f"{path} is a directory without {DATA_FILE}; pass the data file itself"
                )
            return candidates[0]
        if not path.is_file():
            raise FormatError(f"no such file: {path}")
        return path

    def rows(self, path: Path) -> Iterator[dict[str, Any]]:
        yield from read_rows(path)

    @abstractmethod
    def kind_of(self, row: dict[str, Any]) -> Literal["chat", "pair"]:
        """Whether a row is a single chat (trajectory or dialogue) or a preference pair."""

    @abstractmethod
    def convert(self, row: dict[str, Any], ctx: ImportContext, want: str, record_id: str) -> Record:
        """The row as a record of kind ``want`` (``trajectory``, ``dialogue`` or ``pair``).

        Raises :class:`~tracetune.formats.turns.NotAnEpisode` when the row is a plain chat but
        a trajectory was wanted, :class:`FormatError` for malformed rows and
        :class:`MissingMediaError` for missing images.
        """

    def record_id(self, row: dict[str, Any]) -> str:
        rid = row.get("id")
        if isinstance(rid, str | int) and str(rid):
            return str(rid)
        digest = hashlib.sha256(
            json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()
        ).hexdigest()
        return f"{self.name}-{digest[:16]}"


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSON Lines file, or of a JSON file holding a list of objects."""
    from tracetune.inputs import decode_text, read_text

    if path.suffix == ".jsonl":
        with path.open("rb") as fh:
            for line_no, raw in enumerate(fh, 1):
                line = decode_text(raw, path, line=line_no)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FormatError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise FormatError(f"{path}:{line_no}: each line must be a JSON object")
                yield row
        return
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise FormatError(f"{path} must hold a JSON list of objects (or JSON Lines)")
    yield from data


# -- the registry -----------------------------------------------------------------------------
_EXPORTERS: dict[str, type[Exporter]] = {}
_IMPORTERS: dict[str, type[Importer]] = {}

# Built-in formats, by the module that registers them (imported on first use).
_BUILTIN_EXPORTERS = {
    "trl-sft": "tracetune.formats.trl",
    "trl-dpo": "tracetune.formats.trl",
    "llamafactory": "tracetune.formats.llamafactory",
    "llamafactory-dpo": "tracetune.formats.llamafactory",
    "swift": "tracetune.formats.swift",
    "hf": "tracetune.formats.hf",
}
_BUILTIN_IMPORTERS = {
    "trl-sft": "tracetune.formats.trl",
    "trl-dpo": "tracetune.formats.trl",
    "llamafactory": "tracetune.formats.llamafactory",
    "llamafactory-dpo": "tracetune.formats.llamafactory",
    "swift": "tracetune.formats.swift",
    "mat": "tracetune.formats.mat",
    "mat-dpo": "tracetune.formats.mat",
}

E = TypeVar("E", bound=type[Exporter])
I = TypeVar("I", bound=type[Importer])  # noqa: E741


def register_exporter(name: str) -> Callable[[E], E]:
    """Class decorator: make an :class:`Exporter` available as ``--format NAME``."""

    def wrap(cls: E) -> E:
        cls.name = name
        _EXPORTERS[name] = cls
        return cls

    return wrap


def register_importer(name: str) -> Callable[[I], I]:
    """Class decorator: make an :class:`Importer` available as ``--format NAME``."""

    def wrap(cls: I) -> I:
        cls.name = name
        _IMPORTERS[name] = cls
        return cls

    return wrap


def export_formats() -> list[str]:
    """Names of the export formats (built-in and registered), without importing them."""
    return sorted({*_BUILTIN_EXPORTERS, *_EXPORTERS})


def import_formats() -> list[str]:
    """Names of the import formats (built-in and registered), without importing them."""
    return sorted({*_BUILTIN_IMPORTERS, *_IMPORTERS})


def get_exporter(name: str) -> type[Exporter]:
    if name not in _EXPORTERS and name in _BUILTIN_EXPORTERS:
        importlib.import_module(_BUILTIN_EXPORTERS[name])
    if name not in _EXPORTERS:
        raise FormatError(
            f"unknown export format {name!r}; choose one of: {', '.join(export_formats())}"
        )
    return _EXPORTERS[name]


def get_importer(name: str) -> type[Importer]:
    if name not in _IMPORTERS and name in _BUILTIN_IMPORTERS:
        importlib.import_module(_BUILTIN_IMPORTERS[name])
    if name not in _IMPORTERS:
        raise FormatError(
            f"unknown import format {name!r}; choose one of: {', '.join(import_formats())}"
        )
    return _IMPORTERS[name]


# -- running them -----------------------------------------------------------------------------
_KIND_FORMATS = {
    "trajectory": "trl-sft, llamafactory or swift",
    "dialogue": "trl-sft, llamafactory or swift",
    "pair": "trl-dpo, llamafactory-dpo or swift",
}


def export_dataset(
    format_name: str,
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ExportOptions | None = None,
) -> ExportReport:
    """Export the tracetune dataset at ``source`` to ``out_dir`` in ``format_name``."""
    from tracetune.formats.chat import ChatFormatError
    from tracetune.store import Dataset

    options = options or ExportOptions()
    exporter = get_exporter(format_name)(options)
    custom = exporter.export(Path(source), Path(out_dir))
    if custom is not None:
        return custom
    dataset = Dataset.open(source)
    kind = dataset.record_type.kind
    if kind not in exporter.record_kinds:
        raise FormatError(
            f"{format_name} exports {' or '.join(exporter.record_kinds)} datasets, but "
            f"{source} holds {kind} records; use {_KIND_FORMATS.get(kind, 'another format')} "
            "for those"
        )
    out = Path(out_dir)
    data_path = out / DATA_FILE
    if data_path.exists() and not options.overwrite:
        raise FormatError(f"{out} already holds an export; pass --overwrite to replace it")
    if (out / "export.json").is_file():  # our own previous export: drop its media too
        for folder in ("images", "files"):
            shutil.rmtree(out / folder, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    report = ExportReport(
        format=format_name,
        source=Path(source),
        out_dir=out,
        record_type=kind,
        options=options.model_dump(mode="json"),
    )
    media = MediaWriter(dataset.assets, out, options.images, options.absolute_paths)
    tmp = data_path.with_name(f".{DATA_FILE}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for record in dataset:
            if not options.include_failed and kind == "trajectory":
                selected = select_for_training(record, report)
                if selected is None:
                    continue
                record = selected
            try:
                row = exporter.row(record, media)
            except (FormatError, ChatFormatError, FileNotFoundError, KeyError) as exc:
                reason = str(exc).strip("'\"")
                if not options.skip_invalid:
                    tmp.unlink()
                    prefix = "" if record.id in reason else f"record {record.id}: "
                    raise FormatError(
                        f"{prefix}{reason} (pass --skip-invalid to leave such records out)"
                    ) from exc
                report.skipped.append((record.id, reason))
                continue
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            report.rows += 1
    os.replace(tmp, data_path)
    report.images, report.files = media.images, media.files
    for name, text in exporter.extra_files(report).items():
        (out / name).write_text(text, encoding="utf-8")
    (out / "README.md").write_text(exporter.readme(report), encoding="utf-8")
    (out / "export.json").write_text(
        json.dumps(export_manifest(report), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    return report


def select_for_training(record: Any, report: ExportReport) -> Any:
    """The trajectory as ``train sft`` selects it (failed steps out), or None (left out)."""
    from tracetune.formats.selection import NOTHING_TO_TRAIN, skip_reason, without_failed_steps

    if why := skip_reason(record):
        report.left_out.append((record.id, why))
        return None
    kept, dropped = without_failed_steps(record)
    if not kept.steps:
        report.left_out.append((record.id, NOTHING_TO_TRAIN))
        return None
    if dropped:
        report.failed_steps[record.id] = dropped
    return kept


def export_manifest(report: ExportReport) -> dict[str, Any]:
    """What an export writes into its manifest: format, counts, skips, the tracetune version."""
    from tracetune import __version__

    return {
        "format": report.format,
        "source": str(report.source.resolve()),
        "record_type": report.record_type,
        "rows": report.rows,
        "images": report.images,
        "files": report.files,
        "options": report.options,
        "skipped": [{"id": rid, "reason": why} for rid, why in report.skipped],
        "left_out": [{"id": rid, "reason": why} for rid, why in report.left_out],
        "failed_steps_left_out": report.failed_steps,
        "tracetune_version": __version__,
    }


def import_file(
    format_name: str,
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ImportOptions | None = None,
) -> ImportReport:
    """Import the rows of ``source`` (a file, or an export directory) into a dataset."""
    from tracetune.formats.turns import NotAnEpisode
    from tracetune.schema import RECORD_TYPES, Task, Trajectory
    from tracetune.store import AssetStore, Dataset

    options = options or ImportOptions()
    importer = get_importer(format_name)(options)
    path = importer.locate(Path(source))
    images_root = options.images_root or path.parent
    out = Path(out_dir)
    report = ImportReport(format=format_name, source=path, out_dir=out)
    # Assets go straight into the output dataset; a row that fails leaves at most a few
    # unreferenced (content-addressed, harmless) files behind.
    ctx = ImportContext(AssetStore(out), images_root, format_name)
    dataset: Dataset[Any] | None = None
    writer = None
    want = ""
    try:
        for index, row in enumerate(importer.rows(path)):
            rid = importer.record_id(row)
            where = f"row {index} (id {rid})"
            kind = importer.kind_of(row)
            try:
                if dataset is None:
                    want = _choose_kind(importer, row, ctx, kind, rid)
                    dataset = Dataset.create(out, RECORD_TYPES[want])
                    writer = dataset.writer()
                    report.record_type = want
                    if rid in writer:
                        report.already_present += 1
                        continue
                elif rid in writer:  # type: ignore[operator]
                    report.already_present += 1
                    continue
                if (kind == "pair") != (want == "pair"):
                    raise FormatError(
                        f"mixes preference rows and chat rows; this file started with {want} rows"
                    )
                record = importer.convert(row, ctx, want, rid)
            except MissingMediaError as exc:
                if options.on_missing == "error":
                    raise FormatError(
                        f"{where}: {exc} (pass --on-missing skip to leave such rows out)"
                    ) from exc
                report.skipped.append((rid, str(exc)))
                continue
            except NotAnEpisode as exc:
                if not options.skip_invalid:
                    hint = (
                        "; import with --as dialogue to keep the rows as plain chats"
                        if want == "trajectory"
                        else ""
                    )
                    raise FormatError(f"{where} is not an agent episode: {exc}{hint}") from exc
                report.skipped.append((rid, str(exc)))
                continue
            except FormatError as exc:
                if not options.skip_invalid:
                    raise FormatError(
                        f"{where}: {exc} (pass --skip-invalid to leave such rows out)"
                    ) from exc
                report.skipped.append((rid, str(exc)))
                continue
            assert writer is not None
            if writer.write(record):
                report.imported += 1
            else:
                report.already_present += 1
    finally:
        if writer is not None:
            writer.close()
    report.images = ctx.stored
    if options.tasks_out is not None and dataset is not None:
        if dataset.record_type is not Trajectory:
            raise FormatError("--tasks-out needs trajectory records; these are " + want)
        tasks = Dataset.create(options.tasks_out, Task)
        tasks.write_all((t.task for t in dataset), sources=[dataset.assets])
    if dataset is None:
        raise FormatError(f"{path} holds no rows")
    return report


def _choose_kind(
    importer: Importer, row: dict[str, Any], ctx: ImportContext, kind: str, rid: str
) -> str:
    """The record kind for the whole file, from its first row and the options."""
    from tracetune.formats.turns import NotAnEpisode

    if kind == "pair":
        if "pair" not in importer.record_kinds:
            raise FormatError(f"{importer.name} does not import preference pairs")
        return "pair"
    choice = importer.options.record_type
    if choice != "auto":
        if choice not in importer.record_kinds:
            raise FormatError(f"{importer.name} cannot import {choice} records")
        return choice
    if "trajectory" not in importer.record_kinds:
        return "dialogue"
    try:
        importer.convert(row, ctx, "trajectory", rid)
    except NotAnEpisode:
        return "dialogue"
    except (FormatError, MissingMediaError):
        pass  # reported when the row is converted for real
    return "trajectory"
