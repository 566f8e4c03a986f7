"""The ASGI app: OpenAI-compatible endpoints over one :class:`~prolora_export.engine.EngineRunner`.

Every completion is one engine request; the request's ``model`` picks the adapter (the base's name:
no adapter), so requests for different adapters share the engine's batches. The app only checks,
admits, translates and counts: requests wait in the engine's FIFO queue, at most ``max_queue`` beyond
the batch (then 429 with ``Retry-After``); a client that goes away cancels its request, which frees
its row at the next step. An adapter is unloaded only while no request uses it (else 409).

Nothing a client sends can stall the engine's thread: a body is bounded in size (413), in the time
it takes to arrive (408) and in nesting (400); prompts are tokenized and chat templates rendered in
worker threads, and the engine gets token ids; an adapter's files are read on a thread of their own,
outside the engine's lock, within ``adapter_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import EngineRunner, Event, Request
from ..engine.pool import KVPool
from ..engine.prefix import PrefixCache
from ..errors import PRoLoRAError
from .protocol import APIError, Call, completion, error_body, name_problem, parse_call, stream_events

#: the window over which /metrics reports tokens per second
RATE_WINDOW = 10.0
#: at shutdown, how long the engine may take to drop the requests still in it (their clients have
#: had their answer already; this only lets its last events find the loop open)
DRAIN_TIMEOUT = 5.0
#: how deep a request body's JSON may nest (a chat request with content parts needs 5)
MAX_JSON_DEPTH = 32
#: prompts tokenized at once, each on a worker thread (a long one holds memory while it runs)
TOKENIZER_THREADS = 2
STEP_FAILED = "engine step failed"
SHUTDOWN = "the server is shutting down: the request was cancelled"
#: what :meth:`Server._race` returns when the client left first / the shutdown bound passed first
GONE, STOPPED = object(), object()


def label(value: str) -> str:
    """A Prometheus label value, escaped (a name must not be able to write metric lines)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counters and gauges of the server, rendered in the Prometheus text format."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()  # (model, status) -> answered
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW seconds

    def forget(self, model: str) -> None:
        """Drop a model's request counts (its adapter was unloaded)."""
        for key in [k for k in self.requests if k[0] == model]:
            del self.requests[key]

    def tokens(self, count: int) -> None:
        self.generated_tokens += count
        now = time.monotonic()
        self.recent.append((now, count))
        self._expire(now)  # here too: a server nobody scrapes would otherwise keep every token's entry

    def tokens_per_second(self) -> float:
        self._expire(time.monotonic())
        return sum(n for _, n in self.recent) / RATE_WINDOW

    def _expire(self, now: float) -> None:
        """Drop the entries older than RATE_WINDOW."""
        while self.recent and self.recent[0][0] < now - RATE_WINDOW:
            self.recent.popleft()

    def render(self, *, running: int, waiting: int, adapters: list[str], prefill_chunks: int = 0,
               pool: KVPool | None = None, prefix: PrefixCache | None = None) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value if isinstance(value, int) else f'{value:g}'}"  # bytes: every digit
                         for labels, value in samples)

        metric("prolora_requests_total", "counter", "Completion requests answered, by model and HTTP status.",
               [(f'{{model="{label(m)}",status="{s}"}}', n) for (m, s), n in sorted(self.requests.items())])
        metric("prolora_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [("", self.prompt_tokens)])
        metric("prolora_generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
        metric("prolora_generation_tokens_per_second", "gauge",
               f"Tokens generated per second over the last {RATE_WINDOW:g} s.", [("", self.tokens_per_second())])
        metric("prolora_batch_size", "gauge", "Requests decoding now (rows of the batch).", [("", running)])
        metric("prolora_queue_length", "gauge", "Requests waiting for a row.", [("", waiting)])
        metric("prolora_adapters_loaded", "gauge", "Adapters loaded.", [("", len(adapters))])
        metric("prolora_adapter_loaded", "gauge", "1 for each loaded adapter.",
               [(f'{{adapter="{label(a)}"}}', 1) for a in adapters])
        metric("prolora_prefill_chunks_total", "counter", "Prefill runs (a long prompt takes several chunks).",
               [("", prefill_chunks)])
        if pool is not None:
            metric("prolora_kv_pool_rows", "gauge", "Rows of the KV pool (one per running request).",
                   [("", pool.rows)])
            metric("prolora_kv_pool_rows_used", "gauge", "KV pool rows owned by requests.", [("", pool.occupied)])
            metric("prolora_kv_pool_row_tokens", "gauge", "Positions of one KV pool row.", [("", pool.row_length)])
            metric("prolora_kv_pool_bytes", "gauge", "Bytes of the KV pool, allocated at start.", [("", pool.nbytes)])
        if prefix is not None:
            metric("prolora_prefix_cache_hits_total", "counter",
                   "Prompts that reused a cached prefix of their adapter.", [("", prefix.hits)])
            metric("prolora_prefix_cache_reused_tokens_total", "counter", "Prompt tokens not prefilled thanks to it.",
                   [("", prefix.tokens_reused)])
            metric("prolora_prefix_cache_tokens", "gauge", "Positions held by the prefix cache.", [("", prefix.tokens)])
        return "\n".join(lines) + "\n"


class Server:
    """The app's state: the runner, admission and per-adapter use counts, limits, metrics."""

    def __init__(self, runner: EngineRunner, *, base_name: str, api_key: str | None = None, max_queue: int = 64,
                 max_adapters: int = 256, default_max_tokens: int = 256, max_body_bytes: int = 1 << 20,
                 body_timeout: float = 30.0, adapter_timeout: float = 60.0):
        self.runner, self.engine = runner, runner.engine
        self.base_name, self.api_key = base_name, api_key
        self.max_queue, self.max_adapters, self.default_max_tokens = max_queue, max_adapters, default_max_tokens
        self.max_body_bytes, self.body_timeout, self.adapter_timeout = max_body_bytes, body_timeout, adapter_timeout
        self.in_flight = 0
        self.request_ids: set[str] = set()  # in the engine on behalf of a client
        self.closing = False
        self.stopping = asyncio.Event()  # set when the shutdown bound has passed: answer everyone now
        self.interrupts: set[Callable[[], None]] = set()  # each live event stream's: ends it at that bound
        self.tokenizing = asyncio.Semaphore(TOKENIZER_THREADS)
        self.reading: asyncio.Future | None = None  # the adapter load in progress (one at a time)
        self.started = 0  # in-flight requests that have their first token (they hold a row)
        self.using: Counter[str] = Counter()  # adapter -> in-flight requests
        self.unloading: set[str] = set()
        self.metrics = Metrics()
        self.created = int(time.time())

    # ------------------------------------------------------------------ request bodies

    async def read_json(self, http: HTTPRequest):
        """The body as JSON, bounded in size (413), arrival time (408) and nesting depth (400)."""
        body = await self._read_body(http)
        too_deep = APIError(400, f"the request body is JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            value = json.loads(body)
        except RecursionError:
            raise too_deep from None
        except (ValueError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})") from None
        if nested_deeper(value, MAX_JSON_DEPTH):
            raise too_deep
        return value

    async def _read_body(self, http: HTTPRequest) -> bytes:
        too_large = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes (--max-body-bytes)",
                             code="request_too_large", headers={"Connection": "close"})
        length = http.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise too_large

        async def collect() -> bytes:
            parts, size = [], 0
            async for part in http.stream():
                size += len(part)
                if size > self.max_body_bytes:
                    raise too_large
                parts.append(part)
            return b"".join(parts)

        try:
            return await asyncio.wait_for(collect(), self.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise APIError(499, "the client went away while sending the body") from None

    # ------------------------------------------------------------------ models and adapters

    def models(self) -> list[str]:
        return [self.base_name, *(a for a in self.engine.adapters if a not in self.unloading)]

    def model_object(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "prolora-export",
                "root": self.base_name, "parent": None if name == self.base_name else self.base_name}

    async def list_models(self, http: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_object(m) for m in self.models()]})

    async def get_model(self, http: HTTPRequest) -> Response:
        name = http.path_params["name"]
        if name not in self.models():
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(self.model_object(name))

    async def load_adapter(self, http: HTTPRequest) -> Response:
        body = await self.read_json(http)
        body = body if isinstance(body, dict) else {}
        name, path = body.get("name"), body.get("path")
        if not isinstance(path, str) or not path:
            raise APIError(400, "give {\"name\": ..., \"path\": ...}: a new model name and the adapter's folder "
                                "or .onnx_adapter file on the server", param="path")
        problem = name_problem(name)
        if problem:
            raise APIError(400, problem, param="name")
        if name in self.models() or name in self.unloading:
            raise APIError(409, f"the model {name!r} exists already (unload it first)", param="name",
                           code="model_exists")
        if self.reading is not None and not self.reading.done():
            raise APIError(409, "another adapter is being loaded; retry when it is done", code="load_in_progress",
                           headers={"Retry-After": "1"})
        loaded = len(self.engine.adapters) + len(self.unloading)
        if loaded >= self.max_adapters:
            raise APIError(409, f"{loaded} adapters are loaded, the most this server holds (--max-adapters "
                                f"{self.max_adapters}); unload one first", code="too_many_adapters")
        # the engine refuses to place an adapter read after the deadline, so a timeout here means
        # nothing was loaded, even if the files arrive later
        deadline = time.monotonic() + self.adapter_timeout
        load = functools.partial(self.engine.load_adapter, name, path, deadline=deadline)
        self.reading = asyncio.ensure_future(in_daemon_thread(load))
        self.reading.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved late
        try:
            await asyncio.wait_for(asyncio.shield(self.reading), self.adapter_timeout + 1.0)
        except asyncio.TimeoutError:
            raise APIError(504, f"the adapter's files were not read within {self.adapter_timeout:g} s (slow or hung "
                                "storage?); nothing was loaded", type="server_error", code="adapter_timeout") from None
        except PRoLoRAError as err:
            raise APIError(400, str(err), param="path") from None
        return JSONResponse(self.model_object(name), status_code=201)

    async def unload_adapter(self, http: HTTPRequest) -> Response:
        name = http.path_params["name"]
        if name not in self.models() or name == self.base_name:
            raise APIError(404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found")
        if self.using[name]:
            raise APIError(409, f"the adapter {name!r} is in use by {self.using[name]} request(s); retry when "
                                "they have finished", param="name", code="model_in_use", headers={"Retry-After": "1"})
        self.unloading.add(name)  # new requests for it are refused from now on
        try:
            await run_in_threadpool(self.engine.unload_adapter, name)
        finally:
            self.unloading.discard(name)
        self.metrics.forget(name)  # so that loading and unloading new names does not grow the metrics
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    # ------------------------------------------------------------------ health and metrics

    async def health(self, http: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "models": len(self.models())})

    async def render_metrics(self, http: HTTPRequest) -> Response:
        text = self.metrics.render(running=self.started, waiting=self.in_flight - self.started,
                                   adapters=self.models()[1:], prefill_chunks=self.engine.stats.prefill_runs,
                                   pool=self.engine.pool, prefix=self.engine.prefix)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ completions

    async def completions(self, http: HTTPRequest) -> Response:
        return await self._complete(http, chat=False)

    async def chat_completions(self, http: HTTPRequest) -> Response:
        return await self._complete(http, chat=True)

    async def _complete(self, http: HTTPRequest, chat: bool) -> Response:
        body = await self.read_json(http)
        try:
            call = parse_call(body, chat=chat, models=self.models(), base=self.base_name,
                              default_max_tokens=self.default_max_tokens if chat else 16)
        except APIError as err:
            model = body.get("model") if isinstance(body, dict) else None
            if model in self.models():  # counted under served names only (no unbounded label values)
                self.metrics.requests[(model, err.status)] += 1
            raise
        self._admit(call)
        status, streaming = 499, False
        try:
            call.request = await self._tokenized(call.request)
            events = self.runner.astream(call.request, self.interrupts)
            first = await self._wait(anext(events, STOPPED), http)
            if first is None:  # the client left while the request waited
                return Response(status_code=status)
            if first.finish_reason in ("error", "cancelled"):
                raise engine_error(first.error)
            call.started = True
            self.started += 1
            self._on_event(first)
            if call.stream:
                streaming = True  # the stream counts and releases it
                return StreamingResponse(self._sse(call, events, first), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            result = first.result if first.finished else await self._wait(self._rest(events), http)
            if result is None:
                return Response(status_code=status)
            if result.finish_reason in ("error", "cancelled"):
                raise engine_error(result.error)
            status = 200
            return JSONResponse(completion(call, result))
        except APIError as err:
            status = err.status
            raise
        finally:
            if not streaming:
                self.metrics.requests[(call.model, status)] += 1
                self._release(call)

    async def _tokenized(self, request: Request) -> Request:
        """The request with its prompt as token ids, tokenized (chat template rendered) on a worker
        thread: on the engine's thread a long prompt would stall every row."""
        async with self.tokenizing:
            try:
                ids = await run_in_threadpool(self.engine.prompt_ids, request)
            except PRoLoRAError as err:
                raise engine_error(str(err)) from None
        return dataclasses.replace(request, prompt=None, messages=None, prompt_ids=ids)

    async def _rest(self, events: AsyncIterator[Event]):
        """The rest of a non-streamed request: its result (:data:`STOPPED` when the stream was interrupted)."""
        async for event in events:
            self._on_event(event)
            if event.finished:
                return event.result
        return STOPPED

    async def _race(self, work: Awaitable, http: HTTPRequest):
        """``work``'s value; or :data:`GONE` when the client disconnects first, or :data:`STOPPED` when the
        shutdown bound passes first. ``work`` is cancelled then, and has cleaned up when this returns (a
        stream's engine request is cancelled). Per request, not per token: a streamed token only waits on
        its stream, which the shutdown bound interrupts (:meth:`_cancel_all`)."""
        task = asyncio.ensure_future(work)
        watchers = {asyncio.ensure_future(self.stopping.wait()): STOPPED,
                    asyncio.ensure_future(until_disconnect(http)): GONE}
        try:
            done, _ = await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for watcher in watchers:
                watcher.cancel()
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if task in done or not task.cancelled():
            return task.result()
        return next(outcome for watcher, outcome in watchers.items() if watcher in done)

    async def _wait(self, work: Awaitable, http: HTTPRequest):
        """``work``'s value, or None when the client left first; 503 when the shutdown bound passed."""
        value = await self._race(work, http)
        if value is STOPPED:
            raise engine_error(None)
        return None if value is GONE else value

    def _admit(self, call: Call) -> None:
        if self.closing:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": "1"})
        if self.in_flight >= self.engine.max_batch + self.max_queue:
            self.metrics.requests[(call.model, 429)] += 1
            raise APIError(429, f"the server is at capacity ({self.in_flight} requests in flight); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self.in_flight += 1
        self.request_ids.add(call.request.request_id)
        if call.request.adapter is not None:
            self.using[call.request.adapter] += 1

    def _release(self, call: Call) -> None:
        self.in_flight -= 1
        self.request_ids.discard(call.request.request_id)
        if call.started:
            self.started -= 1
        if call.request.adapter is not None:
            self.using[call.request.adapter] -= 1
            if not self.using[call.request.adapter]:
                del self.using[call.request.adapter]

    def close(self, grace: float) -> None:
        """Shutting down: refuse new requests (503); in ``grace`` seconds, answer those still running
        (an error chunk and ``[DONE]``, or a 503) without waiting for the engine, and cancel them."""
        self.closing = True
        asyncio.get_running_loop().call_later(grace, self._cancel_all)

    def _cancel_all(self) -> None:
        self.stopping.set()
        for interrupt in list(self.interrupts):
            interrupt()
        for request_id in list(self.request_ids):
            self.engine.cancel(request_id)

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Cancel what the engine still holds for clients and wait (bounded) until it is empty, while
        this loop still runs: the engine's last events must find it open."""
        self._cancel_all()
        deadline = time.monotonic() + timeout
        while self.engine.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _on_event(self, event: Event) -> None:
        if event.token_id is not None:
            self.metrics.tokens(1)
        if event.finished and event.result is not None and event.finish_reason != "error":
            self.metrics.prompt_tokens += event.result.prompt_tokens

    async def _sse(self, call: Call, events: AsyncIterator[Event], first: Event) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's format; ends with ``data: [DONE]``. A client that leaves
        cancels this generator (Starlette watches the connection)."""
        status = 200
        try:
            event, opening = first, True
            while True:
                if event is STOPPED or event.finish_reason in ("error", "cancelled"):
                    error = None if event is STOPPED else event.error
                    status = 500 if error else 503
                    body = error_body(error or SHUTDOWN, "server_error", code=None if error else "shutting_down")
                    yield f"data: {json.dumps(body)}\n\n"
                    break
                yield stream_events(call, event, opening)
                opening = False
                if event.finished:
                    break
                event = await anext(events, STOPPED)  # the stream ends early when interrupted (_cancel_all)
                if event is not STOPPED:
                    self._on_event(event)
            yield "data: [DONE]\n\n"
        except BaseException:
            status = 499  # the client went away: the runner's stream cancels the request
            raise
        finally:
            self.metrics.requests[(call.model, status)] += 1
            self._release(call)


def nested_deeper(value, limit: int) -> bool:
    """Whether parsed JSON nests deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


async def in_daemon_thread(function: Callable[[], object]):
    """``function()`` on a daemon thread of its own: a read that hangs (a stuck network file
    system) must neither hold a pool's worker nor keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = function(), None
        except Exception as err:
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="prolora-adapter-reader", daemon=True).start()
    return await future


def engine_error(message: str | None) -> APIError:
    """An engine's refusal as an API error: its checks of the prompt are the client's (400), a failed
    step is ours (500), a request cancelled by a shutdown (no message) is 503."""
    if message is None:
        return APIError(503, SHUTDOWN, type="server_error", code="shutting_down", headers={"Retry-After": "1"})
    if message.startswith(STEP_FAILED):
        return APIError(500, message, type="server_error")
    code = "context_length_exceeded" if "context" in message else None
    return APIError(400, message, param="messages" if "chat" in message else None, code=code)


async def until_disconnect(http: HTTPRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def check_api_key(api_key: str | None) -> None:
    """Refuse, at start-up, a key no request could ever send: empty (``--api-key "$UNSET"``), with
    surrounding whitespace, or with characters outside printable ASCII (headers carry ASCII)."""
    if api_key is None:
        return
    if not api_key.strip():
        raise PRoLoRAError("the API key (--api-key or $PROLORA_API_KEY) is empty: give a key, or unset it to serve "
                           "without one")
    if not (api_key.isascii() and api_key.isprintable()) or api_key != api_key.strip():
        raise PRoLoRAError("the API key (--api-key or $PROLORA_API_KEY) must be printable ASCII with no leading or "
                           "trailing spaces: a client could never send it in a header")


def create_app(runner: EngineRunner, *, base_name: str, api_key: str | None = None, max_queue: int = 64,
               max_adapters: int = 256, default_max_tokens: int = 256, max_body_bytes: int = 1 << 20,
               body_timeout: float = 30.0, adapter_timeout: float = 60.0) -> Starlette:
    """The OpenAI-compatible app over a started runner (see the module docstring). ``api_key``: every
    endpoint but ``/health`` wants ``Authorization: Bearer <api_key>``."""
    check_api_key(api_key)
    server = Server(runner, base_name=base_name, api_key=api_key, max_queue=max_queue, max_adapters=max_adapters,
                    default_max_tokens=default_max_tokens, max_body_bytes=max_body_bytes, body_timeout=body_timeout,
                    adapter_timeout=adapter_timeout)

    def endpoint(handler: Callable[[HTTPRequest], Awaitable[Response]], auth: bool = True):
        async def run(http: HTTPRequest) -> Response:
            try:
                if auth and api_key is not None:
                    check_key(http, api_key)
                return await handler(http)
            except APIError as err:
                return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        return run

    routes = [
        Route("/health", endpoint(server.health, auth=False), methods=["GET"]),
        Route("/metrics", endpoint(server.render_metrics), methods=["GET"]),
        Route("/v1/models", endpoint(server.list_models), methods=["GET"]),
        Route("/v1/models/{name:path}", endpoint(server.get_model), methods=["GET"]),
        Route("/v1/completions", endpoint(server.completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(server.chat_completions), methods=["POST"]),
        Route("/v1/adapters", endpoint(server.load_adapter), methods=["POST"]),
        Route("/v1/adapters/{name:path}", endpoint(server.unload_adapter), methods=["DELETE"]),
    ]

    async def http_error(http: HTTPRequest, err: HTTPException) -> Response:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{http.method} {http.url.path}: {err.detail}", kind),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await server.drain()  # after uvicorn's graceful wait: whatever is left is cancelled

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.server = server
    return app


def check_key(http: HTTPRequest, api_key: str) -> None:
    given = http.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
