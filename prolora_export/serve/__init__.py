"""``prolora-export serve``: an OpenAI-compatible HTTP server for many adapters on one slot graph.

:func:`create_app` (:mod:`.app`) puts the OpenAI endpoints on a running
:class:`~prolora_export.engine.EngineRunner`; :func:`serve` (:mod:`.server`) builds the engine and
runs the app with uvicorn. The wire format lives in :mod:`.protocol`. Needs the ``serve`` extra.
"""

from .app import create_app
from .server import serve

__all__ = ["create_app", "serve"]
