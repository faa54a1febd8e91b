"""train.py and hyperopt_optimize.py end to end on tiny generated data."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import datasets
import hyperopt_optimize
import larnn
import train
from conftest import ROOT, TINY, kill_when

# Trainings compared with each other must round alike (conftest.one_fixed_thread).
pytestmark = pytest.mark.usefixtures("one_fixed_thread")

OUTPUTS = ["config.json", "history.json", "result.json", "model.pt", "checkpoint.pt",
           "curves.png", "confusion.png"]
RESULT_KEYS = ["dataset", "model", "epochs", "best_epoch", "seed", "test_accuracy",
               "test_f1_weighted", "test_f1_macro", "test_accuracy_max_over_epochs",
               "val_score", "wall_time_s", "device", "archive_sha256"]


def test_a_search_trial_never_scores_the_test_split(tmp_path, monkeypatch):
    """Nothing in a search may choose by the test split, and a trial does not even score
    it (about a tenth of an epoch): evaluate never sees its windows."""
    data = TinyData()
    seen = []
    real_evaluate = train.evaluate

    def evaluate(model, X, Y, device):
        seen.append(len(X))
        return real_evaluate(model, X, Y, device)
    monkeypatch.setattr(train, "evaluate", evaluate)
    data.X_test, data.Y_test = data.X_test[:5], data.Y_test[:5]  # a size no other split has
    result = hyperopt_optimize.run_trial(TINY, tmp_path / "trial-0000", study(max_samples=None),
                                         data, "cpu")
    assert seen and 5 not in seen
    assert "test_accuracy" not in result and result["val_score"] > 0
    history = json.loads((tmp_path / "trial-0000" / "history.json").read_text())
    assert all("test" not in record for record in history)
    (tmp_path / "trial-0000" / "result.json").unlink()  # killed after its last checkpoint
    with pytest.raises(train.TrainingError, match="a search trial, which leaves the test "
                                                  "split out: continue it by rerunning"):
        train.train(tmp_path / "trial-0000", data)  # as train.py --resume would


class TinyData(datasets.Dataset):
    """In-memory stand-in with UCI HAR's interface, sequences cut to 16 steps."""
    NAME, SEQUENCE_LENGTH, INPUT_FEATURES_SIZE, OUTPUT_CLASSES_SIZE = "UCIHAR", 16, 9, 6
    LABELS = datasets.UCIHARDataset.LABELS

    def __init__(self, nan=False):
        rng = np.random.default_rng(0)
        for split, n in (("train", 64), ("val", 32), ("test", 32)):
            y = rng.integers(0, 6, n)
            x = (rng.normal(0, 0.5, (n, 16, 9)) + y[:, None, None]).astype(np.float32)
            if nan and split == "train":
                x[:] = np.nan
            setattr(self, f"X_{split}", x)
            setattr(self, f"Y_{split}", y)
        self.sha256 = "0" * 64


def test_command_line_run_writes_every_output(installed, capsys):
    data_dir, results = installed
    train.main(["--dataset", "UCIHAR", "--data-dir", str(data_dir), "--results-dir",
                str(results), "--max-samples", "40", "--seed", "3"])
    (run_dir,) = (results / "UCIHAR" / "runs").iterdir()
    for name in OUTPUTS:
        assert (run_dir / name).is_file(), name
    result = json.loads((run_dir / "result.json").read_text())
    for key in RESULT_KEYS:
        assert key in result, key
    assert result["epochs"] == 2 and result["seed"] == 3 and result["model"] == "larnn"
    assert result["archive_sha256"] == datasets.sha256(pathlib.Path(data_dir).parent / "har.zip")
    history = json.loads((run_dir / "history.json").read_text())
    best = max(history, key=lambda r: r["val"]["accuracy"])
    assert result["best_epoch"] == best["epoch"] and result["val_score"] == best["val"]["accuracy"]
    assert "max test acc (paper protocol)" in capsys.readouterr().out


def test_figures_name_the_run_and_keep_the_test_curve_apart(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    history = [dict(epoch=e, **{split: dict(loss=1 / e, accuracy=0.5 + 0.01 * e)
                                for split in ("train", "val", "test")}) for e in range(1, 8)]
    fig = train.curves_figure(history, "larnn-seed0: LARNN, seed 0, UCIHAR")
    assert fig._suptitle.get_text() == "larnn-seed0: LARNN, seed 0, UCIHAR"
    *train_val, test = fig.axes
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 7]
        assert ticks and all(t == int(t) for t in ticks)
    assert all([line.get_label() for line in ax.lines] == ["train", "val"] for ax in train_val)
    assert [line.get_label() for line in test.lines] == ["test"]
    confusion = np.diag(np.arange(1, 19)) + 1  # 18 classes, as Opportunity's gestures
    fig = train.confusion_figure(confusion, datasets.GESTURE_LABELS, "opp-seed0")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array().sum(1), 1)  # colour: row-normalised
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(confusion.ravel())
    assert [t.get_text() for t in ax.get_xticklabels()] == datasets.GESTURE_LABELS
    assert "opp-seed0" in ax.get_title()


def start_run(tmp_path, name, model="larnn", config=TINY, epochs=3):
    return train.new_run("UCIHAR", model, config, seed=1, epochs=epochs, root=tmp_path / name)


def test_resume_ends_like_an_uninterrupted_run(tmp_path):
    data = TinyData()
    whole = train.train(start_run(tmp_path, "whole"), data)

    def interrupt(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt
    run_dir = start_run(tmp_path, "resumed")
    with pytest.raises(KeyboardInterrupt):
        train.train(run_dir, data, on_epoch=interrupt)
    assert len(json.loads((run_dir / "history.json").read_text())) == 2
    resumed = train.train(run_dir, data)
    for key in ("test_accuracy", "val_score", "best_epoch", "test_f1_macro"):
        assert resumed[key] == whole[key], key
    whole_history = json.loads((next((tmp_path / "whole").rglob("history.json"))).read_text())
    resumed_history = json.loads((run_dir / "history.json").read_text())
    assert [r["train"]["loss"] for r in resumed_history] == [r["train"]["loss"] for r in whole_history]


@pytest.mark.parametrize("model", ["bnlstm", "lstm"])
def test_baselines_train_in_the_same_loop(tmp_path, model):
    result = train.train(start_run(tmp_path, model, model, epochs=2), TinyData())
    assert result["model"] == model and result["epochs"] == 2


def test_precise_batchnorm_sets_the_statistics_of_the_windows_given():
    X = np.random.default_rng(0).normal(0, 1, (2048, 16, 9)).astype(np.float32)
    # the BN-LSTM without dropout: its train mode differs from eval mode only in the
    # statistics, and every BatchNorm sees one batch of len(X) values per step
    model = larnn.ActivityClassifier(9, 6, dict(TINY, dropout=0.0), "bnlstm", 16)
    for norm in train.batchnorms(model):
        norm.running_mean.fill_(3.0)  # stale statistics, to be forgotten
    with torch.no_grad():
        stale = model.eval()(torch.as_tensor(X))
        batch_statistics = model.train()(torch.as_tensor(X))
    train.precise_batchnorm(model, X, len(X), len(X), torch.device("cpu"))
    assert all(norm.momentum == 0.1 for norm in train.batchnorms(model))
    for norm in train.batchnorms(model):
        norm.running_var *= 1 - 1 / len(X)  # the running statistics keep the unbiased one
    with torch.no_grad():
        precise = model.eval()(torch.as_tensor(X))
    # one batch of all windows: eval mode now normalises as the batch statistics did
    # (logits reach 35; float32 leaves 1e-4; the variance factor alone moves them by 0.8)
    assert (precise - batch_statistics).abs().max() < 1e-3
    assert (stale - batch_statistics).abs().max() > 0.1


def test_precise_batchnorm_changes_evaluation_not_training(tmp_path):
    data = TinyData()
    runs = {windows: train.new_run("UCIHAR", "larnn", TINY, seed=1, epochs=2,
                                   root=tmp_path / str(windows), precise_bn_windows=windows)
            for windows in (0, 32)}
    for run_dir in runs.values():
        train.train(run_dir, data)
    history = {w: json.loads((d / "history.json").read_text()) for w, d in runs.items()}
    assert [r["train"] for r in history[0]] == [r["train"] for r in history[32]]
    assert [r["val"] for r in history[0]] != [r["val"] for r in history[32]]


@pytest.mark.parametrize("schedule", train.LR_SCHEDULES)
def test_learning_rate_schedules(tmp_path, schedule):
    config = dict(TINY, learning_rate=0.01, decay_each_N_epoch=2)
    run_dir = train.new_run("UCIHAR", "bnlstm", config, seed=1, epochs=4, root=tmp_path,
                            lr_schedule=schedule)
    train.train(run_dir, TinyData())
    rates = [r["lr"] for r in json.loads((run_dir / "history.json").read_text())]
    expected = {"step": [0.01, 0.01, 0.0075, 0.0075],  # x LR_DECAY every 2 epochs
                "cosine": [0.01, 0.01 * (1 + np.cos(np.pi / 4)) / 2, 0.005,
                           0.01 * (1 + np.cos(3 * np.pi / 4)) / 2]}[schedule]
    assert rates == pytest.approx(expected)


def test_bn_scale_init_sets_the_gate_and_cell_gains_only():
    run = dict(train.RUN_OPTIONS, model="larnn", config=TINY, epochs=1, bn_scale_init=0.1)
    model, _, _ = train.build(run, TinyData(), torch.device("cpu"))
    for cell in model.core.layers:
        assert (cell.gates_norm.weight == 0.1).all() and (cell.cell_norm.weight == 0.1).all()
        assert (cell.hidden_norm.weight == 1).all() and (cell.attention_norm.weight == 1).all()


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(train.TrainingError, match="epoch 1, step 0"):
        train.train(start_run(tmp_path, "nan"), TinyData(nan=True))


def test_bad_config_file_gives_one_line_error(tmp_path, installed):
    data_dir, results = installed
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {"hiden_size": 8}}))  # the rest from the default
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(bad),
                          "--data-dir", str(data_dir), "--results-dir", str(results)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.startswith("error: ") and \
        "unknown keys ['hiden_size'] (did you mean ['hidden_size']?)" in run.stderr
    bad.write_text(json.dumps({"base": "nowhere.json", "config": {"hidden_size": 8}}))
    with pytest.raises(SystemExit, match="cannot read a config from .*nowhere.json"):
        train.main(["--config", str(bad), "--results-dir", str(results)])
    with pytest.raises(SystemExit, match="--precise-bn -1: give a number of training windows"):
        train.main(["--precise-bn", "-1", "--results-dir", str(results)])
    with pytest.raises(SystemExit, match="--bn-scale-init 0.0: give a positive gain"):
        train.main(["--bn-scale-init", "0", "--results-dir", str(results)])


BAD_CONFIGS = {  # change: what the one-line error must say
    "hidden_size as text": (dict(hidden_size="81"), "hidden_size must be int, got '81'"),
    "hidden_size as a bool": (dict(hidden_size=True), "hidden_size must be int, got True"),
    "batch_size 0": (dict(batch_size=0), "batch_size must be at least 1, got 0"),
    "num_layers 0": (dict(num_layers=0), "num_layers must be at least 1, got 0"),
    "a fractional window": (dict(larnn_window_size=2.5), "larnn_window_size must be int"),
    "window 0": (dict(larnn_window_size=0), "larnn_window_size must be at least 1"),
    "dropout 1": (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    "dropout -0.1": (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    "learning rate 0": (dict(learning_rate=0), "learning_rate must be above 0, got 0"),
    "negative L2": (dict(l2_weight_reg=-1e-4), "l2_weight_reg must be at least 0"),
    "unknown mode": (dict(larnn_mode="bogus"), "larnn_mode must be one of .*'bogus'"),
    "unknown placement": (dict(cell_norm_placement="x"), "cell_norm_placement must be one of"),
    "flag as text": (dict(use_positional_encoding="yes"), "use_positional_encoding must be bool"),
    "hidden_size not a multiple of heads": (dict(hidden_size=9), "bad config: hidden_size .9. "
                                            "must be a multiple of attention_heads"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_configs_give_one_line_and_leave_no_run_folder(tmp_path, installed, case, capsys):
    data_dir, results = installed
    changes, message = BAD_CONFIGS[case]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {**TINY, **changes}}))
    with pytest.raises(SystemExit) as exit:
        train.main(["--config", str(bad), "--data-dir", str(data_dir), "--results-dir",
                    str(results), "--max-samples", "40"])
    assert re.match(f"error: .*{message}", str(exit.value)) and "\n" not in str(exit.value)
    assert not list((results / "UCIHAR").glob("runs/*"))


def finished_run(data_dir, results, *options):
    train.main(["--data-dir", str(data_dir), "--results-dir", str(results),
                "--max-samples", "40", *options])
    (run_dir,) = (results / "UCIHAR" / "runs").iterdir()
    return run_dir


@pytest.mark.parametrize("damage,message", [
    (lambda run: (run / "config.json").write_text('{"dataset": "UCIHAR", '),
     r"config.json is unreadable .*restore it"),
    (lambda run: (run / "config.json").write_text('{"dataset": "UCIHAR"}'),
     r"config.json lacks \['config', 'epochs', 'model', 'seed'\]"),
    (lambda run: (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:5000]),
     r"checkpoint.pt is unreadable .*delete it to train the run again from epoch 1"),
    (lambda run: (run / "checkpoint.pt").write_bytes(b""),
     r"checkpoint.pt is unreadable")])
def test_resume_of_a_damaged_run_gives_one_line(installed, damage, message):
    data_dir, results = installed
    run_dir = finished_run(data_dir, results)
    (run_dir / "result.json").unlink()  # as if killed after its last checkpoint
    damage(run_dir)
    with pytest.raises(SystemExit) as exit:
        train.main(["--resume", str(run_dir), "--data-dir", str(data_dir)])
    assert re.match(f"error: .*{message}", str(exit.value)) and "\n" not in str(exit.value)


def test_a_kill_between_checkpoint_and_model_leaves_model_behind_and_resume_repairs_it(
        tmp_path, monkeypatch):
    """model.pt is written after the checkpoint that holds its weights, never before."""
    data = TinyData()
    whole = train.train(start_run(tmp_path, "whole"), data)
    run_dir = start_run(tmp_path, "killed")
    save_weights = train.save_weights

    def killed(run_dir, weights):
        raise KeyboardInterrupt  # the process dies right after the epoch-1 checkpoint
    monkeypatch.setattr(train, "save_weights", killed)
    with pytest.raises(KeyboardInterrupt):
        train.train(run_dir, data)
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "model.pt").exists()
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["best"]["epoch"] == 1 and checkpoint["cuda_rng"] is None  # CPU run
    monkeypatch.setattr(train, "save_weights", save_weights)
    resumed = train.train(run_dir, data)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert resumed["best_epoch"] == whole["best_epoch"]


def test_a_last_batch_of_one_window_joins_the_one_before(tmp_path):
    assert [len(b) for b in train.batches(np.arange(257), 256)] == [257]
    assert [len(b) for b in train.batches(np.arange(513), 256)] == [256, 257]
    assert [len(b) for b in train.batches(np.arange(514), 256)] == [256, 256, 2]
    assert [len(b) for b in train.batches(np.arange(1), 256)] == [1]
    # 64 training windows at batch 21: 21, 21, 22 instead of a crash in BatchNorm
    result = train.train(start_run(tmp_path, "odd", config=dict(TINY, batch_size=21),
                                   epochs=1), TinyData())
    assert result["epochs"] == 1


@pytest.mark.parametrize("main", [train.main, hyperopt_optimize.main])
@pytest.mark.parametrize("option, value", [("--epochs", "0"), ("--max-samples", "-5")])
def test_counts_below_one_are_refused_before_anything_runs(main, option, value, capsys):
    with pytest.raises(SystemExit):
        main([option, value, "--results-dir", "/nonexistent"])
    assert f"argument {option}: {value} is not a positive integer" in capsys.readouterr().err


def test_negative_trial_resources_are_refused():
    with pytest.raises(SystemExit, match="--gpus-per-trial -0.5: resources cannot be negative"):
        hyperopt_optimize.main(["--backend", "ray", "--gpus-per-trial", "-0.5"])


TINY_SPACE = dict(hyperopt_optimize.LARNN_SPACE, hidden_size=8, attention_heads=2,
                  larnn_window_size=hyperopt_optimize.hp.uniform("larnn_window_size", 2, 6),
                  num_layers=1, batch_size=16, training_epochs=2)
TINY_SPACES = {"larnn": TINY_SPACE,
               "bnlstm": {**TINY_SPACE, **hyperopt_optimize.NO_ATTENTION},
               "lstm": {**TINY_SPACE, **hyperopt_optimize.NO_ATTENTION,
                        "num_layers": hyperopt_optimize.hp.choice("num_layers", [1, 2])}}


@pytest.fixture
def tiny_spaces(monkeypatch):
    for model, space in TINY_SPACES.items():
        monkeypatch.setitem(hyperopt_optimize.SPACES, model, space)


def test_to_config_rounds_hidden_size_to_a_multiple_of_heads():
    config = hyperopt_optimize.to_config(dict(TINY, hidden_size=70.4, attention_heads=27.0,
                                              larnn_window_size=38.9, decay_each_N_epoch=26.0))
    assert config["hidden_size"] == 81 and config["larnn_window_size"] == 38
    assert isinstance(config["decay_each_N_epoch"], int)


def test_objective_is_the_mean_of_the_last_tenth_of_the_epochs_or_the_best_epoch():
    history = [dict(val=dict(accuracy=a)) for a in (0.1, 0.9, 0.2, 0.3)]
    score = hyperopt_optimize.objective_score
    assert score(history, "accuracy", "best", 4) == 0.9  # the paper's: one lucky epoch
    assert score(history, "accuracy", "last-tenth", 4) == 0.3  # ceil(4 / 10) = 1 epoch
    assert score(history, "accuracy", "last-tenth", 11) == pytest.approx(0.25)  # 2 epochs


def study(**changes):
    """The settings of a tiny study: 1 epoch on 24 windows unless changed."""
    options = {**dict(dataset="UCIHAR", model="larnn", epochs=1, max_samples=24, seed=0,
                      objective="last-tenth"), **changes}
    return hyperopt_optimize.study_settings(**options)


def study_folder(results, settings):
    return results / "UCIHAR" / "search" / hyperopt_optimize.study_name(settings)


def trial_entries(folder):
    return [json.loads(p.read_text()) for p in sorted((folder / "trials").glob("trial-*.json"))]


def test_a_study_persists_continues_and_never_writes_the_published_config(
        installed, tiny_spaces, capsys):
    data_dir, results = installed
    published = (results / "UCIHAR" / "published.json").read_text()
    settings = study()
    options = dict(device="cpu", results=results, data_dir=data_dir)
    hyperopt_optimize.search(settings, 3, **options)
    folder = study_folder(results, settings)
    assert folder.name == "larnn-1ep-24win-seed0-last-tenth"
    assert json.loads((folder / "settings.json").read_text()) == settings
    first = {p.name: p.read_text() for p in (folder / "trials").glob("trial-*.json")}
    assert len(first) == 3
    best = json.loads((folder / "best.json").read_text())
    scores = [json.loads(t)["val_score"] for t in first.values()]
    assert best["val_score"] == max(scores) and set(best["config"]) == set(train.PAPER_CONFIG)
    assert best["study"] == folder.name and best["settings"] == settings
    out = capsys.readouterr().out
    assert f"new study {folder}" in out
    assert f"reduced budget: retrain it at full budget with python3 results/retrain_best.py " \
           f"--study {folder.name}" in out
    assert re.search(r"\d+ s per epoch: 0 epochs left in this trial, then 2 more trials of "
                     r"1; about \d+ minutes left", out)
    trials = hyperopt_optimize.search(settings, 5, **options)
    assert len(trials.trials) == 5
    assert f"continuing study {folder} (3 trials recorded)" in capsys.readouterr().out
    for name, text in first.items():
        assert (folder / "trials" / name).read_text() == text
    # A reduced budget never touches the config train.py trains by default.
    assert not (results / "UCIHAR" / "best.json").exists()
    assert (results / "UCIHAR" / "published.json").read_text() == published


def test_a_study_continues_in_a_fresh_clone_from_its_trial_records_alone(
        installed, tiny_spaces, tmp_path):
    """Only settings.json, best.json and trials/trial-NNNN.json are committed: a study
    continued from them proposes what it would have proposed uninterrupted."""
    data_dir, results = installed
    whole = tmp_path / "whole"
    (whole / "UCIHAR").mkdir(parents=True)
    settings = study()
    hyperopt_optimize.search(settings, 4, device="cpu", results=whole, data_dir=data_dir)
    hyperopt_optimize.search(settings, 2, device="cpu", results=results, data_dir=data_dir)
    folder = study_folder(results, settings)
    original = hyperopt_optimize.load_trials(folder)
    (folder / "trials.pkl").unlink()
    for run in (folder / "trials").glob("trial-*/"):
        shutil.rmtree(run)
    rebuilt = hyperopt_optimize.load_trials(folder)
    # TPE proper (not its first random proposals) reads the rebuilt trials as the originals.
    domain = hyperopt_optimize.Domain(lambda sample: 0, hyperopt_optimize.SPACES["larnn"])
    proposals = [hyperopt_optimize.tpe.suggest([2], domain, trials, 7, n_startup_jobs=1)
                 for trials in (original, rebuilt)]
    assert proposals[0][0]["misc"]["vals"] == proposals[1][0]["misc"]["vals"]
    hyperopt_optimize.search(settings, 4, device="cpu", results=results, data_dir=data_dir)
    assert trial_entries(folder) == trial_entries(study_folder(whole, settings))
    # Records of older code kept no samples: refused, not overwritten.
    record = folder / "trials" / "trial-0000.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                  if k != "sample"}))
    (folder / "trials.pkl").unlink()
    with pytest.raises(train.TrainingError, match="cannot be continued"):
        hyperopt_optimize.search(settings, 5, device="cpu", results=results, data_dir=data_dir)


def test_other_settings_make_other_studies_and_each_model_searches_its_own_space(
        installed, tiny_spaces):
    data_dir, results = installed
    options = dict(device="cpu", results=results, data_dir=data_dir)
    studies = [study(), study(epochs=2), study(seed=1), study(objective="best"),
               study(model="lstm"), study(precise_bn_windows=16)]
    for settings in studies:
        hyperopt_optimize.search(settings, 2, **options)
    folders = {study_folder(results, settings) for settings in studies}
    assert len(folders) == len(studies)
    assert all(len(trial_entries(folder)) == 2 for folder in folders)
    lstm = trial_entries(study_folder(results, study(model="lstm")))
    assert all(e["config"]["attention_heads"] == 1 and e["config"]["num_layers"] in (1, 2)
               for e in lstm)
    larnn_trials = trial_entries(study_folder(results, study()))
    assert all(e["config"]["attention_heads"] == 2 for e in larnn_trials)
    run = json.loads((study_folder(results, study(precise_bn_windows=16)) / "trials"
                      / "trial-0000" / "config.json").read_text())
    assert run["precise_bn_windows"] == 16


def test_a_full_budget_study_writes_best_json_which_train_then_trains(
        installed, tiny_spaces, capsys):
    """The tiny space's epochs are 2 and the tiny archive's every window is used."""
    data_dir, results = installed
    settings = study(epochs=2, max_samples=None)
    hyperopt_optimize.search(settings, 2, device="cpu", results=results, data_dir=data_dir)
    best = json.loads((results / "UCIHAR" / "best.json").read_text())
    folder = study_folder(results, settings)
    assert best == json.loads((folder / "best.json").read_text())
    assert best["source"] == "hyperopt_optimize.py" and best["settings"] == settings
    assert best["val_score"] == max(e["val_score"] for e in trial_entries(folder))
    assert not (results / "UCIHAR" / "best-lstm.json").exists()
    capsys.readouterr()
    train.main(["--data-dir", str(data_dir), "--results-dir", str(results), "--epochs", "1"])
    out = capsys.readouterr().out
    assert (f"config: {results / 'UCIHAR' / 'best.json'} (study {folder.name}, trial "
            f"{best['trial']}, validation last-tenth {best['val_score']:.4f})") in out
    train.main(["--model", "lstm", "--data-dir", str(data_dir), "--results-dir", str(results),
                "--epochs", "1"])
    assert (f"config: {results / 'UCIHAR' / 'published.json'} (tiny published config)"
            in capsys.readouterr().out)


def test_any_exception_in_a_trial_is_recorded_and_ctrl_c_stops(installed, tiny_spaces,
                                                               monkeypatch):
    data_dir, results = installed
    real_run_trial = hyperopt_optimize.run_trial

    def flaky(config, trial_dir, *args, **kwargs):
        if trial_dir.name == "trial-0000":
            raise KeyError("not a TrainingError, ValueError or RuntimeError")
        if trial_dir.name == "trial-0002":
            raise KeyboardInterrupt
        return real_run_trial(config, trial_dir, *args, **kwargs)
    monkeypatch.setattr(hyperopt_optimize, "run_trial", flaky)
    settings = study()
    with pytest.raises(KeyboardInterrupt):
        hyperopt_optimize.search(settings, 4, device="cpu", results=results,
                                 data_dir=data_dir)
    entries = trial_entries(study_folder(results, settings))
    assert [e["status"] for e in entries] == ["fail", "ok"]  # trial 2 was stopped, not failed
    assert "not a TrainingError" in entries[0]["error"]
    assert json.loads((study_folder(results, settings) / "best.json").read_text())["trial"] == 1


def test_a_trial_folder_holding_another_config_is_moved_aside_not_deleted(tmp_path, capsys):
    settings = study()
    trial_dir = tmp_path / "trial-0000"
    trial_dir.mkdir()
    (trial_dir / "config.json").write_text(json.dumps({"config": "another"}))
    (trial_dir / "history.json").write_text("[]")
    hyperopt_optimize.run_trial(TINY, trial_dir, settings, TinyData(), "cpu")
    (kept,) = tmp_path.glob("trial-0000-replaced-*")
    assert (kept / "history.json").read_text() == "[]"
    assert f"moved to {kept}" in capsys.readouterr().err


def test_help_shows_the_defaults_and_their_cost(capsys):
    with pytest.raises(SystemExit):
        hyperopt_optimize.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 30)", "(default: 100)", "(default: last-tenth)",
                    "prints what they will cost after the first epoch"):
        assert default in text, default


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "5"], "epochs=5 \\(the run has 2\\)"),
    (["--max-samples", "10"], "max_samples=10 \\(the run has 40\\)"),
    (["--precise-bn", "16"], "precise_bn_windows=16 \\(the run has 0\\)"),
    (["--model", "lstm"], "model='lstm' \\(the run has 'larnn'\\)"),
    (["--config", "x.json"], "--config")])
def test_resume_with_flags_that_contradict_the_run_is_refused(installed, flags, message):
    data_dir, results = installed
    run_dir = finished_run(data_dir, results)
    before = (run_dir / "result.json").read_text()
    with pytest.raises(SystemExit) as exit:
        train.main(["--resume", str(run_dir), "--data-dir", str(data_dir), *flags])
    assert re.match(f"error: --resume continues .* contradict it: {message}", str(exit.value))
    assert (run_dir / "result.json").read_text() == before


SEARCH_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import hyperopt_optimize, test_train
hyperopt_optimize.SPACES.update(test_train.TINY_SPACES)
hyperopt_optimize.main(sys.argv[1:])
"""


def test_search_killed_mid_trial_resumes(tmp_path, installed):
    data_dir, results = installed
    command = [sys.executable, "-c", SEARCH_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")),
               "--dataset", "UCIHAR", "--max-evals", "3", "--epochs", "30", "--max-samples", "24",
               "--device", "cpu", "--data-dir", str(data_dir), "--results-dir", str(results)]
    folder = study_folder(results, study(epochs=30))
    kill_when(command, (folder / "trials" / "trial-0001" / "checkpoint.pt").exists)
    first = (folder / "trials" / "trial-0000.json").read_text()
    assert not (folder / "trials" / "trial-0001.json").exists()
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"continuing study {folder} (1 trials recorded)" in run.stdout
    assert (folder / "trials" / "trial-0000.json").read_text() == first
    assert len(list((folder / "trials").glob("trial-*.json"))) == 3


def test_ray_backend_without_ray_gives_one_line_error(installed):
    data_dir, results = installed
    script = f"import sys; sys.modules['ray'] = None; {SEARCH_SCRIPT}"
    run = subprocess.run([sys.executable, "-c", script.format(root=str(ROOT), tests=str(ROOT / "tests")),
                          "--backend", "ray", "--data-dir", str(data_dir), "--results-dir",
                          str(results)], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "requirements-distributed.txt" in run.stderr


def test_training_flushes_subnormal_floats_in_every_torch_thread():
    """train.py sets flush-to-zero at import, before torch makes its threads, which copy
    it: set later, only the thread that set it flushes (half the elements below)."""
    script = ("import torch, train; torch.set_num_threads(2); "
              "y = torch.full((1 << 22,), 3e-39) * 1.5; print(int((y != 0).sum()))")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert run.returncode == 0, run.stderr[-2000:]
    if not torch.set_flush_denormal(True):  # what train.py set here too
        pytest.skip("this CPU has no flush-to-zero mode")
    assert run.stdout.split() == ["0"]
