"""Lets the tests import the top-level modules (larnn, datasets, train, ...), the
scripts in results/ and the helpers in this folder."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "results"), str(ROOT / "tests")]


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: needs Ray Tune (requirements-distributed.txt)")
