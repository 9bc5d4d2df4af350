"""tracetune: tune vision-language models into robust tool-using agents.

The Python API. Everything a script or notebook needs is importable from here; the names
load their modules on first use, so ``import tracetune`` stays fast (no torch until a model
or a trainer is touched).

- Records and datasets: :class:`Task`, :class:`Trajectory`, :class:`Step`, :class:`Verdict`,
  :class:`PreferencePair`, :class:`Dialogue`, :class:`EvalRecord`, :class:`FileRef`,
  :class:`Dataset`, :class:`AssetStore`.
- Models and tools: :func:`load_model`, :class:`Sampling`, :class:`ModelOptions`,
  :func:`tool` (a decorator), :func:`get_tool`, :func:`load_tools`, :class:`Tool`.
- The agent: :class:`Agent` (``Agent(model, tools).ask("question", ["image.png"])``) and
  :func:`run_agent` over many tasks.
- Stages (async; ``await`` them in a notebook, ``asyncio.run`` them in a script):
  :func:`generate_tasks` (task programs), :func:`run_synth` (M-TRACE), :func:`run_mmat` (the
  MMAT engine), :func:`run_rollout`, :func:`run_explore` and :func:`build_pairs` (Pref-X),
  :func:`run_matrix` (the whole loop), :func:`run_benchmark` (evaluation), each with its
  config model.
- Training (blocking): :func:`train_sft`, :func:`train_dpo` with :class:`SFTConfig`,
  :class:`DPOConfig`.
- Errors: :class:`TracetuneError`, the base of every error a user can fix (bad input or
  configuration); it carries a ``message`` and a ``hint``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    # records and datasets
    "Task": ("tracetune.schema", "Task"),
    "Trajectory": ("tracetune.schema", "Trajectory"),
    "Step": ("tracetune.schema", "Step"),
    "Verdict": ("tracetune.schema", "Verdict"),
    "PreferencePair": ("tracetune.schema", "PreferencePair"),
    "Dialogue": ("tracetune.schema", "Dialogue"),
    "EvalRecord": ("tracetune.schema", "EvalRecord"),
    "FileRef": ("tracetune.schema", "FileRef"),
    "GoldAnswer": ("tracetune.schema", "GoldAnswer"),
    "Dataset": ("tracetune.store", "Dataset"),
    "AssetStore": ("tracetune.store", "AssetStore"),
    # models and tools
    "load_model": ("tracetune.models", "load_model"),
    "Sampling": ("tracetune.models", "Sampling"),
    "ModelOptions": ("tracetune.models", "ModelOptions"),
    "ChatModel": ("tracetune.models", "ChatModel"),
    "tool": ("tracetune.tools", "tool"),
    "get_tool": ("tracetune.tools", "get_tool"),
    "load_tools": ("tracetune.tools", "load_tools"),
    "Tool": ("tracetune.tools", "Tool"),
    # the agent
    "Agent": ("tracetune.agent", "Agent"),
    "AgentRunConfig": ("tracetune.agent.run", "AgentRunConfig"),
    "run_agent": ("tracetune.agent.run", "run_agent"),
    # stages
    "ProgramsConfig": ("tracetune.synth.programs.generate", "ProgramsConfig"),
    "generate_tasks": ("tracetune.synth.programs.generate", "generate_tasks"),
    "SynthConfig": ("tracetune.synth.mtrace.config", "SynthConfig"),
    "run_synth": ("tracetune.synth.mtrace.pipeline", "run_chain"),
    "MMATRunConfig": ("tracetune.engine.pipeline", "MMATRunConfig"),
    "run_mmat": ("tracetune.engine.pipeline", "run_pipeline"),
    "RolloutConfig": ("tracetune.rollout", "RolloutConfig"),
    "run_rollout": ("tracetune.rollout", "run_rollout"),
    "ExploreConfig": ("tracetune.prefs.explore", "ExploreConfig"),
    "run_explore": ("tracetune.prefs.explore", "run_explore"),
    "BuildConfig": ("tracetune.prefs.pairs", "BuildConfig"),
    "build_pairs": ("tracetune.prefs.pairs", "run_build"),
    "MatrixConfig": ("tracetune.prefs.matrix", "MatrixConfig"),
    "run_matrix": ("tracetune.prefs.matrix", "run_matrix"),
    "bench_config": ("tracetune.evaluate.runs", "bench_config"),
    "run_benchmark": ("tracetune.evaluate.runs", "run_benchmark"),
    # training
    "SFTConfig": ("tracetune.train.config", "SFTConfig"),
    "DPOConfig": ("tracetune.train.config", "DPOConfig"),
    "train_sft": ("tracetune.train.sft", "train_sft"),
    "train_dpo": ("tracetune.train.dpo", "train_dpo"),
    # errors
    "TracetuneError": ("tracetune.errors", "TracetuneError"),
}

__all__ = [
    "__version__",
    "Task",
    "Trajectory",
    "Step",
    "Verdict",
    "PreferencePair",
    "Dialogue",
    "EvalRecord",
    "FileRef",
    "GoldAnswer",
    "Dataset",
    "AssetStore",
    "load_model",
    "Sampling",
    "ModelOptions",
    "ChatModel",
    "tool",
    "get_tool",
    "load_tools",
    "Tool",
    "Agent",
    "AgentRunConfig",
    "run_agent",
    "ProgramsConfig",
    "generate_tasks",
    "SynthConfig",
    "run_synth",
    "MMATRunConfig",
    "run_mmat",
    "RolloutConfig",
    "run_rollout",
    "ExploreConfig",
    "run_explore",
    "BuildConfig",
    "build_pairs",
    "MatrixConfig",
    "run_matrix",
    "bench_config",
    "run_benchmark",
    "SFTConfig",
    "DPOConfig",
    "train_sft",
    "train_dpo",
    "TracetuneError",
]


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'tracetune' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily
    from tracetune.agent import Agent
    from tracetune.agent.run import AgentRunConfig, run_agent
    from tracetune.engine.pipeline import MMATRunConfig
    from tracetune.engine.pipeline import run_pipeline as run_mmat
    from tracetune.errors import TracetuneError
    from tracetune.evaluate.runs import bench_config, run_benchmark
    from tracetune.models import ChatModel, ModelOptions, Sampling, load_model
    from tracetune.prefs.explore import ExploreConfig, run_explore
    from tracetune.prefs.matrix import MatrixConfig, run_matrix
    from tracetune.prefs.pairs import BuildConfig
    from tracetune.prefs.pairs import run_build as build_pairs
    from tracetune.rollout import RolloutConfig, run_rollout
    from tracetune.schema import (
        Dialogue,
        EvalRecord,
        FileRef,
        GoldAnswer,
        PreferencePair,
        Step,
        Task,
        Trajectory,
        Verdict,
    )
    from tracetune.store import AssetStore, Dataset
    from tracetune.synth.mtrace.config import SynthConfig
    from tracetune.synth.mtrace.pipeline import run_chain as run_synth
    from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks
    from tracetune.tools import Tool, get_tool, load_tools, tool
    from tracetune.train.config import DPOConfig, SFTConfig
    from tracetune.train.dpo import train_dpo
    from tracetune.train.sft import train_sft
