"""An indexed pool of real images (and documents) that file association retrieves from.

``tracetune pool build --images DIR [--captions FILE] --out POOL`` writes::

    POOL/pool.json       entries: id, kind, source path, caption, FileRef, merged duplicates
    POOL/embeddings.npy  one unit-length caption embedding per entry (same order)
    POOL/assets/         the files, content-addressed (an AssetStore)
    POOL/state.sqlite    cached caption calls, so a rebuild does not pay twice

Captions come from the user's file (JSONL ``{"image": NAME, "caption": TEXT}`` or a JSON
object NAME -> TEXT) or, for images it does not cover, from the configured VLM through the
``caption`` tool. Documents without a caption are described by the start of their markdown.
Near-duplicate images (same difference hash up to ``dedup_bits`` bits) are merged into the
first one in path order; the merged names stay on that entry. Files that cannot be read
(a broken image or document) or are of another type are skipped, each with its reason
(``pool.json`` ``skipped``), and the build goes on.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from tracetune.errors import TracetuneError
from tracetune.inputs import check_image, read_text
from tracetune.models.base import ModelOptions
from tracetune.schema import FileRef
from tracetune.store import AssetStore, RunState
from tracetune.synth.mtrace.embed import EMBEDDERS, Embedder, load_embedder
from tracetune.synth.mtrace.neardup import HashIndex

POOL_FILE = "pool.json"
EMBEDDINGS_FILE = "embeddings.npy"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
DOCUMENT_SUFFIXES = (".pdf", ".docx", ".xlsx", ".pptx", ".csv", ".txt", ".md", ".json", ".html")

BUNDLED_POOL = Path(__file__).resolve().parents[2] / "data" / "pool"
BUNDLED_POOL_IMAGES = BUNDLED_POOL / "images"
BUNDLED_POOL_CAPTIONS = BUNDLED_POOL / "captions.jsonl"


class PoolError(TracetuneError, ValueError):
    """The pool's inputs or directory are wrong; the message says how to fix them."""


class PoolConfig(BaseModel):
    """Configuration of ``tracetune pool build``."""

    model_config = ConfigDict(extra="forbid")

    images: Path = Field(description="Folder of images (and documents) to index, recursively.")
    out: Path = Field(description="Pool directory to write.")
    captions: Path | None = Field(
        default=None,
        description='Captions: JSONL of {"image": NAME, "caption": TEXT} or a JSON object '
        "NAME -> TEXT (NAME: path relative to --images, or the file name).",
    )
    captioner: str | None = Field(
        default=None,
        description="VLM spec that captions images the captions file misses (caption tool).",
    )
    embedder: str = Field(default="minilm", description=f"Embedder: {', '.join(EMBEDDERS)}.")
    dedup_bits: int = Field(
        default=4, ge=0, le=32, description="Merge images whose 64-bit dHashes differ in <= this."
    )
    concurrency: int = Field(default=4, ge=1, description="Caption requests in flight.")
    backend: ModelOptions = Field(default_factory=ModelOptions, description="Backend options.")


class PoolEntry(BaseModel):
    """One retrievable image or document."""

    id: str
    kind: Literal["image", "document"]
    source: str = Field(description="Path relative to the folder the pool was built from.")
    caption: str
    file: FileRef
    merged: list[str] = Field(default_factory=list, description="Near-duplicates merged here.")


class SkippedFile(BaseModel):
    """A file of the folder that is not in the pool, and why."""

    source: str
    reason: str


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: survives resizing, recompression and small edits."""
    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def read_captions(path: Path) -> dict[str, str]:
    """Captions by name from a JSONL or JSON file."""
    if not path.is_file():
        raise PoolError(f"captions file {path} does not exist")
    text = read_text(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PoolError(f"{path}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise PoolError(f"{path}: a JSON captions file maps file names to caption strings")
        return {str(k): v for k, v in data.items()}
    captions: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PoolError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        name = next((row.get(k) for k in ("image", "file", "name", "path") if k in row), None)
        caption = row.get("caption", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(name, str) or not isinstance(caption, str):
            raise PoolError(
                f'{path}:{lineno}: each line needs "image" (a file name) and "caption" strings'
            )
        captions[name] = caption
    return captions


def _scan(root: Path, skip: set[Path]) -> tuple[list[Path], list[Path]]:
    """(files to index, other files), both sorted; hidden files are left out of both."""
    suffixes = IMAGE_SUFFIXES + DOCUMENT_SUFFIXES
    found = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.resolve() not in skip
    )
    return [p for p in found if p.suffix.lower() in suffixes], [
        p for p in found if p.suffix.lower() not in suffixes
    ]


def _document_caption(path: Path) -> str:
    from markitdown import MarkItDown

    text = MarkItDown(enable_plugins=False).convert(str(path)).markdown or ""
    text = " ".join(text.split())
    return f"{path.name}: {text[:600]}" if text else path.name


# dHash near-duplicates: multi-index hashing, exact (the same answers as a full scan) and
# about constant work per image instead of a scan of every image kept so far.
_HashIndex = HashIndex


class Pool:
    """A built pool: entries, their embeddings, their assets."""

    def __init__(
        self,
        root: Path,
        entries: list[PoolEntry],
        embeddings: np.ndarray,
        embedder: str,
        skipped: list[SkippedFile] | None = None,
    ) -> None:
        self.root = root
        self.entries = entries
        self.skipped = skipped or []
        self.embeddings = embeddings
        self.embedder_name = embedder
        self.assets = AssetStore(root)

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> Pool:
        root = Path(root)
        manifest = root / POOL_FILE
        if not manifest.is_file():
            raise PoolError(
                f"{root} is not an image pool (no {POOL_FILE}); build one with "
                "`tracetune pool build --images DIR --out POOL`"
            )
        info = json.loads(manifest.read_text())
        entries = [PoolEntry.model_validate(e) for e in info["entries"]]
        embeddings = np.load(root / EMBEDDINGS_FILE)
        if embeddings.shape[0] != len(entries):
            raise PoolError(f"{root}: {EMBEDDINGS_FILE} does not match {POOL_FILE}; rebuild it")
        skipped = [SkippedFile.model_validate(s) for s in info.get("skipped", [])]
        return cls(root, entries, embeddings, str(info["embedder"]), skipped)

    @property
    def embedder(self) -> Embedder:
        return load_embedder(self.embedder_name)

    def ranked(self, description: str, kind: str = "image") -> list[tuple[PoolEntry, float]]:
        """Entries of ``kind``, best caption match for ``description`` first."""
        if not self.entries:
            return []
        query = self.embedder.encode([description])[0]
        sims = self.embeddings @ query
        order = sorted(range(len(self.entries)), key=lambda i: (-float(sims[i]), i))
        return [(self.entries[i], float(sims[i])) for i in order if self.entries[i].kind == kind]


async def build_pool(config: PoolConfig, progress: bool = True) -> Pool:
    """Index ``config.images`` into ``config.out`` (see the module docstring)."""
    root = config.images
    if not root.is_dir():
        raise PoolError(f"--images {root} is not a folder of images")
    given = read_captions(config.captions) if config.captions else {}
    skip = {config.captions.resolve()} if config.captions else set()
    files, others = _scan(root, skip)
    if not files:
        raise PoolError(
            f"{root} has no images ({', '.join(IMAGE_SUFFIXES)}) or documents "
            f"({', '.join(DOCUMENT_SUFFIXES)})"
        )
    # A large folder always holds a few broken or foreign files: each is reported with its
    # reason (and kept in pool.json) and the build goes on without it.
    skipped = [
        SkippedFile(
            source=p.relative_to(root).as_posix(),
            reason=f"not an image or a supported document ({p.suffix or 'no suffix'})",
        )
        for p in others
    ]
    load_embedder(config.embedder)  # fail on a bad name before any work
    config.out.mkdir(parents=True, exist_ok=True)
    assets = AssetStore(config.out)
    kept: list[dict[str, Any]] = []
    hashes: HashIndex[dict[str, Any]] = HashIndex(config.dedup_bits)
    for path in files:
        rel = path.relative_to(root).as_posix()
        kind = "image" if path.suffix.lower() in IMAGE_SUFFIXES else "document"
        item: dict[str, Any] = {"path": path, "rel": rel, "kind": kind, "merged": []}
        if kind == "image":
            try:
                data = path.read_bytes()
                # The image check every dataset image passes: a bomb is refused before decoding.
                check_image(data, rel)
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                    code = dhash(img)
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for broken files
                skipped.append(SkippedFile(source=rel, reason=f"not a readable image: {exc}"))
                continue
            twin = hashes.find(code)
            if twin is not None:
                twin["merged"].append(rel)
                continue
            hashes.add(code, item)
        item["caption"] = given.get(rel, given.get(path.name))
        kept.append(item)

    missing = [i for i in kept if i["caption"] is None and i["kind"] == "image"]
    if missing and not config.captioner:
        names = ", ".join(i["rel"] for i in missing[:5])
        raise PoolError(
            f"{len(missing)} image(s) have no caption (e.g. {names}): add them to --captions "
            "or give --captioner MODEL to caption them with a VLM"
        )
    if missing:
        await _caption_images(config, missing, progress)
    for item in list(kept):
        if item["caption"] is None:
            try:
                item["caption"] = await asyncio.to_thread(_document_caption, item["path"])
            except Exception as exc:  # noqa: BLE001 - any converter failure means unreadable
                why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                skipped.append(
                    SkippedFile(source=item["rel"], reason=f"not a readable document: {why}")
                )
                kept.remove(item)
    if not kept:
        raise PoolError(f"no file of {root} could be read: " + _skipped_text(skipped))
    skipped.sort(key=lambda s: s.source)

    entries = []
    for item in kept:
        ref = assets.put_file(item["path"], name=item["path"].name, description=item["caption"])
        entries.append(
            PoolEntry(
                id=ref.sha256[:16],
                kind=item["kind"],
                source=item["rel"],
                caption=item["caption"],
                file=ref,
                merged=item["merged"],
            )
        )
    vectors = _embed(load_embedder(config.embedder), [e.caption for e in entries], progress)
    tmp = config.out / ".embeddings.tmp.npy"
    np.save(tmp, vectors)
    os.replace(tmp, config.out / EMBEDDINGS_FILE)
    manifest = {
        "version": 1,
        "embedder": config.embedder,
        "built_from": str(root.resolve()),
        "entries": [e.model_dump(mode="json") for e in entries],
        "skipped": [s.model_dump(mode="json") for s in skipped],
    }
    tmp_manifest = config.out / ".pool.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp_manifest, config.out / POOL_FILE)
    return Pool(config.out, entries, vectors, config.embedder, skipped)


def _skipped_text(skipped: list[SkippedFile]) -> str:
    return "; ".join(f"{s.source} ({s.reason})" for s in skipped[:5])


def _embed(embedder: Embedder, texts: list[str], progress: bool) -> np.ndarray:
    """Embed in chunks, with a progress bar: a large pool takes minutes on a CPU."""
    from rich.progress import Progress

    chunks = []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("embedding captions", total=len(texts))
        for start in range(0, len(texts), 256):
            chunks.append(embedder.encode(texts[start : start + 256]))
            bar.advance(task, len(chunks[-1]))
    return np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)


async def _caption_images(config: PoolConfig, items: list[dict[str, Any]], progress: bool) -> None:
    from rich.progress import Progress

    from tracetune.synth.mtrace.common import stage_model
    from tracetune.tools import ToolContext, get_tool

    assert config.captioner is not None
    state = RunState(config.out / "state.sqlite")
    model = stage_model(
        config.captioner, config.backend.for_stage(config.concurrency), state, "pool.caption"
    )
    tool = get_tool("caption")
    ctx = ToolContext(workdir=config.images, model=model)
    limit = asyncio.Semaphore(config.concurrency)
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("captioning", total=len(items))

            async def one(item: dict[str, Any]) -> None:
                async with limit:
                    result = await tool.acall(ctx, {"image": item["rel"]})
                item["caption"] = result.text.strip()
                bar.advance(task)

            await asyncio.gather(*(one(i) for i in items))
    finally:
        await model.aclose()
        state.close()
