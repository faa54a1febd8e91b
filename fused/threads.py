"""Torch's thread count, fitted to the cores that other processes leave free.

torch runs its work inside an operation (ATen's parallel loops, MKL's and oneDNN's
products, the fused layer's passes) on a team of torch.get_num_threads() OpenMP threads,
one per core by default. Beside another busy process on the same cores, a team thread
that reaches a barrier waits for a partner that is not running, and it spins while it
waits (libgomp's default), taking the core from its partner and from the other process:
two trainings side by side at two threads each ran 4-85x slower than alone (issue 41),
the fused layer worst, as it crosses several barriers per layer and time step. A team of
one thread crosses none, and two such processes share two cores fairly.

fit() measures how much of this process's CPUs other processes used since its last
measurement (/proc/stat's busy time of those CPUs, less this process's own CPU time) and
sets torch's thread count to the cores they left free, rounded, at least 1 and at most
the count this process had (torch's default, or what its own code set since). larnn.py
calls it before each layer pass and each classifier forward, the fused layer before
each backward pass; between measurements, at least INTERVAL apart, a call reads a clock.
On a quiet machine nothing changes. Where /proc/stat is missing (not Linux), or with
LARNN_THREADS=fixed (benchmarks of one thread count, runs that must repeat bit for bit:
the rounding of a step depends on the number of threads, torch's own ops' included),
fit() does nothing.
"""
import os
import time

import torch

# /proc/stat counts in ticks of 10 ms, so a shorter interval would be mostly rounding:
# over INTERVAL the others' share is known to about 0.1 core per CPU.
INTERVAL = 0.25
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# The columns of a cpuN line of /proc/stat that count busy time: user, nice, system,
# irq, softirq (guest time is inside user). Idle, iowait and steal are not the others'.
BUSY_COLUMNS = (1, 2, 3, 6, 7)


class Fit:
    """What fit() remembers: the CPUs, the thread ceiling and the last measurement."""

    def __init__(self):
        self.pid = os.getpid()
        self.cpus = {f"cpu{n}" for n in os.sched_getaffinity(0)} if hasattr(
            os, "sched_getaffinity") else set()
        self.ceiling = self.chosen = torch.get_num_threads()
        self.last = None  # (wall clock, busy seconds of self.cpus, this process's CPU seconds)


state = None


def busy_seconds(cpus):
    """Seconds the CPUs named in cpus ('cpu0', ...) have been busy since boot, or None
    where /proc/stat cannot tell."""
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu")]
    except OSError:
        return None
    ticks = [sum(int(fields[i]) for i in BUSY_COLUMNS) for fields in lines if fields[0] in cpus]
    return sum(ticks) / TICK if len(ticks) == len(cpus) else None


def fit():
    """Set torch's thread count to the cores other processes left free (module docstring)."""
    global state
    if os.environ.get("LARNN_THREADS") == "fixed":
        return
    if state is None or state.pid != os.getpid():  # first call, or a forked child
        state = Fit()
    now = time.monotonic()
    if state.last is not None and now - state.last[0] < INTERVAL:
        return
    current = torch.get_num_threads()
    if current != state.chosen:  # the program set its own count: the new ceiling
        state.ceiling = state.chosen = current
    busy, own = busy_seconds(state.cpus), time.process_time()
    if busy is None:
        return
    if state.last is not None:
        wall, last_busy, last_own = state.last
        others = max(0.0, (busy - last_busy) - (own - last_own)) / (now - wall)
        threads = max(1, min(state.ceiling, round(len(state.cpus) - others)))
        if threads != current:
            torch.set_num_threads(threads)
            state.chosen = threads
    state.last = (now, busy, own)
