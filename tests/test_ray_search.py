"""hyperopt_optimize.py --backend ray on tiny generated data, on Ray runtimes of 2 CPUs.

Marked `ray`: .ci/run installs Ray and runs them; deselect them with -m "not ray".
"""
import json
import os
import re
import socket
import subprocess
import sys

import pytest

import hyperopt_optimize
from conftest import HANG_S, ROOT, kill_when

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")


@pytest.fixture(autouse=True)
def workers_at_normal_priority(monkeypatch):
    """Ray starts its workers at niceness 15 (RAY_worker_niceness): beside two busy
    processes of normal priority they got a few percent of a core, and these tests ran
    out of time on a loaded machine (all three failed) while the rest of the suite
    passed. Every Ray runtime here (ray start, ray.init in a driver) inherits this;
    what the tests check, the search, does not depend on it."""
    monkeypatch.setenv("RAY_worker_niceness", "0")


SEARCH_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import hyperopt_optimize, test_train
from hyperopt import hp
hyperopt_optimize.SPACES["larnn"] = dict(test_train.TINY_SPACE, **{changes})
hyperopt_optimize.main(sys.argv[1:])
"""


def search_command(data_dir, results, *options, space_changes="{}"):
    """The search over tests/test_train.py's tiny space, with space_changes (Python);
    4 trials of 24 windows unless options say otherwise (argparse keeps the last)."""
    script = SEARCH_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), changes=space_changes)
    return [sys.executable, "-c", script,
            "--backend", "ray", "--dataset", "UCIHAR", "--max-evals", "4", "--max-concurrent",
            "2", "--cpus-per-trial", "1", "--max-samples", "24", "--data-dir", str(data_dir),
            "--results-dir", str(results), *options]


def tune_reports(experiment):
    """{Tune's trial folder: the reports it received from that trial, in order}."""
    return {log.parent.name: list(json_lines(log.read_text()))
            for log in experiment.glob("*/result.json")}


def json_lines(text):
    for line in text.splitlines():
        try:
            yield json.loads(line)
        except ValueError:  # a killed driver can leave half a line, continued by the next
            pass


def tune_trials(experiment):
    """[(trial, run metadata)] of every trial in the newest state of Tune's driver: the
    trials Tune knows, and continues on a restore."""
    state = sorted(experiment.glob("experiment_state-*.json"))[-1]
    return [(json.loads(trial), json.loads(metadata))
            for trial, metadata in json.loads(state.read_text())["trial_data"]]


def trial_intervals(experiment):
    """(start, end) in seconds of every Tune trial: from when the driver set it running
    (its run metadata in Tune's experiment state) to its last report. Counting from its
    first report instead made overlap depend on how fast each worker started, which a
    busy machine skews by more than a short trial lasts."""
    return [(run["start_time"], run["last_result"]["timestamp"])
            for _, run in tune_trials(experiment)]


@pytest.fixture
def ray_head():
    """A one-node Ray cluster of 2 CPUs, started as a user starts a cluster's head; its
    address is "auto", as on the head node."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray_cli, "start", "--head", "--num-cpus", "2", "--port", str(port),
                    "--include-dashboard", "false"], check=True, capture_output=True)
    yield "auto"
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True)


def study(results, epochs, max_samples=24, tags=""):
    return results / "UCIHAR" / "search" / f"larnn-{epochs}ep-{max_samples}win-seed0-last-tenth{tags}"


def test_four_trials_two_at_a_time_on_a_cluster_then_other_max_evals_are_refused(installed,
                                                                               ray_head):
    data_dir, results = installed
    run = subprocess.run(search_command(data_dir, results, "--epochs", "2", "--address", ray_head),
                         capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = study(results, 2)
    assert f"new study {folder}" in run.stdout
    assert re.search(r"\d+ s per epoch: 1 epoch left in this trial, then 3 more trials of 2; "
                     r"about \d+ minutes left at 2 trials at a time", run.stdout)
    entries = [json.loads(p.read_text()) for p in sorted((folder / "trials").glob("trial-*.json"))]
    assert [e["trial"] for e in entries] == [0, 1, 2, 3]
    assert all(e["status"] == "ok" and e["epochs"] == 2 for e in entries)
    best = json.loads((folder / "best.json").read_text())
    assert best["source"] == "hyperopt_optimize.py" and best["study"] == folder.name
    assert best["val_score"] == max(e["val_score"] for e in entries)
    assert hyperopt_optimize.to_config(best["config"]) == best["config"]
    assert not (results / "UCIHAR" / "best.json").exists()  # a reduced budget
    intervals = sorted(trial_intervals(folder / "ray" / "search"))
    assert len(intervals) == 4
    assert any(b_start < a_end for (_, a_end), (b_start, _) in zip(intervals, intervals[1:]))
    again = subprocess.run(search_command(data_dir, results, "--epochs", "2", "--max-evals", "5"),
                           capture_output=True, text=True, timeout=HANG_S)
    assert again.returncode == 1
    assert again.stderr.startswith(f"error: the Ray study {folder} was started with "
                                   f"--max-evals 4") and again.stderr.count("\n") == 1


def test_killed_driver_continues_without_repeating_finished_trials(installed):
    data_dir, results = installed
    command = search_command(data_dir, results, "--epochs", "40")
    folder = study(results, 40)
    kill_when(command, lambda: any((folder / "trials").glob("trial-*.json")))
    finished = {p.name: p.read_text() for p in (folder / "trials").glob("trial-*.json")}
    assert len(finished) < 4
    run = subprocess.run(command, capture_output=True, text=True, timeout=HANG_S)
    for name, text in finished.items():
        assert (folder / "trials" / name).read_text() == text
    if run.returncode != 0:
        # Tune writes its state files in place (not atomically): a kill during the write
        # of both its copies leaves nothing to continue from. Then one line says so, and
        # the study keeps its records (ray_search.repair_driver_state); never less.
        last = run.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "cut short by the killed driver" in last, \
            run.stderr[-3000:]
        return
    assert "continuing the Ray search" in run.stdout
    entries = [json.loads(p.read_text()) for p in (folder / "trials").glob("trial-*.json")]
    assert sorted(e["trial"] for e in entries) == [0, 1, 2, 3]
    assert all(e["status"] == "ok" and e["epochs"] == 40 for e in entries)
    experiment = folder / "ray" / "search"
    known = {trial["relative_logdir"] for trial, _ in tune_trials(experiment)}
    reports_by_folder = tune_reports(experiment)
    assert len(known) == 4 and known <= reports_by_folder.keys()
    finished_numbers = {int(re.search(r"\d+", name).group()) for name in finished}
    for name, reports in reports_by_folder.items():
        epochs = [r["epochs"] for r in reports]
        if name in known:
            # Every epoch once, but the one whose report the killed driver was recording,
            # which Tune has its trial train again (ray_search.py).
            assert sorted(set(epochs)) == list(range(1, 41)) and len(epochs) <= 41
        else:
            # A trial the driver started just before the kill, before its state named it
            # (seen once in 4 runs): Tune cannot continue what it never saved, and TPE,
            # restored to the same point, proposes that trial again. It had not finished.
            tag = int(re.match(r"train_trial_[0-9a-f]+_(\d+)_", name).group(1))
            assert len(set(epochs)) < 40 and tag - 1 not in finished_numbers  # ray_search.number


def test_early_stopped_and_failing_trials_are_recorded(installed):
    data_dir, results = installed
    # One trial at a time, so ASHA's decisions do not hang on which trial reports first;
    # a learning rate of 1e-7 gives trials that trail, and one larnn_mode in 3 fails;
    # --max-samples 1000 lifts search_command's cap (the generated data has fewer windows).
    command = search_command(data_dir, results, "--epochs", "8", "--max-evals", "8",
                             "--early-stop", "--max-concurrent", "1", "--max-samples", "1000",
                             space_changes="dict(larnn_mode=hp.choice('larnn_mode', "
                             "['residual', 'residual', 'no such mode']), learning_rate="
                             "hp.choice('learning_rate', [0.02, 1e-7]))")
    run = subprocess.run(command, capture_output=True, text=True, timeout=HANG_S)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = study(results, 8, 1000, "-asha")
    entries = [json.loads(p.read_text()) for p in sorted((folder / "trials").glob("trial-*.json"))]
    assert [e["trial"] for e in entries] == list(range(8))
    failed = [e for e in entries if e["status"] == "fail"]
    ok = [e for e in entries if e["status"] == "ok"]
    assert failed and all("bad config" in e["error"] for e in failed)
    assert all(e["config"]["larnn_mode"] == "no such mode" for e in failed)
    assert all(e["config"]["larnn_mode"] == "residual" for e in ok)
    assert any(e["epochs"] < 8 for e in ok) and any(e["epochs"] == 8 for e in ok)
    best = json.loads((folder / "best.json").read_text())
    assert best["val_score"] == max(e["val_score"] for e in ok)


def cut_experiment(tmp_path):
    """A Tune experiment folder whose newest driver state the kill cut short, beside an
    older whole one; returns (experiment folder, the cut file's session)."""
    experiment = tmp_path / "study" / "ray" / "search"
    experiment.mkdir(parents=True)
    (experiment / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    session = "2026-01-02_00-00-00"
    (experiment / f"experiment_state-{session}.json").write_text('{"trial_da')
    (experiment / f"searcher-state-{session}.pkl").write_bytes(b"old")
    return experiment, session


def test_a_driver_state_cut_by_the_kill_is_put_back_from_rays_temporary_folder(
        tmp_path, monkeypatch, capsys):
    import ray_search
    experiment, session = cut_experiment(tmp_path)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))
    staged = (tmp_path / "tmp" / "ray" / "session_1" / "artifacts" / "2026-01-02" / "search"
              / "driver_artifacts")
    staged.mkdir(parents=True)
    (staged / f"experiment_state-{session}.json").write_text('{"trial_data": []}')
    (staged / f"searcher-state-{session}.pkl").write_bytes(b"whole")
    ray_search.repair_driver_state(str(experiment))
    assert json.loads((experiment / f"experiment_state-{session}.json").read_text()) == {
        "trial_data": []}
    assert (experiment / f"searcher-state-{session}.pkl").read_bytes() == b"whole"
    assert "cut short by the killed driver; restored from" in capsys.readouterr().out
    ray_search.repair_driver_state(str(experiment))  # whole now: nothing to do
    assert capsys.readouterr().out == ""


def test_a_driver_state_behind_the_temporary_folders_is_replaced_by_it(tmp_path, monkeypatch,
                                                                        capsys):
    """The storage's copy lags: it may name a trial checkpoint Tune has deleted since."""
    import ray_search
    experiment, session = cut_experiment(tmp_path)
    (experiment / f"experiment_state-{session}.json").write_text('{"trial_data": ["old"]}')
    os.utime(experiment / f"experiment_state-{session}.json", (1, 1))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))
    staged = (tmp_path / "tmp" / "ray" / "session_1" / "artifacts" / "2026-01-02" / "search"
              / "driver_artifacts")
    staged.mkdir(parents=True)
    (staged / f"experiment_state-{session}.json").write_text('{"trial_data": ["new"]}')
    ray_search.repair_driver_state(str(experiment))
    assert json.loads((experiment / f"experiment_state-{session}.json").read_text()) == {
        "trial_data": ["new"]}
    assert "behind the killed driver; restored from" in capsys.readouterr().out


def test_a_cut_driver_state_without_a_whole_copy_is_a_one_line_error(tmp_path, monkeypatch):
    import ray_search
    import train
    experiment, _ = cut_experiment(tmp_path)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "empty"))
    with pytest.raises(train.TrainingError, match=r"cut short .* no whole copy: Tune cannot "
                                                  r"continue .* move .*search aside"):
        ray_search.repair_driver_state(str(experiment))


def test_a_trial_count_left_behind_the_driver_state_is_brought_up_to_date(tmp_path, capsys):
    """The kill between Tune's state files: the trials file names a third trial, made
    just before, which the search generator's count does not include yet."""
    import ray.cloudpickle as cloudpickle
    import ray_search
    experiment = tmp_path / "search"
    experiment.mkdir()
    session = "2026-01-02_00-00-00"
    trials = [(json.dumps({"trial_id": trial_id, "status": status}), "{}")
              for trial_id, status in [("a", "TERMINATED"), ("b", "RUNNING"), ("c", "PENDING")]]
    (experiment / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": trials}))
    generator = experiment / f"search_gen_state-{session}.json"
    generator.write_bytes(cloudpickle.dumps({"counter": 2, "total_samples": 4,
                                             "name:ConcurrencyLimiter": {"live_trials": {"b"}}}))
    ray_search.repair_trial_count(str(experiment))
    state = cloudpickle.loads(generator.read_bytes())
    assert state["counter"] == 3 and state["total_samples"] == 4
    assert state["name:ConcurrencyLimiter"]["live_trials"] == {"b", "c"}
    assert "2 trials made, behind the 3 the driver's state names" in capsys.readouterr().out
    ray_search.repair_trial_count(str(experiment))  # up to date now: nothing to do
    assert capsys.readouterr().out == "" and cloudpickle.loads(generator.read_bytes()) == state
