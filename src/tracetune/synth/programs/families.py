"""The built-in task families; importing this module registers them."""

from tracetune.synth.programs import (
    charts,  # noqa: F401
    compare,  # noqa: F401
    documents,  # noqa: F401
    faces,  # noqa: F401
    forms,  # noqa: F401
    receipts,  # noqa: F401
    retrieval,  # noqa: F401
    tables,  # noqa: F401
)
