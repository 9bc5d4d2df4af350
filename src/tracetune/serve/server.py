"""Run the server: in the foreground (``tracetune serve``) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import errno
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from tracetune.errors import TracetuneError
from tracetune.models.base import BackendError, ModelOptions
from tracetune.models.local import LocalVLM
from tracetune.serve.app import create_app
from tracetune.serve.engine import BatchEngine


class ServeError(TracetuneError, RuntimeError):
    """The server cannot start; the message says why and what to do."""


@dataclass
class ServeConfig:
    """What ``tracetune serve`` needs (each field is a CLI option)."""

    model: str
    adapter: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    served_name: str | None = None
    max_batch_rows: int = 32
    batch_wait_ms: float = 2.0
    default_max_tokens: int = 512
    device: str | None = None
    dtype: str = "auto"
    max_pixels: int | None = None
    trust_remote_code: bool = False

    @property
    def name(self) -> str:
        return self.served_name or self.model


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``, or a clear error when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP (not 0) so asyncio sets TCP_NODELAY: keep-alive replies then skip the
    # ~40 ms delayed-ACK wait.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} on {host} is already in use (another server is listening there); "
                f"stop it or pick a free port with --port"
            ) from None
        if exc.errno == errno.EACCES:
            raise ServeError(
                f"not allowed to listen on {host}:{port}; ports below 1024 need root: "
                "use --port 8000 or higher"
            ) from None
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def load_engine(config: ServeConfig) -> BatchEngine:
    options = ModelOptions(
        adapter=config.adapter,
        device=config.device,
        dtype=config.dtype,
        max_pixels=config.max_pixels,
        trust_remote_code=config.trust_remote_code,
    )
    try:
        model = LocalVLM(config.model, options, trust_remote_code=config.trust_remote_code)
    except BackendError as exc:
        raise ServeError(str(exc)) from None
    return BatchEngine(
        model, max_batch_rows=config.max_batch_rows, max_wait_s=config.batch_wait_ms / 1000
    )


def _uvicorn_server(app: Any) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        access_log=False,
        backlog=4096,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=2,
    )
    return uvicorn.Server(config)


def serve(config: ServeConfig, *, on_ready: Any = None) -> None:
    """Bind the port (first, so a taken port fails before the model loads), load, serve."""
    sock = bind(config.host, config.port)
    try:
        engine = load_engine(config)
        app = create_app(engine, config.name, config.default_max_tokens)
        server = _uvicorn_server(app)
        if on_ready is not None:
            on_ready(engine)
        server.run(sockets=[sock])
    finally:
        sock.close()


class ServerThread:
    """The server on a free loopback port in a background thread (tests and benchmarks)::

    with ServerThread(engine, "tiny") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")
    """

    def __init__(
        self, engine: BatchEngine, served_name: str, default_max_tokens: int = 512
    ) -> None:
        self.engine = engine
        self.served_name = served_name
        self.default_max_tokens = default_max_tokens
        self.port = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ServerThread:
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        server = _uvicorn_server(create_app(self.engine, self.served_name, self.default_max_tokens))
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="tracetune-serve", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise ServeError("the server thread failed to start (see the log above)")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
