"""Built-in tools; importing this package registers them."""

from tracetune.tools.builtin import basic  # noqa: F401
