"""``export --format hf``: a Hugging Face dataset directory, ready for ``push_to_hub``.

Any tracetune dataset (tasks, trajectories, verdicts, preference pairs, dialogues, eval
records) becomes::

    OUT/
      data/train-00000-of-0000N.parquet   the rows; images embedded as ``Image`` features
      README.md                           the dataset card: YAML header (configs, features,
                                          splits) then schema, provenance and how to use it
      export.json                         what was exported, from where; what was left out

``datasets.load_dataset(OUT, split="train")`` opens it with every image a PIL image (no paths
to resolve), and ``huggingface-cli upload USER/NAME OUT --repo-type dataset`` (or
``load_dataset(OUT)["train"].push_to_hub(...)``) publishes it as it is.

Episodes are written in TRL's conversational shape, so the rows train as they load:
trajectories and dialogues as ``messages`` (SFT), pairs as ``prompt``/``chosen``/``rejected``
(DPO), with ``images`` in the order of the ``{"type": "image"}`` placeholders. Every row also
keeps its tracetune record as JSON (``record``), so nothing is lost; non-image attachments
travel as bytes in ``files``. Trajectories are selected as ``tracetune train sft`` selects
them (see ``ExportOptions.include_failed``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tracetune.formats.registry import (
    Exporter,
    ExportReport,
    FormatError,
    MediaWriter,
    export_manifest,
    register_exporter,
    select_for_training,
)
from tracetune.schema import (
    Dialogue,
    EvalRecord,
    FileRef,
    PreferencePair,
    Record,
    Task,
    Trajectory,
    Verdict,
)
from tracetune.store import AssetStore

DATA_DIR = "data"
SHARD_BYTES = 256 * 1024 * 1024  # Parquet shard size: the hub streams and previews these well
BATCH_ROWS = 64
KINDS = ("task", "trajectory", "verdict", "pair", "dialogue", "eval")


class _Embedding(MediaWriter):
    """Collects the assets rows point at instead of copying them next to the rows."""

    def __init__(self, source: AssetStore) -> None:
        super().__init__(source, Path("."), "copy", absolute=False)
        self.refs: dict[str, FileRef] = {}

    def _place(self, ref: FileRef, folder: str) -> str:
        token = f"{folder}/{ref.sha256}"
        if token not in self.refs:
            self.refs[token] = ref
            if folder == "images":
                self.images += 1
            else:
                self.files += 1
        return token

    def image(self, ref: FileRef) -> str:  # type: ignore[override]
        return self._place(ref, "images")

    def image_value(self, token_or_ref: str | FileRef) -> dict[str, Any]:
        """An ``Image`` feature value: the bytes, and the file name for reference."""
        ref = token_or_ref if isinstance(token_or_ref, FileRef) else self.refs[token_or_ref]
        if isinstance(token_or_ref, FileRef):
            self._place(ref, "images")
        return {"bytes": self.source.path(ref).read_bytes(), "path": ref.name}

    def file_value(self, token_or_ref: str | FileRef) -> dict[str, Any]:
        ref = token_or_ref if isinstance(token_or_ref, FileRef) else self.refs[token_or_ref]
        if isinstance(token_or_ref, FileRef):
            self._place(ref, "files")
        return {"name": ref.name, "mime": ref.mime, "bytes": self.source.path(ref).read_bytes()}


# -- schema -----------------------------------------------------------------------------------
def features_for(kind: str) -> Any:
    """The ``datasets.Features`` of the rows of a ``kind`` dataset."""
    from datasets import Features, Image, List, Value

    string = Value("string")
    part = {"type": string, "text": string}
    message = {"role": string, "content": List(part)}
    common = {
        "id": string,
        "images": List(Image()),
        "files": List({"name": string, "mime": string, "bytes": Value("binary")}),
        "source": string,
        "record": string,
    }
    if kind in ("trajectory", "dialogue"):
        extra = {
            "messages": List(message),
            "tools": string,
            "task_id": string,
            "query": string,
            "controller": string,
            "status": string,
            "final_answer": string,
        }
    elif kind == "pair":
        extra = {
            "prompt": List(message),
            "chosen": List(message),
            "rejected": List(message),
            "tools": string,
            "task_id": string,
            "query": string,
            "verifier": string,
            "chosen_score": Value("float64"),
            "rejected_score": Value("float64"),
        }
    elif kind == "task":
        extra = {"query": string, "tools": List(string), "gold": string}
    elif kind == "verdict":
        extra = {
            "target_id": string,
            "target_kind": string,
            "judge": string,
            "passed": Value("bool"),
            "score": Value("float64"),
            "reasons": List(string),
        }
    elif kind == "eval":
        extra = {
            "benchmark": string,
            "item_id": string,
            "model": string,
            "prediction": string,
            "scores": string,
            "trajectory_id": string,
        }
    else:
        raise FormatError(f"hf cannot export {kind} records")
    return Features({"id": string, **extra, **{k: v for k, v in common.items() if k != "id"}})


COLUMN_DOCS: dict[str, str] = {
    "id": "the record's id (stable across reruns)",
    "messages": "the chat as tracetune's agent renders it: system prompt with the tools, the "
    "task with its images, each step's assistant text and its observation (TRL conversational "
    "format; content parts are {type: text|image, text})",
    "prompt": "the shared episode prefix up to the fork (system prompt, task, committed steps), "
    "ending on the last observation",
    "chosen": "the preferred next step (one assistant message)",
    "rejected": "the dispreferred next step (one assistant message)",
    "images": "the images, as `Image` features (PIL images when loaded), in the order of the "
    "image placeholders",
    "files": "non-image attachments of the task (pdf, xlsx, ...): name, MIME type and bytes",
    "tools": "the tools' JSON schemas, as a JSON string (what TRL's trainers accept)",
    "task_id": "id of the task the episode solves",
    "query": "the task's query",
    "controller": "the model that acted (trajectories); empty for dialogues",
    "status": "how the episode ended (trajectories) or the dialogue's format (rr, orr, chat)",
    "final_answer": "the episode's final answer, if any",
    "verifier": "the step verifier that ranked the pair",
    "chosen_score": "the verifier's score of the chosen step, if it gave one",
    "rejected_score": "the verifier's score of the rejected step, if it gave one",
    "gold": "the task's gold answer as JSON (value, kind, aliases, tolerance, unit), if any",
    "target_id": "id of the judged record",
    "target_kind": "what was judged (task, trajectory, step, dialogue, pair)",
    "judge": "'gold', 'exec', or the judge model",
    "passed": "the verdict",
    "score": "the judge's score, if it gave one",
    "reasons": "why",
    "benchmark": "benchmark, mode and protocol",
    "item_id": "the benchmark's item id",
    "model": "the model that answered",
    "prediction": "its answer",
    "scores": "metric name to score, as a JSON object",
    "trajectory_id": "the trajectory behind the prediction, if any",
    "source": "where the record came from (its provenance source, e.g. program:receipt, "
    "mtrace, import:mat)",
    "record": "the full tracetune record as JSON (schema-versioned; "
    "`tracetune.schema.RECORD_TYPES[kind].model_validate_json`)",
}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _source(record: Record) -> str | None:
    provenance = getattr(record, "provenance", None)
    if provenance is None and isinstance(record, Trajectory | PreferencePair):
        provenance = record.task.provenance
    return provenance.source if provenance is not None else None


# -- the exporter -----------------------------------------------------------------------------
@dataclass
class HfExportReport(ExportReport):
    shards: list[str] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)
    num_bytes: int = 0

    def summary(self) -> str:
        text = (
            f"{self.rows} {self.record_type} records -> {self.out_dir} (Hugging Face dataset: "
            f"{len(self.shards)} Parquet shard(s) in {DATA_DIR}/, {self.images} images "
            f"embedded, README.md dataset card)"
        )
        if self.skipped:
            text += f"; {len(self.skipped)} skipped (see {self.out_dir / 'export.json'})"
        return text


@register_exporter("hf")
class HfExporter(Exporter):
    """Every record type as a Hugging Face dataset: Parquet shards with ``Image`` features and
    a dataset card."""

    description: ClassVar[str] = (
        "Hugging Face dataset (Parquet with Image features + dataset card), any record type"
    )
    record_kinds: ClassVar[tuple[str, ...]] = KINDS

    def row(self, record: Record, media: MediaWriter) -> dict[str, Any]:
        from tracetune.formats.trl import TrlDpoExporter, TrlSftExporter

        assert isinstance(media, _Embedding)
        row: dict[str, Any] = {
            "id": record.id,
            "source": _source(record),
            "record": record.model_dump_json(),
        }
        if isinstance(record, Trajectory | Dialogue):
            trl = TrlSftExporter(self.options).row(record, media)
            row.update(
                messages=trl["messages"],
                tools=trl["tools"],
                images=[media.image_value(t) for t in trl["images"]],
                files=[media.file_value(t) for t in trl["files"]],
                task_id=record.task.id,
                query=record.task.query,
            )
            if isinstance(record, Trajectory):
                row.update(
                    controller=record.controller,
                    status=record.status,
                    final_answer=record.final_answer,
                )
            else:
                row.update(controller=None, status=record.format, final_answer=None)
        elif isinstance(record, PreferencePair):
            trl = TrlDpoExporter(self.options).row(record, media)
            row.update(
                prompt=trl["prompt"],
                chosen=trl["chosen"],
                rejected=trl["rejected"],
                tools=trl["tools"],
                images=[media.image_value(t) for t in trl["images"]],
                files=[media.file_value(t) for t in trl["files"]],
                task_id=record.task.id,
                query=record.task.query,
                verifier=record.verifier,
                chosen_score=record.chosen_score,
                rejected_score=record.rejected_score,
            )
        elif isinstance(record, Task):
            row.update(
                query=record.query,
                tools=list(record.tools),
                gold=record.gold.model_dump_json() if record.gold else None,
                images=[media.image_value(f) for f in record.files if f.is_image],
                files=[media.file_value(f) for f in record.files if not f.is_image],
            )
        elif isinstance(record, Verdict):
            row.update(
                target_id=record.target_id,
                target_kind=record.target_kind,
                judge=record.judge,
                passed=record.passed,
                score=record.score,
                reasons=list(record.reasons),
                images=[],
                files=[],
            )
        elif isinstance(record, EvalRecord):
            row.update(
                benchmark=record.benchmark,
                item_id=record.item_id,
                model=record.model,
                prediction=record.prediction,
                scores=json.dumps(record.scores, ensure_ascii=False),
                trajectory_id=record.trajectory_id,
                images=[],
                files=[],
            )
        else:
            raise FormatError(f"hf cannot export {type(record).__name__} records")
        return row

    def readme(self, report: ExportReport) -> str:
        """The dataset card (README.md) of this export."""
        assert isinstance(report, HfExportReport)
        return card(
            report,
            features_for(report.record_type),
            report.sources,
            report.num_bytes,
            self.dataset_name(report),
        )

    def export(self, source: Path, out_dir: Path) -> ExportReport:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from tracetune.formats.chat import ChatFormatError
        from tracetune.store import Dataset

        options = self.options
        dataset = Dataset.open(source)
        kind = dataset.record_type.kind
        features = features_for(kind)
        out = Path(out_dir)
        data_dir = out / DATA_DIR
        if (out / "README.md").exists() and data_dir.exists() and not options.overwrite:
            raise FormatError(f"{out} already holds an export; pass --overwrite to replace it")
        out.mkdir(parents=True, exist_ok=True)
        staging = out / f".{DATA_DIR}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        report = HfExportReport(
            format="hf",
            source=Path(source),
            out_dir=out,
            record_type=kind,
            options=options.model_dump(mode="json"),
        )
        media = _Embedding(dataset.assets)
        schema = features.arrow_schema
        sources: Counter[str] = Counter()
        shard_paths: list[Path] = []
        writer: Any = None
        shard_bytes = 0
        batch: list[dict[str, Any]] = []
        num_bytes = 0

        def flush() -> None:
            nonlocal writer, shard_bytes, num_bytes
            if not batch:
                return
            table = pa.Table.from_pylist(batch, schema=schema)
            if writer is None or shard_bytes >= SHARD_BYTES:
                if writer is not None:
                    writer.close()
                shard_paths.append(staging / f"shard-{len(shard_paths):05d}.parquet")
                writer = pq.ParquetWriter(shard_paths[-1], schema)
                shard_bytes = 0
            writer.write_table(table)
            shard_bytes += table.nbytes
            num_bytes += table.nbytes
            batch.clear()

        try:
            for record in dataset:
                if not options.include_failed and kind == "trajectory":
                    selected = select_for_training(record, report)
                    if selected is None:
                        continue
                    record = selected
                try:
                    row = self.row(record, media)
                except (FormatError, ChatFormatError, FileNotFoundError, KeyError) as exc:
                    reason = str(exc).strip("'\"")
                    if not options.skip_invalid:
                        raise FormatError(
                            f"record {record.id}: {reason} (pass --skip-invalid to leave such "
                            "records out)"
                        ) from exc
                    report.skipped.append((record.id, reason))
                    continue
                batch.append(features.encode_example(row))
                sources[row.get("source") or "unknown"] += 1
                report.rows += 1
                if len(batch) >= BATCH_ROWS:
                    flush()
            flush()
            if writer is None:  # no rows: still a loadable (empty) dataset
                shard_paths.append(staging / "shard-00000.parquet")
                pq.write_table(schema.empty_table(), shard_paths[-1])
        except BaseException:
            if writer is not None:
                writer.close()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if writer is not None:
            writer.close()
        # Only now replace a previous export's shards: a failed run leaves it intact.
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir()
        n = len(shard_paths)
        for i, path in enumerate(shard_paths):
            name = f"train-{i:05d}-of-{n:05d}.parquet"
            os.replace(path, data_dir / name)
            report.shards.append(f"{DATA_DIR}/{name}")
        shutil.rmtree(staging, ignore_errors=True)
        report.images, report.files = media.images, media.files
        report.sources, report.num_bytes = dict(sources), num_bytes
        (out / "README.md").write_text(self.readme(report), encoding="utf-8")
        manifest = export_manifest(report)
        manifest["shards"] = report.shards
        (out / "export.json").write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return report


def card(
    report: HfExportReport,
    features: Any,
    sources: dict[str, int],
    num_bytes: int,
    name: str,
) -> str:
    """The dataset card: the hub's YAML header, then schema, provenance and usage."""
    import yaml

    from tracetune import __version__

    header = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": f"{DATA_DIR}/train-*.parquet"}],
            }
        ],
        "dataset_info": {
            "features": features._to_yaml_list(),
            "splits": [{"name": "train", "num_bytes": num_bytes, "num_examples": report.rows}],
        },
        "tags": ["tracetune", report.record_type, "multimodal", "tool-use", "agents"],
        "pretty_name": name,
    }
    kind = report.record_type
    schema_rows = "\n".join(
        f"| `{col}` | {_type_name(feature)} | {COLUMN_DOCS.get(col, '')} |"
        for col, feature in features.items()
    )
    provenance = "\n".join(f"| `{src}` | {n} |" for src, n in sorted(sources.items())) or (
        "| (none) | 0 |"
    )
    left_out = ""
    if report.left_out or report.failed_steps or report.skipped:
        left_out = (
            f"\nLeft out: {len(report.left_out)} records not fit to train on, "
            f"{sum(report.failed_steps.values())} failed steps, {len(report.skipped)} records "
            "the format could not hold; `export.json` lists each with why.\n"
        )
    usage = {
        "trajectory": "SFT: `trl.SFTTrainer(model, train_dataset=ds, processing_class=processor,"
        " args=SFTConfig(assistant_only_loss=True, max_length=None))` reads `messages` and "
        "`images` as they are (loss on the assistant turns only needs a chat template with "
        "generation markers), or `tracetune train sft`.",
        "dialogue": "SFT: `trl.SFTTrainer` reads `messages` and `images` as they are.",
        "pair": "DPO: `trl.DPOTrainer(model, train_dataset=ds, processing_class=processor, "
        "args=DPOConfig(max_length=None))` reads `prompt`, `chosen`, `rejected` and `images` as "
        "they are, or `tracetune train dpo`.",
    }.get(kind, "Rebuild the tracetune records from the `record` column when needed.")
    body = f"""# {name}

{report.rows} tracetune **{kind}** records, exported from `{report.source}` with tracetune
{__version__}: {report.images} images embedded in the Parquet files as `Image` features,
{report.files} other attachments as bytes.

## Load

```python
from datasets import load_dataset

ds = load_dataset("{report.out_dir}", split="train")   # images come back as PIL images
```

Publish it as it is: `huggingface-cli upload USER/NAME {report.out_dir} --repo-type dataset`,
or `ds.push_to_hub("USER/NAME")`.

## Use

{usage}

## Schema

| column | type | what it holds |
|---|---|---|
{schema_rows}

## Provenance

Records by source (`source` column):

| source | records |
|---|---|
{provenance}
{left_out}
Exported with `tracetune export --format hf`; `export.json` has the options and the source.
The `record` column keeps each record whole, so the export converts back without loss.
"""
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def _type_name(feature: Any) -> str:
    from datasets import Image, List, Value

    if isinstance(feature, Value):
        return str(feature.dtype)
    if isinstance(feature, Image):
        return "Image"
    if isinstance(feature, List):
        return f"list of {_type_name(feature.feature)}"
    if isinstance(feature, dict):
        return "{" + ", ".join(f"{k}: {_type_name(v)}" for k, v in feature.items()) + "}"
    return type(feature).__name__
