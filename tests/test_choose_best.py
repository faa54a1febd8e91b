"""results/choose_best.py: best.json from retrained runs, decided on validation."""
import json

import pytest

import choose_best
import hyperopt_optimize
import train
from conftest import TINY
from test_summarize import write_run

OPTIONS = dict(precise_bn_windows=2048, bn_scale_init=0.1)


def results_tree(tmp_path, searched_scores, published_scores, published_options=OPTIONS):
    """A results folder with a LARNN study whose best config is TINY with dropout 0.3, its
    retrained runs and the published config's runs, with these validation scores."""
    root = tmp_path / "UCIHAR"
    searched_config = dict(TINY, dropout=0.3)
    settings = hyperopt_optimize.study_settings("UCIHAR", "larnn", 10, None, 0, "last-tenth",
                                                **OPTIONS)
    study = hyperopt_optimize.study_name(settings)
    (root / "search" / study).mkdir(parents=True)
    (root / "search" / study / "best.json").write_text(json.dumps(dict(
        source="hyperopt_optimize.py", study=study, trial=7, val_score=0.9,
        objective="last-tenth", val_metric="accuracy", settings=settings,
        config=searched_config)))
    (root / "published.json").write_text(json.dumps({"config": TINY}))
    for folder, scores, config, options in (
            ("searched", searched_scores, searched_config, OPTIONS),
            ("investigation", published_scores, TINY, published_options)):
        (root / folder).mkdir()
        for seed, score in scores.items():
            write_run(root / folder / f"larnn-seed{seed}", "larnn", seed, config=config,
                      result=dict(val_score=score), **options)
    (root / "published").mkdir()
    write_run(root / "published" / "larnn-seed0", "larnn", 0, config=TINY,  # other options
              result=dict(val_score=0.99))
    return study, searched_config


@pytest.mark.parametrize("searched,chosen", [(0.95, "searched"), (0.90, "published")])
def test_the_better_mean_on_common_seeds_wins(tmp_path, capsys, searched, chosen):
    study, config = results_tree(tmp_path, {0: searched, 1: searched, 2: 0.5},
                                 {0: 0.92, 1: 0.94, 3: 0.1})
    choose_best.main(["--study", study, "--results-dir", str(tmp_path)])
    best = json.loads((tmp_path / "UCIHAR" / "best.json").read_text())
    assert best["chosen"] == chosen and best["evidence"]["seeds"] == [0, 1]
    assert best["config"] == (config if chosen == "searched" else TINY)
    assert best["options"] == {**train.RUN_OPTIONS, **OPTIONS}
    assert best["evidence"]["published_mean"] == pytest.approx(0.93)
    assert f"{chosen}: mean validation accuracy over seeds [0, 1]" in capsys.readouterr().out
    assert train.describe(tmp_path / "UCIHAR" / "best.json").startswith(f"the {chosen} config")
    assert train.recorded_options(tmp_path / "UCIHAR" / "best.json") == best["options"]


def test_too_few_common_seeds_is_a_one_line_error(tmp_path):
    study, _ = results_tree(tmp_path, {0: 0.95, 1: 0.95}, {0: 0.9, 1: 0.9},
                            published_options=dict(precise_bn_windows=0))
    with pytest.raises(SystemExit, match="retrain both with at least two common seeds"):
        choose_best.main(["--study", study, "--results-dir", str(tmp_path)])
    assert not (tmp_path / "UCIHAR" / "best.json").exists()
    with pytest.raises(SystemExit, match="no best.json"):
        choose_best.main(["--study", "nothing", "--results-dir", str(tmp_path)])
