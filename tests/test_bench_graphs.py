"""bench/bench_graphs.py's pure parts: the export commands of each route, the model's fp32 bytes, llama-bench's
JSON, the issue-29 goals and the page, from small fakes; no export, session or benchmark runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import bench_graphs as bg  # noqa: E402
import llama_bench  # noqa: E402

BASE, ADAPTER, WORK = Path("/m/base"), Path("/w/adapter"), Path("/w")


def test_fp32_bytes_counts_every_shard_as_float32(tmp_path: Path) -> None:
    save_file({"a": np.zeros((3, 4), np.float16)}, str(tmp_path / "model-1.safetensors"), metadata={"x": "y"})
    save_file({"b": np.zeros(5, np.float32)}, str(tmp_path / "model-2.safetensors"))
    assert bg.fp32_bytes(tmp_path) == 4 * (12 + 5)


def test_fp32_bytes_refuses_a_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no safetensors"):
        bg.fp32_bytes(tmp_path)


def test_builder_exports_run_in_the_transformers_5_environment_with_their_flags() -> None:
    command = bg.export_command("slots", "int4", BASE, ADAPTER, WORK / "out", WORK / "opt")
    assert command[0] == str(bg.CLI["builder"])
    assert bg.shown_command(command) == "onnx --graph builder --mode compact --slots --quantize int4"
    merged = bg.export_command("merged", "fp32", BASE, ADAPTER, WORK / "out", WORK / "opt")
    assert bg.shown_command(merged) == "onnx --graph builder --mode merged"


def test_unpacked_compact_export_is_build_compact_unpacked_in_the_transformers_5_environment() -> None:
    command = bg.export_command("compact_unpacked", "int4", BASE, ADAPTER, WORK / "out", WORK / "opt")
    assert command[0] == str(bg.CLI["builder"].parent / "python") and command[1] == "-c"
    assert "build_compact(*sys.argv[1:5], packed=False" in command[2]
    assert command[3:] == [str(BASE), str(ADAPTER), str(WORK / "out"), "int4"]
    assert bg.shown_command(command) == "python: build_compact(base, adapter, out, 'int4', packed=False)"


def test_optimum_int4_is_our_quantize_of_the_optimum_fp32_folder() -> None:
    fp32 = bg.export_command("optimum_merged", "fp32", BASE, ADAPTER, WORK / "o32", WORK / "o32")
    assert fp32[0] == str(bg.CLI["optimum"])
    assert bg.shown_command(fp32) == "onnx --graph optimum --mode merged"
    int4 = bg.export_command("optimum_merged", "int4", BASE, ADAPTER, WORK / "o4", WORK / "o32")
    assert int4[1:3] == ["quantize", str(WORK / "o32")]
    assert bg.shown_command(int4) == "quantize --bits 4"


def test_llama_bench_json_becomes_decode_ms_per_token_and_prefill_ms() -> None:
    files = {"f32": Path("/w/model-f32.gguf"), "q4_0": Path("/w/model-q4_0.gguf")}
    entries = [
        {"model_filename": "/w/model-f32.gguf", "n_prompt": 0, "n_gen": 16, "avg_ts": 50.0},
        {"model_filename": "/w/model-q4_0.gguf", "n_prompt": 0, "n_gen": 16, "avg_ts": 250.0},
        {"model_filename": "/w/model-f32.gguf", "n_prompt": 128, "n_gen": 0, "avg_ts": 512.0},
    ]
    got = llama_bench.parse(entries, files)
    assert got["f32"] == {"decode_b1": pytest.approx(20.0), "prefill_128": pytest.approx(250.0)}
    assert got["q4_0"] == {"decode_b1": pytest.approx(4.0)}


def latency(scale: float) -> dict:
    """Fake ms for every timed graph: optimum 20, builder merged 10, compact 10.3, unpacked 10.8, others 12; × scale."""
    ms = {"optimum_merged": 20.0, "merged": 10.0, "compact_kernel": 10.3, "compact_body": 12.0,
          "compact_unpacked_kernel": 10.8, "slots": 12.0}
    return {g: {m: v * scale for m in bg.METRICS} for g, v in ms.items()}


def fake_model(llamacpp: dict) -> dict:
    exports = [{"graph": g, "precision": p, "command": "onnx …", "seconds": 10.0, "peak_rss": rss * 10**6,
                "largest_process_rss": rss * 10**6, "reused": False}
               for (g, p), rss in zip(bg.EXPORTS, (3000, 1000, 1200, 1150, 1100, 500, 1300, 1400, 1380, 1350),
                                             strict=True)]
    return {"hidden": 576, "layers": 30, "fp32_bytes": 10**9, "native_kernel": True, "exports": exports,
            "latency": {"fp32": latency(1.0), "int4": latency(0.5)}, "llamacpp": llamacpp,
            "seconds": {"exports": 60.0, "latency": 120.0, "llamacpp": 30.0}}


def test_goals_judge_the_demo_model_and_leave_llamacpp_open_when_skipped() -> None:
    goals = {g["what"]: g for g in bg.goals({"demo": fake_model({"skipped": "not built"})})}
    compact = goals["fp32 decode batch 1: compact_kernel / builder merged"]
    assert compact["measured"] == pytest.approx(1.03) and compact["met"]
    unpacked = goals["fp32 decode batch 1: compact_unpacked_kernel / builder merged"]
    assert unpacked["measured"] == pytest.approx(1.08) and unpacked["met"] is False
    assert goals["fp32 decode batch 16: builder merged / optimum merged"]["measured"] == pytest.approx(0.5)
    assert goals["int4 decode batch 1: compact_kernel / llama.cpp Q4_0"]["met"] is None
    rss = goals["int4 export peak RSS / model fp32 bytes (worst builder export: compact)"]
    assert rss["measured"] == pytest.approx(1.4) and rss["met"]
    assert goals["fp32 export peak RSS / model fp32 bytes (worst builder export: compact)"]["measured"] == 1.2


def test_ratios_pair_the_graphs_round_by_round() -> None:
    """A ratio of two graphs is the median of each round's own ratio (their calls seconds apart), not a ratio of
    medians taken from different rounds; results recorded without rounds keep the ratio of medians."""
    graphs = {"merged": {"decode_b1": 6.0, "rounds": {"decode_b1": [6.0, 5.0, 7.0]}},
              "compact_kernel": {"decode_b1": 7.0, "rounds": {"decode_b1": [6.6, 6.0, 7.0]}}}
    assert bg.paired(graphs, "compact_kernel", "merged", "decode_b1") == pytest.approx(1.1)  # 1.1, 1.2, 1.0
    assert 7.0 / 6.0 == pytest.approx(1.1667, abs=1e-4)  # what a ratio of the medians would say
    old = {g: {"decode_b1": v["decode_b1"]} for g, v in graphs.items()}
    assert bg.paired(old, "compact_kernel", "merged", "decode_b1") == pytest.approx(7.0 / 6.0)
    assert bg.paired(old, "slots", "merged", "decode_b1") is None


class FakeDecoder:
    """A graph for latency(): each call logs its name and takes ``ms`` from its list, in order."""

    def __init__(self, name: str, log: list[str], ms: list[float]):
        self.name, self.log, self.ms = name, log, iter(ms)
        self.kv = {"past_key_values.0.key": (1, 2)}

    def run(self, ids: np.ndarray, past: dict) -> tuple[float, np.ndarray, dict]:
        self.log.append(self.name)
        return next(self.ms) / 1e3, np.zeros((ids.shape[0], 1, 4), np.float32), past


def test_a_peer_runs_in_every_round_beside_the_graphs_and_pairs_round_by_round() -> None:
    """llama-bench runs once in each round, alternately after and before the graphs, so that the Q4_0 goal pairs it
    with the graphs' calls of the same round, not with a minute of the host minutes later."""
    log: list[str] = []
    # a warm-up loop, then 3 rounds, each loop 1 + 2 steps (the first not counted): the rounds' figures are 5, 6, 8
    graph = FakeDecoder("compact", log, [99.0] * 3 + [0.0, 5.0, 5.0] + [0.0, 6.0, 6.0] + [0.0, 8.0, 8.0])
    peer_ms = iter([5.0, 4.0, 8.0])

    def peer(metrics: tuple[str, ...], steps: int) -> dict[str, float]:
        assert metrics == ("decode_b1",) and steps == 2
        log.append("llama-bench")
        return {"decode_b1": next(peer_ms)}

    got = bg.latency({"compact_kernel": graph}, 3, 2, "test", ("decode_b1",), {"llamacpp": peer})
    assert log == ["compact"] * 6 + ["llama-bench"] * 2 + ["compact"] * 6 + ["llama-bench"]
    assert got["llamacpp"] == {"decode_b1": 5.0, "rounds": {"decode_b1": [5.0, 4.0, 8.0]}}
    assert got["compact_kernel"]["rounds"]["decode_b1"] == [5.0, 6.0, 8.0]
    # each round's own ratio: 1.0, 1.5, 1.0 -> 1.0 (a ratio of the medians would say 6 / 5 = 1.2)
    model = fake_model({"q4_0": got["llamacpp"]})
    model["latency"]["int4"]["compact_kernel"] = got["compact_kernel"]
    goal = next(g for g in bg.goals({"demo": model}) if g["what"].endswith("/ llama.cpp Q4_0"))
    assert goal["measured"] == pytest.approx(1.0)


def test_llama_bench_times_one_run_per_call_at_the_graphs_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def run(command: list[str], **_) -> object:
        commands.append(command)
        if "-d" in command:
            out = [{"model_filename": "/w/model-q4_0.gguf", "n_prompt": 0, "n_gen": 12, "avg_ts": 200.0}]
        else:
            out = [{"model_filename": "/w/model-q4_0.gguf", "n_prompt": n, "n_gen": 0, "avg_ts": 1000.0}
                   for n in (32, 512)]
        return type("Done", (), {"returncode": 0, "stdout": json.dumps(out), "stderr": ""})()

    monkeypatch.setattr(llama_bench.subprocess, "run", run)
    peer = llama_bench.LlamaBench(Path("/l/llama-bench"), Path("/w/model-q4_0.gguf"), bg.THREADS, depth=bg.PAST)
    got = peer(("decode_b1", "decode_b16", "prefill_32", "prefill_512"), 12)
    assert got == {"decode_b1": pytest.approx(5.0), "prefill_32": pytest.approx(32.0),
                   "prefill_512": pytest.approx(512.0)}
    decode, prefill = commands
    for command in commands:
        assert command[0] == "/l/llama-bench" and command[command.index("-r") + 1] == "1"
        assert command[command.index("-t") + 1] == str(bg.THREADS)
        assert command[command.index("-m") + 1] == "/w/model-q4_0.gguf"
    assert decode[decode.index("-n") + 1] == "12" and decode[decode.index("-d") + 1] == str(bg.PAST)
    assert prefill[prefill.index("-p") + 1] == "32,512" and "-d" not in prefill  # prompts on an empty context


def test_page_shows_every_graph_llamacpp_and_the_exports() -> None:
    model = fake_model({"f32": {m: 8.0 for m in bg.METRICS if m != "decode_b16"},
                        "q4_0": {"decode_b1": 5.0, "prefill_32": 30.0}})
    results = {"models": {"demo": model}, "goals": bg.goals({"demo": model}),
               "settings": {"quick": True, "full": False, "threads": 2, "past": 128, "rounds": 3, "decode_steps": 6,
                            "llama_bench_repeats": 2, "onnxruntime": "1.32.0", "export_s": 80.0, "wall_s": 300.0,
                            "builder_env": {"onnxruntime-genai": "0.18.0", "transformers": "5.25.0"}}}
    page = bg.markdown(results)
    assert "`python bench/bench_graphs.py --quick`" in page
    for label in ("optimum merged (today)", "builder compact, native kernel", "llama.cpp llama-bench Q4_0",
                  "builder compact on unpacked Q/K/V, native kernel", "builder compact, unpacked Q/K/V | int4"):
        assert label in page
    q4 = next(line for line in page.splitlines() if line.startswith("| int4 | llama.cpp"))
    assert "| 5.0 | – | 30.0 | – |" in q4  # what llama-bench did not measure stays empty
    assert "int4 decode batch 1: compact_kernel / llama.cpp Q4_0 | ≤ 1.50× | 1.030× | yes |" in page
    assert "exports 1.0 min, latency 2.0 min, llamacpp 0.5 min" in page
    assert "| demo | builder slots | int4 | `onnx …` | 10.0 | 1350 | 1350 | 1.35× |" in page


def test_page_shows_the_scale_model_compact_beside_merged_and_its_export() -> None:
    """--full's 1.1B model: its int4 compact graph against merged (decode ratios), and the export's peak RSS."""
    model = fake_model({"skipped": "not built"})
    scale = {"hidden": 2048, "layers": 22, "fp32_bytes": 4.4e9, "native_kernel": True,
             "exports": [{"graph": g, "precision": p, "command": "onnx …", "seconds": 130.0, "peak_rss": rss,
                          "largest_process_rss": rss, "reused": False}
                         for (g, p), rss in zip(bg.SCALE_EXPORTS, (2.2e9, 2.6e9), strict=True)],
             "latency": {"int4": {"merged": dict.fromkeys(bg.SCALE_METRICS, 40.0),
                                  "compact_kernel": dict.fromkeys(bg.SCALE_METRICS, 42.0)}}}
    results = {"models": {"demo": model}, "scale": scale, "goals": bg.goals({"demo": model}),
               "settings": {"quick": False, "full": True, "threads": 2, "past": 128, "rounds": 7, "decode_steps": 12,
                            "llama_bench_repeats": 5, "onnxruntime": "1.32.0", "export_s": 80.0, "wall_s": 300.0,
                            "builder_env": {"onnxruntime-genai": "0.18.0", "transformers": "5.25.0"}}}
    page = bg.markdown(results)
    assert "## tinyllama-1.1b (TinyLlama-1.1B's shape: hidden 2048, 22 blocks, 4.40 GB as fp32" in page
    assert "| builder compact, native kernel | 42.0 | 42.0 | 42.0 | 1.05× | 1.05× |" in page
    assert "Compact int4 export: 130 s, peak RSS 2.20 GB (0.50× the fp32 bytes)." in page
    assert "| tinyllama-1.1b | builder merged | int4 | `onnx …` | 130.0 | 2600 | 2600 | 0.59× |" in page


def test_a_synthetic_models_tokenizer_is_cut_to_its_vocabulary(tmp_path: Path, demo_model: Path) -> None:
    from transformers import AutoTokenizer

    bg.fitted_tokenizer(demo_model, tmp_path, 4096)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert max(tokenizer.get_vocab().values()) == 4095  # what llama.cpp's converter asserts: every id < vocab
    text = "Hello, who are you? def fibonacci(n):"
    ids = tokenizer(text).input_ids
    assert max(ids) < 4096 and tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2  # the special tokens keep their ids
    full = tmp_path / "full"
    full.mkdir()
    bg.fitted_tokenizer(demo_model, full, 49152)  # a vocabulary as large as the demo's: the files as they are
    assert (full / "tokenizer.json").read_bytes() == (demo_model / "tokenizer.json").read_bytes()
