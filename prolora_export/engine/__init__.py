"""Generation engine for adapter-slot graphs: continuous batching, one adapter per row (SPEC §5).

A pure library (no HTTP): :class:`Engine` (step-driven core, see :mod:`.core`),
:class:`EngineRunner` (a background thread driving it, for threads and asyncio),
:class:`Request` / :class:`Event` / :class:`Result`.
"""

from .core import Engine
from .requests import Event, Request, Result
from .runner import EngineRunner

__all__ = ["Engine", "EngineRunner", "Event", "Request", "Result"]
