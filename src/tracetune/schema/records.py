"""The canonical records that flow through every tracetune stage.

Every stage reads and writes these; every exporter starts from them. Fields whose shape
varies from record to record (tool arguments, free metadata, per-metric scores) are typed
``JsonDict``: a dict in Python, a JSON string on disk, so that Parquet chunks written at
different times always share one Arrow schema.
"""

from __future__ import annotations

import json
import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializationInfo,
    ValidationInfo,
)

SCHEMA_VERSION = 1


class _StoredAsJson:
    """Marker: this field is kept as JSON text in Parquet (its shape varies by record)."""


STORED_AS_JSON = _StoredAsJson()


def _storage(info: ValidationInfo | SerializationInfo) -> bool:
    return bool(info.context and info.context.get("storage"))


def _parse_json_dict(value: Any) -> Any:
    if isinstance(value, str | bytes):
        return json.loads(value) if value else {}
    return {} if value is None else value


def _parse_json_value(value: Any, info: ValidationInfo) -> Any:
    # A plain string is a legitimate value; only rows read back from storage hold JSON text.
    if _storage(info) and isinstance(value, str):
        return json.loads(value)
    return value


def _dump_json(value: Any, info: SerializationInfo) -> Any:
    if _storage(info):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return value


JsonDict = Annotated[
    dict[str, Any],
    BeforeValidator(_parse_json_dict),
    PlainSerializer(_dump_json),
    STORED_AS_JSON,
]
"""A free-form JSON object: a dict in Python, JSON text in Parquet."""

JsonValue = Annotated[
    Any,
    BeforeValidator(_parse_json_value),
    PlainSerializer(_dump_json),
    STORED_AS_JSON,
]
"""Any JSON value, stored as its JSON text in Parquet."""

STORAGE_CONTEXT = {"storage": True}
"""Pass as ``context=`` to ``model_dump``/``model_validate`` when writing or reading Parquet."""


def new_id(prefix: str = "") -> str:
    """A random record id (use ``stable_id`` when the id must survive a rerun)."""
    return f"{prefix}{uuid.uuid4().hex[:16]}"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, frozen=False)


class Record(_Model):
    """Base of every stored record: an id and the schema version it was written with."""

    kind: ClassVar[str] = "record"
    schema_version: int = SCHEMA_VERSION
    id: str


class FileRef(_Model):
    """A content-addressed image or file; its bytes live in a dataset's ``assets/`` folder."""

    sha256: str = Field(description="SHA-256 of the file's bytes; the content address.")
    name: str = Field(description="File name shown to models and users, e.g. 'receipt.png'.")
    mime: str = Field(default="application/octet-stream")
    size: int = Field(default=0, description="Size in bytes.")
    width: int | None = Field(default=None, description="Image width in pixels (images only).")
    height: int | None = Field(default=None, description="Image height in pixels (images only).")
    description: str | None = Field(default=None, description="What the file holds, if known.")

    @property
    def is_image(self) -> bool:
        return self.mime.startswith("image/")

    @property
    def asset_path(self) -> str:
        """Path of the bytes relative to a dataset root."""
        suffix = ""
        if "." in self.name:
            suffix = "." + self.name.rsplit(".", 1)[1].lower()
        return f"assets/{self.sha256[:2]}/{self.sha256}{suffix}"


class ToolCall(_Model):
    """One call of a named tool with JSON arguments (OpenAI function-calling shape)."""

    name: str
    arguments: JsonDict = Field(default_factory=dict)
    id: str | None = None


class GoldAnswer(_Model):
    """The known correct answer of a task, with what else counts as correct."""

    value: str = Field(description="The canonical answer.")
    kind: Literal["text", "number", "list", "choice"] = "text"
    aliases: list[str] = Field(default_factory=list, description="Other accepted spellings.")
    tolerance: float | None = Field(
        default=None, description="Absolute tolerance for numeric answers (None: exact)."
    )
    unit: str | None = Field(default=None, description="Unit that may follow a numeric answer.")


class Provenance(_Model):
    """Where a record came from: source, generator, prompt hash, seed, parent record."""

    source: str = Field(description="e.g. 'program:receipt', 'mtrace', 'import:gta', 'cli'.")
    model: str | None = None
    prompt_hash: str | None = None
    seed: int | None = None
    parent_id: str | None = None
    created_at: float | None = None
    extra: JsonDict = Field(default_factory=dict)


class Task(Record):
    """A query with its images and files, the tools allowed, and optional gold answer/chain."""

    kind: ClassVar[str] = "task"
    query: str
    files: list[FileRef] = Field(default_factory=list, description="Images and files, in order.")
    tools: list[str] = Field(default_factory=list, description="Tool names the agent may use.")
    gold: GoldAnswer | None = None
    gold_chain: list[ToolCall] = Field(
        default_factory=list, description="The tool calls a correct solver makes, in order."
    )
    provenance: Provenance = Field(default_factory=lambda: Provenance(source="unknown"))
    metadata: JsonDict = Field(default_factory=dict)

    @property
    def images(self) -> list[FileRef]:
        return [f for f in self.files if f.is_image]


class Usage(_Model):
    """Tokens, cost, calls and retries spent by model calls."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = Field(default=0, description="Model calls made (cache hits included).")
    cached_calls: int = Field(default=0, description="Calls answered from the response cache.")
    retries: int = Field(default=0, description="Retried HTTP attempts (429, 5xx, timeouts).")

    def add(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
            calls=self.calls + other.calls,
            cached_calls=self.cached_calls + other.cached_calls,
            retries=self.retries + other.retries,
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ErrorKind(StrEnum):
    """Typed step errors; the model sees them as observations and may recover."""

    PARSE = "parse"  # the model output has no valid action
    UNKNOWN_TOOL = "unknown_tool"
    TOOL_ARGUMENTS = "tool_arguments"  # arguments do not match the tool's schema
    TOOL = "tool"  # the tool raised
    CODE = "code"  # model-written code raised
    TIMEOUT = "timeout"  # wall-clock or CPU limit
    MEMORY = "memory"  # memory cap
    SANDBOX = "sandbox"  # a forbidden operation (file outside workdir, network, process)
    OUTPUT_LIMIT = "output_limit"
    BACKEND = "backend"  # the model backend failed for good


class StepError(_Model):
    kind: ErrorKind
    message: str


class Action(_Model):
    """What the controller decided at a step: one tool call, a block of code, or an answer."""

    type: Literal["tool_call", "code", "final_answer"]
    tool_call: ToolCall | None = None
    code: str | None = None
    answer: str | None = None


class Observation(_Model):
    """What came back from executing an action: text (printed output) and images."""

    text: str = ""
    images: list[FileRef] = Field(default_factory=list)
    data: JsonValue = Field(default=None, description="Structured tool output, if any.")


class Step(_Model):
    """One controller turn: its raw output, thought, action, observation and error."""

    index: int
    raw: str = Field(default="", description="The model's output exactly as generated.")
    thought: str = ""
    action: Action | None = Field(default=None, description="None when the output did not parse.")
    observation: Observation | None = None
    error: StepError | None = None
    usage: Usage = Field(default_factory=Usage)
    latency_s: float = Field(default=0.0, description="Seconds spent generating this step.")
    exec_s: float = Field(default=0.0, description="Seconds spent executing the action.")

    @property
    def is_final(self) -> bool:
        return self.action is not None and self.action.type == "final_answer"


TrajectoryStatus = Literal["completed", "max_steps", "max_errors", "failed"]


class Trajectory(Record):
    """One episode of a controller on a task; the task is embedded so the record stands alone."""

    kind: ClassVar[str] = "trajectory"
    task: Task
    controller: str = Field(description="Model spec of the controller, e.g. 'openai:gpt-4o'.")
    action_format: Literal["json", "code", "tools"] = "json"
    tools: list[str] = Field(
        default_factory=list, description="Names of the tools the controller was given."
    )
    steps: list[Step] = Field(default_factory=list)
    final_answer: str | None = None
    status: TrajectoryStatus = "completed"
    usage: Usage = Field(default_factory=Usage)
    started_at: float = Field(default_factory=time.time)
    duration_s: float = 0.0
    prompt_hash: str | None = Field(default=None, description="Hash of the system prompt template.")
    sampling: JsonDict = Field(default_factory=dict)
    metadata: JsonDict = Field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return self.task.id


class Verdict(Record):
    """A judgement of a task, trajectory, step or dialogue, with its reasons."""

    kind: ClassVar[str] = "verdict"
    target_id: str
    target_kind: Literal["task", "trajectory", "step", "dialogue", "pair"] = "trajectory"
    judge: str = Field(description="'gold', 'exec', or the judge model's spec.")
    passed: bool
    score: float | None = None
    reasons: list[str] = Field(default_factory=list)
    prompt_hash: str | None = None
    details: JsonDict = Field(default_factory=dict)
    usage: Usage = Field(default_factory=Usage)


class PreferencePair(Record):
    """A step-wise preference: shared prefix, then a chosen and a rejected next step."""

    kind: ClassVar[str] = "pair"
    task: Task
    action_format: Literal["json", "code", "tools"] = "json"
    tools: list[str] = Field(
        default_factory=list, description="Names of the tools the controller was given."
    )
    prefix: list[Step] = Field(default_factory=list, description="Committed steps before the fork.")
    chosen: Step
    rejected: Step
    chosen_score: float | None = None
    rejected_score: float | None = None
    verifier: str = Field(default="", description="Name of the step verifier that ranked them.")
    reasons: list[str] = Field(default_factory=list, description="Why rejected lost.")
    metadata: JsonDict = Field(default_factory=dict)

    @property
    def step_index(self) -> int:
        return len(self.prefix)


class ContentPart(_Model):
    type: Literal["text", "image"]
    text: str | None = None
    image: FileRef | None = None


class Message(_Model):
    """A stored chat message (system/user/assistant/tool) with text and image parts."""

    role: Literal["system", "user", "assistant", "tool"]
    content: list[ContentPart] = Field(default_factory=list)
    name: str | None = Field(default=None, description="Tool name, for tool messages.")
    tool_calls: list[ToolCall] = Field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(p.text or "" for p in self.content if p.type == "text")

    @classmethod
    def of(cls, role: str, text: str, images: list[FileRef] | None = None) -> Message:
        parts = [ContentPart(type="image", image=i) for i in images or []]
        parts.append(ContentPart(type="text", text=text))
        return cls(role=role, content=parts)  # type: ignore[arg-type]


class Dialogue(Record):
    """A rendered training dialogue: an MMAT RR/ORR rationale or a plain chat."""

    kind: ClassVar[str] = "dialogue"
    task: Task
    format: Literal["rr", "orr", "chat"]
    messages: list[Message]
    provenance: Provenance = Field(default_factory=lambda: Provenance(source="unknown"))
    metadata: JsonDict = Field(default_factory=dict)


class EvalRecord(Record):
    """One scored benchmark item: the prediction and its per-metric scores."""

    kind: ClassVar[str] = "eval"
    benchmark: str = Field(description="Benchmark and protocol, e.g. 'gta/e2e/official'.")
    item_id: str
    model: str | None = None
    prediction: str | None = None
    scores: JsonDict = Field(default_factory=dict, description="Metric name to score.")
    trajectory_id: str | None = None
    metadata: JsonDict = Field(default_factory=dict)


RECORD_TYPES: dict[str, type[Record]] = {
    cls.kind: cls for cls in (Task, Trajectory, Verdict, PreferencePair, Dialogue, EvalRecord)
}
