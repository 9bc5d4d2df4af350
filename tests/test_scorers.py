"""Benchmark scorers: every rule of the benchmarks' official scorers on hand-made cases, and
``tracetune eval score`` on small fixtures against metrics computed by hand."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from tracetune.cli import app
from tracetune.evaluate import (
    ScoringInputError,
    extract_answer,
    extract_choice,
    extract_final_answer,
    mat_correct,
    normalize_vqa_answer,
    objective_correct,
    question_scorer,
    score_gaia,
    score_gta,
    score_vqa,
    token_recall,
    vqa_accuracy,
)
from tracetune.evaluate.agentx import (
    AgentXScorer,
    JudgeReplyError,
    load_agentx_gold,
    load_agentx_predictions,
    parse_judge_reply,
    toolset_f1,
)
from tracetune.evaluate.embeddings import SentenceEmbedder, load_embedder
from tracetune.testing import ScriptedChatModel

FIXTURES = Path(__file__).parent / "fixtures"
GTA = FIXTURES / "gta_small"
GAIA = FIXTURES / "gaia_small"
runner = CliRunner()


def invoke(command: str) -> Result:
    return runner.invoke(app, ["eval", "score", *shlex.split(command)])


def cli_score(command: str) -> dict[str, Any]:
    result = invoke(command)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def gta(predictions: str | Path, options: str) -> str:
    """An ``eval score gta`` command line on the fixture's gold file."""
    return f"gta --gold {GTA / 'dataset.json'} --predictions {GTA / predictions} {options}"


def squash(text: str) -> str:
    """Text without whitespace: the CLI's error console wraps long lines."""
    return re.sub(r"\s+", "", text)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- GTA answer rules --------------------------------------------------------------------------
def test_gta_objective_needs_word_boundaries() -> None:
    gt = {"whitelist": [["4", "four"]], "blacklist": None}
    assert objective_correct("There are 4 apples.", gt)
    assert objective_correct("FOUR apples", gt)  # case-insensitive
    assert objective_correct("(4)", gt)
    assert not objective_correct("There are 14 apples.", gt)
    assert not objective_correct("4th row", gt)  # "4th": no boundary after 4
    assert not objective_correct("fourteen", gt)


def test_gta_objective_needs_every_whitelist_group_and_escapes_aliases() -> None:
    gt = {"whitelist": [["20", "twenty"], ["dollars", "usd"]], "blacklist": None}
    assert objective_correct("twenty dollars", gt)
    assert objective_correct("20 USD", gt)
    assert not objective_correct("20 euros", gt)  # second group missing
    dotted = {"whitelist": [["3.5"]], "blacklist": None}
    assert objective_correct("about 3.5 m", dotted)
    assert not objective_correct("about 3x5 m", dotted)  # the dot is literal


def test_gta_blacklist_rejects_an_answer_that_also_names_a_wrong_option() -> None:
    gt = {"whitelist": [["left"]], "blacklist": [["right"], ["middle", "center"]]}
    assert objective_correct("It is on the left.", gt)
    assert not objective_correct("left, not right", gt)
    assert not objective_correct("left of the center", gt)  # any blacklist group's alias
    assert objective_correct("left, not rightmost", gt)  # blacklist is word-bounded too
    assert not objective_correct("on the right", gt)


def test_mat_protocol_uses_substrings_and_ignores_the_blacklist() -> None:
    gt = {"whitelist": [["4", "four"]], "blacklist": [["14"]]}
    # The same answers score differently under the two protocols:
    assert mat_correct("There are 14 apples.", gt)
    assert not objective_correct("There are 14 apples.", gt)
    assert mat_correct("fourteen", gt)
    assert not objective_correct("fourteen", gt)
    assert not mat_correct("three", gt)
    two_groups = {"whitelist": [["20"], ["usd", "dollars"]], "blacklist": None}
    assert mat_correct("20USD", two_groups)
    assert not mat_correct("20 euros", two_groups)


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return load_embedder("auto")


def cosine(model: Any, a: str, b: str) -> float:
    """An independent cosine similarity (clipped at 0) with the same sentence model."""
    u, v = (np.asarray(model.encode(t), dtype=np.float64) for t in (a, b))
    return max(float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))), 0.0)


@pytest.mark.slow
def test_packaged_embedder_is_used_and_named_when_the_official_one_is_absent(
    embedder: SentenceEmbedder,
) -> None:
    # all-mpnet-base-v2 is not in this machine's cache, so "auto" falls back and says so.
    assert not embedder.official
    assert "MiniLM" in embedder.name and "all-mpnet-base-v2" in embedder.note
    assert embedder.similarity("a calm lake", "a calm lake") == pytest.approx(1.0, abs=1e-12)
    sim = embedder.similarity("a calm lake at sunset", "a quiet lake in the evening")
    assert 0.3 < sim < 1.0
    assert sim == pytest.approx(
        cosine(embedder.model, "a calm lake at sunset", "a quiet lake in the evening"), abs=1e-6
    )


# -- GTA fixture, by hand ------------------------------------------------------------------------
# tests/fixtures/gta_small/dataset.json: six queries (gold tool chain; P/O/L/C category).
#   0 objective, whitelist [[20, twenty], [dollars, usd]]: OCR(P), Calculator(L)
#   1 objective, whitelist [[left]], blacklist [[right]]: TextToBbox(P), RegionAttribute...(P)
#   2 objective, whitelist [[4, four]]: CountGivenObject(L)
#   3 subjective, two reference sentences: ImageDescription(P), GoogleSearch(O)
#   4 image generation, gt null: TextToBbox(P), DrawBox(O)
#   5 image generation, gt null: TextToImage(C), AddText(O)
# Each gold dialog ends with an assistant answer turn.
# Gold tool turns: 2+2+1+2+2+2 = 11; queries with a non-null answer: 4.


@pytest.mark.slow
def test_gta_step_official_on_fixture_matches_hand_computation(tmp_path: Path) -> None:
    # predictions_step.jsonl, turn by turn (kind ok & no error -> inst; name -> tool; args -> arg):
    #   0: OCR same args (inst tool arg) | Calculator "12.5 + 7.5" vs "12.5+7.5" (inst tool) |
    #      "The total is 20." (inst; group "dollars/usd" missing -> 0)
    #   1: TextToBbox same args but with an error (tool arg, no inst; 1 call, 1 error) |
    #      OCR for RegionAttributeDescription (inst) | "left, not the right" (inst; blacklist -> 0)
    #   2: an answer where a tool call is due (nothing) | "There are 14 apples." (inst; \b4\b -> 0)
    #   3: ImageDescription with an absolute path ending in the gold file (inst tool arg) |
    #      GoogleSearch with the keys reordered (inst tool arg) | the first reference verbatim
    #      (inst; similarity 1)
    #   4: TextToBbox same (inst tool arg) | DrawBox other annotation (inst tool) | answer (inst:
    #      counted in the numerator although gt is null, as GTA does)
    #   5: TextToImage same (inst tool arg) | AddText, arguments as JSON text, equal (inst tool
    #      arg) | a tool call where the answer is due (1 call, nothing else)
    # inst_align = (3+2+1+3+3+2) / (11+4) = 14/15; tool_acc = (2+1+0+2+2+2)/11 = 9/11;
    # arg_acc = (1+1+0+2+1+2)/11 = 7/11; answer_acc = (0+0+0+1)/4;
    # tool_call = 2+2+0+2+2+3 = 11; tool_call_error = 1
    records = tmp_path / "records.jsonl"
    out = tmp_path / "metrics.json"
    report = cli_score(
        gta(
            "predictions_step.jsonl",
            f"--mode step --protocol official --records {records} --out {out}",
        )
    )
    m = report["metrics"]
    assert report["benchmark"] == "gta/step/official"
    assert m["inst_align"] == pytest.approx(100 * 14 / 15, abs=1e-6)
    assert m["tool_acc"] == pytest.approx(100 * 9 / 11, abs=1e-6)
    assert m["arg_acc"] == pytest.approx(100 * 7 / 11, abs=1e-6)
    assert m["answer_acc"] == pytest.approx(100 * 1 / 4, abs=1e-6)
    assert m["tool_call"] == 11 and m["tool_call_error"] == 1
    assert isinstance(m["tool_call"], int)  # counts, not percentages
    assert report["details"]["inst_align_denominator"] == 15
    assert "MiniLM" in report["details"]["embedder"]["model"]
    assert json.loads(out.read_text()) == report

    lines = [json.loads(line) for line in records.read_text().splitlines()]
    by_id = {r["item_id"]: r["scores"] for r in lines}
    assert [r["benchmark"] for r in lines] == ["gta/step/official"] * 6
    assert {k: by_id[k]["inst_align"] for k in by_id} == {
        "0": 3,
        "1": 2,
        "2": 1,
        "3": 3,
        "4": 3,
        "5": 2,
    }
    assert {k: by_id[k]["arg_acc"] for k in by_id} == {
        "0": 1,
        "1": 1,
        "2": 0,
        "3": 2,
        "4": 1,
        "5": 2,
    }
    assert by_id["3"]["answer_acc"] == pytest.approx(1.0, abs=1e-9)
    assert by_id["4"]["answer_acc"] is None
    # The aggregate is traceable to the items.
    total = sum(s["inst_align"] for s in by_id.values())
    den = sum(s["gold_tool_steps"] + s["answer_counted"] for s in by_id.values())
    assert 100 * total / den == pytest.approx(m["inst_align"], abs=1e-9)


def test_gta_step_mat_on_fixture_matches_hand_computation() -> None:
    # Objective queries 0-2 only; final predicted answers:
    #   0 "The total is 20." -> no alias of [dollars, usd] is a substring -> 0
    #   1 "The cup is on the left, not the right." -> "left" is a substring (no blacklist) -> 1
    #   2 "There are 14 apples." -> "4" is a substring of "14" -> 1
    # mat_answer_acc = 2/3
    report = cli_score(gta("predictions_step.jsonl", "--mode step --protocol mat"))
    assert report["benchmark"] == "gta/step/mat"
    assert report["metrics"] == {"mat_answer_acc": pytest.approx(100 * 2 / 3, abs=1e-6)}
    assert report["n_items"] == 3 and report["details"]["queries_not_scored"] == 3
    assert "embedder" not in report["details"]  # no model needed for the substring rule


@pytest.mark.slow
def test_gta_e2e_official_on_fixture_matches_hand_computation(
    embedder: SentenceEmbedder,
) -> None:
    # predictions_e2e.jsonl, last message and calls per query:
    #   0 "The total is twenty dollars." -> 1;        calls OCR(P) Calculator(L)
    #   1 ends in a RegionAttributeDescription call -> 0;  calls TextToBbox(P) RAD(P)
    #   2 "I count 14 apples." -> 0 (\b4\b);          calls CountGivenObject(L) x2, one error
    #   3 "A quiet lake at dusk, a peaceful mood." -> s3 = max cos over the two references
    #                                                  calls ImageDescription(P) GoogleSearch(O)
    #   4 gt null, gold DrawBox never called -> 0;    calls TextToBbox(P)
    #   5 gt null: TextToImage args identical -> 1, AddText: the error call is skipped, the last
    #     good one differs -> s5 = cos(json(gold), json(pred)); score 1 * s5
    #                                                  calls TextToImage(C) AddText(O) x2, one error
    # answer_acc = (1+0+0+s3)/4; answer_acc_w_imggen = (1+0+0+s3+0+s5)/6
    # tool_call = 2+2+2+2+1+3 = 12; tool_call_error = 2
    # F1 per category, hits = gold calls whose name the query's predictions contain:
    #   P: gold 5 (OCR, TextToBbox, RAD, ImageDescription, TextToBbox), pred 5, hits 5
    #   O: gold 3 (GoogleSearch, DrawBox, AddText), pred 3, hits 2 (DrawBox missed)
    #   L: gold 2, pred 3, hits 2;  C: gold 1, pred 1, hits 1
    #   p = hits/(pred+1e-5), r = hits/gold, f1 = 2pr/(p+r+1e-5)  (GTA's epsilons)
    gold = json.loads((GTA / "dataset.json").read_text())
    s3 = max(
        cosine(embedder.model, "A quiet lake at dusk, a peaceful mood.", ref)
        for ref in gold["3"]["gt_answer"]
    )
    gold_addtext = gold["5"]["dialogs"][3]["tool_calls"][0]["function"]["arguments"]
    pred_addtext = {
        "image": "tmp/lighthouse.png",
        "text": "Night Watch",
        "position": "mb",
        "color": "yellow",
    }
    s5 = cosine(embedder.model, json.dumps(gold_addtext), json.dumps(pred_addtext))
    assert 0.0 < s3 < 1.0 and 0.0 < s5 < 1.0

    def f1(hits: int, pred: int, gold_n: int) -> float:
        p, r = hits / (pred + 1e-5), hits / gold_n
        return 100 * 2 * p * r / (p + r + 1e-5)

    report = cli_score(gta("predictions_e2e.jsonl", "--mode e2e"))
    m = report["metrics"]
    assert report["benchmark"] == "gta/e2e/official"  # protocol defaults to official
    assert m["answer_acc"] == pytest.approx(100 * (1 + s3) / 4, abs=1e-6)
    assert m["answer_acc_w_imggen"] == pytest.approx(100 * (1 + s3 + s5) / 6, abs=1e-6)
    assert m["tool_call"] == 12 and m["tool_call_error"] == 2
    assert m["p_f1"] == pytest.approx(f1(5, 5, 5), abs=1e-6)
    assert m["o_f1"] == pytest.approx(f1(2, 3, 3), abs=1e-6)
    assert m["l_f1"] == pytest.approx(f1(2, 3, 2), abs=1e-6)
    assert m["c_f1"] == pytest.approx(f1(1, 1, 1), abs=1e-6)
    assert m["o_precision"] == pytest.approx(100 * 2 / (3 + 1e-5), abs=1e-6)
    assert m["l_recall"] == pytest.approx(100.0, abs=1e-9)


def test_gta_e2e_mat_on_fixture_matches_hand_computation(tmp_path: Path) -> None:
    # 0 "twenty dollars" -> 1; 1 no final answer -> 0; 2 "14 apples" -> "4" substring -> 1
    records = tmp_path / "mat.jsonl"
    report = cli_score(
        gta(
            "predictions_e2e.jsonl",
            f"--mode e2e --protocol mat --records {records} --model scripted",
        )
    )
    assert report["metrics"] == {"mat_answer_acc": pytest.approx(100 * 2 / 3, abs=1e-6)}
    rows = {r["item_id"]: r for r in map(json.loads, records.read_text().splitlines())}
    assert {k: r["scores"]["mat_answer_acc"] for k, r in rows.items()} == {
        "0": 1.0,
        "1": 0.0,
        "2": 1.0,
    }
    assert rows["1"]["prediction"] is None and rows["0"]["model"] == "scripted"
    assert rows["0"]["benchmark"] == "gta/e2e/mat"


def test_gta_missing_prediction_counts_as_wrong_and_is_listed(tmp_path: Path) -> None:
    preds = [json.loads(line) for line in (GTA / "predictions_step.jsonl").read_text().splitlines()]
    path = write_jsonl(tmp_path / "p.jsonl", [p for p in preds if p["id"] in ("1", "2")])
    report = score_gta(GTA, path, "step", "mat")
    assert report.details["missing_predictions"] == ["0", "3", "4", "5"]
    assert report.metrics["mat_answer_acc"] == pytest.approx(100 * 2 / 3)
    # 1: inst 2, 2: inst 1; every gold tool turn stays in the denominator.
    no_text = write_jsonl(tmp_path / "q.jsonl", [p for p in preds if p["id"] in ("1", "2")])
    step = score_gta(GTA, no_text, "step", "official", embedder="packaged")
    assert step.metrics["inst_align"] == pytest.approx(100 * 3 / 15)
    assert step.metrics["tool_acc"] == pytest.approx(100 * 1 / 11)
    assert step.items[0].scores["missing_steps"] == 3


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "0", "dialog": []}], "predictions_bad.jsonl:1: missing key 'steps'"),
        ([{"steps": []}], "predictions_bad.jsonl:1: missing key 'id'"),
        ([{"id": "99", "steps": []}], "id '99' is not a query of the gold file"),
        ([{"id": "2", "steps": [{}, {}, {}]}], "3 predicted steps but its gold dialog has 2"),
        ([{"id": "2", "steps": []}, {"id": "2", "steps": []}], ":2: query id '2' appears twice"),
    ],
)
def test_gta_bad_prediction_files_get_errors_naming_file_line_and_key(
    tmp_path: Path, rows: list[dict[str, Any]], message: str
) -> None:
    path = write_jsonl(tmp_path / "predictions_bad.jsonl", rows)
    result = invoke(gta(path, "--mode step --protocol mat"))
    assert result.exit_code == 2
    assert squash(message) in squash(result.output), result.output


def test_gta_bad_gold_and_missing_mode_are_reported(tmp_path: Path) -> None:
    gold = tmp_path / "dataset.json"
    gold.write_text(json.dumps({"0": {"dialogs": [], "gt_answer": {"blacklist": None}}}))
    result = invoke(f"gta --gold {gold} --predictions {GTA / 'predictions_step.jsonl'} --mode step")
    assert result.exit_code == 2 and squash("missing key 'whitelist'") in squash(result.output)
    result = invoke(gta("predictions_step.jsonl", ""))
    assert result.exit_code == 2 and "--mode step" in result.output
    result = invoke("gaia --gold x --predictions y --mode step")
    assert result.exit_code == 2 and "gta only" in result.output
    # GAIA's JSON lines given as GTA's gold: the error says what the file looks like
    result = invoke(
        f"gta --gold {GAIA / 'metadata.jsonl'} --predictions "
        f"{GTA / 'predictions_step.jsonl'} --mode step"
    )
    assert result.exit_code == 2 and squash("looks like JSON lines") in squash(result.output)


def test_gta_null_error_is_no_error_and_empty_tool_calls_is_an_answer(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {
                "id": "2",
                "steps": [
                    {
                        "role": "assistant",
                        "error": None,
                        "tool_calls": [
                            {
                                "name": "CountGivenObject",
                                "arguments": '{"image": "image/apples.png", "text": "apple"}',
                            }
                        ],
                    },
                    {"role": "assistant", "tool_calls": [], "content": "There are four apples."},
                ],
            }
        ],
    )
    item = score_gta(GTA, path, "step", "official", embedder="packaged").items[2]
    assert item.id == "2"
    assert item.scores["inst_align"] == 2 and item.scores["arg_acc"] == 1
    assert item.scores["answer_acc"] == 1.0


def test_gta_e2e_category_without_gold_calls_reports_zero_f1(tmp_path: Path) -> None:
    # Only query 0 (OCR: perception, Calculator: logic): operation and creativity have no
    # gold calls; GTA's evaluator still reports o_f1/c_f1 (0: no hit), and details say why.
    gold = json.loads((GTA / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({"0": gold["0"]}))
    rows = [json.loads(x) for x in (GTA / "predictions_e2e.jsonl").read_text().splitlines()]
    path = write_jsonl(tmp_path / "p.jsonl", [r for r in rows if r["id"] == "0"])
    report = score_gta(tmp_path, path, "e2e")
    p = 1 / (1 + 1e-5)  # OCR: one predicted perception call, one gold, one hit
    assert report.metrics["p_f1"] == pytest.approx(100 * 2 * p / (p + 1 + 1e-5), abs=1e-6)
    assert report.metrics["o_f1"] == 0.0 and report.metrics["c_f1"] == 0.0
    assert report.metrics["o_recall"] == 0.0 and report.metrics["c_precision"] == 0.0
    assert report.details["categories_without_gold_calls"] == ["operation", "creativity"]


class _TextHash:
    """A stand-in sentence model: one fixed random vector per distinct text."""

    def encode(self, text: str, **_: Any) -> np.ndarray:
        seed = int.from_bytes(text.encode()[:64].ljust(64, b"\0"), "big") % 2**32
        return np.random.default_rng(seed).standard_normal(8)


def test_gta_image_generation_equal_arguments_in_another_key_order_score_one(
    tmp_path: Path,
) -> None:
    # Query 4's gold DrawBox call, its arguments written in another key order (stored
    # trajectories keep arguments with sorted keys): the same call, so similarity 1.
    gold = json.loads((GTA / "dataset.json").read_text())
    args = gold["4"]["dialogs"][3]["tool_calls"][0]["function"]["arguments"]
    reordered = dict(reversed(list(args.items())))
    assert list(reordered) != list(args)
    call = {"type": "function", "function": {"name": "DrawBox", "arguments": reordered}}
    dialog = [
        {"role": "user", "content": "Draw a box around the red car."},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "name": "DrawBox", "content": {"type": "image", "content": "x.png"}},
        {"role": "assistant", "content": "Done."},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "4", "dialog": dialog}])
    embedder = SentenceEmbedder(_TextHash(), "text-hash", official=False)
    item = next(i for i in score_gta(GTA, path, "e2e", embedder=embedder).items if i.id == "4")
    assert item.scores["answer_acc_w_imggen"] == pytest.approx(1.0, abs=1e-12)


# -- GAIA ------------------------------------------------------------------------------------------
def test_gaia_numbers_are_compared_as_floats_without_units() -> None:
    assert question_scorer("17", "17")
    assert question_scorer("17.0", "17")
    assert question_scorer("$1,250", "1250")
    assert question_scorer("12%", "12")
    assert not question_scorer("12 km", "12")  # a unit makes it unparseable: wrong
    assert not question_scorer("twelve", "12")
    assert not question_scorer("12.0001", "12")  # no tolerance
    assert not question_scorer("inf", "12")
    assert not question_scorer("nonsense", "inf")  # unparseable is wrong, even for gold "inf"


def test_gaia_lists_need_equal_length_and_keep_punctuation() -> None:
    assert question_scorer("Apple,banana;cherry", "apple, banana; cherry")
    assert question_scorer("apple; banana; cherry", "apple, banana, cherry")
    assert not question_scorer("apple, banana", "apple, banana, cherry")
    assert not question_scorer("apple, banana, cherry, date", "apple, banana, cherry")
    assert question_scorer("St. Louis, Paris", "St. Louis, Paris")
    assert not question_scorer("St Louis, Paris", "St. Louis, Paris")  # "." kept in lists
    assert question_scorer("1, $2, 3.0", "1, 2, 3")  # numeric elements as floats
    assert not question_scorer("1, 2 kg, 3", "1, 2, 3")
    assert not question_scorer("b, a", "a, b")  # order matters


def test_gaia_strings_ignore_whitespace_case_and_punctuation() -> None:
    assert question_scorer("saint exupery", "Saint-Exupery")
    assert question_scorer("sea gull", "Seagull")
    assert question_scorer("Right.", "right")
    assert not question_scorer("left", "right")


def test_gaia_missing_answer_is_none_and_final_answer_is_extracted() -> None:
    assert question_scorer(None, "None")  # a missing answer is the string "None"
    assert not question_scorer(None, "3")
    assert extract_final_answer("Thinking... FINAL ANSWER: 42") == "42"
    assert extract_final_answer("final answer: a\nmore\nFINAL ANSWER:  b ") == "b"
    assert extract_final_answer("just 42") == "just 42"
    assert extract_final_answer(None) is None


def test_gaia_fixture_by_level(tmp_path: Path) -> None:
    # t1 L1 "...FINAL ANSWER: 17" vs 17 -> 1     t2 L1 "12 km" vs 12 -> 0
    # t3 L2 "$1,250" vs 1250 -> 1                t4 L2 "Apple,banana;cherry" -> 1
    # t5 L2 "St Louis, Paris" vs "St. Louis, Paris" -> 0 (punctuation kept in list elements)
    # t6 L3 "saint exupery" vs "Saint-Exupery" -> 1;  t7 L3 no prediction -> "None" vs 3 -> 0
    # level 1: 1/2, level 2: 2/3, level 3: 1/2, overall 4/7
    records = tmp_path / "gaia.jsonl"
    report = cli_score(
        f"gaia --gold {GAIA / 'metadata.jsonl'} --predictions {GAIA / 'predictions.jsonl'}"
        f" --records {records}"
    )
    assert report["metrics"] == {
        "accuracy": pytest.approx(100 * 4 / 7, abs=1e-6),
        "level_1": pytest.approx(50.0, abs=1e-6),
        "level_2": pytest.approx(100 * 2 / 3, abs=1e-6),
        "level_3": pytest.approx(50.0, abs=1e-6),
    }
    assert report["details"]["missing_predictions"] == ["t7"]
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert rows[0]["prediction"] == "17" and rows[0]["scores"] == {"accuracy": 1.0}
    # Without extraction the free-text answer of t1 is wrong.
    raw = score_gaia(GAIA / "metadata.jsonl", GAIA / "predictions.jsonl", extract=False)
    assert raw.items[0].scores["accuracy"] == 0.0


def test_gaia_bad_files_name_the_line_and_key(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "sub.jsonl", [{"task_id": "t1", "answer": "17"}])
    with pytest.raises(ScoringInputError, match=r"sub\.jsonl:1: missing key 'model_answer'"):
        score_gaia(GAIA / "metadata.jsonl", preds)
    good = write_jsonl(tmp_path / "good.jsonl", [{"task_id": "t1", "model_answer": "17"}])
    gold = write_jsonl(tmp_path / "meta.jsonl", [{"task_id": "t1", "Level": 1}])
    with pytest.raises(ScoringInputError, match=r"meta\.jsonl:1: missing key 'Final answer'"):
        score_gaia(gold, good)
    with pytest.raises(ScoringInputError, match=r"predictions\.jsonl:2: task_id 't2' is not"):
        score_gaia(gold, GAIA / "predictions.jsonl")


# -- Dyn-VQA ---------------------------------------------------------------------------------------
def test_dynvqa_token_recall_normalizes_numbers_articles_and_punctuation() -> None:
    for rule in ("official", "symmetric"):
        assert token_recall("There are three dogs.", ["3 dogs"], rule) == 1.0
        assert token_recall("the Eiffel Tower!", ["Eiffel Tower"], rule) == 1.0
        assert token_recall("Paris", ["Paris, France"], rule) == pytest.approx(0.5)
        # Multiset overlap: gold "new new york" has "new" twice; one "new" in the answer.
        assert token_recall("new york", ["new new york"], rule) == pytest.approx(2 / 3)
        # Max over aliases; a long answer with all gold tokens scores 1 (it is recall).
        assert token_recall("It was Joe Biden, elected in 2020", ["Biden", "Obama"], rule) == 1.0
        assert token_recall("nothing relevant", ["Biden"], rule) == 0.0
    # Order-free; the gold's article counts under the official rule (gold is not normalized).
    assert token_recall("A red, big car", ["the big red car"], "symmetric") == 1.0
    assert token_recall("A red, big car", ["the big red car"]) == pytest.approx(3 / 4)


def test_dynvqa_scores_a_file(tmp_path: Path) -> None:
    gold = write_jsonl(
        tmp_path / "dyn.jsonl",
        [
            {"question_id": 1, "question": "Who?", "answer": ["Joe Biden", "Biden"]},
            {"question_id": 2, "question": "How many?", "answer": ["two moons"]},
            {"question_id": 3, "question": "Where?", "answer": ["Paris, France"]},
        ],
    )
    preds = write_jsonl(
        tmp_path / "pred.jsonl",
        [
            {
                "question_id": 1,
                "prediction": "<THOUGHT>x</THOUGHT><ANSWER>The answer is: Biden</ANSWER>",
            },
            {"question_id": 2, "prediction": "It has 2 moons."},
            {"question_id": 3, "prediction": "France"},
        ],
    )
    # Official rule (the default): 1: best alias "Biden" -> 1; 2: gold "two moons" is not
    # normalized, so the predicted "2" misses "two" -> 1/2; 3: "paris , france" (comma
    # dropped) vs "france" -> 1/2. Mean 2/3.
    report = cli_score(f"dynvqa --gold {gold} --predictions {preds}")
    assert report["metrics"]["token_recall"] == pytest.approx(100 * 2 / 3, abs=1e-6)
    assert report["details"]["rule"] == "official"
    # Symmetric (labelled lenient): "two moons" -> {2, moons} both present -> 1. Mean 2.5/3.
    report = cli_score(f"dynvqa --gold {gold} --predictions {preds} --rule symmetric")
    assert report["metrics"]["token_recall"] == pytest.approx(100 * 2.5 / 3, abs=1e-6)


# -- VQA and multiple choice ----------------------------------------------------------------------
def test_vqa_normalization() -> None:
    assert normalize_vqa_answer("Two dogs.") == "2 dogs"
    assert normalize_vqa_answer("The red/blue car") == "red blue car"
    assert normalize_vqa_answer("1,000") == "1000"
    assert normalize_vqa_answer("3.5") == "3.5"
    assert normalize_vqa_answer("dont know") == "don't know"
    assert normalize_vqa_answer("  an Apple!\n") == "apple"


def test_vqa_accuracy_consensus_and_exact_match() -> None:
    ten = ["2"] * 3 + ["3"] * 7
    # Leave-one-out over the ten answers: 3 subsets keep 2 matches (2/3), 7 keep 3 (1).
    assert vqa_accuracy("two", ten) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("3", ten) == pytest.approx(1.0)
    assert vqa_accuracy("4", ten) == 0.0
    assert vqa_accuracy("The cat.", ["cat", "kitten"]) == 1.0
    assert vqa_accuracy("a black cat", ["cat"]) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(b)", "B"),
        ("B. Paris", "B"),
        ("(C) Rome is the answer", "C"),
        ("Answer: B", "B"),
        ("The answer is: C", "C"),
        ("The correct answer is (A).", "A"),
        ("I pick option D because it fits.", "D"),
        ("<THOUGHT>Paris is in France.</THOUGHT>\n<ANSWER>The answer is: B</ANSWER>", "B"),
        ("<THOUGHT>looked it up</THOUGHT><ANSWER>The answer is: Paris</ANSWER>", "B"),
        ("A city called Rome", "C"),  # leading "A" is an article, the option text decides
        ("Paris or Rome", None),  # two options named: no answer
        ("I do not know", None),
    ],
)
def test_multiple_choice_extraction(text: str, expected: str | None) -> None:
    options = ["London", "Paris", "Rome", "Berlin"]
    assert extract_choice(text, options) == expected


def test_extract_answer_formats() -> None:
    assert extract_answer("<ANSWER>The answer is: 42</ANSWER>") == "42"
    assert extract_answer("blah\nAnswer: yes") == "yes"
    assert extract_answer("plain") == "plain"


def test_vqa_scores_a_file(tmp_path: Path) -> None:
    gold = write_jsonl(
        tmp_path / "g.jsonl",
        [
            {"id": "o1", "answers": ["2"] * 3 + ["3"] * 7},
            {"id": "o2", "answer": "cat"},
            {"id": "m1", "options": {"A": "dog", "B": "cat"}, "answer": "B"},
            {"id": "m2", "choices": ["dog", "cat"], "answer": "A"},
        ],
    )
    preds = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "o1", "prediction": "<ANSWER>The answer is: two</ANSWER>"},
            {"id": "o2", "prediction": "The answer is: a cat."},
            {"id": "m1", "prediction": "Answer: B"},
            {"id": "m2", "prediction": "The answer is (B)"},
        ],
    )
    # o1: 0.9 (see the consensus test); o2: 1; m1: 1; m2: 0.
    report = score_vqa(gold, preds)
    assert report.metrics["vqa_accuracy"] == pytest.approx(100 * 1.9 / 2)
    assert report.metrics["mc_accuracy"] == pytest.approx(50.0)
    assert report.metrics["accuracy"] == pytest.approx(100 * 2.9 / 4)
    bad = write_jsonl(tmp_path / "b.jsonl", [{"id": "m1", "options": ["x"], "answer": "C"}])
    one = write_jsonl(tmp_path / "one.jsonl", [{"id": "m1", "prediction": "A"}])
    with pytest.raises(ScoringInputError, match=r"b\.jsonl:1: answer 'C' is not one of"):
        score_vqa(bad, one)
    no_answer = write_jsonl(tmp_path / "n.jsonl", [{"id": "m1", "pred": "A"}])
    with pytest.raises(ScoringInputError, match=r"n\.jsonl:1: missing key 'prediction'"):
        score_vqa(gold, no_answer)


# -- Agent-X -------------------------------------------------------------------------------------
def agentx_gold(tmp_path: Path) -> Path:
    step = lambda i, tool: {  # noqa: E731
        "step": i,
        "task": f"task {i}",
        "tool": tool,
        "input": "x",
        "output": "y",
        "thought": "t",
    }
    data = {
        "q1": [
            {
                "query": "How many cars?",
                "query_type": "objective",
                "tool_metadata": {"ObjectCounter": {"description": "counts"}},
                "reasoning_steps": [step(1, "SceneDescriber"), step(2, "ObjectCounter")],
                "final_answer": {"value": "3 cars", "justification": "counted"},
            }
        ],
        "q2": [
            {
                "query": "Describe the mood.",
                "query_type": "subjective",
                "tool_metadata": {},
                "reasoning_steps": [step(1, "SceneDescriber")],
                "final_answer": {"value": "calm", "justification": ""},
            }
        ],
        "q3": [
            {
                "query": "Draw a box on the dog.",
                "query_type": "objective",
                "generative": True,
                "tool_metadata": {},
                "reasoning_steps": [step(1, "LocateObjectByText"), step(2, "DrawBoundingBox")],
                "final_answer": {"value": "", "justification": ""},
            }
        ],
        "q4": [
            {
                "query": "Read the sign.",
                "query_type": "objective",
                "tool_metadata": {},
                "reasoning_steps": [step(1, "OCR")],
                "final_answer": {"value": "STOP", "justification": ""},
            }
        ],
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return path


def agentx_predictions(tmp_path: Path) -> Path:
    step = lambda i, tool: {"step": i, "task": "t", "tool": tool, "output": "o"}  # noqa: E731
    return write_jsonl(
        tmp_path / "pred.jsonl",
        [
            # one step missing, first tool wrong
            {
                "id": "q1",
                "reasoning_steps": [step(1, "OCR")],
                "final_answer": {"value": "three cars"},
            },
            # one extra step
            {
                "id": "q2",
                "reasoning_steps": [step(1, "SceneDescriber"), step(2, "WebSearch")],
                "final_answer": "peaceful and calm",
            },
            {
                "id": "q3",
                "reasoning_steps": [step(1, "LocateObjectByText"), step(2, "DrawBoundingBox")],
                "final_answer": "done",
            },
            {"id": "q4", "reasoning_steps": [step(1, "OCR")], "final_answer": "Stop."},
        ],
    )


def judge_responder(replies: dict[str, list[str | float]]) -> Any:
    """A scripted judge: replies by metric (read from the prompt), consumed in order (the last
    one repeats). A number becomes a valid reply: that score, or that score for each of the
    steps the prompt asks about; a string is sent as is."""

    def respond(messages: list[dict[str, Any]]) -> str:
        prompt = messages[1]["content"]
        found = re.search(r"What to grade: ([a-z ]+)", prompt)
        assert found is not None
        queue = replies[found.group(1).strip()]
        reply = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(reply, str):
            return reply
        steps = re.search(r"exactly (\d+) numbers", prompt)
        if steps:
            return json.dumps({"step_scores": [reply] * int(steps.group(1))})
        return json.dumps({"score": reply, "justification": "scripted"})

    return respond


def test_agentx_judge_reply_parsing() -> None:
    assert parse_judge_reply('{"score": 0.5, "justification": "ok"}') == (0.5, "ok")
    assert parse_judge_reply("```json\n{'Score': '1', 'Justification': 'x'}\n```") == (1.0, "x")
    assert parse_judge_reply('{"step_scores": [1, 0.5]}', n_steps=2) == ([1.0, 0.5], "")
    for bad, kwargs in [
        ("no json here", {}),
        ('{"score": 1.5}', {}),
        ('{"score": 0.5}', {"binary": True}),
        ('{"step_scores": [1]}', {"n_steps": 2}),
        ('{"verdict": 1}', {}),
    ]:
        with pytest.raises(JudgeReplyError):
            parse_judge_reply(bad, **kwargs)
    assert toolset_f1({"a", "b"}, {"b", "c"}) == pytest.approx(0.5)
    assert toolset_f1(set(), set()) is None


def test_agentx_scores_with_a_scripted_judge(tmp_path: Path) -> None:
    judge = ScriptedChatModel(
        judge_responder(
            {
                "grounding": [1.0],
                "use of context": [0.5],
                "tool accuracy": [1.0],
                "faithfulness of the plan": [0.8],
                "factual precision": [1.0],
                "semantic accuracy": [0.6],
                "goal accuracy": [1.0],
            }
        )
    )
    scorer = AgentXScorer(judge, max_retries=1)
    report = scorer.score(
        load_agentx_gold(agentx_gold(tmp_path)),
        load_agentx_predictions(agentx_predictions(tmp_path)),
    )
    items = {i.id: i.scores for i in report.items}
    # q1: gold [SceneDescriber, ObjectCounter], pred [OCR]: one pair, one missing step.
    #   tool_precision 0/2; grounding 1/2; context 0.5/2; tool_accuracy 1/1; toolset F1 0
    assert items["q1"]["tool_precision"] == 0.0
    assert items["q1"]["grounding"] == pytest.approx(0.5)
    assert items["q1"]["context"] == pytest.approx(0.25)
    assert items["q1"]["tool_accuracy"] == 1.0 and items["q1"]["toolset_accuracy"] == 0.0
    assert items["q1"]["goal_accuracy"] == 1.0  # judged equivalent ("three cars" vs "3 cars")
    # q2: one extra step; toolset {SceneDescriber} vs {SceneDescriber, WebSearch}: F1 2/3
    assert items["q2"]["tool_precision"] == pytest.approx(0.5)
    assert items["q2"]["grounding"] == pytest.approx(0.5)
    assert items["q2"]["toolset_accuracy"] == pytest.approx(2 / 3)
    # q3 generative: no goal accuracy; G*a = mean(tool_precision 1, tool_accuracy 1, toolset 1)
    assert items["q3"]["goal_accuracy"] is None
    assert items["q3"]["goal_accuracy_generative"] == pytest.approx(1.0)
    # q4: "Stop." equals "STOP" after normalization: goal 1 without asking the judge.
    assert items["q4"]["goal_accuracy"] == 1.0
    prompts = [c["messages"][1]["content"] for c in judge.calls]
    assert not any("Read the sign." in p and "goal accuracy" in p for p in prompts)
    assert report.metrics["tool_precision"] == pytest.approx((0 + 0.5 + 1 + 1) / 4)
    assert report.metrics["goal_accuracy"] == pytest.approx(1.0)
    assert report.details["items_per_metric"]["goal_accuracy"] == 3
    assert report.details["judge_fallbacks"] == 0
    assert set(report.details["prompt_hashes"]) >= {"grounding", "goal_accuracy"}
    # 6 judged metrics per non-generative item (goal judged only for q1 and q2) and 6 for q3
    assert len(judge.calls) == 4 * 6 + 2


def test_agentx_retries_malformed_replies_then_falls_back(tmp_path: Path) -> None:
    replies = {
        "grounding": ["not json", 1.0],  # repaired on the 2nd try
        "use of context": ["nope"],  # never valid: falls back to 0
        "tool accuracy": [1.0],
        "faithfulness of the plan": [1.0],
        "factual precision": [1.0],
        "semantic accuracy": [1.0],
        "goal accuracy": [0.0],
    }
    judge = ScriptedChatModel(judge_responder(replies))
    gold = load_agentx_gold(agentx_gold(tmp_path))
    preds = load_agentx_predictions(agentx_predictions(tmp_path))
    report = AgentXScorer(judge, max_retries=2).score({"q4": gold["q4"]}, {"q4": preds["q4"]})
    item = report.items[0]
    assert item.scores["grounding"] == 1.0
    assert item.scores["context"] == 0.0
    assert item.details["judge_fallbacks"] == [
        {"metric": "context", "error": "no JSON object found in the reply", "attempts": 3}
    ]
    assert item.details["judge_attempts"] == {"grounding": 2, "context": 3}
    assert report.details["judge_fallbacks"] == 1
    # The retry showed the judge its bad reply and what was wrong with it.
    retry = next(c["messages"] for c in judge.calls if len(c["messages"]) == 4)
    assert retry[2] == {"role": "assistant", "content": "not json"}
    assert "no JSON object" in retry[3]["content"]


def test_agentx_missing_prediction_scores_zero_without_the_judge(tmp_path: Path) -> None:
    judge = ScriptedChatModel([])
    gold = load_agentx_gold(agentx_gold(tmp_path))
    report = AgentXScorer(judge).score({"q1": gold["q1"]}, {})
    scores = report.items[0].scores
    assert scores["grounding"] == 0.0 and scores["goal_accuracy"] == 0.0
    assert scores["toolset_accuracy"] == 0.0 and judge.calls == []
    assert report.details["missing_predictions"] == ["q1"]


def test_agentx_cli_without_a_judge_computes_the_judge_free_metrics(tmp_path: Path) -> None:
    gold, preds = agentx_gold(tmp_path), agentx_predictions(tmp_path)
    result = invoke(f"agentx --gold {gold} --predictions {preds}")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["metrics"]) == {"tool_precision", "toolset_accuracy"}
    assert report["details"]["judged"] is False and "--judge" in report["details"]["note"]
