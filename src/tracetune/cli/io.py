"""``tracetune export`` / ``tracetune import``: datasets to and from the trainers' formats."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tracetune.cli.common import App, fail
from tracetune.formats.registry import export_formats, import_formats

app = App(no_args_is_help=True)
out_console = Console(soft_wrap=True)  # paths stay on one line, copyable


@app.command("export")
def export_cmd(
    format: Annotated[
        str, typer.Option("--format", "-f", help=f"One of: {', '.join(export_formats())}.")
    ],
    in_: Annotated[Path, typer.Option("--in", help="Dataset directory to export.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the export to.")],
    images: Annotated[
        str, typer.Option(help="copy the images into OUT/images, or hard-link them (link).")
    ] = "copy",
    tool_turns: Annotated[
        str,
        typer.Option(
            help="structured: JSON-action steps as the trainer's tool-call/tool-result turns; "
            "text: every step as the exact text the agent generated."
        ),
    ] = "structured",
    absolute_paths: Annotated[
        bool, typer.Option(help="Write absolute image paths instead of paths relative to OUT.")
    ] = False,
    skip_invalid: Annotated[
        bool, typer.Option(help="Leave out records the format cannot hold instead of stopping.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export in OUT.")] = False,
    name: Annotated[
        str | None,
        typer.Option(help="Dataset name for dataset_info.json (default: OUT's name)."),
    ] = None,
    include_failed: Annotated[
        bool,
        typer.Option(
            help="Export trajectories as they are. By default only those that ended in a "
            "final answer (and passed their verdict) are exported, without their failed steps, "
            "as `tracetune train sft` selects them."
        ),
    ] = False,
) -> None:
    """Export a dataset in a trainer's format (TRL, LLaMA-Factory, ms-swift) or as a Hugging
    Face dataset (hf).

    trl-sft, llamafactory and swift take trajectories and dialogues; trl-dpo,
    llamafactory-dpo and swift take preference pairs; hf takes every record type and writes
    Parquet shards with the images embedded plus a dataset card, ready for push_to_hub.
    Trajectories are selected as `tracetune train sft` selects them: unfinished or rejected
    ones and failed steps are left out (and listed) unless --include-failed.
    """
    from pydantic import ValidationError

    from tracetune.formats.registry import ExportOptions, export_dataset

    try:
        options = ExportOptions(
            images=images,  # type: ignore[arg-type]
            tool_turns=tool_turns,  # type: ignore[arg-type]
            absolute_paths=absolute_paths,
            skip_invalid=skip_invalid,
            overwrite=overwrite,
            name=name,
            include_failed=include_failed,
        )
    except ValidationError as exc:
        fail(_options_error(exc))
        return
    report = export_dataset(format, in_, out, options)
    out_console.print(report.summary())
    for line in report.left_out_summary():
        out_console.print(line, highlight=False)
    for rid, reason in report.left_out[:20]:
        out_console.print(f"  left out {rid}: {reason}", highlight=False)
    for rid, reason in report.skipped[:20]:
        out_console.print(f"  skipped {rid}: {reason}")


@app.command("import")
def import_cmd(
    format: Annotated[
        str, typer.Option("--format", "-f", help=f"One of: {', '.join(import_formats())}.")
    ],
    in_: Annotated[Path, typer.Option("--in", help="JSON/JSONL file, or a directory holding one.")],
    out: Annotated[Path, typer.Option("--out", help="Dataset directory to write (resumable).")],
    images_root: Annotated[
        Path | None,
        typer.Option(help="Directory relative image paths are read from (default: --in's folder)."),
    ] = None,
    as_: Annotated[
        str,
        typer.Option(
            "--as",
            help="trajectory (rows must be agent episodes), dialogue (plain chats), or auto "
            "(decided by the first row).",
        ),
    ] = "auto",
    on_missing: Annotated[
        str,
        typer.Option(help="A row whose image is missing: error (stop, naming it) or skip."),
    ] = "error",
    skip_invalid: Annotated[
        bool, typer.Option(help="Leave out malformed rows instead of stopping.")
    ] = False,
    tasks_out: Annotated[
        Path | None, typer.Option(help="Also write the trajectories' tasks as a task dataset.")
    ] = None,
) -> None:
    """Import a trainer-format file (or an export directory) as a dataset.

    trl-sft, llamafactory and swift rows become trajectories (or dialogues); trl-dpo,
    llamafactory-dpo and swift preference rows become pairs; mat reads MAT / M-TRACE SFT JSON.
    """
    from pydantic import ValidationError

    from tracetune.formats.registry import ImportOptions, import_file

    try:
        options = ImportOptions(
            images_root=images_root,
            record_type=as_,  # type: ignore[arg-type]
            on_missing=on_missing,  # type: ignore[arg-type]
            skip_invalid=skip_invalid,
            tasks_out=tasks_out,
        )
    except ValidationError as exc:
        fail(_options_error(exc))
        return
    report = import_file(format, in_, out, options)
    out_console.print(report.summary())
    for rid, reason in report.skipped[:20]:
        out_console.print(f"  skipped {rid}: {reason}")
    if len(report.skipped) > 20:
        out_console.print(f"  ... and {len(report.skipped) - 20} more")


_FLAGS = {
    "images": "--images",
    "tool_turns": "--tool-turns",
    "record_type": "--as",
    "on_missing": "--on-missing",
}


def _options_error(exc: object) -> str:
    errors = exc.errors()  # type: ignore[attr-defined]
    lines = []
    for err in errors:
        field = str(err["loc"][0]) if err["loc"] else "?"
        expected = err.get("ctx", {}).get("expected", err["msg"])
        lines.append(f"{_FLAGS.get(field, field)}: expected {expected}, got {err['input']!r}")
    return "; ".join(lines)
