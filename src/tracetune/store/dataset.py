"""A dataset is a directory: Parquet chunks of one record type, assets, and run state.

```
DIR/
  manifest.json          record type, schema version, tracetune version
  data/part-00000.parquet ...
  assets/ab/abcd....png  content-addressed images and files
  state.sqlite           run state: item status, model-call cache, usage
```

Writers append chunks sized by bytes (``target_bytes`` of Parquet, whatever the records'
size) and by time (at least every ``flush_interval_s``), each written to a temporary name and
renamed, so a killed writer loses at most the chunk in flight; the ids already on disk are
skipped on rerun.
The directory loads with ``datasets.load_dataset("parquet", data_dir=DIR + "/data")``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from tracetune import __version__
from tracetune.errors import TracetuneError
from tracetune.schema import RECORD_TYPES, SCHEMA_VERSION, STORAGE_CONTEXT, Record, arrow_schema
from tracetune.store.assets import AssetStore, iter_file_refs
from tracetune.store.state import RunState

R = TypeVar("R", bound=Record)

MANIFEST = "manifest.json"
# A chunk is flushed once its records reach about this many bytes of Parquet...
DEFAULT_CHUNK_BYTES = 8 << 20
# ...or when it has waited this long, so a killed run loses little work.
DEFAULT_FLUSH_INTERVAL_S = 10.0
# Bounds on records per chunk while the size of a record is being learnt.
FIRST_CHUNK_ROWS = 1024
MAX_CHUNK_ROWS = 200_000


class DatasetError(TracetuneError, ValueError):
    """A dataset directory is missing, of the wrong record type, or from a newer schema."""


class Dataset(Generic[R]):
    """A directory of records of one type, with their assets and run state."""

    def __init__(self, root: str | os.PathLike[str], record_type: type[R]) -> None:
        self.root = Path(root)
        self.record_type = record_type
        self.assets = AssetStore(self.root)
        self._state: RunState | None = None

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike[str], record_type: type[R]) -> Dataset[R]:
        """Open ``root`` for writing ``record_type`` records, creating it if needed."""
        root = Path(root)
        manifest = root / MANIFEST
        if manifest.exists():
            return cls.open(root, record_type)
        (root / "data").mkdir(parents=True, exist_ok=True)
        info = {
            "record_type": record_type.kind,
            "schema_version": SCHEMA_VERSION,
            "tracetune_version": __version__,
        }
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, manifest)
        return cls(root, record_type)

    @classmethod
    def open(cls, root: str | os.PathLike[str], record_type: type[R] | None = None) -> Dataset[Any]:
        """Open an existing dataset; checks the record type when one is given."""
        root = Path(root)
        manifest = root / MANIFEST
        if not manifest.exists():
            raise DatasetError(
                f"{root} is not a tracetune dataset (no {MANIFEST}); "
                "point at a directory written by a tracetune command"
            )
        info = json.loads(manifest.read_text())
        kind = info.get("record_type")
        if kind not in RECORD_TYPES:
            raise DatasetError(f"{root}: unknown record type {kind!r} in {MANIFEST}")
        if record_type is not None and kind != record_type.kind:
            raise DatasetError(
                f"{root} holds {kind} records, but {record_type.kind} records were expected"
            )
        if info.get("schema_version", 0) > SCHEMA_VERSION:
            raise DatasetError(
                f"{root} was written with schema version {info['schema_version']}, newer than "
                f"this tracetune ({SCHEMA_VERSION}); upgrade tracetune to read it"
            )
        return cls(root, RECORD_TYPES[kind])  # type: ignore[arg-type]  # kind read from disk

    @property
    def state(self) -> RunState:
        if self._state is None:
            self._state = RunState(self.root / "state.sqlite")
        return self._state

    # -- reading -----------------------------------------------------------------------
    def chunk_files(self) -> list[Path]:
        return sorted((self.root / "data").glob("part-*.parquet"))

    def _read(self, path: Path, **kwargs: Any) -> Any:
        """One chunk as an Arrow table; a corrupt chunk is a DatasetError naming it."""
        try:
            return pq.read_table(path, **kwargs)
        except (pa.ArrowException, OSError) as exc:
            raise self._corrupt(path, exc) from None

    def _corrupt(self, path: Path, exc: BaseException) -> DatasetError:
        return DatasetError(
            f"{path} is not a readable Parquet chunk ({type(exc).__name__}: {exc}); restore "
            f"it from a copy, or move it out of {path.parent} and run `tracetune data check "
            f"{self.root}` so that the command that wrote it redoes its items"
        )

    def ids(self) -> set[str]:
        ids: set[str] = set()
        for path in self.chunk_files():
            ids.update(self._read(path, columns=["id"]).column("id").to_pylist())
        return ids

    def table(self) -> pa.Table:
        """Every chunk as one Arrow table (stored form: JSON fields as text), for passes
        over many records that should not hold a record object each."""
        tables = [self._read(path) for path in self.chunk_files()]
        if not tables:
            return arrow_schema(self.record_type).empty_table()
        try:
            return pa.concat_tables(tables, promote_options="default")
        except pa.ArrowException as exc:
            raise DatasetError(f"the chunks of {self.root} do not share a schema: {exc}") from None

    def __iter__(self) -> Iterator[R]:
        for path in self.chunk_files():
            table = self._read(path)
            try:  # decoding can fail late on a damaged page ("Invalid number of indices")
                rows = table.to_pylist()
            except (pa.ArrowException, OSError) as exc:
                raise self._corrupt(path, exc) from None
            for row in rows:
                yield self.record_type.model_validate(row, context=STORAGE_CONTEXT)

    def __len__(self) -> int:
        total = 0
        for path in self.chunk_files():
            try:
                total += pq.read_metadata(path).num_rows
            except (pa.ArrowException, OSError) as exc:
                raise self._corrupt(path, exc) from None
        return total

    def records(self) -> list[R]:
        return list(self)

    def get(self, record_id: str) -> R:
        for path in self.chunk_files():
            table = self._read(path, filters=[("id", "=", record_id)])
            if table.num_rows:
                row = table.to_pylist()[0]
                return self.record_type.model_validate(row, context=STORAGE_CONTEXT)
        raise KeyError(f"no record {record_id!r} in {self.root}")

    def to_hf(self) -> Any:
        """This dataset as a Hugging Face ``datasets.Dataset`` (JSON fields stay as text)."""
        import datasets

        files = [str(p) for p in self.chunk_files()]
        if not files:
            return datasets.Dataset.from_list([], features=None)
        return datasets.load_dataset("parquet", data_files=files, split="train")

    # -- writing -----------------------------------------------------------------------
    def writer(
        self,
        chunk_size: int | None = None,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        target_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> DatasetWriter[R]:
        """A writer appending chunks of about ``target_bytes`` (at most ``chunk_size`` records
        when given), flushed at least every ``flush_interval_s`` seconds while records come."""
        return DatasetWriter(
            self,
            chunk_size=chunk_size,
            flush_interval_s=flush_interval_s,
            target_bytes=target_bytes,
        )

    def write_all(self, records: Iterable[R], sources: Iterable[AssetStore] = ()) -> int:
        """Write records (skipping ids already present); returns how many were new."""
        with self.writer() as w:
            return sum(w.write(r, sources=sources) for r in records)


class DatasetWriter(Generic[R]):
    """Buffers records and appends them as Parquet chunks, skipping ids already written."""

    def __init__(
        self,
        dataset: Dataset[R],
        chunk_size: int | None = None,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        target_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.dataset = dataset
        self.chunk_size = chunk_size
        self.flush_interval_s = flush_interval_s
        self.target_bytes = target_bytes
        # Records per chunk: learnt from the bytes per record of the chunks written so far.
        self._row_limit = min(chunk_size or FIRST_CHUNK_ROWS, FIRST_CHUNK_ROWS)
        self.on_flush: list[Callable[[], None]] = []  # called after each chunk is on disk
        self.schema: pa.Schema = arrow_schema(dataset.record_type)
        self._seen = dataset.ids()
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        existing = dataset.chunk_files()
        self._next_chunk = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        for stale in (dataset.root / "data").glob(".part-*.tmp"):
            stale.unlink()  # a chunk in flight when a previous writer was killed

    @property
    def buffered(self) -> int:
        """Records queued but not yet on disk."""
        return len(self._buffer)

    @property
    def written_ids(self) -> set[str]:
        return self._seen

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._seen

    def write(self, record: R, sources: Iterable[AssetStore] = ()) -> bool:
        """Queue ``record``; False if its id was already written. Imports its assets first."""
        if not isinstance(record, self.dataset.record_type):
            raise TypeError(
                f"{self.dataset.root} holds {self.dataset.record_type.kind} records, "
                f"got {type(record).__name__}"
            )
        if record.id in self._seen:
            return False
        sources = list(sources)
        for ref in iter_file_refs(record):
            if self.dataset.assets.has(ref):
                continue
            for source in sources:
                if source.has(ref):
                    self.dataset.assets.import_from(source, ref)
                    break
            else:
                raise FileNotFoundError(
                    f"record {record.id}: asset {ref.name!r} ({ref.sha256[:12]}) is in no "
                    "known asset store; store it with AssetStore.put_* before writing"
                )
        self._seen.add(record.id)
        self._buffer.append(record.model_dump(mode="json", context=STORAGE_CONTEXT))
        if (
            len(self._buffer) >= self._row_limit
            or time.monotonic() - self._last_flush >= self.flush_interval_s
        ):
            self.flush()
        return True

    def due(self) -> bool:
        """Whether buffered records have waited ``flush_interval_s`` (for callers between
        writes: a slow stage's last records should not wait for the next one)."""
        return bool(self._buffer) and time.monotonic() - self._last_flush >= self.flush_interval_s

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        path, tmp = self._chunk_paths(self._next_chunk)
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        self._next_chunk += 1
        rows = len(self._buffer)
        self._buffer.clear()
        self._learn_row_limit(path, rows)
        for callback in self.on_flush:
            callback()

    def _chunk_paths(self, index: int) -> tuple[Path, Path]:
        """Where chunk ``index`` lands, and the temporary name it is written under first
        (``.part-*.tmp``: a new writer removes those a killed one left)."""
        data_dir = self.dataset.root / "data"
        name = f"part-{index:05d}.parquet"
        return data_dir / name, data_dir / f".{name}.tmp"

    def _learn_row_limit(self, path: Path, rows: int) -> None:
        per_row = max(1.0, path.stat().st_size / rows)
        limit = int(self.target_bytes / per_row)
        if self.chunk_size is not None:
            limit = min(limit, self.chunk_size)
        self._row_limit = max(1, min(MAX_CHUNK_ROWS, limit))

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> DatasetWriter[R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Flush on errors too: what was produced before the error is kept.
        self.close()
