"""Lets the tests import the top-level modules (larnn, datasets, train, ...), the
scripts in results/ and the helpers in this folder; the tiny config TINY, the fixture
installed (a tiny archive installed as a user installs one), one_fixed_thread for tests
that compare trainings, kill_when for the interruption tests and HANG_S, their time
limit."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "results"), str(ROOT / "tests")]

import datasets  # noqa: E402 (needs the path above)
import fakedata  # noqa: E402
import train  # noqa: E402

TINY = dict(train.PAPER_CONFIG, hidden_size=8, attention_heads=2, larnn_window_size=4,
            num_layers=2, batch_size=16, training_epochs=3, decay_each_N_epoch=2,
            learning_rate=0.01)


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: needs Ray Tune (requirements-distributed.txt)")


# How long a command of the tests may take before it counts as hung: a guard, not a
# speed check. Idle, the longest (a Ray search) takes about a minute; beside two busy
# processes the whole suite ran about five times slower (2026-12-01).
HANG_S = 1200


@pytest.fixture
def one_fixed_thread(monkeypatch):
    """One thread, fixed, here and in the commands a test starts. Tests that compare two
    trainings need the same rounding in both, so the same number of threads, which
    fused/threads.py would otherwise fit to the machine's load; one thread also shares a
    loaded machine fairly."""
    monkeypatch.setenv("LARNN_THREADS", "fixed")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kill_when(command, done, timeout=HANG_S):
    """Start command and SIGKILL its process group as soon as done() holds. Fails if it
    exits first or timeout seconds pass; the group (the command and the workers it
    started) is killed either way, so a failing test leaves nothing running."""
    # One thread: a new session is its own scheduling group (Linux autogroup), and two
    # OpenMP threads sharing one core with a busy neighbour ran a tiny model 25x slower.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + timeout
        while not done():
            assert process.poll() is None, "the command ended before it could be killed"
            assert time.time() < deadline, f"not ready to kill after {timeout} s"
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def installed(tmp_path):
    """A tiny UCI HAR archive installed into a data dir, and a results dir."""
    data_dir = tmp_path / "data"
    archive = fakedata.write_archive(tmp_path / "har.zip", fakedata.ucihar_files())
    datasets.install("UCIHAR", str(archive), data_dir)
    results = tmp_path / "results"
    (results / "UCIHAR").mkdir(parents=True)
    train.write_json(results / "UCIHAR" / "published.json",
                     {"source": "tiny published config", "config": dict(TINY, training_epochs=2)})
    return data_dir, results
