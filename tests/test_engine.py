"""The generation engine on an adapter-slot graph: every row of a mixed, continuously batched batch
against the single-adapter compact graph run alone (fp32 logits) and PyTorch base + that adapter
(greedy tokens); sampling under a seed, stop rules, bounds, bad input, loading while running, the
background runner; chunked prefill, a failed run failing only its rows. A tiny Llama with a
character tokenizer (fast); tiny Gemma, BLOOM and GPT-2 (graphs whose positions come another way);
the demo model end to end (slow)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_adapter, tiny_llama

from prolora_export.engine import Engine, EngineRunner, Request
from prolora_export.errors import PRoLoRAError
from prolora_export.formats.prolora import load_adapter, save_adapter
from prolora_export.inject import inject_adapter, load_adapter_weights
from prolora_export.models import load_base_model
from prolora_export.onnx import slots as slot_export
from prolora_export.onnx.adapters import decoder_feeds, export_onnx_adapter, load_onnx_adapter, run_options
from prolora_export.onnx.export import export_onnx
from prolora_export.runtime import inference_session

#: the engine on optimum's slot graphs (export_onnx); its runs on the model builder's are test_engine_builder.py
pytestmark = pytest.mark.optimum

HYPER = {"r": 8, "unshared_r": 1, "sharing_rate_a": 2, "sharing_rate_b": 3}
NAMES = ("a1", "a2", "a3")
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer():
    """A 128-token character tokenizer (ids 3… printable ASCII, 2 = </s>) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    vocab.update({f"<x{i}>": i for i in range(len(vocab), 128)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Tiny Llama + tokenizer, three adapters of one geometry (+ ORT files), the slot export and the
    single-adapter compact graph (zero default: no adapter active = the base)."""
    root = tmp_path_factory.mktemp("engine")
    tiny_llama().save_pretrained(root / "base", safe_serialization=True)
    char_tokenizer().save_pretrained(root / "base")
    adapters = {}
    for seed, name in enumerate(NAMES, start=1):
        save_adapter(root / name, make_adapter(tiny_llama(), seed=seed, **HYPER))
        export_onnx_adapter(root / name, root / f"{name}.onnx_adapter")
        adapters[name] = root / name
    slots = export_onnx(str(root / "base"), [adapters["a1"]], root / "slots", mode="compact", slots=True).out
    single = export_onnx(str(root / "base"), adapters["a1"], root / "single", mode="compact",
                         default_adapter="zero").out
    return {"root": root, "base": root / "base", "adapters": adapters, "slots": slots,
            "single": inference_session(single), "refs": {}}


def reference(tiny, ids: list[int], adapter: str | None, steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits they came from: the single-adapter graph, batch 1, no padding,
    that adapter switched in with an ONNX Runtime adapter file (cached per case)."""
    key = (tuple(ids), adapter, steps)
    if key not in tiny["refs"]:
        sess = tiny["single"]
        options = run_options(load_onnx_adapter(tiny["root"] / f"{adapter}.onnx_adapter")) if adapter else None
        feeds = decoder_feeds(sess, np.array([ids], np.int64))
        names = [o.name for o in sess.get_outputs()]
        tokens, logits = [], []
        for _ in range(steps):
            out = dict(zip(names, sess.run(None, feeds, options), strict=True))
            last = out["logits"][0, -1]
            logits.append(last)
            tokens.append(int(np.argmax(last)))
            if tokens[-1] == 2:
                break
            length = feeds["attention_mask"].shape[1] + 1
            feeds = {"input_ids": np.array([[tokens[-1]]], np.int64), "attention_mask": np.ones((1, length), np.int64),
                     "position_ids": np.array([[length - 1]], np.int64),
                     **{k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}}
        tiny["refs"][key] = (tokens, np.stack(logits))
    return tiny["refs"][key]


def torch_greedy(tiny, ids: list[int], adapter: str | None, steps: int) -> list[int]:
    model = load_base_model(str(tiny["base"]))
    if adapter:
        loaded = load_adapter(tiny["adapters"][adapter])
        inject_adapter(model, loaded.config)
        load_adapter_weights(model, loaded.tensors)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=steps, do_sample=False, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


def engine(tiny, **kwargs) -> Engine:
    return Engine(tiny["slots"], {n: tiny["adapters"][n] for n in NAMES}, **kwargs)


def prompt(i: int) -> list[int]:
    """Prompts of different lengths, so the batch is left-padded."""
    return [1, *[(7 * i + 3 * k) % 120 + 3 for k in range(3 + 2 * i)]]


def assert_row_exact(tiny, request: Request, result) -> None:
    tokens, logits = reference(tiny, list(request.prompt_ids), request.adapter, request.max_new_tokens)
    assert result.token_ids == [t for t in tokens if t != 2]
    got = result.logits[: len(logits)]
    err = float(np.abs(got - logits).max() / np.abs(logits).max())
    assert err <= 1e-5, f"{request.request_id} ({request.adapter}): logits relative difference {err:.2e}"


def test_mixed_batch_rows_equal_each_adapter_alone(tiny):
    """Three adapters and the base, two rows each, in one batch: each row's logits are the
    single-adapter graph's for its adapter, and its greedy tokens PyTorch's base + that adapter."""
    eng = engine(tiny, max_batch=8)
    adapters = [None, "a1", "a2", "a3"] * 2
    requests = [Request(prompt_ids=prompt(i), adapter=a, max_new_tokens=8, return_logits=True)
                for i, a in enumerate(adapters)]
    results = eng.generate(requests)
    for request, result in zip(requests, results, strict=True):
        assert result.finish_reason in ("length", "stop") and result.error is None
        assert_row_exact(tiny, request, result)
        assert result.token_ids == torch_greedy(tiny, list(request.prompt_ids), request.adapter, 8)
    same_prompt = [eng.generate([Request(prompt_ids=prompt(0), adapter=a, max_new_tokens=1, return_logits=True)])[0]
                   for a in (None, *NAMES)]
    spread = [float(np.abs(r.logits - same_prompt[0].logits).max()) for r in same_prompt[1:]]
    assert min(spread) > 1e-3, "the adapters must change the logits, else the test is blind"


def test_rows_join_and_leave_mid_generation(tiny):
    """max_batch 3 and seven requests of different lengths: requests wait, join as rows finish, and
    every row still equals its adapter alone."""
    eng = engine(tiny, max_batch=3)
    adapters = ["a2", None, "a1", "a3", "a1", None, "a2"]
    lengths = [3, 9, 5, 2, 7, 4, 6]
    requests = [Request(prompt_ids=prompt(i), adapter=a, max_new_tokens=n, return_logits=True)
                for i, (a, n) in enumerate(zip(adapters, lengths, strict=True))]
    for request in requests:
        eng.submit(request)
    rows_seen, results = [], {}
    while len(results) < len(requests):
        for event in eng.step():
            if event.finished:
                results[event.request_id] = event.result
        rows_seen.append(len(eng._running))
    assert max(rows_seen) == 3 and eng.stats.prefills >= 3, "requests must have joined a running batch"
    for request in requests:
        assert_row_exact(tiny, request, results[request.request_id])


def test_sampling_reproducible_under_seed(tiny):
    eng = engine(tiny, max_batch=4)

    def sampled(seed, others=()):
        request = Request(prompt_ids=prompt(2), adapter="a2", max_new_tokens=12, temperature=0.9, top_p=0.9,
                          seed=seed, ignore_eos=True)
        extra = [Request(prompt_ids=prompt(5 + i), adapter=a, max_new_tokens=5) for i, a in enumerate(others)]
        return eng.generate([*extra, request])[-1].token_ids

    alone = sampled(7)
    assert sampled(7, others=("a1", None, "a3")) == alone, "the seed fixes the tokens whatever shares the batch"
    assert sampled(8) != alone
    assert len(set(alone)) > 1


def test_text_prompt_chat_template_stop_strings_and_stream(tiny):
    eng = engine(tiny)
    base = eng.generate([Request(prompt="Hello", adapter="a3", max_new_tokens=12, ignore_eos=True)])[0]
    assert base.prompt_tokens == len("Hello") and len(base.token_ids) == 12
    stop = base.text[4:6]
    cut = base.text.index(stop)
    events = list(eng.stream(Request(prompt="Hello", adapter="a3", max_new_tokens=12, ignore_eos=True, stop=[stop])))
    final = events[-1]
    assert final.finish_reason == "stop" and final.result.text == base.text[:cut]
    assert "".join(e.text for e in events) == base.text[:cut], "streamed pieces add up to the text, no stop string"
    chat = [{"role": "user", "content": "hi"}]
    rendered = eng.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    by_chat, by_ids = eng.generate([Request(messages=chat, max_new_tokens=4), Request(prompt_ids=rendered,
                                                                                       max_new_tokens=4)])
    assert by_chat.prompt_tokens == len(rendered) and by_chat.token_ids == by_ids.token_ids
    first = base.token_ids[2]
    stopped = eng.generate([Request(prompt="Hello", adapter="a3", max_new_tokens=12, stop_token_ids=[first])])[0]
    assert stopped.finish_reason == "stop" and first not in stopped.token_ids


def test_bad_input_fails_only_that_request(tiny):
    eng = engine(tiny, max_batch=8)
    good = [Request(prompt_ids=prompt(1), adapter="a1", max_new_tokens=6, return_logits=True),
            Request(prompt_ids=prompt(3), max_new_tokens=6, return_logits=True)]
    bad = {
        "unknown adapter 'nope'": Request(prompt_ids=prompt(0), adapter="nope"),
        "empty prompt": Request(prompt=""),
        "does not fit the model's context of 256": Request(prompt_ids=[5] * 300),
        "temperature must be": Request(prompt_ids=prompt(0), temperature=-1.0),
        "exactly one of": Request(prompt="a", prompt_ids=[3]),
        "token ids must be in": Request(prompt_ids=[3, 999]),
        "max_new_tokens must be": Request(prompt_ids=[3], max_new_tokens=0),
        "stop must be a list of strings": Request(prompt="a", stop="ab"),
    }
    results = eng.generate([good[0], *bad.values(), good[1]])
    for (message, _), result in zip(bad.items(), results[1:-1], strict=True):
        assert result.finish_reason == "error" and message in result.error, result.error
    for request, result in zip(good, (results[0], results[-1]), strict=True):
        assert_row_exact(tiny, request, result)


def test_adapter_geometry_mismatch_is_refused_while_running(tiny, tmp_path):
    eng = engine(tiny, max_batch=4)
    request = Request(prompt_ids=prompt(4), adapter="a2", max_new_tokens=8, return_logits=True)
    eng.submit(request)
    eng.step()
    other = tmp_path / "other"
    save_adapter(other, make_adapter(tiny_llama(), seed=9, r=4, unshared_r=0, sharing_rate_a=2, sharing_rate_b=2))
    with pytest.raises(PRoLoRAError, match="does not fit this graph's slots"):
        eng.load_adapter("other", other)
    assert "other" not in eng.adapters
    results = {}
    while not results:
        results = {e.request_id: e.result for e in eng.step() if e.finished}
    assert_row_exact(tiny, request, results[request.request_id])


def test_load_and_unload_while_running(tiny):
    """An adapter loaded mid-run from an ONNX Runtime file serves new rows; one unloaded mid-run
    keeps serving its running row, refuses new requests, and its slot is reused afterwards."""
    eng = Engine(tiny["slots"], {"a1": tiny["adapters"]["a1"]}, max_batch=4)
    running = Request(prompt_ids=prompt(2), adapter="a1", max_new_tokens=8, return_logits=True)
    eng.submit(running)
    eng.step()
    eng.load_adapter("a3", tiny["root"] / "a3.onnx_adapter")
    joined = Request(prompt_ids=prompt(3), adapter="a3", max_new_tokens=5, return_logits=True)
    eng.submit(joined)
    eng.step()
    eng.unload_adapter("a1")
    assert "a1" not in eng.adapters
    refused = Request(prompt_ids=prompt(1), adapter="a1")
    results = {r.request_id: r for r in eng.generate([refused])}
    assert results[refused.request_id].finish_reason == "error"
    while eng.pending:
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    assert_row_exact(tiny, running, results[running.request_id])
    assert_row_exact(tiny, joined, results[joined.request_id])
    assert eng.slots.load("a2", tiny["adapters"]["a2"]) == 0, "the freed slot is reused"


def test_bounded_memory_queues_requests(tiny):
    """Rows × longest possible row stays within max_cached_tokens; what does not fit waits."""
    limit = 60
    eng = engine(tiny, max_batch=8, max_cached_tokens=limit)
    requests = [Request(prompt_ids=prompt(i), adapter=NAMES[i % 3], max_new_tokens=10, return_logits=True)
                for i in range(5)]
    for request in requests:
        eng.submit(request)
    results = {}
    while len(results) < len(requests):
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
        assert eng._cache is None or eng._cache.tokens <= limit
    for request in requests:
        assert_row_exact(tiny, request, results[request.request_id])
    too_big = eng.generate([Request(prompt_ids=[3] * 55, max_new_tokens=10)])[0]
    assert too_big.finish_reason == "error" and "at most 60" in too_big.error


def test_decode_steps_copy_no_cache_bytes(tiny):
    """A decode step with no row joining or leaving feeds the cache and the slots as OrtValues: the
    engine copies only ids, mask, positions and adapter indices (no KV, no slot bytes)."""
    eng = engine(tiny, max_batch=4)
    requests = [Request(prompt_ids=[1, 7 + i, 30, 9, 41], adapter=a, max_new_tokens=6, ignore_eos=True)
                for i, a in enumerate((None, "a1", "a2", "a3"))]
    eng.generate(requests)
    assert eng.stats.prefills == 1 and eng.stats.steps == 5
    length = len(requests[0].prompt_ids) + 6
    assert eng.stats.step_copied_max <= 4 * 8 * (length + 3), "ids, mask, positions and adapter indices only"
    assert eng.stats.step_copied_max <= eng.stats.step_copied <= 5 * eng.stats.step_copied_max
    assert eng.stats.cache_moved == 0, "one prefill, rows leave together: nothing to merge or compact"
    assert eng.stats.graph_kv_written > 0


def test_runner_serves_threads_and_asyncio(tiny):
    eng = engine(tiny, max_batch=4)
    requests = [Request(prompt_ids=prompt(i), adapter=a, max_new_tokens=5, return_logits=True)
                for i, a in enumerate(("a1", None, "a3"))]

    async def serve(runner):
        return await asyncio.gather(*(runner.agenerate(r) for r in requests))

    with EngineRunner(eng) as runner:
        results = asyncio.run(serve(runner))
        streamed = list(runner.stream(Request(prompt_ids=prompt(0), adapter="a2", max_new_tokens=4)))
        early = runner.stream(Request(prompt_ids=prompt(1), max_new_tokens=50, ignore_eos=True))
        next(early)
        early.close()  # leaving early cancels the request
        threaded = runner.generate([Request(prompt_ids=prompt(0), adapter="a2", max_new_tokens=4)])
    for request, result in zip(requests, results, strict=True):
        assert_row_exact(tiny, request, result)
    assert streamed[-1].result.token_ids == threaded[0].token_ids
    assert eng.pending == 0


def test_runner_survives_a_failing_step(tiny, monkeypatch):
    """A step that fails outside its graph runs (a bug) finishes every pending request with that
    error; the next requests are served as usual."""
    eng = engine(tiny, max_batch=4)

    def broken(*args):
        raise RuntimeError("device lost")

    with EngineRunner(eng) as runner:
        monkeypatch.setattr(eng, "_groups", broken)
        failed = runner.generate([Request(prompt_ids=prompt(0), adapter="a1"), Request(prompt_ids=prompt(1))])
        monkeypatch.undo()
        request = Request(prompt_ids=prompt(2), adapter="a3", max_new_tokens=4, return_logits=True)
        (served,) = runner.generate([request])
    assert all(r.finish_reason == "error" and "device lost" in r.error for r in failed)
    assert_row_exact(tiny, request, served)


@pytest.mark.demo
@pytest.mark.slow
def test_demo_model_mixed_adapters_generate_like_pytorch(demo_model, tmp_path):
    """The real demo model: a chat request per adapter and one for the base, batched together;
    each row's greedy text equals PyTorch's base + that adapter."""
    from transformers import AutoTokenizer

    names = ("x", "y")
    folders = {}
    for seed, name in enumerate(names, start=1):
        model = load_base_model(str(demo_model))
        adapter = make_adapter(model, seed=seed, r=8, unshared_r=1, sharing_rate_a=2, sharing_rate_b=2,
                               target_modules=["q_proj", "v_proj"])
        adapter.tensors = {k: v * (0.4 if "_B_" in k else 1.0) for k, v in adapter.tensors.items()}
        save_adapter(tmp_path / name, adapter)
        folders[name] = tmp_path / name
    out = export_onnx(str(demo_model), [folders["x"]], tmp_path / "slots", mode="compact", slots=True).out
    eng = Engine(out, folders, max_batch=4)
    chat = [{"role": "user", "content": "Name a colour."}]
    requests = [Request(messages=chat, adapter=a, max_new_tokens=10) for a in (None, *names)]
    results = eng.generate(requests)
    tokenizer = AutoTokenizer.from_pretrained(str(demo_model))
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    texts = []
    for request, result in zip(requests, results, strict=True):
        model = load_base_model(str(demo_model))
        if request.adapter:
            loaded = load_adapter(folders[request.adapter])
            inject_adapter(model, loaded.config)
            load_adapter_weights(model, loaded.tensors)
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        text = tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
        assert result.text == text, (request.adapter, result.text, text)
        texts.append(text)
    assert len(set(texts)) > 1, "the adapters must change the text, else the test is blind"


def test_engine_refuses_a_folder_without_slots(tiny, tmp_path: Path):
    with pytest.raises(PRoLoRAError, match="not an adapter-slot ONNX export"):
        Engine(tmp_path)


# ---------------------------------------------------------------------- other architectures


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, vocab_size=128, max_position_embeddings=256)
    return GemmaForCausalLM(config).eval(), ["q_proj", "v_proj", "up_proj"]


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(hidden_size=64, n_layer=2, n_head=2, vocab_size=128)).eval(), \
        ["query_key_value", "dense_h_to_4h"]


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=32, vocab_size=128)
    return GPT2LMHeadModel(config).eval(), ["c_attn", "c_fc"]


def _mpt():
    from transformers import MptConfig, MptForCausalLM

    config = MptConfig(d_model=64, n_heads=2, n_layers=2, vocab_size=128, max_seq_len=128)
    return MptForCausalLM(config).eval(), ["Wqkv", "up_proj"]


def _falcon():
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, vocab_size=128, alibi=True,
                          new_decoder_architecture=False, multi_query=False)
    return FalconForCausalLM(config).eval(), ["query_key_value", "dense_h_to_4h"]


ARCHS = {"gemma": _gemma, "bloom": _bloom, "gpt2": _gpt2, "mpt": _mpt, "falcon": _falcon}


@pytest.fixture(scope="module")
def archs(tmp_path_factory) -> dict:
    """Per architecture: the base folder, one adapter and its slot export, made on first use.
    Gemma takes positions from the cache length unless given position_ids; BLOOM, MPT and Falcon
    with ALiBi take no position_ids (their biases survive left padding); GPT-2 calls its context
    ``n_positions``."""
    root = tmp_path_factory.mktemp("archs")
    made: dict = {}

    def get(name: str) -> dict:
        if name not in made:
            torch.manual_seed(0)
            model, targets = ARCHS[name]()
            model.save_pretrained(root / name / "base", safe_serialization=True)
            save_adapter(root / name / "a", make_adapter(model, seed=1, r=4, unshared_r=1, sharing_rate_a=2,
                                                         sharing_rate_b=2, target_modules=targets))
            slots = export_onnx(str(root / name / "base"), [root / name / "a"], root / name / "slots",
                                mode="compact", slots=True).out
            made[name] = {"base": root / name / "base", "adapter": root / name / "a", "slots": slots}
        return made[name]

    return get


def torch_logits(arch: dict, adapter: str | None, prompt_ids: list[int], tokens: list[int]) -> np.ndarray:
    """PyTorch base (+ the adapter) on the whole sequence, no cache, no padding: the logits each
    generated token was chosen from."""
    model = load_base_model(str(arch["base"]))
    if adapter:
        loaded = load_adapter(arch["adapter"])
        inject_adapter(model, loaded.config)
        load_adapter_weights(model, loaded.tensors)
    ids = [*prompt_ids, *tokens]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    return logits[len(prompt_ids) - 1: len(ids) - 1]


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("chunk", [2048, 5], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_rows_prefilled_apart_decode_exactly_on_every_architecture(archs, name, chunk):
    """Rows of different prompt lengths prefilled in different steps, then left-padded into one
    batch: each row's logits equal PyTorch's for it alone, with positions fed (Gemma, GPT-2) or
    none (ALiBi: BLOOM, MPT, Falcon), and prompts prefilled whole or in chunks of 5 tokens."""
    arch = archs(name)
    eng = Engine(arch["slots"], {"a": arch["adapter"]}, tokenizer=None, max_prefill_tokens=chunk)
    requests = [Request(prompt_ids=[(5 * k + n) % 120 + 3 for k in range(n)], adapter=a, max_new_tokens=6,
                        ignore_eos=True, return_logits=True) for n, a in ((17, "a"), (4, None), (9, "a"))]
    results = {}
    for request in requests:
        eng.submit(request)
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    while eng.pending:
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    assert eng.stats.prefills == 3 and eng.stats.prefill_runs == (3 if chunk > 17 else 4 + 1 + 2)
    for request in requests:
        result = results[request.request_id]
        want = torch_logits(arch, request.adapter, list(request.prompt_ids), result.token_ids)
        assert len(result.token_ids) == 6 and rel(result.logits, want) <= 1e-5, (request.request_id, name)


def test_graph_taking_positions_from_the_cache_length_is_refused(archs, tmp_path, monkeypatch):
    """A Gemma slot graph exported without position_ids (as before this fix) would decode batched
    rows at wrong rotary positions: the engine refuses it at load, in one line."""
    arch = archs("gemma")
    original = slot_export.config_overrides
    monkeypatch.setattr(slot_export, "config_overrides", lambda model: original(torch.nn.Identity()))
    old = export_onnx(str(arch["base"]), [arch["adapter"]], tmp_path / "old", mode="compact", slots=True).out
    with pytest.raises(PRoLoRAError, match=r"gemma slot graph has no position_ids input.*re-export"):
        Engine(old, tokenizer=None)


def test_context_comes_from_the_config_class(archs):
    """GPT-2 names its context n_positions (32 here): a prompt that fills it is refused, and a long
    generation stops at it; nothing crashes, the other row is exact."""
    arch = archs("gpt2")
    eng = Engine(arch["slots"], {"a": arch["adapter"]}, tokenizer=None)
    assert eng.context == 32
    long = Request(prompt_ids=[7] * 28, adapter="a", max_new_tokens=50, ignore_eos=True)
    other = Request(prompt_ids=[9, 4, 11], max_new_tokens=5, ignore_eos=True, return_logits=True)
    full, cut, exact = eng.generate([Request(prompt_ids=[5] * 32), long, other])
    assert full.finish_reason == "error" and "context of 32" in full.error
    assert cut.finish_reason == "length" and len(cut.token_ids) == 32 - 28
    assert rel(exact.logits, torch_logits(arch, None, [9, 4, 11], exact.token_ids)) <= 1e-5


# ---------------------------------------------------------------------- chunked prefill, failures


def recording(eng: Engine, monkeypatch) -> list[tuple[int, int]]:
    """Record the (rows, new tokens) of every graph run."""
    runs: list[tuple[int, int]] = []
    run = eng._run

    def record(feeds, *args, **options):
        runs.append(feeds["input_ids"].shape)
        return run(feeds, *args, **options)

    monkeypatch.setattr(eng, "_run", record)
    return runs


def test_long_prompt_prefills_in_chunks_while_running_rows_decode(tiny, monkeypatch):
    """A 61-token prompt with max_prefill_tokens 8: no run takes more than 8 new tokens (the
    prefill's activations are bounded by the chunk), a running row gets one token in every step
    meanwhile, and both rows equal their adapter alone."""
    eng = engine(tiny, max_batch=4, max_prefill_tokens=8)
    runs = recording(eng, monkeypatch)
    running = Request(prompt_ids=prompt(1), adapter="a1", max_new_tokens=20, ignore_eos=True, return_logits=True)
    long = Request(prompt_ids=[1, *[(11 * k) % 120 + 3 for k in range(60)]], adapter="a2", max_new_tokens=4,
                   return_logits=True)
    eng.submit(running)
    eng.step()
    eng.submit(long)
    results, tokens_per_step, steps, first = {}, [], 0, False
    while not first:
        events = eng.step()
        steps += 1
        tokens_per_step.append(sum(e.request_id == running.request_id and e.token_id is not None for e in events))
        results.update({e.request_id: e.result for e in events if e.finished})
        first = any(e.request_id == long.request_id for e in events)
    assert steps == 8, "61 tokens in chunks of 8: the long prompt's first token comes in the 8th step"
    assert tokens_per_step == [1] * steps, "the running row is never held by the prefill"
    while eng.pending:
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    assert max(rows * width for rows, width in runs) <= 8
    assert eng.stats.prefill_runs == 1 + 8
    for request in (running, long):
        assert_row_exact(tiny, request, results[request.request_id])


def test_chunked_prefill_equals_whole_prefill(tiny):
    """The mixed batch of several adapters, prompts prefilled 3 tokens per run: every row still
    equals its adapter alone (a prompt prefilled whole)."""
    eng = engine(tiny, max_batch=8, max_prefill_tokens=3)
    requests = [Request(prompt_ids=prompt(i), adapter=a, max_new_tokens=5, return_logits=True)
                for i, a in enumerate([None, "a1", "a2", "a3", "a1"])]
    results = eng.generate(requests)
    assert eng.stats.prefill_runs > 2 * eng.stats.prefills
    for request, result in zip(requests, results, strict=True):
        assert_row_exact(tiny, request, result)


def test_a_failed_run_fails_only_its_rows(tiny, monkeypatch):
    """A prefill run that fails finishes only its own request with the error; a decode run that
    fails finishes only the decoding rows, while a prompt being prefilled goes on; the survivors
    are exact. Through the runner too."""
    eng = engine(tiny, max_batch=4, max_prefill_tokens=4)
    run = eng._run
    poison = {"prefill": 99, "decode": False}

    def flaky(feeds, *args, **options):
        ids = feeds["input_ids"]
        if (ids == poison["prefill"]).any() or (poison["decode"] and ids.shape[1] == 1):
            raise RuntimeError("device lost")
        return run(feeds, *args, **options)

    monkeypatch.setattr(eng, "_run", flaky)
    running = Request(prompt_ids=prompt(2), adapter="a3", max_new_tokens=8, return_logits=True)
    doomed = Request(prompt_ids=[1, 5, 99, 7], adapter="a1")
    with EngineRunner(eng) as runner:
        survived, failed = runner.generate([running, doomed])
    assert failed.finish_reason == "error" and "device lost" in failed.error
    assert_row_exact(tiny, running, survived)

    decoding = Request(prompt_ids=prompt(1), adapter="a1", max_new_tokens=30, ignore_eos=True)
    prefilling = Request(prompt_ids=prompt(6), adapter="a2", max_new_tokens=6, return_logits=True)
    eng.submit(decoding)
    eng.step()
    eng.submit(prefilling)
    eng.step()  # the prefill's first chunk; the decoding row decodes
    poison["decode"] = True
    events = eng.step()
    poison["decode"] = False
    assert [e.result.error for e in events if e.finished] == ["engine run failed: RuntimeError: device lost"]
    results = {}
    while eng.pending:
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    assert list(results) == [prefilling.request_id]
    assert_row_exact(tiny, prefilling, results[prefilling.request_id])


def test_a_failing_row_fails_alone(tiny):
    """A row whose next token cannot be chosen (its sampler raises) finishes with that error; the
    row beside it in the same decode run goes on, exact."""
    eng = engine(tiny, max_batch=4)
    broken = Request(prompt_ids=prompt(3), adapter="a2", max_new_tokens=8, ignore_eos=True)
    fine = Request(prompt_ids=prompt(4), adapter="a1", max_new_tokens=8, return_logits=True)
    eng.submit(broken)
    eng.submit(fine)
    eng.step()

    def fail(logits):
        raise ValueError("bad logits")

    next(s for s in eng._running if s.request is broken).sampler = fail
    results = {}
    while eng.pending:
        results.update({e.request_id: e.result for e in eng.step() if e.finished})
    assert results[broken.request_id].error == "choosing the next token failed: ValueError: bad logits"
    assert_row_exact(tiny, fine, results[fine.request_id])


def test_kv_pool_memory_is_committed_only_where_written():
    """The KV pool's arrays (512 MiB here) commit 4 KiB pages as positions are written: one value in
    every MiB commits a few MiB, not the 2 MiB huge page per write numpy's own large arrays would get."""
    import psutil

    from prolora_export.engine.pool import lazy_zeros

    before = psutil.Process().memory_info().rss
    array = lazy_zeros((512, 1 << 18), np.float32)  # 512 blocks of 1 MiB
    array[:, 0] = 1.0
    grown = psutil.Process().memory_info().rss - before
    assert array.sum() == 512 and grown < 32 * 2**20, f"{grown / 2**20:.0f} MiB resident"
