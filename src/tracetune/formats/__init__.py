"""Records as training chats, and exporters/importers for the trainers' formats."""

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


def load_trl_dataset(export_dir: str, split: str = "train") -> object:
    """A ``trl-sft``/``trl-dpo`` export as a ``datasets.Dataset`` with images decoded."""
    from tracetune.formats.trl import load_trl_dataset as _load

    return _load(export_dir, split)


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
