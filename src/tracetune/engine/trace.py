"""The structured rationale the MMAT engine builds: steps, operator results, retrieval, reflection.

A ``Rationale`` is what the teacher's multi-turn conversation produced, kept on the RR
dialogue's metadata so later stages (reflection, rendering) work from structure instead of
re-parsing text. The RR and ORR renderings are pure functions of it (see ``render``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Signal = Literal["continue", "reflection", "end"]

OPERATOR_NAMES = ("image_caption", "label_bbox", "ocr", "face_detection")
"""The perception operators of MMAT, in the order they are described to models."""

RAG = "rag"
"""Retrieval is named like an operator in configs, but has its own ``<RAG>`` slot."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OperatorCall(_Model):
    """One operator run on the task's image(s) and what it returned (text the model reads)."""

    name: str = Field(description="Operator name, e.g. 'ocr'.")
    result: str = Field(description="The operator's output as shown to the model.")
    error: str | None = Field(default=None, description="Set when the operator failed.")
    data: Any = Field(default=None, description="The tool's structured output, if any.")


class RagCall(_Model):
    """One retrieval: the query and the top passages, formatted as shown to the model."""

    query: str
    result: str = Field(description="The passages as shown to the model.")
    hits: list[dict[str, Any]] = Field(default_factory=list, description="Passages with sources.")
    error: str | None = None


class RationaleStep(_Model):
    """One assistant step: a thought, the operators and retrieval it asked for, its signal."""

    thought: str
    operators: list[OperatorCall] = Field(default_factory=list)
    rag: RagCall | None = None
    signal: Signal = "continue"
    raw: str = Field(default="", description="The teacher's output for this step, verbatim.")

    @property
    def has_results(self) -> bool:
        return bool(self.operators) or self.rag is not None


class Reflection(_Model):
    """A repair after a judge flagged the rationale: what was wrong and the fixed derivation."""

    flagged: list[str] = Field(description="Checks that flagged it: 'unsupported', 'math'.")
    reasons: list[str] = Field(default_factory=list, description="The judges' reasons.")
    critique: str = Field(description="Why the earlier reasoning was insufficient.")
    derivation: str = Field(description="The corrected reasoning that reaches the answer.")


class Rationale(_Model):
    """A whole rationale: the question shown, the steps, the short answer, any reflection."""

    question: str = Field(description="The question as the model sees it (style constraint on).")
    steps: list[RationaleStep]
    answer: str = Field(description="The short answer of the final turn.")
    teacher_answer: str | None = Field(
        default=None, description="What the teacher answered in the closing turn."
    )
    reflection: Reflection | None = None

    def thoughts(self) -> list[str]:
        """Every thought in order, reflection critique and derivation included."""
        out = [s.thought for s in self.steps]
        if self.reflection is not None:
            out += [self.reflection.critique, self.reflection.derivation]
        return out
