"""The engine and the server on the KV pool for every architecture of the model-builder route (issue 30):
a tiny random model of each (the factories of tests/test_graph_builder.py and
tests/test_graph_architectures.py), three PRoLoRA adapters in the slots of one export, and every row of a
mixed batch (the base and each adapter, right-padded prompts of different lengths, rows joining at
different steps) equal to PyTorch on that row alone with its adapter: its greedy tokens and the logits
each was chosen from. Chunked prefill (no running row waits longer than one chunk, no run takes more than
a chunk) and a prefix-cache hit (equal to a cold run) on each too. The demo model end to end is slow.

The builder needs onnxruntime-genai and transformers ≥ 5 (the main environment): skipped elsewhere.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from builder_helpers import HYPER, builder_usable, needs_builder
from conftest import LLAMA_TARGETS, make_adapter
from test_engine import recording
from test_engine_builder import SYSTEM, ask, assert_rows_exact, engine, prompt, relative, run_all
from test_graph_architectures import PHI3_TARGETS, tiny_model
from test_graph_builder import FAMILIES, tiny_decoder

from prolora_export.engine import EngineRunner, Request
from prolora_export.formats.prolora import save_adapter
from prolora_export.onnx.graph.builder import ARCHITECTURES

pytestmark = [needs_builder, pytest.mark.usefixtures("one_torch_thread")]
ADAPTERS = ("a1", "a2", "a3")


def tiny(architecture: str, seed: int = 0) -> torch.nn.Module:
    """The tiny random model of an architecture, from the graph tests' factories."""
    family = architecture.removesuffix("ForCausalLM").lower()
    return tiny_decoder(family, seed) if family in FAMILIES else tiny_model(architecture, seed)


def word_tokenizer(vocab_size: int):
    """One word per token id (``<unk> <s> </s> w3 w4 …``): the server's texts are the tokens themselves."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def built(request, tmp_path_factory) -> dict:
    """A tiny model of one architecture, three adapters and their PyTorch models, and one slot export."""
    if not builder_usable():
        pytest.skip("needs onnxruntime-genai and transformers >= 5")
    from prolora_export.onnx.graph.splice import build_compact

    architecture = request.param
    root = tmp_path_factory.mktemp(f"engine-{architecture.removesuffix('ForCausalLM').lower()}")
    base = tiny(architecture)
    base.save_pretrained(root / "hf")
    word_tokenizer(base.config.vocab_size).save_pretrained(root / "hf")
    targets = PHI3_TARGETS if architecture == "Phi3ForCausalLM" else LLAMA_TARGETS
    models = {None: base}
    for seed, name in enumerate(ADAPTERS, start=1):
        models[name] = tiny(architecture)
        save_adapter(root / name, make_adapter(models[name], seed=seed, **HYPER, target_modules=targets))
    slots = build_compact(root / "hf", root / "a1", root / "slots", slots=True).folder
    return {"root": root, "slots": slots, "models": models, "adapters": {n: root / n for n in ADAPTERS}}


def test_every_architecture_of_the_builder_route_is_served():
    """An architecture added to the route gets its tiny model here (the fixture runs each of them)."""
    assert {type(tiny(a)).__name__ for a in ARCHITECTURES} == set(ARCHITECTURES)


def test_a_mixed_batch_on_the_pool_is_exact_per_row(built):
    """Three rows (the base, a1, a2; prompts of 9 and 10, right-padded) prefilled in one run, then four
    more (a3, a1, the base, a2) submitted a step apart, joining and leaving the running rows, at most
    four at once: each equals PyTorch alone with its adapter. All in the pool, which is the memory
    stated at start (layers × K and V × rows × row length × KV heads × head size) and never moves."""
    eng = engine(built, max_batch=4, max_cached_tokens=4 * 48)
    pool = eng.pool
    assert pool is not None and eng.right_padded, "the builder's graph runs on the KV pool"
    config = built["models"][None].config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert pool.nbytes == config.num_hidden_layers * 2 * 4 * 48 * config.num_key_value_heads * head_dim * 4
    arrays = {name: array.__array_interface__["data"][0] for name, array in pool.arrays.items()}
    spec = [(9, None, 6), (10, "a1", 7), (10, "a2", 5), (4, "a3", 8), (15, "a1", 4), (6, None, 5), (12, "a2", 6)]
    requests = [Request(prompt_ids=prompt(n, i), adapter=a, max_new_tokens=m, ignore_eos=True, return_logits=True)
                for i, (n, a, m) in enumerate(spec)]
    for request in requests[:3]:
        eng.submit(request)
    assert not [e for e in eng.step() if e.finished]
    assert eng.stats.prefill_runs == 1 and pool.occupied == 3 and len(eng._running) == 3
    assert eng.stats.logit_positions == 3 * 2, "columns 8, 9, 9 read: the LM head ran on columns 8 and 9"
    results, widest = run_all(eng, requests[3:], submit_every_step=True)
    assert widest == 4 and eng.stats.prefills == 5, "rows joined a running batch one by one"
    assert eng.stats.cache_moved == 0 and pool.occupied == 0
    assert {n: a.__array_interface__["data"][0] for n, a in pool.arrays.items()} == arrays, "allocated once"
    assert_rows_exact(built, requests, results)


def test_chunked_prefill_holds_no_running_row_longer_than_a_chunk(built, monkeypatch):
    """A 22-token prompt prefilled 4 tokens per run in the pool while another row decodes: that row gets
    a token in every step (the long prompt's first comes in the 6th), no run takes more than 4 new tokens
    (the prefill's activations are bounded by the chunk), and both rows are exact."""
    eng = engine(built, max_batch=2, max_prefill_tokens=4)
    runs = recording(eng, monkeypatch)
    running = Request(prompt_ids=prompt(3, 1), adapter="a1", max_new_tokens=12, ignore_eos=True, return_logits=True)
    long = Request(prompt_ids=prompt(22, 2), adapter="a2", max_new_tokens=4, ignore_eos=True, return_logits=True)
    eng.submit(running)
    eng.step()
    eng.submit(long)
    results, tokens_per_step, first = {}, [], False
    while not first:
        events = eng.step()
        tokens_per_step.append(sum(e.request_id == running.request_id and e.token_id is not None for e in events))
        first = any(e.request_id == long.request_id for e in events)
        results.update({e.request_id: e.result for e in events if e.finished})
    assert tokens_per_step == [1] * 6, "22 tokens in chunks of 4, the running row served in every step"
    results.update(run_all(eng, [])[0])
    assert eng.stats.prefill_runs == 1 + 6 and eng.pool.occupied == 0
    assert max(rows * width for rows, width in runs) <= 4
    assert_rows_exact(built, [running, long], results)


def test_a_prefill_runs_the_lm_head_on_the_positions_it_reads_only(built):
    """A 22-token prompt in chunks of 4: the LM head runs on one position per chunk (6) and one per decoded
    token (2), not on the 22 prompt positions; the logits are PyTorch's."""
    eng = engine(built, max_batch=1, max_prefill_tokens=4)
    long = Request(prompt_ids=prompt(22, 2), adapter="a2", max_new_tokens=3, ignore_eos=True, return_logits=True)
    results, _ = run_all(eng, [long])
    assert eng.stats.prefill_runs == 6 and eng.stats.logit_positions == 6 + 2
    assert_rows_exact(built, [long], results)


def test_a_prefix_cache_hit_equals_a_cold_run(built):
    """A 40-token prefix cached for a1 (blocks of 8, prefilled in chunks of 8) is reused by the next a1
    prompt, whose logits equal a cold engine's and PyTorch's; the same prefix for a2 or the base misses."""
    eng = engine(built, prefix_block=8, prefix_cache_tokens=256, max_prefill_tokens=8)
    requests = [ask("a1", [10, 11, 12]), ask("a1", [20, 21]), ask("a2", [20, 21]), ask(None, [20, 21])]
    results: dict = {}
    for request in requests:
        results.update(run_all(eng, [request])[0])
    assert eng.prefix.hits == 1 and eng.prefix.tokens_reused == len(SYSTEM)
    assert_rows_exact(built, requests, results)
    cold = engine(built, prefix_cache_tokens=0, max_prefill_tokens=8)
    (want,) = cold.generate([ask("a1", [20, 21])])
    assert relative(results[requests[1].request_id].logits, want.logits) <= 1e-5


def test_the_server_answers_from_the_pool(built):
    """The app `prolora-export serve` runs, in this process: concurrent greedy completions over the base
    and every adapter answer the tokens the engine gives offline (one word per token); the metrics show
    the pool, empty again, and its bytes."""
    import httpx

    from prolora_export.serve import create_app

    jobs = [(model, prompt(4 + 3 * i, i)) for i, model in enumerate(["base", *ADAPTERS, "base", "a2"])]

    async def ask_all(app) -> tuple[list, str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine") as client:
            replies = await asyncio.gather(*(client.post("/v1/completions", json={
                "model": model, "prompt": ids, "max_tokens": 5, "temperature": 0}) for model, ids in jobs))
            for _ in range(600):  # a reply may come before the step that sent it has freed its row
                if not served.pending and not served.pool.occupied:
                    break
                await asyncio.sleep(0.05)
            return replies, (await client.get("/metrics")).text

    served = engine(built, tokenizer="auto", max_batch=4)
    with EngineRunner(served) as runner:
        replies, text = asyncio.run(ask_all(create_app(runner, base_name="base")))
    metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.startswith(("prolora_kv_pool", "prolora_prefill"))}
    assert metrics["prolora_kv_pool_rows_used"] == 0 and metrics["prolora_kv_pool_bytes"] == served.pool.nbytes
    assert metrics["prolora_prefill_chunks_total"] >= 1
    offline = engine(built, tokenizer="auto").generate(
        [Request(prompt_ids=ids, adapter=None if model == "base" else model, max_new_tokens=5) for model, ids in jobs])
    for (model, _), reply, want in zip(jobs, replies, offline, strict=True):
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want.text, model


@pytest.mark.slow
@pytest.mark.demo
def test_the_demo_model_on_the_pool_generates_like_pytorch(demo_model, tmp_path):
    """SmolLM2-135M's slot export with two adapters: chat prompts of different lengths for the base and
    each adapter, joining a step apart; each row's greedy tokens and logits equal PyTorch's on that row
    alone with its adapter, on the KV pool."""
    from transformers import AutoTokenizer

    from prolora_export.models import load_base_model
    from prolora_export.onnx.graph.splice import build_compact

    models = {None: load_base_model(str(demo_model)).eval()}
    for seed, name in enumerate(("x", "y"), start=1):
        models[name] = load_base_model(str(demo_model)).eval()
        adapter = make_adapter(models[name], seed=seed, **HYPER, target_modules=LLAMA_TARGETS)
        save_adapter(tmp_path / name, adapter)
    slots = build_compact(demo_model, tmp_path / "x", tmp_path / "slots", slots=True).folder
    built = {"slots": slots, "models": models, "adapters": {n: tmp_path / n for n in ("x", "y")}}
    eng = engine(built, max_batch=4, max_cached_tokens=4 * 128)
    assert eng.pool is not None and eng.right_padded
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model))
    questions = ["Name a colour.", "What is the capital of France? Answer in one word.", "Count to three.",
                 "Say hello to a friend who likes long walks by the sea."]
    requests = [Request(prompt_ids=tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                                 add_generation_prompt=True, return_dict=False),
                        adapter=a, max_new_tokens=8, ignore_eos=True, return_logits=True)
                for q, a in zip(questions, [None, "x", "y", "x"], strict=True)]
    results, widest = run_all(eng, requests, submit_every_step=True)
    assert widest >= 3 and eng.stats.prefills == 4 and eng.stats.cache_moved == 0
    assert_rows_exact(built, requests, results)
