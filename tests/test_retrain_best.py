"""results/retrain_best.py: a study's best config retrained per seed into searched/,
continued when rerun, and never over a run of something else."""
import json

import pytest

import hyperopt_optimize
import retrain_best
import train
from test_train import study, study_folder, tiny_spaces  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_fixed_thread")


@pytest.fixture
def searched(installed, tiny_spaces):  # noqa: F811
    """A one-trial study with run options; returns (data dir, results, study name)."""
    data_dir, results = installed
    settings = study(model="bnlstm", precise_bn_windows=8, bn_scale_init=0.1)
    hyperopt_optimize.search(settings, 1, device="cpu", results=results, data_dir=data_dir)
    return data_dir, results, study_folder(results, settings).name


def retrain(data_dir, results, name, *seeds):
    retrain_best.main(["--study", name, "--seeds", *map(str, seeds), "--device", "cpu",
                       "--data-dir", str(data_dir), "--results-dir", str(results)])


def test_each_seed_trains_the_best_config_at_full_budget_with_the_studys_options(searched):
    data_dir, results, name = searched
    retrain(data_dir, results, name, 0, 1)
    best = json.loads((results / "UCIHAR" / "search" / name / "best.json").read_text())
    for seed in (0, 1):
        run_dir = results / "UCIHAR" / "searched" / f"bnlstm-seed{seed}"
        run = json.loads((run_dir / "config.json").read_text())
        assert (run["config"], run["seed"], run["epochs"], run["max_samples"]) == \
            (best["config"], seed, best["config"]["training_epochs"], None)
        assert (run["precise_bn_windows"], run["bn_scale_init"]) == (8, 0.1)
        assert f"study {name}, trial 0" in run["config_source"]
        assert run["searched_from"] == dict(study=name, trial=0)
        result = json.loads((run_dir / "result.json").read_text())
        assert result["epochs"] == best["config"]["training_epochs"]
        assert not (run_dir / "checkpoint.pt").exists()  # a finished run keeps none


def test_a_rerun_skips_finished_seeds_and_continues_an_interrupted_one(searched, capsys):
    data_dir, results, name = searched
    retrain(data_dir, results, name, 0)
    seed0 = results / "UCIHAR" / "searched" / "bnlstm-seed0"
    before = {path.name: path.read_bytes() for path in seed0.iterdir()}

    def stop_after_the_first_epoch(epoch, record):
        raise KeyboardInterrupt

    seed1 = results / "UCIHAR" / "searched" / "bnlstm-seed1"
    best_path, best = retrain_best.study_best(results, "UCIHAR", name)
    retrain_best.prepare(seed1, retrain_best.planned_run(best_path, best, 1))
    data = retrain_best.datasets.load("UCIHAR", data_dir)
    with pytest.raises(KeyboardInterrupt):
        train.train(seed1, data, on_epoch=stop_after_the_first_epoch)
    first_epoch = json.loads((seed1 / "history.json").read_text())
    capsys.readouterr()
    retrain(data_dir, results, name, 0, 1)
    assert f"{seed0}: finished, skipped" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in seed0.iterdir()} == before
    history = json.loads((seed1 / "history.json").read_text())
    assert history[:1] == first_epoch and len(history) == best["config"]["training_epochs"]
    assert (seed1 / "result.json").exists() and not (seed1 / "checkpoint.pt").exists()


def test_a_folder_that_trained_another_config_is_refused_untouched(searched):
    data_dir, results, name = searched
    retrain(data_dir, results, name, 0)
    run_dir = results / "UCIHAR" / "searched" / "bnlstm-seed0"
    run = json.loads((run_dir / "config.json").read_text())
    run["config"]["dropout"] += 0.1
    train.write_json(run_dir / "config.json", run)
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    with pytest.raises(SystemExit, match="bnlstm-seed0 trained another run .its config differ"):
        retrain(data_dir, results, name, 0)
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before


def test_a_study_without_best_config_is_a_one_line_error(installed):
    data_dir, results = installed
    with pytest.raises(SystemExit, match=r"best.json is missing or unreadable .*name a study"):
        retrain(data_dir, results, "no-such-study", 0)
