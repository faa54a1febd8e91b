"""fused/threads.py: torch's thread count follows the cores other processes leave free."""
import os
import subprocess
import sys
import time

import pytest
import torch

from fused import threads


@pytest.fixture
def machine(monkeypatch):
    """A fake two-core machine whose clock, busy time and own CPU time the test moves;
    torch's thread count is restored afterwards."""
    clock = {"wall": 100.0, "busy": 50.0, "own": 10.0}
    monkeypatch.delenv("LARNN_THREADS", raising=False)
    monkeypatch.setattr(threads, "state", None)
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(threads.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(threads, "busy_seconds", lambda cpus: clock["busy"])
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    def run(seconds, own_cores, other_cores):
        """seconds pass, this process using own_cores and the others other_cores; fit()."""
        clock["wall"] += seconds
        clock["own"] += own_cores * seconds
        clock["busy"] += (own_cores + other_cores) * seconds
        threads.fit()
        return torch.get_num_threads()

    yield run
    torch.set_num_threads(before)


def test_one_thread_while_another_process_is_busy_then_all_again(machine):
    assert machine(0, 0, 0) == 2            # the first call only measures
    assert machine(0.5, 2.0, 0.0) == 2      # quiet: the default stays
    assert machine(0.5, 1.4, 0.6) == 1      # a neighbour got 0.6 of a core beside our two
    assert machine(0.5, 1.0, 1.0) == 1      # a fair share, kept
    assert machine(0.5, 1.0, 0.3) == 2      # it has gone (its last 0.3 core)


def test_never_above_the_count_the_program_set(machine):
    machine(0, 0, 0)
    assert machine(0.5, 2.0, 0.0) == 2
    torch.set_num_threads(1)                # the program's own choice: a new ceiling
    assert machine(0.5, 1.0, 0.0) == 1
    torch.set_num_threads(2)                # raised by the program
    assert machine(0.5, 2.0, 0.0) == 2
    assert machine(0.5, 1.0, 1.0) == 1


def test_measures_only_after_an_interval(machine):
    machine(0, 0, 0)
    assert machine(threads.INTERVAL / 2, 0.0, 2.0) == 2   # too short to measure
    assert machine(threads.INTERVAL, 0.0, 2.0) == 1       # the whole span counts


def test_does_nothing_when_fixed_or_blind(machine, monkeypatch):
    machine(0, 0, 0)
    monkeypatch.setenv("LARNN_THREADS", "fixed")
    assert machine(0.5, 0.0, 2.0) == 2
    monkeypatch.delenv("LARNN_THREADS")
    monkeypatch.setattr(threads, "busy_seconds", lambda cpus: None)  # no /proc/stat
    assert machine(0.5, 0.0, 2.0) == 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_busy_seconds_reads_this_machines_cpus():
    cpus = {f"cpu{n}" for n in os.sched_getaffinity(0)}
    busy = threads.busy_seconds(cpus)
    assert busy > 0
    assert threads.busy_seconds({"cpu100000"}) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) != 2,
                    reason="a two-core Linux machine")
def test_a_real_busy_loop_beside_gives_one_thread(monkeypatch):
    """On two cores with a busy loop beside, the loop leaves at most one core free (more
    load on the machine leaves less), so fit() goes to one thread."""
    monkeypatch.delenv("LARNN_THREADS", raising=False)
    monkeypatch.setattr(threads, "state", None)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        threads.fit()
        time.sleep(2 * threads.INTERVAL)
        threads.fit()
        assert torch.get_num_threads() == 1
    finally:
        loop.kill()
        loop.wait()
        torch.set_num_threads(before)
