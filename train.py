"""Train and evaluate the LARNN, or a baseline, on UCI HAR or Opportunity.

    python3 train.py --dataset UCIHAR             # retrains best.json, else published.json
    python3 train.py --dataset UCIHAR --model lstm         # same harness, torch.nn.LSTM
    python3 train.py --dataset UCIHAR --epochs 2 --max-samples 512   # a quick look
    python3 train.py --set dropout=0.2 --set larnn_mode=layer        # change config entries
    python3 train.py --resume results/UCIHAR/runs/<run-id>           # after an interruption
    python3 train.py --evaluate results/UCIHAR/runs/<run-id>         # a trained run's scores
    python3 train.py --precise-bn 2048     # BatchNorm statistics re-estimated per evaluation
    python3 train.py --lr-schedule cosine  # learning rate annealed to zero instead
    python3 train.py --bn-scale-init 0.1   # gate and cell BatchNorms start at gain 0.1

Protocol: Adam with L2 weight decay, learning rate x0.75 every decay_each_N_epoch epochs
(or, with --lr-schedule cosine, a half cosine from the initial rate down to zero over the
run's epochs), shuffled mini-batches. The checkpoint kept (model.pt) is the epoch with the
best validation score (accuracy for UCI HAR, weighted F1 for Opportunity); the test split
is only reported, at that checkpoint, never used to choose. The maximum test accuracy
over epochs is reported too, labelled as the paper's (optimistic) protocol.

Each run writes results/<dataset>/runs/<run-id>/: config.json, history.json,
result.json, model.pt, checkpoint.pt (to resume), curves.png and confusion.png
(`--plot RUN_DIR ...` redraws the figures of finished runs).
"""
import argparse
import difflib
import json
import os
import pathlib
import pickle
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score
from tqdm import tqdm

import datasets
import larnn

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# The published config: every config holds its keys, with values of its types.
PAPER_CONFIG = larnn.PAPER_CONFIG
LR_DECAY = 0.75
LR_SCHEDULES = ("step", "cosine")  # step: the paper's x LR_DECAY every decay_each_N_epoch
# Run options outside the search space, with their defaults: the paper's protocol. A
# run's config.json records them; older runs and search trials get these defaults.
RUN_OPTIONS = dict(precise_bn_windows=0, lr_schedule="step", bn_scale_init=1.0)
METRIC = {"UCIHAR": "accuracy", "Opportunity": "f1_weighted"}  # the validation score

# Subnormal floats (below 1.2e-38, as saturated gates and attention weights produce late
# in training) take an x86 core many times the cycles of normal ones: a LARNN run's
# training step became 3.2x slower than with them flushed to zero, its epochs 3.5x
# longer than its first ones (results/UCIHAR/README.md). Flushing changes a step by
# rounding, far below float32's precision of the values they are summed with. The mode is
# per thread, and torch's OpenMP threads copy it from this one when torch makes them, so
# it is set at import, before any work; a no-op where the CPU has no such mode.
torch.set_flush_denormal(True)


class TrainingError(Exception):
    """A run that cannot go on, with a one-line message."""


def write_atomic(path, write):
    """Call write(temp_path), then rename onto path: readers never see half a file."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; results are for sharing
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(data, indent=1)))


def load_config(path, defaults=None, settings=(), depth=0):
    """The hyperparameters in a JSON file whose "config" member holds them (published.json,
    a run's config.json, a file of your own), checked by check_config. A file may hold
    only the entries it changes: the others come from the file its "base" member names
    (a path relative to the file), else from the file `defaults`. settings, (key, value)
    pairs from --set, change entries last."""
    path = pathlib.Path(path)
    try:
        spec = json.loads(path.read_text())
        config = dict(spec["config"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrainingError(f"cannot read a config from {path} ({error}): expected JSON with "
                            f"a \"config\" object, like results/UCIHAR/published.json") from None
    base = path.parent / spec["base"] if spec.get("base") else defaults
    if base is not None and PAPER_CONFIG.keys() - config.keys():
        if depth > 8:
            raise TrainingError(f"{path}: its chain of \"base\" files loops or is too long")
        config = {**load_config(base, depth=depth + 1), **config}
    config.update(settings)
    check_config(config, f"{path} with --set" if settings else path)
    return config


def parse_setting(text):
    """--set KEY=VALUE: the value read as JSON (81, 0.2, true, "layer") or, failing that,
    as a word (layer); check_config checks key and type."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. dropout=0.2")
    try:
        value = json.loads(value)
    except ValueError:
        pass
    return key.strip(), value


# What each config entry may hold beyond its type, which is its PAPER_CONFIG value's.
COUNT = (lambda v: v >= 1, "at least 1")
CONFIG_RULES = dict(
    hidden_size=COUNT, attention_heads=COUNT, larnn_window_size=COUNT, num_layers=COUNT,
    decay_each_N_epoch=COUNT, batch_size=COUNT, training_epochs=COUNT,
    dropout=(lambda v: 0 <= v < 1, "in [0, 1)"), learning_rate=(lambda v: v > 0, "above 0"),
    l2_weight_reg=(lambda v: v >= 0, "at least 0"),
    larnn_mode=(lambda v: v in larnn.LARNN_MODES, f"one of {larnn.LARNN_MODES}"),
    cell_norm_placement=(lambda v: v in larnn.CELL_NORM_PLACEMENTS,
                         f"one of {larnn.CELL_NORM_PLACEMENTS}"))


def check_config(config, source):
    """One line naming the first entry of `config` (read from `source`) with a wrong key,
    type or value. Integer entries take integers only; numbers take either."""
    where = f"bad config in {source}"
    if not isinstance(config, dict):
        raise TrainingError(f"{where}: \"config\" must be an object of hyperparameters")
    missing, unknown = PAPER_CONFIG.keys() - config.keys(), config.keys() - PAPER_CONFIG.keys()
    if missing or unknown:
        meant = [close[0] for key in sorted(unknown)
                 for close in [difflib.get_close_matches(key, PAPER_CONFIG, 1)] if close]
        raise TrainingError(f"{where}: missing keys {sorted(missing)}, unknown keys "
                            f"{sorted(unknown)}" + (f" (did you mean {meant}?)" if meant else ""))
    for key, value in config.items():
        kind = type(PAPER_CONFIG[key])
        accepted = (int, float) if kind is float else kind
        if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
            raise TrainingError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
        holds, allowed = CONFIG_RULES.get(key, (lambda v: True, ""))
        if not holds(value):
            raise TrainingError(f"{where}: {key} must be {allowed}, got {value!r}")


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def cap(data, max_samples, seed=0):
    """Every split reduced to at most max_samples windows (a fixed random subset)."""
    if not max_samples:
        return data.splits()
    capped = {}
    for split, (X, Y) in data.splits().items():
        keep = np.sort(np.random.default_rng(seed).permutation(len(X))[:max_samples])
        capped[split] = (X[keep], Y[keep])
    return capped


@torch.no_grad()
def predict(model, X, device, batch_size=1024):
    """The logits of X, batch by batch, in the model's current train/eval mode."""
    return torch.cat([model(torch.as_tensor(X[i:i + batch_size], device=device)).cpu()
                      for i in range(0, len(X), batch_size)])


def scores(logits, Y):
    """Loss, accuracy, weighted and macro F1 of logits against labels Y, and the predictions."""
    Y = torch.as_tensor(Y)
    predictions = logits.argmax(1).numpy()
    return dict(loss=F.cross_entropy(logits, Y).item(),
                accuracy=float((predictions == Y.numpy()).mean()),
                f1_weighted=float(f1_score(Y, predictions, average="weighted", zero_division=0)),
                f1_macro=float(f1_score(Y, predictions, average="macro", zero_division=0))), predictions


def evaluate(model, X, Y, device):
    """scores() of the model in eval mode on (X, Y)."""
    model.eval()
    return scores(predict(model, X, device), Y)


def batchnorms(model):
    """The model's StepBatchNorm modules (none in the LSTM)."""
    return [m for m in model.modules() if isinstance(m, larnn.StepBatchNorm)]


@torch.no_grad()
def precise_batchnorm(model, X, windows, batch_size, device, seed=0):
    """Replace the running statistics of every StepBatchNorm by their plain average over
    `windows` training windows under the current weights ("precise BatchNorm"): the
    running averages lag the weights, and the eval-mode recurrence of BN_c blows up on
    stale statistics (results/UCIHAR/README.md). Same windows and dropout masks every call,
    drawn from generators of their own, so training goes on exactly as without it."""
    norms = batchnorms(model)
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    model.train()
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:windows]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i, index in enumerate(batches(order.numpy(), batch_size)):
            for norm in norms:
                norm.momentum = 1 / (i + 1)  # the running statistics become a plain mean
            model(torch.as_tensor(X[index], device=device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def batches(order, batch_size):
    """order cut into batches of batch_size; a last batch of one window (a split of 257,
    513, ... at 256) joins the one before, as BatchNorm cannot normalise one sample."""
    starts = list(range(0, len(order), batch_size))
    if len(starts) > 1 and len(order) - starts[-1] == 1:
        starts.pop()
    return [order[a:b] for a, b in zip(starts, starts[1:] + [len(order)])]


def train_epoch(model, optimizer, X, Y, batch_size, device, epoch, generator):
    """One shuffled pass; stops with a clear error on a NaN or infinite loss."""
    model.train()
    order = torch.randperm(len(X), generator=generator).numpy()
    total_loss = correct = 0.0
    for step, index in enumerate(tqdm(batches(order, batch_size), desc=f"epoch {epoch}",
                                      leave=False)):
        x = torch.as_tensor(X[index], device=device)
        y = torch.as_tensor(Y[index], device=device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()} at epoch {epoch}, step {step}: "
                                f"lower learning_rate or check the data")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(index)
        correct += (logits.argmax(1) == y).sum().item()
    return dict(loss=total_loss / len(X), accuracy=correct / len(X))


def init_batchnorm_scale(model, scale):
    """Start the gain of every cell's BN_z and BN_c at `scale`. PyTorch, and so the paper,
    start every BatchNorm gain at 1; Cooijmans et al. start these at 0.1, so that tanh
    and sigmoid begin unsaturated and gradients flow through time."""
    for cell in model.modules():
        if isinstance(cell, larnn.LARNNCell):
            for norm in (cell.gates_norm, cell.cell_norm):
                torch.nn.init.constant_(norm.weight, scale)


def make_model(run, device, data=None):
    """The classifier of a run (its config.json) for the shapes of data (default: its
    dataset's)."""
    data = data or datasets.DATASETS[run["dataset"]]
    return larnn.ActivityClassifier(data.INPUT_FEATURES_SIZE, data.OUTPUT_CLASSES_SIZE,
                                     run["config"], run["model"], data.SEQUENCE_LENGTH).to(device)


def load_model(run_dir, device="cpu"):
    """A trained run's model, ready to use: the weights of its best-validation epoch
    (model.pt), in eval mode. Input [B, T, features] (batch first), output logits."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise TrainingError(f"{run_dir}: no run there (no config.json)")
    run = read_run(run_dir)
    model = make_model(run, resolve_device(device))
    try:
        weights = torch.load(run_dir / "model.pt", map_location=model.embed.weight.device,
                             weights_only=True)
        model.load_state_dict(weights)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise TrainingError(f"{run_dir / 'model.pt'} cannot be loaded "
                            f"({datasets.one_line(error)[:200]}): the run has no trained "
                            f"weights to use") from None
    return model.eval()


def build(run, data, device):
    """The model, optimizer and learning-rate scheduler of a run (its config.json)."""
    config = run["config"]
    model = make_model(run, device, data)
    init_batchnorm_scale(model, run["bn_scale_init"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"],
                                 weight_decay=config["l2_weight_reg"])
    if run["lr_schedule"] == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=run["epochs"])
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, int(config["decay_each_N_epoch"]), gamma=LR_DECAY)
    return model, optimizer, scheduler


def train(run_dir, data, on_epoch=None, device="cpu", test=True):
    """Train the run described by run_dir/config.json, resuming from its checkpoint if
    there is one; writes every output and returns the result dict. on_epoch(epoch,
    record) is called after each epoch (the distributed search reports through it).
    test=False leaves the test split out (a search trial: nothing there may choose, and
    scoring it costs about a tenth of an epoch); then no figures are drawn."""
    run_dir = pathlib.Path(run_dir)
    run = read_run(run_dir)
    config, dataset = run["config"], run["dataset"]
    device = resolve_device(device)
    splits = cap(data, run.get("max_samples"))
    if len(splits["train"][0]) < 2:
        raise TrainingError("the training split holds fewer than 2 windows, and BatchNorm "
                            "needs 2 per batch: raise --max-samples")
    torch.manual_seed(run["seed"])
    try:
        model, optimizer, scheduler = build(run, data, device)
    except ValueError as error:
        raise TrainingError(f"bad config: {error}") from None
    history, best, best_weights, elapsed = [], None, None, 0.0
    checkpoint_path = run_dir / "checkpoint.pt"
    if checkpoint_path.exists():
        history, best, best_weights, elapsed = restore(checkpoint_path, model, optimizer,
                                                       scheduler, device)
        # model.pt is written after the checkpoint that holds it: a kill between the two
        # left it behind, so it is written again from the checkpoint.
        save_weights(run_dir, best_weights)
    if test and any("test" not in record for record in history):
        raise TrainingError(f"{run_dir} is a search trial, which leaves the test split out: "
                            f"continue it by rerunning its study's command")
    metric = METRIC[dataset]
    for epoch in range(len(history) + 1, run["epochs"] + 1):
        start = time.perf_counter()
        # Shuffling depends on (seed, epoch) alone, so a resumed run sees the same batches.
        generator = torch.Generator().manual_seed(run["seed"] * 100003 + epoch)
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                  "train": train_epoch(model, optimizer, *splits["train"],
                                       config["batch_size"], device, epoch, generator)}
        scheduler.step()
        if run["precise_bn_windows"]:
            precise_batchnorm(model, splits["train"][0], run["precise_bn_windows"],
                              config["batch_size"], device)
        record["val"], _ = evaluate(model, *splits["val"], device)
        if test:
            record["test"], _ = evaluate(model, *splits["test"], device)
        elapsed += time.perf_counter() - start
        record["wall_time_s"] = elapsed
        history.append(record)
        improved = best is None or record["val"][metric] > best["val"][metric]
        if improved:
            best = record
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        write_atomic(checkpoint_path, lambda tmp: torch.save(dict(
            model=model.state_dict(), best_weights=best_weights,
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            history=history, best=best, elapsed=elapsed), tmp))
        if improved:
            save_weights(run_dir, best_weights)
        write_json(run_dir / "history.json", history)
        print(f"epoch {epoch:3d}  train loss {record['train']['loss']:.4f} "
              f"acc {record['train']['accuracy']:.4f}  val loss {record['val']['loss']:.4f} "
              f"acc {record['val']['accuracy']:.4f} f1w {record['val']['f1_weighted']:.4f}"
              f"  ({time.perf_counter() - start:.1f}s)", flush=True)
        if on_epoch:
            on_epoch(epoch, record)
    return finish(run_dir, run, data, splits, history, best, best_weights, device, test)


def read_run(run_dir):
    """A run's config.json, with RUN_OPTIONS' defaults, checked; one line if it is not."""
    path = pathlib.Path(run_dir) / "config.json"
    try:
        run = {**RUN_OPTIONS, **json.loads(path.read_text())}
        missing = {"dataset", "model", "seed", "epochs", "config"} - run.keys()
    except (OSError, ValueError, TypeError) as error:
        raise TrainingError(f"{path} is unreadable ({error}): restore it from the run's "
                            f"copy (git, backup) or start a new run") from None
    if missing:
        raise TrainingError(f"{path} lacks {sorted(missing)}: restore it or start a new run")
    if run["dataset"] not in METRIC or run["model"] not in larnn.MODELS:
        raise TrainingError(f"{path}: unknown dataset {run['dataset']!r} or model "
                            f"{run['model']!r}")
    check_config(run["config"], path)
    return run


def restore(path, model, optimizer, scheduler, device):
    """Load a checkpoint into the model, optimizer, scheduler and random generators;
    returns (history, best record, best weights, elapsed seconds)."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"])
        if checkpoint.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        # Checkpoints written before best_weights existed: model.pt was written first.
        best_weights = checkpoint.get("best_weights") or torch.load(
            path.parent / "model.pt", map_location=device)
        return checkpoint["history"], checkpoint["best"], best_weights, checkpoint["elapsed"]
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as error:
        reason = datasets.one_line(error)[:200]
        raise TrainingError(f"{path} is unreadable ({type(error).__name__}: {reason}): "
                            f"delete it to train the run again from epoch 1") from None


def save_weights(run_dir, weights):
    """model.pt: the weights of the best-validation epoch, a plain state_dict."""
    write_atomic(run_dir / "model.pt", lambda tmp: torch.save(weights, tmp))


def finish(run_dir, run, data, splits, history, best, best_weights, device, test=True):
    """result.json and, with test, the test scores and the figures, from the
    best-validation epoch's weights."""
    result = dict(
        dataset=run["dataset"], model=run["model"], seed=run["seed"], epochs=len(history),
        max_samples=run.get("max_samples"),  # a reduced run: every split, test too, capped
        best_epoch=best["epoch"], val_score=best["val"][METRIC[run["dataset"]]],
        val_metric=METRIC[run["dataset"]], wall_time_s=history[-1]["wall_time_s"],
        seconds_per_epoch=history[-1]["wall_time_s"] / len(history),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(), archive_sha256=data.sha256, config=run["config"])
    if test:
        model = make_model(run, device, data)
        model.load_state_dict(best_weights)
        scores, predictions = evaluate(model, *splits["test"], device)
        confusion = confusion_matrix(splits["test"][1], predictions,
                                     labels=range(data.OUTPUT_CLASSES_SIZE))
        result.update(
            test_accuracy=scores["accuracy"], test_f1_weighted=scores["f1_weighted"],
            test_f1_macro=scores["f1_macro"],
            test_accuracy_final_epoch=history[-1]["test"]["accuracy"],
            test_accuracy_max_over_epochs=max(r["test"]["accuracy"] for r in history),
            confusion_matrix=confusion.tolist())
    write_json(run_dir / "result.json", result)
    if test:
        plot_run(run_dir)
    print_summary(result)
    return result


def curves_figure(history, title):
    """Loss and accuracy per epoch, train and validation, and apart from them the test
    accuracy (reported only, never used to choose)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for split in ("train", "val"):
            ax.plot(epochs, [r[split][key] for r in history], label=split)
        ax.set_ylabel(key)
        if key == "loss":  # eval-mode BatchNorm blow-ups reach 1e17 (results/UCIHAR/README.md)
            ax.set_yscale("log")
    axes[2].plot(epochs, [r["test"]["accuracy"] for r in history], color="tab:red", label="test")
    axes[2].set_ylabel("test accuracy (reported, not used to choose)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(confusion, labels, title):
    """The test confusion matrix: counts in the cells, colours normalised per true class
    (its recall), so that rare classes are as visible as common ones."""
    import matplotlib.pyplot as plt
    confusion = np.asarray(confusion)
    recall = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = 4 + 0.45 * len(labels)  # room for Opportunity's 18 class names
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), n in np.ndenumerate(confusion):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                color="white" if recall[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\ntest split, at the best-validation epoch")
    fig.tight_layout()
    return fig


def plot_run(run_dir):
    """Draw the figures of a finished run from its config.json, history.json and
    result.json (finish() does; `train.py --plot` redraws committed runs)."""
    run_dir = pathlib.Path(run_dir)
    try:
        run, history, result = (json.loads((run_dir / name).read_text())
                                for name in ("config.json", "history.json", "result.json"))
    except (OSError, ValueError) as error:
        raise TrainingError(f"{run_dir} is not a finished run ({error})") from None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    title = (f"{run_dir.name}: {larnn.MODEL_NAMES[run['model']]}, seed {run['seed']}, "
             f"{run['dataset']}, best validation at epoch {result['best_epoch']}"
             + (f"\nREDUCED RUN: at most {run['max_samples']} windows per split, test "
                f"included" if run.get("max_samples") else ""))
    labels = datasets.DATASETS[run["dataset"]].LABELS
    confusion = result["confusion_matrix"]
    for name, fig in (("curves.png", curves_figure(history, title)),
                      ("confusion.png", confusion_figure(confusion, labels, title))):
        write_atomic(run_dir / name, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


def print_summary(result):
    rows = [("dataset / model", f"{result['dataset']} / {result['model']} (seed {result['seed']})"),
            ("epochs (best val)", f"{result['epochs']} ({result['best_epoch']})"),
            (f"val {result['val_metric']}", f"{result['val_score']:.4f}")]
    if "test_accuracy" in result:  # a search trial has none
        rows += [("test accuracy @ best val", f"{result['test_accuracy']:.4f}"),
                 ("test F1 weighted / macro", f"{result['test_f1_weighted']:.4f} / "
                                              f"{result['test_f1_macro']:.4f}"),
                 ("test accuracy, final epoch", f"{result['test_accuracy_final_epoch']:.4f}"),
                 ("max test acc (paper protocol)",
                  f"{result['test_accuracy_max_over_epochs']:.4f}")]
    rows.append(("wall time", f"{result['wall_time_s']:.0f}s on {result['device']}"))
    if result.get("max_samples"):
        rows.append(("REDUCED RUN", f"at most {result['max_samples']} windows per split, "
                                    f"test included: not comparable to full runs"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def positive_int(text):
    """argparse type for counts (epochs, windows, trials): an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def run_spec(dataset, model, config, seed, epochs, max_samples=None, **options):
    """What a run's config.json holds; options: RUN_OPTIONS, defaults for those left out."""
    return dict(dataset=dataset, model=model, seed=seed, epochs=epochs,
                max_samples=max_samples, **{**RUN_OPTIONS, **options}, config=config)


def new_run(dataset, model, config, seed, epochs, max_samples=None, root=RESULTS,
            config_source=None, **options):
    """Create results/<dataset>/runs/<run-id>/ with its config.json; options: RUN_OPTIONS;
    config_source: where the config came from, in words, recorded with it."""
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-seed{seed}"
    run_dir = pathlib.Path(root) / dataset / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    spec = run_spec(dataset, model, config, seed, epochs, max_samples, **options)
    write_json(run_dir / "config.json",
               {**spec, "config_source": config_source} if config_source else spec)
    return run_dir


def add_run_options(parser):
    """The run options (RUN_OPTIONS) on a command line; train.py's and the search's."""
    parser.add_argument("--precise-bn", type=int, default=argparse.SUPPRESS, metavar="WINDOWS",
                        dest="precise_bn_windows", help="before each evaluation, re-estimate the BatchNorm statistics "
                             "from this many training windows (default 0: the running "
                             "averages, as in the paper)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=argparse.SUPPRESS,
                        help="step (default, the paper's): x0.75 every decay_each_N_epoch "
                             "epochs; cosine: from learning_rate down to zero over the epochs")
    parser.add_argument("--bn-scale-init", type=float, default=argparse.SUPPRESS,
                        metavar="GAIN", help="initial gain of the gate and cell BatchNorms "
                                             "(default 1, the paper's; Cooijmans et al. use 0.1)")


# What each run option may hold (its type, its range), for flags and recorded options.
OPTION_RULES = dict(precise_bn_windows=(int, lambda v: v >= 0),
                    bn_scale_init=((int, float), lambda v: v > 0),
                    lr_schedule=(str, lambda v: v in LR_SCHEDULES))


def run_options(args, given_only=False):
    """The run options of parsed arguments, checked: those given, or all with defaults."""
    options = {option: getattr(args, option) for option in RUN_OPTIONS if hasattr(args, option)}
    advice = dict(precise_bn_windows=("--precise-bn", "give a number of training windows, "
                                                      "or 0 to keep the running averages"),
                  bn_scale_init=("--bn-scale-init", "give a positive gain, such as 0.1 or "
                                                    "the default 1"))
    for option, (flag, fix) in advice.items():
        if option in options and not OPTION_RULES[option][1](options[option]):
            raise TrainingError(f"{flag} {options[option]}: {fix}")
    return options if given_only else {**RUN_OPTIONS, **options}


def recorded_options(path):
    """The run options a config file records: the protocol its config was chosen with,
    which a run of it takes unless flags say otherwise. They are its "options" member,
    or those of its study's "settings" (a study's best.json); {} where it has neither."""
    try:
        spec = json.loads(pathlib.Path(path).read_text())
        settings = spec.get("settings") or {}
        options = spec.get("options") or {key: settings[key] for key in RUN_OPTIONS
                                          if key in settings}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}  # load_config has said what is wrong with the file
    for key, value in (options.items() if isinstance(options, dict) else [(None, options)]):
        kind, holds = OPTION_RULES.get(key, (None, None))
        if kind is None or not isinstance(value, kind) or isinstance(value, bool) or \
                not holds(value):
            raise TrainingError(f"{path}: \"options\" may hold {sorted(RUN_OPTIONS)} with "
                                f"train.py's values, got {key}={value!r}")
    return options


def best_config_path(results, dataset, model):
    """Where a full-budget search study puts the best config of a model: best.json for
    the LARNN, best-<model>.json for a baseline."""
    name = "best.json" if model == "larnn" else f"best-{model}.json"
    return pathlib.Path(results) / dataset / name


def default_config(results, dataset, model):
    """The config train.py trains by default: the model's best_config_path if a search
    wrote it, else the published one (results/<dataset>/published.json)."""
    best = best_config_path(results, dataset, model)
    return best if best.is_file() else pathlib.Path(results) / dataset / "published.json"


def describe(path):
    """Where a config file came from, in a few words, from its provenance."""
    try:
        info = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return "no provenance"
    if info.get("source") == "hyperopt_optimize.py":
        return (f"study {info.get('study')}, trial {info.get('trial')}, validation "
                f"{info.get('objective')} {info.get('val_score'):.4f}")
    if info.get("source") == "results/choose_best.py":
        evidence = info["evidence"]
        return (f"the {info['chosen']} config, chosen by results/choose_best.py: validation "
                f"{evidence['searched_mean']:.4f} for study {info['study']}'s best against "
                f"{evidence['published_mean']:.4f} published, seeds {evidence['seeds']}")
    return info.get("source", "no provenance")


def check_resumable(run_dir):
    """--resume continues an interrupted run from its checkpoint.pt. A finished run, or
    one whose checkpoint is gone (committed runs ship none), would be trained again from
    epoch 1 over what it wrote: refused, saying what the folder holds."""
    holds = ", ".join(sorted(path.name for path in run_dir.iterdir() if path.is_file()))
    if (run_dir / "result.json").exists():
        raise TrainingError(f"--resume {run_dir}: a finished run ({holds}), nothing to resume; "
                            f"see its scores with --evaluate {run_dir}, or start a new run")
    if not (run_dir / "checkpoint.pt").exists():
        raise TrainingError(f"--resume {run_dir}: no checkpoint.pt to continue from (it holds "
                            f"{holds}); start a new run")


def evaluate_run(run_dir, split, data_dir=None, device="auto"):
    """One line: the scores of a run's model.pt on a split, on the windows the run used
    (all, or its --max-samples cap). Writes nothing."""
    model = load_model(run_dir, device)
    run = read_run(run_dir)
    data = datasets.load(run["dataset"], data_dir)
    X, Y = cap(data, run.get("max_samples"))[split]
    score, _ = evaluate(model, X, Y, model.embed.weight.device)
    reduced = f", a reduced run: at most {run['max_samples']} per split" if run.get(
        "max_samples") else ""
    print(f"{run_dir}: {split} accuracy {score['accuracy']:.4f}, weighted F1 "
          f"{score['f1_weighted']:.4f}, macro F1 {score['f1_macro']:.4f}, loss "
          f"{score['loss']:.4f} ({len(Y)} windows{reduced})")
    return score


def check_resume(args, run):
    """--resume continues a run as it was started: flags that contradict it are refused."""
    given = dict(model=args.model, seed=args.seed, epochs=args.epochs,
                 max_samples=args.max_samples, **run_options(args, given_only=True))
    contradicted = {key: value for key, value in given.items()
                    if value is not None and value != run.get(key)}
    if args.config or args.set or contradicted:
        flags = ", ".join(f"{key}={value!r} (the run has {run.get(key)!r})"
                          for key, value in contradicted.items()) or "--config, --set"
        raise TrainingError(f"--resume continues {args.resume} as it was started; these flags "
                            f"contradict it: {flags}. Leave them out, or start a new run")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(METRIC), default="UCIHAR")
    parser.add_argument("--model", choices=larnn.MODELS, help="default: larnn")
    parser.add_argument("--config", help="JSON with a \"config\" object (default: "
                                         "results/<dataset>/best.json for the LARNN, "
                                         "best-<model>.json for a baseline, if a search wrote "
                                         "it, else results/<dataset>/published.json); it may "
                                         "hold only the entries it changes from the default, "
                                         "or from the file its \"base\" names")
    parser.add_argument("--set", type=parse_setting, action="append", default=[],
                        metavar="KEY=VALUE", help="change one entry of the config, e.g. "
                                                  "--set dropout=0.2 (repeatable)")
    parser.add_argument("--epochs", type=positive_int,
                        help="default: the config's training_epochs")
    parser.add_argument("--max-samples", type=positive_int, help="cap every split (quick runs)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, help="default: 0")
    add_run_options(parser)
    parser.add_argument("--resume", help="an interrupted run folder to continue")
    parser.add_argument("--evaluate", metavar="RUN_DIR",
                        help="only print the scores of a trained run's model.pt on --split")
    parser.add_argument("--split", choices=datasets.SPLITS, default="test",
                        help="with --evaluate (default: test)")
    parser.add_argument("--plot", nargs="+", metavar="RUN_DIR",
                        help="only redraw the figures of finished runs")
    parser.add_argument("--data-dir", help="default: data/ or $LARNN_DATA_DIR")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    run_dir, created = None, False
    try:
        resolve_device(args.device)  # before any run folder is made
        if args.plot:
            for folder in args.plot:
                plot_run(folder)
            return
        if args.evaluate:
            evaluate_run(args.evaluate, args.split, args.data_dir, args.device)
            return
        if args.resume:
            run_dir = pathlib.Path(args.resume)
            if not (run_dir / "config.json").is_file():
                raise TrainingError(f"--resume {run_dir}: no config.json there")
            run = read_run(run_dir)
            check_resume(args, run)
            check_resumable(run_dir)
            data = datasets.load(run["dataset"], args.data_dir)
        else:
            model = args.model or "larnn"
            results = pathlib.Path(args.results_dir)
            defaults = default_config(results, args.dataset, model)
            config_path = args.config or defaults
            config = load_config(config_path, defaults, args.set)
            changed = f"; --set {', '.join(k for k, _ in args.set)}" if args.set else ""
            source = f"{config_path} ({describe(config_path)}{changed})"
            print(f"config: {source}")
            recorded = recorded_options(config_path)
            options = {**RUN_OPTIONS, **recorded, **run_options(args, given_only=True)}
            chosen_with = {k: v for k, v in recorded.items() if v != RUN_OPTIONS[k]}
            if chosen_with:
                print("run options the config was chosen with: " + ", ".join(
                    f"{key}={value}" for key, value in chosen_with.items()) + " (flags override)")
            data = datasets.load(args.dataset, args.data_dir)
            run_dir = new_run(args.dataset, model, config, args.seed or 0,
                              args.epochs or config["training_epochs"], args.max_samples,
                              results, source, **options)
            created = True
        print(f"run folder: {run_dir}")
        train(run_dir, data, device=args.device)
    except BaseException as error:
        if created and not (run_dir / "history.json").exists():
            shutil.rmtree(run_dir)  # it failed before its first epoch ended: keep nothing
            run_dir = None
        if isinstance(error, (TrainingError, datasets.DatasetError)):
            sys.exit(f"error: {error}")
        if isinstance(error, KeyboardInterrupt):
            sys.exit(f"\ninterrupted: continue with python3 train.py --resume {run_dir}"
                     if run_dir else "\ninterrupted before the first epoch ended: nothing kept")
        raise


if __name__ == "__main__":
    main()
