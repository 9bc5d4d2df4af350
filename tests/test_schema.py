"""Every record round-trips through JSON and through the Parquet storage form."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from tracetune.schema import (
    SCHEMA_VERSION,
    STORAGE_CONTEXT,
    Action,
    ContentPart,
    Dialogue,
    ErrorKind,
    EvalRecord,
    FileRef,
    GoldAnswer,
    Message,
    Observation,
    PreferencePair,
    Provenance,
    Step,
    StepError,
    Task,
    ToolCall,
    Trajectory,
    Usage,
    Verdict,
    arrow_schema,
)

IMG = FileRef(sha256="ab" * 32, name="receipt.png", mime="image/png", size=10, width=4, height=3)


def make_task() -> Task:
    return Task(
        id="t1",
        query="What is the total?",
        files=[IMG],
        tools=["ocr", "calculator"],
        gold=GoldAnswer(value="12.50", kind="number", tolerance=0.01, unit="USD"),
        gold_chain=[ToolCall(name="ocr", arguments={"image": "receipt.png"})],
        provenance=Provenance(source="program:receipt", seed=3, extra={"family": "receipt"}),
        metadata={"nested": {"a": [1, 2]}},
    )


def make_steps() -> list[Step]:
    return [
        Step(
            index=0,
            raw="Thought: read\nAction: {...}",
            thought="read",
            action=Action(
                type="tool_call",
                tool_call=ToolCall(name="ocr", arguments={"image": "receipt.png", "k": 2.5}),
            ),
            observation=Observation(text="TOTAL 12.50", images=[IMG], data={"lines": ["x"]}),
            usage=Usage(prompt_tokens=5, completion_tokens=3, calls=1, retries=2),
        ),
        Step(index=1, raw="garbage", error=StepError(kind=ErrorKind.PARSE, message="no action")),
        Step(
            index=2,
            action=Action(type="code", code="print(1)"),
            observation=Observation(text="1", data="a plain string"),
        ),
        Step(index=3, action=Action(type="final_answer", answer="12.50")),
    ]


def all_records() -> list:
    task = make_task()
    steps = make_steps()
    return [
        task,
        Trajectory(
            id="tr1",
            task=task,
            controller="openai:x",
            steps=steps,
            final_answer="12.50",
            usage=Usage(prompt_tokens=5),
            sampling={"t": 0.7},
        ),
        Verdict(
            id="v1",
            target_id="tr1",
            judge="gold",
            passed=False,
            score=0.0,
            reasons=["wrong total"],
            details={"expected": "12.50"},
        ),
        PreferencePair(
            id="p1",
            task=task,
            prefix=steps[:1],
            chosen=steps[3],
            rejected=steps[1],
            chosen_score=1.0,
            rejected_score=0.0,
            verifier="gold",
            reasons=["parse error"],
        ),
        Dialogue(
            id="d1",
            task=task,
            format="rr",
            messages=[
                Message(
                    role="user",
                    content=[
                        ContentPart(type="image", image=IMG),
                        ContentPart(type="text", text="Q?"),
                    ],
                ),
                Message(
                    role="assistant",
                    content=[ContentPart(type="text", text="<THOUGHT>x</THOUGHT>")],
                ),
            ],
        ),
        EvalRecord(
            id="e1",
            benchmark="gta/e2e/official",
            item_id="3",
            prediction="12.5",
            scores={"answer_acc": 1.0},
            metadata={"level": 1},
        ),
    ]


@pytest.mark.parametrize("record", all_records(), ids=lambda r: type(r).__name__)
def test_json_round_trip(record) -> None:
    cls = type(record)
    assert cls.model_validate_json(record.model_dump_json()) == record
    assert record.schema_version == SCHEMA_VERSION


@pytest.mark.parametrize("record", all_records(), ids=lambda r: type(r).__name__)
def test_storage_round_trip_through_arrow(record) -> None:
    cls = type(record)
    row = record.model_dump(mode="json", context=STORAGE_CONTEXT)
    table = pa.Table.from_pylist([row], schema=arrow_schema(cls))
    back = cls.model_validate(table.to_pylist()[0], context=STORAGE_CONTEXT)
    assert back == record


def test_free_form_fields_are_json_text_only_in_storage() -> None:
    call = ToolCall(name="ocr", arguments={"image": "a.png"})
    assert call.model_dump(mode="json")["arguments"] == {"image": "a.png"}
    assert (
        call.model_dump(mode="json", context=STORAGE_CONTEXT)["arguments"] == '{"image": "a.png"}'
    )
    # A string observation value stays a string (it is not mistaken for JSON text).
    obs = Observation(text="", data="[1, 2]")
    assert obs.data == "[1, 2]"
    assert (
        Observation.model_validate(
            obs.model_dump(mode="json", context=STORAGE_CONTEXT), context=STORAGE_CONTEXT
        ).data
        == "[1, 2]"
    )


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="querry"):
        Task(id="x", querry="typo")  # type: ignore[call-arg]


def test_file_ref_asset_path_is_content_addressed() -> None:
    assert IMG.asset_path == f"assets/ab/{'ab' * 32}.png"
    assert IMG.is_image and make_task().images == [IMG]


def test_usage_adds_up() -> None:
    total = Usage(prompt_tokens=1, completion_tokens=2, retries=1, calls=1).add(
        Usage(prompt_tokens=10, cost_usd=0.5, calls=1, cached_calls=1)
    )
    assert (total.total_tokens, total.retries, total.calls, total.cached_calls) == (13, 1, 2, 1)
    assert total.cost_usd == 0.5
