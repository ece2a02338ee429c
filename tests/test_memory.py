"""selfreward.memory: the process tree's resident memory, sampled, children included."""

from __future__ import annotations

import subprocess
import sys
import time

from selfreward.memory import TreeMemory, tree_rss_bytes

CHILD = "import sys, time; b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(30)"


def test_a_childs_memory_counts_in_the_tree_and_the_window_peak_resets() -> None:
    with TreeMemory(interval_s=0.1) as memory:
        memory.start_window()
        alone = memory.window_peak()
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "ok"
            time.sleep(0.3)  # a few samples while the child holds its 300 MB
            with_child = memory.window_peak()
            assert with_child >= alone + 290e6, (alone, with_child)
        finally:
            child.kill()
            child.wait()
        memory.start_window()
        after = memory.window_peak()
        assert after < with_child - 250e6  # the window is this stage's, the child is gone
    assert memory.peak >= with_child  # the whole life's peak keeps it
    assert tree_rss_bytes(child.pid) == 0  # a process that is gone holds nothing
