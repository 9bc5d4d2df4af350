"""MMAT engine pieces: grammar, ORR derivation, leak check, ingestion, operators, inference."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.data import DATA_DIR, RECEIPT_IMAGE
from tracetune.engine import (
    GrammarError,
    IngestConfig,
    IngestError,
    LeakChecker,
    OperatorCall,
    OperatorConfig,
    OperatorSet,
    OperatorUnavailable,
    RagCall,
    Rationale,
    RationaleConfig,
    RationaleStep,
    Reflection,
    orr_from_rr,
    parse_rr,
    parse_step,
    parse_teacher_step,
    render_step,
    rr_dialogue,
    run_infer,
    run_ingest,
    run_rationale,
)
from tracetune.engine.grammar import (
    API_INVOKE,
    closing_turn,
    parse_orr_assistant,
    parse_orr_user,
    reflect_turn,
)
from tracetune.engine.infer import InferConfig
from tracetune.evaluate.vqa import score_vqa
from tracetune.models.base import ModelOptions
from tracetune.schema import Dialogue, GoldAnswer, Provenance, Task
from tracetune.store import AssetStore, Dataset
from tracetune.testing import ScriptedOpenAIServer

SAMPLE = DATA_DIR / "mmat" / "sample.jsonl"


def _texts(body: dict[str, Any]) -> list[str]:
    out = []
    for m in body["messages"]:
        content = m["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out += [p["text"] for p in content if p.get("type") == "text"]
    return out


# -- grammar ----------------------------------------------------------------------------------
def test_step_grammar_round_trips_and_rejects_malformed_steps() -> None:
    text = render_step("Read the text.", ["ocr", "face_detection"], "reef location", "continue")
    assert text == (
        "<THOUGHT>Read the text.</THOUGHT>\n<OPERATOR>ocr, face_detection</OPERATOR>"
        "\n<RAG>reef location</RAG>\n<SIGNAL>continue</SIGNAL>"
    )
    step = parse_step(text)
    assert (step.thought, step.operators, step.rag, step.signal) == (
        "Read the text.",
        ["ocr", "face_detection"],
        "reef location",
        "continue",
    )
    assert parse_step("<THOUGHT>done</THOUGHT><SIGNAL>end</SIGNAL>").signal == "end"
    with pytest.raises(GrammarError, match="SIGNAL"):
        parse_step("<THOUGHT>no signal</THOUGHT>")
    with pytest.raises(GrammarError, match="unknown signal"):
        parse_step("<THOUGHT>x</THOUGHT><SIGNAL>stop</SIGNAL>")
    # Model outputs at inference: text around the step and lower-case tags are tolerated.
    loose = parse_step(
        "Sure.\n<thought>look</thought><operator>ocr</operator><signal>reflection</signal> ok",
        strict=False,
    )
    assert (loose.operators, loose.signal) == (["ocr"], "reflection")
    with pytest.raises(GrammarError):
        parse_step("Sure.\n<thought>look</thought>", strict=False)


def test_step_parser_rejects_two_steps_in_one_turn_and_reads_loose_model_output() -> None:
    # Strict (training data): the lazy fields must not swallow a second step or a stray tag.
    for bad, field in (
        (
            "<THOUGHT>a</THOUGHT><SIGNAL>end</SIGNAL><THOUGHT>b</THOUGHT><SIGNAL>continue</SIGNAL>",
            "thought",
        ),
        ("<THOUGHT>a <THOUGHT>b</THOUGHT><SIGNAL>end</SIGNAL>", "thought"),
        ("<THOUGHT>a</THOUGHT><RAG>q <SIGNAL>end</SIGNAL></RAG><SIGNAL>end</SIGNAL>", "rag"),
    ):
        with pytest.raises(GrammarError, match=f"inside the {field} field"):
            parse_step(bad)
    # Loose (a tuned model's reply): the first step, fields in either order, ';' separators.
    two = "<THOUGHT>a</THOUGHT><SIGNAL>end</SIGNAL><THOUGHT>b</THOUGHT><SIGNAL>continue</SIGNAL>"
    assert (parse_step(two, strict=False).thought, parse_step(two, strict=False).signal) == (
        "a",
        "end",
    )
    swapped = parse_step(
        "<THOUGHT>t</THOUGHT><RAG>reef</RAG><OPERATOR>ocr; face_detection</OPERATOR>"
        "<SIGNAL>continue</SIGNAL>",
        strict=False,
    )
    assert (swapped.operators, swapped.rag) == (["ocr", "face_detection"], "reef")


def test_teacher_steps_are_parsed_from_json_with_clear_errors() -> None:
    step = parse_teacher_step(
        '```json\n{"thought": "t", "operators": ["ocr", {"name": "x"}], '
        '"rag": {"needed": true, "query": "q"}, '
        '"next_action": "final_answer"}\n```'
    )
    assert (step.operators, step.rag_query, step.final) == (["ocr", "x"], "q", True)
    assert (
        parse_teacher_step('{"thought": "t", "rag": {"needed": false, "query": "q"}}').rag_query
        is None
    )
    for bad, message in (
        ("no json here", "no JSON"),
        ('{"thought": ""}', "thought"),
        ('{"thought": "t", "next_action": "stop"}', "next_action"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_teacher_step(bad)


def _image_task(tmp_path: Path) -> tuple[Task, AssetStore]:
    assets = AssetStore(tmp_path / "assets-root")
    ref = assets.put_file(RECEIPT_IMAGE)
    task = Task(
        id="qa-demo",
        query="How much more is the total than the subtotal?\nAnswer "
        "the question using a single number.",
        files=[ref],
        gold=GoldAnswer(value="2.72", kind="number"),
    )
    return task, assets


def _rationale(reflection: bool = True) -> Rationale:
    return Rationale(
        question="How much more is the total than the subtotal?\nAnswer the question using "
        "a single number.",
        steps=[
            RationaleStep(
                thought="I need the amounts printed on the receipt.",
                operators=[OperatorCall(name="ocr", result="Subtotal 33.97\nTOTAL 36.69")],
                rag=RagCall(query="sales tax rate", result="[1] Tax (doc)\nA sales tax passage."),
            ),
            RationaleStep(
                thought="No more tools are needed; I compare the two amounts.", signal="continue"
            ),
            RationaleStep(thought="The difference is 2.72.", signal="end"),
        ],
        answer="2.72",
        reflection=Reflection(
            flagged=["math"],
            reasons=["math: no calculation"],
            critique="I stated the difference without computing it.",
            derivation="36.69 - 33.97 = 2.72.",
        )
        if reflection
        else None,
    )


def test_orr_is_derived_from_rr_byte_stably_with_every_thought_and_no_rag(
    tmp_path: Path,
) -> None:
    task, _ = _image_task(tmp_path)
    rationale = _rationale()
    rr = rr_dialogue(task, rationale, ["ocr"], True, Provenance(source="test"))
    # RR parses back into exactly the rationale's turns.
    parsed = parse_rr(rr)
    assert [s.step.signal for s in parsed.steps] == ["continue", "continue", "reflection", "end"]
    assert parsed.steps[0].results == [
        ("ocr", "Subtotal 33.97\nTOTAL 36.69"),
        ("rag", "[1] Tax (doc)\nA sales tax passage."),
    ]
    assert parsed.answer == "2.72"
    assert rr.messages[-2].text == closing_turn(rationale.question)
    assert reflect_turn() in [m.text for m in rr.messages]

    first = orr_from_rr(rr)
    again = orr_from_rr(Dialogue.model_validate_json(rr.model_dump_json()))
    assert first.model_dump_json() == again.model_dump_json()  # byte-stable
    # Also through a dataset on disk (Parquet, JSON fields as text) and back.
    ds: Dataset[Dialogue] = Dataset.create(tmp_path / "rr", Dialogue)
    ds.write_all([rr], sources=[AssetStore(tmp_path / "assets-root")])
    assert orr_from_rr(ds.records()[0]).model_dump_json() == first.model_dump_json()

    system, user, assistant = first.messages
    assert [p.type for p in user.content] == ["image", "text"]
    question, calls = parse_orr_user(user.text)
    assert question == rationale.question
    assert calls == [("ocr", "Subtotal 33.97\nTOTAL 36.69")]
    assert "sales tax passage" not in user.text and "sales tax passage" not in assistant.text
    thought, answer = parse_orr_assistant(assistant.text)
    assert answer == "2.72" and assistant.text.endswith("<ANSWER>The answer is: 2.72</ANSWER>")
    positions = [thought.index(t) for t in rationale.thoughts()]
    assert positions == sorted(positions) and len(positions) == 5  # reflection included
    assert first.id == "orr-qa-demo" and first.provenance.parent_id == rr.id


def test_reflection_judges_see_the_image_and_the_repair_inserts_the_reflection_turns(
    tmp_path: Path,
) -> None:
    from tracetune.engine.reflect import ReflectConfig, run_reflect

    task, assets = _image_task(tmp_path)
    source: Dataset[Dialogue] = Dataset.create(tmp_path / "rationale", Dialogue)
    rr = rr_dialogue(task, _rationale(False), ["ocr"], True, Provenance(source="test"))
    source.write_all([rr], sources=[assets])

    def judge(body: dict[str, Any]) -> str:
        prompt = _texts(body)[0]
        if "Repair it" in prompt:
            return json.dumps(
                {
                    "critique": "I gave the difference without the subtraction.",
                    "derivation": ("TOTAL 36.69 minus Subtotal 33.97 is 36.69 - 33.97 = 2.72."),
                }
            )
        return json.dumps({"flagged": "skips calculation" in prompt, "reason": "r"})

    with ScriptedOpenAIServer(judge) as server:
        cfg = ReflectConfig(
            dialogues=tmp_path / "rationale",
            out=tmp_path / "reflected",
            judge="openai:judge",
            backend=ModelOptions(base_url=server.base_url),
        )
        result, out = asyncio.run(run_reflect(cfg, progress=False))
        requests = list(server.requests)
    assert result.written == 1 and len(requests) == 3  # two checks, one repair
    # "Would a plain look at the image give this?" needs the image: every call carries it.
    assert all(len(r.image_urls()) == 1 for r in requests), [r.image_urls() for r in requests]
    (repaired,) = out.records()
    roles_texts = [(m.role, m.text) for m in repaired.messages]
    # ... last results turn, then: the flagged final step now says its reasoning is
    # insufficient (SIGNAL=reflection), the user asks to reflect, the corrected derivation
    # ends SIGNAL=end, then the closing question and the short answer.
    tail = roles_texts[-5:]
    assert [role for role, _ in tail] == ["assistant", "user", "assistant", "user", "assistant"]
    assert tail[0][1].endswith("<SIGNAL>reflection</SIGNAL>")
    assert "The difference is 2.72." in tail[0][1] and "without the subtraction" in tail[0][1]
    assert tail[1][1] == reflect_turn()
    assert "36.69 - 33.97 = 2.72" in tail[2][1] and tail[2][1].endswith("<SIGNAL>end</SIGNAL>")
    assert tail[3][1] == closing_turn(task.query) and tail[4][1] == "2.72"
    assert parse_rr(repaired).reflected


def test_a_repair_that_says_the_answer_was_given_is_dropped_for_multiple_choice(
    tmp_path: Path,
) -> None:
    from tracetune.engine.reflect import ReflectConfig, run_reflect

    task, assets = _image_task(tmp_path)
    question = "Which costs most?\nA. Eggs x12\nB. Coffee beans 250g"
    task = task.model_copy(
        update={
            "query": question,
            "gold": GoldAnswer(value="B", kind="choice"),
            "metadata": {"choices": ["Eggs x12", "Coffee beans 250g"]},
        }
    )
    rationale = Rationale(
        question=question,
        answer="B",
        steps=[
            RationaleStep(
                thought="I will read the prices.",
                operators=[
                    OperatorCall(name="ocr", result="Eggs x12 6.80\nCoffee beans 250g 11.90")
                ],
            ),
            RationaleStep(thought="Coffee beans cost the most, so the answer is B.", signal="end"),
        ],
    )
    source: Dataset[Dialogue] = Dataset.create(tmp_path / "rationale", Dialogue)
    source.write_all(
        [rr_dialogue(task, rationale, ["ocr"], False, Provenance(source="t"))], sources=[assets]
    )

    def judge(body: dict[str, Any]) -> str:
        if "Repair it" in _texts(body)[0]:
            critique = "I went with the given answer B without comparing the two prices."
            return json.dumps({"critique": critique, "derivation": "11.90 > 6.80, so B."})
        return json.dumps({"flagged": True, "reason": "no comparison"})

    with ScriptedOpenAIServer(judge) as server:
        cfg = ReflectConfig(
            dialogues=tmp_path / "rationale",
            out=tmp_path / "reflected",
            judge="openai:judge",
            checks=["math"],
            backend=ModelOptions(base_url=server.base_url),
        )
        result, _ = asyncio.run(run_reflect(cfg, progress=False))
    assert result.drop_reasons == {"reveals_reference": 1}


def test_rr_parser_rejects_dialogues_off_the_grammar(tmp_path: Path) -> None:
    task, _ = _image_task(tmp_path)
    rr = rr_dialogue(task, _rationale(False), ["ocr"], True, Provenance(source="test"))
    broken = rr.model_copy(deep=True)
    broken.messages[2].content[0].text = "<THOUGHT>oops</THOUGHT>"
    with pytest.raises(GrammarError, match="turn 2"):
        parse_rr(broken)
    dropped = rr.model_copy(deep=True)
    del dropped.messages[3]  # the results turn
    with pytest.raises(GrammarError):
        parse_rr(dropped)


# -- leak check ---------------------------------------------------------------------------------
def test_leak_check_catches_the_answer_before_supporting_tool_output() -> None:
    checker = LeakChecker("36.69")
    ocr = OperatorCall(name="ocr", result="Subtotal 33.97\nTOTAL 36.69")
    leaking = Rationale(
        question="q",
        answer="36.69",
        steps=[
            RationaleStep(thought="The total is 36.69, let me confirm with OCR.", operators=[ocr]),
            RationaleStep(thought="OCR shows TOTAL 36.69.", signal="end"),
        ],
    )
    leak = checker.check(leaking)
    assert leak is not None and leak.kind == "answer_before_evidence" and leak.step == 0
    assert leak.reason == "answer_leak" and "36.69" in leak.excerpt
    clean = Rationale(
        question="q",
        answer="36.69",
        steps=[
            RationaleStep(thought="I will read the receipt.", operators=[ocr]),
            RationaleStep(thought="OCR shows TOTAL 36.69.", signal="end"),
        ],
    )
    assert checker.check(clean) is None
    # A failed tool output supports nothing; a search query can leak too.
    failed = OperatorCall(name="ocr", result="(failed: 36.69)", error="boom")
    assert (
        LeakChecker("36.69").check(
            Rationale(
                question="q",
                answer="36.69",
                steps=[
                    RationaleStep(thought="Reading.", operators=[failed]),
                    RationaleStep(thought="It is 36.69.", signal="end"),
                ],
            )
        )
        is not None
    )
    query_leak = Rationale(
        question="q",
        answer="Australia",
        steps=[
            RationaleStep(thought="I search.", rag=RagCall(query="reef in Australia", result="..."))
        ],
    )
    assert LeakChecker("Australia").check(query_leak) is not None
    # Number words count as the number; admitting a given answer is a leak of its own.
    assert LeakChecker("1").mentions("I can see one face") == "1"
    assert LeakChecker("1").mentions("Step 1: detect faces.\n1. run the detector") is None
    reveal = Rationale(
        question="q",
        answer="x",
        steps=[RationaleStep(thought="The given answer is probably right.", signal="end")],
    )
    assert LeakChecker("Australia").check(reveal).reason == "reveals_reference"  # type: ignore[union-attr]


def test_leak_check_ignores_small_numbers_and_no_that_talk_about_the_work() -> None:
    # Short answers are words every plan uses: a count of operators, "top-3", "none of",
    # "no text yet" and a product label being read are not the answer stated early.
    for answer, question, text in (
        ("1", "How many faces?", "I will run one operator: face detection."),
        ("1", "How many faces?", "Let me look at this one image closely."),
        ("3", "How many cars?", "I'll retrieve the top-3 passages about cars."),
        ("2", "How many people?", "Two operators will help: OCR and the caption."),
        ("0", "How many dogs?", "None of the results so far mention animals."),
        ("no", "Is there a dog?", "There is no information yet; I will caption the image."),
        ("yes", "Is it organic?", "The label says ORGANIC, I will check the rest."),
    ):
        rationale = Rationale(
            question=question,
            answer=answer,
            steps=[
                RationaleStep(thought=text, operators=[OperatorCall(name="ocr", result="...")]),
                RationaleStep(thought="Done.", signal="end"),
            ],
        )
        assert LeakChecker(answer, question).check(rationale) is None, text
    # The same answers stated as claims still leak.
    for answer, question, text in (
        ("2", "How many people?", "There are 2 people, as the caption will show."),
        ("1", "How many faces?", "There is exactly one face."),
        ("no", "Is there a dog?", "No, there is no dog; let me confirm."),
        ("yes", "Is it organic?", "It is organic, so the answer is yes."),
    ):
        assert LeakChecker(answer, question).mentions(text) == answer, text


def test_leak_check_for_multiple_choice_uses_the_letter_and_option_text() -> None:
    choices = ["Eggs x12", "Coffee beans 250g"]
    question = "Which is priciest?\nA. Eggs x12\nB. Coffee beans 250g"
    checker = LeakChecker("B", question, choices, "B")
    early = Rationale(
        question=question,
        answer="B",
        steps=[
            RationaleStep(
                thought="Option B looks right; I will read prices.",
                operators=[OperatorCall(name="ocr", result="Coffee beans 250g 11.90")],
            ),
        ],
    )
    assert checker.check(early) is not None
    ok = Rationale(
        question=question,
        answer="B",
        steps=[
            RationaleStep(
                thought="A receipt: I will read the prices.",
                operators=[OperatorCall(name="ocr", result="Coffee beans 250g 11.90")],
            ),
            RationaleStep(
                thought="Coffee beans 250g costs the most, so the answer is B.", signal="end"
            ),
        ],
    )
    assert checker.check(ok) is None
    # "A" as an article is not the option letter A.
    assert LeakChecker("A", question, choices, "A").mentions("A receipt with prices") is None


def test_rationale_stage_regenerates_a_leaking_sample_then_drops_it(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    asyncio.run(run_ingest(IngestConfig(source=SAMPLE, out=tasks, limit=1), progress=False))
    leak_first = json.dumps(
        {
            "thought": "The total is 36.69; I will check with OCR.",
            "operators": ["ocr"],
            "next_action": "continue",
        }
    )
    honest_first = json.dumps(
        {"thought": "I will read the receipt.", "operators": ["ocr"], "next_action": "continue"}
    )
    final = json.dumps({"thought": "OCR reads TOTAL 36.69.", "next_action": "final_answer"})

    def make_teacher(always_leak: bool) -> Any:
        def respond(body: dict[str, Any]) -> str:
            texts = _texts(body)
            n = sum(1 for m in body["messages"] if m["role"] == "assistant")
            retry = "previous attempt was rejected" in texts[1]
            first = honest_first if retry and not always_leak else leak_first
            return [first, final, "36.69"][n]

        return respond

    ops = OperatorConfig(operators=["ocr"], rag=False)
    for always, expect_written in ((False, 1), (True, 0)):
        out = tmp_path / f"rationale-{always}"
        with ScriptedOpenAIServer(make_teacher(always)) as server:
            cfg = RationaleConfig(
                tasks=tasks,
                out=out,
                teacher="openai:t",
                operators=ops,
                backend=ModelOptions(base_url=server.base_url),
            )
            result, dataset = asyncio.run(run_rationale(cfg, progress=False))
            retries = [
                r for r in server.requests if "previous attempt was rejected" in r.texts()[1]
            ]
        assert result.written == expect_written
        assert retries and "states the answer before any tool output" in retries[0].texts()[1]
        if always:
            assert result.drop_reasons == {"answer_leak": 1}
            ((_, status, info),) = dataset.state.items("mmat-rationale")
            assert status == "dropped" and len(info["leaks"]) == 2
            stats = json.loads((out / "stats.json").read_text())
            assert stats["drop_reasons"] == {"answer_leak": 1}
        else:
            (dialogue,) = dataset.records()
            assert dialogue.metadata["attempts"] == 2
            assert "36.69" not in dialogue.messages[2].text  # the kept first step is honest


# -- ingestion -----------------------------------------------------------------------------------
def test_ingest_reads_every_format_with_stable_ids_and_style_constraints(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = RECEIPT_IMAGE.read_bytes()
    rows = [
        {"qid": "a", "img": str(RECEIPT_IMAGE), "q": "What is the total?", "a": "36.69"},
        {"qid": "b", "img": str(RECEIPT_IMAGE), "q": "Is this a receipt?", "a": "Yes"},
        {"qid": "c", "img": str(RECEIPT_IMAGE), "q": "Which shop?", "a": "Green Leaf Market"},
        {
            "qid": "d",
            "img": str(RECEIPT_IMAGE),
            "q": "Describe the layout of this document.",
            "a": "A header with the shop name, then items with prices, then totals.",
        },
        {
            "qid": "e",
            "img": str(RECEIPT_IMAGE),
            "q": "Which costs most?",
            "a": "Eggs x12",
            "opts": ["Bananas 1.2kg", "Eggs x12"],
        },
    ]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cols = {"image": "img", "question": "q", "answer": "a", "choices": "opts", "id": "qid"}
    parquet = tmp_path / "qa.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {**r, "img": {"bytes": png, "path": "receipt.png"}, "opts": r.get("opts", [])}
                for r in rows
            ]
        ),
        parquet,
    )
    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_list(
        [{**r, "img": str(RECEIPT_IMAGE), "opts": r.get("opts", [])} for r in rows]
    ).cast_column("img", datasets.Image()).save_to_disk(str(hf_dir))
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text(
        "qid,img,q,a,opts\n"
        + "".join(
            f'{r["qid"]},{r["img"]},"{r["q"]}","{r["a"]}","{"|".join(r.get("opts", []))}"\n'
            for r in rows
        )
    )

    ids = {}
    snapshot = tmp_path / "hub-snapshot"  # a hub dataset repo: data/<split>-*.parquet
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "data" / "train-00000-of-00001.parquet").write_bytes(parquet.read_bytes())
    pq.write_table(
        pa.Table.from_pylist([{"qid": "t", "img": None, "q": "x", "a": "y"}]),
        snapshot / "data" / "test-00000-of-00001.parquet",
    )  # never read: not train
    for source in (jsonl, parquet, hf_dir, csv_path, snapshot):
        out = tmp_path / f"tasks-{source.name}"
        result, ds = asyncio.run(
            run_ingest(
                IngestConfig(source=source, out=out, name="demo", columns=cols), progress=False
            )
        )
        assert (result.written, result.dropped) == (5, 0), source
        tasks = {t.metadata["item_id"]: t for t in ds}
        ids[source.name] = sorted(t.id for t in tasks.values())
        assert tasks["a"].query.endswith("Answer the question using a single number.")
        assert tasks["b"].query.endswith("Answer the question with yes or no.")
        assert tasks["b"].gold.value == "Yes"  # answers unchanged
        assert tasks["c"].query.endswith("single word or phrase.")
        assert tasks["d"].query == "Describe the layout of this document."  # long: no constraint
        assert tasks["e"].query == (
            "Which costs most?\nA. Bananas 1.2kg\nB. Eggs x12\n"
            "Answer with the option's letter from the given choices "
            "directly."
        )
        assert (tasks["e"].gold.value, tasks["e"].gold.kind) == ("B", "choice")
        assert tasks["e"].gold.aliases == ["Eggs x12"]
        (ref,) = tasks["a"].files
        assert ds.assets.read_bytes(ref) == png  # the image bytes, stored once
        assert len(list((out / "assets").rglob("*.png"))) == 1
    assert len({tuple(v) for v in ids.values()}) == 1  # same rows, same ids, any format


def test_ingest_drops_image_placeholders_so_exports_count_one_marker_per_image(
    tmp_path: Path,
) -> None:
    from tracetune.formats import export_dataset

    # LLaVA-style sources write "<image>" into the question; the image is a message part.
    source = tmp_path / "llava.jsonl"
    source.write_text(
        json.dumps(
            {
                "id": "l1",
                "image": str(RECEIPT_IMAGE),
                "question": "<image>\nWhat is the total amount paid?",
                "answer": "36.69",
            }
        )
        + "\n"
    )
    _, tasks = asyncio.run(run_ingest(IngestConfig(source=source, out=tmp_path / "t"), False))
    (task,) = tasks.records()
    assert (
        task.query == "What is the total amount paid?\nAnswer the question using a single number."
    )
    assert task.gold.value == "36.69"  # type: ignore[union-attr]
    rationale = Rationale(
        question=task.query,
        answer="36.69",
        steps=[
            RationaleStep(
                thought="I read the receipt.",
                operators=[OperatorCall(name="ocr", result="TOTAL 36.69")],
            ),
            RationaleStep(thought="The TOTAL line reads 36.69.", signal="end"),
        ],
    )
    rr: Dataset[Dialogue] = Dataset.create(tmp_path / "rr", Dialogue)
    rr.write_all(
        [rr_dialogue(task, rationale, ["ocr"], False, Provenance(source="test"))],
        sources=[tasks.assets],
    )
    report = export_dataset("llamafactory", tmp_path / "rr", tmp_path / "lf")
    assert report.rows == 1
    (row,) = [json.loads(line) for line in (tmp_path / "lf/train.jsonl").read_text().splitlines()]
    markers = sum(turn["value"].count("<image>") for turn in row["conversations"])
    assert markers == len(row["images"]) == 1


def test_ingest_takes_the_consensus_of_vqav2_style_answer_lists(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    humans = ["2", "two", "2", "3", "2"]
    source = tmp_path / "vqav2.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "image": str(RECEIPT_IMAGE),
                    "question": "How many bananas?",
                    "answers": [{"answer": a, "answer_confidence": "yes"} for a in humans],
                }
            ]
        ),
        source,
    )
    _, tasks = asyncio.run(
        run_ingest(
            IngestConfig(source=source, out=tmp_path / "t", columns={"answer": "answers"}), False
        )
    )
    (task,) = tasks.records()
    # The most frequent human answer is the reference; the rest stay as aliases.
    assert (task.gold.value, task.gold.aliases) == ("2", ["two", "3"])  # type: ignore[union-attr]
    assert task.query.endswith("Answer the question using a single number.")


def test_ingest_reads_base64_images_from_a_benchmark_tsv(tmp_path: Path) -> None:
    import base64

    # VLMEvalKit's benchmark TSVs carry each image as bare base64 text in the image column.
    good = base64.b64encode(RECEIPT_IMAGE.read_bytes()).decode()
    tsv = tmp_path / "bench.tsv"
    tsv.write_text(
        "index\timage\tquestion\tanswer\n"
        f"7\t{good}\tWhat is the total?\t36.69\n"
        f"8\t{'QUJD' * 100}\tWhat is this?\tcat\n"  # base64 of text, not of an image
    )
    cols = {"id": "index"}
    result, tasks = asyncio.run(
        run_ingest(IngestConfig(source=tsv, out=tmp_path / "t", columns=cols), False)
    )
    assert (result.written, result.drop_reasons) == (1, {"broken_image": 1})
    (task,) = tasks.records()
    assert tasks.assets.read_bytes(task.files[0]) == RECEIPT_IMAGE.read_bytes()
    assert task.metadata["item_id"] == "7"


def test_ingest_reports_and_skips_broken_and_missing_images_via_cli(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    Image.new("RGB", (40, 20), "white").save(tmp_path / "ok.png")
    csv_path = tmp_path / "qa.csv"
    csv_path.write_text(
        "picture,question,answer\nok.png,What colour is it?,white\n"
        "missing.png,What is this?,a cat\nbroken.png,What is this?,a dog\n"
    )
    out = tmp_path / "tasks"
    args = [
        "mmat",
        "ingest",
        "--source",
        str(csv_path),
        "--out",
        str(out),
        "--image-col",
        "picture",
        "--quiet",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 written" in result.output and "2 dropped" in result.output
    assert "dropped 1 x missing_image" in result.output
    assert "dropped 1 x broken_image" in result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["drop_reasons"] == {"missing_image": 1, "broken_image": 1}
    assert {e["reason"] for e in stats["dropped_examples"]} == {"missing_image", "broken_image"}
    again = CliRunner().invoke(app, args)
    assert "0 written, 3 already done" in again.output  # resumed, nothing duplicated
    assert len(Dataset.open(out, Task)) == 1
    # A wrong column mapping is a clear error before anything is written.
    bad = CliRunner().invoke(
        app,
        ["mmat", "ingest", "--source", str(csv_path), "--out", str(tmp_path / "bad"), "--quiet"],
    )
    assert bad.exit_code == 2 and "no column for image ('image')" in bad.output
    assert "picture" in bad.output and "--image-col" in bad.output
    with pytest.raises(IngestError, match="does not exist"):
        asyncio.run(run_ingest(IngestConfig(source=tmp_path / "nope.jsonl", out=out)))


# -- operators -----------------------------------------------------------------------------------
def test_unavailable_operators_fail_at_startup_before_any_model_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = tmp_path / "tasks"
    asyncio.run(run_ingest(IngestConfig(source=SAMPLE, out=tasks, limit=1), progress=False))
    with ScriptedOpenAIServer(["never used"]) as server:
        cfg = RationaleConfig(
            tasks=tasks,
            out=tmp_path / "r",
            teacher="openai:t",
            operators=OperatorConfig(
                operators=["label_bbox", "ocr"],
                detector=str(tmp_path / "no-such-detector"),
                rag=False,
            ),
            backend=ModelOptions(base_url=server.base_url),
        )
        with pytest.raises(OperatorUnavailable, match="operator 'label_bbox' cannot run"):
            asyncio.run(run_rationale(cfg, progress=False))
        no_corpus = cfg.model_copy(update={"operators": OperatorConfig(operators=["ocr"])})
        with pytest.raises(OperatorUnavailable, match="operator 'rag'.*operators.corpus"):
            asyncio.run(run_rationale(no_corpus, progress=False))
        assert server.calls == 0
    web = OperatorConfig(operators=["ocr"], rag_backend="serper")
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(OperatorUnavailable, match=r"serper backend needs its API key"):
        asyncio.run(OperatorSet(web).startup())
    with pytest.raises(OperatorUnavailable, match="image_caption needs a vision-language"):
        asyncio.run(OperatorSet(OperatorConfig(operators=["image_caption"], rag=False)).startup())


def _tiny_owlv2(root: Path) -> Path:
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessorPil,
        Owlv2Processor,
    )

    vocab: dict[str, int] = {}
    for char in ByteLevel.alphabet():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=96)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(
        Owlv2Config(
            text_config=dict(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=96,
                bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
                eos_token_id=eos,
                pad_token_id=eos,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=32,
        )
    )
    model.save_pretrained(root)
    Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok
    ).save_pretrained(root)
    return root


def test_label_bbox_runs_the_real_detector_loaded_at_startup(tmp_path: Path) -> None:
    detector = _tiny_owlv2(tmp_path / "owlv2")
    ops = OperatorSet(
        OperatorConfig(
            operators=["label_bbox", "ocr"],
            detector=str(detector),
            rag=False,
            tool_options={"object_localization": {"threshold": 0.0, "device": "cpu"}},
        )
    )
    asyncio.run(ops.startup())
    (tmp_path / "work").mkdir()
    Image.open(RECEIPT_IMAGE).save(tmp_path / "work" / "receipt.png")
    calls, problems = asyncio.run(
        ops.run(
            ["label_bbox", "ocr", "zoom"],
            tmp_path / "work",
            ["receipt.png"],
            "Which price is the highest?\nA...",
        )
    )
    assert problems == ["'zoom' is not an available operator (available: label_bbox, ocr)"]
    bbox, ocr = calls
    assert bbox.error is None and bbox.data["model"] == str(detector)
    assert re.match(r"Which price is the highest\?: \[\d+, \d+, \d+, \d+\] score", bbox.result)
    assert "TOTAL 36.69" in ocr.result


# -- inference ------------------------------------------------------------------------------------
def _receipt_tasks(tmp_path: Path) -> Path:
    tasks = tmp_path / "tasks"
    asyncio.run(run_ingest(IngestConfig(source=SAMPLE, out=tasks, limit=1), progress=False))
    return tasks


def test_rr_inference_completes_the_reflection_loop_and_extracts_the_answer(
    tmp_path: Path,
) -> None:
    replies = [
        "<THOUGHT>I need to read the receipt.</THOUGHT><OPERATOR>ocr</OPERATOR>"
        "<SIGNAL>continue</SIGNAL>",
        "<THOUGHT>The amount paid is probably the subtotal, 33.97.</THOUGHT>"
        "<SIGNAL>reflection</SIGNAL>",
        "<THOUGHT>Checking again: the receipt adds tax, and the line TOTAL reads 36.69."
        "</THOUGHT><SIGNAL>end</SIGNAL>",
        "36.69",
    ]
    with ScriptedOpenAIServer(replies) as server:
        cfg = InferConfig(
            tasks=_receipt_tasks(tmp_path),
            out=tmp_path / "infer",
            model="openai:tuned",
            mode="rr",
            operators=OperatorConfig(operators=["ocr", "face_detection"], rag=False),
            backend=ModelOptions(base_url=server.base_url),
        )
        result, dataset = asyncio.run(run_infer(cfg, progress=False))
        requests = list(server.requests)
    assert result.written == 1 and len(requests) == 4
    assert "<OPERATOR>" in requests[0].texts()[0]  # the RR system prompt states the grammar
    assert requests[0].image_urls()[0].startswith("data:image/png;base64,")
    after_ocr = requests[1].texts()[-1]
    assert after_ocr.startswith("Here are the results of ocr") and "TOTAL 36.69" in after_ocr
    assert requests[2].texts()[-1] == reflect_turn()  # SIGNAL=reflection was answered
    assert requests[3].texts()[-1] == closing_turn(dataset.records()[0].task.query)
    (dialogue,) = dataset.records()
    assert dialogue.format == "rr" and dialogue.metadata["answer"] == "36.69"
    assert dialogue.metadata["reflections"] == 1 and dialogue.metadata["status"] == "completed"
    assert dialogue.metadata["operator_calls"] == ["ocr"]
    assert [m.role for m in dialogue.messages] == (
        ["system", "user"] + ["assistant", "user"] * 3 + ["assistant"]
    )
    preds = [json.loads(x) for x in (tmp_path / "infer/predictions.jsonl").read_text().splitlines()]
    assert preds == [{"id": "receipt-total", "prediction": "36.69", "extracted": "36.69"}]
    report = score_vqa(tmp_path / "infer/gold.jsonl", tmp_path / "infer/predictions.jsonl")
    assert report.metrics["accuracy"] == 100.0


def test_rr_inference_says_retrieval_is_off_instead_of_pretending_it_ran(tmp_path: Path) -> None:
    replies = [
        "<THOUGHT>Read it and look it up.</THOUGHT><OPERATOR>ocr</OPERATOR>"
        "<RAG>receipt tax rate</RAG><SIGNAL>continue</SIGNAL>",
        "<THOUGHT>TOTAL reads 36.69.</THOUGHT><SIGNAL>end</SIGNAL>",
        "36.69",
    ]
    with ScriptedOpenAIServer(replies) as server:
        cfg = InferConfig(
            tasks=_receipt_tasks(tmp_path),
            out=tmp_path / "infer",
            model="openai:tuned",
            operators=OperatorConfig(operators=["ocr"], rag=False),
            backend=ModelOptions(base_url=server.base_url),
        )
        _, dataset = asyncio.run(run_infer(cfg, progress=False))
        after = server.requests[1].texts()[-1]
    assert (
        after.startswith("Here are the results of ocr from") and "rag" not in after.split("\n")[0]
    )
    assert "retrieval is not available" in after and "(retrieval is disabled)" not in after
    (dialogue,) = dataset.records()
    assert dialogue.metadata["operator_calls"] == ["ocr"] and dialogue.metadata["answer"] == "36.69"


def test_orr_inference_inlines_operator_results_first(tmp_path: Path) -> None:
    reply = (
        "<THOUGHT>The OCR lines show TOTAL 36.69.</THOUGHT><ANSWER>The answer is: 36.69</ANSWER>"
    )
    with ScriptedOpenAIServer([reply]) as server:
        cfg = InferConfig(
            tasks=_receipt_tasks(tmp_path),
            out=tmp_path / "orr",
            model="openai:tuned",
            mode="orr",
            operators=OperatorConfig(operators=["ocr"], rag=False),
            backend=ModelOptions(base_url=server.base_url),
        )
        _, dataset = asyncio.run(run_infer(cfg, progress=False))
        (request,) = server.requests
    user = request.texts()[-1]
    assert f"{API_INVOKE[0]}ocr{API_INVOKE[1]}" in user and "TOTAL 36.69" in user
    (dialogue,) = dataset.records()
    assert dialogue.format == "orr" and dialogue.metadata["answer"] == "36.69"


def test_rr_inference_forces_an_answer_after_repeated_format_errors(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(
        ["I think it is 36.69", "still no tags", "The answer is: 36.69"]
    ) as server:
        cfg = InferConfig(
            tasks=_receipt_tasks(tmp_path),
            out=tmp_path / "bad",
            model="openai:tuned",
            max_format_errors=1,
            operators=OperatorConfig(operators=["ocr"], rag=False),
            backend=ModelOptions(base_url=server.base_url),
        )
        _, dataset = asyncio.run(run_infer(cfg, progress=False))
        assert "did not follow the step format" in server.requests[1].texts()[-1]
    (dialogue,) = dataset.records()
    assert dialogue.metadata["status"] == "format_errors"
    assert dialogue.metadata["answer"] == "36.69"


def test_mmat_commands_have_help() -> None:
    for command in ("ingest", "rationale", "reflect", "render", "infer", "run"):
        result = CliRunner().invoke(app, ["mmat", command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, command


@pytest.mark.slow
def test_cli_infer_runs_a_tiny_local_vlm_in_both_modes(tmp_path: Path) -> None:
    from tracetune.models.tiny import init_tiny

    model = init_tiny("qwen2_vl", tmp_path / "model")
    tasks = _receipt_tasks(tmp_path)
    for mode in ("rr", "orr"):
        out = tmp_path / f"infer-{mode}"
        args = [
            "mmat",
            "infer",
            "--tasks",
            str(tasks),
            "--out",
            str(out),
            "--model",
            f"local:{model}",
            "--mode",
            mode,
            "--operators",
            "ocr",
            "--no-rag",
            "--max-turns",
            "2",
            "--max-tokens",
            "8",
            "--quiet",
        ]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "1 written" in result.output and "accuracy: 0.00% over 1 items" in result.output
        (dialogue,) = Dataset.open(out, Dialogue).records()
        assert dialogue.format == mode and dialogue.metadata["operator_calls"] in ([], ["ocr"])
        assert dialogue.messages[-1].role == "assistant" and dialogue.messages[-1].text
        (pred,) = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        assert pred["id"] == "receipt-total" and pred["prediction"] == dialogue.messages[-1].text


def test_rationale_stage_stops_cleanly_at_the_token_budget(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    asyncio.run(run_ingest(IngestConfig(source=SAMPLE, out=tasks), progress=False))

    def respond(body: dict[str, Any]) -> str:
        n = sum(1 for m in body["messages"] if m["role"] == "assistant")
        final = {"thought": "I looked at the image closely.", "next_action": "final_answer"}
        return json.dumps(final) if n == 0 else "no idea"

    with ScriptedOpenAIServer(respond) as server:
        cfg = RationaleConfig(
            tasks=tasks,
            out=tmp_path / "r",
            teacher="openai:t",
            concurrency=1,
            max_total_tokens=1,
            operators=OperatorConfig(operators=["ocr"], rag=False),
            backend=ModelOptions(base_url=server.base_url),
        )
        result, _ = asyncio.run(run_rationale(cfg, progress=False))
    assert result.stopped is not None and "token budget" in result.stopped
    assert result.dropped == 1 and result.drop_reasons == {"answer_mismatch": 1}
    assert server.calls == 2  # one sample, then the budget stopped the run


def test_questions_about_one_image_share_one_operator_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops = OperatorSet(OperatorConfig(operators=["face_detection"], rag=False))
    calls: list[dict[str, Any]] = []

    async def run_twice() -> list[Any]:
        await ops.startup()
        tool = ops.tools["face_detection"]
        real = tool.acall

        async def counting(ctx: Any, args: dict[str, Any]) -> Any:
            calls.append(args)
            await asyncio.sleep(0.05)  # both questions are in flight at once
            return await real(ctx, args)

        monkeypatch.setattr(tool, "acall", counting)
        dirs = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "photo.png").write_bytes((DATA_DIR / "astronaut.png").read_bytes())
            dirs.append(tmp_path / name)
        return await asyncio.gather(
            *(ops.run(["face_detection"], d, ["photo.png"], "How many faces?") for d in dirs)
        )

    (first, _), (second, _) = asyncio.run(run_twice())
    assert len(calls) == 1 and first[0].result == second[0].result
    assert first[0].result.startswith("1 face found")
