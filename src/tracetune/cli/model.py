"""``tracetune model``: build tiny test models and manage checkpoints."""

from __future__ import annotations

import enum
import json
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)


class Arch(enum.StrEnum):
    qwen2_vl = "qwen2_vl"
    qwen2_5_vl = "qwen2_5_vl"
    llava = "llava"
    idefics3 = "idefics3"


@app.command("init-tiny")
def init_tiny(
    arch: Annotated[Arch, typer.Option("--arch", help="Model family to build.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the checkpoint to.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed for the random weights.")] = 0,
    image_size: Annotated[
        int,
        typer.Option(
            "--image-size", help="Pixels per image side (multiple of 28); 112 = 16 tokens."
        ),
    ] = 112,
) -> None:
    """Build a tiny random VLM (~250K parameters) from config, for tests and dry runs."""
    from tracetune.models.tiny import init_tiny as build

    start = time.perf_counter()
    try:
        path = build(arch.value, out, seed=seed, image_size=image_size)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    params = json.loads((path / "tracetune_tiny.json").read_text())["parameters"]
    typer.echo(
        f"built tiny {arch.value}: {params:,} parameters in {time.perf_counter() - start:.1f} s, "
        f"saved to {path}"
    )


@app.command("merge")
def merge(
    base: Annotated[Path, typer.Option("--base", help="Base model directory.")],
    adapter: Annotated[Path, typer.Option("--adapter", help="LoRA adapter directory (PEFT).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the merged model to.")],
) -> None:
    """Merge a LoRA adapter into its base model; save model and processor to --out."""
    from tracetune.models.base import BackendError
    from tracetune.models.local import merge_adapter

    try:
        path = merge_adapter(base, adapter, out)
    except BackendError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"merged {adapter} into {base}: saved to {path}")
