"""GTA in its upstream layouts: OpenCompass prediction files, the tools' signatures, and
per-category tool F1 where a category has no gold call.

Layouts written here from open-compass/GTA:

- ``opencompass/opencompass/datasets/gta_bench.py`` (``GTABenchDataset``, ``GTABenchEvaluator``):
  OpenCompass saves ``predictions/MODEL/gta_bench.json`` as ``{"0": {"origin_prompt",
  "prediction", "gold"}, ...}``, one row per ``dataset.json`` entry in file order; in the
  ``every`` (end-to-end) config the evaluator reads ``prediction[0]`` as the dialog, in
  ``every_with_gt`` (step) it zips ``prediction`` with the gold assistant turns. Tool calls are
  ``{"type": "function", "function": {"name", "arguments"}}``. The evaluator always returns
  ``p_f1``, ``o_f1``, ``l_f1`` and ``c_f1``.
- ``agentlego`` tools as GTA's ``dataset.json`` ``tools`` metadata lists them (name and
  ``inputs`` with ``optional``): ``CountGivenObject.apply(image, text, bbox=None)`` counts inside
  the crop when ``bbox`` is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.evaluate.embeddings import SentenceEmbedder
from tracetune.evaluate.gta import ScoringInputError, load_gta_predictions, score_gta
from tracetune.evaluate.gta_tools import GTA_TOOLS, GTACountGivenObject, gta_tool
from tracetune.tools import ToolContext, ToolResult

GTA = Path(__file__).parent / "fixtures" / "gta_small"

# Each GTA tool's inputs as GTA's tool metadata lists them: (required, optional).
UPSTREAM_INPUTS: dict[str, tuple[set[str], set[str]]] = {
    "OCR": ({"image"}, set()),
    "ImageDescription": ({"image"}, set()),
    "RegionAttributeDescription": ({"image", "bbox", "attribute"}, set()),
    "TextToBbox": ({"image", "text"}, {"top1"}),
    "DrawBox": ({"image", "bbox"}, {"annotation"}),
    "AddText": ({"image", "text", "position"}, {"color"}),
    "GoogleSearch": ({"query"}, {"k"}),
    "Calculator": ({"expression"}, set()),
    "Solver": ({"command"}, set()),
    "Plot": ({"command"}, set()),
    "MathOCR": ({"image"}, set()),
    "CountGivenObject": ({"image", "text"}, {"bbox"}),
    "TextToImage": ({"keywords"}, set()),
    "ImageStylization": ({"image", "instruction"}, set()),
}


class _TextHash:
    def encode(self, text: str, **_: Any) -> np.ndarray:
        seed = int.from_bytes(text.encode()[:64].ljust(64, b"\0"), "big") % 2**32
        return np.random.default_rng(seed).standard_normal(8)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _opencompass(tmp_path: Path, mode: str) -> Path:
    """The fixture's predictions rewritten as OpenCompass saves them."""
    gold = json.loads((GTA / "dataset.json").read_text())
    rows = {r["id"]: r for r in _jsonl(GTA / f"predictions_{mode}.jsonl")}
    out = {}
    for position, qid in enumerate(gold):
        if qid not in rows:
            continue
        gold_turns = [m for m in gold[qid]["dialogs"] if m["role"] == "assistant"]
        prompt = [m for m in gold[qid]["dialogs"] if m["role"] == "user"]
        if mode == "e2e":
            prediction: Any = [rows[qid]["dialog"]]
            gold_value: Any = [gold[qid]["dialogs"]]
        else:
            prediction, gold_value = rows[qid]["steps"], gold_turns
        out[str(position)] = {"origin_prompt": prompt, "prediction": prediction, "gold": gold_value}
    path = tmp_path / "gta_bench.json"
    path.write_text(json.dumps(out))
    return path


@pytest.mark.parametrize("mode", ["e2e", "step"])
def test_opencompass_prediction_file_scores_like_json_lines(tmp_path: Path, mode: str) -> None:
    embedder = SentenceEmbedder(_TextHash(), "text-hash", official=False)
    ours = score_gta(GTA, GTA / f"predictions_{mode}.jsonl", mode, embedder=embedder)  # type: ignore[arg-type]
    theirs = score_gta(GTA, _opencompass(tmp_path, mode), mode, embedder=embedder)  # type: ignore[arg-type]
    assert theirs.metrics == ours.metrics
    assert [i.scores for i in theirs.items] == [i.scores for i in ours.items]


def test_opencompass_file_through_the_cli_and_its_errors(tmp_path: Path) -> None:
    path = _opencompass(tmp_path, "step")
    result = CliRunner().invoke(
        app,
        ["eval", "score", "gta", "--gold", str(GTA), "--predictions", str(path), "--mode",
         "step", "--protocol", "mat"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mat_answer_acc" in json.loads(result.stdout)["metrics"]
    # a position that is not a row of dataset.json
    rows = json.loads(path.read_text())
    rows["99"] = rows["0"]
    path.write_text(json.dumps(rows))
    with pytest.raises(ScoringInputError, match=r"'99'.*rows 0\.\.5"):
        load_gta_predictions(path, "step", list(json.loads((GTA / "dataset.json").read_text())))
    # an e2e file read in step mode (prediction is [[messages]]) is named as such
    e2e = _opencompass(tmp_path, "e2e")
    with pytest.raises(ScoringInputError, match="every_with_gt = step"):
        load_gta_predictions(e2e, "step")


def test_categories_without_gold_calls_report_zero_f1_as_gta_does(tmp_path: Path) -> None:
    gold = json.loads((GTA / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps({"0": gold["0"]}))  # OCR + Calculator
    rows = json.loads(_opencompass(tmp_path, "e2e").read_text())
    (tmp_path / "p.json").write_text(json.dumps({"0": rows["0"]}))
    report = score_gta(tmp_path, tmp_path / "p.json", "e2e", embedder="packaged")
    assert {"p_f1", "o_f1", "l_f1", "c_f1"} <= set(report.metrics)
    assert report.metrics["o_f1"] == 0.0 and report.metrics["c_f1"] == 0.0
    assert report.details["categories_without_gold_calls"] == ["operation", "creativity"]


def test_every_gta_tool_takes_the_arguments_gta_shows() -> None:
    assert set(GTA_TOOLS) == set(UPSTREAM_INPUTS)
    for name, (required, optional) in UPSTREAM_INPUTS.items():
        tool = GTA_TOOLS[name]
        assert set(tool.parameters["properties"]) == required | optional, name
        assert set(tool.parameters["required"]) == required, name
        taken = tool.forward_arguments()
        assert taken is None or required | optional <= taken, name
        # as a query's metadata shows it (GTA's inputs with optional flags)
        meta = {
            "name": name,
            "inputs": [{"name": n, "type": "text"} for n in sorted(required)]
            + [{"name": n, "type": "text", "optional": True} for n in sorted(optional)],
        }
        gta_tool(name, meta)  # raises if the wrapper could not take one of them


def test_metadata_showing_an_argument_the_wrapper_cannot_take_fails_before_a_run() -> None:
    meta = {"name": "OCR", "inputs": [{"name": "image"}, {"name": "lang", "optional": True}]}
    with pytest.raises(ValueError, match="OCR.*lang"):
        gta_tool("OCR", meta)


def test_count_given_object_counts_inside_the_bbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (200, 100), "white").save(tmp_path / "shelf.png")
    asked: list[tuple[str, tuple[int, int]]] = []

    async def fake_use(
        self: Any, name: str, ctx: ToolContext, arguments: dict[str, Any]
    ) -> ToolResult:
        asked.append((arguments["image"], ctx.image(arguments["image"]).size))
        objects = [{"box": [1, 1, 5, 5], "score": 0.9}] * 2
        return ToolResult(text="", data={"objects": objects})

    monkeypatch.setattr(GTACountGivenObject, "use", fake_use)
    tool = GTA_TOOLS["CountGivenObject"]
    ctx = ToolContext(workdir=tmp_path)
    # GTA query 89's gold call shape: image, text and a bbox
    result = tool(ctx, image="shelf.png", text="bottle", bbox="(20, 10, 120, 60)")
    assert result.text == "2" and result.data["region"] == [20, 10, 120, 60]
    assert asked[-1][1] == (100, 50) and asked[-1][0] != "shelf.png"
    result = tool(ctx, image="shelf.png", text="bottle")
    assert result.text == "2" and asked[-1] == ("shelf.png", (200, 100))
