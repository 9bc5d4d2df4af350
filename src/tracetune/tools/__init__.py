"""Tools: one specification from type hints and docstrings, a registry, built-in tools."""

from tracetune.tools.spec import (
    FunctionTool,
    OutputType,
    Tool,
    ToolContext,
    ToolError,
    ToolFatal,
    ToolResult,
    ToolTimeout,
    ToolUnavailable,
    get_tool,
    load_tools,
    register_tool,
    registered_tools,
    to_result,
    tool,
)

__all__ = [
    "FunctionTool",
    "OutputType",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolFatal",
    "ToolResult",
    "ToolTimeout",
    "ToolUnavailable",
    "get_tool",
    "load_tools",
    "register_tool",
    "registered_tools",
    "to_result",
    "tool",
]
