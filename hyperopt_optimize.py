"""Resumable TPE hyperparameter search (hyperopt) over the paper's space, as studies.

    python3 hyperopt_optimize.py --dataset UCIHAR --max-evals 30     # two days on 2 cores
    python3 hyperopt_optimize.py --dataset UCIHAR --max-evals 4 --epochs 2 --max-samples 512
    python3 hyperopt_optimize.py --dataset UCIHAR --model lstm       # a baseline, its own space
    python3 hyperopt_optimize.py --dataset UCIHAR --backend ray --address auto   # ray_search.py

A study is what makes scores comparable: dataset, model, epochs per trial, sample cap,
seed, objective and the run options (train.py's --precise-bn, --bn-scale-init,
--lr-schedule), plus Ray's early stopping. Each has its own folder,
results/<dataset>/search/<study>/: settings.json, the hyperopt trials (trials.pkl, not
committed: where it is missing, they are rebuilt from the trial records),
trials/trial-NNNN.json and trials/trial-NNNN/ (the run) per trial, and best.json, its
best config with provenance (train.py --config reads it). Rerunning a command continues
its study; other settings make or continue another one. A study at full budget (every
window, the space's epochs) also writes results/<dataset>/best.json (best-<model>.json
for the baselines), which train.py retrains by default; results/<dataset>/published.json
is data that no command writes.

The objective is a validation score, never a test figure: by default the mean over the
last tenth of the epochs ("last-tenth", which one lucky epoch cannot win: validation
accuracy on UCI HAR's 4 validation subjects jumps by up to 10 points between epochs), or
the paper's best epoch ("best"). Every finished trial is saved at once; a killed trial
continues from its last epoch; a trial that raises is recorded with its error and the
study goes on; Ctrl-C stops cleanly.
"""
import argparse
import json
import math
import pathlib
import pickle
import sys
import time
import traceback

import numpy as np
from hyperopt import JOB_STATE_DONE, STATUS_FAIL, STATUS_OK, Trials, fmin, hp, tpe
from hyperopt.base import Domain
from hyperopt.exceptions import AllTrialsFailed
from hyperopt.fmin import generate_trial

import datasets
import larnn
import train

# The LARNN: the paper's second (published) search round (SPEC section 4). Fixed
# entries are plain values.
LARNN_SPACE = {
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
# Entries a model without attention has no use for, fixed at values that build.
NO_ATTENTION = dict(attention_heads=1, larnn_window_size=1, larnn_mode="residual",
                    use_positional_encoding=False)
SPACES = {
    "larnn": LARNN_SPACE,
    # The BN-LSTM, the LARNN without attention: the same space without the attention
    # entries, so that the two are tuned alike.
    "bnlstm": {**LARNN_SPACE, **NO_ATTENTION},
    # torch.nn.LSTM: what it has. The shared entries keep the LARNN's ranges, so that
    # differences come from the model, not the search; its depth, its main capacity
    # knob besides the width, is searched over 1-3 layers (the paper's LSTM had 2).
    "lstm": {**LARNN_SPACE, **NO_ATTENTION,
             "num_layers": hp.choice("num_layers", [1, 2, 3])},
}
OBJECTIVES = ("last-tenth", "best")
RUN_OPTION_TAGS = dict(precise_bn_windows="precisebn", bn_scale_init="bnscale", lr_schedule="")


def objective_score(history, metric, objective, epochs):
    """The study's score of a trial's history (so far): the best validation score over
    epochs ("best", the paper's), or the mean over the last ceil(epochs / 10) epochs."""
    scores = [record["val"][metric] for record in history]
    if objective == "best":
        return max(scores)
    return float(np.mean(scores[-math.ceil(epochs / 10):]))


def study_settings(dataset, model, epochs, max_samples, seed, objective, backend="local",
                   early_stop=False, fixed=None, **run_options):
    """What makes a study's scores comparable (and its state one kind: the backend);
    fixed: entries of the space fixed by --set, if any."""
    fixed = check_fixed(fixed or {})
    return dict(dataset=dataset, model=model, epochs=epochs or SPACES[model]["training_epochs"],
                max_samples=max_samples, seed=seed, objective=objective, backend=backend,
                early_stop=early_stop, **{**train.RUN_OPTIONS, **run_options},
                **({"fixed": fixed} if fixed else {}))


def check_fixed(fixed):
    """--set's entries, checked as train.py checks a config's; the epochs are --epochs."""
    if "training_epochs" in fixed:
        raise train.TrainingError("--set training_epochs: a search's epochs per trial are "
                                  "--epochs")
    train.check_config({**train.PAPER_CONFIG, **fixed}, "--set")
    return fixed


def study_space(settings):
    """The model's space (SPACES) with the study's fixed entries."""
    return {**SPACES[settings["model"]], **settings.get("fixed", {})}


def study_name(settings):
    """e.g. larnn-100ep-all-seed0-last-tenth-precisebn2048-bnscale0.1"""
    parts = [settings["model"], f"{settings['epochs']}ep",
             f"{settings['max_samples']}win" if settings["max_samples"] else "all",
             f"seed{settings['seed']}", settings["objective"]]
    parts += [f"{tag}{settings[option]}" for option, tag in RUN_OPTION_TAGS.items()
              if settings[option] != train.RUN_OPTIONS[option]]
    parts += [f"{key}{value}" for key, value in sorted(settings.get("fixed", {}).items())]
    return "-".join(parts + (["asha"] if settings["early_stop"] else []))


def full_budget(settings):
    return not settings["max_samples"] and \
        settings["epochs"] == SPACES[settings["model"]]["training_epochs"]


def report_budget(results, settings):
    """Where else the study's best config went, or why it did not."""
    if full_budget(settings):
        path = train.best_config_path(results, settings["dataset"], settings["model"])
        return f", at full budget also {path}, which train.py retrains by default"
    return (f" (a reduced budget: retrain it at full budget with python3 "
            f"results/retrain_best.py --study {study_name(settings)})")


def open_study(results, settings):
    """The study's folder, made or continued, with a line saying which and how full."""
    folder = pathlib.Path(results) / settings["dataset"] / "search" / study_name(settings)
    settings_path = folder / "settings.json"
    if settings_path.is_file():
        saved = json.loads(settings_path.read_text())
        if saved["backend"] != settings["backend"]:
            raise train.TrainingError(f"study {folder} runs on the {saved['backend']} "
                                      f"backend: continue it with --backend {saved['backend']}")
        trials = len(list((folder / "trials").glob("trial-*.json")))
        print(f"continuing study {folder} ({trials} trials recorded)", flush=True)
    else:
        (folder / "trials").mkdir(parents=True, exist_ok=True)
        train.write_json(settings_path, settings)
        print(f"new study {folder}", flush=True)
    return folder


def to_config(sample):
    """A sample of a space as a train.py config: integers cast, and hidden_size rounded to
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


def run_trial(config, trial_dir, settings, data, device, on_epoch=None):
    """Train one config of the study in trial_dir (resuming it if a killed search left it
    there), without scoring the test split; returns train.py's result dict with the
    study's score, "score"."""
    trial_dir = pathlib.Path(trial_dir)
    run = train.run_spec(settings["dataset"], settings["model"], config, settings["seed"],
                         settings["epochs"], settings["max_samples"],
                         **{option: settings[option] for option in train.RUN_OPTIONS})
    config_path = trial_dir / "config.json"
    if config_path.is_file() and json.loads(config_path.read_text()) != run:
        # Only a proposal that changed between runs gets here; keep the old run, say so.
        kept = trial_dir.with_name(f"{trial_dir.name}-replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        trial_dir.rename(kept)
        print(f"{trial_dir} held another config: moved to {kept}", file=sys.stderr)
    trial_dir.mkdir(parents=True, exist_ok=True)
    train.write_json(config_path, run)
    result = train.train(trial_dir, data, on_epoch=on_epoch, device=device, test=False)
    history = json.loads((trial_dir / "history.json").read_text())
    metric = train.METRIC[settings["dataset"]]
    return dict(result, score=objective_score(history, metric, settings["objective"],
                                              settings["epochs"]))


def record_trial(folder, settings, number, config, result=None, error=None, sample=None):
    """trials/trial-NNNN.json, and the study's best.json if this trial is its best so
    far (and, at full budget, results/<dataset>/best.json for its model). sample: TPE's
    values of the trial ({label: value}), from which load_trials rebuilds the study."""
    entry = dict(trial=number, config=config, status="ok" if error is None else "fail",
                 error=error, objective=settings["objective"],
                 val_score=result and result["score"],
                 best_val_score=result and result["val_score"],
                 val_metric=train.METRIC[settings["dataset"]],
                 epochs=result and result["epochs"], best_epoch=result and result["best_epoch"],
                 **({"sample": sample} if sample is not None else {}))
    train.write_json(folder / "trials" / f"trial-{number:04d}.json", entry)
    if error is not None:
        return
    best = dict(source="hyperopt_optimize.py", study=folder.name, trial=number,
                val_score=result["score"], objective=settings["objective"],
                val_metric=entry["val_metric"], settings=settings, config=config)
    targets = [folder / "best.json"]
    if full_budget(settings):
        results = folder.parent.parent.parent  # results/<dataset>/search/<study>
        targets.append(train.best_config_path(results, settings["dataset"], settings["model"]))
    for path in targets:
        old = json.loads(path.read_text()) if path.is_file() else {}
        if old.get("study") == folder.name and result["score"] <= old["val_score"]:
            continue
        if old.get("study") not in (None, folder.name):  # scores of two studies differ in kind
            print(f"{path}: study {folder.name} replaces study {old['study']}", file=sys.stderr)
        train.write_json(path, best)


def load_trials(folder):
    """The study's hyperopt Trials: trials.pkl, or where it is missing (a fresh clone:
    the pickle is not committed) rebuilt from the trial records, which TPE then reads
    as it read the originals, so the study goes on with the same proposals."""
    path = folder / "trials.pkl"
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    trials = Trials()
    records = [json.loads(path.read_text())
               for path in sorted((folder / "trials").glob("trial-*.json"))]
    if any("sample" not in record for record in records):
        raise train.TrainingError(f"{folder} has no trials.pkl, and trial records written "
                                  f"before they kept TPE's samples: it cannot be continued; "
                                  f"start another study (another --seed)")
    docs = []
    for tid, record in zip(trials.new_trial_ids(len(records)), records):
        doc = generate_trial(tid, record["sample"])
        doc["state"] = JOB_STATE_DONE
        doc["result"] = ({"status": STATUS_OK, "loss": -record["val_score"]}
                         if record["status"] == "ok" else
                         {"status": STATUS_FAIL, "error": record["error"]})
        docs.append(doc)
    trials.insert_trial_docs(docs)
    trials.refresh()
    return trials


def tpe_sample(trials, number):
    """TPE's values of trial `number` as JSON can hold them."""
    vals = trials.trials[number]["misc"]["vals"]
    return {label: value[0].item() if hasattr(value[0], "item") else value[0]
            for label, value in vals.items() if value}


class CostEstimate:
    """After the first epoch this command trains, one line: what the rest will cost."""

    def __init__(self, trials_left, epochs, concurrent=1):
        self.trials_left, self.epochs, self.concurrent = trials_left, epochs, concurrent
        self.printed = False

    def __call__(self, epoch, seconds_per_epoch):
        """epoch: how many epochs the trial that reports has trained."""
        if self.printed:
            return
        self.printed = True
        others, this = self.trials_left - 1, self.epochs - epoch
        seconds = (others * self.epochs + this) * seconds_per_epoch / self.concurrent
        print(f"{seconds_per_epoch:.0f} s per epoch: {this} epoch{'s' * (this != 1)} left in "
              f"this trial, then {others} more trial{'s' * (others != 1)} of {self.epochs}; about "
              f"{duration(seconds)} left" + (f" at {self.concurrent} trials at a time"
                                             if self.concurrent > 1 else ""), flush=True)


def duration(seconds):
    """'40 minutes' under two hours, else '7.5 hours'."""
    return f"{seconds / 60:.0f} minutes" if seconds < 7200 else f"{seconds / 3600:.1f} hours"


def search(settings, max_evals, device="auto", results=train.RESULTS, data_dir=None):
    """Run TPE until the study holds max_evals trials, saving after each one."""
    folder = open_study(results, settings)
    trials_path = folder / "trials.pkl"
    trials = load_trials(folder)
    data = datasets.load(settings["dataset"], data_dir)
    space = study_space(settings)
    estimate = CostEstimate(max_evals - len(trials.trials), settings["epochs"])

    def objective(sample):
        number = done  # the loop below runs one trial per fmin call
        config = to_config(sample)
        try:
            result = run_trial(config, folder / "trials" / f"trial-{number:04d}", settings,
                               data, device, on_epoch=lambda epoch, record:
                               estimate(epoch, record["wall_time_s"] / epoch))
        except Exception as error:  # anything a trial raises is its result; Ctrl-C is not
            message = datasets.one_line(error) or repr(error)
            print(f"trial {number} failed: {message}", file=sys.stderr)
            traceback.print_exc()
            record_trial(folder, settings, number, config, error=message,
                         sample=tpe_sample(trials, number))
            return {"status": STATUS_FAIL, "error": message}
        record_trial(folder, settings, number, config, result, sample=tpe_sample(trials, number))
        return {"status": STATUS_OK, "loss": -result["score"]}

    while len(trials.trials) < max_evals:
        done = len(trials.trials)
        print(f"trial {done} of {max_evals}", flush=True)
        # The seed depends on the trial number, so a rerun proposes the same trial again.
        try:
            fmin(objective, space, algo=tpe.suggest, max_evals=done + 1, trials=trials,
                 rstate=np.random.default_rng(settings["seed"] * 1000003 + done),
                 show_progressbar=False, return_argmin=False)
        except AllTrialsFailed:  # fmin looks up the best trial even when not asked to
            pass
        train.write_atomic(trials_path, lambda tmp: pickle.dump(trials, open(tmp, "wb")))
    ok = [t for t in trials.results if t["status"] == STATUS_OK]
    print(f"{len(trials.trials)} trials ({len(ok)} ok); the study's best config: "
          f"{folder / 'best.json'}" + report_budget(results, settings))
    return trials


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each default, but for those that are None (their help says what)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelp)
    parser.add_argument("--dataset", choices=list(train.METRIC), default="UCIHAR",
                        help="the dataset")
    parser.add_argument("--model", choices=larnn.MODELS, default="larnn",
                        help="each model searches its own space (SPACES)")
    parser.add_argument("--max-evals", type=train.positive_int, default=30,
                        help="trials in the study, in total (the search prints what they "
                             "will cost after the first epoch; README.md: times per epoch)")
    parser.add_argument("--epochs", type=train.positive_int, default=100,
                        help="per trial; fewer than the space's 100 is a reduced budget")
    parser.add_argument("--max-samples", type=train.positive_int,
                        help="cap every split, a reduced budget (default: every window)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="last-tenth",
                        help="mean validation score over the last tenth of the epochs, or "
                             "the best epoch's (the paper's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="of TPE's proposals and of every trial's training")
    train.add_run_options(parser)
    parser.add_argument("--set", type=train.parse_setting, action="append", default=[],
                        metavar="KEY=VALUE", help="fix an entry of the space, e.g. "
                                                  "num_layers=2 (repeatable; a study of its own)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="local backend only; Ray trials use the GPUs they ask for")
    parser.add_argument("--data-dir", help="default: data/ or $LARNN_DATA_DIR")
    parser.add_argument("--results-dir", default=str(train.RESULTS), help="where studies go")
    parser.add_argument("--backend", choices=["local", "ray"], default="local",
                        help="local: one trial at a time; ray: Ray Tune (ray_search.py)")
    ray_options = parser.add_argument_group("--backend ray")
    ray_options.add_argument("--address", help="a running Ray cluster: auto or HOST:PORT "
                                               "(default: start a local Ray runtime)")
    ray_options.add_argument("--max-concurrent", type=train.positive_int,
                             help="trials at once (default: as many as resources allow)")
    ray_options.add_argument("--cpus-per-trial", type=float, default=1, help="and its threads")
    ray_options.add_argument("--gpus-per-trial", type=float, default=0,
                             help="0.5 puts two trials on a GPU")
    ray_options.add_argument("--early-stop", action="store_true",
                             help="ASHA stops trials that trail at epoch milestones")
    ray_options.add_argument("--storage", help="Tune's experiment storage, shared by all "
                                               "nodes of a cluster (default: the study's "
                                               "folder)")
    args = parser.parse_args(argv)
    try:
        run_options = train.run_options(args)
        settings = study_settings(args.dataset, args.model, args.epochs, args.max_samples,
                                  args.seed, args.objective, args.backend,
                                  args.early_stop, dict(args.set), **run_options)
        if args.backend == "local":
            if args.early_stop:
                raise train.TrainingError("--early-stop needs --backend ray")
            search(settings, args.max_evals, args.device, args.results_dir, args.data_dir)
        else:
            search_on_ray(args, settings)
    except (train.TrainingError, datasets.DatasetError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("\nstopped: finished trials are saved; rerun the same command to continue")


def search_on_ray(args, settings):
    if args.cpus_per_trial < 0 or args.gpus_per_trial < 0:
        raise train.TrainingError(f"--cpus-per-trial {args.cpus_per_trial}, --gpus-per-trial "
                                  f"{args.gpus_per_trial}: resources cannot be negative")
    try:
        import ray_search
    except ImportError as error:
        raise train.TrainingError(f"--backend ray needs Ray Tune ({error}): pip install -r "
                                  f"requirements-distributed.txt") from None
    folder = open_study(args.results_dir, settings)
    ray_search.search(settings, datasets.load(args.dataset, args.data_dir), folder,
                      args.max_evals, args.address, args.max_concurrent, args.cpus_per_trial,
                      args.gpus_per_trial, args.storage)
    print(f"the study's best config: {folder / 'best.json'}"
          + report_budget(args.results_dir, settings))


if __name__ == "__main__":
    main()
