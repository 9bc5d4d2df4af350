"""Foundation stage: multimodal QA rows in, normalized ``Task`` records out.

Reads a Hugging Face dataset directory (``save_to_disk`` output, or a folder of Parquet/JSONL
files such as a hub snapshot), a Parquet file, a JSONL file or a CSV file. A column mapping
names the image, question, answer and optional choices and id columns. Images may be paths
(relative to ``images_root`` or the file's folder), raw bytes, ``data:`` URLs, bare base64
text (as in VLMEvalKit's TSVs), Hugging Face image structs (``{"bytes", "path"}``) or decoded
images, one or a list per row.

Normalization: stable ids (from the id column, else from the row's content), images stored
once in the asset store, ``<image>`` placeholders removed from the question text, and, for
short answers, an answer-style constraint appended to the question (option letter, number,
yes/no, word or phrase). Answers are kept as given, except that a multiple-choice answer
given as the option's text becomes its letter (the original is kept as an alias and in the
metadata). Rows whose image is missing or unreadable are dropped with the reason
``missing_image`` / ``broken_image`` and listed in ``stats.json``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from tracetune.cliflag import CliFlag
from tracetune.errors import TracetuneError
from tracetune.inputs import ImageError, check_image, decode_text, read_json, read_text
from tracetune.prompts import prompt_hash, render
from tracetune.runner import Drop, StageResult, run_stage
from tracetune.schema import FileRef, GoldAnswer, Provenance, Task
from tracetune.store import Dataset

STAGE = "mmat-ingest"
STYLE_PROMPT = "mmat/answer_style.jinja"
SourceFormat = Literal["auto", "hf", "parquet", "jsonl", "csv"]
_NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?%?$")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
_HAS_STYLE = re.compile(
    r"\banswer (?:with|using|in) (?:a|one|the|only|just)\b|\banswer the question using\b",
    re.IGNORECASE,
)


_IMAGE_MARKER = "<image>"


def strip_image_markers(question: str) -> str:
    """The question without ``<image>`` placeholders (LLaVA-style sources write them into
    the text). The images travel as message parts, and the exporters add one marker per
    image: a marker left in the text would count as an extra image and fail the export."""
    if _IMAGE_MARKER not in question:
        return question
    lines = []
    for line in question.splitlines():
        if _IMAGE_MARKER in line:
            line = re.sub(r"[ \t]{2,}", " ", line.replace(_IMAGE_MARKER, " ")).strip()
            if not line:
                continue
        lines.append(line)
    return "\n".join(lines).strip()


class IngestError(TracetuneError, ValueError):
    """The source cannot be read as configured; the message says what to change."""


class ColumnMapping(BaseModel):
    """Which source columns hold the image(s), question, answer, choices and id."""

    model_config = ConfigDict(extra="forbid")

    image: Annotated[str, CliFlag("--image-col")] = Field(
        default="image", description="Column with image path(s) or bytes."
    )
    question: Annotated[str, CliFlag("--question-col")] = Field(
        default="question", description="Column with the question text."
    )
    answer: Annotated[str, CliFlag("--answer-col")] = Field(
        default="answer", description="Column with the answer (or answers)."
    )
    choices: Annotated[str | None, CliFlag("--choices-col")] = Field(
        default=None,
        description="Column with the options (list, JSON or 'a|b|c'); default "
        "'choices' or 'options' when present.",
    )
    id: Annotated[str | None, CliFlag("--id-col")] = Field(
        default=None, description="Column with a stable item id; default 'id' when present."
    )


class IngestOptions(BaseModel):
    """How QA rows are read and normalized."""

    model_config = ConfigDict(extra="forbid")

    format: SourceFormat = Field(default="auto", description="Source format (auto: by path).")
    columns: ColumnMapping = Field(default_factory=ColumnMapping, description="Column mapping.")
    split: str | None = Field(
        default=None,
        description="Split of a Hugging Face DatasetDict (default: the only one or 'train').",
    )
    images_root: Path | None = Field(
        default=None,
        description="Folder that relative image paths are relative to (default: "
        "the source file's folder).",
    )
    name: str | None = Field(
        default=None, description="Source name recorded on tasks (default: the file name)."
    )
    answer_style: Annotated[bool, CliFlag("--style")] = Field(
        default=True, description="Append an answer-style constraint to short-answer questions."
    )
    short_answer_words: int = Field(
        default=3, ge=1, description="Answers with at most this many words count as short."
    )
    limit: int | None = Field(default=None, ge=1, description="Only the first N rows.")


class IngestConfig(IngestOptions):
    """Configuration of ``tracetune mmat ingest``."""

    source: Path = Field(description="HF dataset dir, Parquet, JSONL or CSV file.")
    out: Path = Field(description="Output task dataset (resumable).")


# -- reading rows ----------------------------------------------------------------------------
def detect_format(source: Path) -> SourceFormat:
    if source.is_dir():
        return "hf"
    suffix = source.suffix.lower()
    for fmt, suffixes in (
        ("parquet", (".parquet",)),
        ("jsonl", (".jsonl", ".ndjson", ".json")),
        ("csv", (".csv", ".tsv")),
    ):
        if suffix in suffixes:
            return fmt  # type: ignore[return-value]
    raise IngestError(f"cannot tell the format of {source}; set format: hf|parquet|jsonl|csv")


def read_rows(source: Path, options: IngestOptions) -> Iterator[dict[str, Any]]:
    """Rows as dicts, in source order; a row that cannot be parsed is ``{"__error__": ...}``."""
    if not source.exists():
        raise IngestError(f"QA source {source} does not exist")
    fmt = detect_format(source) if options.format == "auto" else options.format
    if fmt == "hf":
        yield from _hf_rows(source, options)
    elif fmt == "parquet":
        yield from _parquet_rows([source])
    elif fmt == "jsonl":
        yield from _jsonl_rows(source)
    else:
        yield from _csv_rows(source)


def _parquet_rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    import pyarrow as pa  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    for path in files:
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=256)
            for batch in batches:
                rows = batch.to_pylist()
                yield from rows
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(
                f"{path} is not a readable Parquet file ({type(exc).__name__}: {exc}); "
                "download it again (rows before the damage were ingested and are kept)"
            ) from None


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix.lower() == ".json":
        data = read_json(path)
        if not isinstance(data, list):
            raise IngestError(f"{path} must hold a JSON list of rows (or use JSON Lines)")
        yield from (
            r if isinstance(r, dict) else {"__error__": "row is not an object"} for r in data
        )
        return
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            line = decode_text(raw, path, line=number)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield {"__error__": f"line {number}: invalid JSON ({exc.msg})"}
                continue
            yield row if isinstance(row, dict) else {"__error__": f"line {number}: not an object"}


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    yield from csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)


def _hf_rows(root: Path, options: IngestOptions) -> Iterator[dict[str, Any]]:
    saved = any(
        (root / f).exists() for f in ("dataset_dict.json", "state.json", "dataset_info.json")
    )
    if saved:
        import datasets  # type: ignore[import-untyped]

        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            split = options.split or (splits[0] if len(splits) == 1 else "train")
            if split not in loaded:
                raise IngestError(f"{root} has splits {', '.join(splits)}; choose one with split:")
            loaded = loaded[split]
        for name, feature in loaded.features.items():
            if isinstance(feature, datasets.Image):
                loaded = loaded.cast_column(name, datasets.Image(decode=False))
        yield from loaded
        return
    for pattern, reader in (("*.parquet", _parquet_rows), ("*.jsonl", None)):
        found = sorted(root.rglob(pattern))
        # Hub layout: data/<split>-00000-of-00001.parquet (or <split>/...). Without a split,
        # read train when there is one, so test rows never mix into training data.
        split = options.split or (
            "train" if any(_in_split(p, root, "train") for p in found) else ""
        )
        files = [p for p in found if not split or _in_split(p, root, split)]
        if found and not files:
            raise IngestError(f"{root} has no {pattern} files for split {split!r}")
        if files:
            if reader is not None:
                yield from reader(files)
            else:
                for f in files:
                    yield from _jsonl_rows(f)
            return
    raise IngestError(
        f"{root} is neither a saved Hugging Face dataset (save_to_disk) nor a folder of "
        ".parquet/.jsonl files"
    )


def _in_split(path: Path, root: Path, split: str) -> bool:
    parts = path.relative_to(root).parts
    return path.name.startswith(f"{split}-") or path.stem == split or split in parts[:-1]


# -- normalizing one row ---------------------------------------------------------------------
def _column(row: dict[str, Any], name: str | None, fallbacks: tuple[str, ...] = ()) -> Any:
    for key in (name, *fallbacks) if name else fallbacks:
        if key in row:
            return row[key]
    return None


def parse_choices(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, dict):
        return [str(v) for _, v in sorted(value.items())]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("[") or text.startswith("{"):
        try:
            return parse_choices(json.loads(text))
        except json.JSONDecodeError:
            pass
    return [c.strip() for c in text.split("|") if c.strip()]


def answer_style(answer: str, choices: list[str], max_words: int) -> str | None:
    """choice, number, yesno or short for short answers; None for long answers."""
    if choices:
        return "choice"
    text = answer.strip()
    if _NUMBER.match(text) and any(ch.isdigit() for ch in text):
        return "number"
    if text.lower().rstrip(".") in ("yes", "no"):
        return "yesno"
    if 0 < len(text.split()) <= max_words:
        return "short"
    return None


def answer_values(value: Any) -> list[str]:
    """A row's distinct reference answers, the most frequent first. VQAv2-style rows carry
    ten human answers, as strings or ``{"answer": ...}`` records; the consensus answer is
    the reference and the others stay as aliases."""
    items = value if isinstance(value, list | tuple) else [value]
    texts = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("answer", item.get("text"))
        if item is not None and str(item).strip():
            texts.append(str(item).strip())
    counts = Counter(texts)
    return sorted(dict.fromkeys(texts), key=lambda text: -counts[text])  # stable on ties


def _image_values(value: Any) -> list[Any]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, list | tuple):
        return [v for v in value if v is not None]
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = json.loads(value)
            if isinstance(parsed, list):
                return parsed
        except json.JSONDecodeError:
            pass
    return [value]


class BadImage(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def image_bytes(value: Any, base: Path) -> tuple[bytes, str | None]:
    """The bytes (and file name, if known) of one image value."""
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue(), None
    if isinstance(value, bytes | bytearray):
        return bytes(value), None
    if isinstance(value, dict):
        if value.get("bytes"):
            path = value.get("path")
            return bytes(value["bytes"]), Path(path).name if path else None
        if value.get("path"):
            return image_bytes(str(value["path"]), base)
        raise BadImage("missing_image", "image struct has neither bytes nor path")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("data:"):
            try:
                return base64.b64decode(text.split(",", 1)[1]), None
            except (IndexError, ValueError) as exc:
                raise BadImage("broken_image", f"bad data URL: {exc}") from None
        if len(text) > 256 and _BASE64.fullmatch(text):
            # Bytes in a text column (VLMEvalKit's benchmark TSVs): bare base64, no data: URL.
            try:
                return base64.b64decode(text, validate=False), None
            except ValueError as exc:
                raise BadImage("broken_image", f"bad base64 image: {exc}") from None
        path = Path(text).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise BadImage("missing_image", f"no image file {path}")
        return path.read_bytes(), path.name
    raise BadImage("missing_image", f"unsupported image value of type {type(value).__name__}")


def _fingerprint(values: list[Any]) -> list[str]:
    out = []
    for v in values:
        if isinstance(v, bytes | bytearray):
            out.append(hashlib.sha256(bytes(v)).hexdigest())
        elif isinstance(v, dict):
            data = v.get("bytes")
            out.append(hashlib.sha256(bytes(data)).hexdigest() if data else str(v.get("path")))
        elif isinstance(v, Image.Image):
            out.append(hashlib.sha256(v.tobytes()).hexdigest())
        else:
            out.append(str(v))
    return out


class Ingester:
    """Turns rows into tasks, storing images in the output dataset's assets."""

    def __init__(self, config: IngestConfig, out: Dataset[Task]) -> None:
        self.config = config
        self.out = out
        self.base = config.images_root or (
            config.source if config.source.is_dir() else config.source.parent
        )
        self.name = config.name or config.source.name
        self.cols = config.columns

    def key(self, item: tuple[int, dict[str, Any]]) -> str:
        index, row = item
        rid = _column(row, self.cols.id, ("id",) if self.cols.id is None else ())
        if rid not in (None, ""):
            blob = json.dumps([self.name, str(rid)])
        else:
            blob = json.dumps(
                [
                    str(_column(row, self.cols.question)),
                    str(_column(row, self.cols.answer)),
                    parse_choices(_column(row, self.cols.choices, self._choice_fallbacks())),
                    _fingerprint(_image_values(_column(row, self.cols.image))),
                ],
                default=str,
            )
        return "qa-" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _choice_fallbacks(self) -> tuple[str, ...]:
        return ("choices", "options") if self.cols.choices is None else ()

    async def process(self, item: tuple[int, dict[str, Any]]) -> Task | Drop:
        index, row = item
        if "__error__" in row:
            return Drop("bad_row", {"row": index, "error": row["__error__"]})
        question = _column(row, self.cols.question)
        answer = _column(row, self.cols.answer)
        if isinstance(question, str):
            question = strip_image_markers(question)
        if not isinstance(question, str) or not question.strip():
            return Drop("no_question", {"row": index, "column": self.cols.question})
        answers = answer_values(answer)
        if not answers:
            return Drop("no_answer", {"row": index, "column": self.cols.answer})
        values = _image_values(_column(row, self.cols.image))
        if not values:
            return Drop("missing_image", {"row": index, "column": self.cols.image})
        refs: list[FileRef] = []
        key = self.key(item)
        for i, value in enumerate(values):
            try:
                data, name = image_bytes(value, self.base)
                # The same check as every image entering a dataset: a decompression bomb, a
                # truncated or corrupt image is dropped with its reason, not a failed item.
                info = check_image(data, name or f"row {index} image {i}")
            except BadImage as exc:
                return Drop(exc.reason, {"row": index, "detail": str(exc)})
            except ImageError as exc:
                return Drop(exc.reason, {"row": index, "detail": str(exc)})
            fmt = info.format.lower()
            ext = {"jpeg": "jpg"}.get(fmt, fmt)
            name = name or f"{key}_{i}.{ext}"
            mime = Image.MIME.get(info.format, "image/png")
            refs.append(self.out.assets.put_bytes(data, name, mime=mime, checked=info))
        choices = parse_choices(_column(row, self.cols.choices, self._choice_fallbacks()))
        value, aliases = answers[0], list(dict.fromkeys(answers[1:]))
        original = value
        if choices:
            letters = [chr(ord("A") + i) for i in range(len(choices))]
            bare = value.strip().strip("().").upper()
            if bare in letters:
                value = bare
            elif value.strip().lower() in [c.strip().lower() for c in choices]:
                value = letters[[c.strip().lower() for c in choices].index(value.strip().lower())]
                aliases = [original, *aliases]
            else:
                return Drop("answer_not_in_choices", {"row": index, "answer": value})
        style = answer_style(value, choices, self.config.short_answer_words)
        query = question.strip()
        if choices:
            query += "\n" + "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
        if self.config.answer_style and style and not _HAS_STYLE.search(question):
            query += "\n" + render(STYLE_PROMPT, style=style)
        kind = {"choice": "choice", "number": "number"}.get(style or "", "text")
        rid = _column(row, self.cols.id, ("id",) if self.cols.id is None else ())
        return Task(
            id=key,
            query=query,
            files=refs,
            gold=GoldAnswer(value=value, kind=kind, aliases=aliases),  # type: ignore[arg-type]
            provenance=Provenance(
                source=f"mmat:ingest:{self.name}", prompt_hash=prompt_hash(STYLE_PROMPT)
            ),
            metadata={
                "question": question.strip(),
                "choices": choices,
                "answer_style": style,
                "original_answer": original,
                "item_id": str(rid) if rid not in (None, "") else key,
                "source_row": index,
            },
        )


async def run_ingest(
    config: IngestConfig, progress: bool = True
) -> tuple[StageResult, Dataset[Task]]:
    """Ingest ``config.source`` into the task dataset ``config.out``."""
    if not config.source.exists():
        raise IngestError(f"QA source {config.source} does not exist")
    out: Dataset[Task] = Dataset.create(config.out, Task)
    ingester = Ingester(config, out)
    rows = read_rows(config.source, config)
    first = next(rows, None)
    if first is None:
        raise IngestError(f"{config.source} has no rows")
    _check_columns(first, config, config.source)

    def items() -> Iterator[tuple[int, dict[str, Any]]]:
        yield 0, first
        for index, row in enumerate(rows, 1):
            if config.limit is not None and index >= config.limit:
                return
            yield index, row

    result = await run_stage(
        STAGE,
        items(),
        key=ingester.key,
        process=ingester.process,
        out=out,
        concurrency=1,
        progress=progress,
    )
    from tracetune.engine.common import stage_stats

    examples = [
        {"key": k, **info} for k, status, info in out.state.items(STAGE) if status == "dropped"
    ][:10]
    styles: dict[str, int] = {}
    for task in out:
        style = str(task.metadata.get("answer_style") or "long")
        styles[style] = styles.get(style, 0) + 1
    stage_stats(out, STAGE, result, {"answer_styles": styles, "dropped_examples": examples})
    return result, out


def _check_columns(row: dict[str, Any], config: IngestConfig, source: Path) -> None:
    if "__error__" in row:
        return
    cols = config.columns
    missing = [
        f"{field} ({name!r})"
        for field, name in (
            ("image", cols.image),
            ("question", cols.question),
            ("answer", cols.answer),
        )
        if name not in row
    ]
    # choices and id may be absent on some rows (open questions, rows without ids).
    if missing:
        raise IngestError(
            f"{source}: the first row has no column for {', '.join(missing)}; its columns are "
            f"{', '.join(map(str, row))}. Map them with columns.image/question/answer/choices/id "
            "(CLI: --image-col, --question-col, --answer-col, --choices-col, --id-col)"
        )
