"""tracetune: tune vision-language models into robust tool-using agents."""

__version__ = "0.1.0"
