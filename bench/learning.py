"""Does the data teach? A controller trained from scratch on task-program trajectories.

One command runs the whole loop with the CLI a user would run, and times every stage:

  programs (train split) -> gold rollouts -> `model init` (tokenizer trained on the gold
  trajectories) -> `train sft --full` -> step and end-to-end eval on a disjoint held-out
  split -> exploration with the SFT policy (gold verifier, no gold anchor) -> pairs ->
  `train dpo --full` -> eval again

and prints a table (untrained / SFT / SFT+DPO) of the learning metrics of `eval run
programs`, plus, with ``--curve``, step-mode numbers after SFT on growing training sets.

    python bench/learning.py --out /tmp/learning --train 300 --heldout 45 --size 5m \\
        --sft-time 10m --curve 50,100,300

Everything is resumable stage by stage (rerun the same command after a kill). Record the
machine's load (``cat /proc/loadavg``) beside the numbers: training speed varies tenfold
with it, which is why the budgets here are times, not step counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TT = [sys.executable, "-m", "tracetune.cli"]
ROWS = [
    ("valid_actions", "valid actions"),
    ("first_tool", "right first tool"),
    ("first_tool_macro", "right first tool (macro)"),
    ("majority_first_tool_macro", "majority-tool baseline (macro)"),
    ("tool_accuracy", "tool accuracy per step"),
    ("argument_accuracy", "argument accuracy per step"),
    ("accuracy", "answer accuracy"),
    ("completed", "episodes that answered"),
]
STEP_ROWS = [
    ("valid_actions", "step: valid actions"),
    ("tool_accuracy", "step: tool accuracy"),
    ("tool_accuracy_macro", "step: tool accuracy (macro)"),
    ("argument_accuracy", "step: argument accuracy"),
    ("first_tool_macro", "step: right first tool (macro)"),
    ("final_answer_accuracy", "step: final answer right"),
]


def load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
    except OSError:
        return "n/a"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / "learning.json"
        self.results: dict[str, Any] = (
            json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        )
        self.results.setdefault("stages", {})
        self.results.setdefault("evals", {})
        self.results["args"] = {k: str(v) for k, v in vars(args).items()}

    def save(self) -> None:
        self.results_path.write_text(json.dumps(self.results, indent=2) + "\n")

    def run(self, name: str, cmd: list[str], done: Path | None = None) -> None:
        """Run one CLI stage (skipped when ``done`` exists), timing it."""
        if done is not None and done.exists() and name in self.results["stages"]:
            print(f"[{name}] already done", flush=True)
            return
        print(f"[{name}] {' '.join(cmd[3:] if cmd[:3] == TT else cmd)}", flush=True)
        t0 = time.monotonic()
        log = (self.out / "logs").joinpath(f"{name}.log")
        log.parent.mkdir(exist_ok=True)
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
        seconds = round(time.monotonic() - t0, 1)
        if proc.returncode != 0:
            tail = log.read_text()[-3000:]
            raise SystemExit(f"[{name}] failed (exit {proc.returncode}); log {log}:\n{tail}")
        self.results["stages"][name] = {"seconds": seconds, "load": load()}
        self.save()
        print(f"[{name}] {seconds} s (load {load()})", flush=True)

    def evaluate(self, label: str, model: Path, mode: str) -> dict[str, float]:
        a = self.args
        out = self.out / "eval" / f"{label}-{mode}"
        cmd = [
            *TT, "eval", "run", "programs", "--model", f"local:{model}", "--out", str(out),
            "--n", str(a.heldout), "--seed", str(a.heldout_seed),
            "--exclude", str(self.out / "tasks"), "--max-tokens", str(a.max_tokens),
            "--max-steps", str(a.max_steps), "--quiet",
        ]  # fmt: skip
        if mode == "step":
            cmd += ["--mode", "step"]
            replays = self.out / "eval" / "untrained-step" / "trajectories"
            if label != "untrained" and replays.is_dir():
                cmd += ["--gold-prefixes", str(replays)]  # the gold chains replayed once
        self.run(f"eval-{label}-{mode}", cmd, done=out / "metrics.json")
        metrics = json.loads((out / "metrics.json").read_text())
        numbers = metrics["reports"]["programs"]["metrics"]
        self.results["evals"][f"{label}-{mode}"] = numbers
        self.save()
        return numbers

    def sft(self, label: str, data: Path, base: Path, max_time: str) -> Path:
        a = self.args
        out = self.out / label
        cmd = [
            *TT, "train", "sft", "--base", str(base), "--data", str(data), "--out", str(out),
            "--full", "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
            "--grad-accum", "1", "--lr", str(a.lr), "--max-length", "4096",
            "--no-gradient-checkpointing", "--max-time", max_time,
        ]  # fmt: skip
        self.run(label, cmd, done=out / "tracetune_train.json")
        record = json.loads((out / "tracetune_train.json").read_text())
        self.results["stages"][label].update(
            steps=record.get("steps"), metrics=record.get("metrics"), stopped=record.get("stopped")
        )
        self.save()
        return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def subset(full: Path, out: Path, n: int) -> Path:
    """The first ``n`` trajectories of ``full`` as a dataset of their own."""
    from tracetune.schema import Trajectory
    from tracetune.store import Dataset

    if (out / "manifest.json").is_file():
        return out
    src = Dataset.open(full, Trajectory)
    records = sorted(src, key=lambda t: t.id)[:n]
    dst: Any = Dataset.create(out, Trajectory)
    dst.write_all(records, sources=[src.assets])
    return out


def table(results: dict[str, Any], labels: list[str]) -> str:
    evals = results["evals"]
    head = "| metric (%) | " + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (len(labels) + 1)]
    for key, name in ROWS:
        cells = [evals.get(f"{lab}-e2e", {}).get(key) for lab in labels]
        lines.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + " |")
    for key, name in STEP_ROWS:
        cells = [evals.get(f"{lab}-step", {}).get(key) for lab in labels]
        lines.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=300, help="Training programs.")
    p.add_argument("--seed", type=int, default=7, help="Training programs' seed.")
    p.add_argument("--heldout", type=int, default=45, help="Held-out programs.")
    p.add_argument("--heldout-seed", type=int, default=0)
    p.add_argument("--gold", type=Path, help="Reuse gold rollouts of the training programs.")
    p.add_argument("--size", default="5m", help="Controller size for `model init`.")
    p.add_argument("--arch", default="qwen2_vl")
    p.add_argument("--init-args", default="", help="More `model init` flags, e.g. '--layers 3'.")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per process (OMP_NUM_THREADS): every core on a quiet machine, 1 on a "
        "shared one.",
    )
    p.add_argument("--sft-time", default="10m", help="SFT time budget.")
    p.add_argument("--epochs", type=float, default=30.0, help="Most epochs (time usually ends it).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=96,
        help="Max new tokens per step (a thought and an action).",
    )
    p.add_argument(
        "--max-steps", type=int, default=6, help="Step budget per episode (the longest gold chain)."
    )
    p.add_argument("--explore-tasks", type=int, default=40)
    p.add_argument("--explore-time", default="8m")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--dpo-time", default="4m")
    p.add_argument("--dpo-lr", type=float, default=None)
    p.add_argument("--curve", default="", help="Training-set sizes for a learning curve.")
    p.add_argument("--curve-time", default=None, help="SFT budget per curve point.")
    p.add_argument("--skip-untrained-e2e", action="store_true")
    a = p.parse_args()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    b = Bench(a)
    out = a.out
    t_all = time.monotonic()

    tasks = out / "tasks"
    b.run("tasks", [*TT, "tasks", "programs", "--out", str(tasks), "--n", str(a.train),
                    "--seed", str(a.seed), "--quiet"], done=tasks / "manifest.json")  # fmt: skip
    gold = out / "gold"
    if a.gold is not None and not gold.exists():
        shutil.copytree(a.gold, gold)
        b.results["stages"]["gold"] = {"seconds": 0, "note": f"copied from {a.gold}"}
    b.run("gold", [*TT, "rollout", "--tasks", str(tasks), "--out", str(gold), "--teacher",
                   "gold", "--quiet"], done=gold / "manifest.json")  # fmt: skip
    model = out / "init"
    b.run("init", [*TT, "model", "init", "--arch", a.arch, "--size", a.size, "--out",
                   str(model), "--tokenizer-corpus", str(gold), *a.init_args.split()],
          done=model / "tracetune_tiny.json")  # fmt: skip
    info = json.loads((model / "tracetune_tiny.json").read_text())
    b.results["model"] = {"parameters": info["parameters"], "vocab": info["vocab_size"]}

    b.evaluate("untrained", model, "step")
    if not a.skip_untrained_e2e:
        b.evaluate("untrained", model, "e2e")
    sft = b.sft("sft", gold, model, a.sft_time)
    b.evaluate("sft", sft, "step")
    b.evaluate("sft", sft, "e2e")

    explored = out / "explore"
    b.run("explore", [
        *TT, "prefs", "explore", "--tasks", str(tasks), "--policy", f"local:{sft}",
        "--verifier", "gold", "--k", str(a.k), "--out", str(explored), "--limit",
        str(a.explore_tasks), "--max-steps", str(a.max_steps), "--max-tokens",
        str(a.max_tokens), "--no-gold-anchor", "--max-time", a.explore_time, "--quiet",
    ], done=explored / "manifest.json")  # fmt: skip
    pairs = out / "pairs"
    b.run("pairs", [*TT, "prefs", "build", "--in", str(explored), "--out", str(pairs),
                    "--quiet"], done=pairs / "manifest.json")  # fmt: skip
    dpo = out / "dpo"
    dpo_cmd = [
        *TT, "train", "dpo", "--base", str(sft), "--pairs", str(pairs), "--out", str(dpo),
        "--full", "--epochs", "3", "--batch-size", "4", "--grad-accum", "1",
        "--no-gradient-checkpointing", "--max-time", a.dpo_time,
    ]  # fmt: skip
    if a.dpo_lr is not None:
        dpo_cmd += ["--lr", str(a.dpo_lr)]
    try:
        b.run("dpo", dpo_cmd, done=dpo / "tracetune_train.json")
    except SystemExit as exc:  # e.g. no pairs: report it, keep the SFT numbers
        b.results["stages"]["dpo"] = {"failed": str(exc)[:500]}
        b.save()
        print(exc, flush=True)
    labels = ["untrained", "sft"]
    if (dpo / "tracetune_train.json").is_file():
        b.evaluate("dpo", dpo, "step")
        b.evaluate("dpo", dpo, "e2e")
        labels.append("dpo")

    curve: dict[str, Any] = {}
    for size in [int(s) for s in a.curve.split(",") if s.strip()]:
        data = subset(gold, out / f"gold-{size}", size)
        trained = b.sft(f"sft-{size}", data, model, a.curve_time or a.sft_time)
        curve[str(size)] = b.evaluate(f"sft-{size}", trained, "step")
    b.results["curve"] = curve
    b.results["total_seconds"] = round(time.monotonic() - t_all, 1)
    b.results["table"] = table(b.results, labels)
    b.save()
    print(b.results["table"])
    for size, numbers in curve.items():
        print(
            f"curve {size:>5} trajectories: step tool accuracy {numbers['tool_accuracy']:.1f}, "
            f"valid {numbers['valid_actions']:.1f}, arguments {numbers['argument_accuracy']:.1f}"
        )
    for name, stage in b.results["stages"].items():
        print(f"stage {name}: {stage.get('seconds')} s (load {stage.get('load')})")


if __name__ == "__main__":
    main()
