"""The distributed backend of hyperopt_optimize.py: the same TPE search on Ray Tune.

    python3 hyperopt_optimize.py --dataset UCIHAR --backend ray --max-concurrent 4
    python3 hyperopt_optimize.py --dataset UCIHAR --backend ray --address auto --gpus-per-trial 0.5

hyperopt's TPE proposes the trials through Tune's HyperOptSearch, over the same SPACE as
the local search. The driver loads the dataset once and Tune puts it in Ray's object
store, where every worker reads it. Each trial trains with train.py's loop in a scratch
folder on its worker and reports, after every epoch, its best validation score so far
(what TPE maximises and what --early-stop's ASHA scheduler compares) with the run
folder as its Tune checkpoint. The driver writes the finished trials into the local
search's layout: results/<dataset>/trials/trial-NNNN.json and best.json.

Tune keeps the experiment under --storage (default results/<dataset>/ray/); rerunning
the same command after the driver was stopped or killed restores it: finished trials
stay finished and interrupted ones continue from their last epoch (or the one
before, when the driver died just after the last report). The settings (--max-evals,
--epochs, --max-samples, --seed, --model, --early-stop) are those of the first run; a
rerun with others is refused with a message saying how to start over.

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
import tempfile

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.hyperopt import HyperOptSearch

import hyperopt_optimize
import train

ROOT = pathlib.Path(__file__).resolve().parent
EXPERIMENT = "search"
# What workers need not receive with the code: data travels through the object store.
NOT_SHIPPED = ["data/", "results/", ".git/", ".venv*/", "tests/", "bench/"]


def train_trial(sample, data, dataset, model, seed, epochs, max_samples, threads):
    """Tune's trainable: one trial, resumed from its Tune checkpoint if it has one."""
    torch.set_num_threads(threads)
    metric = train.METRIC[dataset]
    with tempfile.TemporaryDirectory() as run_dir:
        history_path = pathlib.Path(run_dir, "history.json")
        checkpoint = tune.get_checkpoint()
        if checkpoint:
            checkpoint.to_directory(run_dir)
            if len(json.loads(history_path.read_text())) == epochs:
                return  # it had finished: the killed driver only missed the news

        def report(epoch, record):
            history = json.loads(history_path.read_text())
            best = max(history, key=lambda r: r["val"][metric])  # the first best, as train's
            tune.report({"val_score": best["val"][metric], "best_epoch": best["epoch"],
                         "epochs": epoch}, checkpoint=tune.Checkpoint.from_directory(run_dir))

        # Ray shows a worker only the GPUs its trial asked for, so "auto" picks right.
        hyperopt_optimize.run_trial(hyperopt_optimize.to_config(sample), run_dir, dataset, data,
                                    model, seed, epochs, max_samples, "auto", on_epoch=report)


def number(trial):
    """0 for Tune's first trial: its experiment tag starts with the search's own count
    (1, 2, ...), which a restore keeps, as in the trial's folder name."""
    return int(trial.experiment_tag.split("_")[0]) - 1


class TrialRecorder(tune.Callback):
    """Runs on the driver: each finished or failed trial into results/<dataset>/trials/."""

    def __init__(self, folder, dataset):
        self.folder, self.metric = pathlib.Path(folder), train.METRIC[dataset]

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result
        result = dict(val_score=last["val_score"], val_metric=self.metric,
                      epochs=last["epochs"], best_epoch=last["best_epoch"])
        hyperopt_optimize.record_trial(self.folder, number(trial),
                                       hyperopt_optimize.to_config(trial.config), result)

    def on_trial_error(self, iteration, trials, trial, **info):
        log = pathlib.Path(trial.error_file or "")  # Tune's text of the exception
        lines = log.read_text().strip().splitlines() if log.is_file() else []
        hyperopt_optimize.record_trial(self.folder, number(trial),
                                       hyperopt_optimize.to_config(trial.config),
                                       error=lines[-1] if lines else "failed, see Tune's log")


def search(dataset, data, folder, settings, address=None, max_concurrent=None,
           cpus_per_trial=1, gpus_per_trial=0, storage=None):
    """Start or restore the Tune experiment under storage and run it to the end.
    settings: max_evals, epochs, max_samples, seed, model, early_stop; they are fixed by
    the first run, and a restore with other settings stops with an error."""
    folder = pathlib.Path(folder)
    storage = str(storage or (folder / "ray").resolve())
    settings_path = folder / "ray" / "settings.json"
    saved = json.loads(settings_path.read_text()) if settings_path.is_file() else settings
    if saved != settings:
        raise train.TrainingError(
            f"the Ray search in {folder / 'ray'} was started with {saved}: rerun with those "
            f"options to continue it, or delete that folder to start a new search")
    settings_path.parent.mkdir(parents=True, exist_ok=True)
    train.write_json(settings_path, settings)

    epochs = settings["epochs"] or hyperopt_optimize.SPACE["training_epochs"]
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
            tune.with_parameters(train_trial, data=data, dataset=dataset, model=settings["model"],
                                 seed=settings["seed"], epochs=epochs,
                                 max_samples=settings["max_samples"],
                                 threads=max(1, int(cpus_per_trial))),
            {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        path = f"{storage}/{EXPERIMENT}"
        if tune.Tuner.can_restore(path):
            print(f"continuing the Ray search in {path}", flush=True)
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True)
        else:
            objective = dict(metric="val_score", mode="max")
            scheduler = (ASHAScheduler(max_t=epochs, grace_period=max(1, epochs // 10),
                                       **objective) if settings["early_stop"] else None)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    num_samples=settings["max_evals"],
                    max_concurrent_trials=max_concurrent, scheduler=scheduler,
                    search_alg=HyperOptSearch(hyperopt_optimize.SPACE, **objective,
                                              random_state_seed=settings["seed"])),
                run_config=tune.RunConfig(
                    name=EXPERIMENT, storage_path=storage, verbose=1,
                    callbacks=[TrialRecorder(folder, dataset)],
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        return tuner.fit()
    finally:
        ray.shutdown()
