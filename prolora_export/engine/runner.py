"""A background thread that drives an :class:`~.core.Engine`, for threaded and asyncio callers.

The engine's core is step-driven and single-threaded (:meth:`Engine.step`); the runner is the one
thread that steps it, as long as anything is pending, and sleeps otherwise. Callers on other
threads submit and read their request's events from a queue (:meth:`stream`); an asyncio server
uses :meth:`astream`, whose events are handed to its loop with ``call_soon_threadsafe``, so the
loop never blocks on a decode step. Leaving an ``astream``/``stream`` early cancels the request.
A graph run that fails finishes only its own rows (the engine's step sees to that); should anything
else in a step fail, every pending request finishes with that error and the runner goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

from .core import Engine
from .requests import Event, Request, Result


class EngineRunner:
    """``with EngineRunner(engine) as runner: runner.stream(request)`` — one stepping thread."""

    def __init__(self, engine: Engine, idle_wait: float = 0.05):
        self.engine = engine
        self.idle_wait = idle_wait
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="prolora-engine", daemon=True)

    def start(self) -> EngineRunner:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> EngineRunner:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while not self._stopping:
            if self.engine.pending:
                try:
                    self.engine.step()
                except Exception as err:  # a step failing outside its runs must not strand the callers
                    with contextlib.suppress(Exception):  # nor may failing them stop the thread
                        self.engine.fail_all(f"engine step failed: {type(err).__name__}: {err}")
            else:
                self._wake.wait(self.idle_wait)
                self._wake.clear()

    def submit(self, request: Request, listener=None) -> str:
        """Queue a request; ``listener`` gets its events on the runner's thread."""
        request_id = self.engine.submit(request, listener)
        self._wake.set()
        return request_id

    def _get(self, events: queue.SimpleQueue) -> Event:
        """The next event; a caller never waits on a stepping thread that is gone."""
        while True:
            try:
                return events.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the engine runner's thread has stopped") from None

    def stream(self, request: Request) -> Iterator[Event]:
        """The request's events, blocking the calling thread between them."""
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.submit(request, events.put)
        finished = False
        try:
            while not finished:
                event = self._get(events)
                finished = event.finished
                yield event
        finally:
            if not finished:
                self.engine.cancel(request.request_id)

    def generate(self, requests: Iterable[Request]) -> list[Result]:
        """Run requests to the end from this thread (they share the batch with everything else)."""
        requests = list(requests)
        done: queue.SimpleQueue[Event] = queue.SimpleQueue()
        for request in requests:
            self.submit(request, lambda e: done.put(e) if e.finished else None)
        results = {}
        while len(results) < len(requests):
            event = self._get(done)
            results[event.request_id] = event.result
        return [results[r.request_id] for r in requests]

    async def astream(self, request: Request, interrupts: set[Callable[[], None]] | None = None
                      ) -> AsyncIterator[Event]:
        """The request's events in an asyncio loop (the loop is never blocked by a step). ``interrupts``:
        while the stream runs it holds a function that ends the stream at once (the request is cancelled),
        for a caller that must stop waiting on the engine without racing every event against a signal."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | None] = asyncio.Queue()

        def deliver(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is left to read it
                loop.call_soon_threadsafe(events.put_nowait, event)

        def interrupt() -> None:
            events.put_nowait(None)

        self.submit(request, deliver)
        if interrupts is not None:
            interrupts.add(interrupt)
        finished = False
        try:
            while not finished:
                event = await events.get()
                if event is None:
                    return
                finished = event.finished
                yield event
        finally:
            if interrupts is not None:
                interrupts.discard(interrupt)
            if not finished:
                self.engine.cancel(request.request_id)

    async def agenerate(self, request: Request) -> Result:
        """One request to the end, awaited."""
        async for event in self.astream(request):
            if event.finished:
                return event.result
        raise RuntimeError("unreachable: a stream ends with its finished event")
