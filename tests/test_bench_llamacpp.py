"""bench/bench_llamacpp.py's plumbing without llama.cpp: the same requests for both servers, the pooled
figures, and the cached build (no compiler is run here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

bench = pytest.importorskip("bench_llamacpp")


def test_llamacpp_requests_pick_the_same_adapter_by_lora_scales() -> None:
    bodies = bench.plan(4, bench.ADAPTERS, 3, 8)
    for i, body in enumerate(b for mine in bodies for b in mine):
        theirs = bench.for_llamacpp(body)
        assert body["model"] == f"ad{i % bench.ADAPTERS}"  # request i on adapter i mod 8
        assert theirs["lora"] == [{"id": k, "scale": float(k == i % bench.ADAPTERS)} for k in range(bench.ADAPTERS)]
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
    (goal,) = run.GOALS["llamacpp"]({"settings": {"adapters": 8}, "rows": [row]})
    assert goal == ("#28", "`prolora-export serve` vs `llama-server` tokens/s, 32 client(s), 8 adapters",
                    "205.0 vs 41.0 (5.00×)", None)
