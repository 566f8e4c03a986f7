"""`prolora-export serve` beside llama.cpp's `llama-server` on this machine: same weights, same adapters.
Writes bench/LLAMACPP.md and bench/llamacpp.json.

    python bench/bench_llamacpp.py [--quick] [--work DIR [--reuse]] [--markdown-only] [--allow-load]

llama.cpp is built once from the llama-cpp-python sdist (its ``vendor/llama.cpp``; targets llama-server,
llama-bench, llama-quantize) into a cache folder outside git (``--cache``, default
~/.cache/prolora-export/llama.cpp; about 15 minutes on 2 free cores). The demo model (SmolLM2-135M, fp32)
becomes a GGUF f32 by llama.cpp's ``convert_hf_to_gguf.py`` with the GPT-2 byte-level BPE vocabulary forced
(it guesses SentencePiece for the demo folder, and every request then fails with ``unordered_map::at``),
and a Q4_0 copy by ``llama-quantize``. Sixteen random PRoLoRA adapters (bench_serve's: r=8, u=1, m=n=2, seven
projections, small random values) are converted to PEFT LoRA (``convert --to peft``, exact) and then by
``convert_lora_to_gguf.py --base DEMO --outtype f32``. Ours: ``prolora-export onnx --mode compact --slots``
of the same adapters, this environment's default route (the model builder's graph where it is installed),
and for int4 ``--quantize int4``.

Served (2 threads each, both servers alive, loopback only): ``prolora-export serve`` with the sixteen adapters,
and ``llama-server -m base.gguf --lora a0.gguf … --lora-init-without-apply -np 32``; fp32 (our fp32 graph,
the f32 GGUF) and, without ``--quick``, int4 (our int4 graph, the Q4_0 GGUF; the adapters stay float on
both sides).
The load generator (bench_serve's: asyncio + httpx, C closed-loop clients) sends streamed chat completions,
greedy, ``ignore_eos``, a fixed max_tokens. A workload spreads its requests over A of the loaded adapters:
request i uses adapter i mod A (A = 8 and 16: mixed; A = 1: every request on adapter 0, the one-adapter
reference, where llama.cpp may batch every request). Ours names the adapter, llama.cpp gets
``"lora": [{"id": k, "scale": 1 if k == i mod A else 0} for all 16 k]`` with ``"cache_prompt": false`` (its
prompt cache is reused across LoRA settings); llama.cpp leaves a LoRA at scale 0 out of its graph, so the
loaded but unused ones cost it nothing. :data:`WORKLOADS` says which A run at which C (1, 8, 32). Within a
client count the runs go round robin: each repeat runs one server's workloads back to back, then the other's,
the servers' order and the workloads' rotating from repeat to repeat; tokens/s is the median over the runs, a
ratio the median of each repeat's own ratio (:func:`paired_ratio`), TTFT and ITL percentiles are over every
request of every run. Last, the one-client run
on adapter 0 again with each server's default sampling (no temperature sent, request i seeded with i), what
a user of an OpenAI client gets without setting one.

Single stream: ``llama-bench`` (generation of N tokens from an empty context) of the f32 and Q4_0 GGUF beside
one decode call of our graphs at batch 1 after N/2 cached tokens (the mean past length of llama-bench's run),
through an IOBinding with the slot inputs bound once, as the engine runs it (bench/binding.py): the served
slot graphs, and a merged graph of adapter 0 in fp32 and int4 (``onnx --mode merged [--quantize int4]``), the
same work as llama-bench's base model. Each round times every one of them once (llama-bench: one run, ``-r 1``)
in an order rotated from round to round; a ratio is the median of the rounds' own ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import quiet  # noqa: E402
from bench_engine import THREADS, decode_step_ms  # noqa: E402
from bench_serve import Server, build, export, load, ms, plan, prolora_server, summarize  # noqa: E402
from llama_bench import LlamaBench  # noqa: E402

from prolora_export.formats.peft_lora import save_peft  # noqa: E402
from prolora_export.formats.prolora import load_adapter  # noqa: E402
from prolora_export.models import ensure_demo_model  # noqa: E402
from prolora_export.runtime import inference_session, share_thread_pool  # noqa: E402

#: the llama-cpp-python sdist whose vendor/llama.cpp is built (pinned: the conversion patch below needs it)
VERSION = "0.3.36"
CACHE = Path.home() / ".cache" / "prolora-export" / "llama.cpp"
TOOLS = ("llama-server", "llama-bench", "llama-quantize")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]
BUILD_TIMEOUT_S = 3 * 3600
STEP_TIMEOUT_S = 900  # one conversion, quantization or llama-bench run
READ_TIMEOUT_S = 300  # a streamed request that sends nothing for this long counts as an error
#: adapters loaded in both servers; a workload spreads its requests over the first A of them
LOADED = 16
#: the issue's mixed workload (its goals are set at 32 clients over 8 adapters)
MIXED = 8
#: by --quick: clients -> the workloads' A run at that client count (1: all on adapter 0). One client over 16
#: adapters is left out: its 8 requests go to adapters 0-7, the very requests of the 8-adapter run.
WORKLOADS = {False: {1: (8, 1), 8: (8, 16, 1), 32: (8, 16, 1)}, True: {1: (8,), 8: (8,), 32: (8, 16, 1)}}
#: issue 30's goals for the side by side
GOAL_TPS_VS_LLAMACPP, GOAL_MIXED_VS_ONE, GOAL_TTFT_S = 6.0, 0.85, 1.0
PARALLEL = 32  # llama-server slots: one per client at most
CONTEXT_PER_SLOT = 512
#: by --quick: tokens per request, requests per client, alternating runs per server, single-stream settings
MAX_TOKENS = {False: 32, True: 8}
PER_CLIENT = {False: {1: 8, 8: 4, 32: 2}, True: {1: 2, 8: 1, 32: 1}}
REPEATS = {False: 3, True: 1}
DECODE_ROUNDS = {False: 5, True: 2}
#: served precisions: ours (``--quantize``, None: fp32) beside llama.cpp's base GGUF; by --quick
SERVED = {"fp32": (None, "f32"), "int4": ("int4", "q4_0")}
PRECISIONS = {False: ("fp32", "int4"), True: ("fp32",)}

#: convert_hf_to_gguf.py with the GPT-2 byte-level BPE vocabulary forced on the model's class (argv: llama.cpp
#: folder, model folder, output file, and optionally the pre-tokenizer's name for a tokenizer llama.cpp cannot
#: recognize by its hash, such as the demo's cut to a synthetic model's vocabulary); llama.cpp's own files stay
#: untouched
CONVERT_BASE = """
import sys
from pathlib import Path

src, model, out, *pre = sys.argv[1:]
sys.path[:0] = [src, src + "/gguf-py"]
import convert_hf_to_gguf as convert

hparams = convert.ModelBase.load_hparams(Path(model), False)
model_class = convert.get_model_class(convert.get_model_architecture(hparams, convert.ModelType.TEXT))
model_class.set_vocab = model_class._set_vocab_gpt2
if pre:
    model_class.get_vocab_base_pre = lambda self, tokenizer: pre[0]
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "f32", "--outfile", out]
convert.main()
"""


def run_logged(command: list[str | Path], log: Path, timeout: float, cwd: Path | None = None) -> None:
    """Run a build or conversion step, its output appended to ``log``; one line (and the log's tail) if it fails."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, command))}\n")
        out.flush()
        try:
            done = subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{Path(command[0]).name} took over {timeout:.0f} s; see {log}") from None
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command[:3]))} … failed (exit {done.returncode}); the end of {log}:\n"
                         + log.read_text()[-3000:])


def source_dir(cache: Path) -> Path:
    return cache / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


def tool(cache: Path, name: str) -> Path:
    return source_dir(cache) / "build" / "bin" / name


def ensure_llamacpp(cache: Path = CACHE) -> Path:
    """llama.cpp's source folder with :data:`TOOLS` built in ``build/bin`` (cached: the sdist is fetched
    with pip and built only when a tool is missing; one build at a time)."""
    if all(tool(cache, name).is_file() for name in TOOLS):
        return source_dir(cache)
    for program in ("cmake", "c++"):
        if shutil.which(program) is None:
            raise SystemExit(f"building llama.cpp needs {program}: apt-get install -y cmake g++")
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "build.log"
    with open(cache / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(tool(cache, name).is_file() for name in TOOLS):  # built meanwhile by another run
            return source_dir(cache)
        sdist = cache / f"llama_cpp_python-{VERSION}.tar.gz"
        if not sdist.is_file():
            print(f"fetching the llama-cpp-python {VERSION} sdist …", flush=True)
            run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", cache], log, STEP_TIMEOUT_S)
        if not source_dir(cache).is_dir():
            with tarfile.open(sdist) as archive:
                archive.extractall(cache, filter="data")
        started = time.perf_counter()
        print(f"building llama.cpp ({', '.join(TOOLS)}; about 15 min on 2 cores; log: {log}) …", flush=True)
        src = source_dir(cache)
        run_logged(["cmake", "-B", "build", *CMAKE_FLAGS], log, BUILD_TIMEOUT_S, cwd=src)
        run_logged(["cmake", "--build", "build", f"-j{os.cpu_count() or 1}", "--target", *TOOLS], log,
                   BUILD_TIMEOUT_S, cwd=src)
        missing = [name for name in TOOLS if not tool(cache, name).is_file()]
        if missing:
            raise SystemExit(f"the llama.cpp build finished without {missing}; see {log}")
        print(f"built llama.cpp in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return source_dir(cache)


def llamacpp_version(cache: Path) -> str:
    done = subprocess.run([tool(cache, "llama-server"), "--version"], capture_output=True, text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version: ")]
    return lines[0].removeprefix("version: ") if lines else "of unknown version"


def convert(cache: Path, demo: Path, folders: dict[str, Path], work: Path, reuse: bool) -> dict:
    """The GGUF files: base f32 and Q4_0, one f32 LoRA per adapter (reused from ``work`` if asked)."""
    src, log = source_dir(cache), work / "convert.log"
    out = {"f32": work / "base-f32.gguf", "q4_0": work / "base-q4_0.gguf",
           "loras": [work / f"{name}.gguf" for name in folders]}
    if not (reuse and out["f32"].is_file()):
        print("converting the demo model to GGUF f32 …", flush=True)
        run_logged([sys.executable, "-c", CONVERT_BASE, src, demo, out["f32"]], log, STEP_TIMEOUT_S)
    if not (reuse and out["q4_0"].is_file()):
        run_logged([tool(cache, "llama-quantize"), out["f32"], out["q4_0"], "Q4_0", str(THREADS)], log,
                   STEP_TIMEOUT_S)
    for (name, folder), gguf in zip(folders.items(), out["loras"], strict=True):
        if reuse and gguf.is_file():
            continue
        print(f"converting adapter {name} to PEFT LoRA and GGUF …", flush=True)
        peft = save_peft(work / f"{name}-peft", load_adapter(folder), force=True)
        run_logged([sys.executable, src / "convert_lora_to_gguf.py", "--base", demo, "--outtype", "f32",
                    "--outfile", gguf, peft], log, STEP_TIMEOUT_S)
    return out


def llama_server(cache: Path, ggufs: dict, base: str, log: Path) -> Server:
    """``llama-server`` on the ``base`` GGUF (f32 or q4_0) with every LoRA loaded at scale 0 (requests set
    their own scales)."""
    loras = [arg for path in ggufs["loras"] for arg in ("--lora", str(path))]
    return Server(lambda port: [
        str(tool(cache, "llama-server")), "-m", str(ggufs[base]), *loras, "--lora-init-without-apply",
        "-np", str(PARALLEL), "-c", str(PARALLEL * CONTEXT_PER_SLOT), "-t", str(THREADS), "-tb", str(THREADS),
        "--host", "127.0.0.1", "--port", str(port), "--no-webui"], log)


def for_llamacpp(body: dict) -> dict:
    """The same request for llama-server: the adapter as per-request LoRA scales (every loaded one listed), no
    prompt cache."""
    chosen = int(body["model"].removeprefix("ad"))
    return {**body, "lora": [{"id": k, "scale": 1.0 if k == chosen else 0.0} for k in range(LOADED)],
            "cache_prompt": False}


def workload(adapters: int, sampling: str | None = None) -> str:
    """What a row's requests were on, as its table says it."""
    on = "all on adapter 0" if adapters == 1 else f"mixed over {adapters}"
    return on if sampling is None else f"{on}, each server's default sampling"


def pooled(records: list[dict]) -> dict:
    """Runs of one server and client count: median tokens/s over runs, latency percentiles over all requests."""
    merged = {"tokens": sum(r["tokens"] for r in records), "seconds": sum(r["seconds"] for r in records),
              **{key: [v for r in records for v in r[key]] for key in ("ttft", "itl", "errors")}}
    out = summarize(merged)
    out["runs_tokens_per_s"] = [r["tokens"] / r["seconds"] for r in records]
    out["tokens_per_s"] = statistics.median(out["runs_tokens_per_s"])
    return out


def default_sampling(bodies: list[list[dict]]) -> list[list[dict]]:
    """The same requests with each server's default sampling: no temperature sent (ours: OpenAI's 1.0 over the
    whole vocabulary; llama-server: its own chain), request i seeded with i."""
    seeds = itertools.count()
    return [[{**{k: v for k, v in b.items() if k != "temperature"}, "seed": next(seeds)} for b in mine]
            for mine in bodies]


def serve_side_by_side(ours: Server, theirs: Server, quick: bool) -> list[dict]:
    """Every workload of :data:`WORKLOADS` on both servers, the runs of one client count round robin (repeat,
    workload, server); one row per client count and workload. Then the one-client run on adapter 0 again with
    each server's default sampling (a row marked ``sampling``)."""
    rows = []
    servers = {"ours": (ours.url, lambda b: b), "llamacpp": (theirs.url, for_llamacpp)}
    for url, adapt in servers.values():  # warm-up, untimed
        asyncio.run(load(url, [[adapt(b) for b in mine] for mine in plan(2, 2, 1, 4)], READ_TIMEOUT_S))
    runs = [(clients, {a: plan(clients, a, PER_CLIENT[quick][clients], MAX_TOKENS[quick]) for a in counts}, None)
            for clients, counts in WORKLOADS[quick].items()]
    runs.append((1, {1: default_sampling(plan(1, 1, PER_CLIENT[quick][1], MAX_TOKENS[quick]))}, "default"))
    for clients, bodies, sampling in runs:
        records: dict[tuple[int, str], list[dict]] = {(a, name): [] for a in bodies for name in servers}
        for repeat in range(REPEATS[quick]):
            for name in quiet.rotated(list(servers), repeat):
                url, adapt = servers[name]
                for a in quiet.rotated(list(bodies), repeat):
                    with quiet.measure(f"{clients} clients {workload(a, sampling)} {name} run {repeat + 1}"):
                        records[a, name].append(asyncio.run(load(url, [[adapt(b) for b in mine] for mine in bodies[a]],
                                                                 READ_TIMEOUT_S)))
        for a in bodies:
            row = {"clients": clients, "adapters": a, "workload": workload(a, sampling),
                   **({"sampling": sampling} if sampling else {}),
                   "requests": sum(len(mine) for mine in bodies[a]),
                   **{name: pooled(records[a, name]) for name in servers}}
            row["ratio"] = paired_ratio(row["ours"], row["llamacpp"])
            rows.append(row)
            print(f"{clients:>2} clients, {workload(a, sampling)}: ours {row['ours']['tokens_per_s']:.1f} tok/s, "
                  f"llama.cpp {row['llamacpp']['tokens_per_s']:.1f} ({row['ratio']:.2f}×), "
                  f"errors {row['ours']['errors']} / {row['llamacpp']['errors']}", flush=True)
    return with_one_adapter_ratio(rows)


def paired_ratio(ours: dict, peer: dict) -> float:
    """Ours / peer tokens/s, each repeat's runs paired (:func:`quiet.paired_ratio`)."""
    return quiet.paired_ratio(ours["runs_tokens_per_s"], peer["runs_tokens_per_s"])


def with_one_adapter_ratio(rows: list[dict]) -> list[dict]:
    """Each mixed row gets ``ours_vs_one_adapter``: our tokens/s over ours with every request on one adapter, at
    the same precision and client count, paired by repeat (:func:`paired_ratio`; None where that run is
    missing)."""
    one = {(r.get("precision"), r["clients"]): r["ours"] for r in rows if r["adapters"] == 1 and "sampling" not in r}
    for r in rows:
        if r["adapters"] != 1:
            ref = one.get((r.get("precision"), r["clients"]))
            r["ours_vs_one_adapter"] = None if ref is None else paired_ratio(r["ours"], ref)
    return rows


def goal(what: str, measured: float | None, bound: float, at_least: bool, unit: str = "×") -> dict:
    """One goal's row: ``measured`` against ``bound`` (``at_least``: ≥, else ≤); None: not measured."""
    met = None if measured is None else (measured >= bound if at_least else measured <= bound)
    limit = f"{'≥' if at_least else '≤'} {bound:g}{unit}"
    value = "not measured" if measured is None else f"{measured:.2f}{unit}"
    return {"what": what, "bound": limit, "measured": measured, "met": met, "value": value,
            "shown": f"{value} ({limit})"}


def goals(rows: list[dict]) -> list[dict]:
    """Issue 30's goals of the side by side, per precision (None: not measured in this run)."""
    out = []
    by = {(r.get("precision", "fp32"), r["clients"], r.get("adapters", MIXED)): r for r in rows if "sampling" not in r}
    for precision in dict.fromkeys(key[0] for key in by):
        one, busy = by.get((precision, 1, MIXED)), by.get((precision, 32, MIXED))
        itl = None if one is None or None in (one["ours"]["itl_p50_s"], one["llamacpp"]["itl_p50_s"]) else \
            one["ours"]["itl_p50_s"] / one["llamacpp"]["itl_p50_s"]
        out += [
            goal(f"{precision}, 1 client: ITL p50 ours / llama.cpp", itl, 1.0, False),
            goal(f"{precision}, 32 clients over {MIXED} adapters: tokens/s ours / llama.cpp",
                 busy and busy["ratio"], GOAL_TPS_VS_LLAMACPP, True),
            goal(f"{precision}, 32 clients over {MIXED} adapters: tokens/s ours / ours with every request on one "
                 "adapter", busy and busy.get("ours_vs_one_adapter"), GOAL_MIXED_VS_ONE, True),
            goal(f"{precision}, 32 clients over {MIXED} adapters: TTFT p50 ours", busy and busy["ours"]["ttft_p50_s"],
                 GOAL_TTFT_S, False, " s")]
    return out


def single_stream(cache: Path, ggufs: dict, demo: Path, slots: dict[str, Path], folder: Path, work: Path,
                  quick: bool, reuse: bool) -> dict:
    """ms of one decode call at batch 1 of the served slot graphs (16 slots) and of adapter 0's merged graph
    in fp32 and int4, and llama-bench's generation rate of the f32 and Q4_0 GGUF (one run of each a round), all
    interleaved round by round in a rotating order: {"ours" | "llamacpp": {graph: medians, and under
    ``rounds_ms`` each round's ms}}. Our sessions' memory is on huge pages, as the server's engine has it, and
    they share one intra-op pool."""
    merged = {"fp32": work / "merged", "int4": work / "merged-int4"}
    for precision, out in merged.items():
        if not (reuse and (out / "model.onnx").is_file()):
            export(demo, folder, out, "--mode", "merged", *(("--quantize", "int4") if precision == "int4" else ()))
    config = AutoConfig.from_pretrained(demo)
    share_thread_pool(THREADS)  # the four sessions take turns: one pool, as bench_graphs
    sessions = {**{f"slots_{p}": inference_session(path, threads=THREADS, huge_pages="wait")
                   for p, path in slots.items()},
                **{f"merged_{p}": inference_session(path, threads=THREADS, huge_pages="wait")
                   for p, path in merged.items()}}
    past, calls, tokens = MAX_TOKENS[quick] // 2, 5 if quick else 20, MAX_TOKENS[quick]
    timed = {("ours", name): (lambda s=session: decode_step_ms(s, 1, past, calls, LOADED, None, config))
             for name, session in sessions.items()}
    for gguf in ("f32", "q4_0"):
        peer = LlamaBench(tool(cache, "llama-bench"), ggufs[gguf], THREADS)
        timed["llamacpp", gguf] = lambda peer=peer: peer(("decode_b1",), tokens)["decode_b1"]
    times: dict[tuple[str, str], list[float]] = {key: [] for key in timed}
    for round_ in range(DECODE_ROUNDS[quick]):
        for key in quiet.rotated(list(timed), round_):
            with quiet.measure(f"decode {key[1]} round {round_ + 1}"):
                times[key].append(timed[key]())
    out: dict[str, dict] = {"ours": {}, "llamacpp": {}}
    for (side, name), rounds in times.items():
        median = statistics.median(rounds)
        out[side][name] = {"ms_per_token": median, "tokens_per_s": 1000 / median, "rounds_ms": rounds,
                           **({"past": past} if side == "ours" else {"n_gen": tokens})}
    return out


def run(work: Path, quick: bool, reuse: bool, cache: Path) -> dict:
    started = time.perf_counter()
    ensure_llamacpp(cache)
    demo = ensure_demo_model(quiet=True)
    slots, folders = {}, {}
    for precision in PRECISIONS[quick]:
        slots[precision], folders = build(work, reuse, LOADED, SERVED[precision][0])
    ggufs = convert(cache, demo, folders, work, reuse)
    rows = []
    for precision, graph in slots.items():
        with prolora_server(graph, folders, work / f"ours-{precision}.log") as ours, \
                llama_server(cache, ggufs, SERVED[precision][1], work / f"llamacpp-{precision}.log") as theirs:
            rows += [{"precision": precision, **row} for row in serve_side_by_side(ours, theirs, quick)]
    single = single_stream(cache, ggufs, demo, slots, folders["ad0"], work, quick, reuse)
    return {"settings": {"quick": quick, "threads": THREADS, "adapters": LOADED, "max_tokens": MAX_TOKENS[quick],
                         "workloads": WORKLOADS[quick], "io_binding": True,
                         "requests_per_client": PER_CLIENT[quick], "repeats": REPEATS[quick], "parallel": PARALLEL,
                         "context_per_slot": CONTEXT_PER_SLOT, "llama_cpp_python_sdist": VERSION,
                         "llama_cpp": llamacpp_version(cache)},
            "rows": rows, "goals": goals(rows), "single_stream": single, "seconds": time.perf_counter() - started}


def workloads_text(s: dict) -> str:
    """Which requests each row's run sent (runs recorded before the workloads spread 8 requests over 8)."""
    if "workloads" not in s:
        return f"request i on adapter i mod {s['adapters']}"
    at = "; ".join(f"{c} client{'s' * (int(c) != 1)}: " + ", ".join(workload(a) for a in counts)
                   for c, counts in s["workloads"].items())
    return ("request i on adapter i mod A: mixed over A = 8 or 16 adapters, or all on adapter 0 (A = 1; there "
            f"llama.cpp may batch every request, since its server batches only requests with equal LoRA lists). Run: "
            f"{at}")


def markdown(r: dict) -> str:
    s = r["settings"]
    flag = " --quick" if s["quick"] else ""
    per_client = ", ".join(f"{n} with {c} client{'s' * (int(c) != 1)}" for c, n in s["requests_per_client"].items())
    lines = [
        "# Beside llama.cpp: `prolora-export serve` and `llama-server` (`bench_llamacpp.py`)",
        "",
        f"`python bench/bench_llamacpp.py{flag}`: the demo model (SmolLM2-135M) in "
        f"{' and '.join(sorted({row.get('precision', 'fp32') for row in r['rows']}))} on both sides (int4: ours "
        "`--quantize int4`, llama.cpp's Q4_0 GGUF; the adapters float), "
        f"{s['adapters']} random PRoLoRA adapters (r=8, u=1, m=n=2, seven projections) loaded in both, "
        f"{s['threads']} threads each; llama.cpp {s['llama_cpp']} (llama-cpp-python {s['llama_cpp_python_sdist']} "
        "sdist). Ours: the `--slots` export, max_batch 32. llama.cpp: `convert_hf_to_gguf.py` (GPT-2 BPE vocabulary "
        "forced), the adapters through `convert --to peft` and `convert_lora_to_gguf.py`, `llama-server "
        f"--lora … --lora-init-without-apply -np {s['parallel']} -c {s['parallel'] * s['context_per_slot']}`.",
        "",
        f"Streamed chat completions, greedy (rows marked so: each server's default sampling, no temperature sent, "
        f"request i seeded with i), {s['max_tokens']} tokens each (`ignore_eos`), C closed-loop clients, "
        f"requests per client {per_client}; {workloads_text(s)} (llama.cpp: per-request `lora` scales, every loaded "
        "LoRA listed, `cache_prompt: false`). The servers' runs alternate (within a client count, each repeat: one "
        "server's workloads back to back, then the other's, the servers' order and the workloads' rotating from "
        f"repeat to repeat), {s['repeats']} each; tokens/s is the median of the runs, TTFT and ITL percentiles "
        "pool every request. The ratios are medians over repeats of each repeat's own ratio (runs minutes apart at "
        "most; this host's speed drifts by 10-30 % over longer spans). The last ratio: our tokens/s over ours with "
        "every request on adapter 0, same precision and clients.",
        "",
        "| precision | clients | requests on | requests | ours tokens/s | llama.cpp tokens/s | ours / llama.cpp | "
        "ours / ours all on adapter 0 | TTFT p50 / p90 ours (ms) | TTFT p50 / p90 llama.cpp (ms) | "
        "ITL p50 / p90 ours (ms) | ITL p50 / p90 llama.cpp (ms) | errors ours / llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        o, t = row["ours"], row["llamacpp"]
        vs_one = row.get("ours_vs_one_adapter")
        lines.append(
            f"| {row.get('precision', 'fp32')} | {row['clients']} | {row.get('workload', workload(s['adapters']))} | "
            f"{row['requests']} | {o['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} | {row['ratio']:.2f}× | "
            f"{'—' if vs_one is None else f'{vs_one:.2f}×'} | {ms(o['ttft_p50_s'])} / {ms(o['ttft_p90_s'])} | "
            f"{ms(t['ttft_p50_s'])} / {ms(t['ttft_p90_s'])} | {ms(o['itl_p50_s'])} / {ms(o['itl_p90_s'])} | "
            f"{ms(t['itl_p50_s'])} / {ms(t['itl_p90_s'])} | {o['errors']} / {t['errors']} |")
    lines += ["", "## Goals (issue 30)", "", "| goal | bound | measured | met |", "|---|---|---|---|"]
    for g in goals(r["rows"]):
        met = "–" if g["met"] is None else ("yes" if g["met"] else "no")
        lines.append(f"| {g['what']} | {g['bound']} | {g['value']} | {met} |")
    single = r["single_stream"]
    lines += [
        "",
        "## Single stream",
        "",
        "Batch 1, no server: `llama-bench` generating "
        f"{s['max_tokens']} tokens from an empty context, and one decode call of our graphs (ONNX Runtime CPU"
        + (", through an IOBinding with the slot inputs bound once, as the engine runs it" if s.get("io_binding")
           else ", its inputs fed as numpy arrays to `session.run`, the slot graph's shard inputs converted on every "
                "call") + f") after {s['max_tokens'] // 2} cached tokens, the mean past length of that run"
        + (". Each round runs every one of them once, in a rotating order; medians over rounds." if
           "rounds_ms" in next(iter(single["ours"].values()), {}) else "."),
        "",
        "| graph | ms per token | tokens/s |",
        "|---|---|---|",
    ]
    labels = {("llamacpp", "f32"): "llama.cpp, base f32 GGUF (llama-bench)",
              ("llamacpp", "q4_0"): "llama.cpp, base Q4_0 GGUF (llama-bench)",
              ("ours", "merged_fp32"): "ours, merged graph (adapter 0) fp32",
              ("ours", "merged_int4"): "ours, merged graph (adapter 0) int4 (`onnx --quantize int4`)",
              ("ours", "slots_fp32"): f"ours, slot graph fp32 (the served one, {s['adapters']} adapters)",
              ("ours", "slots_int4"): f"ours, slot graph int4 (the served one, {s['adapters']} adapters)"}
    for (side, key), label in labels.items():
        if key in single[side]:
            g = single[side][key]
            lines.append(f"| {label} | {g['ms_per_token']:.1f} | {g['tokens_per_s']:.1f} |")
    lines += [
        "",
        "Both servers stay up for the whole run and share the machine's cores with the load generator. "
        "llama-bench times a whole generation (its sampling and graph building included); our figures are one "
        "ONNX Runtime call each.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter requests, one run each")
    parser.add_argument("--work", type=Path, default=None, help="keep the exports and GGUF files in this folder")
    parser.add_argument("--reuse", action="store_true", help="with --work: reuse its exports and GGUF files")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where llama.cpp is built (default {CACHE})")
    parser.add_argument("--build-only", action="store_true", help="build llama.cpp into --cache and stop")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite LLAMACPP.md from llamacpp.json")
    quiet.add_argument(parser)
    args = parser.parse_args()
    if args.build_only:
        print(ensure_llamacpp(args.cache))
        return
    if args.markdown_only:
        results = json.loads((HERE / "llamacpp.json").read_text())
    else:
        ensure_llamacpp(args.cache)  # before the guard: a build is no measurement
        guard = quiet.LoadGuard("llamacpp", THREADS + 1, allow_load=args.allow_load)  # + the load generator
        guard.start()
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
            results = run(args.work, args.quick, args.reuse, args.cache)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
                results = run(Path(tmp), args.quick, False, args.cache)
        guard.save(results, HERE / "llamacpp.json")
    quiet.write_page(HERE / "LLAMACPP.md", markdown(results), results)
    print((HERE / "LLAMACPP.md").read_text())


if __name__ == "__main__":
    main()
