"""``local:`` backend: a transformers VLM (optionally with a LoRA adapter) in this process.

``load_model("local:/path/to/checkpoint")`` or ``load_model("local:Qwen/Qwen2.5-VL-3B-Instruct",
adapter="runs/sft/adapter")``. The model and processor are loaded when the backend is built,
so a wrong path or a missing dependency fails at once rather than mid-run.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import re
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

from tracetune.models.base import (
    BackendError,
    ChatMessage,
    ChatModel,
    Completion,
    Generation,
    ModelOptions,
    Sampling,
    cache_key,
    load_image,
    register_backend,
)
from tracetune.schema import Usage

_DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}
_GREEDY = Sampling()
_TOOL_ROLE = re.compile(r"""['"]tool['"]""")


class LocalVLM(ChatModel):
    """A transformers vision-language model served in-process.

    Args:
        name: A local checkpoint directory or a hub id (hub ids need the weights in the local
            cache or network access).
        options: ``adapter`` (a PEFT LoRA directory applied on top), ``device`` (default:
            ``cuda`` when available, else ``cpu``), ``dtype`` (``auto`` = bf16 on CUDA, fp32 on
            CPU; or ``bf16``/``fp16``/``fp32``) and ``max_pixels`` (Qwen image budget).
        trust_remote_code: Run model code shipped in the checkpoint (e.g. MiniCPM-V).

    Messages follow :mod:`tracetune.models.base`: images may be PIL images, encoded bytes,
    file paths or ``image_url`` parts with a data URL. Chat templates without a ``tool`` role
    (most hub VLMs before Qwen2.5-VL) get tool messages as ``user`` turns instead, since the
    observation must reach the model either way. ``tools`` is passed to the chat template when
    the template renders tools; otherwise the system turn gets the same hermes tools block
    (see :mod:`tracetune.models.toolcalls`), so native tool calls work with any template.

    Calls from concurrent episodes share one model: each ``generate`` runs in a worker thread
    and calls are serialized, so the event loop stays free for tools and other backends.
    """

    def __init__(
        self,
        name: str,
        options: ModelOptions | None = None,
        *,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        import torch

        self.name = name
        self.options = options or ModelOptions()
        self.device = self.options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _resolve_dtype(self.options.dtype, self.device)
        self.model, self.processor = _load(
            name, self.options, self.dtype, self.device, trust_remote_code
        )
        self.model.to(self.device)
        self.model.eval()
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.chat_template: str | None = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        if not self.chat_template:
            raise BackendError(
                f"{name} has no chat template; use an instruction-tuned checkpoint or save one "
                "with processor.chat_template = ... and processor.save_pretrained(DIR)"
            )
        self.supports_tool_role = bool(_TOOL_ROLE.search(self.chat_template))
        self.supports_tools = "tools" in self.chat_template
        self._thread_lock = threading.Lock()
        self._loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        adapter = f", adapter={self.options.adapter!r}" if self.options.adapter else ""
        return f"LocalVLM({self.name!r}{adapter}, device={self.device!r}, dtype={self.dtype})"

    # -- the ChatModel interface --------------------------------------------------------------
    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        n: int = 1,
        sampling: Sampling = _GREEDY,
        tools: list[dict[str, Any]] | None = None,
    ) -> Generation:
        if n < 1:
            raise BackendError(f"n must be >= 1, got {n}")
        start = time.perf_counter()
        key = None
        if self.cache is not None:
            key = cache_key(self._cache_name, "local", messages, n, sampling, tools)
        if (hit := await self.cached(key)) is not None:
            hit.latency_s = time.perf_counter() - start
            return hit
        # Waiting here rather than on the thread lock keeps executor threads free for tools.
        async with self._loop_lock():
            gen = await asyncio.to_thread(self.generate_blocking, messages, n, sampling, tools)
        await self.store(key, gen.completions)
        gen.latency_s = time.perf_counter() - start
        return gen

    async def aclose(self) -> None:
        import torch

        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- synchronous core -----------------------------------------------------------------
    def render(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> tuple[str, list[Any]]:
        """The prompt text (with the generation prompt) and its images, in order."""
        msgs, images = _prepare(messages, tool_role=self.supports_tool_role)
        kwargs: dict[str, Any] = {"add_generation_prompt": True, "tokenize": False}
        if tools and self.supports_tools:
            kwargs["tools"] = tools
        elif tools:
            # The template cannot list tools: the system turn gets the hermes block that
            # templates with tool support write, so the model sees them the same way.
            from tracetune.models.toolcalls import tools_system_block

            block = tools_system_block(tools)
            if msgs and msgs[0]["role"] == "system" and isinstance(msgs[0].get("content"), str):
                msgs[0] = {**msgs[0], "content": f"{msgs[0]['content']}\n\n{block}"}
            else:
                msgs.insert(0, {"role": "system", "content": block})
        try:
            prompt = self.processor.apply_chat_template(msgs, **kwargs)
        except Exception as exc:  # jinja raise_exception and template errors
            raise BackendError(f"{self.name}: chat template rejected the messages: {exc}") from exc
        return str(prompt), images

    def encode(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None) -> Any:
        """Model inputs (token ids, pixel values, ...) for the prompt, on the model's device."""
        import torch

        prompt, images = self.render(messages, tools)
        bos = getattr(self.tokenizer, "bos_token", None)
        inputs = self.processor(
            text=[prompt],
            images=[images] if images else None,
            return_tensors="pt",
            # Templates that write the BOS themselves must not get a second one.
            add_special_tokens=not (bos and prompt.startswith(bos)),
        ).to(self.device)
        if "pixel_values" in inputs and self.dtype != torch.float32:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def generate_blocking(
        self,
        messages: list[ChatMessage],
        n: int = 1,
        sampling: Sampling = _GREEDY,
        tools: list[dict[str, Any]] | None = None,
    ) -> Generation:
        """``generate`` without the event loop: for scripts and worker threads."""
        import torch
        from transformers import set_seed

        if self.model is None:
            raise BackendError(f"{self!r} was closed")
        sample = sampling.temperature > 0
        config = self._generation_config(sampling, n if sample else 1)
        # Encoding is inside the lock too: tokenizers keep padding/truncation state per call.
        with self._thread_lock:
            inputs = self.encode(messages, tools)
            prompt_len = int(inputs["input_ids"].shape[1])
            context = self.context_length
            if context is not None:
                # Checked before generating: past its positions a model does not fail, it
                # writes garbage (or indexes out of range on some devices).
                if prompt_len >= context:
                    raise BackendError(
                        f"{self.name}: the prompt is {prompt_len} tokens, at or over the "
                        f"model's context of {context} tokens; shorten it (fewer steps, "
                        "fewer or smaller images: backend max_pixels) or use a model with a "
                        "longer context"
                    )
                config.max_new_tokens = min(config.max_new_tokens, context - prompt_len)
            if sampling.seed is not None:
                set_seed(sampling.seed)
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs,
                    generation_config=config,
                    tokenizer=self.tokenizer if sampling.stop else None,
                )
        new_tokens = out[:, prompt_len:]
        eos_ids = token_id_set(config.eos_token_id)
        completions: list[Completion] = []
        generated = 0
        pad = config.pad_token_id
        for row in new_tokens.tolist():
            length = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            # Rows that stopped early (stop string) are padded up to the longest one.
            while length and row[length - 1] == pad and pad not in eos_ids:
                length -= 1
            generated += length
            text = self.tokenizer.decode(row[:length], skip_special_tokens=True)
            text, stopped = cut_at_stop(text, sampling.stop)
            hit_eos = length > 0 and row[length - 1] in eos_ids
            finish = "stop" if stopped or hit_eos else "length"
            completions.append(Completion(text, finish))
        if not sample:
            # Greedy decoding has one answer: the n samples are copies of it, and usage
            # counts the tokens actually generated.
            first = completions[0]
            completions = [Completion(first.text, first.finish_reason) for _ in range(n)]
        usage = Usage(prompt_tokens=prompt_len, completion_tokens=generated, calls=1)
        return Generation(completions, usage=usage)

    # -- helpers -----------------------------------------------------------------------
    @property
    def context_length(self) -> int | None:
        """Positions the language model can attend to (its ``max_position_embeddings``)."""
        config = getattr(self.model, "config", None)
        for part in (getattr(config, "text_config", None), config):
            value = getattr(part, "max_position_embeddings", None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def _cache_name(self) -> str:
        return f"{self.name}+{self.options.adapter}" if self.options.adapter else self.name

    def _loop_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._loop_locks.get(loop)
        if lock is None:
            lock = self._loop_locks[loop] = asyncio.Lock()
        return lock

    def _generation_config(self, sampling: Sampling, num_return_sequences: int) -> Any:
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = sampling.max_tokens
        config.max_length = None
        config.num_return_sequences = num_return_sequences
        config.num_beams = 1
        if sampling.temperature > 0:
            config.do_sample = True
            config.temperature = sampling.temperature
            config.top_p = sampling.top_p
            # Checkpoints ship their own top_k (Qwen2-VL: top_k=1, i.e. greedy); Sampling
            # means OpenAI semantics, which have no top_k.
            config.top_k = None
        else:
            config.do_sample = False
            config.temperature = None
            config.top_p = None
            config.top_k = None
        config.stop_strings = list(sampling.stop) or None
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id or _first(config.eos_token_id)
        return config


@register_backend("local")
def _local_backend(name: str, options: ModelOptions) -> LocalVLM:
    # trust_remote_code is read from options when the shared ModelOptions grows that field.
    return LocalVLM(
        name, options, trust_remote_code=bool(getattr(options, "trust_remote_code", False))
    )


# -- loading ----------------------------------------------------------------------------------
def _resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return getattr(torch, _DTYPES[dtype])


def _load(
    name: str, options: ModelOptions, dtype: Any, device: str, trust_remote_code: bool
) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText

    from tracetune.models.processors import load_processor

    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    path = str(Path(name).expanduser()) if looks_local else name
    if looks_local and not Path(path).is_dir():
        raise BackendError(f"local:{name}: no such model directory")
    try:
        # Loading straight onto the device avoids a second full copy in host memory.
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, device_map=device, trust_remote_code=trust_remote_code
        )
        processor = load_processor(
            path, max_pixels=options.max_pixels, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        hint = (
            "check the directory holds config.json, weights and processor files"
            if looks_local
            else "the hub is unreachable or the id is wrong: download it first "
            "(hf download ID) or pass a local directory"
        )
        raise BackendError(f"could not load local:{name}: {exc}\n({hint})") from exc
    if options.adapter:
        model = _apply_adapter(model, options.adapter)
    return model, processor


def _apply_adapter(model: Any, adapter: str) -> Any:
    adapter_dir = Path(adapter).expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise BackendError(
            f"adapter {adapter!r} is not a PEFT adapter directory (no adapter_config.json); "
            "pass the directory a LoRA training run saved"
        )
    try:
        from peft import PeftModel
    except ImportError as exc:  # pragma: no cover - peft is a core dependency
        raise BackendError("adapters need peft: pip install peft") from exc
    base = _adapter_base(adapter_dir)
    mismatch = (
        f"adapter {adapter!r} does not fit this model: it was trained on {base or 'another base'}"
        " (base_model_name_or_path in its adapter_config.json); load that base, or the adapter "
        "trained on this one"
    )
    try:
        with warnings.catch_warnings():
            # PEFT only warns about missing adapter weights; the check below raises instead.
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches, unknown modules
        raise BackendError(f"{mismatch}: {' '.join(str(exc).split())[:300]}") from None
    missing, unexpected = _adapter_key_mismatch(peft_model, adapter_dir)
    if missing or unexpected:
        # PEFT only warns when the adapter's modules are not the model's (another family or
        # size): the model would silently run as the plain base.
        example = (
            f"this model has no {unexpected[0]!r}"
            if unexpected
            else f"the adapter lacks {missing[0]!r}"
        )
        raise BackendError(
            f"{mismatch}; e.g. {example} ({len(missing)} weights missing, "
            f"{len(unexpected)} unexpected)"
        )
    return peft_model


def _adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter was trained on, as its adapter_config.json records it."""
    import json

    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(base) if base else None


def _adapter_key_mismatch(peft_model: Any, adapter_dir: Path) -> tuple[list[str], list[str]]:
    """LoRA weights the model expects but the file lacks, and ones the file has in excess."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return [], []  # legacy .bin adapters: PEFT's own checks only
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        saved = {k for k in f.keys() if ".lora_" in k}  # noqa: SIM118  (not a dict)
    name = getattr(peft_model, "active_adapter", "default")
    expected = {
        k.replace(f".{name}.", ".") for k, _ in peft_model.named_parameters() if ".lora_" in k
    }
    return sorted(expected - saved), sorted(saved - expected)


# -- messages ---------------------------------------------------------------------------------
def _prepare(
    messages: list[ChatMessage], *, tool_role: bool
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages for the template (image parts without payload) and the decoded images."""
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, message in enumerate(messages):
        if "role" not in message:
            raise BackendError(f"message {i} has no 'role': {str(message)[:200]}")
        msg = dict(message)
        if msg["role"] == "tool" and not tool_role:
            msg["role"] = "user"
            msg.pop("tool_call_id", None)
            msg.pop("name", None)
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type")
                if kind in ("image", "image_url"):
                    images.append(_part_image(part, i))
                    parts.append({"type": "image"})
                elif kind == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                else:
                    raise BackendError(
                        f"message {i}: unsupported content part type {kind!r}; "
                        "use 'text' or 'image'"
                    )
            msg["content"] = parts
        out.append(msg)
    return out, images


def _part_image(part: dict[str, Any], index: int) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise BackendError(f"message {index}: image_url part without a url")
        if url.startswith("data:"):
            source: Any = base64.b64decode(url.split(",", 1)[1])
        elif url.startswith(("http://", "https://")):
            raise BackendError(
                f"message {index}: local: models take images as PIL, bytes, paths or data "
                "URLs, not http URLs; download the image first"
            )
        else:
            source = url.removeprefix("file://")
    else:
        source = part.get("image", part.get("path", part.get("url")))
    if source is None:
        raise BackendError(f"message {index}: image part has no 'image'")
    try:
        return load_image(source)
    except (OSError, TypeError, ValueError) as exc:
        raise BackendError(f"message {index}: cannot read image: {exc}") from exc


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` cut before the first stop string in it, and whether one was found."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def token_id_set(ids: Any) -> set[int]:
    """A config's token id field (None, one id or a list of ids) as a set."""
    if ids is None:
        return set()
    return {int(ids)} if isinstance(ids, int) else {int(i) for i in ids}


def _first(ids: Any) -> int | None:
    if ids is None or isinstance(ids, int):
        return ids
    return int(next(iter(ids)))


# -- checkpoints ------------------------------------------------------------------------------
def merge_adapter(base: str | Path | None, adapter: str | Path, out_dir: str | Path) -> Path:
    """Fold a LoRA adapter into its base model and save model + processor to ``out_dir``.

    The merged checkpoint is a standard transformers checkpoint (the hub's weight names), so
    it loads like any other (``local:OUT``, ``vllm serve OUT``) and serves as the reference
    model for DPO after SFT. ``base`` defaults to the base recorded in the adapter's
    ``adapter_config.json``. The processor comes from the adapter directory when training
    saved one there (it may carry a changed chat template), else from the base.
    """
    from transformers import AutoModelForImageTextToText

    from tracetune.models.processors import load_processor

    adapter_path, out = Path(adapter), Path(out_dir)
    if not (adapter_path / "adapter_config.json").is_file():
        raise BackendError(
            f"adapter {str(adapter)!r} is not a PEFT adapter directory (no adapter_config.json)"
        )
    if base is None:
        recorded = _adapter_base(adapter_path)
        if recorded is None or not (Path(recorded) / "config.json").is_file():
            raise BackendError(
                f"the adapter records its base as {recorded!r}, which is not a local model "
                "directory here; pass the base with --base DIR"
            )
        base = recorded
    base_path = Path(base)
    if not (base_path / "config.json").is_file():
        raise BackendError(f"base {str(base)!r} is not a model directory (no config.json)")
    if out.resolve() in (base_path.resolve(), adapter_path.resolve()):
        raise BackendError("--out must be a new directory, not the base or adapter directory")
    model = AutoModelForImageTextToText.from_pretrained(base_path, dtype="auto")
    merged = _apply_adapter(model, str(adapter_path)).merge_and_unload()
    has_processor = any(
        (adapter_path / f).is_file() for f in ("processor_config.json", "tokenizer_config.json")
    )
    processor = load_processor(adapter_path if has_processor else base_path)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    processor.save_pretrained(out)
    return out
