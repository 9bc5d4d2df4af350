"""Datasets on disk: chunked Parquet, assets, resume after a kill, run state."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from tracetune.schema import Task, Trajectory, Usage
from tracetune.store import AssetStore, Dataset, DatasetError, RunState


def image(color: str = "red", size: tuple[int, int] = (12, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_write_read_and_load_with_hf_datasets(tmp_path: Path) -> None:
    ds = Dataset.create(tmp_path / "tasks", Task)
    ref = ds.assets.put_image(image(), "red.png")
    with ds.writer(chunk_size=2) as w:
        for i in range(5):
            w.write(
                Task(id=f"t{i}", query=f"q{i}", files=[ref] if i % 2 else [], metadata={"i": i})
            )
    assert len(ds.chunk_files()) == 3
    assert [t.id for t in ds] == [f"t{i}" for i in range(5)]
    assert ds.get("t3").files == [ref]
    assert ds.get("t3").metadata == {"i": 3}
    assert ds.assets.open_image(ref).size == (12, 8)

    import datasets

    hf = datasets.load_dataset("parquet", data_dir=str(tmp_path / "tasks" / "data"), split="train")
    assert hf.num_rows == 5
    assert hf[1]["files"][0]["sha256"] == ref.sha256
    assert ds.to_hf().num_rows == 5


def test_rerun_skips_ids_already_written(tmp_path: Path) -> None:
    ds = Dataset.create(tmp_path / "d", Task)
    assert ds.write_all(Task(id=f"t{i}", query="q") for i in range(3)) == 3
    again = Dataset.create(tmp_path / "d", Task)
    assert again.write_all(Task(id=f"t{i}", query="q") for i in range(5)) == 2
    assert sorted(again.ids()) == [f"t{i}" for i in range(5)]
    assert len(again) == 5


def test_assets_are_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = AssetStore(tmp_path)
    a = store.put_image(image("blue"), "a.png")
    b = store.put_image(image("blue"), "b.png")
    c = store.put_image(image("green"), "c.png")
    assert a.sha256 == b.sha256 != c.sha256
    assert (a.width, a.height, a.mime) == (12, 8, "image/png")
    assert len(list((tmp_path / "assets").rglob("*.png"))) == 2


def test_writer_imports_assets_from_source_store_and_refuses_unknown(tmp_path: Path) -> None:
    src = AssetStore(tmp_path / "src")
    ref = src.put_image(image(), "x.png")
    out = Dataset.create(tmp_path / "out", Task)
    with pytest.raises(FileNotFoundError, match="x.png"):
        out.write_all([Task(id="t", query="q", files=[ref])])
    out.write_all([Task(id="t", query="q", files=[ref])], sources=[src])
    assert out.assets.has(ref)


def test_open_checks_record_type_and_directory(tmp_path: Path) -> None:
    Dataset.create(tmp_path / "tasks", Task)
    with pytest.raises(DatasetError, match="holds task records"):
        Dataset.open(tmp_path / "tasks", Trajectory)
    with pytest.raises(DatasetError, match="not a tracetune dataset"):
        Dataset.open(tmp_path / "nothing")


def test_killed_writer_loses_at_most_the_chunk_in_flight(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-run keeps every flushed chunk, and a rerun completes the set."""
    root = tmp_path / "d"
    script = textwrap.dedent(f"""
        import os, signal
        from tracetune.schema import Task
        from tracetune.store import Dataset
        ds = Dataset.create({str(root)!r}, Task)
        w = ds.writer(chunk_size=4)
        for i in range(10):
            w.write(Task(id=f"t{{i}}", query="q"))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    ds = Dataset.open(root, Task)
    assert sorted(ds.ids(), key=lambda s: int(s[1:])) == [f"t{i}" for i in range(8)]
    ds.write_all(Task(id=f"t{i}", query="q") for i in range(10))
    ids = [t.id for t in ds]
    assert sorted(ids, key=lambda s: int(s[1:])) == [f"t{i}" for i in range(10)]
    assert len(ids) == len(set(ids))


def test_stale_temporary_chunk_is_discarded(tmp_path: Path) -> None:
    ds = Dataset.create(tmp_path / "d", Task)
    (tmp_path / "d" / "data" / ".part-00000.parquet.tmp").write_bytes(b"half a chunk")
    ds.write_all([Task(id="t", query="q")])
    assert [p.name for p in (tmp_path / "d" / "data").iterdir()] == ["part-00000.parquet"]


def test_run_state_items_cache_and_usage(tmp_path: Path) -> None:
    state = RunState(tmp_path / "state.sqlite")
    state.mark("agent", "k1", "done")
    state.mark("agent", "k2", "dropped", {"reason": "bad file"})
    assert state.keys("agent") == {"k1", "k2"}
    assert state.keys("agent", "dropped") == {"k2"}
    assert state.counts("agent") == {"done": 1, "dropped": 1}
    assert state.items("agent")[1][2] == {"reason": "bad file"}
    state.cache_put("key", {"texts": ["a"]})
    assert state.cache_get("key") == {"texts": ["a"]}
    assert state.cache_get("missing") is None
    state.add_usage("agent", "m", Usage(prompt_tokens=3, cost_usd=0.25, calls=1))
    state.add_usage("agent", "m", Usage(completion_tokens=4, cost_usd=0.25, calls=1, retries=2))
    state.add_usage("judge", "j", Usage(prompt_tokens=100))
    assert state.usage("agent") == Usage(
        prompt_tokens=3, completion_tokens=4, cost_usd=0.5, calls=2, retries=2
    )
    assert state.usage().prompt_tokens == 103
    # a second connection (another process) sees the same state
    assert RunState(tmp_path / "state.sqlite").keys("agent") == {"k1", "k2"}
    os.sync()
