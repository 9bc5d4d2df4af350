"""The one reader of JSON in model replies (tracetune.models.replies) and its one error type,
which every stage's parser of structured replies uses."""

from __future__ import annotations

import pytest

from tracetune.models.replies import JsonMatch, MalformedOutput, extract_json, find_json


def test_a_fenced_block_is_read_before_the_prose_around_it() -> None:
    text = 'Before {"draft": 1}.\n```json\n{"final": 2}\n```\nafter'
    assert extract_json(text, dict) == {"final": 2}
    assert extract_json("```\n[1, 2]\n```", list) == [1, 2]
    # A fence without its closing line (a cut reply) is prose: the object is still found.
    assert extract_json('```json\n{"a": 1}', dict) == {"a": 1}


def test_prose_around_and_brackets_in_prose_are_stepped_over() -> None:
    assert extract_json('I think {x} fits; so: {"answer": "4"} done.', dict) == {"answer": "4"}
    assert extract_json('Use the set { of tools. {"a": 1}', dict) == {"a": 1}
    assert extract_json('Note [1] first, then [{"a": 2}] done', list) == [1]
    with pytest.raises(MalformedOutput, match="no JSON object in the reply: expected a JSON"):
        extract_json("no json here", dict)


def test_nested_braces_and_braces_inside_strings() -> None:
    text = 'Action: {"name": "python", "arguments": {"code": "d = {1: \'}\'}\\nprint(d)"}} end'
    found = find_json(text, dict)
    assert found is not None
    assert found.value == {"name": "python", "arguments": {"code": "d = {1: '}'}\nprint(d)"}}
    assert text[found.start : found.end].startswith('{"name"') and text[found.end :] == " end"
    assert find_json('{"a": "}{"}', dict) == JsonMatch({"a": "}{"}, 0, 11)


def test_a_broken_value_is_never_mined_for_a_nested_part() -> None:
    # The outer object is not JSON (a bare word); its inner object is not the answer.
    with pytest.raises(MalformedOutput, match="expected a JSON object"):
        extract_json('{"verdict": maybe, "evidence": {"correct": "yes"}}', dict)
    # ...but a good object after the broken one is.
    assert extract_json('{"a": oops} {"b": 2}', dict) == {"b": 2}


def test_a_cut_off_reply_is_an_error_that_says_so() -> None:
    for text in (
        '{"thought": "look", "arguments": {"x": 1}',  # cut inside the outer object
        '{"query": "cut off',  # cut inside a string
        '```json\n[{"query": "a"}, {"query": "b"',
    ):
        kind: type = list if text.lstrip("`json\n").startswith("[") else dict
        with pytest.raises(MalformedOutput, match="cut off") as caught:
            extract_json(text, kind)
        assert caught.value.message.startswith("expected a JSON")
        assert find_json(text, kind) is None  # the nested {"x": 1} is not taken


def test_python_literals_only_when_asked() -> None:
    text = "```python\n{'Score': '1', 'Justification': 'it\\'s right', 'ok': True}\n```"
    with pytest.raises(MalformedOutput):
        extract_json(text, dict)
    assert extract_json(text, dict, python_literals=True) == {
        "Score": "1",
        "Justification": "it's right",
        "ok": True,
    }


def test_every_reply_error_is_one_type() -> None:
    from tracetune.engine.common import ReplyError, json_object
    from tracetune.evaluate.agentx import parse_judge_reply
    from tracetune.judge.query_files import MalformedVerdict
    from tracetune.judge.trajectory import read_verdict_json
    from tracetune.models.replies import JudgeReplyError
    from tracetune.prefs.verifiers import parse_judge_reply as pick_best

    assert ReplyError is MalformedOutput
    assert issubclass(MalformedVerdict, MalformedOutput)
    assert issubclass(JudgeReplyError, MalformedOutput)
    for read in (
        json_object,
        read_verdict_json,
        parse_judge_reply,
        lambda text: pick_best(text, "best", 2),
    ):
        with pytest.raises(MalformedOutput):
            read('{"correct": "yes", "score": 1, "best": 1')  # cut off
        with pytest.raises(MalformedOutput):
            read("no object here")
