"""results/summarize.py: the results tables from run folders, and the documents' copies."""
import json
import subprocess
import sys

import pytest

import larnn
from conftest import ROOT


def write_run(folder, model, seed, result=None, history=None, config=None, **options):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(
        dataset="UCIHAR", model=model, seed=seed, epochs=100, config=config or {}, **options)))
    if result:
        (folder / "result.json").write_text(json.dumps(dict(seed=seed, **result)))
    if history:
        (folder / "history.json").write_text(json.dumps(history))


def test_table_averages_finished_seeds_and_lists_unfinished_runs(tmp_path):
    for seed, (accuracy, f1) in enumerate([(0.90, 0.89), (0.92, 0.93)]):
        write_run(tmp_path / f"lstm-seed{seed}", "lstm", seed, result=dict(
            best_epoch=5 + 2 * seed, test_accuracy=accuracy, test_f1_weighted=f1,
            test_accuracy_final_epoch=0.88, test_accuracy_max_over_epochs=0.95,
            seconds_per_epoch=40.0))
    write_run(tmp_path / "larnn-seed0", "larnn", 0, history=[
        dict(epoch=1, val=dict(accuracy=0.7)), dict(epoch=2, val=dict(accuracy=0.8)),
        dict(epoch=3, val=dict(accuracy=0.75))])
    out = subprocess.run([sys.executable, str(ROOT / "results" / "summarize.py"),
                          "--published", str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout
    assert ("| LSTM | 0 (5), 1 (7) | 91.00 ± 1.41% | 0.9100 ± 0.0283 | 88.00 ± 0.00% "
            "| 95.00 ± 0.00% | 40 ± 0 |") in out
    assert "(LARNN seed 0): unfinished, 3 of 100 epochs, best validation accuracy so far 0.8000 (epoch 2)" in out
    assert "| LARNN |" not in out


def test_per_run_table_reports_blow_ups_and_the_second_half_of_training(tmp_path):
    published, investigation = tmp_path / "published", tmp_path / "investigation"
    published.mkdir()
    investigation.mkdir()
    # val loss: 0.5, 2e12, inf, 30; second half: epochs 3-4
    history = [dict(epoch=e, val=dict(loss=loss, accuracy=val), test=dict(accuracy=test))
               for e, loss, val, test in [(1, 0.5, 0.5, 0.5), (2, 2e12, 0.6, 0.6),
                                          (3, float("inf"), 0.9, 0.8), (4, 30.0, 0.7, 0.9)]]
    write_run(published / "larnn-seed0", "larnn", 0, history=history, result=dict(
        best_epoch=3, val_score=0.9, test_accuracy=0.8, test_f1_weighted=0.81,
        test_accuracy_final_epoch=0.9))
    write_run(investigation / "larnn-cosine-seed0", "larnn", 0, history=history[:2])
    out = subprocess.run([sys.executable, str(ROOT / "results" / "summarize.py"), "--per-run",
                          "--published", str(published)], capture_output=True, text=True,
                         check=True).stdout
    assert ("| `published/larnn-seed0` | 3 | 90.00% | 80.00% | 0.8100 | 90.00% | "
            "3 (1 infinite) | 80.0% / 85.0% (20.0 points) |") in out
    assert "larnn-cosine-seed0 (LARNN seed 0): unfinished, 2 of 100 epochs" in out


def test_variants_table_groups_seeds_by_what_differs_from_the_published_runs(tmp_path):
    published, investigation = tmp_path / "published", tmp_path / "investigation"
    published.mkdir()
    investigation.mkdir()

    def result(accuracy):
        return dict(best_epoch=9, test_accuracy=accuracy, test_f1_weighted=accuracy,
                    test_accuracy_final_epoch=accuracy, test_accuracy_max_over_epochs=accuracy,
                    seconds_per_epoch=50.0)
    write_run(published / "lstm-seed0", "lstm", 0, result(0.90), config=dict(hidden_size=81))
    for seed, accuracy in enumerate([0.91, 0.93]):
        write_run(investigation / f"lstm-precisebn-seed{seed}", "lstm", seed, result(accuracy),
                  config=dict(hidden_size=81), precise_bn_windows=2048, lr_schedule="step")
    write_run(investigation / "lstm-small-seed0", "lstm", 0, result(0.85),
              config=dict(hidden_size=32), precise_bn_windows=0)
    out = subprocess.run([sys.executable, str(ROOT / "results" / "summarize.py"), "--variants",
                          "--published", str(published)], capture_output=True, text=True,
                         check=True).stdout
    assert "| LSTM | as published | 0 (9) | 90.00% | 0.9000 |" in out
    assert "| LSTM | precise_bn_windows=2048 | 0 (9), 1 (9) | 92.00 ± 1.41% |" in out
    assert "| LSTM | hidden_size=32 | 0 (9) | 85.00% |" in out


def test_magnitude_of_a_blown_up_loss():
    import summarize
    assert [summarize.magnitude(x) for x in (2.46, 282.4, 1.2e17, 2.2e12, 9.92e18)] == [
        "2.46", "282", "10^17", "2·10^12", "10^19"]


def test_missing_folder_is_a_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "results" / "summarize.py"),
                          "--published", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and "does not exist" in run.stderr


@pytest.mark.parametrize("document,options", [
    ("README.md", ["--glance"]), ("results/UCIHAR/README.md", []),
    ("results/UCIHAR/README.md", ["--variants"]), ("results/UCIHAR/README.md", ["--per-run"])])
def test_results_tables_are_what_summarize_prints_from_the_committed_runs(capsys, document,
                                                                          options):
    """The documents say their results tables are generated by summarize.py: keep them so."""
    import summarize
    summarize.main(options)
    out = capsys.readouterr().out
    table = "\n".join(line for line in out.splitlines() if line.startswith("|"))
    command = " ".join(["python3 results/summarize.py", *options])
    assert table in (ROOT / document).read_text(), \
        f"{document}'s table is stale: paste the one `{command}` prints"


def test_glance_picks_each_models_variant_by_validation_not_test(tmp_path):
    published, investigation = tmp_path / "published", tmp_path / "investigation"
    published.mkdir()
    investigation.mkdir()

    def result(val, test):
        return dict(best_epoch=9, val_score=val, test_accuracy=test, test_f1_weighted=test,
                    test_accuracy_final_epoch=test, test_accuracy_max_over_epochs=test,
                    seconds_per_epoch=50.0)
    write_run(published / "larnn-seed0", "larnn", 0, result(0.90, 0.90), config=dict(a=1))
    write_run(investigation / "larnn-a2-seed0", "larnn", 0, result(0.95, 0.80), config=dict(a=2))
    write_run(investigation / "larnn-a3-seed0", "larnn", 0, result(0.93, 0.99), config=dict(a=3))
    out = subprocess.run([sys.executable, str(ROOT / "results" / "summarize.py"), "--glance",
                          "--published", str(published)], capture_output=True, text=True,
                         check=True).stdout
    assert "| LARNN | as published | 0 (9) | 90.00% | 90.00% | 0.9000 | 91.92% |" in out
    assert "| LARNN | a=2 | 0 (9) | 95.00% | 80.00% | 0.8000 |  |" in out
    assert "a=3" not in out


def test_studies_table_and_figure(tmp_path, capsys):
    import hyperopt_optimize
    import summarize
    settings = hyperopt_optimize.study_settings("UCIHAR", "lstm", 10, None, 0, "last-tenth")
    folder = tmp_path / "search" / hyperopt_optimize.study_name(settings)
    (folder / "trials").mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps(settings))
    config = dict(learning_rate=0.00612345, decay_each_N_epoch=20, l2_weight_reg=0.001,
                  dropout=0.2, hidden_size=64, num_layers=2, attention_heads=1)
    for trial, score in enumerate([0.90, None, 0.93, 0.91]):
        (folder / "trials" / f"trial-{trial:04d}.json").write_text(json.dumps(dict(
            trial=trial, config=config, status="fail" if score is None else "ok",
            val_score=score)))
    summarize.main(["--studies", "--published", str(tmp_path / "published")])
    out = capsys.readouterr().out
    assert (f"| `{folder.name}` | LSTM | 4 (1 failed) | 2 | 93.00% | learning_rate=0.00612, "
            f"decay_each_N_epoch=20, l2_weight_reg=0.001, dropout=0.2, hidden_size=64, "
            f"num_layers=2 |") in out
    assert (folder / "trials.png").stat().st_size > 0


def test_searched_runs_are_named_by_their_trial_and_the_default_is_marked(tmp_path):
    """results/retrain_best.py's runs (searched/) join the variants, named by the study's
    trial; the glance shows them, and marks the setup best.json gives train.py, even when
    another variant is better on validation."""
    root = tmp_path / "UCIHAR"
    for folder in ("published", "investigation", "searched"):
        (root / folder).mkdir(parents=True)

    def result(val):
        return dict(best_epoch=9, val_score=val, test_accuracy=0.9, test_f1_weighted=0.9,
                    test_accuracy_final_epoch=0.9, test_accuracy_max_over_epochs=0.9,
                    seconds_per_epoch=50.0)
    write_run(root / "published" / "larnn-seed0", "larnn", 0, result(0.90), config=dict(a=1))
    write_run(root / "investigation" / "larnn-a2-seed0", "larnn", 0, result(0.97),
              config=dict(a=2))
    for seed in (0, 1):
        write_run(root / "searched" / f"larnn-seed{seed}", "larnn", seed, result(0.95),
                  config=dict(a=3, b=4), precise_bn_windows=2048,
                  searched_from=dict(study="larnn-10ep", trial=17))
    summarize = [sys.executable, str(ROOT / "results" / "summarize.py"), "--published",
                 str(root / "published")]
    out = subprocess.run(summarize + ["--variants"], capture_output=True, text=True,
                         check=True).stdout
    assert "| LARNN | searched config (trial 17), precise_bn_windows=2048 | 0 (9), 1 (9) |" in out
    # The glance shows the searched config even where it neither wins nor is the default.
    out = subprocess.run(summarize + ["--glance"], capture_output=True, text=True,
                         check=True).stdout
    assert "| LARNN | searched config (trial 17), precise_bn_windows=2048 | 0 (9), 1 (9) |" in out
    (root / "best.json").write_text(json.dumps(dict(
        source="results/choose_best.py", options=dict(precise_bn_windows=2048),
        config=dict(a=3, b=4))))
    out = subprocess.run(summarize + ["--glance"], capture_output=True, text=True,
                         check=True).stdout
    assert "| LARNN | a=2 | 0 (9) | 97.00% |" in out
    assert ("| LARNN | searched config (trial 17), precise_bn_windows=2048 (train.py's "
            "default: best.json) | 0 (9), 1 (9) | 95.00 ± 0.00% |") in out


def test_studies_say_how_the_score_moved_with_each_searched_entry(tmp_path):
    import hyperopt_optimize
    import summarize
    settings = hyperopt_optimize.study_settings("UCIHAR", "larnn", 10, None, 0, "last-tenth")
    folder = tmp_path / "search" / hyperopt_optimize.study_name(settings)
    (folder / "trials").mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps(settings))
    config = dict(hyperopt_optimize.to_config(dict(
        larnn.PAPER_CONFIG, hidden_size=64, attention_heads=16)))
    for trial, (dropout, mode, score) in enumerate(
            [(0.1, "layer", 0.95), (0.2, "residual", 0.90), (0.3, "layer", 0.85),
             (0.4, "layer", None)]):
        (folder / "trials" / f"trial-{trial:04d}.json").write_text(json.dumps(dict(
            trial=trial, config=dict(config, dropout=dropout, larnn_mode=mode),
            status="fail" if score is None else "ok", val_score=score)))
    out = summarize.entry_effects(tmp_path / "search")
    assert f"`{folder.name}`, 3 finished trials:" in out
    assert "| dropout | ρ -1.00 (p 0.00) |" in out
    assert "| larnn_mode | layer: 90.00% (2 trials); residual: 90.00% (1 trial) |" in out
    assert "| hidden_size | one value tried |" in out
