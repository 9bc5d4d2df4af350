"""``tracetune quickstart``: the pipeline in miniature, offline, on bundled data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tracetune.cli.common import reports_errors, run_async

console = Console()

QUICKSTART_FAMILIES = ["receipt", "table", "chart", "form", "document", "compare"]


@reports_errors
def quickstart(
    out: Annotated[Path, typer.Option(help="Where everything is written.")] = Path(
        "runs/quickstart"
    ),
    n: Annotated[int, typer.Option(help="Task programs to generate.")] = 12,
    seed: Annotated[int, typer.Option(help="Seed of the task programs.")] = 0,
    matrix: Annotated[
        bool,
        typer.Option(
            "--matrix/--no-matrix",
            help="Also run the MATRIX loop in miniature (SFT, exploration, pairs, DPO, eval).",
        ),
    ] = True,
) -> None:
    """The whole pipeline in miniature, offline, on bundled data.

    Generate verifiable tasks, roll out gold trajectories with the real tools, check
    them, write an SFT-ready dataset, run a tiny local VLM as an agent, and run the whole
    MATRIX loop in miniature on it (SFT, step-wise exploration, pairs, DPO, evaluation).

    Offline, on bundled data; rerunning skips what is already done.
    """
    from tracetune.agent.run import AgentRunConfig, run_agent
    from tracetune.cli.agent import print_transcript
    from tracetune.data import RECEIPT_IMAGE
    from tracetune.formats.registry import ExportOptions, export_dataset
    from tracetune.models.tiny import init_tiny
    from tracetune.rollout import RolloutConfig, rollout_summary, run_rollout
    from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks

    t0 = time.monotonic()
    rows: list[tuple[str, str, str]] = []
    anchored: int | None = None  # chosen steps the miniature loop took from the gold anchor

    console.rule("1. task programs: tasks with known answers and tool chains")
    _, tasks = run_async(
        generate_tasks(
            ProgramsConfig(out=out / "tasks", n=n, seed=seed, families=QUICKSTART_FAMILIES)
        )
    )
    rows.append(("tasks", str(tasks.root), f"{len(tasks)} tasks"))

    console.rule("2. gold rollouts with the real tools, checked against the gold answers")
    _, gold = run_async(run_rollout(RolloutConfig(tasks=out / "tasks", out=out / "gold")))
    summary = rollout_summary(gold)
    rows.append(
        (
            "gold trajectories",
            str(gold.root),
            f"{summary.get('passed', len(gold))}/{summary.get('total', '?')} "
            "reached the gold answer",
        )
    )

    console.rule("3. SFT-ready export (TRL conversational format)")
    if len(gold):
        # The export is derived from the gold dataset, so a rerun rewrites it.
        report = export_dataset(
            "trl-sft", gold.root, out / "sft-trl", ExportOptions(overwrite=True)
        )
        rows.append(
            ("SFT data", str(report.out_dir), f"{report.rows} rows, {report.images} images")
        )

    console.rule("4. a tiny random Qwen2-VL as the agent's controller (local: backend)")
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        init_tiny("qwen2_vl", model_dir)
    result, trajectories = run_async(
        run_agent(
            AgentRunConfig(
                model=f"local:{model_dir}",
                out=out / "agent",
                task="What is the total on this receipt?",
                images=[RECEIPT_IMAGE],
                tools=["ocr", "calculator"],
                max_steps=3,
                max_tokens=48,
            )
        )
    )
    for trajectory in trajectories:
        print_transcript(trajectory)
    rows.append(
        (
            "agent run",
            str(trajectories.root),
            "untrained model: expect parse errors until it is tuned",
        )
    )

    if matrix and len(gold):
        console.rule("5. MATRIX in miniature: SFT -> exploration -> pairs -> DPO -> held-out eval")
        from tracetune.prefs.matrix import miniature, run_matrix

        loop = run_async(
            run_matrix(
                miniature(
                    out / "matrix",
                    str(model_dir),
                    tasks_dir=out / "tasks",
                    gold_dir=out / "gold",
                    heldout={"n": 2, "seed": seed + 1_000_003, "families": ["receipt", "table"]},
                )
            )
        )
        stages = loop["stages"]
        anchored = stages["explore"]["chosen_from_gold_anchor"]
        rows.append(
            (
                "preference pairs",
                str(out / "matrix" / "pairs"),
                f"{stages['pairs']['pairs']} pairs over {stages['explore']['steps']} explored "
                f"steps (K={loop['config']['explore']['k']}); {anchored} chosen steps "
                "from the gold anchor",
            )
        )
        accuracy = stages["eval"]["heldout_accuracy"]
        rows.append(
            (
                "held-out eval",
                str(out / "matrix" / "eval"),
                ", ".join(f"{k}: {v['passed']}/{v['total']}" for k, v in accuracy.items())
                + " (tiny model: expect 0)",
            )
        )

    table = Table(title=f"quickstart done in {time.monotonic() - t0:.0f} s")
    for column in ("stage", "output", "what"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(
        "Next: tracetune train sft --base",
        model_dir,
        "--data",
        out / "gold",
        "--out",
        out / "sft",
        highlight=False,
    )
    if anchored is not None:
        console.print(
            f"Note: the miniature loop explores with gold_anchor on: {anchored} chosen steps "
            "are the gold chain's next step, not the policy's samples, because the tiny "
            "policy samples no usable step. Its pairs and numbers show the plumbing, not "
            "preferences a policy found; `run matrix` leaves gold_anchor off by default.",
            highlight=False,
        )
    if matrix:
        console.print(
            "Pairs and exploration: tracetune prefs stats",
            out / "matrix" / "explore",
            out / "matrix" / "pairs",
            "; the whole loop from a config: tracetune run matrix CONFIG.yaml (docs/prefs.md)",
            highlight=False,
        )
