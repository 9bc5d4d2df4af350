"""The MMAT data engine: QA ingestion, rationales with operators and retrieval, reflection,
RR and ORR renderings, and RR/ORR inference (as MMAT-1M describes them).

Stages (each resumable on the shared stage runner):
``ingest`` (QA rows -> tasks), ``rationale`` (teacher + real operators -> RR dialogues),
``reflect`` (two judge checks, repair), ``render`` (RR and ORR training dialogues), and
``infer`` (run a tuned model in RR or ORR mode for VQA evaluation).
"""

from tracetune.engine.grammar import GrammarError, ParsedStep, parse_step, render_step
from tracetune.engine.infer import InferConfig, InferenceResult, MMATInference, run_infer
from tracetune.engine.ingest import ColumnMapping, IngestConfig, IngestError, run_ingest
from tracetune.engine.leak import Leak, LeakChecker
from tracetune.engine.operators import (
    OperatorConfig,
    OperatorSet,
    OperatorUnavailable,
)
from tracetune.engine.pipeline import MMATRunConfig, RenderConfig, run_pipeline, run_render
from tracetune.engine.rationale import RationaleConfig, parse_teacher_step, run_rationale
from tracetune.engine.reflect import ReflectConfig, run_reflect
from tracetune.engine.render import orr_from_rr, parse_rr, rr_dialogue, rr_messages
from tracetune.engine.trace import OperatorCall, RagCall, Rationale, RationaleStep, Reflection

__all__ = [
    "ColumnMapping",
    "GrammarError",
    "InferConfig",
    "InferenceResult",
    "IngestConfig",
    "IngestError",
    "Leak",
    "LeakChecker",
    "MMATInference",
    "MMATRunConfig",
    "OperatorCall",
    "OperatorConfig",
    "OperatorSet",
    "OperatorUnavailable",
    "ParsedStep",
    "RagCall",
    "Rationale",
    "RationaleConfig",
    "RationaleStep",
    "ReflectConfig",
    "Reflection",
    "RenderConfig",
    "orr_from_rr",
    "parse_rr",
    "parse_step",
    "parse_teacher_step",
    "render_step",
    "rr_dialogue",
    "rr_messages",
    "run_infer",
    "run_ingest",
    "run_pipeline",
    "run_reflect",
    "run_rationale",
    "run_render",
]
