"""`prolora-export serve` as a real server process on 127.0.0.1: the `openai` client and raw HTTP
against the engine's offline output for the same requests (greedy and seeded), concurrent clients
over several adapters, streaming order, every error status, adapters loaded and unloaded while
serving, a client leaving mid-stream, a full queue, SIGTERM during a request.

A tiny Llama with a character tokenizer, four adapters of one geometry (fast). Every loop is
bounded and every server process is killed in teardown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_adapter, tiny_llama
from test_engine import HYPER, char_tokenizer

from prolora_export.engine import Engine, Request
from prolora_export.formats.prolora import save_adapter
from prolora_export.onnx.export import export_onnx

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.onnx, pytest.mark.timeout(300)]

NAMES = ("a1", "a2", "a3", "a4")
KEY = "test-key"
BASE = "tiny-base"
#: how long a server may take to start (imports torch, transformers, onnxruntime)
START_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny Llama + character tokenizer with a chat template, five adapters, the slot export, and
    the engine in this process (the offline reference)."""
    root = tmp_path_factory.mktemp("serve")
    tiny_llama().save_pretrained(root / "base", safe_serialization=True)
    char_tokenizer().save_pretrained(root / "base")
    adapters = {}
    for seed, name in enumerate((*NAMES, "a5"), start=1):
        save_adapter(root / name, make_adapter(tiny_llama(), seed=seed, **HYPER))
        adapters[name] = root / name
    slots = export_onnx(str(root / "base"), [adapters["a1"]], root / "slots", mode="compact", slots=True).out
    engine = Engine(slots, adapters, threads=1)
    return {"root": root, "slots": Path(slots), "adapters": adapters, "engine": engine}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``prolora-export serve`` in a subprocess, its log in a file; killed for sure on stop."""

    def __init__(self, tiny: dict, *options: str, adapters=NAMES):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tiny["root"] / f"server-{self.port}.log"
        args = [sys.executable, "-m", "prolora_export", "serve", str(tiny["slots"]), "--port", str(self.port),
                "--base-name", BASE, "--threads", "1", "--log-level", "warning", *options]
        for name in adapters:
            args += ["--adapter", f"{name}={tiny['adapters'][name]}"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(self.log_path, "w")  # closed in stop
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def ready(self) -> ServerProcess:
        """Wait (bounded) until it answers /health."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not answer /health within {START_TIMEOUT} s:\n{self.log_text()}")

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if not self.log.closed:
            self.log.close()


@pytest.fixture(scope="module")
def servers(tiny):
    """Both servers of the module, started together (their start-up overlaps): the main one (API
    key, room for every test), and one with one row and no queue (the last test stops it)."""
    started = [ServerProcess(tiny, "--api-key", KEY, "--max-batch", "8", "--max-queue", "32"),
               ServerProcess(tiny, "--max-batch", "1", "--max-queue", "0", "--shutdown-timeout", "0",
                             adapters=("a1",))]
    try:
        yield started
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0].ready()


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60, **kwargs)


def http(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def offline(tiny, **request) -> object:
    """The engine's answer to the same request in this process."""
    return tiny["engine"].generate([Request(**request)])[0]


def text_prompt(i: int) -> str:
    return f"Q{i}: " + "abcdefghij"[i % 10] * (1 + i % 5) + " ?"


def test_health_and_models(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    ids = [m.id for m in client(server).models.list().data]
    assert ids == [BASE, *NAMES]


@pytest.mark.parametrize("model", [BASE, "a2"])
def test_answers_equal_the_engine_offline(tiny, server, model):
    """Completions and chat, greedy and seeded sampling: the server's text and usage are the engine's
    for the same request."""
    adapter = None if model == BASE else model
    api = client(server)
    for sampling in ({"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.8, "seed": 11}):
        got = api.completions.create(model=model, prompt="Hello, w", max_tokens=12, **sampling)
        want = offline(tiny, prompt="Hello, w", adapter=adapter, max_new_tokens=12, **sampling)
        assert got.choices[0].text == want.text
        assert got.usage.prompt_tokens == want.prompt_tokens and got.usage.completion_tokens == len(want.token_ids)
        assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
        messages = [{"role": "user", "content": "Say hi"}]
        chat = api.chat.completions.create(model=model, messages=messages, max_tokens=10, **sampling)
        want = offline(tiny, messages=messages, adapter=adapter, max_new_tokens=10, **sampling)
        assert chat.choices[0].message.content == want.text and chat.choices[0].message.role == "assistant"
        assert chat.usage.total_tokens == want.prompt_tokens + len(want.token_ids)
    stopped = api.completions.create(model=model, prompt="Hello, w", max_tokens=12, temperature=0, stop=["o", "e"])
    want = offline(tiny, prompt="Hello, w", adapter=adapter, max_new_tokens=12, stop=["o", "e"])
    assert stopped.choices[0].text == want.text


def test_sixteen_concurrent_clients_over_four_adapters(tiny, server):
    """16 clients at once, four per adapter, different prompts and lengths: every answer is the
    engine's offline answer for that adapter (the rows share batches, and none disturbs another)."""
    cases = [(NAMES[i % 4], text_prompt(i), 6 + i % 7) for i in range(16)]
    api = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    async def ask(model, prompt, tokens):
        out = await api.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                           extra_body={"ignore_eos": True})
        return out.choices[0].text, out.usage.completion_tokens

    async def everyone():
        try:
            return await asyncio.gather(*(ask(*case) for case in cases))
        finally:
            await api.close()

    answers = asyncio.run(everyone())
    for (model, prompt, tokens), (text, count) in zip(cases, answers, strict=True):
        want = offline(tiny, prompt=prompt, adapter=model, max_new_tokens=tokens, ignore_eos=True)
        assert (text, count) == (want.text, tokens), f"{model} {prompt!r}"
    assert len({text for text, _ in answers}) > 8, "different adapters and prompts must answer differently"


def test_streaming_order_and_format(tiny, server):
    """Chat chunks arrive in order: the assistant role first, the text deltas (together the offline
    text), the finish reason, the usage chunk, then ``data: [DONE]``."""
    messages = [{"role": "user", "content": "Count"}]
    want = offline(tiny, messages=messages, adapter="a3", max_new_tokens=20, ignore_eos=True)
    stream = client(server).chat.completions.create(
        model="a3", messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    deltas = [p.choices[0].delta.content or "" for p in parts if p.choices]
    assert "".join(deltas) == want.text and len([d for d in deltas if d]) > 1
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "length"
    assert not parts[-1].choices and parts[-1].usage.completion_tokens == 20
    with http(server) as raw:
        body = raw.post("/v1/completions", json={"model": "a3", "prompt": "xyz", "max_tokens": 5, "stream": True,
                                                 "temperature": 0}).text
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    want = offline(tiny, prompt="xyz", adapter="a3", max_new_tokens=5)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    assert all(c["object"] == "text_completion" and c["model"] == "a3" for c in chunks)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_error_statuses(server):
    """401 without or with a wrong key; 404 for an unknown model or path; 400 for malformed JSON,
    bad parameters and a prompt beyond the context; the server answers normally afterwards."""
    request = {"model": "a1", "prompt": "hi", "max_tokens": 2}
    assert error_of(httpx.post(f"{server.url}/v1/completions", json=request), 401)["type"] == "authentication_error"
    wrong = httpx.post(f"{server.url}/v1/completions", json=request, headers={"Authorization": "Bearer nope"})
    assert error_of(wrong, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    with http(server) as raw:
        assert error_of(raw.post("/v1/completions", json={**request, "model": "zz"}), 404)["param"] == "model"
        with pytest.raises(openai.NotFoundError):
            client(server).chat.completions.create(model="zz", messages=[{"role": "user", "content": "x"}])
        error_of(raw.get("/v1/nothing-here"), 404)
        error_of(raw.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
        error_of(raw.post("/v1/completions", json=[1, 2]), 400)
        for bad, param in [({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"),
                           ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"),
                           ({"stop": [""]}, "stop"), ({"prompt": ["a", "b"]}, "prompt"), ({"seed": -3}, "seed"),
                           ({"logprobs": 2}, "logprobs"), ({"stream": "yes"}, "stream")]:
            assert error_of(raw.post("/v1/completions", json={**request, **bad}), 400)["param"] == param, bad
        long = error_of(raw.post("/v1/completions", json={**request, "prompt": "x" * 300}), 400)
        assert long["code"] == "context_length_exceeded" and "context" in long["message"]
        streamed = raw.post("/v1/completions", json={**request, "prompt": "x" * 300, "stream": True})
        assert error_of(streamed, 400)["code"] == "context_length_exceeded"
        error_of(raw.post("/v1/chat/completions", json={"model": "a1", "messages": []}), 400)
        error_of(raw.post("/v1/chat/completions", json={"model": "a1", "messages": [{"content": 3}]}), 400)
        assert raw.post("/v1/completions", json=request).status_code == 200
        metrics = raw.get("/metrics").text
    assert 'prolora_requests_total{model="a1",status="400"}' in metrics
    assert 'prolora_requests_total{model="zz",status="404"}' not in metrics  # unknown names are not counted


def metric(server, name: str) -> float:
    with http(server) as raw:
        for line in raw.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_adapters_load_and_unload_while_serving(tiny, server):
    """While a stream on a1 runs: unloading a1 is refused (409), a5 loads and answers like the engine
    offline; once the stream is done a1 unloads (then 404) and loads again."""
    with http(server) as raw:
        body = {"model": "a1", "prompt": "long", "max_tokens": 120, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with raw.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            assert error_of(raw.delete("/v1/adapters/a1"), 409)["code"] == "model_in_use"
            assert raw.post("/v1/adapters", json={"name": "a5", "path": str(tiny["adapters"]["a5"])}).status_code == 201
            error_of(raw.post("/v1/adapters", json={"name": "a5", "path": str(tiny["adapters"]["a5"])}), 409)
            error_of(raw.post("/v1/adapters", json={"name": "a6", "path": str(tiny["root"] / "missing")}), 400)
            error_of(raw.post("/v1/adapters", json={"name": "a6"}), 400)
            got = raw.post("/v1/completions", json={"model": "a5", "prompt": "new", "max_tokens": 8,
                                                    "temperature": 0}).json()
            assert got["choices"][0]["text"] == offline(tiny, prompt="new", adapter="a5", max_new_tokens=8).text
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        streamed = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest[:-1]])
        assert streamed == offline(tiny, prompt="long", adapter="a1", max_new_tokens=120, ignore_eos=True).text
        wait_for(lambda: metric(server, "prolora_batch_size") == 0)
        assert raw.delete("/v1/adapters/a1").json()["deleted"] is True
        assert [m["id"] for m in raw.get("/v1/models").json()["data"]] == [BASE, "a2", "a3", "a4", "a5"]
        error_of(raw.post("/v1/completions", json={"model": "a1", "prompt": "x"}), 404)
        error_of(raw.delete("/v1/adapters/a1"), 404)
        error_of(raw.delete(f"/v1/adapters/{BASE}"), 404)
        assert raw.delete("/v1/adapters/a5").status_code == 200
        assert raw.post("/v1/adapters", json={"name": "a1", "path": str(tiny["adapters"]["a1"])}).status_code == 201
        got = raw.post("/v1/completions", json={"model": "a1", "prompt": "back", "max_tokens": 6, "temperature": 0})
        assert got.json()["choices"][0]["text"] == offline(tiny, prompt="back", adapter="a1", max_new_tokens=6).text
        assert metric(server, "prolora_adapters_loaded") == 4


def test_client_leaving_mid_stream_frees_its_row(tiny, server):
    """A client that closes its stream after a few chunks: its row is freed (the batch empties long
    before its 200 tokens would be done), and others are served meanwhile and after."""
    with http(server) as raw:
        body = {"model": "a2", "prompt": "go", "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with raw.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            for _ in range(3):
                next(lines)
            assert metric(server, "prolora_batch_size") == 1
        wait_for(lambda: metric(server, "prolora_batch_size") == 0 and metric(server, "prolora_queue_length") == 0)
        got = raw.post("/v1/completions", json={"model": "a2", "prompt": "go", "max_tokens": 5, "temperature": 0})
        assert got.json()["choices"][0]["text"] == offline(tiny, prompt="go", adapter="a2", max_new_tokens=5).text
        left = float(raw.get("/metrics").text.split('prolora_requests_total{model="a2",status="499"} ')[1].split()[0])
    assert left >= 1


def test_full_queue_then_sigterm_during_a_request(servers):
    """One row and no queue: a second request gets 429 with Retry-After. SIGTERM while a stream runs,
    with no time granted to finish (--shutdown-timeout 0): the port stops accepting, the request is
    cancelled and its stream ends cleanly (an error chunk, then [DONE]; no traceback), and the process
    exits 0."""
    proc = servers[1].ready()
    try:
        with httpx.Client(base_url=proc.url, timeout=60) as raw:
            body = {"model": "a1", "prompt": "hold", "max_tokens": 250, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            with raw.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                busy = raw.post("/v1/completions", json={"model": "a1", "prompt": "x", "max_tokens": 2})
                assert error_of(busy, 429)["type"] == "rate_limit_error" and busy.headers["Retry-After"] == "1"
                proc.proc.send_signal(signal.SIGTERM)
                started = time.monotonic()
                rest = []
                for line in lines:
                    if line:
                        rest.append(line)
                    assert time.monotonic() - started < 30
        assert rest[-1] == "data: [DONE]"
        ends = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert ends[-1]["error"]["code"] == "shutting_down", "cancelled at the bound, told so"
        assert proc.proc.wait(timeout=30) == 0, proc.log_text()
        assert time.monotonic() - started < 30
        assert "Traceback" not in proc.log_text(), proc.log_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{proc.url}/health", timeout=2)
    finally:
        proc.stop()
