"""Dyn-VQA scored by the official rule, on rows in the upstream layout.

Gold rows follow OmniSearch's ``dataset/DynVQA_en.jsonl`` / ``DynVQA_zh.jsonl``
(Alibaba-NLP/OmniSearch): ``{image_url, question, question_id, answer: [alias, ...],
golden_query}``. Predictions are the lines OmniSearch's runner writes (the same row plus
``prediction``). The official evaluation script (run as ``--evaluate_file_path F --lang
en|zh``, printing "Token F1-Recall") normalizes only ``prediction`` (punctuation, number words,
articles, contractions), tokenizes both sides with NLTK ``word_tokenize`` (en) or
``jieba.cut`` (zh), and averages the max over aliases of the multiset token recall.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.evaluate.dynvqa import normalize_prediction, score_dynvqa, token_recall

runner = CliRunner()


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


# Five English rows where the two rules disagree: golds keep their articles and number words.
EN = [
    ("The Eiffel Tower.", ["Eiffel Tower"]),  # both: 1
    ("two", ["two"]),  # official: prediction becomes "2", gold stays "two" -> 0
    ("the Beatles", ["The Beatles"]),  # official: gold keeps "the" -> 1/2
    ("Paris", ["Paris, France"]),  # both: 1/2
    ("I do not know", ["Joe Biden"]),  # both: 0
]


def _dataset(tmp_path: Path, pairs: list[tuple[str, list[str]]]) -> tuple[Path, Path]:
    gold, preds = [], []
    for i, (prediction, answer) in enumerate(pairs):
        row = {
            "image_url": f"https://example.org/{i}.jpg",
            "question": "Which one is it?",
            "question_id": f"q{i}",
            "answer": answer,
            "golden_query": "some query",
        }
        gold.append(row)
        preds.append({**row, "prediction": prediction})
    return _rows(tmp_path / "DynVQA_en.jsonl", gold), _rows(tmp_path / "output.jsonl", preds)


def test_official_rule_is_the_default_and_differs_from_the_symmetric_one(
    tmp_path: Path,
) -> None:
    gold, preds = _dataset(tmp_path, EN)
    official = score_dynvqa(gold, preds)
    assert official.details["rule"] == "official" and official.details["lang"] == "en"
    assert "OmniSearch" in official.details["rule_description"]
    assert official.metrics["token_recall"] == pytest.approx(100 * (1 + 0 + 0.5 + 0.5 + 0) / 5)
    symmetric = score_dynvqa(gold, preds, rule="symmetric")
    assert symmetric.metrics["token_recall"] == pytest.approx(100 * (1 + 1 + 1 + 0.5 + 0) / 5)
    assert "not comparable" in symmetric.details["rule_description"]

    result = runner.invoke(
        app, ["eval", "score", "dynvqa", *shlex.split(f"--gold {gold} --predictions {preds}")]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["token_recall"] == pytest.approx(40.0)


def test_official_prediction_normalization() -> None:
    assert normalize_prediction("The answer: Three dogs!\n") == "answer: 3 dogs"
    assert normalize_prediction("It costs 1,000.50 dollars.") == "it costs 1000.50 dollars"
    assert normalize_prediction("dont know") == "don't know"
    # The script's re.sub gets re.UNICODE (32) as its count: the 33rd period survives.
    assert normalize_prediction("a." * 33).count(".") == 1
    # NLTK splits the contraction; "n't" must be in the gold too to count.
    assert token_recall("dont", ["do not"]) == pytest.approx(0.5)
    assert token_recall("", ["anything"]) == 0.0


def test_zh_split_is_tokenized_with_jieba(tmp_path: Path) -> None:
    pairs = [
        ("答案是北京。", ["北京"]),  # jieba: 答案 / 是 / 北京 -> recall 1
        ("上海", ["北京市"]),  # no overlap
        ("中国的首都是北京", ["北京是中国的首都"]),  # same jieba words, other order
    ]
    gold, preds = _dataset(tmp_path, pairs)
    report = score_dynvqa(gold, preds)  # auto-detects zh from the aliases
    assert report.details["lang"] == "zh"
    scores = [item.scores["token_recall"] for item in report.items]
    assert scores == [1.0, 0.0, 1.0]
    # Whitespace splitting (the symmetric rule) sees one token per sentence: no partial credit.
    assert token_recall("中国的首都是北京", ["北京是中国的首都"], "symmetric") == 0.0
    assert token_recall("中国的首都是北京", ["北京是中国的首都"], "official", "zh") == 1.0


def test_bad_rule_or_language_is_a_clear_error(tmp_path: Path) -> None:
    gold, preds = _dataset(tmp_path, EN[:1])
    result = runner.invoke(
        app,
        ["eval", "score", "dynvqa", "--gold", str(gold), "--predictions", str(preds),
         "--lang", "fr"],
    )  # fmt: skip
    assert result.exit_code != 0 and "fr" in result.output
    result = runner.invoke(
        app,
        ["eval", "score", "gaia", "--gold", str(gold), "--predictions", str(preds),
         "--rule", "symmetric"],
    )  # fmt: skip
    assert result.exit_code != 0 and "dynvqa only" in result.output
