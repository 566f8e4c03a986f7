"""bench/run.py --render-only: the README's results block shows ours beside the peer a user would pick
(llama.cpp, PEFT, a merged graph), not a checklist of issue goals; each caption says its command, date and
load, and figures taken under load are marked. Rendered from small fake JSON files; no benchmark runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import run  # noqa: E402

MACHINE = {"cpu": "Test CPU", "cores": 2, "ram_gib": 8.0, "python": "3.11", "gpu": None, "torch": "2",
           "transformers": "4", "optimum": "2", "optimum-onnx": "0.1", "onnx": "1", "onnxruntime": "1", "peft": "0.1"}
QUIET = {"under_load": False, "max_load": 2.1, "cores": 2, "limit": 3.5}
LOADED = {"under_load": True, "max_load": 7.9, "cores": 2, "limit": 2.5}


def side(tokens_per_s: float, ttft: float, itl: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "ttft_p50_s": ttft, "ttft_p90_s": ttft, "itl_p50_s": itl,
            "itl_p90_s": itl, "errors": 0}


LLAMACPP = {
    "settings": {"quick": False, "threads": 2, "adapters": 8, "max_tokens": 32},
    "rows": [{"clients": 1, "requests": 8, "ours": side(32.0, 0.05, 0.03), "llamacpp": side(37.6, 0.04, 0.026),
              "ratio": 32.0 / 37.6},
             {"clients": 32, "requests": 64, "ours": side(205.0, 0.4, 0.15), "llamacpp": side(41.0, 2.0, 0.7),
              "ratio": 5.0}],
    "single_stream": {"llamacpp": {"f32": {"ms_per_token": 20.0}, "q4_0": {"ms_per_token": 10.0}},
                      "ours": {"merged_fp32": {"ms_per_token": 25.0}, "merged_int4": {"ms_per_token": 15.0}}},
    "load": QUIET,
}


def merge_run(load: dict | None) -> dict:
    model = {"name": "demo (fp32)", "bytes": 538e6, "ours": {"median_seconds": 3.0, "median_rss_mib": 250.0},
             "peft": {"median_seconds": 10.0, "median_rss_mib": 1000.0}}
    return {"command": "python bench/bench_merge.py", "runs": 3, "models": [model],
            **({"load": load} if load else {})}


@pytest.fixture
def bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bench folder of fake results, a README with the markers, and no way to run a benchmark."""
    monkeypatch.setattr(run, "HERE", tmp_path)
    monkeypatch.setattr(run, "README", tmp_path / "README.md")
    (tmp_path / "README.md").write_text(f"# Demo\n\n## Results\n\n{run.MARKERS[0]}\nold table\n{run.MARKERS[1]}\n")
    (tmp_path / "results.json").write_text(json.dumps(
        {"machine": MACHINE, "command": "python bench/run.py", "date": "2026-12-01 10:00 UTC", "benchmarks": {}}))

    def no_benchmark(*args, **kwargs):
        raise AssertionError(f"a benchmark or command ran: {args}")

    monkeypatch.setattr(run.subprocess, "run", no_benchmark)
    monkeypatch.setattr(run, "preflight", no_benchmark)
    return tmp_path


def render(monkeypatch: pytest.MonkeyPatch, bench: Path) -> str:
    """``run.py --render-only``; the README's results block."""
    monkeypatch.setattr(sys, "argv", ["run.py", "--render-only"])
    run.main()
    readme = (bench / "README.md").read_text()
    return readme[readme.index(run.MARKERS[0]):readme.index(run.MARKERS[1])]


def table_rows(block: str, header_start: str) -> list[str]:
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_readme_shows_ours_beside_llamacpp_and_marks_a_loaded_run(monkeypatch: pytest.MonkeyPatch,
                                                                   bench: Path) -> None:
    (bench / "llamacpp.json").write_text(json.dumps(LLAMACPP))
    (bench / "merge.json").write_text(json.dumps(merge_run(LOADED)))
    block = render(monkeypatch, bench)
    # ours and llama-server side by side, per client count, with the ratio
    assert ("| weights | clients | requests on | ours tokens/s | llama-server tokens/s | ours / llama.cpp | "
            "ours / ours all on adapter 0 |") in block
    assert table_rows(block, "| weights | clients |")[1].startswith(  # a run before the workloads: over all 8
        "| fp32 | 32 | mixed over 8 | 205.0 | 41.0 | 5.00× | — | 400 / 2000 | 150 / 700 |")
    assert "| 4-bit: our int4 merged graph / base Q4_0 GGUF | 15.0 | 10.0 | 1.50× |" in block
    # a quiet run says so and is not marked; its caption names the command
    assert "From `python bench/bench_llamacpp.py`, date not recorded, quiet machine" in block
    assert all(run.UNDER_LOAD not in row for row in table_rows(block, "| weights | clients |"))
    # a run taken under load: its caption says so and every figure of it is marked
    assert "From `python bench/bench_merge.py`, date not recorded, **taken under load**" in block
    merge_row = table_rows(block, "| model (fp32) |")[0]
    assert merge_row.startswith("| demo (0.54 GB) | 3.0 ⚠ | 10.0 ⚠ | 0.30× ⚠ |")
    # no checklist of issue goals in the README; it stays in RESULTS.md
    assert "| issue | goal |" not in block and "old table" not in block
    assert "| issue | goal | measured | met |" in (bench / "RESULTS.md").read_text()
    assert "## Beside the peers" in (bench / "RESULTS.md").read_text()


def test_readme_shows_each_workload_beside_llamacpp_and_ours_mixed_over_all_on_one(
        monkeypatch: pytest.MonkeyPatch, bench: Path) -> None:
    rows = [{"clients": 32, "adapters": a, "workload": w, "requests": 64, "ours": side(o, 0.4, 0.15),
             "llamacpp": side(t, 2.0, 0.7), "ratio": o / t, **extra}
            for a, w, o, t, extra in ((8, "mixed over 8", 210.0, 30.0, {"ours_vs_one_adapter": 0.875}),
                                      (16, "mixed over 16", 200.0, 25.0, {"ours_vs_one_adapter": 200 / 240}),
                                      (1, "all on adapter 0", 240.0, 160.0, {}))]
    goal = {"what": "fp32, 32 clients over 8 adapters: tokens/s ours / llama.cpp", "shown": "7.00× (≥ 6×)",
            "met": True}
    (bench / "llamacpp.json").write_text(json.dumps({**LLAMACPP, "settings": {**LLAMACPP["settings"], "adapters": 16},
                                                     "rows": rows, "goals": [goal]}))
    block = render(monkeypatch, bench)
    assert "**Serving many adapters (16 loaded)" in block
    assert table_rows(block, "| weights | clients |") == [
        "| fp32 | 32 | mixed over 8 | 210.0 | 30.0 | 7.00× | 0.88× | 400 / 2000 | 150 / 700 | 0 / 0 |",
        "| fp32 | 32 | mixed over 16 | 200.0 | 25.0 | 8.00× | 0.83× | 400 / 2000 | 150 / 700 | 0 / 0 |",
        "| fp32 | 32 | all on adapter 0 | 240.0 | 160.0 | 1.50× | — | 400 / 2000 | 150 / 700 | 0 / 0 |"]
    # issue 30's verdicts go to RESULTS.md's goals table, not the README
    assert "| #30 | fp32, 32 clients over 8 adapters: tokens/s ours / llama.cpp | 7.00× (≥ 6×) | ✅ |" in (
        bench / "RESULTS.md").read_text()
    assert "#30" not in block


def test_without_llamacpp_json_the_page_renders_from_the_others(monkeypatch: pytest.MonkeyPatch,
                                                                bench: Path) -> None:
    (bench / "merge.json").write_text(json.dumps(merge_run(None)))
    results = json.loads((bench / "results.json").read_text())
    results["benchmarks"]["merge"] = {"script": "bench_merge.py", "exit_code": 0, "seconds": 60.0, "quick": False,
                                      "date": "2026-11-24 17:30 UTC", "results": merge_run(None)}
    (bench / "results.json").write_text(json.dumps(results))
    block = render(monkeypatch, bench)
    assert "llama-server" not in block and "| weights | clients |" not in block
    # an older JSON: no load section; the date is run.py's, since its entry holds this very JSON
    assert "From `python bench/bench_merge.py`, 2026-11-24 17:30 UTC, load not recorded." in block
    assert "| ours s | PEFT s | ours / PEFT |" in block and run.UNDER_LOAD not in block


def test_a_results_file_missing_a_key_is_one_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                  bench: Path) -> None:
    (bench / "llamacpp.json").write_text(json.dumps({"settings": LLAMACPP["settings"], "rows": []}))
    block = render(monkeypatch, bench)
    assert "*single stream table: a results file lacks 'single_stream'; rerun it.*" in block


def test_decoder_graph_table_puts_ours_beside_optimum_and_llamacpp():
    latency = {"decode_b1": 20.0, "decode_b16": 40.0, "prefill_128": 200.0}
    data = {"models": {"demo": {"latency": {"fp32": {"optimum_merged": {**latency, "decode_b1": 25.0},
                                                     "merged": latency, "compact_kernel": latency}},
                                "llamacpp": {"f32": {"decode_b1": 18.0, "prefill_128": 150.0}}}},
            "load": QUIET}
    source = run.Source("graphs", data, "python bench/bench_graphs.py --quick", None)
    table = run._graphs_table({"graphs": source}).render()
    assert "optimum's traced graph" in table and "ours: model builder graph + our op" in table
    assert "llama.cpp `llama-bench`, base f32 GGUF | 18.0" in table
    assert "| 0.80× |" in table  # ours merged decode b1 / optimum's


def test_single_stream_ratios_pair_the_rounds_where_the_run_kept_them(monkeypatch: pytest.MonkeyPatch,
                                                                        bench: Path) -> None:
    """llama-bench timed in our rounds: the README's ratio is the median of each round's own (1.0 here), not a
    ratio of the medians (1.2)."""
    single = {"llamacpp": {"q4_0": {"ms_per_token": 5.0, "rounds_ms": [5.0, 4.0, 8.0]}},
              "ours": {"merged_int4": {"ms_per_token": 6.0, "rounds_ms": [5.0, 6.0, 8.0]}}}
    (bench / "llamacpp.json").write_text(json.dumps({**LLAMACPP, "single_stream": single}))
    assert "| 4-bit: our int4 merged graph / base Q4_0 GGUF | 6.0 | 5.0 | 1.00× |" in render(monkeypatch, bench)


def test_decoder_graph_table_pairs_llama_bench_round_by_round() -> None:
    rounds = {"decode_b1": [5.0, 6.0, 8.0]}
    graphs = {"optimum_merged": {"decode_b1": 6.0, "decode_b16": 40.0, "prefill_128": 200.0, "rounds": rounds}}
    data = {"models": {"demo": {"latency": {"int4": graphs}, "llamacpp": {"q4_0": {
        "decode_b1": 5.0, "prefill_128": 150.0, "rounds": {"decode_b1": [5.0, 4.0, 8.0]}}}}}, "load": QUIET}
    table = run._graphs_table({"graphs": run.Source("graphs", data, "python bench/bench_graphs.py", None)}).render()
    # llama-bench / optimum's, round by round: 1, 2/3, 1 -> 1.00 (a ratio of the medians: 5 / 6 = 0.83)
    assert "llama.cpp `llama-bench`, base Q4_0 GGUF | 5.0 | — | 150 | 1.00× |" in table


def test_quantized_verdicts_from_other_presets_are_flagged():
    from prolora_export.parity import GATES, PRESETS

    current = {name: {gate: getattr(PRESETS[name], field) for gate, (field, _, _) in GATES.items()}
               for name in ("int8-cpu", "int4-cpu")}
    assert not run._presets_changed(current)
    assert run._presets_changed({"int4-cpu": {**current["int4-cpu"], "rel": 0.78}})


def test_a_failed_run_keeps_the_dates_of_the_figures_it_did_not_replace(monkeypatch: pytest.MonkeyPatch,
                                                                       bench: Path) -> None:
    (bench / "merge.json").write_text(json.dumps(merge_run(QUIET)))
    (bench / "RESULTS.md").write_text("")
    (bench / "MERGE.md").write_text("# Merge\n")
    results = json.loads((bench / "results.json").read_text())
    results["benchmarks"]["merge"] = {"script": "bench_merge.py", "exit_code": 0, "seconds": 60.0, "quick": False,
                                      "date": "2026-11-24 17:30 UTC", "results": merge_run(QUIET)}
    (bench / "results.json").write_text(json.dumps(results))

    class Refused:  # a run refused under load: exit 1, merge.json as it was
        returncode = 1

    monkeypatch.setattr(run.subprocess, "run", lambda *args, **kwargs: Refused())
    monkeypatch.setattr(run, "preflight", lambda allow_load: None)
    monkeypatch.setattr(run, "machine", lambda: MACHINE)
    monkeypatch.setattr(sys, "argv", ["run.py", "--only", "merge"])
    with pytest.raises(SystemExit, match=r"benchmarks failed: \['merge'\]"):
        run.main()
    entry = json.loads((bench / "results.json").read_text())["benchmarks"]["merge"]
    assert entry["date"] == "2026-11-24 17:30 UTC" and entry["exit_code"] == 0
    assert entry["failed_attempt"]["exit_code"] == 1
    readme = (bench / "README.md").read_text()
    assert "From `python bench/bench_merge.py`, 2026-11-24 17:30 UTC, quiet machine" in readme
    heading = next(line for line in (bench / "RESULTS.md").read_text().splitlines() if line.startswith("## merge"))
    assert "run of 2026-11-24 17:30 UTC" in heading and "a later run" in heading
    assert "FAILED with exit code 1" in heading

    class Done:  # the next run succeeds and writes new figures: the failure note goes
        returncode = 0

    (bench / "merge.json").write_text(json.dumps({**merge_run(QUIET), "runs": 5}))
    monkeypatch.setattr(run.subprocess, "run", lambda *args, **kwargs: Done())
    run.main()
    entry = json.loads((bench / "results.json").read_text())["benchmarks"]["merge"]
    assert "failed_attempt" not in entry and entry["results"]["runs"] == 5 and entry["date"] != "2026-11-24 17:30 UTC"
