"""``tracetune serve``: an OpenAI-compatible server for a local or tuned VLM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tracetune.cli.common import console, reports_errors


@reports_errors
def serve_cmd(
    model: Annotated[str, typer.Argument(help="Model directory or hub id (base or merged).")],
    adapter: Annotated[
        Path | None, typer.Option(help="LoRA adapter directory applied on top of MODEL.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    served_model_name: Annotated[
        str | None,
        typer.Option(help="Name clients pass as 'model' (default: MODEL as given)."),
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(help="Most sequences in one batched generate call.", min=1)
    ] = 32,
    batch_wait_ms: Annotated[
        float, typer.Option(help="Wait after a request for others to join its batch.", min=0)
    ] = 2.0,
    max_tokens: Annotated[
        int, typer.Option(help="Completion tokens when a request sets no max_tokens.", min=1)
    ] = 512,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda if any).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    max_pixels: Annotated[
        int | None, typer.Option(help="Cap on image pixels (Qwen processors).")
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Run model code shipped in the checkpoint.")
    ] = False,
) -> None:
    """Serve MODEL (with --adapter) on /v1/chat/completions, batching concurrent requests.

    For GPU serving at scale use vLLM on the same checkpoint (see docs/serving.md).
    """
    from tracetune.serve import BatchEngine, ServeConfig, serve

    config = ServeConfig(
        model=model,
        adapter=str(adapter) if adapter else None,
        host=host,
        port=port,
        served_name=served_model_name,
        max_batch_rows=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        default_max_tokens=max_tokens,
        device=device,
        dtype=dtype,
        max_pixels=max_pixels,
        trust_remote_code=trust_remote_code,
    )

    def ready(engine: BatchEngine) -> None:
        console.print(
            f"serving {config.name!r} ({engine.model!r}) at http://{host}:{port}/v1 "
            "(Ctrl-C to stop)"
        )

    serve(config, on_ready=ready)
