"""The distributed backend of hyperopt_optimize.py: the same TPE search on Ray Tune.

    python3 hyperopt_optimize.py --dataset UCIHAR --backend ray --max-concurrent 4
    python3 hyperopt_optimize.py --dataset UCIHAR --backend ray --address auto --gpus-per-trial 0.5

The same studies as the local search (hyperopt_optimize.py: one folder per study, the
same rules for its best.json and results/<dataset>/best.json): hyperopt's TPE proposes
the trials through Tune's HyperOptSearch, over the model's space. The driver loads the
dataset once and Tune puts it in Ray's object store, where every worker reads it. Each
trial trains with train.py's loop in a scratch folder on its worker and reports, after
every epoch, the study's score so far (what TPE maximises and what --early-stop's ASHA
scheduler compares) with the run folder as its Tune checkpoint. The driver records the
finished trials in the study's trials/, as the local search does.

Tune keeps the experiment in the study's folder (ray/), or under --storage/<study>;
rerunning the same command after the driver was stopped or killed restores it:
finished trials stay finished and interrupted ones continue from their last epoch (or
the one before, when the driver died just after the last report; a state file the
kill left behind or cut short is replaced by the copy in Ray's temporary folder:
repair_driver_state, and a search generator's count of trials left behind them is
brought up to date: repair_trial_count; a trial the driver started just before the
kill, before its state named it, starts again from its first epoch, its old Tune folder
left unused). Tune fixes the number of trials at the start, so a rerun with another
--max-evals is refused.

Without --address the driver starts a Ray runtime on this machine; with one it joins a
cluster. The code reaches the workers as Ray's working_dir (without NOT_SHIPPED), the
data through the object store, so only the driver's machine needs data/. --early-stop
adds ASHA (grace period a tenth of the epochs). A trial asking for GPUs trains on the
one Ray gives it (--gpus-per-trial 0.5 puts two trials on each GPU); trials without
GPUs use --cpus-per-trial threads. On a cluster (Ray 2.60 turns on token
authentication; every node needs the head's token and the same Python environment):

    ray get-auth-token --generate          # on the head; copy ~/.ray/auth_token to each worker
    RAY_AUTH_MODE=token ray start --head --port 6379
    RAY_AUTH_MODE=token ray start --address HEAD_IP:6379                 # each worker
    RAY_AUTH_MODE=token python3 hyperopt_optimize.py --dataset UCIHAR --backend ray \
        --address auto --max-evals 60 --cpus-per-trial 4 --gpus-per-trial 1 --early-stop \
        --storage /shared/larnn-ray

On more than one node --storage must be a folder every node mounts (NFS) or a cloud URI
(s3://bucket/larnn), as Tune requires for checkpoints. tests/test_ray_search.py runs
the single-machine commands (a local runtime, and a `ray start --head` node joined with
--address auto); the multi-node recipe was not run, our build machines being single hosts.
"""
import json
import os
import pathlib
import shutil
import tempfile

import ray
import ray.cloudpickle as cloudpickle
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.hyperopt import HyperOptSearch

import hyperopt_optimize
import train

ROOT = pathlib.Path(__file__).resolve().parent
EXPERIMENT = "search"
# A trial's Tune checkpoints kept: the last two, since the driver's state can name the
# one before the last when a kill comes between a new checkpoint and the state's save.
KEPT_CHECKPOINTS = 2
# What workers need not receive with the code: data travels through the object store.
NOT_SHIPPED = ["data/", "results/", ".git/", ".venv*/", "tests/", "bench/"]


def train_trial(sample, data, settings, threads):
    """Tune's trainable: one trial, resumed from its Tune checkpoint if it has one. It
    reports after every epoch the study's score so far (what TPE maximises and ASHA
    compares) and the best validation score, with the run folder as its checkpoint."""
    torch.set_num_threads(threads)
    metric = train.METRIC[settings["dataset"]]
    with tempfile.TemporaryDirectory() as run_dir:
        history_path = pathlib.Path(run_dir, "history.json")
        checkpoint = tune.get_checkpoint()
        if checkpoint:
            checkpoint.to_directory(run_dir)
            if len(json.loads(history_path.read_text())) == settings["epochs"]:
                return  # it had finished: the killed driver only missed the news

        def report(epoch, record):
            history = json.loads(history_path.read_text())
            best = max(history, key=lambda r: r["val"][metric])  # the first best, as train's
            score = hyperopt_optimize.objective_score(history, metric, settings["objective"],
                                                      settings["epochs"])
            tune.report({"score": score, "val_score": best["val"][metric],
                         "best_epoch": best["epoch"], "epochs": epoch,
                         "seconds_per_epoch": record["wall_time_s"] / epoch},
                        checkpoint=tune.Checkpoint.from_directory(run_dir))

        # Ray shows a worker only the GPUs its trial asked for, so "auto" picks right.
        hyperopt_optimize.run_trial(hyperopt_optimize.to_config(sample), run_dir, settings,
                                    data, "auto", on_epoch=report)


def number(trial):
    """0 for Tune's first trial: its experiment tag starts with the search's own count
    (1, 2, ...), which a restore keeps, as in the trial's folder name."""
    return int(trial.experiment_tag.split("_")[0]) - 1


class TrialRecorder(tune.Callback):
    """Runs on the driver: each finished or failed trial into the study's trials/, as the
    local search records them, and the cost estimate after the first epoch."""

    def __init__(self, folder, settings, estimate):
        self.folder, self.settings, self.estimate = pathlib.Path(folder), settings, estimate

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.estimate(result["epochs"], result["seconds_per_epoch"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result
        result = dict(score=last["score"], val_score=last["val_score"],
                      epochs=last["epochs"], best_epoch=last["best_epoch"])
        hyperopt_optimize.record_trial(self.folder, self.settings, number(trial),
                                       hyperopt_optimize.to_config(trial.config), result)

    def on_trial_error(self, iteration, trials, trial, **info):
        log = pathlib.Path(trial.error_file or "")  # Tune's text of the exception
        lines = log.read_text().strip().splitlines() if log.is_file() else []
        hyperopt_optimize.record_trial(self.folder, self.settings, number(trial),
                                       hyperopt_optimize.to_config(trial.config),
                                       error=lines[-1] if lines else "failed, see Tune's log")


def driver_state_ok(path):
    """Whether a Tune experiment state file is whole (it is JSON)."""
    try:
        json.loads(pathlib.Path(path).read_text())
        return True
    except (OSError, ValueError):
        return False


def newest_state(experiment):
    """The newest driver state file of a Tune experiment and its session, or (None, None)."""
    states = sorted(pathlib.Path(experiment).glob("experiment_state-*.json"))
    if not states:
        return None, None
    return states[-1], states[-1].name[len("experiment_state-"):-len(".json")]


def repair_driver_state(experiment):
    """Tune writes its driver's state (experiment_state-<session>.json, which trials
    exist and which checkpoint each resumes from, beside the searcher's) in Ray's
    temporary folder at every step, then copies it to the experiment's storage in the
    background. A killed driver leaves the storage's copy behind that one (naming a trial
    checkpoint Tune has since deleted: the trial fails on restore) or cut short (Tune
    restores no trials and ends the study short). So the temporary folder's copy, where
    this machine still has it whole and it is newer, replaces it; a cut copy without one
    stops with one line."""
    stored, session = newest_state(experiment)
    if not stored:
        return
    temp = pathlib.Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"
    staged = [path for path in temp.glob(f"session_*/artifacts/*/{EXPERIMENT}/"
                                         f"driver_artifacts/{stored.name}")
              if driver_state_ok(path)]
    whole = driver_state_ok(stored)
    newer = [path for path in staged if not whole or
             path.stat().st_mtime > stored.stat().st_mtime]
    if newer:
        source = max(newer, key=lambda path: path.stat().st_mtime).parent
        for path in source.glob(f"*{session}*"):
            if path.is_file():
                train.write_atomic(pathlib.Path(experiment) / path.name,
                                   lambda tmp, path=path: shutil.copyfile(path, tmp))
        print(f"{stored}: {'behind' if whole else 'cut short by'} the killed driver; "
              f"restored from {source}", flush=True)
    elif not whole:
        raise train.TrainingError(
            f"{stored} was cut short by the killed driver and Ray's temporary folder has no "
            f"whole copy: Tune cannot continue its experiment. To run the study again from "
            f"its first trial (over the trial records it made), move {experiment} aside")


def repair_trial_count(experiment):
    """Tune saves its driver's state as files written one after the other: the trials
    (experiment_state), the searcher's, then the search generator's (search_gen_state:
    how many trials it has made, and the concurrency limit's live trials). A kill between
    them leaves the generator's count behind the trials the state names, and restored so,
    the generator makes those trials again: one Tune trial more than --max-evals, two of
    them recorded under one number (seen in CI). So the count is raised to the trials the
    state names, and the unfinished ones among them count as live."""
    state, session = newest_state(experiment)
    if not state:
        return
    path = pathlib.Path(experiment) / f"search_gen_state-{session}.json"  # a pickle
    if not path.is_file():
        return
    trials = [json.loads(trial) for trial, _ in json.loads(state.read_text())["trial_data"]]
    generator = cloudpickle.loads(path.read_bytes())
    if generator["counter"] >= len(trials):
        return
    print(f"{path}: {generator['counter']} trials made, behind the {len(trials)} the driver's "
          f"state names (the kill came between its files); set to {len(trials)}", flush=True)
    generator["counter"] = len(trials)
    limiter = generator.get("name:ConcurrencyLimiter")
    if limiter:
        limiter["live_trials"] |= {trial["trial_id"] for trial in trials
                                   if trial["status"] not in ("TERMINATED", "ERROR")}
    train.write_atomic(path, lambda tmp: pathlib.Path(tmp).write_bytes(
        cloudpickle.dumps(generator)))


def search(settings, data, folder, max_evals, address=None, max_concurrent=None,
           cpus_per_trial=1, gpus_per_trial=0, storage=None):
    """Start or restore the study's Tune experiment (under storage, default the study's
    folder) and run it to the end. Tune fixes the number of trials when it starts an
    experiment, so a restore with another --max-evals stops with an error."""
    folder = pathlib.Path(folder)
    # A cloud URI (s3://...) is no path: join with "/".
    storage = f"{storage.rstrip('/')}/{folder.name}" if storage else str((folder / "ray").resolve())
    evals_path = folder / "ray-max-evals.json"
    saved = json.loads(evals_path.read_text()) if evals_path.is_file() else max_evals
    if saved != max_evals:
        raise train.TrainingError(
            f"the Ray study {folder} was started with --max-evals {saved}, which Tune cannot "
            f"change: rerun with it to continue the study")
    train.write_json(evals_path, max_evals)
    epochs = settings["epochs"]
    done = len(list((folder / "trials").glob("trial-*.json")))
    estimate = hyperopt_optimize.CostEstimate(max_evals - done, epochs, max_concurrent or 1)
    # Tune saves its experiment state (which trials finished, their last checkpoints) at
    # most every 10 s by default: a driver killed in between would rerun a finished
    # trial's last epochs. The state is small and epochs are seconds apart, so save it
    # at every step of Tune's loop. A kill just after a report can still lose it: the
    # trial then trains that one epoch again (seen once in tests/test_ray_search.py).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    try:
        ray.init(address=address, log_to_driver=False,
                 runtime_env={"working_dir": str(ROOT), "excludes": NOT_SHIPPED})
    except ConnectionError as error:
        raise train.TrainingError(f"{error}: start it with `ray start --head` (ray_search.py's "
                                  f"docstring) or leave out --address for a local Ray "
                                  f"runtime") from None
    try:
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, data=data, settings=settings,
                                 threads=max(1, int(cpus_per_trial))),
            {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        path = f"{storage}/{EXPERIMENT}"
        if tune.Tuner.can_restore(path):
            print(f"continuing the Ray search in {path}", flush=True)
            repair_driver_state(path)
            repair_trial_count(path)
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True)
        else:
            objective = dict(metric="score", mode="max")
            scheduler = (ASHAScheduler(max_t=epochs, grace_period=max(1, epochs // 10),
                                       **objective) if settings["early_stop"] else None)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    num_samples=max_evals,
                    max_concurrent_trials=max_concurrent, scheduler=scheduler,
                    search_alg=HyperOptSearch(hyperopt_optimize.study_space(settings),
                                              **objective,
                                              random_state_seed=settings["seed"])),
                run_config=tune.RunConfig(
                    name=EXPERIMENT, storage_path=storage, verbose=1,
                    callbacks=[TrialRecorder(folder, settings, estimate)],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=KEPT_CHECKPOINTS)))
        return tuner.fit()
    finally:
        ray.shutdown()
