"""bench/bench_llamacpp.py's plumbing without llama.cpp: the same requests for both servers, the pooled
figures, and the cached build (no compiler is run here)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

bench = pytest.importorskip("bench_llamacpp")


@pytest.mark.parametrize("adapters", [1, 8, 16])
def test_llamacpp_requests_pick_the_same_adapter_by_lora_scales(adapters: int) -> None:
    bodies = bench.plan(4, adapters, 5, 8)
    for i, body in enumerate(b for mine in bodies for b in mine):
        theirs = bench.for_llamacpp(body)
        assert body["model"] == f"ad{i % adapters}"  # request i on adapter i mod A (A = 1: all on ad0)
        # every loaded LoRA listed, only the request's at scale 1
        assert theirs["lora"] == [{"id": k, "scale": float(k == i % adapters)} for k in range(bench.LOADED)]
        assert theirs["cache_prompt"] is False
        assert {k: v for k, v in theirs.items() if k not in ("lora", "cache_prompt")} == body


def test_pooled_takes_median_rate_and_every_requests_latency() -> None:
    runs = [{"tokens": 100, "seconds": 1.0, "ttft": [0.1], "itl": [0.01, 0.02], "errors": []},
            {"tokens": 100, "seconds": 4.0, "ttft": [0.3], "itl": [0.03], "errors": ["x"]},
            {"tokens": 100, "seconds": 2.0, "ttft": [0.2], "itl": [], "errors": []}]
    out = bench.pooled(runs)
    assert out["tokens_per_s"] == pytest.approx(50.0)
    assert out["ttft_p50_s"] == pytest.approx(0.2)
    assert out["itl_p50_s"] == pytest.approx(0.02)
    assert out["errors"] == 1


def test_build_is_cached_and_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in bench.TOOLS:
        path = bench.tool(tmp_path / "built", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("nothing to build"))
    assert bench.ensure_llamacpp(tmp_path / "built") == bench.source_dir(tmp_path / "built")
    monkeypatch.setattr(bench.shutil, "which", lambda program: None)
    with pytest.raises(SystemExit, match="needs cmake"):
        bench.ensure_llamacpp(tmp_path / "empty")


def test_run_py_lists_the_side_by_side_in_its_goals_table() -> None:
    import run

    row = {"clients": 32, "ratio": 5.0, "ours": {"tokens_per_s": 205.0}, "llamacpp": {"tokens_per_s": 41.0}}
    (goal,) = run.GOALS["llamacpp"]({"settings": {"adapters": 8}, "rows": [row]})  # a run before the workloads
    assert goal == ("#28", "`prolora-export serve` vs `llama-server` tokens/s, 32 client(s), mixed over 8",
                    "205.0 vs 41.0 (5.00×)", None)


def side(tokens_per_s: float, ttft: float = 0.5, itl: float = 0.02) -> dict:
    return {"tokens_per_s": tokens_per_s, "runs_tokens_per_s": [tokens_per_s], "ttft_p50_s": ttft, "ttft_p90_s": ttft,
            "itl_p50_s": itl, "itl_p90_s": itl, "errors": 0}


def fake_rows() -> list[dict]:
    """fp32 rows as serve_side_by_side writes them: 1 client and 32 clients mixed over 8, 16 and all on ad0."""
    rows = [{"precision": "fp32", "clients": 1, "adapters": 8, "workload": bench.workload(8), "requests": 8,
             "ours": side(40.0, itl=0.022), "llamacpp": side(37.0, itl=0.024)}]
    for adapters, ours, theirs in ((8, 210.0, 30.0), (16, 200.0, 25.0), (1, 240.0, 160.0)):
        rows.append({"precision": "fp32", "clients": 32, "adapters": adapters, "workload": bench.workload(adapters),
                     "requests": 64, "ours": side(ours, ttft=1.2), "llamacpp": side(theirs)})
    for row in rows:
        row["ratio"] = row["ours"]["tokens_per_s"] / row["llamacpp"]["tokens_per_s"]
    return bench.with_one_adapter_ratio(rows)


def test_side_by_side_runs_every_workload_interleaved_and_rates_mixed_against_one_adapter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Within a client count, each repeat: one server's workloads back to back, then the other's, both orders
    rotating from repeat to repeat; one row per workload, each saying what its requests were on; a mixed row's
    tokens/s against ours all on adapter 0."""
    calls: list[tuple[str, int, set[str]]] = []
    rate = {("ours", 8): 210, ("ours", 16): 200, ("ours", 1): 240, ("llamacpp", 8): 30, ("llamacpp", 16): 25,
            ("llamacpp", 1): 160}

    async def fake_load(url: str, bodies: list[list[dict]], timeout: float) -> dict:
        flat = [b for mine in bodies for b in mine]
        adapters = {b["model"] for b in flat}
        calls.append((url, len(bodies), adapters))
        if url == "theirs":  # llama.cpp's bodies carry the same adapter as its LoRA at scale 1
            assert all(b["lora"][int(b["model"][2:])]["scale"] == 1.0 for b in flat)
        tokens = sum(b["max_tokens"] for b in flat)
        key = ("ours" if url == "ours" else "llamacpp", len(adapters))
        return {"tokens": tokens, "seconds": tokens / rate.get(key, 100),  # the warm-up and 1 client: 2 adapters
                "ttft": [0.1], "itl": [0.01], "errors": []}

    monkeypatch.setattr(bench, "load", fake_load)
    monkeypatch.setattr(bench, "REPEATS", {True: 2})
    servers = (SimpleNamespace(url="ours"), SimpleNamespace(url="theirs"))
    rows = bench.serve_side_by_side(*servers, True)
    at32 = [(url, len(adapters)) for url, clients, adapters in calls if clients == 32]
    assert at32 == [("ours", 8), ("ours", 16), ("ours", 1), ("theirs", 8), ("theirs", 16), ("theirs", 1),
                    ("theirs", 16), ("theirs", 1), ("theirs", 8), ("ours", 16), ("ours", 1), ("ours", 8)]
    assert [(r["clients"], r["workload"]) for r in rows] == [
        (1, "mixed over 8"), (8, "mixed over 8"), (32, "mixed over 8"), (32, "mixed over 16"),
        (32, "all on adapter 0"), (1, "all on adapter 0, each server's default sampling")]
    sampled = [b for url, clients, adapters in calls for b in [url] if clients == 1][-4:]
    assert sampled == ["ours", "theirs", "theirs", "ours"], "the sampled run alternates too"
    assert rows[-1]["sampling"] == "default" and "ours_vs_one_adapter" not in rows[-1]
    by = {(r["clients"], r["adapters"]): r for r in rows if "sampling" not in r}
    assert by[32, 8]["ours"]["tokens_per_s"] == pytest.approx(210)
    assert by[32, 8]["ratio"] == pytest.approx(7.0)
    assert by[32, 8]["ours_vs_one_adapter"] == pytest.approx(210 / 240)
    assert by[32, 16]["ours_vs_one_adapter"] == pytest.approx(200 / 240)
    assert by[8, 8]["ours_vs_one_adapter"] is None  # no one-adapter run at 8 clients in --quick
    assert "ours_vs_one_adapter" not in by[32, 1]


def test_ratios_pair_the_runs_of_each_repeat() -> None:
    """A repeat's runs share the host's speed of those minutes: the ratio is the median of each repeat's own
    ratio, not a ratio of medians taken from different minutes."""
    mixed, one = {"runs_tokens_per_s": [330, 320, 340]}, {"runs_tokens_per_s": [350, 440, 400]}
    assert bench.paired_ratio(mixed, one) == pytest.approx(340 / 400)  # repeats: 0.94, 0.73, 0.85
    assert statistics.median([330, 320, 340]) / statistics.median([350, 440, 400]) == pytest.approx(0.825)
    with pytest.raises(ValueError):  # a missing run pairs nothing silently
        bench.paired_ratio(mixed, {"runs_tokens_per_s": [350, 440]})


def test_goals_of_issue_30_and_the_page_show_every_workload() -> None:
    rows = fake_rows()
    goals = {g["what"]: g for g in bench.goals(rows)}
    assert goals["fp32, 1 client: ITL p50 ours / llama.cpp"]["met"] is True
    assert goals["fp32, 32 clients over 8 adapters: tokens/s ours / llama.cpp"]["met"] is True  # 7.0 ≥ 6
    mixed = goals["fp32, 32 clients over 8 adapters: tokens/s ours / ours with every request on one adapter"]
    assert mixed["measured"] == pytest.approx(0.875) and mixed["met"] is True
    ttft = goals["fp32, 32 clients over 8 adapters: TTFT p50 ours"]
    assert ttft["met"] is False and ttft["shown"] == "1.20 s (≤ 1 s)"
    results = {"settings": {"quick": True, "threads": 2, "adapters": 16, "max_tokens": 8, "parallel": 32,
                            "context_per_slot": 512, "llama_cpp_python_sdist": "0.3.36", "llama_cpp": "b1",
                            "requests_per_client": {"1": 2, "8": 1, "32": 1}, "repeats": 1, "io_binding": True,
                            "workloads": {"1": [8], "8": [8], "32": [8, 16, 1]}},
               "rows": rows, "goals": bench.goals(rows), "single_stream": {"llamacpp": {}, "ours": {}}}
    page = bench.markdown(results)
    assert "| fp32 | 32 | mixed over 16 | 64 | 200.0 | 25.0 | 8.00× | 0.83× |" in page
    assert "| fp32 | 32 | all on adapter 0 | 64 | 240.0 | 160.0 | 1.50× | — |" in page
    assert "32 clients: mixed over 8, mixed over 16, all on adapter 0" in page
    assert "| fp32, 32 clients over 8 adapters: TTFT p50 ours | ≤ 1 s | 1.20 s | no |" in page
    assert "through an IOBinding with the slot inputs bound once" in page
    listed = run_goals(results)
    assert ("#30", "fp32, 32 clients over 8 adapters: tokens/s ours / llama.cpp", "7.00× (≥ 6×)", True) in listed
    assert listed[-1][1].endswith("32 client(s), all on adapter 0")


def run_goals(results: dict) -> list:
    import run

    return run.GOALS["llamacpp"](results)


def test_default_sampling_sends_no_temperature_and_seeds_each_request() -> None:
    bodies = bench.default_sampling(bench.plan(2, 1, 3, 8))
    flat = [b for mine in bodies for b in mine]
    assert all("temperature" not in b for b in flat) and [b["seed"] for b in flat] == list(range(6))
    assert all(b["model"] == "ad0" and b["stream"] for b in flat)
