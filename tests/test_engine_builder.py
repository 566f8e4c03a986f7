"""The engine on the model builder's slot graph (issue 29 item 4): ``GroupQueryAttention`` takes no
positions and reads each row's length from the mask, so the engine right-pads rows. Every row of a
mixed, continuously batched batch (prompts prefilled together right-padded, rows prefilled apart and
joining, rows leaving, prompts prefilled in chunks) against PyTorch base + that row's adapter on the
whole sequence.

The builder needs onnxruntime-genai and transformers ≥ 5 (the ``.venv-tf5`` run): skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_adapter
from test_data import tiny_tokenizer
from test_graph_builder import HYPER, _builder_usable, needs_builder, tiny_decoder

from prolora_export.engine import Engine, Request
from prolora_export.formats.prolora import save_adapter

pytestmark = [needs_builder, pytest.mark.usefixtures("one_torch_thread")]
NAMES = ("a1", "a2")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """A tiny Llama, two adapters and their PyTorch models, and the builder's slot graph."""
    if not _builder_usable():
        pytest.skip("needs onnxruntime-genai and transformers >= 5")
    from prolora_export.onnx.graph.splice import build_compact

    root = tmp_path_factory.mktemp("engine-builder")
    tiny_decoder("llama").save_pretrained(root / "hf")
    tiny_tokenizer().save_pretrained(root / "hf")  # the builder wants one; the engine is fed token ids
    models = {None: tiny_decoder("llama")}
    for seed, name in enumerate(NAMES, start=1):
        model = tiny_decoder("llama")
        adapter = make_adapter(model, seed=seed, **HYPER)
        save_adapter(root / name, adapter)
        models[name] = model.eval()  # make_adapter injected it
    slots = build_compact(root / "hf", root / "a1", root / "slots", slots=True).folder
    return {"root": root, "slots": slots, "models": models}


def engine(built, **options) -> Engine:
    options.setdefault("tokenizer", None)
    return Engine(built["slots"], {n: built["root"] / n for n in NAMES}, **options)


def torch_logits(built, adapter: str | None, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """PyTorch base (+ the adapter) on the whole sequence, no cache, no padding: the logits each
    generated token was chosen from."""
    ids = [*prompt_ids, *tokens]
    with torch.no_grad():
        logits = built["models"][adapter](torch.tensor([ids])).logits[0].numpy()
    return logits[len(prompt_ids) - 1: len(ids) - 1]


def prompt(n: int, seed: int) -> list[int]:
    return [(7 * seed + 5 * k) % 120 + 3 for k in range(n)]


def assert_rows_exact(built, requests: list[Request], results: dict) -> None:
    for request in requests:
        result = results[request.request_id]
        assert result.error is None and len(result.token_ids) == request.max_new_tokens, request.request_id
        want = torch_logits(built, request.adapter, list(request.prompt_ids), result.token_ids)
        err = float(np.abs(result.logits - want).max() / np.abs(want).max())
        assert err <= 1e-4, f"{request.request_id} ({request.adapter}): logits relative difference {err:.2e}"


def run_all(eng: Engine, requests: list[Request], submit_every_step: bool = False) -> dict:
    """Submit (all at once, or one per step) and step until every request has finished."""
    results: dict = {}
    waiting = list(requests)
    while waiting or eng.pending:
        for request in waiting[:1] if submit_every_step else waiting:
            eng.submit(request)
        waiting = waiting[1:] if submit_every_step else []
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    return results


def test_prompts_prefilled_together_are_right_padded_and_exact(built):
    """Six rows, three adapters (base included), prompt lengths 9…11 prefilled in one right-padded run:
    each row's first token is read at its own last real column, and every row decodes as alone."""
    eng = engine(built, max_batch=8)
    assert eng.right_padded and not eng.has_positions
    requests = [Request(prompt_ids=prompt(9 + i % 3, i), adapter=a, max_new_tokens=6, ignore_eos=True,
                        return_logits=True) for i, a in enumerate([None, "a1", "a2", "a2", "a1", None])]
    results = run_all(eng, requests)
    assert eng.stats.prefill_runs == 1, "the six prompts must share one (right-padded) prefill run"
    assert_rows_exact(built, requests, results)
    firsts = [results[r.request_id].logits[0] for r in requests[:3]]
    assert min(float(np.abs(f - firsts[0]).max()) for f in firsts[1:]) > 1e-3, "adapters must matter"


@pytest.mark.parametrize("chunk", [2048, 4], ids=["whole", "chunked"])
def test_rows_join_and_leave_mid_generation(built, chunk):
    """Rows of very different lengths submitted a step apart (each prefilled alone, then joining the
    right-padded running batch), finishing at different steps, with at most 3 rows at once; prompts
    prefilled whole or 4 tokens per run."""
    eng = engine(built, max_batch=3, max_prefill_tokens=chunk)
    spec = [(17, "a1", 7), (4, None, 3), (9, "a2", 9), (2, "a1", 5), (12, None, 4), (6, "a2", 6)]
    requests = [Request(prompt_ids=prompt(n, i), adapter=a, max_new_tokens=m, ignore_eos=True, return_logits=True)
                for i, (n, a, m) in enumerate(spec)]
    results = run_all(eng, requests, submit_every_step=True)
    assert eng.stats.prefills >= 4 and eng.stats.cache_moved > 0, "rows must have joined and left a running batch"
    if chunk < 17:
        assert eng.stats.prefill_runs > eng.stats.prefills
    assert_rows_exact(built, requests, results)


def test_right_padding_is_chosen_from_the_graph_s_attention(built):
    """Right padding is for the builder's fused attention only (read from the graph's nodes); optimum's
    graphs without positions keep the refusal tested in test_engine.py."""
    from prolora_export.engine.core import _fused_attention

    assert _fused_attention(Path(built["slots"]) / "model.onnx")


def test_server_answers_from_the_builder_graph(built):
    """`prolora-export serve` on the builder's slot graph, a real process on 127.0.0.1: concurrent
    completions over both adapters and the base answer what the engine answers offline."""
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import BASE, ServerProcess

    tiny = {"root": built["root"], "slots": built["slots"], "adapters": {n: built["root"] / n for n in NAMES}}
    server = ServerProcess(tiny, adapters=NAMES).ready()
    try:
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        jobs = [(model, f"{'abcdef'[i]} q{i} " * (1 + i)) for i, model in enumerate([BASE, *NAMES] * 2)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: api.completions.create(
                model=job[0], prompt=job[1], max_tokens=6, temperature=0).choices[0].text, jobs))
    finally:
        server.stop()
    eng = engine(built, tokenizer="auto")
    for (model, text), answer in zip(jobs, answers, strict=True):
        adapter = None if model == BASE else model
        assert answer == eng.generate([Request(prompt=text, adapter=adapter, max_new_tokens=6)])[0].text, model
