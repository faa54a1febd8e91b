"""Every top-level module and script imports cleanly; `python3 larnn.py` prints the
published configuration; the committed runs ship no checkpoint once finished."""
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys

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


def test_larnn_script_prints_the_published_configuration(tmp_path):
    """In a few seconds: it never builds the fused layer (a first run's half minute)."""
    builds = tmp_path / "torch_extensions"
    out = subprocess.run([sys.executable, str(ROOT / "larnn.py")], capture_output=True,
                         text=True, check=True,
                         env=dict(os.environ, TORCH_EXTENSIONS_DIR=str(builds))).stdout
    assert not builds.exists() or not any(builds.iterdir())
    published = out.splitlines()[-1]
    for text in ("input (2, 128, 9)", "3 LARNN layers, 27 heads of 3 features, window 38",
                 "output (128, 2, 81)", "window (38, 2, 81), t 128", "logits (2, 6)",
                 "342231 parameters"):
        assert text in published, text


def test_no_finished_run_ships_its_checkpoint():
    """checkpoint.pt only lets an unfinished run resume; each committed copy stays in
    every clone's history (README.md, Tests)."""
    finished = [path.parent for folder in ("published", "investigation", "searched")
                for path in (ROOT / "results").glob(f"*/{folder}/*/result.json")]
    assert finished
    assert not [str(run) for run in finished if (run / "checkpoint.pt").exists()]


def test_the_model_file_does_not_depend_on_the_training_script():
    code = "import sys, larnn; assert 'train' not in sys.modules, 'larnn imported train'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_published_json_is_the_papers_config():
    """The published config lives in two places, the model's defaults and the file
    train.py reads; they must agree."""
    import json
    import larnn
    published = json.loads((ROOT / "results" / "UCIHAR" / "published.json").read_text())
    assert published["config"] == larnn.PAPER_CONFIG
