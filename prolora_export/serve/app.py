"""The ASGI app: OpenAI-compatible endpoints over one :class:`~prolora_export.engine.EngineRunner`.

Every completion is one engine request; the request's ``model`` picks the adapter (the base's name:
no adapter), so requests for different adapters share the engine's batches. The app only checks,
admits, translates and counts: requests wait in the engine's FIFO queue, at most ``max_queue`` beyond
the batch (then 429 with ``Retry-After``); a client that goes away cancels its request, which frees
its row at the next step. An adapter is unloaded only while no request uses it (else 409).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import EngineRunner, Event
from ..errors import PRoLoRAError
from .protocol import APIError, Call, chunks, completion, error_body, parse_call

#: the window over which /metrics reports tokens per second
RATE_WINDOW = 10.0
#: at shutdown, how long the engine may take to drop the requests still in it
DRAIN_TIMEOUT = 30.0
STEP_FAILED = "engine step failed"
SHUTDOWN = "the server is shutting down: the request was cancelled"


class Metrics:
    """Counters and gauges of the server, rendered in the Prometheus text format."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()  # (model, status) -> answered
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW seconds

    def tokens(self, count: int) -> None:
        self.generated_tokens += count
        self.recent.append((time.monotonic(), count))

    def tokens_per_second(self) -> float:
        cutoff = time.monotonic() - RATE_WINDOW
        while self.recent and self.recent[0][0] < cutoff:
            self.recent.popleft()
        return sum(n for _, n in self.recent) / RATE_WINDOW

    def render(self, *, running: int, waiting: int, adapters: list[str]) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        metric("prolora_requests_total", "counter", "Completion requests answered, by model and HTTP status.",
               [(f'{{model="{m}",status="{s}"}}', n) for (m, s), n in sorted(self.requests.items())])
        metric("prolora_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [("", self.prompt_tokens)])
        metric("prolora_generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
        metric("prolora_generation_tokens_per_second", "gauge",
               f"Tokens generated per second over the last {RATE_WINDOW:g} s.", [("", self.tokens_per_second())])
        metric("prolora_batch_size", "gauge", "Requests decoding now (rows of the batch).", [("", running)])
        metric("prolora_queue_length", "gauge", "Requests waiting for a row.", [("", waiting)])
        metric("prolora_adapters_loaded", "gauge", "Adapters loaded.", [("", len(adapters))])
        metric("prolora_adapter_loaded", "gauge", "1 for each loaded adapter.",
               [(f'{{adapter="{a}"}}', 1) for a in adapters])
        return "\n".join(lines) + "\n"


class Server:
    """The app's state: the runner, admission and per-adapter use counts, metrics."""

    def __init__(self, runner: EngineRunner, *, base_name: str, api_key: str | None = None, max_queue: int = 64,
                 default_max_tokens: int = 256):
        self.runner, self.engine = runner, runner.engine
        self.base_name, self.api_key = base_name, api_key
        self.max_queue, self.default_max_tokens = max_queue, default_max_tokens
        self.in_flight = 0
        self.request_ids: set[str] = set()  # in the engine on behalf of a client
        self.closing = False
        self.started = 0  # in-flight requests that have their first token (they hold a row)
        self.using: Counter[str] = Counter()  # adapter -> in-flight requests
        self.unloading: set[str] = set()
        self.metrics = Metrics()
        self.created = int(time.time())

    # ------------------------------------------------------------------ models and adapters

    def models(self) -> list[str]:
        return [self.base_name, *(a for a in self.engine.adapters if a not in self.unloading)]

    def model_object(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "prolora-export",
                "root": self.base_name, "parent": None if name == self.base_name else self.base_name}

    async def list_models(self, http: HTTPRequest) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_object(m) for m in self.models()]})

    async def load_adapter(self, http: HTTPRequest) -> Response:
        body = await read_json(http)
        body = body if isinstance(body, dict) else {}
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path:
            raise APIError(400, "give {\"name\": ..., \"path\": ...}: a new model name and the adapter's folder "
                                "or .onnx_adapter file on the server", param="name")
        if name in self.models() or name in self.unloading:
            raise APIError(409, f"the model {name!r} exists already (unload it first)", param="name",
                           code="model_exists")
        try:
            await run_in_threadpool(self.engine.load_adapter, name, path)
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
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    # ------------------------------------------------------------------ health and metrics

    async def health(self, http: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok", "models": len(self.models())})

    async def render_metrics(self, http: HTTPRequest) -> Response:
        text = self.metrics.render(running=self.started, waiting=self.in_flight - self.started,
                                   adapters=self.models()[1:])
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ completions

    async def completions(self, http: HTTPRequest) -> Response:
        return await self._complete(http, chat=False)

    async def chat_completions(self, http: HTTPRequest) -> Response:
        return await self._complete(http, chat=True)

    async def _complete(self, http: HTTPRequest, chat: bool) -> Response:
        body = await read_json(http)
        try:
            call = parse_call(body, chat=chat, models=self.models(), base=self.base_name,
                              default_max_tokens=self.default_max_tokens if chat else 16)
        except APIError as err:
            model = body.get("model") if isinstance(body, dict) else None
            if model in self.models():  # counted under served names only (no unbounded label values)
                self.metrics.requests[(model, err.status)] += 1
            raise
        self._admit(call)
        events = self.runner.astream(call.request)
        status, streaming = 499, False
        try:
            first = await first_event(events, http)
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
            result = first.result if first.finished else await rest(events, http, self._on_event)
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
        """Shutting down: refuse new requests (503); in ``grace`` seconds, cancel those still running,
        whose clients then get a clean end (an error chunk and ``[DONE]``, or a 503)."""
        self.closing = True
        asyncio.get_running_loop().call_later(grace, self._cancel_all)

    def _cancel_all(self) -> None:
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
        """Server-sent events in OpenAI's format; ends with ``data: [DONE]``."""
        status = 200
        try:
            event, opening = first, True
            while True:
                if event.finish_reason in ("error", "cancelled"):
                    status = 500 if event.error else 503
                    code = None if event.error else "shutting_down"
                    body = error_body(event.error or SHUTDOWN, "server_error", code=code)
                    yield f"data: {json.dumps(body)}\n\n"
                    break
                for part in chunks(call, event, opening):
                    yield f"data: {json.dumps(part)}\n\n"
                opening = False
                if event.finished:
                    break
                event = await anext(events)
                self._on_event(event)
            yield "data: [DONE]\n\n"
        except BaseException:
            status = 499  # the client went away: the runner's stream cancels the request
            raise
        finally:
            self.metrics.requests[(call.model, status)] += 1
            self._release(call)


async def read_json(http: HTTPRequest):
    try:
        return json.loads(await http.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from None


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


async def _race(work: Awaitable, http: HTTPRequest):
    """``work``'s value, or None when the client disconnects first (``work`` is cancelled then)."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnect(http))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return None
    return task.result()


async def first_event(events: AsyncIterator[Event], http: HTTPRequest) -> Event | None:
    return await _race(anext(events), http)


async def rest(events: AsyncIterator[Event], http: HTTPRequest, on_event: Callable[[Event], None]):
    """The rest of a non-streamed request: its result, or None when the client left (it is cancelled)."""

    async def collect():
        async for event in events:
            on_event(event)
            if event.finished:
                return event.result
        return None

    return await _race(collect(), http)


def create_app(runner: EngineRunner, *, base_name: str, api_key: str | None = None, max_queue: int = 64,
               default_max_tokens: int = 256) -> Starlette:
    """The OpenAI-compatible app over a started runner (see the module docstring). ``api_key``: every
    endpoint but ``/health`` wants ``Authorization: Bearer <api_key>``."""
    server = Server(runner, base_name=base_name, api_key=api_key, max_queue=max_queue,
                    default_max_tokens=default_max_tokens)

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
