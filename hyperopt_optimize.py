"""Resumable TPE hyperparameter search (hyperopt) over the paper's search space.

    python3 hyperopt_optimize.py --dataset UCIHAR --max-evals 30
    python3 hyperopt_optimize.py --dataset UCIHAR --max-evals 4 --epochs 2 --max-samples 512
    python3 hyperopt_optimize.py --dataset UCIHAR --backend ray --address auto   # see ray_search.py

The objective is the best validation score of a train.py run (accuracy for UCI HAR,
weighted F1 for Opportunity), never a test figure. Every finished trial is saved at
once: results/<dataset>/trials.pkl (the hyperopt Trials, written atomically) and
results/<dataset>/trials/trial-NNNN.json, and results/<dataset>/best.json then holds
the best config so far, in the format train.py reads. Rerunning continues where the
search stopped; a killed trial is run again (from its last epoch checkpoint), a
failing trial is recorded with its error and the search goes on.
"""
import argparse
import json
import pathlib
import pickle
import shutil
import sys
import traceback

import numpy as np
from hyperopt import STATUS_FAIL, STATUS_OK, Trials, fmin, hp, tpe
from hyperopt.exceptions import AllTrialsFailed

import datasets
import larnn
import train

# The paper's second (published) search round. Fixed entries are plain values.
SPACE = {
    "learning_rate": 0.006 * hp.loguniform("learning_rate_mult", -0.4, 0.4),
    "decay_each_N_epoch": hp.quniform("decay_each_N_epoch", 5.501, 50.499, 1),
    "l2_weight_reg": 0.002 * hp.loguniform("l2_weight_reg_mult", -1.3, 1.3),
    "dropout": hp.uniform("dropout", 0.05, 0.5),
    "hidden_size": 68 * hp.loguniform("hidden_size_mult", -0.3, 0.3),
    "attention_heads": hp.quniform("attention_heads", 19.501, 40.499, 1),
    "larnn_window_size": hp.uniform("larnn_window_size", 25, 100),
    "larnn_mode": hp.choice("larnn_mode", ["residual", "layer"]),
    "use_positional_encoding": hp.choice("use_positional_encoding", [False, True]),
    "activation_on_keys_and_values": True,
    "cell_norm_placement": "recurrence",
    "num_layers": 3,
    "is_stacked_residual": True,
    "training_epochs": 100,
    "batch_size": 256,
}


def to_config(sample):
    """A sample of SPACE as a train.py config: integers cast, and hidden_size rounded to
    the nearest multiple of attention_heads (as the reference code does)."""
    config = dict(sample)
    heads = int(config["attention_heads"])
    config.update(attention_heads=heads,
                  hidden_size=max(1, round(config["hidden_size"] / heads)) * heads,
                  decay_each_N_epoch=int(config["decay_each_N_epoch"]),
                  larnn_window_size=int(config["larnn_window_size"]),
                  num_layers=int(config["num_layers"]), batch_size=int(config["batch_size"]),
                  training_epochs=int(config["training_epochs"]))
    return config


def run_trial(config, trial_dir, dataset, data, model, seed, epochs, max_samples, device,
              on_epoch=None):
    """Train one config in trial_dir (resuming it if a killed search left it there);
    returns train.py's result dict."""
    trial_dir = pathlib.Path(trial_dir)
    run = dict(dataset=dataset, model=model, seed=seed, epochs=epochs or config["training_epochs"],
               max_samples=max_samples, config=config)
    config_path = trial_dir / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()) != run:
        shutil.rmtree(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    train.write_json(config_path, run)
    return train.train(trial_dir, data, on_epoch=on_epoch, device=device)


def record_trial(folder, number, config, result=None, error=None):
    """trials/trial-NNNN.json, and best.json if this trial is the best so far."""
    entry = dict(trial=number, config=config, status="ok" if error is None else "fail",
                 error=error, val_score=result and result["val_score"],
                 val_metric=result and result["val_metric"],
                 epochs=result and result["epochs"], best_epoch=result and result["best_epoch"])
    train.write_json(folder / "trials" / f"trial-{number:04d}.json", entry)
    if error is not None:
        return
    best_path = folder / "best.json"
    best = json.loads(best_path.read_text()) if best_path.is_file() else {}
    if best.get("source") != "hyperopt_optimize.py" or result["val_score"] > best["val_score"]:
        train.write_json(best_path, dict(source="hyperopt_optimize.py", trial=number,
                                         val_score=result["val_score"],
                                         val_metric=result["val_metric"], config=config))


def load_trials(path):
    if not path.is_file():
        return Trials()
    with open(path, "rb") as f:
        return pickle.load(f)


def search(dataset, max_evals, epochs=None, max_samples=None, device="auto", seed=0,
           results=train.RESULTS, data_dir=None, model="larnn"):
    """Run TPE until max_evals trials are done in total, saving after each one."""
    folder = pathlib.Path(results) / dataset
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    trials_path = folder / "trials.pkl"
    trials = load_trials(trials_path)
    data = datasets.load(dataset, data_dir)

    def objective(sample):
        number = done  # the loop below runs one trial per fmin call
        config = to_config(sample)
        try:
            result = run_trial(config, folder / "trials" / f"trial-{number:04d}", dataset, data,
                               model, seed, epochs, max_samples, device)
        except (train.TrainingError, ValueError, RuntimeError) as error:
            message = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
            print(f"trial {number} failed: {message}", file=sys.stderr)
            traceback.print_exc()
            record_trial(folder, number, config, error=message)
            return {"status": STATUS_FAIL, "error": message}
        record_trial(folder, number, config, result)
        return {"status": STATUS_OK, "loss": -result["val_score"], "result": result}

    while len(trials.trials) < max_evals:
        done = len(trials.trials)
        print(f"trial {done} of {max_evals}", flush=True)
        # The seed depends on the trial number, so a rerun proposes the same trial again.
        try:
            fmin(objective, SPACE, algo=tpe.suggest, max_evals=done + 1, trials=trials,
                 rstate=np.random.default_rng(seed * 1000003 + done), show_progressbar=False,
                 return_argmin=False)
        except AllTrialsFailed:  # fmin looks up the best trial even when not asked to
            pass
        train.write_atomic(trials_path, lambda tmp: pickle.dump(trials, open(tmp, "wb")))
    ok = [t for t in trials.results if t["status"] == STATUS_OK]
    print(f"{len(trials.trials)} trials ({len(ok)} ok); best config in {folder / 'best.json'}")
    return trials


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(train.METRIC), default="UCIHAR")
    parser.add_argument("--max-evals", type=train.positive_int, default=30, help="trials in total")
    parser.add_argument("--epochs", type=train.positive_int,
                        help="per trial (default: the space's 100)")
    parser.add_argument("--max-samples", type=train.positive_int,
                        help="cap every split (quick searches)")
    parser.add_argument("--model", choices=larnn.MODELS, default="larnn")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="local backend only; Ray trials use the GPUs they ask for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="default: data/ or $LARNN_DATA_DIR")
    parser.add_argument("--results-dir", default=str(train.RESULTS))
    parser.add_argument("--backend", choices=["local", "ray"], default="local")
    ray_options = parser.add_argument_group("--backend ray")
    ray_options.add_argument("--address", help="a running Ray cluster: auto or HOST:PORT "
                                               "(default: start a local Ray runtime)")
    ray_options.add_argument("--max-concurrent", type=train.positive_int,
                             help="trials at once (default: as many as resources allow)")
    ray_options.add_argument("--cpus-per-trial", type=float, default=1)
    ray_options.add_argument("--gpus-per-trial", type=float, default=0)
    ray_options.add_argument("--early-stop", action="store_true",
                             help="ASHA stops trials that trail at epoch milestones")
    ray_options.add_argument("--storage", help="Tune's experiment storage, shared by all "
                                               "nodes of a cluster (default: "
                                               "results/<dataset>/ray)")
    args = parser.parse_args(argv)
    try:
        if args.backend == "local":
            search(args.dataset, args.max_evals, args.epochs, args.max_samples, args.device,
                   args.seed, args.results_dir, args.data_dir, args.model)
        else:
            search_on_ray(args)
    except (train.TrainingError, datasets.DatasetError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("\nstopped: finished trials are saved; rerun the same command to continue")


def search_on_ray(args):
    if args.cpus_per_trial < 0 or args.gpus_per_trial < 0:
        raise train.TrainingError(f"--cpus-per-trial {args.cpus_per_trial}, --gpus-per-trial "
                                  f"{args.gpus_per_trial}: resources cannot be negative")
    try:
        import ray_search
    except ImportError as error:
        raise train.TrainingError(f"--backend ray needs Ray Tune ({error}): pip install -r "
                                  f"requirements-distributed.txt") from None
    folder = pathlib.Path(args.results_dir) / args.dataset
    (folder / "trials").mkdir(parents=True, exist_ok=True)
    settings = dict(max_evals=args.max_evals, epochs=args.epochs, max_samples=args.max_samples,
                    seed=args.seed, model=args.model, early_stop=args.early_stop)
    ray_search.search(args.dataset, datasets.load(args.dataset, args.data_dir), folder,
                      settings, args.address, args.max_concurrent, args.cpus_per_trial,
                      args.gpus_per_trial, args.storage)
    print(f"best config in {folder / 'best.json'}")


if __name__ == "__main__":
    main()
