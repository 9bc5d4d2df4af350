"""Verifiers: answer checks against gold (and, later, LLM judges of tasks and trajectories)."""

from tracetune.judge.answers import (
    AnswerCheck,
    check_answer,
    extract_final_answer,
    judge_answer,
    normalize_text,
    numbers_in,
    parse_number,
    split_list,
)

__all__ = [
    "AnswerCheck",
    "check_answer",
    "extract_final_answer",
    "judge_answer",
    "normalize_text",
    "numbers_in",
    "parse_number",
    "split_list",
]
