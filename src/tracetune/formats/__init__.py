"""Records as training chats, and exporters/importers for the trainers' formats."""

from tracetune.formats.chat import (
    ChatFormatError,
    asset_loader,
    check_chat,
    dialogue_chat,
    pair_chat,
    trajectory_chat,
)

__all__ = [
    "ChatFormatError",
    "asset_loader",
    "check_chat",
    "dialogue_chat",
    "pair_chat",
    "trajectory_chat",
]
