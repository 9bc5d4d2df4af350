"""``tracetune pool build``: index images (and documents) for file association."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tracetune.cli.common import App, build_config, run_async

app = App(no_args_is_help=True)
out_console = Console()


@app.command("build")
def build(
    images: Annotated[Path | None, typer.Option(help="Folder of images (and documents).")] = None,
    out: Annotated[Path | None, typer.Option(help="Pool directory to write.")] = None,
    captions: Annotated[
        Path | None,
        typer.Option(help='Captions: JSONL of {"image", "caption"} or JSON name -> caption.'),
    ] = None,
    captioner: Annotated[
        str | None, typer.Option(help="VLM spec that captions images the captions file misses.")
    ] = None,
    embedder: Annotated[str | None, typer.Option(help="minilm (default) or hashing.")] = None,
    dedup_bits: Annotated[
        int | None,
        typer.Option(help="Merge images whose difference hashes differ in at most this many bits."),
    ] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with these options.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Caption (from a file or a VLM), embed and index a folder of images; near-duplicate
    images are merged. A small pool ships in tracetune/data/pool (images/, captions.jsonl)."""
    from tracetune.synth.mtrace.pool import PoolConfig, build_pool

    cfg = build_config(
        PoolConfig,
        config,
        images=images,
        out=out,
        captions=captions,
        captioner=captioner,
        embedder=embedder,
        dedup_bits=dedup_bits,
        backend={"base_url": base_url},  # merged into a YAML backend section, not over it
    )
    pool = run_async(build_pool(cfg, progress=not quiet))
    images_n = sum(e.kind == "image" for e in pool.entries)
    merged = sum(len(e.merged) for e in pool.entries)
    out_console.print(
        f"pool {pool.root}: {images_n} images, {len(pool.entries) - images_n} documents, "
        f"{merged} near-duplicates merged; embedder {pool.embedder_name}",
        highlight=False,
    )
    if pool.skipped:
        out_console.print(f"skipped {len(pool.skipped)} file(s):", highlight=False)
        for skipped in pool.skipped:
            out_console.print(f"  {skipped.source}: {skipped.reason}", highlight=False)
