"""`prolora-export serve` as a real server process on 127.0.0.1: the `openai` client and raw HTTP
against the engine's offline output for the same requests (greedy and seeded, every sampling field),
concurrent clients over several adapters, streaming order, every error status, adapters loaded and
unloaded while serving, a client leaving mid-stream, a full queue, SIGTERM during a request, the
bounds on bodies and connections, start-up refusals. The app also runs in this process under
uvicorn on a thread, over an engine whose steps wait for the test (a step as long as it likes).

A tiny Llama with a character tokenizer, four adapters of one geometry (fast). Every loop is
bounded and every server process is killed in teardown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from click.testing import CliRunner
from conftest import make_adapter, tiny_llama
from test_engine import HYPER, char_tokenizer

from prolora_export.cli import main
from prolora_export.engine import Engine, EngineRunner, Request
from prolora_export.formats.prolora import save_adapter
from prolora_export.onnx.export import export_onnx
from prolora_export.serve import create_app
from prolora_export.serve.app import Metrics

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.optimum, pytest.mark.timeout(300)]

NAMES = ("a1", "a2", "a3", "a4")
KEY = "test-key"
BASE = "tiny-base"
#: the main server's connection cap and body bound (small, so the tests reach them cheaply)
MAX_CONNECTIONS = 24
MAX_BODY = 65536
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
    started = [ServerProcess(tiny, "--api-key", KEY, "--max-batch", "8", "--max-queue", "32",
                             "--max-connections", str(MAX_CONNECTIONS), "--max-body-bytes", str(MAX_BODY)),
               ServerProcess(tiny, "--max-batch", "1", "--max-queue", "0", "--shutdown-timeout", "0",
                             "--timeout-keep-alive", "1", "--body-timeout", "1", "--max-adapters", "1",
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
    for header in ("Bearer", f"Basic {KEY}", f"Bearer {KEY}x"):
        error_of(httpx.post(f"{server.url}/v1/completions", json=request, headers={"Authorization": header}), 401)
    with http(server) as raw:
        assert error_of(raw.post("/v1/completions", json={**request, "model": "zz"}), 404)["param"] == "model"
        with pytest.raises(openai.NotFoundError):
            client(server).chat.completions.create(model="zz", messages=[{"role": "user", "content": "x"}])
        error_of(raw.get("/v1/nothing-here"), 404)
        error_of(raw.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
        error_of(raw.post("/v1/completions", json=[1, 2]), 400)
        for bad, param in [({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"),
                           ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"),
                           ({"stop": [""]}, "stop"), ({"stop": "x" * 4097}, "stop"), ({"prompt": ["a", "b"]}, "prompt"),
                           ({"seed": -3}, "seed"), ({"seed": 2**64}, "seed"),
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
        assert 'model="a5"' in raw.get("/metrics").text
        assert raw.delete("/v1/adapters/a5").status_code == 200
        assert 'model="a5"' not in raw.get("/metrics").text, "an unloaded name leaves the metrics"
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


JSON = {"Content-Type": "application/json"}


def test_bodies_are_bounded(server):
    """A body nested ~1000 deep (a RecursionError: plain-text 500), or deeper than the bound, is a
    JSON 400; a body over --max-body-bytes is 413, by its Content-Length or as it arrives (chunked);
    the server answers normally afterwards and logged no traceback."""
    with http(server) as raw:
        for depth in (1000, 5000, 40):
            deep = '{"model": "a1", "prompt": ' + "[" * depth + "]" * depth + "}"
            refused = error_of(raw.post("/v1/completions", content=deep.encode(), headers=JSON), 400)
            assert "nested" in refused["message"]
        big = json.dumps({"model": "a1", "prompt": "x" * MAX_BODY, "max_tokens": 2}).encode()
        assert error_of(raw.post("/v1/completions", content=big, headers=JSON), 413)["code"] == "request_too_large"
        error_of(raw.post("/v1/completions", content=iter([big[:1000], big[1000:]]), headers=JSON), 413)
        assert raw.post("/v1/completions", json={"model": "a1", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert "Traceback" not in server.log_text()


def test_sampling_fields_are_applied(tiny, server):
    """top_k, min_p, the three penalties, stop_token_ids and min_tokens: each answer is the engine's
    offline answer with the same field, and differs from the answer without it (the field was
    applied, not ignored); response_format text is the plain answer."""
    api = client(server)
    greedy = {"temperature": 0, "ignore_eos": True}
    sampled = {"temperature": 1.5, "seed": 3, "ignore_eos": True}
    first = offline(tiny, prompt="Hello, w", adapter="a2", max_new_tokens=24, ignore_eos=True).token_ids[0]
    cases = [({"repetition_penalty": 1.8}, greedy), ({"frequency_penalty": 1.5}, greedy),
             ({"presence_penalty": 2.0}, greedy), ({"top_k": 2}, sampled), ({"min_p": 0.6}, sampled),
             ({"stop_token_ids": [first]}, greedy), ({"stop_token_ids": [first], "min_tokens": 3}, greedy)]
    for fields, without in cases:
        if "min_tokens" in fields:  # against the same stop token without min_tokens
            without = {**without, "stop_token_ids": fields["stop_token_ids"]}
        out = api.completions.create(model="a2", prompt="Hello, w", max_tokens=24, extra_body={**without, **fields})
        plain = api.completions.create(model="a2", prompt="Hello, w", max_tokens=24, extra_body=without)
        want = offline(tiny, prompt="Hello, w", adapter="a2", max_new_tokens=24, **{**without, **fields})
        assert out.choices[0].text == want.text, fields
        assert out.choices[0].text != plain.choices[0].text, f"{fields} changed nothing"
    messages = [{"role": "user", "content": "Say hi"}]
    chat = api.chat.completions.create(model="a2", messages=messages, max_tokens=8, temperature=0,
                                       response_format={"type": "text"})
    assert chat.choices[0].message.content == offline(tiny, messages=messages, adapter="a2", max_new_tokens=8).text


def test_unsupported_fields_are_refused_and_neutral_values_accepted(server):
    """Every field the server would ignore is a 400 naming it (response_format other than text,
    tools, tool_choice, function_call, logprobs, unknown fields, message fields); a neutral value
    (logprobs false, top_logprobs 0, echo false, tool_choice none, top_k -1…) is accepted."""
    completion = ("/v1/completions", {"model": "a1", "prompt": "hi", "max_tokens": 2, "temperature": 0})
    chat = ("/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 2, "temperature": 0})
    refused = [(chat, {"response_format": {"type": "json_object"}}, "response_format"),
               (chat, {"tool_choice": "auto"}, "tool_choice"), (chat, {"function_call": "auto"}, "function_call"),
               (chat, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
               (chat, {"logprobs": True}, "logprobs"), (chat, {"top_logprobs": 2}, "top_logprobs"),
               (chat, {"made_up": 1}, "made_up"), (chat, {"parallel_tool_calls": False}, "parallel_tool_calls"),
               (chat, {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages"),
               (completion, {"response_format": {"type": "text"}}, "response_format"),
               (completion, {"logprobs": 0}, "logprobs"), (completion, {"best_of": 2}, "best_of"),
               (completion, {"echo": True}, "echo"), (completion, {"min_tokens": 3}, "min_tokens"),
               (completion, {"top_k": -2}, "top_k"), (completion, {"min_p": 2}, "min_p"),
               (completion, {"repetition_penalty": 0}, "repetition_penalty"),
               (completion, {"presence_penalty": 3}, "presence_penalty"),
               (completion, {"stop_token_ids": [-1]}, "stop_token_ids")]
    accepted = [(chat, {"logprobs": False, "top_logprobs": 0, "tool_choice": "none", "tools": [], "logit_bias": {},
                        "response_format": {"type": "text"}, "user": "u", "top_k": -1, "min_tokens": 1,
                        "messages": [{"role": "user", "content": "hi", "name": None}]}),
                (completion, {"logprobs": False, "echo": False, "best_of": 1, "suffix": "", "logit_bias": {},
                              "top_k": 0, "min_p": 0, "repetition_penalty": 1, "frequency_penalty": 0,
                              "presence_penalty": 0, "stop_token_ids": [], "min_tokens": 0, "seed": None})]
    with http(server) as raw:
        for (path, body), fields, param in refused:
            assert error_of(raw.post(path, json={**body, **fields}), 400)["param"] == param, fields
        for (path, body), fields in accepted:
            assert raw.post(path, json={**body, **fields}).status_code == 200, fields


def test_models_retrieve(server):
    """GET /v1/models/{id}: the openai client's models.retrieve."""
    api = client(server)
    assert api.models.retrieve("a2").id == "a2" and api.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("zz")


def test_adapter_names_and_files_are_checked(tiny, server, tmp_path):
    """Names outside [A-Za-z0-9._:-]{1,64} are refused (quotes and newlines went unescaped into
    /metrics, and a name with a newline could never be deleted). An adapter whose config is a FIFO
    is refused at once (its read used to hold the engine's lock: all generation stopped)."""
    path = str(tiny["adapters"]["a5"])
    with http(server) as raw:
        for name in ['x"} 1\nfake_metric{a="', "a b", "a/b", "", "n" * 65, 5, None]:
            assert error_of(raw.post("/v1/adapters", json={"name": name, "path": path}), 400)["param"] == "name"
        fifo = tmp_path / "fifo-adapter"
        fifo.mkdir()
        shutil.copy(tiny["adapters"]["a5"] / "adapter_model.safetensors", fifo)
        os.mkfifo(fifo / "adapter_config.json")
        refused = error_of(raw.post("/v1/adapters", json={"name": "fifo", "path": str(fifo)}), 400)
        assert "not a regular file" in refused["message"]
        got = raw.post("/v1/completions", json={"model": "a2", "prompt": "go", "max_tokens": 3, "temperature": 0})
        assert got.status_code == 200
        assert "fake_metric" not in raw.get("/metrics").text
        assert {m["id"] for m in raw.get("/v1/models").json()["data"]} == {BASE, *NAMES}


def test_metric_labels_are_escaped():
    metrics = Metrics()
    metrics.requests[('x"} 1\nfake_metric{a="b', 200)] += 1
    text = metrics.render(running=0, waiting=0, adapters=['a\\"\n'])
    assert not [line for line in text.splitlines() if line.startswith("fake_metric")]
    assert 'model="x\\"} 1\\nfake_metric{a=\\"b"' in text and 'adapter="a\\\\\\"\\n"' in text


def test_the_token_rate_window_stays_bounded_without_scrapes(monkeypatch):
    """Entries older than the rate window go as tokens arrive, not only when /metrics is read."""
    import prolora_export.serve.app as app

    now = [1000.0]
    monkeypatch.setattr(app.time, "monotonic", lambda: now[0])
    metrics = Metrics()
    for _ in range(10_000):
        metrics.tokens(1)
        now[0] += 0.01
    assert len(metrics.recent) <= app.RATE_WINDOW / 0.01 + 1 and metrics.generated_tokens == 10_000
    assert metrics.tokens_per_second() == pytest.approx(100, rel=0.02)


def raw_request(port: int, head: bytes, timeout: float = 30.0) -> bytes:
    """Send ``head`` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        reply = b""
        while part := sock.recv(4096):
            reply += part
    return reply


def test_connections_are_capped(server):
    """--max-connections: once that many connections are open (each stuck sending its body, plus
    whatever idle ones other tests left), a new request gets uvicorn's 503; once they close,
    requests are served again."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    held = []
    try:
        statuses = []
        while len(held) < MAX_CONNECTIONS and 503 not in statuses:
            held.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
            held[-1].sendall(head)
            statuses.append(httpx.get(f"{server.url}/health", timeout=30).status_code)
        assert statuses[-1] == 503 and set(statuses[:-1]) <= {200}, statuses
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: httpx.get(f"{server.url}/health", timeout=30).status_code == 200)


def test_slow_clients_are_cut_off(servers):
    """--timeout-keep-alive bounds the time to send the headers (the server closes the connection),
    --body-timeout the time to send the body (408)."""
    proc = servers[1].ready()
    assert raw_request(proc.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n") == b""
    reply = raw_request(proc.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                   b"\r\nContent-Length: 50\r\n\r\n{\"model\"")
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply


def test_adapters_beyond_the_bound_are_refused(tiny, servers):
    """--max-adapters 1 with a1 loaded: loading another is refused (409), naming the bound; a1 still serves."""
    proc = servers[1].ready()
    with httpx.Client(base_url=proc.url, timeout=60) as raw:
        refused = error_of(raw.post("/v1/adapters", json={"name": "a5", "path": str(tiny["adapters"]["a5"])}), 409)
        assert refused["code"] == "too_many_adapters" and "--max-adapters 1" in refused["message"]
        assert [m["id"] for m in raw.get("/v1/models").json()["data"]] == [BASE, "a1"]


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


def test_start_up_refusals(tmp_path):
    """Refused in one line, exit 2, before the model loads (ONNX_DIR is a folder with no model here,
    which loading would refuse with another message): an empty API key from --api-key or
    $PROLORA_API_KEY, a key no header can carry, an adapter name outside the rule, a port in use."""
    def refused(*args: str, env: dict | None = None) -> str:
        result = CliRunner().invoke(main, ["serve", str(tmp_path), *args], env=env)
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        return result.output

    assert "empty" in refused("--api-key", "")
    assert "empty" in refused(env={"PROLORA_API_KEY": ""})
    assert "ASCII" in refused("--api-key", "clé")
    assert "ASCII" in refused("--api-key", " key")
    assert "name" in refused("--adapter", "a b=/x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"cannot serve on 127.0.0.1:{port}" in refused("--port", str(port))


# ---------------------------------------------------------------------- the app in this process


@contextlib.contextmanager
def in_process(tiny, **app_options):
    """The app over a fresh engine (adapter a1), served by uvicorn on a thread of this process.
    Every engine step first waits for ``gate`` (set: free-running; cleared: a step that runs as long
    as the test wants, like a long prefill)."""
    import uvicorn

    gate = threading.Event()
    gate.set()
    engine = Engine(tiny["slots"], {"a1": tiny["adapters"]["a1"]}, threads=1)
    real_step = engine.step

    def step():
        assert gate.wait(120), "the test never opened the gate"
        return real_step()

    engine.step = step
    port = free_port()
    loops = []
    with EngineRunner(engine) as runner:
        app = create_app(runner, base_name=BASE, **app_options)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on",
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)

        async def run():
            loops.append(asyncio.get_running_loop())
            await server.serve()

        thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
        thread.start()
        wait_for(lambda: server.started)
        try:
            yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, engine=engine, gate=gate, uvicorn=server,
                                  server=app.state.server, loop=loops[0])
        finally:
            gate.set()
            server.should_exit = True
            thread.join(60)


def post_head(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data)) + data


def test_a_client_that_gives_up_is_cancelled_cleanly(tiny, caplog):
    """A non-streamed client that leaves (times out) while its request waits: the request is
    cancelled, nothing is logged as an error (it was an InvalidStateError in the race between the
    answer and the disconnect: a 500 and an ASGI traceback)."""
    with caplog.at_level(logging.WARNING), in_process(tiny) as app:
        app.gate.clear()
        with socket.create_connection(("127.0.0.1", app.port), timeout=30) as sock:
            sock.sendall(post_head({"model": "a1", "prompt": "wait", "max_tokens": 4}))
            wait_for(lambda: app.engine.pending == 1)
        wait_for(lambda: app.server.in_flight == 0 and not app.uvicorn.server_state.tasks)
        app.gate.set()
        wait_for(lambda: app.engine.pending == 0)
        assert app.server.metrics.requests[("a1", 499)] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_prompts_are_tokenized_off_the_engine_thread(tiny):
    """Text prompts and chat messages are tokenized (the template rendered) on worker threads and
    the engine gets token ids (on its thread a 20 MB prompt froze every stream for 24 s); the
    answers, stop strings included, are the engine's."""
    with in_process(tiny) as app:
        tokenizer, threads = app.engine.tokenizer, []

        class Recording:
            def __getattr__(self, name):
                return getattr(tokenizer, name)

            def __call__(self, *args, **kwargs):
                threads.append(threading.current_thread().name)
                return tokenizer(*args, **kwargs)

            def apply_chat_template(self, *args, **kwargs):
                threads.append(threading.current_thread().name)
                return tokenizer.apply_chat_template(*args, **kwargs)

        app.engine.tokenizer = Recording()
        messages = [{"role": "user", "content": "Say hi"}]
        with httpx.Client(base_url=app.url, timeout=60) as raw:
            text = raw.post("/v1/completions", json={"model": "a1", "prompt": "Hello, w", "max_tokens": 12,
                                                     "temperature": 0, "stop": ["o"]}).json()["choices"][0]["text"]
            chat = raw.post("/v1/chat/completions", json={"model": "a1", "messages": messages, "max_tokens": 6,
                                                          "temperature": 0}).json()["choices"][0]["message"]
    assert len(threads) == 2 and "prolora-engine" not in threads, threads
    assert text == offline(tiny, prompt="Hello, w", adapter="a1", max_new_tokens=12, stop=["o"]).text
    assert chat["content"] == offline(tiny, messages=messages, adapter="a1", max_new_tokens=6).text


def test_a_hung_adapter_read_stops_nothing(tiny):
    """POST /v1/adapters whose files never arrive (hung storage; here a read that waits for the
    test): the load gives up at its bound (504) and nothing is loaded, even once the read ends;
    the engine serves meanwhile (the files are read outside its lock); a second load while the
    first still reads is 409."""
    release = threading.Event()
    with in_process(tiny, adapter_timeout=0.5) as app, httpx.Client(base_url=app.url, timeout=60) as raw:
        read = app.engine.slots.read

        def hung(name, source):
            assert release.wait(120)
            return read(name, source)

        app.engine.slots.read = hung
        load = {"name": "a5", "path": str(tiny["adapters"]["a5"])}
        assert error_of(raw.post("/v1/adapters", json=load), 504)["code"] == "adapter_timeout"
        got = raw.post("/v1/completions", json={"model": "a1", "prompt": "go", "max_tokens": 3, "temperature": 0})
        assert got.json()["choices"][0]["text"] == offline(tiny, prompt="go", adapter="a1", max_new_tokens=3).text
        assert error_of(raw.post("/v1/adapters", json={**load, "name": "a6"}), 409)["code"] == "load_in_progress"
        release.set()
        wait_for(lambda: app.server.reading.done())
        assert [m["id"] for m in raw.get("/v1/models").json()["data"]] == [BASE, "a1"]
        app.engine.slots.read = read
        assert raw.post("/v1/adapters", json=load).status_code == 201


def test_shutdown_answers_at_its_bound_whatever_the_engine_does(tiny):
    """Shutdown while a step runs long (a long prefill; here a step that waits for the test): at the
    shutdown bound the waiting clients, streamed or not, get the documented JSON 503 shutting_down
    while the step still runs (it was uvicorn's plain-text 500, long after the bound)."""
    with in_process(tiny) as app:
        app.gate.clear()
        answers = {}

        def ask(stream: bool) -> None:
            with httpx.Client(timeout=60) as raw:
                answers[stream] = raw.post(f"{app.url}/v1/completions",
                                           json={"model": "a1", "prompt": "x", "max_tokens": 4, "stream": stream})

        clients = [threading.Thread(target=ask, args=(stream,)) for stream in (False, True)]
        for thread in clients:
            thread.start()
        wait_for(lambda: app.engine.pending == 2)
        app.loop.call_soon_threadsafe(app.server.close, 0.2)  # what serve's uvicorn server does on SIGTERM
        app.uvicorn.should_exit = True
        for thread in clients:
            thread.join(60)
        assert not app.gate.is_set(), "answered while the step was still running"
        app.gate.set()
    for stream in (False, True):
        assert error_of(answers[stream], 503)["code"] == "shutting_down"


def test_shutdown_ends_a_stream_mid_way_at_its_bound(tiny):
    """A stream that has tokens and waits on a long step: at the shutdown bound it gets the shutting_down
    error chunk and [DONE] while the step still runs (its tokens wait on the stream alone, which the bound
    interrupts; nothing races each token against the shutdown)."""
    with in_process(tiny) as app:
        lines: list[str] = []
        with httpx.Client(timeout=60) as raw, raw.stream(
                "POST", f"{app.url}/v1/completions",
                json={"model": "a1", "prompt": "x", "max_tokens": 50, "ignore_eos": True, "stream": True}) as got:
            for line in filter(None, got.iter_lines()):
                lines.append(line)
                if len(lines) == 2:  # a token or two streamed: the next step now blocks
                    app.gate.clear()
                    app.loop.call_soon_threadsafe(app.server.close, 0.2)
        assert not app.gate.is_set(), "answered while the step was still running"
        app.gate.set()
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert data[-1]["error"]["code"] == "shutting_down"
    assert lines[-1] == "data: [DONE]"
    assert 1 <= len(data) - 1 < 50
