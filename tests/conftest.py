"""Lets the tests import the top-level modules (larnn, datasets, train, ...), the
scripts in results/ and the helpers in this folder; kill_when for the interruption tests."""
import os
import pathlib
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "results"), str(ROOT / "tests")]


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: needs Ray Tune (requirements-distributed.txt)")


def kill_when(command, done, timeout):
    """Start command and SIGKILL it as soon as done() holds. Fails if it exits first or
    timeout seconds pass; the process is killed either way, so a failing test leaves
    nothing running."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.time() + timeout
        while not done():
            assert process.poll() is None, "the command ended before it could be killed"
            assert time.time() < deadline, f"not ready to kill after {timeout} s"
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
