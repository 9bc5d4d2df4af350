"""Datasets on disk: Parquet chunks of records, content-addressed assets, SQLite run state."""

from tracetune.store.assets import AssetStore, guess_mime, iter_file_refs, sha256_bytes
from tracetune.store.dataset import Dataset, DatasetError, DatasetWriter
from tracetune.store.state import RunState

__all__ = [
    "AssetStore",
    "Dataset",
    "DatasetError",
    "DatasetWriter",
    "RunState",
    "guess_mime",
    "iter_file_refs",
    "sha256_bytes",
]
