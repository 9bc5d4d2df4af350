"""``tracetune model``: build controllers from config (tiny test models to 100M) and merge."""

from __future__ import annotations

import enum
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from tracetune.cli.common import App

app = App(no_args_is_help=True)


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
    path = build(arch.value, out, seed=seed, image_size=image_size)
    params = json.loads((path / "tracetune_tiny.json").read_text())["parameters"]
    typer.echo(
        f"built tiny {arch.value}: {params:,} parameters in {time.perf_counter() - start:.1f} s, "
        f"saved to {path}"
    )


class Size(enum.StrEnum):
    s250k = "250k"
    s5m = "5m"
    s20m = "20m"
    s100m = "100m"


@app.command("init")
def init(
    arch: Annotated[Arch, typer.Option("--arch", help="Model family to build.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the checkpoint to.")],
    size: Annotated[
        Size, typer.Option("--size", help="Named size; the shape flags below override it.")
    ] = Size.s5m,
    tokenizer_corpus: Annotated[
        list[Path] | None,
        typer.Option(
            "--tokenizer-corpus",
            help="Trajectory or dialogue dataset dir to train the tokenizer on (repeatable); "
            "default: a small built-in corpus.",
        ),
    ] = None,
    vocab_size: Annotated[
        int | None,
        typer.Option(help="Tokenizer size (default: 768 built-in; 4096/8192/16384 by size)."),
    ] = None,
    digit_group: Annotated[
        int,
        typer.Option(
            min=1,
            max=3,
            help="With --tokenizer-corpus: numbers become tokens of up to this many digits "
            "(1: one per digit; 3: grouped by three, every 1-3 digit run one token, which "
            "needs a vocabulary of at least 2,124).",
        ),
    ] = 1,
    hidden_size: Annotated[int | None, typer.Option(help="Text tower width.")] = None,
    layers: Annotated[int | None, typer.Option(help="Text tower layers.")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="Key/value heads (GQA).")] = None,
    intermediate_size: Annotated[int | None, typer.Option(help="MLP width.")] = None,
    vision_depth: Annotated[int | None, typer.Option(help="Vision tower blocks.")] = None,
    vision_hidden_size: Annotated[int | None, typer.Option(help="Vision tower width.")] = None,
    vision_heads: Annotated[int | None, typer.Option(help="Vision attention heads.")] = None,
    corpus_limit: Annotated[
        int | None, typer.Option(help="Train the tokenizer on at most this many records.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the random weights.")] = 0,
    image_size: Annotated[
        int,
        typer.Option(
            "--image-size", help="Pixels per image side (multiple of 28); 112 = 16 tokens."
        ),
    ] = 112,
) -> None:
    """Build a randomly initialized controller of a real size, to train from scratch.

    With --tokenizer-corpus the tokenizer is trained on your trajectories, so the system
    prompt, tool names and action JSON cost few tokens and samples stay short.
    """
    from tracetune.formats.corpus import corpus_from_datasets
    from tracetune.models.tiny import SIZES, init_model, shape_with

    start = time.perf_counter()
    shape = shape_with(
        SIZES[size.value],
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        vision_depth=vision_depth,
        vision_hidden_size=vision_hidden_size,
        vision_heads=vision_heads,
    )
    corpus = (
        corpus_from_datasets(tokenizer_corpus, limit=corpus_limit) if tokenizer_corpus else None
    )
    path = init_model(
        arch.value,
        out,
        shape,
        seed=seed,
        image_size=image_size,
        corpus=corpus,
        vocab_size=vocab_size,
        digit_group=digit_group,
    )
    info = json.loads((path / "tracetune_tiny.json").read_text())
    source = f"{len(corpus)} records" if corpus else "the built-in corpus"
    typer.echo(
        f"built {arch.value}: {info['parameters']:,} parameters (hidden {shape.hidden_size}, "
        f"{shape.layers} layers), {info['vocab_size']}-token tokenizer trained on {source}, "
        f"in {time.perf_counter() - start:.1f} s; saved to {path}"
    )


@app.command("merge")
def merge(
    adapter: Annotated[Path, typer.Option("--adapter", help="LoRA adapter directory (PEFT).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the merged model to.")],
    base: Annotated[
        Path | None,
        typer.Option(
            "--base", help="Base model directory (default: the base the adapter records)."
        ),
    ] = None,
) -> None:
    """Merge a LoRA adapter into its base model; save a standard checkpoint to --out.

    The result loads with transformers (from_pretrained), `local:OUT` and `vllm serve OUT`.
    """
    from tracetune.models.local import merge_adapter

    path = merge_adapter(base, adapter, out)
    typer.echo(f"merged {adapter} into {base or 'its base'}: saved to {path}")
