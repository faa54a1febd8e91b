"""What a search trial costs: configs drawn from each model's space, each timed.

For each model, draws --draws configs from hyperopt_optimize.SPACES (seeded), times a
training step (batch 256) and an eval pass (batch 1024) of each, and estimates one
epoch of UCI HAR as the search trains it: the training split's batches, the precise
BatchNorm re-estimate (--precise-bn windows, forward passes in training mode, timed as
eval passes) and the evaluation of validation (a trial leaves the test split out; before
2026-12-06's second session it scored it too: --with-test). Prints one JSON line per config
and one summary line per model (median, mean and largest epoch, and each against the
published config's).

    python3 bench/trial_cost.py [--draws 20] [--models larnn bnlstm lstm] [--threads N]

Run it on a quiet machine; --threads 1 times what one of two trials side by side gets.
"""
import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import numpy as np
import torch
from hyperopt.pyll import stochastic

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import hyperopt_optimize  # noqa: E402
import larnn  # noqa: E402
from step_time import step_time  # noqa: E402

# UCI HAR as the search trains it (the rebuilt archive's split sizes), and the study
# option behind our best runs.
TRAIN_WINDOWS, VAL_WINDOWS, TEST_WINDOWS, PRECISE_BN_WINDOWS = 5928, 1487, 2996, 2048
BATCH, EVAL_BATCH = 256, 1024


def epoch_seconds(model, config, with_test=False):
    """(training step s, eval pass s, estimated epoch s) of one config."""
    overrides = {key: config[key] for key in larnn.PAPER_CONFIG}
    train_s = step_time(model, torch.device("cpu"), 2, **overrides)
    eval_s = step_time(model, torch.device("cpu"), 1, evaluate=True, **overrides)
    passes = (PRECISE_BN_WINDOWS + VAL_WINDOWS + with_test * TEST_WINDOWS) / EVAL_BATCH
    return train_s, eval_s, math.ceil(TRAIN_WINDOWS / BATCH) * train_s + passes * eval_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--models", nargs="+", choices=larnn.MODELS, default=larnn.MODELS)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-test", action="store_true",
                        help="score the test split each epoch too, as trials did before")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for model in args.models:
        *_, published = epoch_seconds(model, larnn.PAPER_CONFIG, args.with_test)
        rng = np.random.default_rng(args.seed)
        epochs = []
        for draw in range(args.draws):
            config = hyperopt_optimize.to_config(
                stochastic.sample(hyperopt_optimize.SPACES[model], rng=rng))
            start = time.perf_counter()
            train_s, eval_s, epoch_s = epoch_seconds(model, config, args.with_test)
            epochs.append(epoch_s)
            print(json.dumps({
                "model": model, "draw": draw, "hidden_size": config["hidden_size"],
                "attention_heads": config["attention_heads"],
                "window": config["larnn_window_size"],
                "pe": config["use_positional_encoding"], "mode": config["larnn_mode"],
                "num_layers": config["num_layers"], "train_step_s": round(train_s, 3),
                "eval_pass_s": round(eval_s, 3), "epoch_s": round(epoch_s, 1),
                "vs_published": round(epoch_s / published, 2),
                "timed_in_s": round(time.perf_counter() - start, 1)}), flush=True)
        print(json.dumps({
            "model": model, "summary": True, "threads": torch.get_num_threads(),
            "published_epoch_s": round(published, 1),
            "median_epoch_s": round(statistics.median(epochs), 1),
            "mean_epoch_s": round(statistics.mean(epochs), 1),
            "max_epoch_s": round(max(epochs), 1),
            "mean_vs_published": round(statistics.mean(epochs) / published, 2)}), flush=True)


if __name__ == "__main__":
    main()
