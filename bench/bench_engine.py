"""Serving many PRoLoRA adapters: the engine's mixed batches against one adapter per run and one
merged graph per adapter, time to first token, bytes copied per decode step, and resident memory
per loaded adapter. Writes bench/ENGINE.md and bench/engine.json.

    python bench/bench_engine.py [--quick] [--markdown-only]

Every export is written by the CLI of the environment that has its route (:mod:`envs`: optimum's
graphs by the transformers-4.57 venv, the builder's by the transformers-5 one), so the bench runs in
either.

Demo model (SmolLM2-135M, fp32, ORT CPU, intra-op threads 2). Eight random adapters of one
geometry (r=8, u=1, m=n=2, the seven projections of every block; small random values). 32 chat
requests, four per adapter, all arriving at t=0, greedy, end-of-sequence ignored, each with its
own max_new_tokens (12…36, mean 24), the same in every option:

(a) the engine (``prolora_export.engine``) on the ``--slots`` export: continuous batching,
    max_batch 16, rows of different adapters in one batch;
(a1) the same engine with all 32 requests on one adapter (the goal's reference);
(a2) the same engine on the model builder's ``--slots`` graph (``onnx --graph builder``: fused
    attention, rows right-padded, no position_ids) and its KV pool (rows written in place), when an
    environment of the project has the builder (:mod:`envs`); (a3) the same on the batch cache
    (``kv_pool=False``: the graph extends the cache every step, rows copied when they join or leave);
(b) the single-adapter compact graph (``--default-adapter zero``): the requests grouped by adapter,
    one static batch of 4 per adapter, its ONNX Runtime adapter file active for that group's runs
    (prefill, then decode until the group's longest request is done; the cache is kept as
    OrtValues through IOBinding, as in the engine);
(c) one merged graph per adapter, estimated by running ONE merged graph (adapter 0's) on each of
    the eight groups exactly as (b): a merged graph's cost does not depend on its adapter's
    values; serving eight really needs eight such graphs in memory (their bytes are reported).

Options run back to back in one process (one round: on a busy 2-core machine a round takes
minutes); time-to-first-token percentiles are over the 32 requests. What batching can buy here
is measured apart: one decode call of the slot graph at 4 and 16 rows, and of the compact graph
at 4 rows (interleaved, medians): batching 16 rows instead of 4 can at best raise tokens/s by
16·t(4) / (4·t(16)). Such single decode calls (here and the bare call below) run through an
IOBinding with the slot inputs bound once, as the engine runs its graph (bench/binding.py).
Resident memory: RSS of an engine with 1, 8 and 64 adapters loaded (in-memory random adapters;
malloc_trim before each reading).

On the builder's graph also: one stream alone (its inter-token latency against one bare decode call of
the graph at the same length), and the prefix cache: time to first token of a request whose 500-token
system prompt was never seen (cold) and of the next one with the same system prompt and adapter (warm),
medians of 3 pairs, each pair with a new system prompt.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import psutil
import torch
from transformers import AutoConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import quiet  # noqa: E402
from bench_onnx import random_adapter  # noqa: E402
from binding import BoundGraph  # noqa: E402
from envs import cli_for  # noqa: E402

from prolora_export.engine import Engine, Request  # noqa: E402
from prolora_export.engine.detokenize import TextDecoder  # noqa: E402
from prolora_export.engine.stops import StopStrings  # noqa: E402
from prolora_export.formats.prolora import Adapter, save_adapter  # noqa: E402
from prolora_export.models import ensure_demo_model, kv_cache_shape  # noqa: E402
from prolora_export.onnx.adapters import export_onnx_adapter, load_onnx_adapter, run_options  # noqa: E402
from prolora_export.runtime import inference_session, kernel_library, session_options, share_thread_pool  # noqa: E402

THREADS = 2
#: export name -> (route, CLI flags)
EXPORTS = {"slots": ("optimum", ["--mode", "compact", "--slots"]),
           "compact": ("optimum", ["--mode", "compact", "--default-adapter", "zero"]),
           "merged": ("optimum", ["--mode", "merged"]),
           "slots_builder": ("builder", ["--mode", "compact", "--slots"])}
HYPER = {"r": 8, "unshared_r": 1, "sharing_rate_a": 2, "sharing_rate_b": 2}
ADAPTERS = 8
REQUESTS = 32
MAX_BATCH = 16
TOPICS = ["rivers", "bread", "chess", "volcanoes", "tea", "bicycles", "owls", "glass", "maps", "bees",
          "clocks", "salt", "kites", "moss", "ink", "bridges"]
#: goals of issue 17
GOALS = {"mixed_vs_one_adapter": 0.9, "mixed_vs_per_run": 2.0, "memory_per_adapter": 1.1}


def variant(adapter: Adapter, seed: int) -> Adapter:
    """Another adapter of the same geometry: same config, new random values."""
    gen = torch.Generator().manual_seed(seed)
    return Adapter(adapter.config, {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in adapter.tensors.items()})


def workload(tokenizer, quick: bool) -> list[dict]:
    """32 chat prompts, adapter i % 8, max_new_tokens 12…36 (mean 24; quick: 6…18)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(REQUESTS):
        topic = TOPICS[i % len(TOPICS)]
        words = " ".join(TOPICS[(i + k) % len(TOPICS)] for k in range(int(rng.integers(1, 12))))
        messages = [{"role": "user", "content": f"Write a short note about {topic}. Mention {words}."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        low, high = (6, 18) if quick else (12, 36)
        out.append({"ids": list(ids), "adapter": i % ADAPTERS, "max_new": int(rng.integers(low, high + 1))})
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_engine(engine: Engine, work: list[dict], names: list[str | None], temperature: float = 0.0) -> dict:
    """The workload on the engine, greedy or sampled at ``temperature`` (request i seeded with i)."""
    requests = [Request(prompt_ids=w["ids"], adapter=names[i], max_new_tokens=w["max_new"], ignore_eos=True,
                        temperature=temperature, seed=i)
                for i, w in enumerate(work)]
    engine.stats.step_copied_max = 0  # this run's
    before = engine.stats.as_dict()
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    assert tokens == sum(w["max_new"] for w in work), "every request generates its max_new_tokens"
    after = engine.stats.as_dict()
    delta = {k: after[k] - before[k] for k in after}
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "ttft": [r.time_to_first_token for r in results], "steps": delta["steps"], "prefills": delta["prefills"],
            "copied_per_step_mean": delta["step_copied"] / delta["steps"],
            "copied_per_step_max": after["step_copied_max"],
            "cache_moved": delta["cache_moved"],
            "graph_kv_written_per_step": delta["graph_kv_written"] / delta["steps"],
            "host_to_graph": delta["host_to_graph"]}


class StaticBatch:
    """Static batching on a one-adapter graph: prefill a left-padded group, decode until its longest
    request is done, the cache fed back as OrtValues through IOBinding."""

    def __init__(self, session):
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.past = [n for n in self.inputs if n.startswith("past_key_values")]
        self.present = ["present" + n[len("past_key_values"):] for n in self.past]
        shape = session.get_inputs()[self.inputs.index(self.past[0])].shape
        self.heads, self.head_dim = shape[1], shape[3]

    def _run(self, feeds: dict, past: dict, options):
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")
        for name in self.present:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding, options)
        out = binding.get_outputs()
        return out[0].numpy()[:, -1], dict(zip(self.past, out[1:], strict=True))

    def generate(self, group: list[dict], options) -> tuple[list[list[int]], float]:
        """The group's tokens, and when its first tokens were there (perf_counter)."""
        import onnxruntime as ort

        width = max(len(w["ids"]) for w in group)
        ids = np.zeros((len(group), width), np.int64)
        mask = np.zeros_like(ids)
        for row, w in enumerate(group):
            ids[row, width - len(w["ids"]):] = w["ids"]
            mask[row, width - len(w["ids"]):] = 1
        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((len(group), self.heads, 0, self.head_dim), np.float32))
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)}
        logits, past = self._run(feeds, dict.fromkeys(self.past, empty), options)
        tokens = [[int(t)] for t in logits.argmax(-1)]
        first = time.perf_counter()
        for _ in range(max(w["max_new"] for w in group) - 1):
            positions = mask.sum(1, keepdims=True)
            mask = np.concatenate([mask, np.ones((len(group), 1), np.int64)], axis=1)
            feeds = {"input_ids": np.array([[t[-1]] for t in tokens], np.int64), "attention_mask": mask,
                     "position_ids": positions}
            logits, past = self._run(feeds, past, options)
            for row, t in enumerate(logits.argmax(-1)):
                tokens[row].append(int(t))
        return [t[: w["max_new"]] for t, w in zip(tokens, group, strict=True)], first


def run_grouped(runner: StaticBatch, work: list[dict], options_for) -> dict:
    """Options (b)/(c): one group per adapter, in turn; a request's first token comes with its group's."""
    start = time.perf_counter()
    ttft, tokens = [], 0
    for k in range(ADAPTERS):
        group = [w for w in work if w["adapter"] == k]
        out, first = runner.generate(group, options_for(k))
        ttft += [first - start] * len(group)
        tokens += sum(len(t) for t in out)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "ttft": ttft}


def decode_step_ms(session, batch: int, past: int, calls: int, slots: int = 0, options=None, config=None) -> float:
    """Median ms of one decode call at ``batch`` rows after ``past`` cached tokens (random cache; ``config``
    sizes what a builder graph leaves symbolic), run as the engine runs its graph (:class:`binding.BoundGraph`):
    the slot inputs bound once as OrtValues, the others on each call, the logits brought to numpy."""
    inputs = {i.name: i for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 1000, (batch, 1)), "attention_mask": np.ones((batch, past + 1), np.int64)}
    fixed = {}
    if "position_ids" in inputs:
        feeds["position_ids"] = np.full((batch, 1), past, np.int64)
    for name, inp in inputs.items():
        if name.startswith("past_key_values"):
            heads, size = (inp.shape[1], inp.shape[3]) if isinstance(inp.shape[3], int) else kv_cache_shape(config)
            feeds[name] = rng.standard_normal((batch, heads, past, size)).astype(np.float32)
        elif inp.shape and inp.shape[0] == "slots":
            fixed[name] = rng.standard_normal((slots, *inp.shape[1:])).astype(np.float32) * 0.02
    if "adapter_index" in inputs:
        feeds["adapter_index"] = np.arange(batch, dtype=np.int64) % slots
    graph = BoundGraph(session, fixed)
    times = []
    for _ in range(calls + 1):
        t0 = time.perf_counter()
        graph.run(feeds, options)["logits"].numpy()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def single_stream(engine: Engine, ids: list[int], tokens: int, adapter: str) -> dict:
    """One request alone: its inter-token latency, and one bare decode call of the graph at batch 1 and
    the request's mean length (the same rows, slots and threads; interleaved, medians of 3)."""
    itl, bare = [], []
    config = AutoConfig.from_pretrained(engine.folder)
    for _ in range(3):
        result = engine.generate([Request(prompt_ids=ids, adapter=adapter, max_new_tokens=tokens, ignore_eos=True)])[0]
        itl.append((result.seconds - result.time_to_first_token) / (tokens - 1))
        bare.append(decode_step_ms(engine.session, 1, len(ids) + tokens // 2, tokens, ADAPTERS, None, config) / 1000)
    return {"itl_ms": 1000 * statistics.median(itl), "bare_ms": 1000 * statistics.median(bare),
            "ratio": statistics.median(itl) / statistics.median(bare)}


def prefix_ttft(engine: Engine, tokenizer, adapter: str) -> dict:
    """TTFT of a request with a new 500-token system prompt (cold) and of the next one with the same
    system prompt and adapter (warm); medians of 3 pairs."""
    cold, warm = [], []
    for pair in range(3):
        text = " ".join(f"{TOPICS[(pair + k) % len(TOPICS)]}{k}" for k in range(400))
        system = tokenizer(text).input_ids[:500]
        for times, question in ((cold, "Who are you?"), (warm, "What is this about?")):
            ids = system + tokenizer(question).input_ids
            result = engine.generate([Request(prompt_ids=ids, adapter=adapter, max_new_tokens=1, ignore_eos=True)])[0]
            times.append(result.time_to_first_token)
    return {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm),
            "ratio": statistics.median(warm) / statistics.median(cold), "system_tokens": 500,
            "hits": engine.prefix.hits, "tokens_reused": engine.prefix.tokens_reused}


class TimedRuns:
    """Times an engine session's graph runs while in use (its ``run_with_iobinding`` wrapped on the session
    object itself, so every holder of the session is timed)."""

    def __init__(self, session):
        self.session, self.seconds = session, 0.0

    def __enter__(self) -> TimedRuns:
        run = self.session.run_with_iobinding

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return run(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        self.session.run_with_iobinding = timed
        return self

    def __exit__(self, *exc) -> None:
        del self.session.run_with_iobinding  # the class's method again


def long_streams(engine: Engine, tokenizer, adapter: str, rows: int = 4, tokens: int = 1900, window: int = 256) -> dict:
    """``rows`` streams generating ``tokens`` tokens of text together: the median step, and the engine's own
    time per step (the step less its graph run: sampling, text, events), over steps 10 to 10 + ``window`` and
    over the last ``window`` steps. The engine's own time stays flat when each token's text costs the same
    however long the stream (a whole-text decode per token grows with the length)."""
    prompts = [tokenizer(f"Tell a long story about {TOPICS[k]}.").input_ids for k in range(rows)]
    with TimedRuns(engine.session) as timed:
        for ids in prompts:
            engine.submit(Request(prompt_ids=ids, adapter=adapter, max_new_tokens=tokens, ignore_eos=True))
        steps, own, finished = [], [], 0
        while finished < rows:
            run_before, start = timed.seconds, time.perf_counter()
            events = engine.step()
            steps.append(time.perf_counter() - start)
            own.append(steps[-1] - (timed.seconds - run_before))
            finished += sum(e.finished for e in events)
    early, late = slice(10, 10 + window), slice(-window - 1, -1)
    ms = {f"{name}_ms_{part}": 1000 * statistics.median(values[where])
          for name, values in (("step", steps), ("own", own)) for part, where in (("early", early), ("late", late))}
    return {"rows": rows, "tokens": tokens, "window": window, **ms}


def text_costs(tokenizer, tokens: int = 4096, stop_chars: int = 100_000) -> dict:
    """What one row's token costs the engine in text, at the end of a ``tokens``-token generation (the demo
    tokenizer over this repository's README): its piece of text (:class:`TextDecoder`), and matching four
    ``stop_chars``-character stop strings (:class:`StopStrings`; the one-time set-up apart); µs, medians of
    the last 256 tokens."""
    ids = tokenizer((HERE.parent / "README.md").read_text(), add_special_tokens=False).input_ids[:tokens]
    started = time.perf_counter()
    stops = StopStrings(["b" * stop_chars] * 4)
    setup = time.perf_counter() - started
    seen: list[int] = []
    decoder, costs = TextDecoder(tokenizer, seen), []
    for token in ids:
        seen.append(token)
        start = time.perf_counter()
        stops.feed(decoder.update())
        costs.append(time.perf_counter() - start)
    return {"tokens": len(ids), "stop_chars": stop_chars, "us_per_token": 1e6 * statistics.median(costs[-256:]),
            "stop_setup_ms": 1000 * setup}


def long_prompt(folder: Path, adapters: dict, prompt_tokens: int = 8000, chunk: int = 512) -> dict:
    """An 8k-token prompt joining two running streams on the KV pool: peak RSS growth during its prefill
    against its own KV bytes, and the streams' longest gap between tokens meanwhile against the step time
    (one decode of the streams plus one prefill chunk)."""
    engine = Engine(folder, adapters, max_batch=4, max_cached_tokens=4 * 8192, max_prefill_tokens=chunk,
                    threads=THREADS, tokenizer=None, huge_pages="wait")
    name = next(iter(adapters))
    streams = [Request(prompt_ids=[1 + k, 2, 3, 4, 5], adapter=name, max_new_tokens=2000, ignore_eos=True)
               for k in range(2)]
    for request in streams:
        engine.submit(request)
    for _ in range(4):  # both streams running
        engine.step()
    rng = np.random.default_rng(1)
    long = Request(prompt_ids=rng.integers(10, 40000, prompt_tokens).tolist(), adapter=name, max_new_tokens=2,
                   ignore_eos=True)
    before = peak = psutil.Process().memory_info().rss  # untrimmed, as the readings below
    engine.submit(long)
    gaps, steps, last = [], [], time.perf_counter()
    first_token = False
    while not first_token:
        start = time.perf_counter()
        events = engine.step()
        now = time.perf_counter()
        steps.append(now - start)
        if any(e.request_id == streams[0].request_id and e.token_id is not None for e in events):
            gaps.append(now - last)
            last = now
        first_token = any(e.request_id == long.request_id for e in events)
        peak = max(peak, psutil.Process().memory_info().rss)
    for request in streams:
        engine.cancel(request.request_id)
    engine.step()
    kv = prompt_tokens * engine.pool.token_bytes
    return {"prompt_tokens": prompt_tokens, "chunk": chunk, "rss_growth_bytes": peak - before, "kv_bytes": kv,
            "chunks": len(steps), "step_ms_median": 1000 * statistics.median(steps),
            "step_ms_max": 1000 * max(steps), "stream_gap_ms_max": 1000 * max(gaps),
            "stream_gap_ms_median": 1000 * statistics.median(gaps)}


def rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def memory(slots_dir: Path, template: Adapter) -> dict:
    """RSS of an engine with 1, 8 and 64 adapters loaded, and the shards' bytes of one adapter."""
    engine = Engine(slots_dir, max_batch=4, threads=THREADS, huge_pages="wait")
    shard_bytes = engine.slots.shard_bytes
    readings = {}
    for count in (1, 8, 64):
        while len(engine.adapters) < count:
            engine.load_adapter(f"m{len(engine.adapters)}", variant(template, 1000 + len(engine.adapters)))
        # one short request so the slots are read by a run, then the reading
        engine.generate([Request(prompt_ids=[1, 2, 3], adapter="m0", max_new_tokens=2, ignore_eos=True)])
        readings[str(count)] = rss()
    per_8 = (readings["8"] - readings["1"]) / 7
    per_64 = (readings["64"] - readings["8"]) / 56
    return {"rss_bytes": readings, "shard_bytes": shard_bytes, "per_adapter_1_to_8": per_8,
            "per_adapter_8_to_64": per_64, "ratio": per_64 / shard_bytes, "slot_capacity": engine.slots.capacity}


def run(work_dir: Path, quick: bool, reuse: bool = False) -> dict:
    share_thread_pool(THREADS)
    base = ensure_demo_model(quiet=True)
    started = time.perf_counter()
    first = random_adapter(base, work_dir / "adapter0", seed=0, **HYPER)
    adapters = [first] + [variant(first, seed) for seed in range(1, ADAPTERS)]
    folders = []
    for k, adapter in enumerate(adapters):
        folder = work_dir / f"adapter{k}"
        if k:
            save_adapter(folder, adapter, force=True)
        export_onnx_adapter(folder, work_dir / f"adapter{k}.onnx_adapter", force=True)
        folders.append(folder)
    exports = {}
    for name, (route, flags) in EXPORTS.items():
        cli = cli_for(route)
        if cli is None:
            if name == "slots_builder":
                print("no environment has the model builder: the builder-graph engine run is skipped", flush=True)
                continue
            sys.exit(f"no environment of the project exports {route} graphs (see the Makefile)")
        exports[name] = work_dir / name
        if reuse and (work_dir / name / "model.onnx").is_file():
            continue
        t0 = time.perf_counter()
        subprocess.run([str(cli), "onnx", "--graph", route, "--base", str(base), "--adapter", str(folders[0]),
                        "--out", str(exports[name]), "--force", *flags], check=True, stdout=subprocess.DEVNULL)
        print(f"exported {name} ({cli.parent.parent.name}) in {time.perf_counter() - t0:.0f} s", flush=True)
    names = [f"adapter{k}" for k in range(ADAPTERS)]
    engine = Engine(exports["slots"], dict(zip(names, folders, strict=True)), max_batch=MAX_BATCH, threads=THREADS,
                    huge_pages="wait")
    builder = batch_cache = None
    if "slots_builder" in exports:  # its folder's tokenizer files may be another transformers' format: prompts are ids
        builder, batch_cache = (Engine(exports["slots_builder"], dict(zip(names, folders, strict=True)),
                                       max_batch=MAX_BATCH, threads=THREADS, tokenizer=engine.tokenizer, kv_pool=pool,
                                       huge_pages="wait")
                                for pool in (True, False))
    work = workload(engine.tokenizer, quick)
    mixed = [names[w["adapter"]] for w in work]
    single = [names[0]] * len(work)
    compact = StaticBatch(inference_session(exports["compact"], threads=THREADS, huge_pages="wait"))
    merged = StaticBatch(inference_session(exports["merged"], threads=THREADS, huge_pages="wait"))
    loras = [load_onnx_adapter(work_dir / f"adapter{k}.onnx_adapter") for k in range(ADAPTERS)]
    rounds = 1
    # what batching can buy on this machine: one decode step at 4 rows (a group of (b)) and 16 (a)
    steps = {}
    function_body = inference_session(exports["compact"], options=session_options("cpu", threads=THREADS,
                                                                                  kernel="function"))
    calls = [("slots_b4", engine.session, 4, None), ("slots_b16", engine.session, 16, None),
             ("compact_b4", compact.session, 4, run_options(loras[0])),
             ("compact_function_b4", function_body, 4, run_options(loras[0]))]
    if builder is not None:
        calls += [("builder_slots_b4", builder.session, 4, None), ("builder_slots_b16", builder.session, 16, None)]
    config = AutoConfig.from_pretrained(base)
    for _ in range(2 if quick else 3):  # interleaved
        for key, sess, batch, opts in calls:
            with quiet.measure(f"decode step {key}"):
                steps.setdefault(key, []).append(decode_step_ms(sess, batch, 48, 3, ADAPTERS, opts, config))
    step_ms = {k: statistics.median(v) for k, v in steps.items()}
    del function_body
    library = kernel_library("cpu", "auto")
    kernels = {"library": library.name if library else None,
               "native_ops": [op for op in ("RotatedShardLoRA", "RotatedShardLoRASlots")
                              if library and op.encode() + b"\0" in library.read_bytes()]}
    runs: dict[str, list[dict]] = {"mixed": [], "one_adapter": [], "per_run": [], "merged": []}
    if builder is not None:
        runs["builder_mixed"], runs["builder_sampled"], runs["builder_batch_cache"] = [], [], []
        run_engine(builder, work[:4], mixed[:4])  # warm-up
        run_engine(batch_cache, work[:4], mixed[:4])
    run_engine(engine, work[:4], mixed[:4])  # warm-up
    for r in range(rounds):
        with quiet.measure(f"round {r + 1} mixed"):
            runs["mixed"].append(run_engine(engine, work, mixed))
        if builder is not None:
            with quiet.measure(f"round {r + 1} builder_mixed"):
                runs["builder_mixed"].append(run_engine(builder, work, mixed))
            with quiet.measure(f"round {r + 1} builder_sampled"):  # OpenAI's default temperature
                runs["builder_sampled"].append(run_engine(builder, work, mixed, temperature=1.0))
            with quiet.measure(f"round {r + 1} builder_batch_cache"):
                runs["builder_batch_cache"].append(run_engine(batch_cache, work, mixed))
        with quiet.measure(f"round {r + 1} one_adapter"):
            runs["one_adapter"].append(run_engine(engine, work, single))
        with quiet.measure(f"round {r + 1} per_run"):
            runs["per_run"].append(run_grouped(compact, work, lambda k: run_options(loras[k])))
        with quiet.measure(f"round {r + 1} merged"):
            runs["merged"].append(run_grouped(merged, work, lambda k: None))
        speeds = ", ".join(f"{k} {v[-1]['tokens_per_s']:.1f} tok/s" for k, v in runs.items())
        print(f"round {r + 1}/{rounds}: {speeds}", flush=True)
    summary = {}
    for key, values in runs.items():
        summary[key] = {
            "tokens_per_s": statistics.median(v["tokens_per_s"] for v in values),
            "ttft_p50_s": statistics.median(percentile(v["ttft"], 50) for v in values),
            "ttft_p95_s": statistics.median(percentile(v["ttft"], 95) for v in values),
            "seconds": statistics.median(v["seconds"] for v in values),
            "tokens": values[0]["tokens"],
        }
    extra = {}
    if builder is not None:
        with quiet.measure("single stream"):
            extra["single_stream"] = single_stream(builder, work[0]["ids"], 32, names[0])
        with quiet.measure("prefix cache"):
            extra["prefix"] = prefix_ttft(builder, engine.tokenizer, names[1])
        if not quick:
            with quiet.measure("long streams"):
                extra["long_streams"] = long_streams(builder, engine.tokenizer, names[2])
            extra["text_costs"] = text_costs(engine.tokenizer)
            with quiet.measure("long prompt"):
                extra["long_prompt"] = long_prompt(exports["slots_builder"], {names[0]: folders[0]})
    for key in [k for k in ("mixed", "one_adapter", "builder_mixed", "builder_sampled", "builder_batch_cache")
                if k in runs]:
        for field in ("steps", "prefills", "copied_per_step_mean", "copied_per_step_max", "cache_moved",
                      "graph_kv_written_per_step"):
            summary[key][field] = runs[key][-1][field]
    del engine, builder, batch_cache, compact, merged
    mem = memory(exports["slots"], first)
    merged_bytes = sum(p.stat().st_size for p in exports["merged"].iterdir() if "onnx" in p.name)
    ratios = {
        "mixed_vs_one_adapter": summary["mixed"]["tokens_per_s"] / summary["one_adapter"]["tokens_per_s"],
        "mixed_vs_per_run": summary["mixed"]["tokens_per_s"] / summary["per_run"]["tokens_per_s"],
        "mixed_vs_merged": summary["mixed"]["tokens_per_s"] / summary["merged"]["tokens_per_s"],
        **({"builder_mixed_vs_mixed": summary["builder_mixed"]["tokens_per_s"] / summary["mixed"]["tokens_per_s"],
            "pool_vs_batch_cache": (summary["builder_mixed"]["tokens_per_s"]
                                    / summary["builder_batch_cache"]["tokens_per_s"]),
            "sampled_vs_greedy": (summary["builder_sampled"]["tokens_per_s"]
                                  / summary["builder_mixed"]["tokens_per_s"])}
           if "builder_mixed" in summary else {}),
        "memory_per_adapter": mem["ratio"],
    }
    return {
        "settings": {"quick": quick, "rounds": rounds, "threads": THREADS, "adapters": ADAPTERS, "requests": REQUESTS,
                     "max_batch": MAX_BATCH, "hyper": HYPER, "max_new_tokens": [w["max_new"] for w in work],
                     "prompt_tokens": [len(w["ids"]) for w in work]},
        "summary": summary, "runs": runs, "memory": mem, "merged_graph_bytes": merged_bytes, "decode_step_ms": step_ms,
        **extra,
        "kernels": kernels,
        "ratios": ratios, "goals": GOALS, "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, shorter generations")
    parser.add_argument("--work", type=Path, default=None, help="keep the exports in this folder")
    parser.add_argument("--reuse", action="store_true", help="with --work: reuse its exports (same adapters)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite ENGINE.md from the last engine.json")
    quiet.add_argument(parser)
    args = parser.parse_args()
    if args.markdown_only:
        results = json.loads((HERE / "engine.json").read_text())
    else:
        guard = quiet.LoadGuard("engine", THREADS, allow_load=args.allow_load)
        guard.start()
        if args.work is not None:
            results = run(args.work, args.quick, args.reuse)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
                results = run(Path(tmp), args.quick)
        guard.save(results, HERE / "engine.json")
    quiet.write_page(HERE / "ENGINE.md", markdown(results), results)
    print((HERE / "ENGINE.md").read_text())


def mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def markdown(r: dict) -> str:
    s, q, g, mem = r["summary"], r["ratios"], r["goals"], r["memory"]
    command = "python bench/bench_engine.py" + (" --quick" if r["settings"]["quick"] else "")
    labels = {
        "mixed": "(a) engine, mixed adapters (slot graph, continuous batching)",
        "one_adapter": "(a1) engine, all 32 requests on one adapter",
        "per_run": "(b) compact graph, one adapter per run (grouped, ORT adapter switched)",
        "merged": "(c) merged graph per adapter (one merged graph run per group, estimate)",
        "builder_mixed": "(a2) engine, mixed adapters, on the model builder's slot graph and its KV pool",
        "builder_sampled": "(a2s) as (a2), sampled at temperature 1 (OpenAI's default) instead of greedy",
        "builder_batch_cache": "(a3) as (a2) on the batch cache (kv_pool=False: rows copied on join/leave)",
    }
    rows = "\n".join(
        f"| {labels[k]} | {v['tokens_per_s']:.1f} | {v['ttft_p50_s']:.2f} | {v['ttft_p95_s']:.2f} "
        f"| {v['seconds']:.1f} |"
        for k, v in s.items()
    )
    goals = "\n".join(
        f"| {what} | {value:.2f}× | {mark(ok)} |"
        for what, value, ok in (
            (f"mixed throughput ≥ {g['mixed_vs_one_adapter']}× all-on-one-adapter", q["mixed_vs_one_adapter"],
             q["mixed_vs_one_adapter"] >= g["mixed_vs_one_adapter"]),
            (f"mixed throughput ≥ {g['mixed_vs_per_run']}× one adapter per run (b)", q["mixed_vs_per_run"],
             q["mixed_vs_per_run"] >= g["mixed_vs_per_run"]),
            (f"resident memory per loaded adapter ≤ {g['memory_per_adapter']}× its shards' bytes",
             q["memory_per_adapter"], q["memory_per_adapter"] <= g["memory_per_adapter"]),
        )
    )
    mixed = s["mixed"]
    ms = r["decode_step_ms"]
    k = r["kernels"]
    kernels = (f"`{k['library']}` implemented {', '.join(k['native_ops']) or 'no op'}" if k["library"]
               else "was not built")
    bound = 16 * ms["compact_b4"] / (4 * ms["slots_b16"])
    rss = mem["rss_bytes"]
    kib = 1024
    builder = ""
    if "builder_mixed_vs_mixed" in q:
        one, pre = r["single_stream"], r["prefix"]
        builder = (f"| (informative) engine on the builder's slot graph (a2) vs on optimum's (a) | "
                   f"{q['builder_mixed_vs_mixed']:.2f}× | — |\n"
                   f"| (informative) KV pool (a2) vs batch cache (a3), same graph | "
                   f"{q['pool_vs_batch_cache']:.2f}× | — |\n"
                   + (f"| (informative) sampled at temperature 1 (a2s) vs greedy (a2) | "
                      f"{q['sampled_vs_greedy']:.2f}× | — |\n" if "sampled_vs_greedy" in q else "") + "\n"
                   f"One decode call of the builder's slot graph after 48 cached tokens: "
                   f"{ms['builder_slots_b4']:.0f} ms at 4 rows, {ms['builder_slots_b16']:.0f} ms at 16 rows. "
                   f"One stream alone on it: {one['itl_ms']:.1f} ms per token against {one['bare_ms']:.1f} ms for "
                   f"one bare decode call ({one['ratio']:.2f}×). Prefix cache, {pre['system_tokens']}-token system "
                   f"prompt: time to first token {1000 * pre['cold_s']:.0f} ms cold, {1000 * pre['warm_s']:.0f} ms "
                   f"warm ({pre['ratio']:.2f}×; {pre['hits']} hits reused {pre['tokens_reused']} tokens).\n")
        if "long_prompt" in r:
            lp = r["long_prompt"]
            builder += (f"\nAn {lp['prompt_tokens']}-token prompt joining two running streams "
                        f"(chunks of {lp['chunk']}): "
                        f"peak RSS grew {lp['rss_growth_bytes'] / 2**20:.0f} MiB during its prefill, its own KV being "
                        f"{lp['kv_bytes'] / 2**20:.0f} MiB; {lp['chunks']} steps of {lp['step_ms_median']:.0f} ms "
                        f"(median; max {lp['step_ms_max']:.0f}), the streams' longest gap between tokens "
                        f"{lp['stream_gap_ms_max']:.0f} ms.\n")
        if "long_streams" in r:
            ls = r["long_streams"]
            builder += (f"\n{ls['rows']} streams of {ls['tokens']} tokens of text together: a step took "
                        f"{ls['step_ms_early']:.1f} ms near their start and {ls['step_ms_late']:.1f} ms over their "
                        f"last {ls['window']} (attention over the longer cache); of that, the engine's own time "
                        f"(sampling, text, events: the step less its graph run) {ls['own_ms_early']:.2f} ms and "
                        f"{ls['own_ms_late']:.2f} ms.\n")
        if "text_costs" in r:
            tc = r["text_costs"]
            builder += (f"\nA row's token at the end of a {tc['tokens']}-token text: its piece of text and four "
                        f"{tc['stop_chars']:,}-character stop strings matched, {tc['us_per_token']:.1f} µs "
                        f"(the stop strings' set-up {tc['stop_setup_ms']:.0f} ms once per request).\n")
    return f"""# Engine: many adapters in one batch (`bench_engine.py`)

`{command}`: {r['settings']['requests']} requests over {r['settings']['adapters']} adapters (r=8, u=1, m=n=2, seven
projections), demo model fp32, ORT CPU with {r['settings']['threads']} threads, max_batch {r['settings']['max_batch']},
greedy, {sum(r['settings']['max_new_tokens'])} generated tokens per option, prompts of
{min(r['settings']['prompt_tokens'])}–{max(r['settings']['prompt_tokens'])} tokens; {r['settings']['rounds']} round, the
options back to back in one process. All requests arrive at t = 0; time to first token (TTFT) counts from then.

| option | generated tokens/s | TTFT p50 (s) | TTFT p95 (s) | wall (s) |
|---|---|---|---|---|
{rows}

| goal (issue 17) | measured | met |
|---|---|---|
{goals}
| (informative) mixed vs merged graph per adapter (c) | {q['mixed_vs_merged']:.2f}× | — |
{builder}
One decode call after 48 cached tokens: slot graph {ms['slots_b4']:.0f} ms at 4 rows, {ms['slots_b16']:.0f} ms at
16 rows; compact graph {ms['compact_b4']:.0f} ms at 4 rows ({ms['compact_function_b4']:.0f} ms with its function body
instead of the native kernel). Sessions are built by `runtime.inference_session` (kernel `auto`): the native
library {kernels}; an op it lacks runs its ONNX function body. So 16 mixed rows instead of 4 rows of one adapter
can raise decode tokens/s by at most {bound:.2f}× on this machine (prefill, the same work in every option, is
not sped up by batching at all).

Option (c) was not run with eight merged graphs: one merged graph (adapter 0's) ran each adapter's
group, which costs what that adapter's own merged graph would; serving eight that way needs eight
graphs of {r['merged_graph_bytes'] / 2**20:.0f} MiB each ({8 * r['merged_graph_bytes'] / 2**30:.1f} GiB).
Options (b) and (c) use static batches (a group runs until its longest request is done) and
their graphs return every position's logits on a prompt; the slot graph returns the last
position's only.

Resident memory (RSS, engine with its session): {rss['1'] / 2**20:.0f} MiB with 1 adapter,
{rss['8'] / 2**20:.0f} MiB with 8, {rss['64'] / 2**20:.0f} MiB with 64
(slot capacity {mem['slot_capacity']}). One adapter's shards: {mem['shard_bytes'] / kib:.0f} KiB; measured per adapter
{mem['per_adapter_8_to_64'] / kib:.0f} KiB from 8 to 64 adapters ({mem['per_adapter_1_to_8'] / kib:.0f} KiB from 1 to 8,
where the slot table's doublings and allocator noise weigh more).

Bytes the engine copies per decode step (mixed run): {mixed['copied_per_step_mean'] / kib:.1f} KiB on average,
{mixed['copied_per_step_max'] / kib:.0f} KiB at most (ids, attention mask, positions, adapter indices; plus cache
rows compacted in steps where a request leaves); KV bytes moved to merge joining prefills or drop finished rows:
{mixed['cache_moved'] / 2**20:.0f} MiB over the run ({mixed['prefills']} prefills, {mixed['steps']} decode steps).
The cache and the slots are fed as OrtValues (IOBinding), never copied per step; the graph itself writes
{mixed['graph_kv_written_per_step'] / 2**20:.1f} MiB of present KV per step (its past + new token concatenation).
"""


if __name__ == "__main__":
    main()
