"""Tiny randomly initialized VLMs built from config, for tests and CI (no hub, no network).

Each family gets what a real checkpoint directory holds: a config with the family's
architecture shrunk to a few hundred thousand parameters, a byte-level BPE tokenizer trained
here on a small agent-flavoured corpus with the family's special tokens, an image processor
that keeps images at about ``image_size`` pixels a side (so an image costs ~16 tokens), a
processor and a chat template that knows the system/user/assistant/tool roles and marks
assistant turns with ``{% generation %}`` for assistant-only loss. The directory reloads with
``AutoModelForImageTextToText.from_pretrained`` and
:func:`tracetune.models.processors.load_processor`.

The outputs are random, but the shapes, token bookkeeping and training code paths are the
real ones, which is what tests need.

:func:`init_model` is the same builder at real sizes (``SIZES``: 250k, 5m, 20m, 100m, or an
explicit :class:`ModelShape`) for controllers trained from scratch, optionally with a
tokenizer trained on the user's own trajectories and dialogues
(:func:`tracetune.formats.corpus.corpus_from_datasets`), so that the system prompt, tool
names and the JSON of an action cost a handful of tokens each.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from tracetune.errors import ConfigError

TinyArch = Literal["qwen2_vl", "qwen2_5_vl", "llava", "idefics3"]
TINY_ARCHS: tuple[str, ...] = get_args(TinyArch)

VOCAB_SIZE = 768
"""Target tokenizer size (256 byte symbols + special tokens + merges)."""

# Words the agent and its tools use, so a tiny tokenizer encodes trajectories in few tokens.
_CORPUS = """
Thought: I need to read the text in the image first. Then I will compute the total.
Action: {"name": "ocr", "arguments": {"image": "image_1.png"}}
Observation: TOTAL 42.50 EUR, DATE 2024-03-17, ITEMS 3
Thought: The receipt total is 42.50. I will call final_answer with it.
Code:
```py
result = calculator(expression="12.5 * 3 + 5")
print(result)
final_answer(answer=str(result))
```<end_code>
Observation: 42.5
Action: {"name": "final_answer", "arguments": {"answer": "42.5"}}
Thought: Let me crop the top left corner to read the small print.
Action: {"name": "image_crop", "arguments": {"image": "image_1.png", "box": [0, 0, 0.5, 0.5]}}
Action: {"name": "calculator", "arguments": {"expression": "(7 + 8) / 3"}}
Action: {"name": "face_detection", "arguments": {"image": "photo.jpg"}}
Action: {"name": "object_localization", "arguments": {"image": "street.png",
"objects": ["car", "person"]}}
Action: {"name": "visual_question_answering", "arguments": {"image": "chart.png",
"question": "What is the highest bar?"}}
Action: {"name": "inspect_file", "arguments": {"file_path": "report.pdf",
"question": "Who wrote it?"}}
Action: {"name": "web_search", "arguments": {"query": "population of Paris 2023"}}
Action: {"name": "segmentation", "arguments": {"image": "cat.png", "prompt": "the cat"}}
Action: {"name": "image_edit", "arguments": {"image": "room.png", "prompt": "make the wall blue"}}
Action: {"name": "image_generation", "arguments": {"prompt": "a red bicycle"}}
Error: the tool call failed: KeyError 'answer'. Check the arguments and try again.
Reflection: The previous step used the wrong file. I should open report.xlsx instead.
final_answer final_answer final_answer tool tools tool_call tool_response arguments name
The answer is 3. The answer is yes. The answer is no. The answer is the red car.
What is in the image? How many people are there? Which object is on the left?
What is the total amount on the receipt? Describe the chart. Read the table.
You are a helpful assistant that solves tasks step by step with tools.
system user assistant tool System User Assistant Tool USER ASSISTANT TOOL TOOLS
{"type": "function", "function": {"name": "calculator", "description": "Evaluate math.",
"parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
"required": ["expression"]}}}
[1, 2, 3], {"a": 1, "b": true, "c": null, "d": false}, (x, y), <tag>, 'quote', "double"
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 25 30 42 50 64 99 100 128 256 512 1000 2024
0.1 0.25 0.5 0.75 1.0 3.14 -1 -2.5 +3 = + - * / % ** == != < > <= >= ( ) [ ] { } : ; , . ! ?
image file path png jpg pdf docx xlsx csv json txt print import def return if else for in
the a an of to and is are was with on at by for from this that it as be or not
red green blue black white yellow car person dog cat table chart receipt document page
"""


@dataclass(frozen=True)
class _Family:
    """What differs between families: tokens, template file and the pieces built from them."""

    special_tokens: list[str]
    template: str
    eos: str
    pad: str
    bos: str | None = None
    unk: str | None = None
    extra_tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)


_QWEN_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_FAMILIES: dict[str, _Family] = {
    "qwen2_vl": _Family(_QWEN_TOKENS, "chatml_vl.jinja", eos="<|im_end|>", pad="<|endoftext|>"),
    "qwen2_5_vl": _Family(_QWEN_TOKENS, "chatml_vl.jinja", eos="<|im_end|>", pad="<|endoftext|>"),
    "llava": _Family(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        "llava.jinja",
        eos="</s>",
        pad="<pad>",
        bos="<s>",
        unk="<unk>",
    ),
    "idefics3": _Family(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<fake_token_around_image>",
            "<image>",
            "<end_of_utterance>",
            "<global-img>",
        ]
        + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
        "idefics3.jinja",
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        bos="<|im_start|>",
    ),
}


def chat_template(name: str) -> str:
    """The text of a chat template shipped in ``tracetune/prompts/chat_templates/``."""
    return (
        resources.files("tracetune.prompts")
        .joinpath("chat_templates", name)
        .read_text(encoding="utf-8")
    )


def build_tokenizer(
    arch: str,
    vocab_size: int = VOCAB_SIZE,
    corpus: Sequence[str] | None = None,
    digit_group: int = 1,
) -> Any:
    """A byte-level BPE tokenizer with ``arch``'s special tokens.

    Without ``corpus`` it is trained on a small built-in agent corpus (tests). With
    ``corpus`` (texts, e.g. rendered trajectories from
    :func:`tracetune.formats.corpus.corpus_from_datasets`) it is
    trained on those texts: pre-tokenization then splits only at newlines and digits, so BPE
    may merge across words and a line that recurs in every sample (the system prompt, a
    tool's description, ``Action: {"name": "ocr", "arguments": {"image": "``) becomes one or
    a few tokens, while numbers stay one token per digit (copyable from observations).

    ``digit_group`` (with a corpus): numbers are cut into runs of up to this many digits,
    left to right, and every run of 1 to ``digit_group`` digits is one token (``2152`` is
    ``215`` ``2`` at 3), as in tokenizers that group digits by three. A number is then
    copied in fewer, more distinctive tokens. The 100 two-digit (and 1,000 three-digit) runs
    come out of ``vocab_size``, which must leave at least 1,024 tokens for the rest.
    """
    if not 1 <= digit_group <= 3:
        raise ConfigError(f"digit_group={digit_group} must be 1, 2 or 3")
    if corpus is None and digit_group != 1:
        raise ConfigError("digit groups need a tokenizer corpus (--tokenizer-corpus)")
    runs = [f"{i:0{k}d}" for k in range(2, digit_group + 1) for i in range(10**k)]
    if runs and len(runs) + 1024 > vocab_size:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for digit_group={digit_group} "
            f"({len(runs)} digit runs); use at least {len(runs) + 1024}"
        )
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = _family(arch)
    bpe = Tokenizer(models.BPE())
    template = chat_template(fam.template)
    if corpus is None:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        lines = [line for line in (_CORPUS + template).splitlines() if line]
    else:
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
                pre_tokenizers.Split(Regex(rf"\d{{1,{digit_group}}}"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        lines = [_CORPUS, template, *corpus]
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(runs),
        special_tokens=fam.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1 if corpus is None else 2,
        show_progress=False,
    )
    # Template words go into the corpus too, so rendered chats stay short.
    bpe.train_from_iterator(lines, trainer=trainer)
    # Every digit run is one token whatever its frequency in the corpus: added tokens are
    # matched leftmost-longest before pre-tokenization, which cuts runs left to right.
    bpe.add_tokens([AddedToken(run, normalized=False) for run in runs])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=fam.eos,
        pad_token=fam.pad,
        bos_token=fam.bos,
        unk_token=fam.unk,
        model_max_length=4096,
        padding_side="left",  # decoder-only generation pads on the left
    )
    tok.chat_template = template
    return tok


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a controller: its text tower and its vision tower."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 1
    vision_hidden_size: int = 32
    vision_heads: int = 2
    max_positions: int = 4096

    def check(self) -> None:
        if self.hidden_size % self.heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} must be a multiple of heads={self.heads}"
            )
        if self.heads % self.kv_heads:
            raise ConfigError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        head_dim = self.hidden_size // self.heads
        if head_dim % 2 or head_dim < 8:
            raise ConfigError(
                f"head size hidden_size/heads = {head_dim} must be even and at least 8"
            )
        if self.vision_hidden_size % self.vision_heads:
            raise ConfigError(
                f"vision_hidden_size={self.vision_hidden_size} must be a multiple of "
                f"vision_heads={self.vision_heads}"
            )
        for name in ("layers", "intermediate_size", "vision_depth", "max_positions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")


TINY_SHAPE = ModelShape()
SIZES: dict[str, ModelShape] = {
    # ~0.25M parameters with the 768-token built-in tokenizer: tests and CI.
    "250k": TINY_SHAPE,
    # ~5M with a 4K-token tokenizer: learns the action format and tool choice on a CPU.
    "5m": ModelShape(256, 4, 4, 2, 768, 2, 64, 2),
    # ~20M: hidden 384, 8 layers.
    "20m": ModelShape(384, 8, 6, 2, 1152, 2, 96, 2),
    # ~100M: hidden 768, 12 layers (GPU).
    "100m": ModelShape(768, 12, 12, 4, 2048, 4, 192, 4),
}
"""Named sizes for ``tracetune model init --size`` (parameter counts are approximate)."""

DEFAULT_VOCAB = {"250k": VOCAB_SIZE, "5m": 4096, "20m": 8192, "100m": 16384}


def init_tiny(
    arch: str,
    out_dir: str | Path,
    seed: int = 0,
    image_size: int = 112,
) -> Path:
    """Build a tiny random ``arch`` VLM with its tokenizer, processor and chat template.

    Args:
        arch: One of ``qwen2_vl``, ``qwen2_5_vl``, ``llava``, ``idefics3``.
        out_dir: Directory to write (created; existing files are overwritten).
        seed: Seed for the weights; the same seed gives the same weights.
        image_size: Images are resized to about this many pixels a side (a multiple of 28).

    Returns:
        ``out_dir`` as a :class:`Path`, loadable with ``AutoModelForImageTextToText`` and
        :func:`~tracetune.models.processors.load_processor`.
    """
    return init_model(arch, out_dir, TINY_SHAPE, seed=seed, image_size=image_size)


def init_model(
    arch: str,
    out_dir: str | Path,
    shape: ModelShape | str = TINY_SHAPE,
    *,
    seed: int = 0,
    image_size: int = 112,
    corpus: Sequence[str] | None = None,
    vocab_size: int | None = None,
    digit_group: int = 1,
) -> Path:
    """Build a randomly initialized ``arch`` VLM of a given shape, ready to train from scratch.

    Args:
        arch: One of ``qwen2_vl``, ``qwen2_5_vl``, ``llava``, ``idefics3``.
        out_dir: Directory to write (created; existing files are overwritten).
        shape: A :class:`ModelShape` or a name in :data:`SIZES` (``250k``, ``5m``, ...).
        seed: Seed for the weights.
        image_size: Images are resized to about this many pixels a side (a multiple of 28).
        corpus: Texts to train the tokenizer on (see
            :func:`tracetune.formats.corpus.corpus_from_datasets`); None: the
            small built-in corpus.
        vocab_size: Tokenizer size (default: 768 without a corpus, else by size, 4096 for 5m).
        digit_group: With a corpus, numbers are tokens of up to this many digits (1-3; see
            :func:`build_tokenizer`).

    Returns:
        ``out_dir``; ``tracetune_tiny.json`` in it records the shape and parameter count.
    """
    import torch

    if isinstance(shape, str):
        if shape not in SIZES:
            raise ConfigError(f"unknown size {shape!r}; choose one of {', '.join(SIZES)}")
        size_name: str | None = shape
        shape = SIZES[shape]
    else:
        size_name = next((k for k, v in SIZES.items() if v == shape), None)
    shape.check()
    if image_size < 28 or image_size % 28:
        raise ConfigError(
            f"image_size={image_size} must be a positive multiple of 28 (e.g. 56 or 112) so "
            "every family's patch grid divides it"
        )
    if vocab_size is None:
        vocab_size = VOCAB_SIZE if corpus is None else DEFAULT_VOCAB.get(size_name or "", 4096)
    if vocab_size < 300:
        raise ConfigError(f"vocab_size={vocab_size} is too small (256 byte symbols + specials)")
    tokenizer = build_tokenizer(arch, vocab_size=vocab_size, corpus=corpus, digit_group=digit_group)
    builder = {
        "qwen2_vl": _build_qwen2_vl,
        "qwen2_5_vl": _build_qwen2_5_vl,
        "llava": _build_llava,
        "idefics3": _build_idefics3,
    }[arch]
    torch.manual_seed(seed)
    model, processor = builder(tokenizer, image_size, shape)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(_family(arch).eos)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "tracetune_tiny.json").write_text(
        json.dumps(
            {
                "arch": arch,
                "seed": seed,
                "image_size": image_size,
                "parameters": count_parameters(model),
                "size": size_name,
                "shape": asdict(shape),
                "vocab_size": len(tokenizer),
                "tokenizer_corpus_texts": len(corpus) if corpus is not None else 0,
                "digit_group": digit_group,
            },
            indent=2,
        )
        + "\n"
    )
    return out


def shape_with(base: ModelShape, **overrides: int | None) -> ModelShape:
    """``base`` with the given fields replaced (None values are ignored)."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# -- one builder per family -------------------------------------------------------------------
# Text towers share one shape (ModelShape); the tiny one is 2 layers, hidden 64, 4 heads of 16.


def _text(shape: ModelShape) -> dict[str, Any]:
    return dict(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
    )


def _token_ids(tokenizer: Any) -> dict[str, int | None]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _qwen_image_processor(image_size: int) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    # 14 px patches merged 2x2: a 112x112 image is an 8x8 patch grid, 16 image tokens.
    return Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=image_size * image_size, patch_size=14, merge_size=2
    )


def _qwen_ids(tokenizer: Any) -> dict[str, Any]:
    ids = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {k: tokenizer.convert_tokens_to_ids(v) for k, v in ids.items()}


def mrope_section(head_dim: int) -> list[int]:
    """M-RoPE's split of a head's rotary half over time/height/width (sums to head_dim/2)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen_text_config(tokenizer: Any, shape: ModelShape) -> dict[str, Any]:
    # M-RoPE splits each head's rotary half (head_dim/2, 8 for the tiny shape: [2, 3, 3]).
    return {
        **_text(shape),
        **_token_ids(tokenizer),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": mrope_section(shape.hidden_size // shape.heads),
        },
    }


def _build_qwen2_vl(tokenizer: Any, image_size: int, shape: ModelShape) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from tracetune.models.processors import ImageOnlyQwen2VLProcessor

    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer, shape),
        vision_config={
            "depth": shape.vision_depth,
            "embed_dim": shape.vision_hidden_size,
            "hidden_size": shape.hidden_size,
            "mlp_ratio": 2,
            "num_heads": shape.vision_heads,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_qwen_ids(tokenizer),
    )
    model = Qwen2VLForConditionalGeneration(config)
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=_qwen_image_processor(image_size),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def _build_qwen2_5_vl(tokenizer: Any, image_size: int, shape: ModelShape) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tracetune.models.processors import ImageOnlyQwen2_5_VLProcessor

    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer, shape),
        vision_config={
            "depth": max(2, shape.vision_depth),
            "hidden_size": shape.vision_hidden_size,
            "intermediate_size": 2 * shape.vision_hidden_size,
            "num_heads": shape.vision_heads,
            "out_hidden_size": shape.hidden_size,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            # Windowed attention in block 0, full attention in block 1, as in the real model.
            "window_size": 56,
            "fullatt_block_indexes": [max(2, shape.vision_depth) - 1],
        },
        **_qwen_ids(tokenizer),
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    processor = ImageOnlyQwen2_5_VLProcessor(
        image_processor=_qwen_image_processor(image_size),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def _build_llava(tokenizer: Any, image_size: int, shape: ModelShape) -> tuple[Any, Any]:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    patch = 28  # a 112 px CLIP image is a 4x4 grid: 16 image tokens (CLS dropped)
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": shape.vision_hidden_size,
            "intermediate_size": 2 * shape.vision_hidden_size,
            "num_hidden_layers": max(2, shape.vision_depth),
            "num_attention_heads": shape.vision_heads,
            "image_size": image_size,
            "patch_size": patch,
            "projection_dim": shape.vision_hidden_size,
        },
        text_config={"model_type": "llama", **_text(shape), **_token_ids(tokenizer)},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" then drops
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def _build_idefics3(tokenizer: Any, image_size: int, shape: ModelShape) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    patch, scale = 14, 2  # 112 px: 8x8 patches, pixel-shuffled 2x2: 16 image tokens
    config = Idefics3Config(
        vision_config={
            "hidden_size": shape.vision_hidden_size,
            "intermediate_size": 2 * shape.vision_hidden_size,
            "num_hidden_layers": max(2, shape.vision_depth),
            "num_attention_heads": shape.vision_heads,
            "image_size": image_size,
            "patch_size": patch,
        },
        text_config={"model_type": "llama", **_text(shape), **_token_ids(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
    )
    model = Idefics3ForConditionalGeneration(config)
    # No splitting into tiles: one global image per input keeps the sequence short.
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=((image_size // patch) ** 2) // (scale**2),
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def _family(arch: str) -> _Family:
    if arch not in _FAMILIES:
        raise ConfigError(f"unknown tiny arch {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    return _FAMILIES[arch]
