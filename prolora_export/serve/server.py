"""Run the app with uvicorn: build the engine, step it on a background thread, serve until a signal.

The port is bound first, before the model loads, so a port in use is a one-line error at once.
Connections are bounded with uvicorn's own limits: at most ``max_connections`` open (beyond, uvicorn
answers 503), ``timeout_keep_alive`` seconds to send a request's headers (on a new connection as
between requests) and to stay idle; the app bounds the body (size, arrival time).

SIGTERM (and Ctrl-C) stop accepting connections at once and refuse new requests on open ones (503);
in-flight requests may finish for ``shutdown_timeout`` seconds, then the app answers the rest at
once, whatever the engine is doing (an error chunk and ``[DONE]``, or a 503 ``shutting_down``), and
cancels them; the process exits 0 once the engine's step in progress has ended.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
from collections.abc import Mapping
from pathlib import Path

from ..engine import Engine, EngineRunner
from ..engine.prefix import DEFAULT_BLOCK
from ..engine.slots import AdapterSource
from ..errors import PRoLoRAError
from .app import check_api_key, create_app
from .protocol import name_problem

log = logging.getLogger("prolora_export.serve")
#: seconds after the shutdown bound before uvicorn cancels whatever still runs (a backstop only)
BACKSTOP = 5.0
#: connections allowed beyond the requests the server admits (health checks, metrics, adapters)
SPARE_CONNECTIONS = 64


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it), or a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise PRoLoRAError(f"cannot serve on {host}:{port}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise PRoLoRAError(f"cannot serve on {host}:{port}: {err.strerror or err}") from None
    return sock


def header_timeout_protocol() -> type:
    """uvicorn's HTTP/1.1 protocol with a header timer: from the moment a connection opens, and from
    the end of each response, the client has ``timeout_keep_alive`` seconds to complete a request's
    headers, else the connection is closed (uvicorn's own keep-alive timer stops at the first byte,
    so a client sending headers slowly could hold a connection for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()  # before: a pipelined request handled inside starts a new cycle at once
            super().on_response_complete()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.header_timer = self.loop.call_later(self.timeout_keep_alive, self._headers_too_slow)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_too_slow(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

    return Protocol


def uvicorn_server(app, *, shutdown_timeout: float, host: str = "127.0.0.1", port: int = 0, log_level: str = "info",
                   timeout_keep_alive: float = 5.0, max_connections: int | None = None):
    """uvicorn's server for ``app`` (from :func:`~.app.create_app`) with the limits above, telling the
    app when shutdown starts (it refuses new requests and answers the running ones after
    ``shutdown_timeout`` seconds). Run it with ``server.run(sockets=[bind(host, port)])``."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            http=header_timeout_protocol(), timeout_keep_alive=timeout_keep_alive,
                            limit_concurrency=max_connections,
                            timeout_graceful_shutdown=shutdown_timeout + BACKSTOP)
    app_server = app.state.server

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app_server.close(shutdown_timeout)
            await super().shutdown(sockets)

    return Server(config)


def serve(onnx_dir: str | Path, adapters: Mapping[str, AdapterSource] | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, base_name: str | None = None, api_key: str | None = None, max_batch: int = 16,
          max_queue: int = 64, max_adapters: int = 256, max_cached_tokens: int = 32768, max_prefill_tokens: int = 2048,
          prefix_cache_tokens: int = 4096, prefix_block: int = DEFAULT_BLOCK, default_max_tokens: int = 256,
          threads: int | None = None, provider: str = "cpu", shutdown_timeout: float = 10.0,
          log_level: str = "info", max_body_bytes: int = 1 << 20, body_timeout: float = 30.0,
          timeout_keep_alive: float = 5.0, max_connections: int | None = None) -> None:
    """Serve ``onnx_dir`` (an ``onnx --mode compact --slots`` export) with ``adapters`` loaded, until
    SIGTERM or SIGINT. ``base_name`` is the model name of the base (default: the folder's name);
    ``max_connections`` defaults to ``max_batch + max_queue + 64``."""
    import uvicorn  # noqa: F401  (first: a missing 'serve' extra is reported before the model loads)

    if max_queue < 0 or shutdown_timeout < 0:
        raise PRoLoRAError(f"--max-queue and --shutdown-timeout must be ≥ 0, got {max_queue}, {shutdown_timeout}")
    if len(adapters or {}) > max_adapters:
        raise PRoLoRAError(f"{len(adapters)} adapters given, more than --max-adapters {max_adapters}")
    if max_body_bytes < 1 or body_timeout <= 0 or timeout_keep_alive <= 0 or (max_connections or 1) < 1:
        raise PRoLoRAError("--max-body-bytes, --body-timeout, --timeout-keep-alive and --max-connections must be > 0")
    check_api_key(api_key)
    for name in adapters or {}:
        problem = name_problem(name)
        if problem:
            raise PRoLoRAError(f"--adapter: {problem}")
    base_name = base_name or Path(onnx_dir).resolve().name
    if base_name in (adapters or {}):
        raise PRoLoRAError(f"an adapter may not take the base model's name {base_name!r}")
    sock = bind(host, port)  # before the model loads: a port in use fails at once
    try:
        engine = Engine(onnx_dir, adapters, max_batch=max_batch, max_cached_tokens=max_cached_tokens,
                        max_prefill_tokens=max_prefill_tokens, prefix_cache_tokens=prefix_cache_tokens,
                        prefix_block=prefix_block, provider=provider, threads=threads)
        if not is_loopback(host) and api_key is None:
            log.warning("serving on %s without --api-key: anyone who can reach the port can use it", host)
        with EngineRunner(engine) as runner:
            app = create_app(runner, base_name=base_name, api_key=api_key, max_queue=max_queue,
                             max_adapters=max_adapters, default_max_tokens=default_max_tokens,
                             max_body_bytes=max_body_bytes, body_timeout=body_timeout)
            server = uvicorn_server(app, shutdown_timeout=shutdown_timeout, host=host,
                                    port=sock.getsockname()[1], log_level=log_level,
                                    timeout_keep_alive=timeout_keep_alive,
                                    max_connections=max_connections or max_batch + max_queue + SPARE_CONNECTIONS)
            logging.getLogger("uvicorn.error").info("serving %s on http://%s:%d", base_name, host,
                                                    sock.getsockname()[1])
            if engine.pool is not None:  # its memory, stated up front
                pool = engine.pool
                logging.getLogger("uvicorn.error").info(
                    "KV pool: %d rows of %d tokens, %.0f MiB (--max-batch, --max-cached-tokens)", pool.rows,
                    pool.row_length, pool.nbytes / 2**20)
            # uvicorn re-raises the signal it stopped on once it has shut down; with SIGTERM's default
            # action the process would die by the signal, so a graceful stop ends with exit 0 instead
            previous = signal.signal(signal.SIGTERM, lambda *_: None)
            try:
                server.run(sockets=[sock])
            finally:
                signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
    if not server.started:
        raise PRoLoRAError(f"could not serve on {host}:{port} (see the log above)")
