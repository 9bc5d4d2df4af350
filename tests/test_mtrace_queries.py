"""Query generation: decontamination against benchmark files, dedup, quotas, malformed output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mtrace_script import SEEDS, Script, write_seeds
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.schema import Task
from tracetune.store import Dataset
from tracetune.synth.mtrace.common import MalformedOutput, extract_json
from tracetune.synth.mtrace.queries import benchmark_questions
from tracetune.testing.openai_server import ScriptedOpenAIServer

FIXTURES = Path(__file__).parent / "fixtures"
GTA = FIXTURES / "gta_small" / "dataset.json"
GAIA = FIXTURES / "gaia_small" / "metadata.jsonl"


def _q(query: str, tools: list[str] | None = None) -> dict[str, object]:
    return {"query": query, "tools": tools or ["visual_qa"]}


def _queries(tmp_path: Path, plan: list[object], *extra: str) -> tuple[int, str, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds)
    run = tmp_path / "run"
    with ScriptedOpenAIServer(Script(queries=plan)) as srv:  # type: ignore[arg-type]
        result = CliRunner().invoke(
            app,
            [
                "synth",
                "queries",
                "--out",
                str(run),
                "--seeds",
                str(seeds),
                "--generator",
                "openai:test-model",
                "--base-url",
                srv.base_url,
                "--batches",
                str(len(plan)),
                "--topics",
                ",".join(f"topic {i}" for i in range(9)),
                "--tools",
                "ocr,visual_qa,inspect_file,calculator,face_detection",
                "--quiet",
                *extra,
            ],
        )
    return result.exit_code, result.output, run


def _stats(run: Path) -> dict[str, dict[str, object]]:
    result = CliRunner().invoke(app, ["synth", "stats", str(run), "--json"])
    assert result.exit_code == 0, result.output
    return {r["stage"]: r for r in json.loads(result.output)}


@pytest.mark.slow  # loads the packaged MiniLM embedder (~8 s)
def test_benchmark_near_copy_is_removed_and_counted(tmp_path: Path) -> None:
    near_copy = "What do the two items on this receipt cost altogether, in US dollars?"
    keep = "Read the parking sign in the photo: may I park there on a Sunday at noon?"
    code, output, run = _queries(
        tmp_path, [[_q(near_copy), _q(keep)]], "--benchmark", str(GTA), "--benchmark", str(GAIA)
    )
    assert code == 0, output
    kept = [t.query for t in Dataset.open(run / "queries", Task)]
    assert kept == [keep]
    rows = _stats(run)
    assert rows["queries.filter"]["drop_reasons"] == {"benchmark near-copy": 1}
    assert "1 x benchmark near-copy" in output
    # The drop names the benchmark question it was too close to.
    from tracetune.store import RunState

    state = RunState(run / "queries" / "state.sqlite")
    ((_, _, info),) = [i for i in state.items("queries.filter") if i[1] == "dropped"]
    assert (
        info["question"] == "How much do the two items on this receipt cost in total, in dollars?"
    )
    assert info["similarity"] >= 0.85 and info["benchmark"] == str(GTA)

    # Without decontamination the same query is kept.
    code, output, run = _queries(
        tmp_path / "off", [[_q(near_copy), _q(keep)]], "--benchmark", str(GTA), "--no-decontaminate"
    )
    assert code == 0, output
    assert len(Dataset.open(run / "queries", Task)) == 2


def test_malformed_generator_output_drops_items_with_reasons(tmp_path: Path) -> None:
    plan: list[object] = [
        'Sure! Here are the tasks: [{"query": "broken',  # not JSON at all
        [
            {"query": "How much is the tax on this receipt?"},  # missing tools
            {"tools": ["ocr"]},  # missing query
            _q("Who painted the picture in the photo?", ["teleport"]),  # unknown tool
            "just a string",  # not an object
            _q("Read the total on the receipt in the photo.", ["ocr"]),
        ],
        [
            _q("Read the total on the receipt in the photo!", ["ocr"]),  # near-duplicate
            _q(SEEDS[1]["query"], ["face_detection"]),
        ],  # copy of a seed example
    ]
    code, output, run = _queries(tmp_path, plan, "--embedder", "hashing")
    assert code == 0, output
    assert [t.query for t in Dataset.open(run / "queries", Task)] == [
        "Read the total on the receipt in the photo."
    ]
    rows = _stats(run)
    assert rows["queries.generate"]["drop_reasons"] == {"malformed generator output": 1}
    assert rows["queries.generate"]["done"] == 2
    assert rows["queries.filter"]["drop_reasons"] == {
        "malformed query": 4,
        "near-duplicate": 1,
        "near-duplicate of a seed": 1,
    }
    from tracetune.store import RunState

    state = RunState(run / "queries" / "state.sqlite")
    errors = sorted(
        i[2]["error"]
        for i in state.items("queries.filter")
        if i[2].get("reason") == "malformed query"
    )
    assert errors == [
        "missing key(s) query",
        "missing key(s) tools",
        "not an object",
        "unknown tool(s) teleport",
    ]
    generate = RunState(run / "candidates" / "state.sqlite").items("queries.generate")
    assert [i[2]["error"] for i in generate if i[1] == "dropped"][0].startswith(
        "expected a JSON list"
    )


def test_tool_and_topic_quotas(tmp_path: Path) -> None:
    plan: list[object] = [
        [
            _q("Count the red circles in the drawing.", ["visual_qa"]),
            _q("What does the street sign in the photo forbid?", ["ocr"]),
            _q("Which item on the cafe menu board costs the most?", ["ocr"]),
        ],
        [
            _q("What colour are the squares in this picture?", ["visual_qa"]),
            _q("Sum the prices on the menu board photo.", ["ocr", "calculator"]),
            _q("Is the astronaut in the portrait smiling?", ["visual_qa"]),  # visual_qa is full
        ],
    ]
    code, output, run = _queries(
        tmp_path, plan, "--embedder", "hashing", "--tool-quota", "2", "--topic-quota", "2"
    )
    assert code == 0, output
    kept = [
        t.query
        for t in sorted(
            Dataset.open(run / "queries", Task), key=lambda t: (t.metadata["batch"], t.id)
        )
    ]
    assert len(kept) == 4 and "Is the astronaut in the portrait smiling?" not in kept
    reasons = _stats(run)["queries.filter"]["drop_reasons"]
    assert reasons == {"topic quota reached": 1, "tool quota reached": 1}


def test_benchmark_readers(tmp_path: Path) -> None:
    assert benchmark_questions(GTA)[0] == (
        "How much do the two items on this receipt cost in total, in dollars?"
    )
    assert benchmark_questions(GAIA)[0] == "How many moons does the planet in the picture have?"
    assert benchmark_questions(GTA.parent) == benchmark_questions(GTA)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"question": "a?"}\n{"query": "b?"}\n')
    assert benchmark_questions(jsonl) == ["a?", "b?"]
    txt = tmp_path / "b.txt"
    txt.write_text("one?\n\ntwo?\n")
    assert benchmark_questions(txt) == ["one?", "two?"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no question here"}\n')
    with pytest.raises(ValueError, match="found no questions"):
        benchmark_questions(bad)


def test_extract_json() -> None:
    assert extract_json('Here: ```json\n[{"a": 1}]\n```', list) == [{"a": 1}]
    assert extract_json('Note [1] first, then [{"a": 2}] done', list) == [1]
    assert extract_json('thinking... {"correct": "yes"} ok', dict) == {"correct": "yes"}
    with pytest.raises(MalformedOutput, match="expected a JSON list"):
        extract_json('[{"query": "cut off', list)


def test_seed_file_errors_name_the_fix(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"query": "x", "tools": ["teleport"]}\n')
    result = CliRunner().invoke(
        app,
        [
            "synth",
            "queries",
            "--out",
            str(tmp_path / "run"),
            "--seeds",
            str(seeds),
            "--generator",
            "openai:test-model",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--quiet",
        ],
    )
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "not in the catalogue" in said and "teleport" in said
    result = CliRunner().invoke(
        app, ["synth", "queries", "--out", str(tmp_path / "r2"), "--seeds", str(seeds), "--quiet"]
    )
    assert result.exit_code == 2 and "needs a generator model" in " ".join(result.output.split())
    # A broken benchmark file is reported before any generator call (the endpoint is dead).
    write_seeds(seeds)
    bench = tmp_path / "bench.json"
    bench.write_text('[{"question": "cut off')
    result = CliRunner().invoke(
        app,
        [
            "synth",
            "queries",
            "--out",
            str(tmp_path / "r3"),
            "--seeds",
            str(seeds),
            "--generator",
            "openai:test-model",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--benchmark",
            str(bench),
            "--quiet",
        ],
    )
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"benchmark file {bench} is not valid JSON" in said
    assert not (tmp_path / "r3").exists()


def test_filter_interrupted_anywhere_and_resumed_keeps_the_same_queries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Near-duplicate and quota decisions depend on what was kept before: a filter run that
    crashes after any number of items and is rerun must keep exactly what one run keeps."""
    import asyncio
    import shutil

    from tracetune.store import RunState
    from tracetune.synth.mtrace import SynthConfig
    from tracetune.synth.mtrace import queries as queries_mod

    plan: list[object] = [
        [
            _q("Read the total on the receipt in the photo.", ["ocr"]),
            _q("Count the red circles in the drawing.", ["visual_qa"]),
            _q("Read the total on the receipt in this photo!", ["ocr"]),  # near-duplicate
        ],
        [
            _q("What does the street sign in the photo forbid?", ["ocr"]),
            _q("Count the red circles in this drawing.", ["visual_qa"]),  # near-duplicate
            _q("Which item on the cafe menu board costs the most?", ["ocr"]),  # ocr quota
        ],
        [
            _q("What colour are the squares in this picture?", ["visual_qa"]),
            _q("Is the astronaut in the portrait smiling?", ["visual_qa"]),  # visual_qa quota
        ],
    ]
    code, output, run = _queries(
        tmp_path / "ref", plan, "--embedder", "hashing", "--tool-quota", "2"
    )
    assert code == 0, output
    config = SynthConfig(
        out=run,
        embedder="hashing",
        queries={  # type: ignore[arg-type]
            "seeds": tmp_path / "ref" / "seeds.jsonl",
            "tools": ["ocr", "visual_qa", "inspect_file", "calculator", "face_detection"],
            "tool_quota": 2,
        },
    )

    def outcome(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
        kept = sorted(t.id for t in Dataset.open(root / "queries", Task))
        state = RunState(root / "queries" / "state.sqlite")
        drops = sorted(
            (k, str(i["reason"])) for k, s, i in state.items("queries.filter") if s == "dropped"
        )
        state.close()
        return kept, drops

    reference = outcome(run)
    assert len(reference[0]) == 4 and len(reference[1]) == 4
    real = queries_mod.QueryFilter.decide_one
    for crash_at in range(1, 9):
        trial = tmp_path / f"crash{crash_at}"
        trial.mkdir()
        shutil.copytree(run / "candidates", trial / "candidates")
        calls = {"n": 0}

        def crashing(*args: object, _at: int = crash_at, calls: dict[str, int] = calls) -> object:
            calls["n"] += 1
            if calls["n"] == _at:  # one decision per candidate, made as the run reaches it
                raise KeyboardInterrupt  # a crash: not an item failure the runner catches
            return real(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(queries_mod.QueryFilter, "decide_one", crashing)
        cfg = config.model_copy(update={"out": trial})
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(queries_mod.filter_queries(cfg, progress=False))
        kept_before, drops_before = outcome(trial)
        assert len(kept_before) + len(drops_before) == crash_at - 1  # a prefix was decided
        monkeypatch.setattr(queries_mod.QueryFilter, "decide_one", real)
        asyncio.run(queries_mod.filter_queries(cfg, progress=False))
        assert outcome(trial) == reference, crash_at


def test_seed_examples_that_are_benchmark_questions_are_refused(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    copied = {"query": benchmark_questions(GTA)[0].upper(), "tools": ["ocr"]}
    seeds.write_text("".join(json.dumps(s) + "\n" for s in [*SEEDS, copied]))
    args = [
        "synth",
        "queries",
        "--out",
        str(tmp_path / "run"),
        "--seeds",
        str(seeds),
        "--generator",
        "openai:test-model",
        "--base-url",
        "http://127.0.0.1:9/v1",  # nothing may be asked
        "--embedder",
        "hashing",
        "--benchmark",
        str(GTA),
        "--quiet",
    ]
    result = CliRunner().invoke(app, args)
    said = " ".join(result.output.split())
    assert result.exit_code == 2, said
    assert "1 seed example(s)" in said and "are benchmark questions: seed 4" in said
    assert str(GTA) in said and "--no-decontaminate" in said
    assert not (tmp_path / "run").exists()
