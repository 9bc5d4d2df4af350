"""Pref-X: step-wise exploration, step verifiers and preference pairs (MATRIX's Pref-X)."""

from tracetune.prefs.base import Candidate, Ranking, StepContext, close_branch, fork_episode
from tracetune.prefs.explore import ExploreConfig, Explorer, explore_id, run_explore
from tracetune.prefs.pairs import BuildConfig, bleu, run_build, step_pairs
from tracetune.prefs.stats import prefs_stats
from tracetune.prefs.verifiers import (
    VERIFIERS,
    CombinedVerifier,
    GoldVerifier,
    JudgeVerifier,
    StepVerifier,
    gold_position,
    make_verifier,
    parse_judge_reply,
)

__all__ = [
    "VERIFIERS",
    "BuildConfig",
    "Candidate",
    "CombinedVerifier",
    "ExploreConfig",
    "Explorer",
    "GoldVerifier",
    "JudgeVerifier",
    "Ranking",
    "StepContext",
    "StepVerifier",
    "bleu",
    "close_branch",
    "explore_id",
    "fork_episode",
    "gold_position",
    "make_verifier",
    "parse_judge_reply",
    "prefs_stats",
    "run_build",
    "run_explore",
    "step_pairs",
]
