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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

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


def build_tokenizer(arch: str, vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE tokenizer trained on the built-in corpus, with ``arch``'s special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = _family(arch)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=fam.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    # Template words go into the corpus too, so rendered chats stay short.
    corpus = [line for line in (_CORPUS + chat_template(fam.template)).splitlines() if line]
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=fam.eos,
        pad_token=fam.pad,
        bos_token=fam.bos,
        unk_token=fam.unk,
        model_max_length=4096,
        padding_side="left",  # decoder-only generation pads on the left
    )
    tok.chat_template = chat_template(fam.template)
    return tok


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
    import torch

    if image_size < 28 or image_size % 28:
        raise ValueError(
            f"image_size={image_size} must be a positive multiple of 28 (e.g. 56 or 112) so "
            "every family's patch grid divides it"
        )
    tokenizer = build_tokenizer(arch)
    builder = {
        "qwen2_vl": _build_qwen2_vl,
        "qwen2_5_vl": _build_qwen2_5_vl,
        "llava": _build_llava,
        "idefics3": _build_idefics3,
    }[arch]
    torch.manual_seed(seed)
    model, processor = builder(tokenizer, image_size)
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
            },
            indent=2,
        )
        + "\n"
    )
    return out


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# -- one builder per family -------------------------------------------------------------------
# Text towers share one shape: 2 layers, hidden 64, 4 heads of 16, 2 KV heads.
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
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


def _qwen_text_config(tokenizer: Any) -> dict[str, Any]:
    # M-RoPE splits each head's rotary half (head_dim/2 = 8) over time/height/width.
    return {
        **_TEXT,
        **_token_ids(tokenizer),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
        },
    }


def _build_qwen2_vl(tokenizer: Any, image_size: int) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from tracetune.models.processors import ImageOnlyQwen2VLProcessor

    config = Qwen2VLConfig(
        text_config=_qwen_text_config(tokenizer),
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": _TEXT["hidden_size"],
            "mlp_ratio": 2,
            "num_heads": 2,
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


def _build_qwen2_5_vl(tokenizer: Any, image_size: int) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tracetune.models.processors import ImageOnlyQwen2_5_VLProcessor

    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tokenizer),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": _TEXT["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            # Windowed attention in block 0, full attention in block 1, as in the real model.
            "window_size": 56,
            "fullatt_block_indexes": [1],
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


def _build_llava(tokenizer: Any, image_size: int) -> tuple[Any, Any]:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    patch = 28  # a 112 px CLIP image is a 4x4 grid: 16 image tokens (CLS dropped)
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
            "projection_dim": 32,
        },
        text_config={"model_type": "llama", **_TEXT, **_token_ids(tokenizer)},
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


def _build_idefics3(tokenizer: Any, image_size: int) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    patch, scale = 14, 2  # 112 px: 8x8 patches, pixel-shuffled 2x2: 16 image tokens
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
        },
        text_config={"model_type": "llama", **_TEXT, **_token_ids(tokenizer)},
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
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    return _FAMILIES[arch]
