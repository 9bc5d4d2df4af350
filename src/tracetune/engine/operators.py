"""MMAT operators backed by the shared tools, checked once at startup.

``image_caption`` -> the ``caption`` tool (a VLM), ``label_bbox`` -> ``object_localization``
(OWL-ViT/OWLv2/Grounding DINO), ``ocr`` -> ``ocr`` (RapidOCR), ``face_detection`` ->
``face_detection`` (OpenCV cascades), and ``rag`` -> ``search`` (BM25 + MiniLM over a local
corpus, top 3; web backends opt-in). ``OperatorSet.startup`` loads every enabled operator's
model or index, so a missing model stops the run before the first sample instead of
failing every sample mid-run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tracetune.agent.render import file_names
from tracetune.cliflag import CliFlag
from tracetune.engine.grammar import clean_result
from tracetune.engine.trace import OPERATOR_NAMES, OperatorCall, RagCall
from tracetune.errors import TracetuneError
from tracetune.schema import Task
from tracetune.store import AssetStore
from tracetune.tools import Tool, ToolContext, ToolError, get_tool

OperatorName = Literal["image_caption", "label_bbox", "ocr", "face_detection"]
TOOL_OF: dict[str, str] = {
    "image_caption": "caption",
    "label_bbox": "object_localization",
    "ocr": "ocr",
    "face_detection": "face_detection",
}
_WEB_KEYS = {"serper": "SERPER_API_KEY", "google": "GOOGLE_API_KEY", "brave": "BRAVE_API_KEY"}


class OperatorUnavailable(TracetuneError, RuntimeError):
    """An enabled operator cannot run here; the message says how to fix it."""


class OperatorConfig(BaseModel):
    """Which operators the engine may run and how they are backed."""

    model_config = ConfigDict(extra="forbid")

    operators: list[OperatorName] = Field(
        default_factory=lambda: list(OPERATOR_NAMES),  # type: ignore[arg-type]
        description="Perception operators offered to the model (drop label_bbox if no "
        "detector is available, image_caption if no captioning VLM).",
    )
    caption_model: str | None = Field(
        default=None,
        description="Model spec of the VLM behind image_caption (default: the teacher, or the "
        "model under test at inference).",
    )
    detector: str | None = Field(
        default=None,
        description="OWL-ViT/OWLv2/Grounding DINO hub id or local directory behind label_bbox "
        "(default: google/owlv2-base-patch16-ensemble).",
    )
    rag: bool = Field(default=True, description="Offer retrieval (the <RAG> slot).")
    corpus: Path | None = Field(
        default=None, description="Local corpus for rag: folder of .txt/.md/.pdf or a JSONL."
    )
    rag_backend: Literal["local", "searxng", "serper", "google", "brave"] = Field(
        default="local", description="local corpus, or an opt-in web search backend."
    )
    rag_mode: Literal["hybrid", "bm25", "dense"] = Field(
        default="hybrid", description="Local ranking: BM25 + MiniLM fused, or one of them."
    )
    top_k: int = Field(default=3, ge=1, le=20, description="Passages per retrieval.")
    tool_options: Annotated[dict[str, dict[str, Any]], CliFlag(skip=True)] = Field(
        default_factory=dict,
        description="Extra per-tool settings, e.g. {'object_localization': {'threshold': 0.2}}.",
    )


def _detection_query(question: str) -> str:
    """label_bbox is named without arguments (RR grammar): look for what the question asks
    about. The question's first line (before the style constraint) is the query."""
    return question.strip().splitlines()[0] if question.strip() else "object"


class OperatorSet:
    """The enabled operators with their tools, a shared tool context and startup checks."""

    def __init__(self, config: OperatorConfig, caption_model: Any = None) -> None:
        self.config = config
        self.caption_model = caption_model
        self.names: list[str] = list(dict.fromkeys(config.operators))
        self.tools: dict[str, Tool] = {}
        options: dict[str, Any] = {k: dict(v) for k, v in config.tool_options.items()}
        if config.detector:
            options.setdefault("object_localization", {})["model"] = config.detector
        if config.rag:
            search = options.setdefault("search", {})
            search["backend"] = config.rag_backend
            search["mode"] = config.rag_mode
            if config.corpus is not None:
                search["corpus"] = str(Path(config.corpus).expanduser().resolve())
        self.options = options
        # The tools are deterministic: a regenerated rationale (or another question on the
        # same image) reuses an operator's output instead of running OCR etc. again.
        # Concurrent questions about one image share one run: the memo holds futures.
        self._memo: dict[tuple[str, str, str], asyncio.Future[tuple[str, Any, str | None]]] = {}

    @property
    def rag(self) -> bool:
        return self.config.rag

    async def startup(self) -> None:
        """Load every operator's model or index now; raise ``OperatorUnavailable`` if one
        cannot run, naming the operator and the fix."""
        import tracetune.tools.builtin  # noqa: F401  (registers the tools)

        # Configuration problems first, so they surface before seconds of model loading.
        if self.rag:
            try:
                self._check_rag_config()
            except ToolError as exc:
                raise self._rag_error(exc) from exc
        if "image_caption" in self.names and self.caption_model is None:
            raise OperatorUnavailable(
                "operator 'image_caption' cannot run: image_caption needs a vision-language "
                "model and none is configured (operators.caption_model, e.g. "
                "openai:gpt-4o-mini). Fix it, or leave image_caption out of "
                "operators.operators in the config."
            )
        for name in self.names:
            tool = get_tool(TOOL_OF[name])
            self.tools[name] = tool
            try:
                await asyncio.to_thread(self._check, name, tool)
            except ToolError as exc:
                raise OperatorUnavailable(
                    f"operator {name!r} cannot run: {exc}. Fix it, or leave {name} out of "
                    "operators.operators in the config."
                ) from exc
        if self.rag:
            self.tools["rag"] = get_tool("search")
            try:
                await asyncio.to_thread(self._check_rag)
            except ToolError as exc:
                raise self._rag_error(exc) from exc

    @staticmethod
    def _rag_error(exc: ToolError) -> OperatorUnavailable:
        return OperatorUnavailable(
            f"operator 'rag' cannot run: {exc}. Set operators.corpus to a local corpus, "
            "choose a web backend with operators.rag_backend, or set operators.rag: false."
        )

    def _check(self, name: str, tool: Tool) -> None:
        if name == "image_caption":
            if self.caption_model is None:
                raise ToolError(
                    "image_caption needs a vision-language model and none is configured "
                    "(operators.caption_model, e.g. openai:gpt-4o-mini)"
                )
            return
        tool.ensure_ready()
        if name == "label_bbox":
            from tracetune.tools.builtin.detection import DEFAULT_DETECTOR
            from tracetune.tools.builtin.support import tool_options, torch_device

            ctx = self.context(Path(tempfile.gettempdir()))
            opts = tool_options(ctx, "object_localization")
            tool.model(str(opts.get("model", DEFAULT_DETECTOR)), torch_device(opts))  # type: ignore[attr-defined]

    def _check_rag(self) -> None:
        if self.config.rag_backend == "local":
            search = self.tools["rag"]
            search.ensure_ready()
            corpus = Path(self.options["search"]["corpus"])
            search.index(corpus, self.options["search"])  # type: ignore[attr-defined]

    def _check_rag_config(self) -> None:
        backend = self.config.rag_backend
        if backend == "local":
            if self.config.corpus is None:
                raise ToolError("no corpus is configured for rag")
            if not Path(self.config.corpus).expanduser().exists():
                raise ToolError(f"the rag corpus {self.config.corpus} does not exist")
            return
        if backend in _WEB_KEYS and not os.environ.get(_WEB_KEYS[backend], "").strip():
            raise ToolError(f"the {backend} backend needs its API key in ${_WEB_KEYS[backend]}")
        if backend == "searxng" and not (
            self.options["search"].get("base_url") or os.environ.get("SEARXNG_URL")
        ):
            raise ToolError("the searxng backend needs $SEARXNG_URL (or tool_options.search)")

    def context(self, workdir: Path) -> ToolContext:
        return ToolContext(workdir=workdir, model=self.caption_model, options=self.options)

    def describe(self) -> list[str]:
        return list(self.names)

    # -- running ---------------------------------------------------------------------------
    async def run(
        self, names: list[str], workdir: Path, images: list[str], question: str
    ) -> tuple[list[OperatorCall], list[str]]:
        """Run the named operators on every image; returns the calls and any problems
        (unknown or disabled operator names, which are not run)."""
        calls: list[OperatorCall] = []
        problems: list[str] = []
        ctx = self.context(workdir)
        for name in dict.fromkeys(names):
            if name not in self.tools or name == "rag":
                problems.append(
                    f"{name!r} is not an available operator (available: {', '.join(self.names)})"
                )
                continue
            tool = self.tools[name]
            texts, datas, errors = [], [], []
            for image in images:
                args: dict[str, Any] = {"image": image}
                if name == "label_bbox":
                    args["text"] = _detection_query(question)
                key = (name, _file_hash(workdir / image), json.dumps(args, sort_keys=True))
                text, data, error = await self._call(tool, ctx, args, key)
                if error is not None:
                    errors.append(error)
                texts.append(f"[{image}]\n{text}" if len(images) > 1 else text)
                datas.append(data)
            calls.append(
                OperatorCall(
                    name=name,
                    result=clean_result("\n".join(texts)),
                    error="; ".join(errors) or None,
                    data=_jsonable(datas[0] if len(datas) == 1 else datas),
                )
            )
        return calls, problems

    async def _call(
        self, tool: Tool, ctx: ToolContext, args: dict[str, Any], key: tuple[str, str, str]
    ) -> tuple[str, Any, str | None]:
        future = self._memo.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = future
            try:
                result = await tool.acall(ctx, args)
                future.set_result((result.text, result.data, None))
            except ToolError as exc:
                future.set_result((f"(failed: {exc})", None, str(exc)))
            except BaseException as exc:  # a tool bug: do not leave waiters hanging
                self._memo.pop(key, None)
                future.set_exception(exc)
                raise
        return await asyncio.shield(future)

    async def retrieve(self, query: str, workdir: Path) -> RagCall:
        tool = self.tools.get("rag")
        if tool is None:
            return RagCall(query=query, result="(retrieval is disabled)", error="disabled")
        try:
            result = await tool.acall(
                self.context(workdir), {"query": query, "top_k": self.config.top_k}
            )
        except ToolError as exc:
            return RagCall(query=query, result=f"(failed: {exc})", error=str(exc))
        hits = (result.data or {}).get("results", []) if isinstance(result.data, dict) else []
        return RagCall(query=query, result=clean_result(result.text), hits=_jsonable(hits))


_MEMO_SIZE = 4096


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


class Workdir:
    """A task's images copied into a temporary working directory for the tools."""

    def __init__(self, task: Task, source: AssetStore) -> None:
        import shutil

        self.path = Path(tempfile.mkdtemp(prefix="tracetune-mmat-"))
        self.images: list[str] = []
        for name, ref in zip(file_names(task.files), task.files, strict=True):
            shutil.copyfile(source.path(ref), self.path / name)
            if ref.is_image:
                self.images.append(name)

    def __enter__(self) -> Workdir:
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)
