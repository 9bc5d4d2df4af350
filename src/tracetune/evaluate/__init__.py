"""Benchmarks and their exact scorers: GTA, GAIA, Agent-X, Dyn-VQA and VQA-style accuracy.

Every scorer works on files alone (no agent run needed) and returns a ``ScoreReport``: the
aggregate metrics, named as the benchmark names them, plus the per-item scores behind them.
``run_benchmark`` runs a controller over GTA, GAIA, Agent-X, VQA, Dyn-VQA or held-out task
programs and scores the run with those scorers; each benchmark is a ``BenchmarkAdapter``
(:mod:`tracetune.evaluate.adapter`) over one run skeleton, ``run_adapter``.
:mod:`tracetune.evaluate.results` reads a finished run back (headline scores, breakdowns,
failure examples), and ``tracetune.view.report.build_report`` compares runs in HTML and
Markdown.
"""

from tracetune.evaluate.adapter import ADAPTERS, BenchConfig, BenchmarkAdapter, run_adapter
from tracetune.evaluate.base import ItemScore, ScoreReport, ScoringInputError
from tracetune.evaluate.dynvqa import score_dynvqa, token_recall
from tracetune.evaluate.gaia import extract_final_answer, question_scorer, score_gaia
from tracetune.evaluate.gta import (
    GTAScorer,
    load_gta_gold,
    mat_correct,
    objective_correct,
    score_gta,
)
from tracetune.evaluate.gta_tools import GTA_TOOLS, toolset_status
from tracetune.evaluate.runs import RUN_BENCHMARKS, bench_config, run_benchmark
from tracetune.evaluate.vqa import score_vqa
from tracetune.judge.vqa import (
    extract_answer,
    extract_choice,
    normalize_vqa_answer,
    vqa_accuracy,
)

BENCHMARKS = ("gta", "gaia", "agentx", "dynvqa", "vqa")

__all__ = [
    "ADAPTERS",
    "BENCHMARKS",
    "BenchConfig",
    "BenchmarkAdapter",
    "run_adapter",
    "GTA_TOOLS",
    "RUN_BENCHMARKS",
    "bench_config",
    "run_benchmark",
    "toolset_status",
    "GTAScorer",
    "ItemScore",
    "ScoreReport",
    "ScoringInputError",
    "extract_answer",
    "extract_choice",
    "extract_final_answer",
    "load_gta_gold",
    "mat_correct",
    "normalize_vqa_answer",
    "objective_correct",
    "question_scorer",
    "score_dynvqa",
    "score_gaia",
    "score_gta",
    "score_vqa",
    "token_recall",
    "vqa_accuracy",
]
