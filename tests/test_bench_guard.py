"""bench/quiet.py: a benchmark run under load writes no results page (or one stamped as such), judged on
fake load averages; and every timed benchmark in bench/run.py goes through the guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import quiet  # noqa: E402


def reader(*values: float):
    """A fake os.getloadavg returning these 1-min loads in turn (the last one from then on)."""
    seq = list(values)

    def read() -> tuple[float, float, float]:
        value = seq.pop(0) if len(seq) > 1 else seq[0]
        return (value, value, value)

    return read


def guard(*values: float, threads: int = 2, cores: int = 2, allow: bool = False, cpu=lambda: None) -> quiet.LoadGuard:
    """A guard on fake load averages; without CPU samples (``cpu``) the load average judges its readings."""
    return quiet.LoadGuard("demo", threads, cores=cores, allow_load=allow, read=reader(*values), cpu=cpu)


def samples(*points: tuple[float, float, float]):
    """A fake cpu_sample returning these (wall, machine busy, ours) CPU readings in turn."""
    seq = [quiet.CpuSample(*p) for p in points]
    return lambda: seq.pop(0)


def test_limits_leave_the_benchmarks_cores_free() -> None:
    # 2 cores, 2 threads: nobody else at the start; during the run, our own 2 plus the margin
    assert quiet.start_limit(2, 2) == pytest.approx(quiet.MARGIN)
    assert quiet.running_limit(2, 2) == pytest.approx(2 + quiet.MARGIN)
    # 1 thread on 2 cores leaves one core to others; threads beyond the cores count as the cores
    assert quiet.start_limit(1, 2) == pytest.approx(1 + quiet.MARGIN)
    assert quiet.running_limit(3, 2) == quiet.running_limit(2, 2)
    assert quiet.start_limit(2, 16) == pytest.approx(14 + quiet.MARGIN)


def test_wait_quiet_polls_until_quiet_and_is_bounded() -> None:
    sleeps: list[float] = []
    assert quiet.wait_quiet(0.5, timeout=100, read=reader(3.0, 1.0, 0.2), sleep=sleeps.append, poll=10)[0] == 0.2
    assert len(sleeps) == 2
    sleeps.clear()
    assert quiet.wait_quiet(0.5, timeout=30, read=reader(9.0), sleep=sleeps.append, poll=10)[0] == 9.0
    assert len(sleeps) == 3  # gave up after the timeout


def test_quiet_run_is_written_with_its_readings(tmp_path: Path) -> None:
    g = guard(0.1, 1.9, 2.2)
    g.start(timeout=0, sleep=lambda s: None)
    with quiet.measure("decode"):
        pass
    results = g.save({"x": 1}, tmp_path / "r.json")
    stored = json.loads((tmp_path / "r.json").read_text())
    assert stored == results
    load = stored["load"]
    assert not load["under_load"]
    assert load["readings"] == [{"label": "decode", "before": [1.9] * 3, "after": [2.2] * 3, "others": None}]
    assert load["max_load"] == pytest.approx(2.2)
    quiet.write_page(tmp_path / "R.md", "# Title\n\nbody\n", stored)
    page = (tmp_path / "R.md").read_text()
    assert page.startswith("# Title\n\n> Quiet machine") and page.endswith("body\n")


def test_run_under_load_is_refused_and_kept_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quiet.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    g = guard(0.1, 2.0, 9.0)  # someone started seven jobs during the measurement
    g.start(timeout=0)
    with g.measure("decode"):
        pass
    with pytest.raises(SystemExit, match=r"load average reached 9\.0"):
        g.save({"x": 1}, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()
    kept = json.loads((tmp_path / "tmp" / "prolora-bench-demo.under-load.json").read_text())
    assert kept["load"]["under_load"] and kept["x"] == 1


def test_allow_load_writes_a_page_stamped_under_load(tmp_path: Path) -> None:
    g = guard(0.1, 2.0, 9.0, allow=True)
    g.start(timeout=0)
    with g.measure("decode"):
        pass
    results = g.save({}, tmp_path / "r.json")
    assert results["load"]["under_load"] and results["load"]["allowed"]
    quiet.write_page(tmp_path / "R.md", "# Title\nbody\n", results)
    assert "**Taken under load**" in (tmp_path / "R.md").read_text().split("body")[0]


def test_busy_start_refuses_unless_allowed() -> None:
    with pytest.raises(SystemExit, match="stayed busy"):
        guard(3.0).start(timeout=20, sleep=lambda s: None)
    allowed = guard(3.0, allow=True)
    allowed.start(timeout=0)
    assert allowed.record()["under_load"]  # a busy start alone marks the run
    # one thread on two cores tolerates one other job at the start
    guard(1.2, threads=1).start(timeout=0)


def test_what_others_used_judges_a_run_not_our_own_threads_load(tmp_path: Path) -> None:
    # a server, its event loop and 32 clients: load average 3.1, but others used 0.3 of a core in 10 s
    ours = guard(0.1, 3.1, cpu=samples((0, 100, 50), (10, 123, 70)))
    ours.start(timeout=0)
    with ours.measure("32 clients"):
        pass
    load = ours.save({}, tmp_path / "r.json")["load"]
    assert not load["under_load"] and load["max_others"] == pytest.approx(0.3)
    assert "other processes used ≤ 0.30 cores" in quiet.stamp({"load": load})
    # a quiet load average, but another job took a core and a half meanwhile
    theirs = guard(0.1, 1.0, cpu=samples((0, 100, 50), (10, 135, 70)))
    theirs.start(timeout=0)
    with theirs.measure("decode"):
        pass
    with pytest.raises(SystemExit, match=r"other processes used up to 1\.50 cores during 1 measurement"):
        theirs.check({})


def test_our_cpu_counts_reaped_children() -> None:
    before = quiet.cpu_sample()
    assert before is not None  # Linux: /proc/stat is there
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    after = quiet.cpu_sample()
    assert after.own - before.own >= 0.25
    assert after.busy - before.busy >= 0.25
    assert quiet.cpu_sample(Path("/nonexistent/stat")) is None


def test_measure_without_a_guard_does_nothing() -> None:
    quiet._active = None
    with quiet.measure("helper called from a test"):
        pass


def test_worst_record_judges_a_merged_page() -> None:
    quiet_run = {"under_load": False, "max_load": 2.4}
    loaded = {"under_load": True, "max_load": 3.1}
    assert quiet.worst([None, quiet_run, loaded]) is loaded
    assert quiet.worst([None]) is None
    assert quiet.stamp({}) == ""


def test_run_py_checks_the_load_first_and_guards_every_timed_benchmark(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    import run

    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(quiet, "wait_quiet", lambda limit: (9.0, 9.0, 9.0))
    monkeypatch.setattr(run.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no uptime")))
    with pytest.raises(SystemExit, match="busy machine"):
        run.preflight(allow_load=False)
    run.preflight(allow_load=True)
    for name, (script, *_rest) in run.BENCHMARKS.items():
        source = (BENCH / script).read_text()
        guarded = "quiet.LoadGuard(" in source and "quiet.measure(" in source and "quiet.write_page(" in source
        assert guarded == (name not in run.UNTIMED), name
    # a goal measured under load says so in the generated table
    monkeypatch.setattr(run, "HERE", tmp_path)
    (tmp_path / "serve.json").write_text(json.dumps({
        "goal": 0.8, "ratio_at_32_clients_min": 0.9, "errors_total": 0, "load": {"under_load": True}}))
    assert "0.90× (taken under load)" in run.goals_table(["serve"])
