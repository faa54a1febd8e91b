"""Every top-level module and script imports cleanly."""
import importlib
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["larnn", "datasets", "train", "hyperopt_optimize"])
def test_module_imports(name):
    assert importlib.import_module(name).__doc__


def test_ray_backend_imports():
    pytest.importorskip("ray")
    assert importlib.import_module("ray_search").__doc__


@pytest.mark.parametrize("script", ["data/download_datasets.py", "bench/step_time.py"])
def test_script_imports(script):
    spec = importlib.util.spec_from_file_location(pathlib.Path(script).stem, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
