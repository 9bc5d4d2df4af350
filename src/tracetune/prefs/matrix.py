"""The whole MATRIX loop from one config (``tracetune run matrix CONFIG.yaml``).

task programs -> gold trajectories -> SFT -> step-wise exploration with the SFT policy ->
preference pairs -> DPO from the SFT model -> evaluation on held-out task programs: the
``programs`` benchmark of ``tracetune eval run`` (:mod:`tracetune.evaluate.programs_run`),
whose split is drawn under its own seed namespace with the training tasks excluded; each
policy is rolled out greedily; pass = gold answer reached with the tools the task needs.

Every stage writes under ``out`` and is skipped or resumed when the loop is run again:
dataset stages through the stage runner, training when its output is complete. The numbers
land in ``out/report.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tracetune.errors import ConfigError
from tracetune.models.base import ModelOptions

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"


class ProgramSet(BaseModel):
    """A set of task programs to generate."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(default=24, ge=1, description="How many tasks.")
    seed: int = Field(default=0, description="Run seed of the task programs.")
    families: list[str] = Field(
        default_factory=list, description="Program families (default: all registered)."
    )


class EvalOptions(BaseModel):
    """How the policies are evaluated on the held-out programs."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(default=8, ge=1, description="Step budget per episode.")
    max_tokens: int = Field(default=512, ge=1, description="Max new tokens per step.")
    base: bool = Field(default=False, description="Also evaluate the base model.")
    sft: bool = Field(default=True, description="Evaluate the SFT policy (DPO is always).")


class MatrixConfig(BaseModel):
    """Configuration of ``tracetune run matrix`` (a YAML file with these keys)."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Directory of every stage's output and report.json.")
    base: str = Field(
        description="Base VLM: a checkpoint directory, a hub id in the local cache, or "
        "'tiny:ARCH' (qwen2_vl, qwen2_5_vl, llava, idefics3) for a tiny random model."
    )
    action_format: Literal["json", "code", "tools"] = Field(
        default="json", description="How the controller writes actions, in every stage."
    )
    tasks: ProgramSet = Field(default_factory=ProgramSet, description="Training programs.")
    heldout: ProgramSet = Field(
        default_factory=lambda: ProgramSet(n=12, seed=1_000_003),
        description="Held-out evaluation programs: the `programs` benchmark's split (seeds "
        "of their own namespace; every training task id is excluded).",
    )
    tasks_dir: Path | None = Field(
        default=None, description="Use this task dataset instead of generating `tasks`."
    )
    gold_dir: Path | None = Field(
        default=None, description="Use these gold trajectories instead of rolling them out."
    )
    explore_tasks: int | None = Field(
        default=None, ge=1, description="Explore only the first N training tasks."
    )
    sft: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of `tracetune train sft` (SFTConfig fields but base/data/out).",
    )
    explore: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of `tracetune prefs explore` (ExploreConfig fields but "
        "tasks/out/policy), e.g. k, verifier, judge, temperatures, max_steps.",
    )
    pairs: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of `tracetune prefs build` (BuildConfig fields but inputs/out).",
    )
    dpo: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of `tracetune train dpo` (DPOConfig fields but base/pairs/out).",
    )
    eval: EvalOptions = Field(default_factory=EvalOptions, description="Evaluation.")

    @model_validator(mode="after")
    def _check_sections(self) -> MatrixConfig:
        # Build each stage's config now, so a typo fails before hours of work.
        placeholder = self.out / "_check"
        for section, keys in (
            ("sft", {"base", "data", "out"}),
            ("explore", {"tasks", "out", "policy"}),
            ("pairs", {"inputs", "out"}),
            ("dpo", {"base", "pairs", "out"}),
        ):
            given = getattr(self, section)
            fixed = keys & set(given)
            if fixed:
                raise ValueError(f"{section}: {sorted(fixed)} are set by the loop itself")
        checks = (
            ("sft", lambda: self.sft_config(placeholder, "base")),
            ("explore", lambda: self.explore_config(placeholder, "local:base", ModelOptions())),
            ("pairs", lambda: self.build_config(placeholder)),
            ("dpo", lambda: self.dpo_config(placeholder)),
        )
        for section, check in checks:
            try:
                check()
            except ValidationError as exc:
                problems = "; ".join(
                    f"{section}.{'.'.join(str(p) for p in e['loc']) or '(section)'}: "
                    f"{e['msg'].removeprefix('Value error, ')}"
                    for e in exc.errors()
                )
                raise ValueError(problems) from None
        return self

    # -- each stage's config ---------------------------------------------------------------
    def sft_config(self, gold: Path, base: str) -> Any:
        from tracetune.train.config import SFTConfig

        return SFTConfig.model_validate(
            {**self.sft, "base": base, "data": [gold], "out": self.out / "sft"}
        )

    def explore_config(self, tasks: Path, policy: str, backend: ModelOptions) -> Any:
        from tracetune.prefs.explore import ExploreConfig

        data = {
            "action_format": self.action_format,
            **self.explore,
            "tasks": tasks,
            "out": self.out / "explore",
            "policy": policy,
            "backend": backend.model_dump(),
        }
        if self.explore_tasks is not None:
            data["limit"] = self.explore_tasks
        return ExploreConfig.model_validate(data)

    def build_config(self, explored: Path) -> Any:
        from tracetune.prefs.pairs import BuildConfig

        return BuildConfig.model_validate(
            {**self.pairs, "inputs": [explored], "out": self.out / "pairs"}
        )

    def dpo_config(self, sft_out: Path) -> Any:
        from tracetune.train.config import DPOConfig

        return DPOConfig.model_validate(
            {
                **self.dpo,
                "base": str(sft_out),
                "pairs": [self.out / "pairs"],
                "out": self.out / "dpo",
            }
        )


def trained_policy(train_dir: Path) -> tuple[str, ModelOptions]:
    """The ``local:`` spec and backend options of a finished training run."""
    from tracetune.train.model import RUN_FILE

    record = json.loads((train_dir / RUN_FILE).read_text())
    if record.get("adapter"):
        return f"local:{record['base']}", ModelOptions(adapter=str(train_dir))
    return f"local:{train_dir}", ModelOptions()


def _trained(train_dir: Path) -> bool:
    from tracetune.train.model import RUN_FILE

    return (train_dir / RUN_FILE).is_file()


def _resumable(train_config: Any) -> Any:
    """The training config, set to resume when a killed run left a checkpoint behind."""
    from tracetune.train.model import last_complete_checkpoint

    if last_complete_checkpoint(train_config.out / "checkpoints") is not None:
        return train_config.model_copy(update={"resume": True})
    return train_config


def resolve_base(config: MatrixConfig) -> str:
    """The base model's path or id; a ``tiny:`` base is built once under ``out/base``."""
    if not config.base.startswith(TINY_PREFIX):
        return config.base
    from tracetune.models.tiny import init_tiny

    target = config.out / "base"
    if not (target / "config.json").is_file():
        init_tiny(config.base.removeprefix(TINY_PREFIX), target)
    return str(target)


async def run_matrix(config: MatrixConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every stage of the loop; returns the report also written to
    ``out/report.json``."""
    from tracetune.evaluate.programs_run import ProgramsConfig as HeldoutConfig
    from tracetune.evaluate.programs_run import heldout_split, run_programs
    from tracetune.prefs.explore import run_explore
    from tracetune.prefs.pairs import run_build
    from tracetune.prefs.stats import prefs_stats
    from tracetune.rollout import RolloutConfig, rollout_summary, run_rollout
    from tracetune.schema import Task
    from tracetune.store import Dataset
    from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks
    from tracetune.train.dpo import train_dpo
    from tracetune.train.sft import train_sft

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report: dict[str, Any] = {"config": json.loads(config.model_dump_json()), "stages": {}}
    stages: dict[str, Any] = report["stages"]

    def done(name: str, **numbers: Any) -> None:
        stages[name] = {**numbers, "elapsed_s": round(time.monotonic() - t0, 1)}
        log.info("matrix: %s done: %s", name, numbers)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    # 1. tasks (training and held-out)
    if config.tasks_dir is not None:
        tasks_dir = config.tasks_dir
    else:
        tasks_dir = out / "tasks"
        await generate_tasks(
            ProgramsConfig(
                out=tasks_dir,
                n=config.tasks.n,
                seed=config.tasks.seed,
                families=config.tasks.families,
            )
        )
    train_ids = Dataset.open(tasks_dir, Task).ids()
    # The held-out split of the `programs` benchmark, drawn once for every policy: its own
    # seed namespace, and no task whose id is a training task's.
    heldout_dir = out / "heldout"
    eval_base = HeldoutConfig(
        model="unset",
        out=out / "eval",
        n=config.heldout.n,
        seed=config.heldout.seed,
        families=config.heldout.families or config.tasks.families,
        exclude=[tasks_dir],
        action_format=config.action_format,
        max_steps=config.eval.max_steps,
        max_tokens=config.eval.max_tokens,
        temperature=0.0,
        concurrency=1,
    )
    heldout = heldout_split(eval_base, Dataset.create(heldout_dir, Task))
    done("tasks", train=len(train_ids), heldout=len(heldout))

    # 2. gold trajectories
    if config.gold_dir is not None:
        gold_dir = config.gold_dir
        gold_n = len(Dataset.open(gold_dir))
    else:
        gold_dir = out / "gold"
        _, gold = await run_rollout(
            RolloutConfig(tasks=tasks_dir, out=gold_dir, action_format=config.action_format),
            progress=progress,
        )
        gold_n = len(gold)
        summary = rollout_summary(gold)
        stages["gold_pass_rate"] = summary["pass_rate"]
    if gold_n == 0:
        raise ConfigError(f"no gold trajectory passed in {gold_dir}; nothing to train SFT on")
    done("gold", trajectories=gold_n)

    # 3. SFT
    base = resolve_base(config)
    sft_cfg = config.sft_config(gold_dir, base)
    if not _trained(sft_cfg.out):
        result = train_sft(_resumable(sft_cfg))
        losses = result.losses()
        done(
            "sft",
            steps=result.steps,
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
        )
    else:
        done("sft", reused=str(sft_cfg.out))
    sft_spec, sft_backend = trained_policy(sft_cfg.out)

    # 4. exploration with the SFT policy
    explore_cfg = config.explore_config(tasks_dir, sft_spec, sft_backend)
    explore_result, explored = await run_explore(explore_cfg, progress=progress)
    done("explore", summary=explore_result.summary(), **_flat(prefs_stats(explored.root)))

    # 5. pairs
    build_result, pairs = await run_build(config.build_config(explored.root), progress=progress)
    if len(pairs) == 0:
        raise ConfigError(
            "exploration gave no preference pairs (every step's candidates were alike or all "
            "failed); sample more candidates (explore.k), raise explore.high_temperature, or "
            "train the SFT policy longer"
        )
    done("pairs", **_flat(prefs_stats(pairs.root)))

    # 6. DPO from the SFT model
    dpo_cfg = config.dpo_config(sft_cfg.out)
    if not _trained(dpo_cfg.out):
        result = train_dpo(_resumable(dpo_cfg))
        losses = result.losses()
        done(
            "dpo",
            steps=result.steps,
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
        )
    else:
        done("dpo", reused=str(dpo_cfg.out))
    dpo_spec, dpo_backend = trained_policy(dpo_cfg.out)

    # 7. held-out evaluation with the exact gold check
    policies: list[tuple[str, str, ModelOptions]] = []
    if config.eval.base:
        policies.append(("base", f"local:{base}", ModelOptions()))
    if config.eval.sft:
        policies.append(("sft", sft_spec, sft_backend))
    policies.append(("dpo", dpo_spec, dpo_backend))
    accuracy: dict[str, Any] = {}
    for name, spec, backend in policies:
        metrics = await run_programs(
            eval_base.model_copy(
                update={
                    "model": spec,
                    "out": out / "eval" / name,
                    "data": heldout_dir,
                    "backend": backend,
                }
            ),
            progress=progress,
        )
        accuracy[name] = _heldout_numbers(out / "eval" / name, metrics)
    done("eval", heldout_accuracy=accuracy)
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


LEARNING_NUMBERS = (
    "valid_actions",
    "first_tool",
    "first_tool_macro",
    "majority_first_tool_macro",
    "tool_accuracy",
    "argument_accuracy",
)


def _heldout_numbers(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """A policy's held-out numbers from its `programs` run: passed = the gold answer and
    every tool of the gold chain used (an answer without the tools is a lucky guess)."""
    items = [
        json.loads(line)
        for line in (run_dir / "records.jsonl").read_text().splitlines()
        if line.strip()
    ]
    by_family: dict[str, dict[str, Any]] = {}
    passed = 0
    for item in items:
        ok = item["scores"]["accuracy"] == 1 and item["scores"]["used_gold_tools"] == 1
        passed += ok
        family = by_family.setdefault(
            str(item["metadata"].get("family")), {"passed": 0, "total": 0}
        )
        family["passed"] += ok
        family["total"] += 1
    for family in by_family.values():
        family["pass_rate"] = round(family["passed"] / family["total"], 4)
    report = metrics["reports"]["programs"]["metrics"]
    return {
        "passed": passed,
        "total": len(items),
        "accuracy": round(passed / len(items), 4) if items else 0.0,
        "answer_accuracy": round(report["accuracy"] / 100, 4),
        "used_gold_tools": round(report["used_gold_tools"] / 100, 4),
        # What moves first when a controller learns (fractions, like the numbers above):
        # valid actions, the right first tool against always calling the majority tool,
        # and per-step tool and argument accuracy against the gold chain.
        **{
            name: round(report[name] / 100, 4)
            for name in LEARNING_NUMBERS
            if isinstance(report.get(name), int | float)
        },
        "by_family": dict(sorted(by_family.items())),
        "run": str(run_dir),
    }


def _flat(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k not in ("path", "kind", "runs")}


def miniature(out: Path, base: str, **overrides: Any) -> MatrixConfig:
    """The loop at toy scale (a tiny model, a few tasks, K=3, three steps): minutes on a
    laptop CPU, for the quickstart and CI. Its numbers show the plumbing, not quality; the
    SFT policy is too small to sample usable steps, so the gold anchor gives each step a
    usable candidate to prefer over the policy's samples."""
    data: dict[str, Any] = {
        "out": out,
        "base": base,
        "tasks": {"n": 3, "seed": 0, "families": ["receipt", "table"]},
        "heldout": {"n": 2, "seed": 1_000_003, "families": ["receipt", "table"]},
        "explore_tasks": 2,
        "sft": {
            "full": True,
            "max_steps": 12,
            "lr": 1e-2,
            "scheduler": "constant",
            "weight_decay": 0.0,
            "warmup": 0,
            "batch_size": 2,
            "grad_accum": 1,
            "gradient_checkpointing": False,
            "group_by_length": False,
            "logging_steps": 4,
            "save_steps": 1000,
        },
        "explore": {
            "k": 3,
            "max_steps": 3,
            "max_tokens": 48,
            "verifier": "gold",
            "gold_anchor": True,
        },
        "dpo": {
            "max_steps": 4,
            "batch_size": 2,
            "grad_accum": 1,
            "gradient_checkpointing": False,
            "group_by_length": False,
            "logging_steps": 2,
            "save_steps": 1000,
            "lr": 5e-4,
        },
        "eval": {"max_steps": 2, "max_tokens": 48},
    }
    data.update(overrides)
    return MatrixConfig.model_validate(data)
