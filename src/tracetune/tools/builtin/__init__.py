"""Built-in tools; importing this package registers them.

Heavy libraries (rapidocr, cv2, torch, transformers, diffusers, sentence-transformers) are
imported when a tool is first set up or called, so importing this package stays fast.
"""

from tracetune.tools.builtin import (  # noqa: F401
    algebra,
    basic,
    detection,
    diffusion,
    files,
    retrieval,
    vision,
    vlm,
)
