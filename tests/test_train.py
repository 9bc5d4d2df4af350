"""Training: rows and loss masks, pre-training checks, SFT and DPO on tiny random VLMs.

Everything runs on CPU with ~250K-parameter models built from config (no hub, no network).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from tracetune.agent.formats import JsonFormat
from tracetune.agent.render import episode_messages
from tracetune.cli.train import accelerate_config_path
from tracetune.cli.train import app as train_app
from tracetune.models.base import Sampling, load_model
from tracetune.models.tiny import init_tiny
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
from tracetune.tools import get_tool
from tracetune.train.config import DPOConfig, LoraOptions, SFTConfig
from tracetune.train.data import (
    DataReport,
    TrainingDataError,
    check_sft_rows,
    pair_rows,
    sft_rows,
)
from tracetune.train.dpo import build_dpo_trainer, load_policy, preference_margins
from tracetune.train.model import training_chat_template
from tracetune.train.sft import build_sft_trainer, train_sft

FMT = JsonFormat()
CROP_TOOLS = ["image_crop", "final_answer"]
SUM_TOOLS = ["calculator", "final_answer"]
COLORS = ["red", "green", "blue"]
CROP = Action(
    type="tool_call",
    tool_call=ToolCall(name="image_crop", arguments={"image": "photo.png", "box": [0, 0, 56, 28]}),
)
# Fast settings for every run on the tiny models.
QUICK: dict[str, Any] = dict(
    batch_size=3,
    grad_accum=1,
    gradient_checkpointing=False,
    logging_steps=2,
    save_steps=1000,
    warmup=0,
    max_length=2048,
    group_by_length=False,
)


# -- records ---------------------------------------------------------------------------
def step(
    index: int,
    thought: str,
    action: Action,
    observation: str = "",
    images: list[Any] | None = None,
    error: StepError | None = None,
) -> Step:
    return Step(
        index=index,
        raw=FMT.render(thought, action),
        thought=thought,
        action=action,
        observation=None if error else Observation(text=observation, images=images or []),
        error=error,
    )


def answer(text: str) -> Action:
    return Action(type="final_answer", answer=text)


def crop_trajectories(root: Path, with_failed_step: bool = False) -> Dataset[Trajectory]:
    """Three episodes: crop the photo (same action each time), see the crop, name its color."""
    ds = Dataset.create(root, Trajectory)
    records = []
    for i, color in enumerate(COLORS):
        photo = ds.assets.put_image(Image.new("RGB", (56, 56), color), "photo.png")
        crop = ds.assets.put_image(Image.new("RGB", (56, 28), color), "crop.png")
        task = Task(
            id=f"t{i}", query="Crop the top half of the photo.", files=[photo], tools=CROP_TOOLS[:1]
        )
        steps = [
            step(0, "Crop the top half.", CROP, "image", images=[crop]),
            step(1, "The crop is plain.", answer(color), color),
        ]
        if with_failed_step:
            bad = Step(
                index=0,
                raw="I guess it is red.",
                error=StepError(kind=ErrorKind.PARSE, message="no action found"),
            )
            steps = [bad] + [s.model_copy(update={"index": s.index + 1}) for s in steps]
        records.append(
            Trajectory(
                id=f"traj-{color}",
                task=task,
                controller="scripted",
                tools=CROP_TOOLS,
                steps=steps,
                final_answer=color,
            )
        )
    ds.write_all(records)
    return ds


def sum_pairs(root: Path, numbers: list[tuple[int, int]]) -> Dataset[PreferencePair]:
    """Chosen: a well-formed calculator call. Rejected: a guess with no action at all."""
    ds = Dataset.create(root, PreferencePair)
    records = []
    for i, (a, b) in enumerate(numbers):
        photo = ds.assets.put_image(Image.new("RGB", (56, 56), COLORS[i % 3]), "photo.png")
        task = Task(id=f"p{a}-{b}", query=f"What is {a} + {b}?", files=[photo], tools=SUM_TOOLS[:1])
        call = Action(
            type="tool_call",
            tool_call=ToolCall(name="calculator", arguments={"expression": f"{a} + {b}"}),
        )
        chosen = step(0, "I will add the numbers.", call, str(a + b))
        rejected = Step(
            index=0,
            raw=f"I think the answer is {a + b + 7}.",
            error=StepError(kind=ErrorKind.PARSE, message="no action found"),
        )
        records.append(
            PreferencePair(
                id=f"pair-{a}-{b}",
                task=task,
                tools=SUM_TOOLS,
                chosen=chosen,
                rejected=rejected,
                verifier="test",
            )
        )
    ds.write_all(records)
    return ds


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = init_tiny(arch, tmp_path_factory.mktemp(arch) / "model", seed=0)
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return crop_trajectories(tmp_path_factory.mktemp("crops") / "data").root


def action_hits(model_spec: str, data: Path, adapter: Path | None = None) -> tuple[int, list[str]]:
    """Tasks whose first training action the model reproduces exactly (greedy), and outputs."""
    kwargs = {"adapter": str(adapter)} if adapter else {}
    model = load_model(model_spec, **kwargs)
    ds = Dataset.open(data, Trajectory)
    hits, outputs = 0, []
    for traj in ds:
        prompt = episode_messages(
            FMT.system_prompt([get_tool(n) for n in traj.tools]), traj.task, [], ds.assets.path
        )
        out = asyncio.run(model.generate(prompt, sampling=Sampling(max_tokens=64)))
        outputs.append(out.text)
        try:
            hits += FMT.parse(out.text).action == traj.steps[0].action
        except ValueError:
            pass
    return hits, outputs


# -- rows, masks and checks ------------------------------------------------------------
def test_rows_end_on_the_assistant_and_flag_failed_steps(tmp_path: Path) -> None:
    ds = crop_trajectories(tmp_path / "d", with_failed_step=True)
    rows = sft_rows([ds.root])
    assert len(rows) == 3
    row = rows[0]
    assert row["messages"][-1]["role"] == "assistant"  # the final answer's echo is dropped
    assert row["train_turns"] == [False, True, True]  # the unparsable step gets no loss
    assert "tools" not in row  # the system prompt lists the tools, as at inference
    placeholders = sum(p["type"] == "image" for m in row["messages"] for p in m["content"])
    assert placeholders == len(row["images"]) == 2 and all(Path(i).exists() for i in row["images"])
    assert sft_rows([ds.root], mask_failed_steps=False)[0]["train_turns"] == [True] * 3

    with pytest.raises(TrainingDataError, match="pair records.*train dpo"):
        sft_rows([sum_pairs(tmp_path / "p", [(1, 2)]).root])


def _loss(trainer: Any, inputs: dict[str, Any], labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, {**inputs, "labels": labels}))


def _replace_text(row: dict[str, Any], index: int, old: str, new: str) -> dict[str, Any]:
    messages = json.loads(json.dumps(row["messages"]))
    for part in messages[index]["content"]:
        if part.get("type") == "text" and old in (part.get("text") or ""):
            part["text"] = part["text"].replace(old, new)
            return {**row, "messages": messages}
    raise AssertionError(f"{old!r} not in message {index}")


def test_loss_is_on_trained_assistant_turns_only(models: Any, tmp_path: Path) -> None:
    data = crop_trajectories(tmp_path / "d", with_failed_step=True).root
    cfg = SFTConfig(base=str(models("qwen2_vl")), data=[data], out=tmp_path / "o", **QUICK)
    trainer, processor, _ = build_sft_trainer(cfg)
    row = dict(trainer.train_dataset[0])
    roles = [m["role"] for m in row["messages"]]
    # system, task, failed step, its error, crop, crop observation, answer
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    batch = trainer.data_collator([row])
    labels = batch.pop("labels")

    # The labelled tokens are exactly the trained assistant turns with their end-of-turn token.
    tok = processor.tokenizer
    labelled = tok.decode(labels[0][labels[0] != -100])
    raws = [m["content"][0]["text"] for m in row["messages"] if m["role"] == "assistant"]
    assert labelled == "".join(r + "<|im_end|>" for r in raws[1:])
    assert "guess" not in labelled  # the failed step is context only

    base = _loss(trainer, batch, labels)
    # The same input with the targets of a sample whose observation differs: no change...
    obs = trainer.data_collator([_replace_text(row, 5, "Observation: image", "Observation: chart")])
    assert obs["input_ids"].shape == batch["input_ids"].shape
    assert (obs["input_ids"] != batch["input_ids"]).any()
    assert torch.equal(obs["labels"], labels)
    assert _loss(trainer, batch, obs["labels"]) == base
    # ...and for one whose failed (masked) step differs, none either...
    failed = trainer.data_collator([_replace_text(row, 2, "is red", "is blue")])
    assert failed["input_ids"].shape == batch["input_ids"].shape
    assert _loss(trainer, batch, failed["labels"]) == base
    # ...but the targets of a sample whose assistant answer differs change the loss.
    asst = trainer.data_collator([_replace_text(row, 6, '"answer": "red"', '"answer": "car"')])
    assert asst["input_ids"].shape == batch["input_ids"].shape
    assert _loss(trainer, batch, asst["labels"]) != pytest.approx(base, abs=1e-6)


def test_collator_cache_encodes_each_row_once_within_its_byte_budget(
    models: Any, tmp_path: Path
) -> None:
    from tracetune.train.collate import AgentSFTCollator

    data = crop_trajectories(tmp_path / "d", with_failed_step=True).root
    cfg = SFTConfig(base=str(models("qwen2_vl")), data=[data], out=tmp_path / "o", **QUICK)
    trainer, processor, _ = build_sft_trainer(cfg)
    rows = [dict(trainer.train_dataset[i]) for i in range(3)]
    template = training_chat_template(processor)
    fresh = AgentSFTCollator(processor, template, cache=False)(rows)

    def two_epochs(collator: AgentSFTCollator) -> None:
        for _ in range(2):
            batch = collator(rows)
            assert set(batch) == set(fresh)
            for key, value in fresh.items():
                assert torch.equal(batch[key], value), key  # the cache changes no tensor

    unbounded = AgentSFTCollator(processor, template)
    two_epochs(unbounded)
    assert unbounded.encoded == len(rows)  # each row once
    first = AgentSFTCollator(processor, template)
    first([rows[0]])
    one_row = first.cached_bytes  # room for the first row, not for two
    assert 0 < one_row < unbounded.cached_bytes
    bounded = AgentSFTCollator(processor, template, cache_bytes=one_row)
    two_epochs(bounded)
    assert 0 < bounded.cached_bytes <= one_row
    assert len(bounded.cache or {}) == 1
    assert bounded.encoded == 1 + 2 * (len(rows) - 1)  # rows past the budget: every epoch


def test_cpu_head_projects_only_labelled_positions_and_matches_trls_head(
    models: Any, tmp_path: Path
) -> None:
    from transformers import AutoModelForImageTextToText
    from trl.trainer.utils import add_fused_lm_head

    data = crop_trajectories(tmp_path / "d", with_failed_step=True).root
    cfg = SFTConfig(
        base=str(models("qwen2_vl")), data=[data], out=tmp_path / "o", full=True, **QUICK
    )
    trainer, _, _ = build_sft_trainer(cfg)
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(3)])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["labels"][:, 1:].numel() // 2  # most positions carry no loss

    # TRL's own fused head on the same weights, for reference.
    reference = AutoModelForImageTextToText.from_pretrained(models("qwen2_vl"))
    add_fused_lm_head(reference, outputs=("log_probs", "entropy", "is_top1"))
    projected: list[int] = []
    head = trainer.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, args, _o: projected.append(args[0].shape[0]))
    ours = trainer.model(**batch, fused_lm_head=True)
    hook.remove()
    theirs = reference(**batch, fused_lm_head=True)

    assert projected == [labelled]  # only the labelled positions reach the LM head
    assert torch.allclose(ours.loss, theirs.loss, atol=1e-5)
    for name in ("log_probs", "entropy"):
        assert torch.allclose(getattr(ours, name), getattr(theirs, name), atol=1e-5), name
    assert torch.equal(ours.is_top1, theirs.is_top1)
    assert torch.equal(ours.label_mask, theirs.label_mask)
    ours.loss.backward()
    theirs.loss.backward()
    grads = dict(reference.named_parameters())
    for name, param in trainer.model.named_parameters():
        if param.grad is not None:
            assert torch.allclose(param.grad, grads[name].grad, atol=1e-6), name
    # Without fused_lm_head the forward is the model's own, with its signature, which
    # `generate` checks its arguments against.
    assert "pixel_values" in inspect.signature(trainer.model.forward).parameters
    assert trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits is not None


def test_placeholder_and_image_token_mismatches_name_the_record(
    models: Any, crops: Path, tmp_path: Path
) -> None:
    from transformers import AutoConfig

    from tracetune.models.processors import load_processor

    path = models("qwen2_vl")
    processor, config = load_processor(path), AutoConfig.from_pretrained(path)
    rows = sft_rows([crops])

    extra = json.loads(json.dumps(rows[1]))
    extra["messages"][1]["content"].insert(0, {"type": "image"})
    with pytest.raises(TrainingDataError, match="traj-green: 3 image placeholders but 2 images"):
        check_sft_rows([rows[0], extra], processor, config, max_length=4096)

    literal = _replace_text(rows[2], 3, "Observation: image", "Observation: <|image_pad|>")
    with pytest.raises(TrainingDataError, match="record traj-blue: message 3.*literal image token"):
        check_sft_rows([literal], processor, config, max_length=4096)

    # A processor that merges patches differently from the model: caught before any step.
    processor.image_processor.merge_size = 1
    with pytest.raises(
        TrainingDataError,
        match=r"(?s)3 record\(s\).*traj-red: the tokenized "
        r"sample holds 24 image tokens but its 2 image\(s\) give 6 image features",
    ):
        check_sft_rows(rows, processor, config, max_length=4096)

    # Through the trainer: the bad record stops the run before any checkpoint is written.
    bad = crop_trajectories(tmp_path / "bad")
    traj = next(iter(bad)).model_copy(deep=True)
    traj.id = "traj-literal"
    traj.task.query = "Crop <|vision_start|> the photo."
    bad.write_all([traj])
    cfg = SFTConfig(base=str(path), data=[bad.root], out=tmp_path / "o", max_steps=1, **QUICK)
    with pytest.raises(TrainingDataError, match="traj-literal"):
        train_sft(cfg)
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_overlong_samples_are_dropped_or_cut_at_a_turn(models: Any, crops: Path) -> None:
    from transformers import AutoConfig

    from tracetune.models.processors import load_processor

    path = models("qwen2_vl")
    processor, config = load_processor(path), AutoConfig.from_pretrained(path)
    template = training_chat_template(processor)
    full = check_sft_rows(sft_rows([crops]), processor, config, max_length=4096)
    length = full[0]["length"]

    report = DataReport()
    kept = check_sft_rows(
        sft_rows([crops]), processor, config, max_length=length - 1, report=report
    )
    assert kept == [] and [i for i, _ in report.dropped] == [r["id"] for r in full]

    report = DataReport()
    cut = check_sft_rows(
        sft_rows([crops]),
        processor,
        config,
        max_length=length - 1,
        overlong="truncate",
        chat_template=template,
        report=report,
    )
    assert [(i, k, n) for i, k, n in report.truncated] == [(r["id"], 1, 2) for r in full]
    row = cut[0]
    # Cut after the first assistant turn: its observation image is gone with it, the task's
    # image stays whole.
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert len(row["images"]) == 1 and row["train_turns"] == [True]
    assert row["length"] < length - 1


# -- configs, CLI and launch files -------------------------------------------------------
def test_config_maps_onto_trl_and_rejects_unsafe_options(tmp_path: Path) -> None:
    cfg = SFTConfig(
        base="m", data=[tmp_path], out=tmp_path / "o", lr=3e-4, trl={"max_grad_norm": 0.5}
    )
    args = cfg.to_trl()
    assert args.learning_rate == 3e-4 and args.max_grad_norm == 0.5
    assert args.assistant_only_loss and not args.packing and not args.padding_free
    assert args.max_length is None and not args.bf16  # no CUDA here: fp32
    assert args.output_dir == str(tmp_path / "o" / "checkpoints")
    full = SFTConfig(base="m", data=[tmp_path], out=tmp_path, full=True).to_trl()
    assert full.learning_rate == 1e-5
    dpo = DPOConfig(base="m", pairs=[tmp_path], out=tmp_path, beta=0.3).to_trl()
    assert dpo.beta == 0.3 and dpo.loss_type == ["sigmoid"] and not dpo.precompute_ref_log_probs

    with pytest.raises(ValueError, match="packing concatenates samples"):
        SFTConfig(base="m", data=[tmp_path], out=tmp_path, trl={"packing": True})
    with pytest.raises(ValueError, match="unknown trl option.*not_an_option"):
        SFTConfig(base="m", data=[tmp_path], out=tmp_path, trl={"not_an_option": 1}).to_trl()
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        SFTConfig(base="m", data=[tmp_path], out=tmp_path, precision="bf16").to_trl()
    for cls in (SFTConfig, DPOConfig, LoraOptions):
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no help text"


def test_accelerate_configs_load(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}
    for name, kind in kinds.items():
        cfg = load_config_from_file(str(accelerate_config_path(name)))
        assert cfg.distributed_type.value == kind
    assert (
        load_config_from_file(str(accelerate_config_path("zero3"))).deepspeed_config["zero_stage"]
        == 3
    )
    result = CliRunner().invoke(
        train_app,
        ["accelerate-config", "zero2", "--num-processes", "4", "--out", str(tmp_path / "z2.yaml")],
    )
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "z2.yaml").read_text())["num_processes"] == 4


# -- training runs -------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_drives_loss_down_and_the_model_reproduces_its_training_action(
    models: Any, crops: Path, tmp_path: Path
) -> None:
    base = models("qwen2_vl")
    cfg = SFTConfig(
        base=str(base),
        data=[crops],
        out=tmp_path / "sft",
        full=True,
        max_steps=60,
        lr=1e-2,
        scheduler="constant",
        weight_decay=0.0,
        **QUICK,
    )
    result = train_sft(cfg)
    losses = result.losses()
    assert result.steps == 60 and len(losses) == 30
    assert losses[-1] < 0.2 * losses[0], losses
    record = json.loads((tmp_path / "sft" / "tracetune_train.json").read_text())
    assert record["data"]["kept"] == 3 and record["steps"] == 60

    trained, outputs = action_hits(result.model_spec, crops)
    untrained, _ = action_hits(f"local:{base}", crops)
    assert trained >= 2 and trained > untrained, (trained, untrained, outputs)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_lora_sft_per_family_loads_back_and_merges(
    arch: str, models: Any, crops: Path, tmp_path: Path
) -> None:
    from tracetune.models.local import merge_adapter

    base = models(arch)
    out = tmp_path / "lora"
    cfg = SFTConfig(
        base=str(base),
        data=[crops],
        out=out,
        max_steps=8,
        lr=5e-3,
        lora={"targets": "attention", "dropout": 0.0},
        **QUICK,
    )
    result = train_sft(cfg)
    losses = result.losses()
    # A random tiny model's output layer caps how far adapters alone can move the loss
    # (full fine-tuning above goes much further), but it must move.
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses

    # Adapters sit on the language model's attention projections only: the vision tower,
    # whose CLIP attention also has q/k/v_proj layers, stays untouched.
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".self_attn." in k and "language_model" in k for k in keys), keys[:5]
    assert {k.split(".self_attn.")[1].split(".")[0] for k in keys} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base.resolve()
    )

    # The adapter loads through local:, changes the model, and merges to the same model.
    prompt = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (56, 56))},
                {"type": "text", "text": "Crop the photo."},
            ],
        }
    ]
    tuned = load_model(result.model_spec, adapter=str(out))
    plain = load_model(f"local:{base}")
    merged_dir = merge_adapter(base, out, tmp_path / "merged")
    merged = load_model(f"local:{merged_dir}")

    def logits(m: Any) -> torch.Tensor:
        with torch.no_grad():
            return m.model(**m.encode(prompt)).logits[0, -1]

    assert not torch.allclose(logits(tuned), logits(plain), atol=1e-4)
    assert torch.allclose(logits(tuned), logits(merged), atol=1e-4)


@pytest.mark.slow
def test_sft_cli_resumes_from_its_checkpoint(models: Any, crops: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    yaml_cfg = tmp_path / "sft.yaml"
    yaml_cfg.write_text(
        yaml.safe_dump({**QUICK, "save_steps": 2, "lora": {"targets": "attention"}, "lr": 1e-3})
    )
    args = [
        "sft",
        "--base",
        str(models("qwen2_vl")),
        "--data",
        str(crops),
        "--out",
        str(out),
        "--lora-r",
        "4",
        "--config",
        str(yaml_cfg),
    ]
    runner = CliRunner()
    first = runner.invoke(train_app, [*args, "--max-steps", "2"])
    assert first.exit_code == 0, first.output
    assert "sft: 2 steps" in first.output and "local:" in first.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    again = runner.invoke(train_app, [*args, "--max-steps", "4"])
    assert again.exit_code != 0 and "--resume" in again.output  # never mixes two runs silently

    resumed = runner.invoke(train_app, [*args, "--max-steps", "4", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    # Steps 1-2 came from the checkpoint: the resumed run logged only steps 3-4.
    assert state["global_step"] == 4
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [2, 4]
    assert json.loads((out / "tracetune_train.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_dpo_from_an_sft_adapter_raises_the_margin_on_held_out_pairs(
    models: Any, crops: Path, tmp_path: Path
) -> None:
    sft = train_sft(
        SFTConfig(
            base=str(models("qwen2_vl")),
            data=[crops],
            out=tmp_path / "sft",
            max_steps=2,
            lr=1e-3,
            **QUICK,
        )
    )
    train = sum_pairs(tmp_path / "train", [(3, 4), (12, 30), (8, 9), (25, 17), (6, 2), (14, 15)])
    held_out = sum_pairs(tmp_path / "held", [(5, 7), (21, 13), (9, 40)])

    out = tmp_path / "dpo"
    result = CliRunner().invoke(
        train_app,
        [
            "dpo",
            "--base",
            str(sft.out),
            "--pairs",
            str(train.root),
            "--out",
            str(out),
            "--beta",
            "0.1",
            "--max-steps",
            "12",
            "--lr",
            "2e-2",
            "--batch-size",
            "3",
            "--grad-accum",
            "1",
            "--no-gradient-checkpointing",
        ],
    )
    assert result.exit_code == 0, result.output
    merged = out / "sft_merged"
    # The SFT adapter was merged first, so the reference (DPO adapter disabled) is the SFT model.
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        merged.resolve()
    )
    record = json.loads((out / "tracetune_train.json").read_text())
    assert record["kind"] == "dpo" and record["data"]["kept"] == 6 and record["steps"] == 12
    # No second model in memory: TRL's reference is the policy with the adapter disabled.
    trainer, _, _, start = build_dpo_trainer(
        DPOConfig(base=str(sft.out), pairs=[train.root], out=out, **QUICK)
    )
    assert trainer.ref_model is None and hasattr(trainer.model, "disable_adapter")
    assert start == str(merged.resolve())

    rows = pair_rows([held_out.root])
    before = preference_margins(*load_policy(merged), rows)
    after = preference_margins(*load_policy(merged, adapter=out), rows)
    print("held-out margins before/after DPO:", before, after)
    assert sum(after) / 3 > sum(before) / 3 + 1.0, (before, after)
    assert all(a > b for a, b in zip(after, before, strict=True))
