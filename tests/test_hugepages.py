"""Huge pages for a loaded session's memory (prolora_export/hugepages.py) and the shared thread pool
(runtime.share_thread_pool): advisory, so what is checked is that they change no number, find the memory a
load made, and back it with huge pages where the kernel can."""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_native_kernel import node_model, random_tensors

from prolora_export import hugepages
from prolora_export.errors import PRoLoRAError
from prolora_export.runtime import inference_session
from prolora_export.shards import ShardGeometry

MiB = 1 << 20


def private_buffer(size: int) -> tuple[mmap.mmap, np.ndarray]:
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(buffer, np.uint8)
    array[:] = np.arange(size, dtype=np.uint64).astype(np.uint8)  # every page written: resident
    return buffer, array


def huge_bytes(start: int, end: int) -> int:
    """AnonHugePages of the mapping that holds [start, end)."""
    text = Path("/proc/self/smaps").read_text()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        first, last = (int(x, 16) for x in block.split()[0].split("-"))
        if first <= start and end <= last:
            return int(re.search(r"AnonHugePages:\s+(\d+) kB", block).group(1)) * 1024
    raise AssertionError("no mapping holds the buffer")


def test_a_load_finds_the_memory_it_made_and_collapse_keeps_its_bytes():
    if not hugepages.available():
        pytest.skip("no transparent huge pages here")
    with hugepages.LoadedMemory(background=True) as loaded:
        _buffer, array = private_buffer(16 * MiB)
    start = array.ctypes.data
    loaded.thread.join(timeout=60)
    assert any(first <= start and start + 16 * MiB <= end for first, end in hugepages.anonymous_ranges())
    expected = np.arange(16 * MiB, dtype=np.uint64).astype(np.uint8)
    np.testing.assert_array_equal(array, expected)
    if tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) < (6, 1):
        pytest.skip("this kernel has no MADV_COLLAPSE (Linux < 6.1): khugepaged does it later")
    assert loaded.collapsed >= 12 * MiB
    assert huge_bytes(start, start + 16 * MiB) >= 12 * MiB  # the whole 2 MiB blocks inside it
    del array


def test_memory_from_before_the_load_is_left_alone():
    _buffer, array = private_buffer(8 * MiB)
    with hugepages.LoadedMemory() as loaded:
        pass
    assert loaded.collapsed == 0 or hugepages.available()
    start = array.ctypes.data
    assert not any(first <= start < end for first, end in hugepages.anonymous_ranges() - loaded.before)
    del array


def test_sessions_with_huge_pages_compute_the_same_numbers():
    g = ShardGeometry.build(64, 96, 8, 1, 2, 2, True)
    model = node_model(g, 2.0, random_tensors(g, 0), 3)
    x = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32)
    outputs = [inference_session(model, kernel="auto", huge_pages=mode).run(["Y"], {"X": x})[0]
               for mode in ("off", "wait", "background")]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


def test_an_unknown_huge_pages_mode_is_refused_in_one_line():
    with pytest.raises(PRoLoRAError, match="huge_pages must be one of off, wait, background"):
        inference_session(b"", huge_pages="always")


SHARED_POOL = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
from test_native_kernel import node_model, random_tensors
from prolora_export.errors import PRoLoRAError
from prolora_export.runtime import inference_session, session_options, share_thread_pool
from prolora_export.shards import ShardGeometry
share_thread_pool(2)
share_thread_pool(2)  # again, the same: fine
assert not session_options("cpu", threads=2).use_per_session_threads
g = ShardGeometry.build(64, 96, 8, 1, 2, 2, True)
model = node_model(g, 2.0, random_tensors(g, 0), 3)
x = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32)
a, b = (inference_session(model, threads=2).run(["Y"], {{"X": x}})[0] for _ in range(2))
np.testing.assert_array_equal(a, b)
for call in (lambda: share_thread_pool(3), lambda: session_options("cpu", threads=4)):
    try:
        call()
    except PRoLoRAError as err:
        print("refused:", err)
    else:
        raise SystemExit("a second pool size was accepted")
"""


def test_a_shared_pool_runs_every_session_and_refuses_another_size():
    tests = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", SHARED_POOL.format(tests=tests)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("refused:") == 2
    assert "shares a pool of 2" in done.stdout
