"""Test doubles for unit tests of logic. Never a product default."""

from tracetune.testing.openai_server import ScriptedOpenAIServer
from tracetune.testing.scripted import ScriptedChatModel

__all__ = ["ScriptedChatModel", "ScriptedOpenAIServer"]
