"""The controller loop, action formats, and the episode rendering shared with training."""

from tracetune.agent.formats import (
    CodeFormat,
    JsonFormat,
    ParseError,
    call_as_code,
    first_json_object,
    get_format,
)
from tracetune.agent.loop import (
    Agent,
    Episode,
    EpisodeBackendError,
    Executor,
    Outcome,
    ToolCallExecutor,
)
from tracetune.agent.render import episode_messages, file_names, observation_text, task_text
from tracetune.agent.toolbox import CallOutcome, ToolBox

__all__ = [
    "Agent",
    "CallOutcome",
    "CodeFormat",
    "Episode",
    "EpisodeBackendError",
    "Executor",
    "JsonFormat",
    "Outcome",
    "ParseError",
    "ToolBox",
    "ToolCallExecutor",
    "call_as_code",
    "episode_messages",
    "file_names",
    "first_json_object",
    "get_format",
    "observation_text",
    "task_text",
]
