"""The engine on the model builder's slot graph (issue 29 item 4): ``GroupQueryAttention`` takes no
positions and reads each row's length from the mask, so the engine right-pads rows. Every row of a
mixed, continuously batched batch (prompts prefilled together right-padded, rows prefilled apart and
joining, rows leaving, prompts prefilled in chunks) against PyTorch base + that row's adapter on the
whole sequence.

The builder needs onnxruntime-genai and transformers ≥ 5 (the main environment): skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from builder_helpers import builder_usable, needs_builder
from conftest import make_adapter
from test_data import tiny_tokenizer
from test_graph_builder import HYPER, tiny_decoder

from prolora_export.engine import Engine, Request, core
from prolora_export.formats.prolora import save_adapter

pytestmark = [needs_builder, pytest.mark.usefixtures("one_torch_thread")]
NAMES = ("a1", "a2")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """A tiny Llama, two adapters and their PyTorch models, and the builder's slot graph."""
    if not builder_usable():
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
    return {"root": root, "slots": slots, "models": models, "adapters": {n: root / n for n in NAMES}}


def engine(built, **options) -> Engine:
    """An engine on ``built``'s slot graph with its adapters loaded (token ids only unless told)."""
    options.setdefault("tokenizer", None)
    return Engine(built["slots"], built["adapters"], **options)


def torch_logits(built, adapter: str | None, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """PyTorch base (+ the adapter) on the whole sequence, no cache, no padding: the logits each
    generated token was chosen from."""
    ids = [*prompt_ids, *tokens]
    with torch.no_grad():
        logits = built["models"][adapter](torch.tensor([ids])).logits[0].numpy()
    return logits[len(prompt_ids) - 1: len(ids) - 1]


def prompt(n: int, seed: int) -> list[int]:
    return [(7 * seed + 5 * k) % 120 + 3 for k in range(n)]


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


#: the most a row's logits may differ from PyTorch's (relative to their largest); any other adapter (or
#: none) on the same tokens must differ by :data:`WRONG` times more, so a lost or swapped adapter fails
EXACT, WRONG = 1e-4, 30


def assert_rows_exact(built, requests: list[Request], results: dict) -> None:
    """Each greedy row against PyTorch on that row alone with its adapter: the logits every token was
    chosen from, and the tokens themselves (each the argmax of PyTorch's logits for the tokens before it:
    PyTorch's own greedy run); the logits are far from every other adapter's on the same tokens."""
    for request in requests:
        result = results[request.request_id]
        label = f"{request.request_id} ({request.adapter})"
        assert result.error is None and len(result.token_ids) == request.max_new_tokens, label
        want = torch_logits(built, request.adapter, list(request.prompt_ids), result.token_ids)
        err = relative(result.logits, want)
        assert err <= EXACT, f"{label}: logits relative difference {err:.2e}"
        assert result.token_ids == want.argmax(axis=-1).tolist(), f"{label}: not PyTorch's greedy tokens"
        for other in set(built["models"]) - {request.adapter}:
            wrong = relative(torch_logits(built, other, list(request.prompt_ids), result.token_ids), want)
            assert wrong > WRONG * EXACT, f"{label}: adapter {other} gives the same logits ({wrong:.2e}): a blind test"


def run_all(eng: Engine, requests: list[Request], submit_every_step: bool = False) -> tuple[dict, int]:
    """Submit (all at once, or one per step) and step until every request has finished; the results and
    the most rows that decoded together."""
    results: dict = {}
    waiting, widest = list(requests), 0
    while waiting or eng.pending:
        for request in waiting[:1] if submit_every_step else waiting:
            eng.submit(request)
        waiting = waiting[1:] if submit_every_step else []
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
        widest = max(widest, len(eng._running))
    return results, widest


POOL = pytest.mark.parametrize("kv_pool", [True, False], ids=["pool", "batch-cache"])


@POOL
def test_prompts_prefilled_together_are_right_padded_and_exact(built, kv_pool):
    """Six rows, three adapters (base included), prompt lengths 9…11 prefilled in one right-padded run:
    each row's first token is read at its own last real column, and every row decodes as alone, on the
    KV pool and on the batch cache."""
    eng = engine(built, max_batch=8, kv_pool=kv_pool)
    assert eng.right_padded and not eng.has_positions and (eng.pool is not None) == kv_pool
    requests = [Request(prompt_ids=prompt(9 + i % 3, i), adapter=a, max_new_tokens=6, ignore_eos=True,
                        return_logits=True) for i, a in enumerate([None, "a1", "a2", "a2", "a1", None])]
    results, _ = run_all(eng, requests)
    assert eng.stats.prefill_runs == 1, "the six prompts must share one (right-padded) prefill run"
    assert_rows_exact(built, requests, results)
    firsts = [results[r.request_id].logits[0] for r in requests[:3]]
    assert min(float(np.abs(f - firsts[0]).max()) for f in firsts[1:]) > 1e-3, "adapters must matter"


@POOL
@pytest.mark.parametrize("chunk", [2048, 4], ids=["whole", "chunked"])
def test_rows_join_and_leave_mid_generation(built, chunk, kv_pool):
    """Rows of very different lengths submitted a step apart (each prefilled alone, then joining the
    running rows), finishing at different steps, with at most 3 rows at once; prompts prefilled whole or
    4 tokens per run. On the pool no cache byte is ever copied (rows are written in place); the batch
    cache is rebuilt as rows come and go."""
    eng = engine(built, max_batch=3, max_prefill_tokens=chunk, kv_pool=kv_pool)
    spec = [(17, "a1", 7), (4, None, 3), (9, "a2", 9), (2, "a1", 5), (12, None, 4), (6, "a2", 6)]
    requests = [Request(prompt_ids=prompt(n, i), adapter=a, max_new_tokens=m, ignore_eos=True, return_logits=True)
                for i, (n, a, m) in enumerate(spec)]
    results, widest = run_all(eng, requests, submit_every_step=True)
    assert eng.stats.prefills == 6 and widest == 3, "rows must have joined and left a running batch"
    assert (eng.stats.cache_moved == 0) == kv_pool
    if chunk < 17:
        assert eng.stats.prefill_runs > eng.stats.prefills
    assert_rows_exact(built, requests, results)


def test_serve_options_size_the_prefill_chunks_and_the_prefix_cache(built):
    """`serve --max-prefill-tokens 2 --prefix-cache-tokens 0`: a prompt of several tokens is prefilled two
    tokens per step, and there is no prefix cache (no metrics of one)."""
    from test_serve import BASE, ServerProcess

    server = ServerProcess(built, "--max-prefill-tokens", "2", "--prefix-cache-tokens", "0", adapters=()).ready()
    try:
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"model": BASE, "prompt": "a q1 b q2 c q3", "max_tokens": 2, "temperature": 0})
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()
    assert reply.status_code == 200, reply.text
    chunks = next(float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("prolora_prefill_chunks_total"))
    assert chunks >= 3 and "prolora_prefix_cache" not in metrics


def test_right_padding_is_chosen_from_the_graph_s_attention(built):
    """Right padding is for the builder's fused attention only (read from the graph's nodes); optimum's
    graphs without positions keep the refusal tested in test_engine.py."""
    from prolora_export.engine.core import _fused_attention

    assert _fused_attention(Path(built["slots"]) / "model.onnx")


def test_server_answers_from_the_builder_graph(built):
    """`prolora-export serve` on the builder's slot graph, a real process on 127.0.0.1: concurrent
    completions over both adapters and the base answer what the engine answers offline; /metrics shows
    the KV pool and the prefill chunks."""
    import urllib.request

    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import BASE, ServerProcess

    server = ServerProcess(built, adapters=NAMES).ready()
    try:
        api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        jobs = [(model, f"{'abcdef'[i]} q{i} " * (1 + i)) for i, model in enumerate([BASE, *NAMES] * 2)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: api.completions.create(
                model=job[0], prompt=job[1], max_tokens=6, temperature=0).choices[0].text, jobs))
        # a request's row is freed before its last event is sent: every row is free once the replies are in
        metrics = {line.split()[0]: float(line.split()[1]) for line in
                   urllib.request.urlopen(f"{server.url}/metrics", timeout=30).read().decode().splitlines()
                   if line.startswith(("prolora_kv_pool", "prolora_prefill", "prolora_prefix"))}
    finally:
        server.stop()
    assert metrics["prolora_kv_pool_rows_used"] == 0 and metrics["prolora_kv_pool_rows"] == 16
    eng = engine(built, tokenizer="auto")
    assert metrics["prolora_kv_pool_bytes"] == eng.pool.nbytes and metrics["prolora_prefill_chunks_total"] >= 1
    assert metrics["prolora_prefix_cache_hits_total"] == 0 and "prolora_prefix_cache_tokens" in metrics
    for (model, text), answer in zip(jobs, answers, strict=True):
        adapter = None if model == BASE else model
        assert answer == eng.generate([Request(prompt=text, adapter=adapter, max_new_tokens=6)])[0].text, model


def test_pool_is_sized_up_front_and_bounds_each_request(built):
    """The pool is allocated once: max_batch rows of max_cached_tokens / max_batch positions (its bytes
    known at start); a request that cannot fit a row is refused in one line, the others go on."""
    eng = engine(built, max_batch=4, max_cached_tokens=64)
    pool = eng.pool
    assert pool.rows == 4 and pool.row_length == 16
    heads, head_dim = eng.kv_shape
    assert pool.nbytes == len(eng.past_names) * 4 * heads * 16 * head_dim * 4
    long, fits = (Request(prompt_ids=prompt(10, 1), max_new_tokens=n, ignore_eos=True) for n in (7, 6))
    refused, done = eng.generate([long, fits])
    assert refused.finish_reason == "error" and "a row of this engine's KV pool holds 16" in refused.error
    assert done.error is None and len(done.token_ids) == 6 and pool.occupied == 0


def test_a_group_without_contiguous_free_rows_is_split(built):
    """Rows 0–2 taken, row 1 freed by a short request: two prompts of one length arriving together (one
    prefill group) find rows 1 and 3 free, not side by side, so they are prefilled apart, in two runs of
    one step (both fit its prefill budget); all exact."""
    eng = engine(built, max_batch=4)
    first = [Request(prompt_ids=prompt(6 + i, i), adapter=a, max_new_tokens=m, ignore_eos=True, return_logits=True)
             for i, (a, m) in enumerate([("a1", 12), (None, 4), ("a2", 12)])]
    results: dict = {}
    for request in first:
        eng.submit(request)
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    while first[1].request_id not in results:
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    assert list(eng.pool.used) == [True, False, True, False]
    pair = [Request(prompt_ids=prompt(7, 10 + i), adapter=a, max_new_tokens=4, ignore_eos=True, return_logits=True)
            for i, a in enumerate(["a2", "a1"])]
    runs = eng.stats.prefill_runs
    for request in pair:
        eng.submit(request)
    results.update({e.request_id: e.result for e in eng.step() if e.finished})
    assert eng.stats.prefill_runs == runs + 2 and eng.pool.occupied == 4, "the pair prefilled apart, in one step"
    while eng.pending:
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    assert eng.pool.occupied == 0
    assert_rows_exact(built, [*first, *pair], results)


# ---------------------------------------------------------------------- the prefix cache

SYSTEM = prompt(40, 3)  # a shared 40-token prefix: five blocks of 8


def ask(adapter: str | None, tail: list[int], max_new: int = 4) -> Request:
    return Request(prompt_ids=[*SYSTEM, *tail], adapter=adapter, max_new_tokens=max_new, ignore_eos=True,
                   return_logits=True)


@pytest.mark.parametrize("chunk", [2048, 4], ids=["whole", "chunked"])
def test_a_cached_prefix_is_reused_for_its_adapter_only_and_exactly(built, chunk):
    """A prompt sharing a 40-token prefix with an earlier one for the same adapter prefills only its
    own tail, and its logits equal a cold engine's and PyTorch's; the same prefix for another adapter or
    the base is a miss; unloading the adapter forgets its prefixes (a reload under the same name misses)."""
    eng = engine(built, prefix_block=8, prefix_cache_tokens=256, max_prefill_tokens=chunk)
    cold = engine(built, prefix_cache_tokens=0, max_prefill_tokens=chunk)
    assert cold.prefix is None
    first = ask("a1", [10, 11, 12])
    warm, other, base = ask("a1", [20, 21]), ask("a2", [20, 21]), ask(None, [20, 21])
    results, _ = run_all(eng, [first])
    assert eng.prefix.hits == 0 and eng.prefix.tokens == 40  # 43 tokens: five full blocks cached
    runs = eng.stats.prefill_runs
    results.update(run_all(eng, [warm])[0])
    assert eng.prefix.hits == 1 and eng.prefix.tokens_reused == 40
    assert eng.stats.prefill_runs == runs + 1, "only the 2-token tail is prefilled"
    results.update(run_all(eng, [other, base])[0])
    assert eng.prefix.hits == 1, "never shared across adapters or with the base"
    assert_rows_exact(built, [first, warm, other, base], results)
    again = run_all(cold, [ask("a1", [20, 21])])[0]
    want = next(iter(again.values())).logits
    got = results[warm.request_id].logits
    assert relative(got, want) <= 1e-5, "a hit computes what a cold prefill does"
    eng.unload_adapter("a1")
    assert not [key for key in eng.prefix.nodes if key[0] == 1], "the unloaded adapter's blocks are dropped"
    eng.load_adapter("a1", built["root"] / "a1")
    run_all(eng, [ask("a1", [30, 31])])
    assert eng.prefix.hits == 1


def first_tokens_per_step(eng: Engine, requests: list[Request], results: dict) -> list[int]:
    """Submit ``requests`` together and step until nothing is pending (results into ``results``); how many
    of them got their first token in each step."""
    wanted, seen, firsts = {r.request_id for r in requests}, set(), []
    for request in requests:
        eng.submit(request)
    while eng.pending:
        events = eng.step()
        new = {e.request_id for e in events if e.token_id is not None} & wanted - seen
        firsts.append(len(new))
        seen |= new
        results.update({e.request_id: e.result for e in events if e.finished})
    return firsts


@pytest.mark.parametrize("budget", [2048, 4], ids=["all-fit", "one-fits"])
def test_prefix_hits_join_in_one_step_within_its_prefill_budget(built, budget):
    """Four prompts that hit a cached prefix, arriving together, are each prefilled alone (ONNX Runtime's
    CPU attention takes no batched prefill over a past). They all join in one step when their tails fit
    the step's ``max_prefill_tokens`` (and then decode as one batch), and one per step when the budget
    holds one tail; exact either way."""
    eng = engine(built, max_batch=6, prefix_block=8, max_prefill_tokens=budget)
    results, _ = run_all(eng, [ask("a1", [10, 11, 12])])  # caches the 40-token prefix for a1
    hits = [ask("a1", [20 + i, 30 + i, 40 + i]) for i in range(4)]  # 43 tokens each, 40 of them cached
    runs = eng.stats.prefill_runs
    firsts = first_tokens_per_step(eng, hits, results)
    assert eng.prefix.hits == 4 and eng.stats.prefill_runs == runs + 4, "each hit prefilled alone"
    assert firsts[:4] == ([4, 0, 0, 0] if budget == 2048 else [1, 1, 1, 1]), "first tokens per step"
    assert_rows_exact(built, [*hits], results)


def test_short_hit_tails_ride_the_decode_batch_when_it_is_busy(built, monkeypatch):
    """With enough rows decoding together (FEED_MIN_ROWS, lowered here to 4), prompts that hit a cached
    prefix with a tail shorter than a block take no prefill run: their blocks are restored into a pool
    row and the decode steps feed the tail a token per step beside a running row, the first token coming
    from the step that fed the last prompt token; every row is exact, and a burst below the threshold
    still gets its own runs."""
    monkeypatch.setattr(core, "FEED_MIN_ROWS", 4)
    eng = engine(built, max_batch=6, prefix_block=8)
    results, _ = run_all(eng, [ask("a1", [10, 11, 12])])  # caches the 40-token prefix for a1
    running = Request(prompt_ids=prompt(5, 9), adapter="a2", max_new_tokens=8, ignore_eos=True, return_logits=True)
    eng.submit(running)
    eng.step()
    hits = [ask("a1", [20 + i, 30 + i, 40 + i]) for i in range(3)]  # 43 tokens each: a 3-token tail
    runs = eng.stats.prefill_runs
    firsts = first_tokens_per_step(eng, hits, results)
    assert eng.stats.prefill_runs == runs and eng.prefix.hits == 3, "the tails took no prefill run"
    assert firsts[:4] == [0, 0, 0, 3], "fed in the next three steps, first tokens from the third"
    assert eng.pool.occupied == 0
    assert_rows_exact(built, [running, *hits], results)
    alone = [ask("a1", [50 + i, 60 + i, 70 + i]) for i in range(3)]  # 3 rows < 4: a run each
    results.update(run_all(eng, alone)[0])
    assert eng.stats.prefill_runs == runs + 3
    assert_rows_exact(built, alone, results)


def test_the_prefix_cache_is_bounded(built):
    """At most prefix_cache_tokens positions stay cached (least recently used leaves go first), and a
    prefix partly evicted is still reused as far as it is cached."""
    eng = engine(built, prefix_block=8, prefix_cache_tokens=24)
    first = ask("a2", [10, 11, 12])
    results, _ = run_all(eng, [first])
    assert eng.prefix.tokens == 24  # three of the five blocks: the first three (a leaf goes before its parent)
    warm = ask("a2", [5, 6])
    results.update(run_all(eng, [warm])[0])
    assert eng.prefix.hits == 1 and eng.prefix.tokens_reused == 24 and eng.prefix.tokens <= 24
    assert_rows_exact(built, [first, warm], results)


def test_chat_messages_render_to_ids_under_this_transformers(built, monkeypatch):
    """A chat request is rendered by the tokenizer's template to token ids (transformers 5's
    apply_chat_template returns a BatchEncoding unless told not to); a failure while checking a request
    fails that request alone, with its cause."""
    from test_engine import CHAT_TEMPLATE

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    eng = engine(built, tokenizer=tokenizer)
    chat = [{"role": "user", "content": "hi there"}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    by_chat, by_ids = eng.generate([Request(messages=chat, adapter="a1", max_new_tokens=3, ignore_eos=True),
                                    Request(prompt_ids=rendered, adapter="a1", max_new_tokens=3, ignore_eos=True)])
    assert by_chat.error is None and by_chat.prompt_tokens == len(rendered) and by_chat.token_ids == by_ids.token_ids
    monkeypatch.setattr(eng, "_sequence", lambda *args: 1 / 0)
    broken = eng.generate([Request(prompt_ids=[5, 6], max_new_tokens=2)])[0]
    assert broken.finish_reason == "error" and "could not be checked: ZeroDivisionError" in broken.error


def test_the_prefix_cache_evicts_the_least_recently_used_prefix(built):
    """Room for two prompts' prefixes (4 blocks): A and B cached, A reused (so B is now the least recently
    used), then C's prefix evicts B's, not A's: A hits again, B misses; every row exact."""
    eng = engine(built, prefix_block=8, prefix_cache_tokens=32)
    a, b, c = (prompt(17, seed) for seed in (4, 5, 6))
    order = [("A", a), ("B", b), ("A", a), ("C", c), ("A", a), ("B", b)]
    requests = [Request(prompt_ids=ids, adapter="a1", max_new_tokens=3, ignore_eos=True, return_logits=True)
                for _, ids in order]
    results, hits = {}, []
    for request in requests:
        results.update(run_all(eng, [request])[0])
        hits.append(eng.prefix.hits)
        assert eng.prefix.tokens <= 32
    assert hits == [0, 0, 1, 1, 2, 2], "A kept (used last), B evicted (least recently used)"
    assert_rows_exact(built, requests, results)


def test_a_graph_without_logits_is_refused_in_one_line():
    """The engine's binding reads the logits output's shape when it starts: a graph without one is refused
    with a PRoLoRAError naming it, not a bare StopIteration."""
    from types import SimpleNamespace

    from prolora_export.engine.binding import SessionBinding
    from prolora_export.errors import PRoLoRAError

    present = SimpleNamespace(name="present.0.key", shape=[1], type="tensor(float)")
    session = SimpleNamespace(get_outputs=lambda: [present])
    with pytest.raises(PRoLoRAError, match="no 'logits' output"):
        SessionBinding(session, None, [], [], "cpu")
