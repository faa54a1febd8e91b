"""What a new user meets first (issue 42): --resume never retrains a finished run,
configs that change a few entries (a partial file, --set), a trained run used in one
line or one call, the search's cost line, the build notice, reduced runs said so."""
import json
import re
import subprocess
import sys
import time

import pytest
import torch

import datasets
import fused
import hyperopt_optimize
import train
from conftest import ROOT, TINY
from test_datasets import SHARED_UCIHAR
from test_train import finished_run, study, study_folder, tiny_spaces, trial_entries  # noqa: F401

# Trainings compared with each other must round alike (conftest.one_fixed_thread).
pytestmark = pytest.mark.usefixtures("one_fixed_thread")


def contents(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def main_error(argv):
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    message = str(exit.value)
    assert "\n" not in message, message
    return message


# ---- --resume ----

@pytest.mark.parametrize("committed", [True, False])
def test_resume_of_a_finished_run_is_refused_and_changes_nothing(installed, committed):
    """Committed runs ship no checkpoint.pt; a local finished run keeps its own."""
    data_dir, results = installed
    run_dir = finished_run(data_dir, results)
    if committed:
        (run_dir / "checkpoint.pt").unlink()
    before = contents(run_dir)
    message = main_error(["--resume", str(run_dir), "--data-dir", str(data_dir)])
    assert re.match(rf"error: --resume {run_dir}: a finished run \(.*config.json.*"
                    rf"model.pt.*result.json.*\), nothing to resume", message)
    assert contents(run_dir) == before


def test_resume_without_a_checkpoint_is_refused(installed):
    data_dir, results = installed
    run_dir = finished_run(data_dir, results)
    for name in ("result.json", "checkpoint.pt"):
        (run_dir / name).unlink()
    before = contents(run_dir)
    message = main_error(["--resume", str(run_dir), "--data-dir", str(data_dir)])
    assert "no checkpoint.pt to continue from (it holds config.json, confusion.png" in message
    assert contents(run_dir) == before


def test_resume_continues_an_interrupted_run(installed, capsys):
    data_dir, results = installed
    run_dir = finished_run(data_dir, results)
    whole = json.loads((run_dir / "result.json").read_text())
    (run_dir / "result.json").unlink()  # killed after its last epoch's checkpoint
    train.main(["--resume", str(run_dir), "--data-dir", str(data_dir)])
    assert json.loads((run_dir / "result.json").read_text())["test_accuracy"] == \
        whole["test_accuracy"]


# ---- configs: partial files and --set ----

def run_config(results):
    (run_dir,) = (results / "UCIHAR" / "runs").iterdir()
    return json.loads((run_dir / "config.json").read_text())["config"]


def quick(data_dir, results, *argv):
    train.main(["--data-dir", str(data_dir), "--results-dir", str(results),
                "--max-samples", "24", "--epochs", "1", *argv])


def test_a_config_file_may_hold_only_what_it_changes(installed, tmp_path, capsys):
    data_dir, results = installed
    partial = tmp_path / "mine.json"
    partial.write_text(json.dumps({"config": {"dropout": 0.25}}))
    quick(data_dir, results, "--config", str(partial))
    assert run_config(results) == dict(TINY, training_epochs=2, dropout=0.25)


def test_a_config_file_may_name_its_base(installed, tmp_path):
    data_dir, results = installed
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.json").write_text(json.dumps(
        {"config": dict(TINY, larnn_mode="layer")}))
    child = tmp_path / "configs" / "child.json"
    child.write_text(json.dumps({"base": "base.json", "config": {"dropout": 0.3}}))
    quick(data_dir, results, "--config", str(child))
    assert run_config(results) == dict(TINY, larnn_mode="layer", dropout=0.3)


def run_spec(results):
    (run_dir,) = (results / "UCIHAR" / "runs").iterdir()
    return json.loads((run_dir / "config.json").read_text())


def test_a_config_file_brings_the_run_options_it_was_chosen_with(installed, tmp_path, capsys):
    data_dir, results = installed
    chosen = tmp_path / "chosen.json"
    chosen.write_text(json.dumps({"options": {"precise_bn_windows": 16, "bn_scale_init": 0.1},
                                  "config": {"dropout": 0.2}}))
    quick(data_dir, results, "--config", str(chosen), "--bn-scale-init", "0.5")
    run = run_spec(results)
    assert (run["precise_bn_windows"], run["bn_scale_init"]) == (16, 0.5)  # the flag wins
    assert "chosen with: precise_bn_windows=16, bn_scale_init=0.1" in capsys.readouterr().out


def test_a_studys_best_config_brings_the_studys_run_options(installed, tiny_spaces):  # noqa: F811
    data_dir, results = installed
    settings = study(precise_bn_windows=8)
    hyperopt_optimize.search(settings, 1, device="cpu", results=results, data_dir=data_dir)
    quick(data_dir, results, "--config", str(study_folder(results, settings) / "best.json"))
    assert run_spec(results)["precise_bn_windows"] == 8


@pytest.mark.parametrize("options", [{"precise_bn": 8}, {"bn_scale_init": 0},
                                     {"lr_schedule": "linear"}, ["precise_bn_windows"],
                                     {"unknown": None}])
def test_bad_recorded_options_give_one_line(installed, tmp_path, options):
    data_dir, results = installed
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"options": options, "config": {}}))
    message = main_error(["--config", str(bad), "--data-dir", str(data_dir),
                          "--results-dir", str(results)])
    assert "\"options\" may hold ['bn_scale_init', 'lr_schedule', 'precise_bn_windows']" in message
    assert not (results / "UCIHAR" / "runs").exists()


def test_set_changes_entries_typed_and_checked(installed, capsys):
    data_dir, results = installed
    quick(data_dir, results, "--set", "dropout=0.3", "--set", "larnn_mode=layer",
          "--set", "use_positional_encoding=true")
    assert run_config(results) == dict(TINY, training_epochs=2, dropout=0.3, larnn_mode="layer",
                                       use_positional_encoding=True)
    source = (f"{results / 'UCIHAR' / 'published.json'} (tiny published config; --set "
              f"dropout, larnn_mode, use_positional_encoding)")
    assert f"config: {source}" in capsys.readouterr().out
    assert run_spec(results)["config_source"] == source  # recorded with the run


@pytest.mark.parametrize("setting,message", [
    ("hiden_size=8", r"unknown keys \['hiden_size'\] \(did you mean \['hidden_size'\]\?\)"),
    ("dropout=high", "dropout must be float, got 'high'"),
    ("num_layers=1.5", "num_layers must be int, got 1.5"),
    ("dropout=1.5", r"dropout must be in \[0, 1\), got 1.5")])
def test_a_bad_set_gives_one_line_and_no_run_folder(installed, setting, message):
    data_dir, results = installed
    error = main_error(["--data-dir", str(data_dir), "--results-dir", str(results),
                        "--set", setting])
    assert re.search(message, error), error
    assert not (results / "UCIHAR" / "runs").exists()


def test_set_needs_key_equals_value(capsys):
    with pytest.raises(SystemExit):
        train.main(["--set", "dropout"])
    assert "'dropout' is not KEY=VALUE" in capsys.readouterr().err


def test_a_search_can_fix_entries_of_its_space(installed, tiny_spaces):  # noqa: F811
    data_dir, results = installed
    settings = study(model="lstm", fixed={"num_layers": 2, "dropout": 0.1})
    hyperopt_optimize.search(settings, 2, device="cpu", results=results, data_dir=data_dir)
    folder = study_folder(results, settings)
    assert folder.name == "lstm-1ep-24win-seed0-last-tenth-dropout0.1-num_layers2"
    assert all(e["config"]["num_layers"] == 2 and e["config"]["dropout"] == 0.1
               for e in trial_entries(folder))
    with pytest.raises(train.TrainingError, match="num_layers must be int"):
        study(fixed={"num_layers": "two"})
    with pytest.raises(train.TrainingError, match="--epochs"):
        study(fixed={"training_epochs": 3})


# ---- a trained run: --evaluate and load_model ----

def test_evaluate_prints_one_line_and_writes_nothing(installed, capsys):
    data_dir, results = installed
    run_dir = finished_run(data_dir, results)
    result = json.loads((run_dir / "result.json").read_text())
    before = contents(run_dir)
    capsys.readouterr()
    train.main(["--evaluate", str(run_dir), "--data-dir", str(data_dir)])
    out = capsys.readouterr().out.strip()
    assert "\n" not in out
    assert out.startswith(f"{run_dir}: test accuracy {result['test_accuracy']:.4f}, weighted "
                          f"F1 {result['test_f1_weighted']:.4f}")
    assert out.endswith("(24 windows, a reduced run: at most 40 per split)")
    train.main(["--evaluate", str(run_dir), "--split", "val", "--data-dir", str(data_dir)])
    assert f"val accuracy {result['val_score']:.4f}" in capsys.readouterr().out
    assert contents(run_dir) == before


def test_evaluate_of_a_folder_without_weights_gives_one_line(installed):
    data_dir, results = installed
    run_dir = finished_run(data_dir, results)
    (run_dir / "model.pt").unlink()
    message = main_error(["--evaluate", str(run_dir), "--data-dir", str(data_dir)])
    assert "model.pt cannot be loaded" in message


def test_evaluate_of_a_folder_that_is_no_run_gives_one_line(tmp_path):
    message = main_error(["--evaluate", str(tmp_path / "nowhere")])
    assert message == f"error: {tmp_path / 'nowhere'}: no run there (no config.json)"


def test_load_model_from_another_folder(installed, tmp_path):
    """README.md's example: the repository on sys.path, any working folder."""
    data_dir, results = installed
    run_dir = finished_run(data_dir, results)
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            f"import torch, train\n"
            f"model = train.load_model({str(run_dir)!r})\n"
            f"print(model.training, tuple(model(torch.randn(3, 128, 9)).shape))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["False", "(3,", "6)"]


COMMITTED = ROOT / "results" / "UCIHAR" / "investigation" / "larnn-bnscale-precisebn-seed3"


@pytest.mark.skipif(not SHARED_UCIHAR.is_file(), reason="../shared archive not present")
def test_evaluate_reproduces_a_committed_runs_test_accuracy(tmp_path, capsys):
    datasets.install("UCIHAR", str(SHARED_UCIHAR), tmp_path / "data", log=lambda line: None)
    result = json.loads((COMMITTED / "result.json").read_text())
    score = train.evaluate_run(COMMITTED, "test", tmp_path / "data", "cpu")
    assert score["accuracy"] == pytest.approx(result["test_accuracy"], abs=1 / 2996)


# ---- small things ----

def test_device_cuda_without_cuda_is_refused_before_a_run_folder(installed, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data_dir, results = installed
    message = main_error(["--data-dir", str(data_dir), "--results-dir", str(results),
                          "--device", "cuda"])
    assert "--device cuda" in message
    assert "run folder" not in capsys.readouterr().out
    assert not (results / "UCIHAR" / "runs").exists()


def test_a_reduced_run_says_so_in_its_result_summary_and_figures(installed, capsys):
    data_dir, results = installed
    run_dir = finished_run(data_dir, results)
    assert json.loads((run_dir / "result.json").read_text())["max_samples"] == 40
    assert re.search(r"REDUCED RUN +at most 40 windows per split", capsys.readouterr().out)
    titles = []
    import matplotlib.figure
    real = matplotlib.figure.Figure.savefig
    try:
        matplotlib.figure.Figure.savefig = lambda fig, *a, **k: titles.append(
            (fig._suptitle.get_text() if fig._suptitle else "") + fig.axes[0].get_title())
        train.plot_run(run_dir)
    finally:
        matplotlib.figure.Figure.savefig = real
    assert len(titles) == 2 and all("REDUCED RUN: at most 40 windows" in t for t in titles)
    out = subprocess.run([sys.executable, str(ROOT / "results" / "summarize.py"),
                          "--published", str(run_dir.parent)], capture_output=True, text=True,
                         check=True).stdout
    assert "| LARNN (reduced run: at most 40 windows per split) |" in out


@pytest.mark.parametrize("trials,epochs,epoch,seconds,line", [
    (2, 10, 3, 60, "60 s per epoch: 7 epochs left in this trial, then 1 more trial of 10; "
                   "about 17 minutes left"),
    (30, 100, 1, 28, "28 s per epoch: 99 epochs left in this trial, then 29 more trials of "
                     "100; about 23.3 hours left"),
    (1, 1, 1, 5, "5 s per epoch: 0 epochs left in this trial, then 0 more trials of 1; "
                 "about 0 minutes left")])
def test_the_cost_line_counts_what_is_left(capsys, trials, epochs, epoch, seconds, line):
    estimate = hyperopt_optimize.CostEstimate(trials, epochs)
    estimate(epoch, seconds)
    estimate(epoch + 1, seconds)  # once only
    assert capsys.readouterr().out == line + "\n"


def test_a_slow_build_says_what_it_is_doing(monkeypatch, capsys):
    from torch.utils import cpp_extension
    monkeypatch.setattr(fused, "BUILD_NOTICE_S", 0.05)
    monkeypatch.setattr(cpp_extension, "load", lambda **options: time.sleep(0.5) or "built")
    assert fused.extension.__wrapped__() == "built"
    assert "building the fused LARNN layer" in capsys.readouterr().err
    monkeypatch.setattr(cpp_extension, "load", lambda **options: "cached")
    assert fused.extension.__wrapped__() == "cached"
    assert capsys.readouterr().err == ""
