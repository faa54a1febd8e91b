"""Evaluate a LARNN or BN-LSTM run under four kinds of BatchNorm statistics, to see what
eval mode does to the recurrence (results/UCIHAR/README.md, "Eval-mode BatchNorm").

    python3 results/evaluate_batchnorm.py results/UCIHAR/published/larnn-seed0
            [--weights model.pt|checkpoint.pt] [--split val|test] [--windows 2048]

- as trained: the run's own running statistics, one row per step (what train.py reports);
- re-estimated per step: averages over --windows training windows (train mode, fixed
  shuffle and dropout masks), with the weights as they are: train.py --precise-bn;
- re-estimated, shared by all steps: the same, pooled over the steps (each step
  weighing the same): what one running average for all steps estimates;
- batch statistics: every batch of the split normalised with its own statistics, the
  reference code's effective protocol (its BatchNorms never left training mode).
  Transductive: a window's prediction depends on the others in its batch. In file
  order a batch holds consecutive windows of one subject, mostly of one activity, so
  its statistics carry the label; the last line draws the batches at random instead.

Each line gives loss, accuracy, weighted F1 and the number of windows whose largest
|logit| exceeds 100 (blown up by the eval-mode recurrence of BN_c).
"""
import argparse
import copy
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import datasets  # noqa: E402
import larnn  # noqa: E402
from train import batchnorms, precise_batchnorm, predict, scores  # noqa: E402

BLOWN_UP = 100.0


def reestimate(model, X, windows, batch_size):
    """A copy of model whose running statistics are re-estimated from `windows` training
    windows (train.precise_batchnorm)."""
    model = copy.deepcopy(model)
    precise_batchnorm(model, X, windows, batch_size, torch.device("cpu"))
    return model.eval()


def pooled(model):
    """A copy of model with every step's running statistics replaced by their pool."""
    model = copy.deepcopy(model)
    for norm in batchnorms(model):
        mean = norm.running_mean.mean(0)
        var = (norm.running_var + norm.running_mean ** 2).mean(0) - mean ** 2
        norm.running_mean[:], norm.running_var[:] = mean, var
    return model


def batch_statistics(model):
    """A copy of model in eval mode whose BatchNorms normalise with batch statistics."""
    model = copy.deepcopy(model).eval()
    for norm in batchnorms(model):
        norm.train()
        norm.momentum = 0.0  # leave the running statistics alone
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder (config.json and the weights)")
    parser.add_argument("--weights", default="model.pt",
                        help="model.pt (best validation epoch) or checkpoint.pt (last epoch)")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--windows", type=int, default=2048,
                        help="training windows for the re-estimated statistics")
    parser.add_argument("--data-dir", help="default: data/ or $LARNN_DATA_DIR")
    args = parser.parse_args(argv)
    run_dir = pathlib.Path(args.run)
    try:
        run = json.loads((run_dir / "config.json").read_text())
        weights = torch.load(run_dir / args.weights, map_location="cpu", weights_only=False)
    except (OSError, ValueError) as error:
        sys.exit(f"error: cannot read the run {run_dir} ({error}): give a run folder with "
                 f"config.json and {args.weights}")
    if run["model"] == "lstm":
        sys.exit("error: an lstm run has no BatchNorm: give a larnn or bnlstm run")
    try:
        data = datasets.load(run["dataset"], args.data_dir)
    except datasets.DatasetError as error:
        sys.exit(f"error: {error}")
    model = larnn.ActivityClassifier(data.INPUT_FEATURES_SIZE, data.OUTPUT_CLASSES_SIZE,
                                     run["config"], run["model"], data.SEQUENCE_LENGTH)
    try:
        model.load_state_dict(weights.get("model", weights))
    except RuntimeError as error:
        sys.exit(f"error: {run_dir / args.weights} does not fit the run's config "
                 f"({str(error).splitlines()[0]})")
    model.eval()
    splits = data.splits()
    batch_size = run["config"]["batch_size"]
    reestimated = reestimate(model, splits["train"][0], args.windows, batch_size)
    X, Y = splits[args.split]
    in_order = torch.arange(len(X))
    shuffled = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    variants = [("as trained", model, 1024, in_order),
                ("re-estimated per step", reestimated, 1024, in_order),
                ("re-estimated, shared by all steps", pooled(reestimated), 1024, in_order),
                ("batch statistics", batch_statistics(model), batch_size, in_order),
                ("batch statistics, random batches", batch_statistics(model), batch_size,
                 shuffled)]
    print(f"{run_dir} ({args.weights}), {args.split} split, {len(X)} windows")
    for name, variant, size, order in variants:
        logits = torch.empty(len(X), data.OUTPUT_CLASSES_SIZE)
        logits[order] = predict(variant, X[order.numpy()], "cpu", size)
        result, _ = scores(logits, Y)
        blown_up = int((logits.abs().amax(1) > BLOWN_UP).sum())
        print(f"{name:34} loss {result['loss']:10.4g}  accuracy {result['accuracy']:.4f}  "
              f"weighted F1 {result['f1_weighted']:.4f}  blown up {blown_up}")


if __name__ == "__main__":
    main()
