"""Answer checking against gold: hand-made cases for every rule."""

from __future__ import annotations

import pytest

from tracetune.judge import check_answer, extract_final_answer, numbers_in, split_list
from tracetune.judge.answers import judge_answer
from tracetune.schema import GoldAnswer, Task, Trajectory


def num(
    value: str,
    tolerance: float | None = None,
    unit: str | None = None,
    aliases: list[str] | None = None,
) -> GoldAnswer:
    return GoldAnswer(
        value=value, kind="number", tolerance=tolerance, unit=unit, aliases=aliases or []
    )


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("FINAL ANSWER: 42", "42"),
        ("I added the lines.\nFinal answer: 15.50\nThat is all.", "15.50"),
        ("so the result is \\boxed{7}", "7"),
        ("Answer: **Lisbon**.", "Lisbon"),
        ("After reading the sign, the answer is 12 km.", "12 km"),
        ('  "Porto"  ', "Porto"),
        ("no marker here, 3 apples and 4 pears", "no marker here, 3 apples and 4 pears"),
    ],
)
def test_final_answer_extraction(text: str, answer: str) -> None:
    assert extract_final_answer(text) == answer


@pytest.mark.parametrize(
    ("prediction", "gold", "passed"),
    [
        # currency symbols, thousands separators, trailing zeros
        ("$1,204.50", num("1204.5", 0.01), True),
        ("1204.5 €", num("1,204.50", 0.01), True),
        ("£ 12.5", num("12.50"), True),
        ("The total is $1,204.50.", num("1204.5", 0.01), True),
        # tolerance is absolute; None means exact
        ("90.36", num("90.37", 0.01), True),
        ("90.35", num("90.37", 0.01), False),
        ("37.5", num("37"), False),
        ("37", num("37"), True),
        # negative numbers, unicode minus, spaced minus
        ("-1,062", num("-1062"), True),
        ("The change is −67.", num("-67"), True),
        ("-67", num("67"), False),
        # units: the gold's unit in any spelling; a different unit fails; none is fine
        ("12 km", num("12", unit="km"), True),
        ("12 kilometres", num("12", unit="km"), True),
        ("12", num("12", unit="km"), True),
        ("12 m", num("12", unit="km"), False),
        ("4.05 kg", num("4.05", 0.01, unit="kg"), True),
        ("25%", num("25", unit="%"), True),
        ("25 percent", num("25", unit="%"), True),
        # which number of a sentence counts
        ("2 x 3.25 = 6.50", num("6.5"), True),
        ("The total of 3 items is 15.50", num("15.5"), True),
        ("The total of 3 items is 15.50", num("3"), False),
        ("I bought 3 items for 15.50", num("15.5"), True),
        ("Answer: 9 (5 + 4)", num("9"), True),
        # codes and labels are not numbers
        ("Q3", num("3"), False),
        # aliases
        ("1500", num("1.5 thousand", aliases=["1500"]), True),
        # no number, nothing, hedging
        ("I cannot see the image.", num("9"), False),
        ("", num("9"), False),
        ("12 or 13", num("12"), False),
        ("maybe 12", num("12"), False),
    ],
)
def test_numbers(prediction: str, gold: GoldAnswer, passed: bool) -> None:
    result = check_answer(prediction, gold)
    assert result.passed is passed, result.reasons
    assert result.reasons  # every outcome says why


@pytest.mark.parametrize(
    ("prediction", "gold", "passed"),
    [
        ("lisbon", GoldAnswer(value="Lisbon"), True),
        ("  LISBON. ", GoldAnswer(value="Lisbon"), True),
        ("The Hague", GoldAnswer(value="Hague"), True),  # leading article dropped
        ("Malmö", GoldAnswer(value="Malmo"), True),  # accents ignored
        ("Porto", GoldAnswer(value="Lisbon", aliases=["Lisboa"]), False),
        ("Lisboa", GoldAnswer(value="Lisbon", aliases=["Lisboa"]), True),
        ("It is made in Saltmere.", GoldAnswer(value="Saltmere"), True),
        ("Saltmeres", GoldAnswer(value="Saltmere"), False),  # whole words only
        ("Saltmere or Brisca", GoldAnswer(value="Saltmere"), False),
        (
            "After looking at every tile in the collage very carefully one by one, I think "
            "that the portrait is labelled Vera Quintero",
            GoldAnswer(value="Vera Quintero"),
            False,  # a long essay does not get credit for containing the name somewhere
        ),
        ("Final answer: Vera Quintero", GoldAnswer(value="Vera Quintero"), True),
    ],
)
def test_text(prediction: str, gold: GoldAnswer, passed: bool) -> None:
    result = check_answer(prediction, gold)
    assert result.passed is passed, result.reasons


def test_choice_must_name_one_option() -> None:
    gold = GoldAnswer(value="Corner Pantry", kind="choice")
    choices = ["Corner Pantry", "Harbor Grocer"]
    assert check_answer("Corner Pantry", gold, choices=choices).passed
    assert check_answer("The store was Corner Pantry.", gold, choices=choices).passed
    both = check_answer("Corner Pantry, then Harbor Grocer", gold, choices=choices)
    assert not both.passed and "several choices" in both.reasons[0]
    assert not check_answer("Harbor Grocer", gold, choices=choices).passed


@pytest.mark.parametrize(
    ("prediction", "gold", "ordered", "passed"),
    [
        ("b, a, c", "a, b, c", False, True),
        ("b, a, c", "a, b, c", True, False),
        ("a; b and c", "a, b, c", True, True),
        ('["c", "b", "a"]', "a, b, c", False, True),
        ("a, b", "a, b, c", False, False),
        ("a, b, b", "a, b, c", False, False),
        ("1,500; 2.50", "2.5, 1500", False, True),  # numbers compare as numbers
        ("3, 2, 1", "[1, 2, 3]", False, True),
    ],
)
def test_lists(prediction: str, gold: str, ordered: bool, passed: bool) -> None:
    result = check_answer(prediction, GoldAnswer(value=gold, kind="list"), ordered=ordered)
    assert result.passed is passed, result.reasons


def test_number_tolerance_in_lists() -> None:
    gold = GoldAnswer(value="1.00, 2.00", kind="list", tolerance=0.01)
    assert check_answer("2.005, 0.995", gold).passed
    assert not check_answer("2.05, 1", gold).passed


def test_helpers() -> None:
    found = numbers_in("Paid $1,204.50 for KT-4821 in Q3; change -3.5 kg")
    assert [(n.value, n.unit) for n in found] == [(1204.5, "usd"), (4821.0, None), (-3.5, "kg")]
    assert split_list("1,500, 2 and 3") == ["1500", "2", "3"]


def test_a_numeric_gold_without_a_number_is_a_bug_in_the_task() -> None:
    with pytest.raises(ValueError, match="holds no number"):
        check_answer("3", GoldAnswer(value="three", kind="number"))


def trajectory(final: str | None, status: str = "completed") -> Trajectory:
    task = Task(id="t1", query="q", gold=num("15.5", 0.01))
    return Trajectory(
        id="traj-1", task=task, controller="scripted", final_answer=final, status=status
    )  # type: ignore[arg-type]


def test_verdict_per_trajectory() -> None:
    good = judge_answer(trajectory("The total is $15.50"), judge="gold")
    assert good.passed and good.score == 1.0 and good.target_id == "traj-1"
    assert good.details["extracted"] == "The total is $15.50"
    assert good.id == judge_answer(trajectory("x"), judge="gold").id  # stable per target+judge
    bad = judge_answer(trajectory("16"))
    assert not bad.passed and bad.score == 0.0 and "off by 0.5" in bad.reasons[0]
    none = judge_answer(trajectory(None, status="max_steps"))
    assert not none.passed and "max_steps" in none.reasons[0]
    with pytest.raises(ValueError, match="no gold answer"):
        judge_answer(Trajectory(id="x", task=Task(id="t", query="q"), controller="c"))
