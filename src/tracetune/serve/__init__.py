"""OpenAI-compatible serving of a local or tuned VLM, with dynamic batching.

``tracetune serve MODEL [--adapter DIR]`` answers ``/v1/models`` and ``/v1/chat/completions``
(images as data URLs, ``n``, ``stop``, ``seed``, streaming, hermes-format tool calls) and
batches concurrent requests into shared ``generate`` calls. On GPUs, vLLM serves the same
checkpoints faster; see docs/serving.md.
"""

from tracetune.serve.app import RequestError, create_app
from tracetune.serve.engine import BatchEngine, BatchStats, GenRequest, GenResult
from tracetune.serve.server import ServeConfig, ServeError, ServerThread, bind, load_engine, serve

__all__ = [
    "BatchEngine",
    "BatchStats",
    "GenRequest",
    "GenResult",
    "RequestError",
    "ServeConfig",
    "ServeError",
    "ServerThread",
    "bind",
    "create_app",
    "load_engine",
    "serve",
]
