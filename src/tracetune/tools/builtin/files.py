"""Read documents as markdown (markitdown), optionally asking the configured model about them.

Options (``ctx.options['inspect_file']``): ``max_chars`` (default 20000) caps the markdown
shown to the model; the cut is marked so the model knows the file goes on.
"""

from __future__ import annotations

import asyncio
import functools
import io
from pathlib import Path
from typing import Any

from tracetune.tools.builtin.support import TypedTool, tool_options
from tracetune.tools.spec import ToolContext, ToolError, ToolResult, register_tool

DEFAULT_MAX_CHARS = 20_000
SUPPORTED = (
    ".pdf",
    ".docx",
    ".xlsx",
    ".xls",
    ".pptx",
    ".csv",
    ".html",
    ".htm",
    ".json",
    ".jsonl",
    ".xml",
    ".zip",
    ".txt",
    ".md",
    ".epub",
    ".ipynb",
)

QUESTION_PROMPT = "tools/inspect_file_question.jinja"  # under tracetune/prompts


def truncate(text: str, max_chars: int) -> tuple[str, bool]:
    """Cut ``text`` to ``max_chars``, at a line break when one is near, with a marker."""
    if len(text) <= max_chars:
        return text, False
    cut = text.rfind("\n", int(max_chars * 0.8), max_chars)
    cut = cut if cut > 0 else max_chars
    marker = f"\n\n[... truncated: showing {cut} of {len(text)} characters ...]"
    return text[:cut] + marker, True


class InspectFile(TypedTool):
    """markitdown converts the file; one converter per process."""

    name = "inspect_file"
    requires = ("markitdown",)

    def setup(self) -> None:
        from markitdown import MarkItDown

        self.converter = MarkItDown(enable_plugins=False)

    def to_markdown(self, path: Path, data: bytes | None = None) -> str:
        """``path`` as markdown; from ``data`` (its bytes, already read) when given."""
        from markitdown import MarkItDownException, StreamInfo

        try:
            if data is None:
                result = self.converter.convert(str(path))
            else:
                info = StreamInfo(
                    extension=path.suffix.lower() or None, filename=path.name, local_path=None
                )
                result = self.converter.convert_stream(io.BytesIO(data), stream_info=info)
        except MarkItDownException as exc:
            # markitdown's message already names the missing extra (e.g. markitdown[pptx]).
            raise ToolError(f"cannot read {path.name}: {exc}") from exc
        return (result.markdown or "").strip()

    async def forward(  # type: ignore[override]
        self, ctx: ToolContext, path: str, question: str | None = None
    ) -> ToolResult:
        """Read a file (pdf, docx, xlsx, pptx, csv, html, json, zip, txt, ...) as markdown text,
        or answer a question about it.

        Args:
            path: File name in the working directory.
            question: A question about the file; if given, the answer is returned instead of
                the whole text.
        """
        options = tool_options(ctx, "inspect_file")
        max_chars = int(options.get("max_chars", DEFAULT_MAX_CHARS))
        full = ctx.resolve(path)
        # Read once, by fd, never through a link: the code may swap the name meanwhile.
        raw = ctx.read_bytes(path)
        if question and ctx.model is None:
            raise ToolError(
                "inspect_file was asked a question but no model is configured to answer it; "
                "call it without a question to get the file's text, or configure a model "
                "(e.g. `--model openai:gpt-4o-mini`)"
            )
        markdown = await asyncio.to_thread(functools.partial(self.to_markdown, full, raw))
        # Converters quote the absolute path (zip listings); the model knows the file by name.
        markdown = markdown.replace(str(full), path)
        if not markdown:
            suffix = full.suffix.lower()
            hint = (
                ""
                if suffix in SUPPORTED
                else f" ({suffix or 'no extension'} is not a known format)"
            )
            raise ToolError(f"no text could be extracted from {path}{hint}")
        shown, truncated = truncate(markdown, max_chars)
        data: dict[str, Any] = {"path": path, "chars": len(markdown), "truncated": truncated}
        if not question:
            return ToolResult(text=shown, data={**data, "markdown": shown})
        from tracetune.models.base import Sampling
        from tracetune.prompts import prompt_hash, render

        prompt = render(QUESTION_PROMPT, file_name=full.name, markdown=shown, question=question)
        data["prompt_hash"] = prompt_hash(QUESTION_PROMPT)
        generation = await ctx.model.generate(
            [{"role": "user", "content": prompt}],
            sampling=Sampling(temperature=0.0, max_tokens=int(options.get("max_tokens", 512))),
        )
        answer = generation.text.strip()
        return ToolResult(text=answer, data={**data, "question": question, "answer": answer})


inspect_file = register_tool(InspectFile())
