"""results/evaluate_batchnorm.py on tiny trained runs."""
import json

import pytest

import evaluate_batchnorm
import train


def test_evaluate_batchnorm_reports_every_kind_of_statistics(installed, capsys):
    data_dir, results = installed
    for model in ("bnlstm", "lstm"):
        train.main(["--model", model, "--epochs", "1", "--data-dir", str(data_dir),
                    "--results-dir", str(results)])
    runs = {p.name.split("-")[-2]: p for p in (results / "UCIHAR" / "runs").iterdir()}
    capsys.readouterr()
    evaluate_batchnorm.main([str(runs["bnlstm"]), "--weights", "checkpoint.pt",
                             "--windows", "32", "--data-dir", str(data_dir)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and "val split" in lines[0]
    # "as trained" is what train.py recorded for the last epoch
    recorded = json.loads((runs["bnlstm"] / "history.json").read_text())[-1]["val"]["accuracy"]
    assert lines[1].startswith("as trained") and f"accuracy {recorded:.4f}" in lines[1]
    with pytest.raises(SystemExit, match="no BatchNorm"):
        evaluate_batchnorm.main([str(runs["lstm"]), "--data-dir", str(data_dir)])
