"""Run the app with uvicorn: build the engine, step it on a background thread, serve until a signal.

SIGTERM (and Ctrl-C) stop accepting connections at once and refuse new requests on open ones (503);
in-flight requests may finish for ``shutdown_timeout`` seconds, then the app cancels the rest (their
clients get a clean end: an error chunk and ``[DONE]``, or a 503) and the process exits 0.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
from collections.abc import Mapping
from pathlib import Path

from ..engine import Engine, EngineRunner
from ..engine.slots import AdapterSource
from ..errors import PRoLoRAError
from .app import create_app

log = logging.getLogger("prolora_export.serve")
#: seconds after the shutdown bound before uvicorn cancels whatever still runs (a backstop only)
BACKSTOP = 5.0


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def uvicorn_server(config, app_server, grace: float):
    """uvicorn's server, telling the app when shutdown starts (it refuses new requests and cancels
    the running ones after ``grace`` seconds)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app_server.close(grace)
            await super().shutdown(sockets)

    return Server(config)


def serve(onnx_dir: str | Path, adapters: Mapping[str, AdapterSource] | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, base_name: str | None = None, api_key: str | None = None, max_batch: int = 16,
          max_queue: int = 64, max_cached_tokens: int = 32768, default_max_tokens: int = 256,
          threads: int | None = None, provider: str = "cpu", shutdown_timeout: float = 10.0,
          log_level: str = "info") -> None:
    """Serve ``onnx_dir`` (an ``onnx --mode compact --slots`` export) with ``adapters`` loaded, until
    SIGTERM or SIGINT. ``base_name`` is the model name of the base (default: the folder's name)."""
    import uvicorn

    if max_queue < 0 or shutdown_timeout < 0:
        raise PRoLoRAError(f"--max-queue and --shutdown-timeout must be ≥ 0, got {max_queue}, {shutdown_timeout}")
    base_name = base_name or Path(onnx_dir).resolve().name
    if base_name in (adapters or {}):
        raise PRoLoRAError(f"an adapter may not take the base model's name {base_name!r}")
    engine = Engine(onnx_dir, adapters, max_batch=max_batch, max_cached_tokens=max_cached_tokens,
                    provider=provider, threads=threads)
    if not is_loopback(host) and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach the port can use it", host)
    with EngineRunner(engine) as runner:
        app = create_app(runner, base_name=base_name, api_key=api_key, max_queue=max_queue,
                         default_max_tokens=default_max_tokens)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=shutdown_timeout + BACKSTOP)
        server = uvicorn_server(config, app.state.server, shutdown_timeout)
        # uvicorn re-raises the signal it stopped on once it has shut down; with SIGTERM's default
        # action the process would die by the signal, so a graceful stop ends with exit 0 instead
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise PRoLoRAError(f"could not serve on {host}:{port} (see the log above)")
