"""Our SFT and DPO training steps against plain TRL trainers on the same tiny model and data.

"Plain TRL" is what a user writes from TRL's docs: ``SFTTrainer`` with its own vision
collator and ``assistant_only_loss=True``, or ``DPOTrainer``, on the same rows, the same
LoRA config and the same optimizer settings, with a random sampler. Ours adds the
pre-training checks, per-turn masks and length-grouped batches (``tracetune.train``).

Each variant runs in its own process so peak memory is its own: CUDA peak allocation on a
GPU, peak resident set size (RSS) on CPU (which includes the Python/torch baseline of the
process, so CPU ratios understate differences). Time per step is the mean over the steps
after ``--warmup`` (a mean, since grouping by length changes which batches are long); each
variant runs ``--repeats`` times in alternating order and the fastest run counts, which
damps interference from other work on the machine. The padding fraction is padded token
slots / all token slots per batch. Length grouping needs a dataset of at least ~8 batches
(transformers sorts within mega-batches of up to 50 batches, a quarter of the data).

    python bench/train_step.py                       # tiny Qwen2-VL, 96 trajectories, 1 epoch
    python bench/train_step.py --arch llava --records 200 --batch-size 8

Prints a markdown table.

``--scratch 250k,5m`` measures instead what training a controller from scratch costs: full
SFT of controllers built by ``tracetune model init`` at those sizes (tokenizer trained on
the same trajectories), in samples per second over ``--epochs`` passes, with the collator's
per-row encoding cache on (encode once, then only pad) and off (re-render and re-process
every sample every epoch, as TRL's collator does)::

    python bench/train_step.py --scratch 250k,5m --records 64 --epochs 3 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("ours-sft", "trl-sft", "ours-dpo", "trl-dpo")


# -- data -----------------------------------------------------------------------------------
def make_data(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """Trajectories of 1-6 steps (so lengths vary) and step-wise pairs, with images."""
    import random

    from PIL import Image

    from tracetune.agent.formats import JsonFormat
    from tracetune.schema import (
        Action,
        ErrorKind,
        Observation,
        PreferencePair,
        Step,
        StepError,
        Task,
        ToolCall,
        Trajectory,
    )
    from tracetune.store import Dataset

    rng = random.Random(seed)
    fmt = JsonFormat()
    trajs = Dataset.create(root / "trajectories", Trajectory)
    pairs = Dataset.create(root / "pairs", PreferencePair)
    t_records, p_records = [], []
    for i in range(n):
        side = rng.choice([56, 84, 112])
        photo = trajs.assets.put_image(
            Image.new("RGB", (side, side), (rng.randrange(256), 90, 160)), "photo.png"
        )
        pairs.assets.import_from(trajs.assets, photo)
        task = Task(
            id=f"t{i}",
            query=f"What is the sum of the first {i + 2} numbers?",
            files=[photo],
            tools=["calculator"],
        )
        steps = []
        for k in range(rng.randint(1, 5)):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            call = Action(
                type="tool_call",
                tool_call=ToolCall(name="calculator", arguments={"expression": f"{a} + {b}"}),
            )
            thought = f"Add {a} and {b}."
            steps.append(
                Step(
                    index=k,
                    raw=fmt.render(thought, call),
                    thought=thought,
                    action=call,
                    observation=Observation(text=str(a + b)),
                )
            )
        final = Action(type="final_answer", answer=str(i))
        steps.append(
            Step(
                index=len(steps),
                raw=fmt.render("Done.", final),
                thought="Done.",
                action=final,
                observation=Observation(text=str(i)),
            )
        )
        t_records.append(
            Trajectory(
                id=f"traj{i}",
                task=task,
                controller="bench",
                tools=["calculator", "final_answer"],
                steps=steps,
                final_answer=str(i),
            )
        )
        cut = rng.randrange(len(steps))
        rejected = Step(
            index=cut,
            raw=f"The answer is {rng.randint(0, 999)}.",
            error=StepError(kind=ErrorKind.PARSE, message="no action"),
        )
        p_records.append(
            PreferencePair(
                id=f"pair{i}",
                task=task,
                tools=["calculator", "final_answer"],
                prefix=steps[:cut],
                chosen=steps[cut],
                rejected=rejected,
            )
        )
    trajs.write_all(t_records)
    pairs.write_all(p_records)
    return trajs.root, pairs.root


# -- one variant, in a child process ----------------------------------------------------
class _Counting:
    """Wraps a collator to count padding (does not change the batches)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fractions: list[float] = []

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(rows)
        mask = batch["attention_mask"]
        self.fractions.append(1.0 - float(mask.sum()) / mask.numel())
        return batch


def _step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def _common(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return dict(
        base=str(args.model),
        out=out,
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=1,
        lr=1e-4,
        warmup=0,
        logging_steps=1000,
        save_steps=100_000,
        gradient_checkpointing=False,
        max_length=args.max_length,
        seed=args.seed,
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
    )


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tracetune.train.config import DPOConfig, SFTConfig
    from tracetune.train.dpo import build_dpo_trainer
    from tracetune.train.sft import build_sft_trainer

    torch.manual_seed(args.seed)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{args.variant}-"))
    timer = _step_timer()
    sft = args.variant.endswith("sft")
    if sft:
        cfg: Any = SFTConfig(data=[args.trajectories], **_common(args, out))
    else:
        cfg = DPOConfig(pairs=[args.pairs], beta=0.1, **_common(args, out))
    if args.variant.startswith("trl"):
        trainer = _plain_trl(cfg, sft, timer)
    elif sft:
        trainer, _, _ = build_sft_trainer(cfg, callbacks=[timer])
    else:
        trainer, _, _, _ = build_dpo_trainer(cfg, callbacks=[timer])
    counting = _Counting(trainer.data_collator)
    trainer.data_collator = counting
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steady = timer.times[args.warmup :] or timer.times
    return {
        "variant": args.variant,
        "step_s": statistics.mean(steady),
        "peak_mb": peak,
        "rss_before_mb": rss_before,
        "padding": statistics.mean(counting.fractions),
        "steps": len(timer.times),
    }


def _plain_trl(cfg: Any, sft: bool, timer: Any) -> Any:
    """A plain TRL trainer on the same rows, model and LoRA settings as ours."""
    from datasets import Dataset as HFDataset
    from trl import DPOTrainer, SFTTrainer

    from tracetune.train.model import load_for_training, lora_config

    model, processor = load_for_training(cfg)
    args = cfg.to_trl()
    # What a TRL user gets: random batches and TRL's own collator.
    args.train_sampling_strategy = "random"
    args.remove_unused_columns = True
    keys = ("messages", "images") if sft else ("prompt", "chosen", "rejected", "images")
    rows = [{k: r[k] for k in keys} for r in _rows(cfg, sft)]
    trainer_cls = SFTTrainer if sft else DPOTrainer
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=HFDataset.from_list(rows),
        processing_class=processor,
        peft_config=lora_config(cfg, model),
        callbacks=[timer],
    )


def _rows(cfg: Any, sft: bool) -> list[dict[str, Any]]:
    from tracetune.train.data import pair_rows, sft_rows

    return sft_rows(cfg.data) if sft else pair_rows(cfg.pairs)


# -- driver -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen2_vl")
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--steps", type=int, default=None, help="Default: one epoch.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", default="", help="Sizes for from-scratch full SFT.")
    parser.add_argument("--epochs", type=float, default=3.0, help="--scratch: passes.")
    parser.add_argument("--threads", type=int, default=1, help="--scratch: torch threads.")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trajectories", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant and args.variant.startswith("scratch"):
        print("RESULT " + json.dumps(run_scratch_variant(args)), flush=True)
        return
    if args.variant:  # child process
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    if args.scratch:
        scratch_main(args)
        return

    from tracetune.models.tiny import init_tiny

    args.steps = args.steps or args.records // args.batch_size
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    model = init_tiny(args.arch, root / "model", seed=args.seed)
    trajectories, pairs = make_data(root / "data", args.records, args.seed)
    results: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            result = _run_child(args, variant, model, trajectories, pairs)
            best = results.get(variant)
            if best is None or result["step_s"] < best["step_s"]:
                results[variant] = result

    memory = "CUDA peak allocated" if _cuda() else "peak RSS"
    print(
        f"\n{args.arch} tiny model, {args.records} records, batch {args.batch_size}, "
        f"{args.steps} steps (mean after {args.warmup}, best of {args.repeats}), LoRA r=16; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"memory = {memory}; load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| stage | ours s/step | TRL s/step | time ratio | ours MB | TRL MB | memory ratio "
        "| ours padding | TRL padding |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for stage in ("sft", "dpo"):
        o, t = results[f"ours-{stage}"], results[f"trl-{stage}"]
        print(
            f"| {stage.upper()} | {o['step_s']:.3f} | {t['step_s']:.3f} | "
            f"{o['step_s'] / t['step_s']:.2f} | {o['peak_mb']:.0f} | {t['peak_mb']:.0f} | "
            f"{o['peak_mb'] / t['peak_mb']:.2f} | {o['padding']:.1%} | {t['padding']:.1%} |"
        )


def _run_child(
    args: argparse.Namespace, variant: str, model: Path, trajectories: Path, pairs: Path
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--model",
        str(model),
        "--trajectories",
        str(trajectories),
        "--pairs",
        str(pairs),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--seed",
        str(args.seed),
        "--epochs",
        str(args.epochs),
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(line[len("RESULT ") :]))


# -- from-scratch full SFT: samples per second -------------------------------------------
def run_scratch_variant(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tracetune.train.config import SFTConfig
    from tracetune.train.sft import build_sft_trainer

    torch.manual_seed(args.seed)
    cache = args.variant.endswith("-cache")
    out = Path(tempfile.mkdtemp(prefix=f"bench-{args.variant}-"))
    cfg = SFTConfig(
        base=str(args.model), data=[args.trajectories], out=out, full=True,
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=1, lr=1e-3, warmup=0,
        logging_steps=1000, save_steps=100_000, gradient_checkpointing=False,
        max_length=args.max_length, seed=args.seed, threads=args.threads,
    )  # fmt: skip
    trainer, _, report = build_sft_trainer(cfg)
    if not cache:
        trainer.data_collator.cache = None
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    samples = report.kept * args.epochs
    tokens = sum(report.lengths) * args.epochs
    return {
        "variant": args.variant,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "median_tokens": sorted(report.lengths)[len(report.lengths) // 2],
        "encoded": trainer.data_collator.encoded,
        "load": os.getloadavg()[0],
    }


def scratch_main(args: argparse.Namespace) -> None:
    from tracetune.formats.corpus import corpus_from_datasets
    from tracetune.models.tiny import init_model

    args.steps = args.steps or 0  # unused: --scratch runs whole epochs
    root = Path(tempfile.mkdtemp(prefix="bench-scratch-"))
    trajectories, _ = make_data(root / "data", args.records, args.seed)
    corpus = corpus_from_datasets([trajectories])
    print(
        f"\nfull SFT from scratch, {args.records} trajectories x {args.epochs} epochs, batch "
        f"{args.batch_size}, {args.threads} thread(s); {os.cpu_count()} CPUs\n"
    )
    print(
        "| size | parameters | tokens/sample (median) | cache | samples/s | tokens/s "
        "| rows encoded | load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in [x.strip() for x in args.scratch.split(",") if x.strip()]:
        model = init_model(args.arch, root / f"model-{size}", size, corpus=corpus)
        params = json.loads((model / "tracetune_tiny.json").read_text())["parameters"]
        for cache in ("nocache", "cache"):
            r = _run_child(args, f"scratch-{size}-{cache}", model, trajectories, trajectories)
            print(
                f"| {size} | {params:,} | {r['median_tokens']} | {cache == 'cache'} | "
                f"{r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['encoded']} | "
                f"{r['load']:.1f} |",
                flush=True,
            )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
