"""Decoder graphs of issue 29: today's optimum graph beside ONNX Runtime GenAI's model builder (merged,
compact with the native kernel and with its function body, compact on three unpacked Q/K/V, slots),
fp32 and int4, and llama.cpp's llama-bench on the same model. Writes bench/GRAPHS.md and bench/graphs.json.

    python bench/bench_graphs.py [--quick] [--full] [--work DIR [--reuse]] [--markdown-only] [--allow-load]

Models: the demo model (SmolLM2-135M); with ``--full`` also bench_kernel's random Llama of hidden 2048
(``tools/make_synthetic_checkpoint.py``: 2 blocks, MLP 5632, 16 heads / 4 KV heads, vocab 4096; the demo's
tokenizer files copied in, as the builder wants them). One random PRoLoRA adapter per model (bench_kernel's:
r=8, u=1, m=n=2, seven projections). Scale, with ``--full``: a random Llama of TinyLlama-1.1B's shape (hidden
2048, 22 blocks, MLP 5632, 32 heads / 4 KV heads, vocab 32000; 4.4 GB as fp32) exported compact and merged at
int4 (time, peak RSS), and their decode at batch 1 and 16 and a 128-token prefill, timed as below.

Exports, each a subprocess of the environment that has its route, timed (wall) with its peak RSS (the sum
over the process tree, polled every 50 ms, and the largest single process's from ``/usr/bin/time``):
``prolora-export onnx --graph optimum --mode merged`` (int4: ``prolora-export quantize --bits 4`` of that
folder, the route before the builder) and ``prolora-export onnx --graph builder --mode merged | --mode compact |
--mode compact --slots`` (int4: ``--quantize int4``, the builder's own MatMulNBits), each with the CLI of the
venv that has the route (:mod:`envs`); the compact graph spliced into three unpacked Q/K/V MatMuls through
the Python API in the builder's environment (``build_compact(…, packed=False)``, the route before the packed
splice became the default).

Latency, in this process with ONNX Runtime (wall clock), all graphs of one model and precision loaded at once
and interleaved call kind by call kind, the graphs' order rotated every round; each figure is the median over
rounds of that round's figure, and a ratio of two graphs (the goals, the page's ratio columns) the median over
rounds of that round's ratio (:func:`paired`). All sessions run on one shared pool of 2 intra-op threads
(``runtime.share_thread_pool``: with a pool each, the idle sessions' spinning threads slowed the running one,
by up to 1.9x), and each session's loaded memory is rebuilt as huge pages (``huge_pages="wait"``, as the
engine does: in 4 KiB pages, two sessions of the same graph ran up to 8 % apart):
- decode: a plain greedy loop at batch 1 and 16 feeding present → past, starting from a random cache of
  128 tokens; a round's figure is the median ms of its steps (the first step of each round not counted);
- prefill: one call of 32/128/512 prompt tokens on an empty cache. The builder's graphs compute the last
  position's logits only (their ``logits_start`` input fed, as the engine runs a prefill, and as llama.cpp's
  prompt processing outputs the last token's); optimum's graphs have no such input and compute every position's.
Every graph runs through an IOBinding (:mod:`binding`), as the engine runs its graph: inputs that never change
(the slot graph's ~840 shard inputs) are bound once as OrtValues; input_ids, attention_mask, the past (the
previous call's presents, fed back as OrtValues) and adapter_index are bound on each call; a call's time covers
that binding, the run and the logits brought to numpy. (Fed as numpy to ``session.run``, the slot graph's
shard inputs would be converted on every call, a cost of Python's feeds, not of the graph.) Graph inputs as
each graph names them: optimum's take ``position_ids``, the builder's do not; the slot graph gets one random
slot and ``adapter_index`` 0 on every row. ``compact_kernel`` and ``slots`` run the native
kernel (:mod:`prolora_export.runtime`, ``kernel="native"``), ``compact_body`` the same file's function body;
``compact_unpacked_kernel`` is the compact graph spliced into three Q/K/V MatMuls (``fuse_qkv=false``)
instead of the builder's packed one (as in the merged graph, and the default), native kernel.
Sessions with the native kernel load each adapted projection's nodes fused into one
(:mod:`prolora_export.native.fuse`), as the engine's do; ``compact_unfused`` runs the same file with its nodes
as written (the op per module, Pad/Concat/Add), as onnxruntime-genai runs it.
``compact_null`` and ``compact_touch`` run the compact graph, fused, on bench_kernel's measurement builds of the
library (``PROLORA_NULL_KERNEL``: Y = Base, shards never read; ``PROLORA_TOUCH_KERNEL``: one read per cache
line of every shard, then Y = Base): merged → null → touch → kernel splits the compact graph's extra decode
time into ONNX Runtime running the fused adapter nodes, reading the shards, and the arithmetic.

llama.cpp (only when bench_llamacpp's cached build exists; never built here): the model as GGUF f32
(bench_llamacpp's conversion, GPT-2 BPE vocabulary forced) and its Q4_0 copy, the base weights (the same
shapes and work as the merged graphs); ``llama-bench -t 2``: generation at depth 128 (``-d 128``) beside our
batch-1 decode, prompt processing of 32/128/512 tokens beside our prefill, one run (``-r 1``) in every round of
the graphs of its precision (f32 with fp32, Q4_0 with int4), alternately after and before them, so
that its ratios pair round by round as the graphs' do (run after all rounds, it had paired a minute of
this host with another). A synthetic model gets the demo's
tokenizer cut to its smaller vocabulary, which the converter needs; a model it still cannot convert is skipped
with the reason.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import quiet  # noqa: E402
from binding import BoundGraph, as_value  # noqa: E402
from envs import cli_for  # noqa: E402
from llama_bench import LlamaBench  # noqa: E402

THREADS = 2
PAST = 128
BATCHES = (1, 16)
PROMPTS = (32, 128, 512)
PRECISIONS = ("fp32", "int4")
#: the llama.cpp GGUF timed beside each precision's graphs
GGUF = {"fp32": "f32", "int4": "q4_0"}
#: rounds of interleaved calls (llama-bench: one run a round) and decode steps per round: by --quick
ROUNDS = {True: 3, False: 7}
STEPS = {True: 6, False: 12}
#: the command-line tools of the two routes (optimum needs transformers < 4.58, the builder transformers 5)
CLI = {route: cli_for(route) or Path(f"no-{route}-environment") for route in ("optimum", "builder")}
#: exported folders, in export order (the optimum int4 folder is quantized from the fp32 one)
EXPORTS = tuple((graph, precision) for precision in PRECISIONS
                for graph in ("optimum_merged", "merged", "compact", "compact_unpacked", "slots"))
#: timed graph -> (export it runs, how its adapter op runs: runtime.KERNELS, or a measurement build of the
#: native library: bench_kernel.VARIANTS)
VARIANTS = {"optimum_merged": ("optimum_merged", "function"), "merged": ("merged", "function"),
            "compact_kernel": ("compact", "native"), "compact_body": ("compact", "function"),
            "compact_unpacked_kernel": ("compact_unpacked", "native"), "slots": ("slots", "native"),
            "compact_unfused": ("compact", "unfused"), "compact_null": ("compact", "null"),
            "compact_touch": ("compact", "touch")}
LABELS = {"optimum_merged": "optimum merged (today)", "merged": "builder merged",
          "compact_kernel": "builder compact, native kernel", "compact_body": "builder compact, function body",
          "compact_unpacked_kernel": "builder compact on unpacked Q/K/V, native kernel",
          "slots": "builder slots (1 slot, index 0), native kernel", "llamacpp": "llama.cpp llama-bench",
          "compact_unfused": "builder compact, native kernel, nodes as in the file (genai)",
          "compact_null": "builder compact, measurement kernel: Y = Base", "compact_touch":
          "builder compact, measurement kernel: shards read, Y = Base"}
METRICS = (*(f"decode_b{b}" for b in BATCHES), *(f"prefill_{n}" for n in PROMPTS))
EXPORT_LABELS = {"optimum_merged": "optimum merged", "merged": "builder merged", "compact": "builder compact",
                 "compact_unpacked": "builder compact, unpacked Q/K/V", "slots": "builder slots"}
#: issue 29's scale check (``--full``): a random Llama of TinyLlama-1.1B's shape (make_synthetic_checkpoint.py),
#: its int4 exports as shipped (compact, and merged for the ratio), their decode and a 128-token prefill
SCALE_NAME = "tinyllama-1.1b"
SCALE_SHAPE = ("--hidden", "2048", "--intermediate", "5632", "--heads", "32", "--kv-heads", "4", "--layers", "22",
               "--vocab", "32000")
SCALE_EXPORTS = (("compact", "int4"), ("merged", "int4"))
SCALE_GRAPHS = {"merged": ("merged", "function"), "compact_kernel": ("compact", "native")}
SCALE_METRICS = ("decode_b1", "decode_b16", "prefill_128")
#: the unpacked compact export: the Python API in the builder's environment (argv: base, adapter, out, precision)
UNPACKED_EXPORT = ("import sys; from prolora_export.onnx.graph.splice import build_compact; "
                   "print(build_compact(*sys.argv[1:5], packed=False, force=True).summary())")
#: export options whose value is a path (left out of the command shown)
PATH_OPTIONS = ("--base", "--adapter", "--out")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: llama.cpp's name for the demo tokenizer's pre-tokenizer, given to its converter: the demo's cut to a synthetic
#: model's vocabulary (:func:`fitted_tokenizer`) no longer has the hash it recognizes
PRE_TOKENIZER = "smollm"
RSS_POLL_S = 0.05
TIME = Path("/usr/bin/time")
RSS_BOUND = 2.5
#: the page's method text on how the graphs were fed, by the run's ``io_binding`` setting (absent before it)
FEED_TEXT = {
    True: "Every graph runs through an IOBinding, as the engine runs it: the slot graph's ~840 shard inputs are "
          "bound once as OrtValues, input_ids, attention_mask, the past (the last presents) and adapter_index on "
          "each call; a call's time covers that binding, the run and the logits as numpy. ",
    False: "Inputs fed as numpy arrays to `session.run` (the slot graph's ~840 shard inputs converted on every "
           "call, which the slots figures include). "}


# ----------------------------------------------------------------------------------------------- exports

def fp32_bytes(folder: Path) -> int:
    """The model's parameters as float32 bytes, from its safetensors headers (no tensor is read)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(4 * math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    if not total:
        raise SystemExit(f"no safetensors weights in {folder}")
    return total


def export_command(graph: str, precision: str, base: Path, adapter: Path, out: Path, optimum_fp32: Path) -> list[str]:
    """The CLI call that writes one export (see the module docstring)."""
    if graph == "optimum_merged":
        if precision == "int4":
            return [str(CLI["optimum"]), "quantize", str(optimum_fp32), "--out", str(out), "--bits", "4", "--force"]
        return [str(CLI["optimum"]), "onnx", "--graph", "optimum", "--mode", "merged", "--base", str(base),
                "--adapter", str(adapter), "--out", str(out), "--force"]
    if graph == "compact_unpacked":
        return [str(CLI["builder"].parent / "python"), "-c", UNPACKED_EXPORT, str(base), str(adapter), str(out),
                precision]
    mode = "merged" if graph == "merged" else "compact"
    command = [str(CLI["builder"]), "onnx", "--graph", "builder", "--mode", mode, "--base", str(base),
               "--adapter", str(adapter), "--out", str(out), "--force"]
    if graph == "slots":
        command.append("--slots")
    if precision != "fp32":
        command += ["--quantize", precision]
    return command


def shown_command(command: list[str]) -> str:
    """The CLI call without the executable, paths and --force: what a reader compares between exports (the
    unpacked export: its Python call)."""
    if command[1] == "-c":
        return f"python: build_compact(base, adapter, out, {command[-1]!r}, packed=False)"
    shown = []
    for arg in command[1:]:
        if arg.startswith("/") or arg == "--force":
            if shown and shown[-1] in PATH_OPTIONS:
                shown.pop()
            continue
        shown.append(arg)
    return " ".join(shown)


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants now (0 once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_measured(command: list[str], log: Path) -> dict:
    """Run ``command`` (output to ``log``) under ``/usr/bin/time``: wall seconds, peak RSS of its process tree
    (polled) and the largest single process's peak (time's %M; ``wait4`` here would also count this process's
    own RSS, which a forked child starts from); one line and the log's tail if it fails."""
    if not TIME.is_file():
        raise SystemExit(f"measuring an export's peak RSS needs {TIME} (apt-get install time)")
    maxrss = log.with_suffix(".maxrss")
    start = time.perf_counter()
    peak = 0
    with open(log, "w") as out:
        proc = subprocess.Popen([str(TIME), "-f", "%M", "-o", str(maxrss), *command], stdout=out,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(RSS_POLL_S)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[1:4])} … failed (exit {proc.returncode}); the end of {log}:\n"
                         + log.read_text()[-3000:])
    largest = int(maxrss.read_text().split()[-1]) * 1024  # kB; the tree held at least its largest process
    return {"seconds": seconds, "peak_rss": max(peak, largest), "largest_process_rss": largest}


def synthetic_model(work: Path, demo: Path, reuse: bool, name: str = "synthetic-2048-model",
                    shape: tuple[str, ...] | None = None) -> Path:
    """A random Llama (bench_kernel's hidden-2048 one unless ``shape`` gives make_synthetic_checkpoint's options),
    with the demo's tokenizer cut to its vocabulary (the builder requires one; :func:`fitted_tokenizer`)."""
    from bench_kernel import SYNTHETIC

    out = work / name
    if not (reuse and (out / "config.json").is_file()):
        print(f"{name} checkpoint …", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic_checkpoint.py"), *(shape or SYNTHETIC),
                        "--out", str(out), "--force"], check=True, capture_output=True)
    fitted_tokenizer(demo, out, json.loads((out / "config.json").read_text())["vocab_size"])
    return out


def fitted_tokenizer(demo: Path, out: Path, vocab: int) -> None:
    """The demo's tokenizer files in ``out``, its BPE vocabulary cut to the model's first ``vocab`` ids (the
    special tokens, the bytes, the earliest merges): llama.cpp's GGUF converter refuses a tokenizer with ids
    beyond the embedding, so a synthetic model of a smaller vocabulary had no llama-bench figures."""
    for file in TOKENIZER_FILES:
        if (demo / file).is_file():
            shutil.copy2(demo / file, out / file)
    data = json.loads((demo / "tokenizer.json").read_text())
    bpe = data["model"]
    if len(bpe["vocab"]) <= vocab:
        return
    kept = {token: i for token, i in bpe["vocab"].items() if i < vocab}
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in bpe["merges"]]
    bpe["vocab"], bpe["merges"] = kept, [[a, b] for a, b in pairs if a in kept and b in kept and a + b in kept]
    data["added_tokens"] = [token for token in data["added_tokens"] if token["id"] < vocab]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))


def export_all(work: Path, base: Path, reuse: bool,
               exports: tuple[tuple[str, str], ...] = EXPORTS) -> tuple[dict[str, Path], list[dict]]:
    """The adapter and each of ``exports`` (graph, precision) of one model in ``work``: ({"graph-precision": folder},
    export records). ``reuse``: folders already there are kept with the records of the run that made them."""
    from bench_kernel import HYPER
    from bench_onnx import random_adapter

    work.mkdir(parents=True, exist_ok=True)
    adapter = work / "adapter"
    if not (reuse and adapter.is_dir()):
        random_adapter(base, adapter, 0, **HYPER)
    saved = work / "exports.json"
    done = {(r["graph"], r["precision"]): r for r in json.loads(saved.read_text())} if reuse and saved.is_file() else {}
    folders, records = {}, []
    for graph, precision in exports:
        out = folders[f"{graph}-{precision}"] = work / f"{graph}-{precision}"
        command = export_command(graph, precision, base, adapter, out, work / "optimum_merged-fp32")
        if reuse and (graph, precision) in done and (out / "model.onnx").is_file():
            records.append({**done[graph, precision], "command": shown_command(command), "reused": True})
            continue
        print(f"  export {work.name} {graph} {precision} …", flush=True)
        with quiet.measure(f"export {work.name} {graph} {precision}"):
            measured = run_measured(command, work / f"{graph}-{precision}.log")
        done[graph, precision] = {"graph": graph, "precision": precision,
                                  "command": shown_command(command), **measured, "reused": False}
        records.append(done[graph, precision])
        saved.write_text(json.dumps(list(done.values()), indent=2))
    return folders, records


# ----------------------------------------------------------------------------------------------- latency

class Decoder:
    """One ONNX Runtime session run through an IOBinding (:class:`binding.BoundGraph`), as the engine runs it:
    the fixed inputs (a slot graph's shard inputs) bound once as OrtValues; input_ids, attention_mask, the past
    (the previous call's presents, OrtValues fed back without a copy), position_ids (optimum's graphs) and
    adapter_index (the slot graph) bound on each call."""

    def __init__(self, folder: Path, kernel: str, library: Path | None = None):
        """``kernel``: runtime.KERNELS' choice, or ``unfused`` (the native kernel on the graph's nodes as
        written), unless ``library`` (a measurement build of the native library) is registered instead of the
        package's (the graph then fused, as the package's kernel runs it)."""
        from prolora_export.onnx.graph.logits import LOGITS_START, takes_logits_start
        from prolora_export.runtime import inference_session, session_options

        options, fuse = None, None
        if kernel == "unfused":
            kernel, fuse = "native", False
        if library is not None:
            options, fuse = session_options("cpu", threads=THREADS, kernel="function"), True
            options.register_custom_ops_library(str(library))
        session = inference_session(folder, threads=THREADS, kernel=kernel, options=options, fuse=fuse,
                                    huge_pages="wait")
        inputs = {i.name: i for i in session.get_inputs()}
        cfg = json.loads((folder / "config.json").read_text())  # the builder names the head size symbolically
        heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.kv = {n: (heads, head_dim) for n in inputs if n.startswith("past_key_values.")}
        self.position_ids = "position_ids" in inputs
        rng = np.random.default_rng(1)
        fixed = {n: (rng.standard_normal((1, *i.shape[1:])) * 0.02).astype(np.float32)
                 for n, i in inputs.items() if i.shape and i.shape[0] == "slots"}
        self.graph = BoundGraph(session, fixed)
        self.adapter_index = "adapter_index" in inputs
        self.logits_start = LOGITS_START if takes_logits_start(session) else None  # builder graphs
        self.present = {o: "past_key_values." + o.removeprefix("present.") for o in self.graph.outputs
                        if o.startswith("present.")}

    def run(self, ids: np.ndarray, past: dict) -> tuple[float, np.ndarray, dict]:
        """One call on ``ids`` (batch, new) after ``past`` (OrtValues): (seconds, logits, the next past).
        Timed: binding the per-call inputs, the run, the logits to numpy (presents stay OrtValues), as in the
        engine's step."""
        batch, new = ids.shape
        past_len = next(iter(past.values())).shape()[2]
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, past_len + new), np.int64), **past}
        if self.position_ids:
            feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + new, dtype=np.int64), (batch, new))
        if self.adapter_index:
            feeds["adapter_index"] = np.zeros(batch, np.int64)
        if self.logits_start:  # the last position's logits, all that a prefill or a decode step reads
            feeds[self.logits_start] = np.array([new - 1], np.int64)
        start = time.perf_counter()
        out = self.graph.run(feeds)
        logits = out["logits"].numpy()
        seconds = time.perf_counter() - start
        return seconds, logits, {self.present[o]: v for o, v in out.items() if o in self.present}


def random_past(kv: dict[str, tuple[int, int]], batch: int, length: int) -> dict:
    """A random cache as OrtValues (only read by the graphs: every round starts from it)."""
    rng = np.random.default_rng(0)
    return {n: as_value(rng.standard_normal((batch, heads, length, dim), dtype=np.float32))
            for n, (heads, dim) in kv.items()}


def decode_ms(decoder: Decoder, past: dict, steps: int) -> float:
    """Median ms per step of a greedy loop of ``steps`` + 1 calls from ``past`` (the first call not counted)."""
    ids = np.random.default_rng(2).integers(0, 1000, (next(iter(past.values())).shape()[0], 1))
    times = []
    for _ in range(steps + 1):
        seconds, logits, past = decoder.run(ids, past)
        times.append(seconds)
        ids = logits[:, -1].argmax(-1)[:, None]
    return 1e3 * statistics.median(times[1:])


def prefill_ms(decoder: Decoder, empty: dict, tokens: int) -> float:
    ids = np.random.default_rng(3).integers(0, 1000, (1, tokens))
    return 1e3 * decoder.run(ids, empty)[0]


#: another program timed in latency()'s rounds (llama_bench.LlamaBench): (metrics wanted, decode steps) -> {metric:
#: ms} of those it measures
Peer = Callable[[tuple[str, ...], int], dict[str, float]]


def latency(decoders: dict[str, Decoder], rounds: int, steps: int, label: str,
            metrics: tuple[str, ...] = METRICS, peers: dict[str, Peer] | None = None) -> dict[str, dict[str, float]]:
    """ms per graph and metric (of ``metrics``): every call kind interleaved across the graphs, their order
    rotated each round; the median over rounds, and under ``rounds`` each round's ms (:func:`paired`).
    ``peers`` (another program, such as :class:`llama_bench.LlamaBench`) run once a round each, alternately after and
    before the graphs, and are reported like the graphs for the metrics they measure."""
    peers = peers or {}
    kv = next(iter(decoders.values())).kv
    pasts = {b: random_past(kv, b, PAST) for b in BATCHES}
    empty = random_past(kv, 1, 0)
    calls: dict[str, Callable[[Decoder], float]] = {
        **{f"decode_b{b}": (lambda d, b=b: decode_ms(d, pasts[b], steps)) for b in BATCHES},
        **{f"prefill_{n}": (lambda d, n=n: prefill_ms(d, empty, n)) for n in PROMPTS}}
    calls = {metric: call for metric, call in calls.items() if metric in metrics}
    for decoder in decoders.values():  # warm-up: every shape once
        for call in calls.values():
            call(decoder)
    names = list(decoders)
    got: dict[str, dict[str, list[float]]] = {name: {m: [] for m in calls} for name in names}
    got.update({name: {} for name in peers})

    def run_peers() -> None:
        for name, peer in peers.items():
            for metric, ms in peer(metrics, steps).items():
                got[name].setdefault(metric, []).append(ms)

    for r in range(rounds):
        with quiet.measure(f"{label} round {r + 1}"):
            if r % 2:
                run_peers()
            for metric, call in calls.items():
                for name in quiet.rotated(names, r):
                    got[name][metric].append(call(decoders[name]))
            if not r % 2:
                run_peers()
        print(f"    round {r + 1}/{rounds}: " + ", ".join(f"{n} {statistics.median(got[n]['decode_b1']):.1f}"
                                                         for n in got if got[n].get("decode_b1"))
              + " ms/token (b1)", flush=True)
    return {name: {**{m: statistics.median(v) for m, v in by_metric.items()}, "rounds": by_metric}
            for name, by_metric in got.items()}


# ----------------------------------------------------------------------------------------------- llama.cpp

def llamacpp_ggufs(work: Path, base: Path, reuse: bool) -> dict[str, Path] | str:
    """The model as GGUF f32 and Q4_0 (bench_llamacpp's conversion), or why there are none."""
    from bench_llamacpp import CACHE, CONVERT_BASE, run_logged, source_dir, tool

    if not all(tool(CACHE, name).is_file() for name in ("llama-bench", "llama-quantize")):
        return f"llama.cpp is not built in {CACHE} (python bench/bench_llamacpp.py --build-only)"
    out = {"f32": work / "model-f32.gguf", "q4_0": work / "model-q4_0.gguf"}
    log = work / "gguf.log"
    try:
        if not (reuse and out["f32"].is_file()):
            print(f"  GGUF {work.name} …", flush=True)
            run_logged([sys.executable, "-c", CONVERT_BASE, source_dir(CACHE), base, out["f32"], PRE_TOKENIZER], log,
                       900)
        if not (reuse and out["q4_0"].is_file()):
            run_logged([tool(CACHE, "llama-quantize"), out["f32"], out["q4_0"], "Q4_0", str(THREADS)], log, 900)
    except SystemExit:
        return f"GGUF conversion failed: {last_lines(log)}"
    return out


def last_lines(log: Path, count: int = 2) -> str:
    """The end of a failed step's log, for a one-line reason (a traceback's caret lines left out)."""
    lines = [line.strip() for line in log.read_text().splitlines() if line.strip(" ^~")]
    return " ".join(lines[-count:])


# ----------------------------------------------------------------------------------------------- the run

def measurement_kernels(work: Path) -> dict[str, Path]:
    """The null and touch builds of the native library (bench_kernel's measurement variants), by kernel name;
    one that does not build is left out (its row then missing)."""
    from bench_kernel import VARIANTS as MEASUREMENT_KERNELS

    from prolora_export.native.build import build

    built = {}
    for name, define in MEASUREMENT_KERNELS.items():
        library, line = build(work / f"kernel-{name}", defines=(define,))
        if library is None:
            print(f"  {name} kernel not built: {line}", flush=True)
        else:
            built[name] = library
    return built


def measure_model(name: str, base: Path, work: Path, quick: bool, reuse: bool) -> dict:
    from bench_llamacpp import CACHE, tool

    from prolora_export import native

    cfg = json.loads((base / "config.json").read_text())
    clock = [time.perf_counter()]
    folders, exports = export_all(work / name, base, reuse)
    clock.append(time.perf_counter())
    kernel = native.library_path() is not None
    libraries = measurement_kernels(work) if kernel else {}
    runnable = {"function", *(("native", "unfused") if kernel else ()), *libraries}
    variants = {v: pair for v, pair in VARIANTS.items() if pair[1] in runnable}
    result: dict = {"hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"], "fp32_bytes": fp32_bytes(base),
                    "exports": exports, "native_kernel": kernel, "latency": {}}
    ggufs = llamacpp_ggufs(work / name, base, reuse)
    if isinstance(ggufs, str):
        print(f"  llama.cpp skipped: {ggufs}", flush=True)
    result["llamacpp"] = {"skipped": ggufs} if isinstance(ggufs, str) else {}
    clock.append(time.perf_counter())
    for precision in PRECISIONS:
        print(f"  latency {name} {precision} …", flush=True)
        decoders = {v: Decoder(folders[f"{graph}-{precision}"], k, libraries.get(k))
                    for v, (graph, k) in variants.items()}
        gguf = GGUF[precision]
        peers = {} if isinstance(ggufs, str) else {
            "llamacpp": LlamaBench(tool(CACHE, "llama-bench"), ggufs[gguf], THREADS, depth=PAST)}
        measured = latency(decoders, ROUNDS[quick], STEPS[quick], f"{name} {precision}", peers=peers)
        if peers:
            result["llamacpp"][gguf] = measured.pop("llamacpp")
        result["latency"][precision] = measured
        del decoders
    clock.append(time.perf_counter())
    result["seconds"] = dict(zip(("exports", "builds", "latency"), np.diff(clock).tolist(), strict=True))
    return result


def measure_scale(base: Path, work: Path, quick: bool, reuse: bool) -> dict:
    """The 1.1B model: its int4 exports (time, peak RSS) and their latency, compact (native kernel) beside merged."""
    from prolora_export import native

    cfg = json.loads((base / "config.json").read_text())
    folders, exports = export_all(work / SCALE_NAME, base, reuse, SCALE_EXPORTS)
    kernel = "native" if native.library_path() is not None else "function"
    print(f"  latency {SCALE_NAME} int4 …", flush=True)
    decoders = {graph: Decoder(folders[f"{export}-int4"], kernel if how == "native" else how)
                for graph, (export, how) in SCALE_GRAPHS.items()}
    measured = latency(decoders, ROUNDS[quick], STEPS[quick], f"{SCALE_NAME} int4", SCALE_METRICS)
    return {"hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"], "fp32_bytes": fp32_bytes(base),
            "native_kernel": kernel == "native", "exports": exports, "latency": {"int4": measured}}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def paired(graphs: dict, graph: str, reference: str, metric: str) -> float | None:
    """``graph``'s ``metric`` over ``reference``'s, paired round by round (:func:`quiet.paired_ratio`: the two
    calls of a round seconds apart); a ratio of medians for results recorded without their rounds."""
    a, b = graphs.get(graph, {}), graphs.get(reference, {})
    rounds_a, rounds_b = a.get("rounds", {}).get(metric), b.get("rounds", {}).get(metric)
    if rounds_a and rounds_b:
        return quiet.paired_ratio(rounds_a, rounds_b)
    return ratio(a.get(metric), b.get(metric))


def goals(models: dict) -> list[dict]:
    """Issue 29's goals on the demo model: measured ratio, bound, verdict (None: not measured)."""
    demo = models["demo"]
    lat = demo["latency"]
    compact = "compact_kernel" if "compact_kernel" in lat["fp32"] else "compact_body"
    rows = []
    for precision, bound in (("fp32", 1.05), ("int4", 1.10)):
        for graph in (compact, "compact_unpacked_kernel"):
            for b in BATCHES:
                rows.append((f"{precision} decode batch {b}: {graph} / builder merged", bound,
                             paired(lat[precision], graph, "merged", f"decode_b{b}")))
    for b in BATCHES:
        rows.append((f"fp32 decode batch {b}: builder merged / optimum merged", 0.75,
                     paired(lat["fp32"], "merged", "optimum_merged", f"decode_b{b}")))
    with_q4 = {**lat["int4"], "llamacpp": demo["llamacpp"].get("q4_0", {})}
    rows.append((f"int4 decode batch 1: {compact} / llama.cpp Q4_0", 1.5, paired(with_q4, compact, "llamacpp",
                                                                                   "decode_b1")))
    for precision in PRECISIONS:
        builder = [e for e in demo["exports"] if e["graph"] != "optimum_merged" and e["precision"] == precision]
        worst = max(builder, key=lambda e: e["peak_rss"])
        rows.append((f"{precision} export peak RSS / model fp32 bytes (worst builder export: {worst['graph']})",
                     RSS_BOUND, worst["peak_rss"] / demo["fp32_bytes"]))
    return [{"what": what, "bound": bound, "measured": got, "met": None if got is None else got <= bound,
             "shown": "not measured" if got is None else f"{got:.3f}× (≤ {bound:.2f}×)"} for what, bound, got in rows]


def run(work: Path, quick: bool, full: bool, reuse: bool) -> dict:
    import onnxruntime

    from prolora_export.models import ensure_demo_model
    from prolora_export.onnx.graph.builder import installed_versions
    from prolora_export.runtime import share_thread_pool

    share_thread_pool(THREADS)
    started = time.perf_counter()
    missing = [str(path) for path in CLI.values() if not path.is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run make setup")
    demo = ensure_demo_model(quiet=True)
    models = {"demo": demo}
    if full:
        models["synthetic-2048"] = synthetic_model(work, demo, reuse)
    results: dict = {"models": {}}
    for name, base in models.items():
        print(f"{name} …", flush=True)
        results["models"][name] = measure_model(name, base, work, quick, reuse)
    if full:
        print(f"{SCALE_NAME} …", flush=True)
        scale = synthetic_model(work, demo, reuse, f"{SCALE_NAME}-model", SCALE_SHAPE)
        results["scale"] = measure_scale(scale, work, quick, reuse)
    results["goals"] = goals(results["models"])
    results["settings"] = {
        "quick": quick, "full": full, "threads": THREADS, "past": PAST, "batches": list(BATCHES),
        "prompts": list(PROMPTS), "io_binding": True, "rounds": ROUNDS[quick], "decode_steps": STEPS[quick],
        "onnxruntime": onnxruntime.__version__,
        "builder_env": installed_versions(str(CLI["builder"].parent / "python")),
        "export_s": sum(e["seconds"] for m in [*results["models"].values(), *([results["scale"]] if full else [])]
                        for e in m["exports"] if not e["reused"]),
        "wall_s": time.perf_counter() - started}
    return results


# ----------------------------------------------------------------------------------------------- the page

def cell(value: float | None, fmt: str = ".1f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def model_table(m: dict) -> list[str]:
    """Latency rows of one model: ms per metric, decode ratios vs the optimum graph and vs builder merged."""
    head = " | ".join(f"{m_.replace('_b', ' b').replace('_', ' ')} ms" for m_ in METRICS)
    lines = [f"| precision | graph | {head} | decode b1 / optimum | decode b16 / optimum | decode b1 / merged | "
             "decode b16 / merged | prefill 128 / optimum |", "|" + "---|" * (len(METRICS) + 7)]
    for precision, by_graph in m["latency"].items():
        for graph, row in by_graph.items():
            lines.append(
                f"| {precision} | {LABELS[graph]} | " + " | ".join(cell(row[k]) for k in METRICS) + " | "
                + " | ".join(cell(paired(by_graph, graph, "optimum_merged", f"decode_b{b}"), ".2f", "×")
                             for b in BATCHES)
                + " | " + " | ".join(cell(paired(by_graph, graph, "merged", f"decode_b{b}"), ".2f", "×")
                                     for b in BATCHES)
                + f" | {cell(paired(by_graph, graph, 'optimum_merged', 'prefill_128'), '.2f', '×')} |")
        gguf = GGUF[precision]
        theirs = m["llamacpp"].get(gguf)
        if theirs:
            both = {**by_graph, "llamacpp": theirs}
            lines.append(f"| {precision} | {LABELS['llamacpp']} {gguf.upper()} | "
                         + " | ".join(cell(theirs.get(k)) for k in METRICS)
                         + f" | {cell(paired(both, 'llamacpp', 'optimum_merged', 'decode_b1'), '.2f', '×')} | – | "
                         f"{cell(paired(both, 'llamacpp', 'merged', 'decode_b1'), '.2f', '×')} | – | "
                         f"{cell(paired(both, 'llamacpp', 'optimum_merged', 'prefill_128'), '.2f', '×')} |")
    if "skipped" in m["llamacpp"]:
        lines += ["", f"llama.cpp: skipped ({m['llamacpp']['skipped']})."]
    return lines


def split_table(m: dict) -> list[str]:
    """The compact graph's decode time over the merged graph's, in parts: its fused nodes with Y = Base (ONNX
    Runtime running them), reading the shards, the kernel's arithmetic."""
    parts = (("merged", "merged"), ("nodes (Y = Base)", "compact_null"), ("+ shard reads", "compact_touch"),
             ("+ arithmetic (the kernel)", "compact_kernel"))
    lines = ["| precision | batch | " + " | ".join(f"{label} ms" for label, _ in parts) + " | nodes | shard reads | "
             "arithmetic |", "|" + "---|" * (2 + 2 * len(parts) - 1)]
    for precision, by_graph in m["latency"].items():
        if not all(graph in by_graph for _, graph in parts):
            continue
        for b in BATCHES:
            ms = [by_graph[graph][f"decode_b{b}"] for _, graph in parts]
            steps = [cell(100 * (after - before) / ms[0], "+.1f", " %") for before, after in itertools.pairwise(ms)]
            lines.append(f"| {precision} | {b} | " + " | ".join(cell(v) for v in ms) + " | " + " | ".join(steps)
                         + " |")
    return lines if len(lines) > 2 else []


def export_table(models: dict) -> list[str]:
    lines = ["| model | graph | precision | command | s | peak RSS, tree (MB) | largest process (MB) | "
             "tree / model fp32 bytes |", "|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        for e in m["exports"]:
            lines.append(f"| {name} | {EXPORT_LABELS[e['graph']]} | {e['precision']} | `{e['command']}` | "
                         f"{e['seconds']:.1f}{' (reused)' * e['reused']} | "
                         f"{e['peak_rss'] / 1e6:.0f} | {e['largest_process_rss'] / 1e6:.0f} | "
                         f"{e['peak_rss'] / m['fp32_bytes']:.2f}× |")
    return lines


def scale_lines(m: dict) -> list[str]:
    """The 1.1B model's section: int4 compact beside int4 merged, and the compact export's peak RSS."""
    lat = m["latency"]["int4"]
    compact = next(e for e in m["exports"] if e["graph"] == "compact")
    lines = [f"## {SCALE_NAME} (TinyLlama-1.1B's shape: hidden {m['hidden']}, {m['layers']} blocks, "
             f"{m['fp32_bytes'] / 1e9:.2f} GB as fp32; random weights)", "",
             "int4 exports as shipped (`--quantize int4`), compact with the native kernel"
             + ("" if m["native_kernel"] else " (not built here: its function body)") + ".", "",
             "| graph | " + " | ".join(f"{k.replace('_b', ' b').replace('_', ' ')} ms" for k in SCALE_METRICS)
             + " | decode b1 / merged | decode b16 / merged |", "|" + "---|" * (len(SCALE_METRICS) + 3)]
    for graph, row in lat.items():
        lines.append(f"| {LABELS[graph]} | " + " | ".join(cell(row[k]) for k in SCALE_METRICS) + " | "
                     + " | ".join(cell(paired(lat, graph, "merged", f"decode_b{b}"), ".2f", "×") for b in BATCHES)
                     + " |")
    lines += ["", f"Compact int4 export: {compact['seconds']:.0f} s, peak RSS {compact['peak_rss'] / 1e9:.2f} GB "
              f"({compact['peak_rss'] / m['fp32_bytes']:.2f}× the fp32 bytes)."]
    return lines


def markdown(r: dict) -> str:
    s = r["settings"]
    flags = " --quick" * s["quick"] + " --full" * s["full"]
    env = s["builder_env"]
    lines = [
        "# Decoder graphs: optimum beside ONNX Runtime GenAI's model builder (issue 29)", "",
        f"`python bench/bench_graphs.py{flags}`: ONNX Runtime {s['onnxruntime']} CPU, {s['threads']} intra-op "
        f"threads, wall clock; builder from onnxruntime-genai {env.get('onnxruntime-genai')} under transformers "
        f"{env.get('transformers')}. Decode: a greedy loop feeding present → past from a random cache of "
        f"{s['past']} tokens, {s['decode_steps']} steps per round (median); prefill: one call on an empty cache, "
        "the builder graphs computing the last position's logits only (`logits_start`, as the engine does; optimum's "
        "graphs compute every position's). "
        f"{FEED_TEXT[bool(s.get('io_binding'))]}Graphs interleaved in one process, order rotated each round, "
        f"median of {s['rounds']} rounds; a ratio of two graphs is the median of each round's own ratio (their calls "
        "seconds apart). One random "
        "PRoLoRA adapter (r=8, u=1, m=n=2, seven projections). int4: the builder's `--quantize int4`; the optimum "
        "graph through `prolora-export quantize --bits 4`. llama.cpp: `llama-bench -t 2` on the base weights as "
        f"GGUF (decode = generation at depth {s['past']}, prefill = prompt processing), "
        + (f"{s['llama_bench_repeats']} repetitions after our rounds" if "llama_bench_repeats" in s else
           "one run in each round beside our graphs, its ratios paired round by round like theirs")
        + ". bench/bench_graphs.py's docstring has the method.", "",
        "## Goals (demo model)", "", "| goal | bound | measured | met |", "|---|---|---|---|"]
    for g in r["goals"]:
        met = "–" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['what']} | ≤ {g['bound']:.2f}× | {cell(g['measured'], '.3f', '×')} | {met} |")
    for name, m in r["models"].items():
        lines += ["", f"## {name} (hidden {m['hidden']}, {m['layers']} blocks, {m['fp32_bytes'] / 1e6:.0f} MB "
                  "as fp32)", "", *model_table(m)]
        split = split_table(m)
        if split:
            lines += ["", "Where the compact graph's extra decode time goes (each step as % of the merged graph's "
                      "time; noisy: each is the difference of two medians): the fused adapter nodes with a kernel "
                      "that writes Y = Base (ONNX Runtime running them), then one that first reads "
                      "every shard's cache lines, then the real kernel.", "", *split]
        steps = ", ".join(f"{k} {v / 60:.1f} min" for k, v in m["seconds"].items())
        lines += ["", f"Time spent on this model: {steps}."]
        if not m["native_kernel"]:
            lines += ["", "The native kernel was not built: every adapter op ran its function body."]
    if "scale" in r:
        lines += ["", *scale_lines(r["scale"])]
    lines += ["", "## Exports", "",
              "Wall time and peak RSS of each export command (RSS summed over its process tree, polled every "
              f"{RSS_POLL_S * 1000:.0f} ms; the largest single process from `/usr/bin/time`). Goal: the tree's peak ≤ "
              f"{RSS_BOUND}× the model's fp32 bytes.", "",
              *export_table({**r["models"], **({SCALE_NAME: r["scale"]} if "scale" in r else {})}),
              "", f"Run took {s['wall_s'] / 60:.1f} min, of which exports {s['export_s'] / 60:.1f} min "
              "(reused exports count 0).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--full", action="store_true",
                        help="also the hidden-2048 synthetic Llama and the 1.1B one (default: demo only)")
    parser.add_argument("--work", type=Path, default=None, help="keep the adapters, exports and GGUF files here")
    parser.add_argument("--reuse", action="store_true", help="with --work: reuse what is there")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite GRAPHS.md from graphs.json")
    quiet.add_argument(parser)
    args = parser.parse_args()
    if args.reuse and args.work is None:
        parser.error("--reuse needs --work")
    if args.markdown_only:
        results = json.loads((HERE / "graphs.json").read_text())
    else:
        guard = quiet.LoadGuard("graphs", THREADS, allow_load=args.allow_load)
        guard.start()
        if args.work is not None:
            results = run(args.work, args.quick, args.full, args.reuse)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-graphs-") as tmp:
                results = run(Path(tmp), args.quick, args.full, False)
        guard.save(results, HERE / "graphs.json")
    quiet.write_page(HERE / "GRAPHS.md", markdown(results), results)
    print((HERE / "GRAPHS.md").read_text())


if __name__ == "__main__":
    main()
