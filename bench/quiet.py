"""Benchmark honesty: what other processes used during every measurement, and no results page from a busy machine.

Pages measured with about nine jobs on two cores once reported a twentieth of the true throughput. Every
timed benchmark therefore runs under one :class:`LoadGuard`:

- at the start it waits (bounded) until the 1-minute load average leaves the cores the benchmark uses
  free: ``load ≤ cores − threads + MARGIN``; nothing of ours runs yet, so all that load is someone else's;
- each measurement is wrapped in :func:`measure`, which records the load average before and after it and
  the CPU that *other* processes used meanwhile: the machine's busy time (``/proc/stat``, steal included)
  less this process's and its descendants' (servers, clients, llama.cpp), in cores. A measurement is quiet
  when others used ≤ ``MARGIN`` cores. The load average cannot judge that: a benchmark's own threads beyond
  ``threads`` (a server's event loop, 32 client connections) raise it too, and it lags a minute. Where
  ``/proc/stat`` is missing the load average judges (``load ≤ cores − threads + MARGIN + threads``);
- :meth:`LoadGuard.save` puts all readings in the results JSON and refuses to write the JSON (and so the
  page) of a run with a reading over its limit; the refused results go to a temporary file. With
  ``--allow-load`` it writes them, and :func:`write_page` stamps the page "taken under load".

The start check's 1-minute load average lags by about a minute: it catches the sustained load that falsified
earlier pages, not a burst of a few seconds; the CPU accounting during a measurement catches both.
Benchmarks that count bytes or judge accuracy (bench_size, quant_parity, quant_sensitivity) measure no time
and run without a guard.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

#: load above the cores a benchmark leaves free that still counts as quiet (shell prompts, cron, the monitor)
MARGIN = 0.5
#: how long a benchmark waits at its start for the machine to become quiet
WAIT_S = 300.0
POLL_S = 10.0

Load = tuple[float, float, float]
#: the busy fields of /proc/stat's "cpu" line: user nice system (idle iowait) irq softirq steal
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)

#: the guard of the running benchmark; :func:`measure` records into it (a no-op without one)
_active: LoadGuard | None = None


def start_limit(threads: int, cores: int, margin: float = MARGIN) -> float:
    """Highest 1-min load average at the start (nothing of ours running) that leaves ``threads`` cores free."""
    return max(cores - min(threads, cores), 0) + margin


def running_limit(threads: int, cores: int, margin: float = MARGIN) -> float:
    """Highest 1-min load average during the run: the free share as at the start, plus our own threads."""
    return start_limit(threads, cores, margin) + min(threads, cores)


def wait_quiet(limit: float, timeout: float = WAIT_S, read: Callable[[], Load] | None = None,
               sleep: Callable[[float], None] = time.sleep, poll: float = POLL_S) -> Load:
    """Poll the load average (``read``, default os.getloadavg) until its 1-min value is ≤ ``limit`` or
    ``timeout`` seconds of polling pass; return the last reading (the caller judges it)."""
    read = read or os.getloadavg
    waited = 0.0
    load = read()
    while load[0] > limit and waited < timeout:
        sleep(poll)
        waited += poll
        load = read()
    return load


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds at one moment: the whole machine's busy time and our process tree's."""

    wall: float
    busy: float
    own: float


def own_cpu_seconds() -> float:
    """CPU seconds of this process and every descendant: the live ones, and the reaped ones as their parents'
    children times (a process that ran and was waited for between two samples is counted at the second)."""
    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # it exited between the listing and the reading: its parent counts it once reaped
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def cpu_sample(stat: Path = Path("/proc/stat")) -> CpuSample | None:
    """The machine's busy CPU seconds and ours now; None where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()[1:]
        busy = sum(int(fields[i]) for i in BUSY_FIELDS) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return CpuSample(time.monotonic(), busy, own_cpu_seconds())


def others_cores(before: CpuSample | None, after: CpuSample | None) -> float | None:
    """The cores other processes kept busy on average between two samples (None: not measurable)."""
    if before is None or after is None or after.wall <= before.wall:
        return None
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(others, 0.0) / (after.wall - before.wall)


class LoadGuard:
    """The load readings of one benchmark run and the verdict on them (see the module docstring)."""

    def __init__(self, name: str, threads: int, *, allow_load: bool = False, cores: int | None = None,
                 margin: float = MARGIN, read: Callable[[], Load] | None = None,
                 cpu: Callable[[], CpuSample | None] = cpu_sample):
        self.name, self.threads, self.allow_load, self.margin = name, threads, allow_load, margin
        self.cores = cores or os.cpu_count() or 1
        self.read, self.cpu = read or os.getloadavg, cpu
        self.start_reading: Load | None = None
        self.readings: list[dict] = []

    @property
    def start_limit(self) -> float:
        return start_limit(self.threads, self.cores, self.margin)

    @property
    def limit(self) -> float:
        return running_limit(self.threads, self.cores, self.margin)

    def start(self, timeout: float = WAIT_S, sleep: Callable[[float], None] = time.sleep) -> None:
        """Wait for a quiet machine (not when loaded runs are allowed), then make this the guard
        :func:`measure` records into. Exits in one line when the machine stays busy, unless allowed."""
        global _active
        load = self.read()
        print(f"{self.name}: load average {fmt(load)} on {self.cores} cores; this benchmark needs "
              f"≤ {self.start_limit:.1f} to start ({self.threads} threads)", flush=True)
        if load[0] > self.start_limit and not self.allow_load:
            load = wait_quiet(self.start_limit, timeout, self.read, sleep)
        self.start_reading = load
        if load[0] > self.start_limit:
            if not self.allow_load:
                raise SystemExit(f"{self.name}: the machine stayed busy for {timeout:.0f} s (load average "
                                 f"{fmt(self.start_reading)} > {self.start_limit:.1f}): rerun on a quiet machine, "
                                 "or pass --allow-load to measure anyway (the page will say 'taken under load')")
            print(f"{self.name}: busy machine, measuring anyway (--allow-load)", flush=True)
        _active = self

    @contextmanager
    def measure(self, label: str) -> Iterator[None]:
        """Record the load average before and after the measurement inside the ``with``, and the cores other
        processes used during it."""
        before, cpu = self.read(), self.cpu()
        yield
        others = others_cores(cpu, self.cpu())
        self.readings.append({"label": label, "before": _rounded(before), "after": _rounded(self.read()),
                              "others": None if others is None else round(others, 2)})

    def record(self) -> dict:
        """What the results JSON keeps: every reading, the limits, and whether the run was under load."""
        start = self.start_reading or self.read()
        others = [r.get("others") for r in self.readings]
        if self.readings and None not in others:  # judged by what others used, not by our own threads' load
            busy = [r["label"] for r, v in zip(self.readings, others, strict=True) if v > self.margin]
        else:
            busy = [r["label"] for r in self.readings if max(r["before"][0], r["after"][0]) > self.limit]
        loads = [r[k][0] for r in self.readings for k in ("before", "after")]
        return {"cores": self.cores, "threads": self.threads, "margin": self.margin,
                "start_limit": self.start_limit, "limit": self.limit, "start": _rounded(start),
                "readings": self.readings, "max_load": round(max([start[0], *loads]), 2),
                "max_others": max((v for v in others if v is not None), default=None), "busy": busy,
                "under_load": start[0] > self.start_limit or bool(busy), "allowed": self.allow_load}

    def check(self, results: dict) -> dict:
        """The load record of this run; refuses a run under load (SystemExit, ``results`` kept in a temporary
        file) unless loaded runs are allowed."""
        record = self.record()
        if record["under_load"] and not self.allow_load:
            kept = Path(tempfile.gettempdir()) / f"prolora-bench-{self.name}.under-load.json"
            kept.write_text(json.dumps({**results, "load": record}, indent=2) + "\n")
            raise SystemExit(f"{self.name}: not writing its results or page: {busy_text(record)}; results kept in "
                             f"{kept}. Rerun on a quiet machine, or pass --allow-load")
        return record

    def save(self, results: dict, path: Path) -> dict:
        """Write ``results`` with this run's load record to ``path`` (see :meth:`check`); return them."""
        results["load"] = self.check(results)
        path.write_text(json.dumps(results, indent=2) + "\n")
        return results


@contextmanager
def measure(label: str) -> Iterator[None]:
    """:meth:`LoadGuard.measure` of the running benchmark's guard; nothing when there is none (a helper
    imported by a test or another benchmark)."""
    if _active is None:
        yield
    else:
        with _active.measure(label):
            yield


def rotated(items: list, by: int) -> list:
    """``items`` started at ``by`` (mod its length): round r of an interleaved comparison runs them in this
    order, so that none always goes first while the host's speed drifts."""
    return items[by % len(items):] + items[:by % len(items)]


def paired_ratio(ours: list[float], peer: list[float]) -> float:
    """The median over rounds of ours / peer, each round's two figures paired (taken minutes apart at most):
    this host's speed drifts by 10-30 % over longer spans, which a ratio of medians from different rounds
    would carry. Rounds must match one to one."""
    return statistics.median(o / p for o, p in zip(ours, peer, strict=True))


def busy_text(load: dict) -> str:
    """Why a run counts as taken under load, in one clause."""
    start, start_limit = (load.get("start") or [0.0])[0], load.get("start_limit", float("inf"))
    if start > start_limit:
        return f"the load average was {start:.1f} at the start (quiet ≤ {start_limit:.1f} on {load['cores']} cores)"
    if load.get("busy") and load.get("max_others") is not None:
        return (f"other processes used up to {load['max_others']:.2f} cores during {len(load['busy'])} "
                f"measurement(s) (quiet ≤ {load.get('margin', MARGIN):.1f})")
    return f"the load average reached {load['max_load']:.1f} (quiet ≤ {load['limit']:.1f} on {load['cores']} cores)"


def quiet_text(load: dict) -> str:
    """What a quiet run's readings were, in one clause."""
    others = load.get("max_others")
    seen = f"other processes used ≤ {others:.2f} cores during every measurement, " if others is not None else ""
    return f"{seen}1-minute load average ≤ {load['max_load']:.1f} ({load['cores']} cores, ours included)"


def worst(records: list[dict | None]) -> dict | None:
    """Of several runs' load records (a page merging runs), the one that judges the page: the most loaded."""
    known = [r for r in records if r]
    return max(known, key=lambda r: (r["under_load"], r["max_load"])) if known else None


def stamp(results: dict) -> str:
    """The line a page starts with: how loaded the machine was, and a warning when it was too loaded."""
    load = results.get("load")
    if load is None:
        return ""
    if load["under_load"]:
        return (f"> **Taken under load** (`--allow-load`): {busy_text(load)}. Other jobs shared the CPU: every "
                "figure on this page is slower and noisier than on a quiet machine; do not quote it.\n\n")
    return f"> Quiet machine: {quiet_text(load)}.\n\n"


def write_page(path: Path, markdown: str, results: dict) -> None:
    """Write a results page that says first (under its title) how loaded the machine was (see :func:`stamp`)."""
    if markdown.startswith("#") and "\n" in markdown:
        title, rest = markdown.split("\n", 1)
        path.write_text(f"{title}\n\n{stamp(results)}{rest.lstrip()}")
    else:
        path.write_text(stamp(results) + markdown)


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-load", action="store_true",
                        help="measure on a busy machine; the page is stamped 'taken under load'")


def fmt(load: Load) -> str:
    return ", ".join(f"{v:.2f}" for v in load)


def _rounded(load: Load) -> list[float]:
    return [round(v, 2) for v in load]
