"""Records as training chats, and exporters/importers for the trainers' formats.

Names are loaded on first use, so that the command line can list the formats without
importing the chat rendering (and the schema and Arrow stack behind it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracetune.formats.chat import (
        ChatFormatError,
        asset_loader,
        check_chat,
        dialogue_chat,
        pair_chat,
        trajectory_chat,
    )
    from tracetune.formats.registry import (
        Exporter,
        ExportOptions,
        ExportReport,
        FormatError,
        Importer,
        ImportOptions,
        ImportReport,
        MissingMediaError,
        export_dataset,
        export_formats,
        get_exporter,
        get_importer,
        import_file,
        import_formats,
        register_exporter,
        register_importer,
    )
    from tracetune.formats.trl import load_trl_dataset

__all__ = [
    "ChatFormatError",
    "ExportOptions",
    "ExportReport",
    "Exporter",
    "FormatError",
    "ImportOptions",
    "ImportReport",
    "Importer",
    "MissingMediaError",
    "asset_loader",
    "check_chat",
    "dialogue_chat",
    "export_dataset",
    "export_formats",
    "get_exporter",
    "get_importer",
    "import_file",
    "import_formats",
    "load_trl_dataset",
    "pair_chat",
    "register_exporter",
    "register_importer",
    "trajectory_chat",
]

_CHAT = {
    "ChatFormatError",
    "asset_loader",
    "check_chat",
    "dialogue_chat",
    "pair_chat",
    "trajectory_chat",
}


def _module(name: str) -> str:
    if name in _CHAT:
        return "tracetune.formats.chat"
    return "tracetune.formats.trl" if name == "load_trl_dataset" else "tracetune.formats.registry"


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'tracetune.formats' has no attribute {name!r}")
    value = getattr(importlib.import_module(_module(name)), name)
    globals()[name] = value
    return value
