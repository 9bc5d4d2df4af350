"""Bad input and a hostile environment give one readable message, never a traceback.

Each case runs the real command line on real files: a decompression-bomb PNG (a valid PNG
whose header claims 30000 x 30000 pixels), a PNG cut short, a task file that is empty or not
UTF-8, a task dataset with a damaged Parquet chunk, an endpoint whose reply is cut off, a
prompt longer than a local model's context, and an output directory on a full disk.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.inputs import ImageError, InputError, check_image
from tracetune.runner.outcome import ITEMS_FAILED_EXIT
from tracetune.schema import Task, Trajectory
from tracetune.store import Dataset
from tracetune.testing import ScriptedOpenAIServer

ANSWER = 'Thought: easy\nAction: {"name": "final_answer", "arguments": {"answer": "ok"}}'


def _png(size: tuple[int, int] = (32, 24), color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A small, valid PNG whose header claims ``width`` x ``height`` pixels (as a real
    decompression bomb does): the IHDR chunk is rewritten with a correct CRC."""
    data = bytearray(_png((1, 1)))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr[4:]
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _plain(output: str) -> str:
    return " ".join(output.split())


def _agent(*args: str) -> Any:
    return CliRunner().invoke(app, ["agent", "run", "--model", "openai:test-model", *args])


# -- images ------------------------------------------------------------------------------------
def test_the_image_check_names_each_kind_of_bad_image() -> None:
    with pytest.raises(ImageError, match="decompression bomb: 900,000,000 pixels") as bomb:
        check_image(_bomb_png(), "bomb.png")
    assert bomb.value.reason == "decompression_bomb"
    with pytest.raises(ImageError, match="truncated") as cut:
        check_image(_png((64, 64))[:-30], "cut.png")
    assert cut.value.reason == "truncated_image"
    with pytest.raises(ImageError, match="truncated"):  # cut just before its last chunk
        check_image(_png((64, 64))[:-12], "cut.png")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(jpeg, format="JPEG")
    with pytest.raises(ImageError, match="truncated"):  # JPEG: only a full decode tells
        check_image(jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "cut.jpg")
    with pytest.raises(ImageError, match="not an image"):
        check_image(b"GIF89a nonsense", "x.gif")
    assert check_image(_png(), "fine.png").width == 32


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (_bomb_png(), "is a possible decompression bomb: 900,000,000 pixels"),
        (_png((64, 64))[:-30], "is truncated"),
    ],
    ids=["bomb", "truncated"],
)
def test_agent_run_refuses_a_bad_image_with_a_clear_error(
    tmp_path: Path, data: bytes, said: str
) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(data)
    result = _agent("--task", "What is it?", "--image", str(image), "--out", str(tmp_path / "o"))
    text = _plain(result.output)
    assert result.exit_code == 2, result.output
    assert str(image) in text and said in text
    assert "Traceback" not in text and isinstance(result.exception, SystemExit)


def test_mmat_ingest_drops_a_bomb_with_its_reason_and_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "bomb.png").write_bytes(_bomb_png())
    source = tmp_path / "qa.jsonl"
    source.write_text(
        json.dumps({"image": "ok.png", "question": "What colour?", "answer": "red"})
        + "\n"
        + json.dumps({"image": "bomb.png", "question": "What is it?", "answer": "white"})
        + "\n"
    )
    out = tmp_path / "tasks"
    result = CliRunner().invoke(
        app, ["mmat", "ingest", "--source", str(source), "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "1 written" in result.output and "dropped 1 x decompression_bomb" in result.output
    assert len(Dataset.open(out, Task)) == 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["drop_reasons"] == {"decompression_bomb": 1}


# -- task files and datasets ---------------------------------------------------------------------
def test_an_empty_task_file_is_an_error_not_zero_written(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n  \n")
    result = _agent("--tasks", str(tasks), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert f"task file {tasks} is empty" in _plain(result.output)


def test_a_task_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_bytes(json.dumps({"query": "q1"}).encode() + b'\n{"query": "caf\xe9"}\n')
    result = _agent("--tasks", str(tasks), "--out", str(tmp_path / "o"))
    text = _plain(result.output)
    assert result.exit_code == 2
    assert f"{tasks} is not UTF-8 text (byte 0xe9" in text and "line 2" in text
    assert "Traceback" not in text


def test_a_damaged_parquet_chunk_names_the_file_and_the_problem(tmp_path: Path) -> None:
    tasks: Dataset[Task] = Dataset.create(tmp_path / "tasks", Task)
    tasks.write_all([Task(id=f"t{i}", query=f"What is {i} + {i}? " * 20) for i in range(50)])
    (chunk,) = tasks.chunk_files()
    data = bytearray(chunk.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # a damaged page, the footer intact
    chunk.write_bytes(bytes(data))
    result = _agent("--tasks", str(tmp_path / "tasks"), "--out", str(tmp_path / "o"))
    text = _plain(result.output)
    assert result.exit_code == 2, result.output
    assert f"{chunk} is not a readable Parquet chunk" in text and "tracetune data check" in text


# -- endpoints ------------------------------------------------------------------------------------
class _CutOffServer:
    """HTTP on loopback that answers every request with a chat completion cut in half:
    either the body is shorter than its Content-Length (the connection closes early), or a
    complete HTTP message carries JSON that stops mid-string."""

    def __init__(self, complete_http: bool) -> None:
        self.complete_http = complete_http
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        body = json.dumps(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}}]}
        ).encode()
        half = body[: len(body) // 2]
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                head, _, rest = received.partition(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length")),
                    0,
                )  # fmt: skip
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests += 1
                announced = len(half) if self.complete_http else len(body)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {announced}\r\nConnection: close\r\n\r\n".encode()
                    + half
                )

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("complete_http", [False, True], ids=["short-body", "cut-json"])
def test_a_reply_cut_off_is_named_as_such(tmp_path: Path, complete_http: bool) -> None:
    server = _CutOffServer(complete_http)
    config = tmp_path / "c.yaml"
    config.write_text("backend: {max_retries: 1}\n")
    try:
        result = _agent(
            "--task", "Say ok", "--out", str(tmp_path / "o"), "--config", str(config),
            "--base-url", f"http://127.0.0.1:{server.port}/v1",
        )  # fmt: skip
    finally:
        server.close()
    text = _plain(result.output)
    assert result.exit_code == ITEMS_FAILED_EXIT, result.output
    assert "reply was cut off" in text and "after 1 retries" in text
    assert "JSONDecodeError" not in text and "Traceback" not in text
    assert server.requests == 2  # a cut-off reply is retried like any transient failure


@pytest.mark.slow  # builds and loads a tiny local VLM (a few seconds)
def test_a_prompt_over_a_local_models_context_is_refused_before_generating(
    tmp_path: Path,
) -> None:
    from tracetune.models.tiny import ModelShape, init_model

    init_model("qwen2_vl", tmp_path / "model", ModelShape(max_positions=256))
    result = CliRunner().invoke(
        app,
        ["agent", "run", "--model", f"local:{tmp_path / 'model'}", "--task", "word " * 400,
         "--out", str(tmp_path / "o"), "--quiet"],
    )  # fmt: skip
    text = _plain(result.output)
    assert result.exit_code == ITEMS_FAILED_EXIT, result.output
    assert "at or over the model's context of 256 tokens" in text and "Traceback" not in text


# -- a full disk ----------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: a real file system that runs out of space (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_one_message_and_the_rerun_resumes(
    small_disk: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(40):  # 40 distinct noisy images of ~50 KB: 2 MB of assets
        noise = Image.frombytes("RGB", (128, 128), os.urandom(128 * 128 * 3))
        noise.save(images / f"{i}.png")
        rows.append(json.dumps({"id": f"t{i}", "query": f"Say ok {i}", "images": [f"{i}.png"]}))
    tasks = images / "tasks.jsonl"
    tasks.write_text("\n".join(rows) + "\n")
    filler = small_disk / "filler"
    filler.write_bytes(bytes(2 * 1024 * 1024))  # leaves ~1 MB: the run fills it
    out = small_disk / "out"
    with ScriptedOpenAIServer(lambda body: ANSWER) as server:
        args = ["--tasks", str(tasks), "--out", str(out), "--base-url", server.base_url,
                "--concurrency", "2", "--quiet"]  # fmt: skip
        full = _agent(*args)
        text = _plain(full.output)
        assert full.exit_code == 2, full.output
        assert text.startswith("error: the disk is full") and "rerun the same command" in text
        assert "Traceback" not in text and len(full.output.splitlines()) <= 6

        filler.unlink()  # space again: the same command finishes the job
        again = _agent(*args)
        assert again.exit_code == 0, again.output
    ids = [t.task.id for t in Dataset.open(out, Trajectory)]
    assert sorted(ids) == sorted(f"t{i}" for i in range(40)) and len(ids) == len(set(ids))


def test_input_errors_are_value_errors_for_python_callers(tmp_path: Path) -> None:
    from tracetune.store import AssetStore

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png())
    with pytest.raises(InputError, match=str(bomb)):
        AssetStore(tmp_path / "ds").put_file(bomb)
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize(
    "command",
    [
        ["agent", "run", "--config", "{bad}"],
        ["eval", "score", "vqa", "--gold", "{bad}", "--predictions", "{bad}"],
        ["import", "--format", "trl-sft", "--in", "{bad}", "--out", "{out}"],
        ["mmat", "ingest", "--source", "{bad}", "--out", "{out}", "--quiet"],
    ],
    ids=["yaml-config", "eval-score", "import", "mmat-ingest"],
)
def test_every_reader_of_user_text_names_a_file_that_is_not_utf8(
    tmp_path: Path, command: list[str]
) -> None:
    bad = tmp_path / ("bad.yaml" if "--config" in command else "bad.jsonl")
    bad.write_bytes(b'{"question": "Qu\xe9 es?", "answer": "x", "image": "a.png"}\n')
    args = [a.format(bad=bad, out=tmp_path / "out") for a in command]
    result = CliRunner().invoke(app, args)
    text = _plain(result.output)
    assert result.exit_code == 2, result.output
    assert f"{bad} is not UTF-8 text (byte 0xe9" in text
    assert "Traceback" not in text and isinstance(result.exception, SystemExit)


def test_import_treats_a_bomb_image_as_a_bad_row(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "bomb.png").write_bytes(_bomb_png())

    def row(image: str) -> str:
        return json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                ],
                "images": [image],
            }
        )

    rows = tmp_path / "rows.jsonl"
    rows.write_text(row("ok.png") + "\n" + row("bomb.png") + "\n")
    args = ["import", "--format", "trl-sft", "--in", str(rows), "--as", "dialogue"]
    stopped = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert stopped.exit_code == 2
    assert "decompression bomb" in _plain(stopped.output) and "--skip-invalid" in stopped.output
    skipped = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--skip-invalid"])
    assert skipped.exit_code == 0, skipped.output
    assert "1 dialogue records" in skipped.output and "decompression bomb" in skipped.output


def test_pool_build_skips_a_bomb_before_decoding_it(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(_png())
    (images / "bomb.png").write_bytes(_bomb_png())
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        json.dumps({"file": "ok.png", "caption": "a red square"})
        + "\n"
        + json.dumps({"file": "bomb.png", "caption": "huge"})
        + "\n"
    )
    result = CliRunner().invoke(
        app,
        ["pool", "build", "--images", str(images), "--captions", str(captions),
         "--out", str(tmp_path / "pool"), "--embedder", "hashing", "--quiet"],
    )  # fmt: skip
    said = _plain(result.output)
    assert result.exit_code == 0, result.output
    assert "bomb.png: not a readable image" in said and "decompression bomb" in said


def test_synth_seed_and_caption_files_that_are_not_utf8_are_named(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(b'{"query": "Qu\xe9 dice el cartel?", "tools": ["ocr"]}\n')
    result = CliRunner().invoke(
        app,
        ["synth", "queries", "--out", str(tmp_path / "run"), "--seeds", str(seeds),
         "--generator", "openai:test-model", "--base-url", "http://127.0.0.1:9/v1", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{seeds} is not UTF-8 text" in _plain(result.output)

    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(_png())
    captions = tmp_path / "captions.jsonl"
    captions.write_bytes(b'{"file": "ok.png", "caption": "un carr\xe9 rouge"}\n')
    result = CliRunner().invoke(
        app,
        ["pool", "build", "--images", str(images), "--captions", str(captions),
         "--out", str(tmp_path / "pool"), "--embedder", "hashing", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{captions} is not UTF-8 text" in _plain(result.output)
