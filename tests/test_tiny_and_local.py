"""Tiny VLMs built from config, processor loading, and the ``local:`` backend."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tracetune.models import BackendError, ModelOptions, Sampling, load_model
from tracetune.models.local import LocalVLM
from tracetune.models.processors import (
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlyQwen2VLProcessor,
    load_processor,
)
from tracetune.models.tiny import init_tiny

ARCHS = ["qwen2_vl", "qwen2_5_vl", "llava", "idefics3"]
IMAGE_TOKEN = {
    "qwen2_vl": "<|image_pad|>",
    "qwen2_5_vl": "<|image_pad|>",
    "llava": "<image>",
    "idefics3": "<image>",
}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model", seed=0)


@pytest.fixture(scope="module")
def local(tiny: Path) -> LocalVLM:
    model = load_model(f"local:{tiny}")
    assert isinstance(model, LocalVLM)
    return model


def arch_of(path: Path) -> str:
    return str(json.loads((path / "tracetune_tiny.json").read_text())["arch"])


def image_chat(size: int = 112) -> list[dict[str, Any]]:
    png = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(png, format="PNG")
    return [
        {"role": "system", "content": "You solve tasks with tools."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (size, size), (10, 120, 240))},
                {"type": "image", "image": png.getvalue()},  # encoded bytes work too
                {"type": "text", "text": "What is the total on the receipt?"},
            ],
        },
    ]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- building and reloading -------------------------------------------------------------------
def test_init_tiny_builds_small_deterministic_reloadable_model(tiny: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    arch = arch_of(tiny)
    model = AutoModelForImageTextToText.from_pretrained(tiny)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n_params <= 1_000_000
    assert json.loads((tiny / "tracetune_tiny.json").read_text())["parameters"] == n_params

    processor = load_processor(tiny)
    tok = processor.tokenizer
    assert 512 <= len(tok) <= 1024
    assert model.config.get_text_config().vocab_size == len(tok)
    # The config must point at the tokenizer's real special-token ids.
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN[arch])
    config_image_id = getattr(model.config, "image_token_id", None)
    if config_image_id is None:
        config_image_id = model.config.image_token_index
    assert config_image_id == image_id
    # Agent vocabulary encodes compactly (the corpus taught the tokenizer these words).
    # (byte-level pre-tokenization splits at '_', so 'final_answer' is at best 3 pieces).
    assert len(tok("Thought", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok("final_answer", add_special_tokens=False)["input_ids"]) == 3

    same = AutoModelForImageTextToText.from_pretrained(init_tiny(arch, tmp_path / "a", seed=0))
    other = AutoModelForImageTextToText.from_pretrained(init_tiny(arch, tmp_path / "b", seed=1))
    for (name, p), q in zip(model.state_dict().items(), same.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    pairs = zip(model.parameters(), other.parameters(), strict=True)
    assert any(not torch.equal(p, r) for p, r in pairs)
    rebuilt_tokenizer = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert rebuilt_tokenizer == (tiny / "tokenizer.json").read_bytes()


def test_image_costs_sixteen_tokens(local: LocalVLM, tiny: Path) -> None:
    inputs = local.encode(image_chat(112))
    image_id = local.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[arch_of(tiny)])
    assert int((inputs["input_ids"] == image_id).sum()) == 2 * 16


def test_chat_template_marks_only_assistant_turns_for_training(tiny: Path) -> None:
    tok = load_processor(tiny).tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": "Thought: add.\nAction: calculator"},
        {"role": "tool", "content": "Observation: 4"},
        {"role": "assistant", "content": [{"type": "text", "text": "final_answer(4)"}]},
    ]
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    trained = tok.decode(
        [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    )
    eos = tok.eos_token
    assert trained == f"Thought: add.\nAction: calculator{eos}final_answer(4){eos}"
    rendered = tok.decode(out["input_ids"])
    assert "Observation: 4" in rendered and "Be brief." in rendered


# -- the local: backend ---------------------------------------------------------------------
def test_generate_image_chat_returns_n_completions_with_usage(local: LocalVLM) -> None:
    gen = run(local.generate(image_chat(), n=3, sampling=Sampling(max_tokens=12)))
    assert len(gen.completions) == 3
    assert len(set(gen.texts)) == 1  # greedy: n copies of one answer
    assert all(c.finish_reason in ("stop", "length") for c in gen.completions)
    prompt_len = int(local.encode(image_chat())["input_ids"].shape[1])
    assert gen.usage.prompt_tokens == prompt_len
    assert 1 <= gen.usage.completion_tokens <= 12
    assert gen.usage.calls == 1
    assert gen.latency_s > 0


def test_seeded_sampling_is_reproducible(local: LocalVLM) -> None:
    sampling = Sampling(temperature=1.0, max_tokens=12, seed=7)
    a = run(local.generate(image_chat(), n=4, sampling=sampling))
    b = run(local.generate(image_chat(), n=4, sampling=sampling))
    c = run(
        local.generate(image_chat(), n=4, sampling=Sampling(temperature=1.0, max_tokens=12, seed=8))
    )
    assert len(a.texts) == 4
    assert a.texts == b.texts
    assert a.texts != c.texts
    assert len(set(a.texts)) > 1  # n samples, not n copies


def test_stop_strings_cut_the_output(local: LocalVLM) -> None:
    full = run(local.generate(image_chat(), sampling=Sampling(max_tokens=24))).text
    # A stop string taken from the middle of what the model says anyway.
    start = next(i for i in range(3, len(full) - 1) if full[i].isalnum())
    stop = full[start]
    cut = run(local.generate(image_chat(), sampling=Sampling(max_tokens=24, stop=(stop,))))
    assert cut.text == full[: full.index(stop)]
    assert stop not in cut.text
    assert cut.completions[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= 24


def test_concurrent_episodes_share_the_model(local: LocalVLM, tmp_path: Path) -> None:
    """Four agent episodes in flight at once all call the one loaded model: its calls
    overlap (each episode's request is waiting while the others are), no second copy of the
    weights is made, and every episode gets its own answer from it."""
    from tracetune.agent import Agent
    from tracetune.schema import Task
    from tracetune.store import AssetStore
    from tracetune.tools import get_tool

    weights = {id(p) for p in local.model.parameters()}
    in_flight = peak = 0
    models_seen: set[int] = set()
    generate, blocking = local.generate, local.generate_blocking

    async def counting_generate(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await generate(*args, **kwargs)
        finally:
            in_flight -= 1

    def recording_blocking(*args: Any, **kwargs: Any) -> Any:
        models_seen.add(id(local.model))
        return blocking(*args, **kwargs)

    local.generate = counting_generate  # type: ignore[method-assign]
    local.generate_blocking = recording_blocking  # type: ignore[method-assign]
    try:
        agent = Agent(local, [get_tool("calculator")], max_steps=2, sampling=Sampling(max_tokens=8))
        source, assets = AssetStore(tmp_path / "src"), AssetStore(tmp_path / "out")

        async def episodes() -> list[Any]:
            return await asyncio.gather(
                *(agent.run(Task(id=f"t{i}", query="2+2?"), source, assets) for i in range(4))
            )

        trajectories = run(episodes())
    finally:
        del local.generate, local.generate_blocking
    assert len(trajectories) == 4 and {t.task.id for t in trajectories} == {"t0", "t1", "t2", "t3"}
    assert all(t.steps for t in trajectories)  # each episode got model output
    assert peak >= 2  # the episodes' model calls were in flight together
    assert models_seen == {id(local.model)}
    assert {id(p) for p in local.model.parameters()} == weights  # no copy was loaded


def test_lora_adapter_loads_changes_logits_and_merges(
    local: LocalVLM, tiny: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from tracetune.cli.model import app

    torch.manual_seed(3)
    base = AutoModelForImageTextToText.from_pretrained(tiny)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    b_weights = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert b_weights
    with torch.no_grad():
        for p in b_weights:  # PEFT starts B at zero (a no-op adapter): make it do something
            p.normal_(std=0.5)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)

    adapted = load_model(f"local:{tiny}", adapter=str(adapter_dir))
    assert isinstance(adapted, LocalVLM)
    inputs = local.encode(image_chat())
    with torch.no_grad():
        base_logits = local.model(**inputs).logits
        lora_logits = adapted.model(**inputs).logits
    assert not torch.allclose(base_logits, lora_logits, atol=1e-4)
    assert run(adapted.generate(image_chat(), sampling=Sampling(max_tokens=4))).usage.calls == 1

    merged_dir = tmp_path / "merged"
    result = CliRunner().invoke(
        app, ["merge", "--base", str(tiny), "--adapter", str(adapter_dir), "--out", str(merged_dir)]
    )
    assert result.exit_code == 0, result.output
    merged = load_model(f"local:{merged_dir}")
    assert isinstance(merged, LocalVLM)
    with torch.no_grad():
        merged_logits = merged.model(**merged.encode(image_chat())).logits
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-4, rtol=1e-4)


# -- templates, tools, options, errors (one family is enough) --------------------------------
@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny("qwen2_vl", tmp_path_factory.mktemp("qwen") / "model")


def test_tools_reach_templates_that_render_them(qwen_dir: Path) -> None:
    model = LocalVLM(str(qwen_dir))
    tools = [{"type": "function", "function": {"name": "image_crop", "parameters": {}}}]
    prompt, images = model.render(image_chat(), tools)
    assert '"name": "image_crop"' in prompt
    assert len(images) == 2 and all(isinstance(i, Image.Image) for i in images)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tool_turns_become_user_turns_without_a_tool_role(qwen_dir: Path, tmp_path: Path) -> None:
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(qwen_dir, plain)
    # A template that knows only system/user/assistant and rejects anything else.
    (plain / "chat_template.jinja").write_text(
        "{% for m in messages %}"
        "{% if m.role not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('bad role ' + m.role) }}{% endif %}"
        "<|im_start|>{{ m.role }}\n"
        "{% if m.content is string %}{{ m.content }}{% else %}"
        "{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% else %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    model = LocalVLM(str(plain))
    assert not model.supports_tool_role and not model.supports_tools
    messages = image_chat() + [
        {"role": "assistant", "content": "Action: ocr"},
        {"role": "tool", "content": "Observation: TOTAL 42"},
    ]
    prompt, _ = model.render(messages, tools=[{"type": "function", "function": {"name": "x"}}])
    assert "<|im_start|>user\nObservation: TOTAL 42<|im_end|>" in prompt
    gen = run(model.generate(messages, sampling=Sampling(max_tokens=3)))
    assert gen.usage.completion_tokens >= 1

    ours = LocalVLM(str(qwen_dir))
    assert ours.supports_tool_role
    assert "<|im_start|>tool\nObservation: TOTAL 42" in ours.render(messages)[0]


def test_max_pixels_bounds_qwen_image_tokens(qwen_dir: Path, tmp_path: Path) -> None:
    processor = load_processor(qwen_dir, max_pixels=56 * 56)
    assert isinstance(processor, ImageOnlyQwen2VLProcessor)
    out = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>hi"],
        images=[Image.new("RGB", (112, 112))],
    )
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]  # 16 patches -> 4 tokens after merge
    model = LocalVLM(str(qwen_dir), ModelOptions(max_pixels=56 * 56))
    pad = model.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((model.encode(image_chat())["input_ids"] == pad).sum()) == 2 * 4

    llava = init_tiny("llava", tmp_path / "llava")
    with pytest.raises(ValueError, match="Qwen-style"):
        load_processor(llava, max_pixels=56 * 56)


def test_qwen2_5_processor_class_and_saved_name(tmp_path: Path) -> None:
    path = init_tiny("qwen2_5_vl", tmp_path / "q25")
    assert isinstance(load_processor(path), ImageOnlyQwen2_5_VLProcessor)
    # Saved under the standard name so AutoProcessor reads it where torchvision exists.
    saved = json.loads((path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor"


def test_response_cache_answers_repeated_calls(qwen_dir: Path, tmp_path: Path) -> None:
    from tracetune.store import RunState

    model = LocalVLM(str(qwen_dir))
    model.cache = RunState(tmp_path / "state.sqlite")
    sampling = Sampling(max_tokens=6)
    first = run(model.generate(image_chat(), n=2, sampling=sampling))
    again = run(model.generate(image_chat(), n=2, sampling=sampling))
    assert not first.cached and again.cached
    assert again.texts == first.texts and again.usage.cached_calls == 1
    model.cache.close()


def test_bad_inputs_fail_with_the_fix(qwen_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="no such model directory"):
        load_model(f"local:{tmp_path / 'missing'}")
    with pytest.raises(BackendError, match="use auto, bf16, fp16 or fp32"):
        load_model(f"local:{qwen_dir}", dtype="int3")
    (tmp_path / "not_adapter").mkdir()
    with pytest.raises(BackendError, match="adapter_config.json"):
        load_model(f"local:{qwen_dir}", adapter=str(tmp_path / "not_adapter"))
    with pytest.raises(ValueError, match="choose one of"):
        init_tiny("gpt2", tmp_path / "x")
    with pytest.raises(ValueError, match="multiple of 28"):
        init_tiny("llava", tmp_path / "y", image_size=100)

    model = LocalVLM(str(qwen_dir))
    with pytest.raises(BackendError, match="unsupported content part type 'audio'"):
        model.render([{"role": "user", "content": [{"type": "audio", "audio": b""}]}])
    with pytest.raises(BackendError, match="unknown chat role"):
        model.render([{"role": "narrator", "content": "hi"}])
    with pytest.raises(BackendError, match="n must be >= 1"):
        run(model.generate(image_chat(), n=0))


def test_cli_init_tiny_reports_parameters(tmp_path: Path) -> None:
    from tracetune.cli.model import app

    result = CliRunner().invoke(
        app, ["init-tiny", "--arch", "llava", "--out", str(tmp_path / "m"), "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    params = json.loads((tmp_path / "m" / "tracetune_tiny.json").read_text())["parameters"]
    assert f"{params:,} parameters" in result.output
    assert str(tmp_path / "m") in result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
