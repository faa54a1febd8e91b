"""Print the README's results table from the run folders under results/<dataset>/published/.

    python3 results/summarize.py [--dataset UCIHAR] [--published DIR]

A finished run has a result.json (train.py writes it after the last epoch); an
unfinished one is listed with its progress from history.json. Per model, every number
is the mean ± sample standard deviation over the finished seeds (± is left out with
one seed).
"""
import argparse
import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import larnn  # noqa: E402
from train import METRIC  # noqa: E402

NAMES = {"larnn": "LARNN", "bnlstm": "BN-LSTM", "lstm": "LSTM"}
# (title, result.json key, scale, decimals, unit)
COLUMNS = [("test acc. @ best val", "test_accuracy", 100, 2, "%"),
           ("weighted F1", "test_f1_weighted", 1, 4, ""),
           ("final-epoch test acc.", "test_accuracy_final_epoch", 100, 2, "%"),
           ("max test acc. over epochs (paper's protocol, optimistic)",
            "test_accuracy_max_over_epochs", 100, 2, "%"),
           ("s / epoch", "seconds_per_epoch", 1, 0, "")]


def mean_std(values, scale, decimals, unit):
    text = f"{statistics.mean(values) * scale:.{decimals}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values) * scale:.{decimals}f}"
    return text + unit


def summarize(published):
    """The markdown table (one row per model) and one line per unfinished run."""
    finished, running = {}, []  # model -> result dicts; lines
    for run in sorted(pathlib.Path(published).iterdir()):
        config = json.loads((run / "config.json").read_text())
        if (run / "result.json").exists():
            finished.setdefault(config["model"], []).append(
                json.loads((run / "result.json").read_text()))
        elif (run / "history.json").exists():
            history = json.loads((run / "history.json").read_text())
            metric = METRIC[config["dataset"]]
            best = max(history, key=lambda r: r["val"][metric])
            running.append(f"- {NAMES[config['model']]} seed {config['seed']}: unfinished, "
                           f"{len(history)} of {config['epochs']} epochs, best validation "
                           f"{metric} so far {best['val'][metric]:.4f} (epoch {best['epoch']})")
    header = ["model", "seeds (best-val epoch)"] + [column[0] for column in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for model in larnn.MODELS:
        results = finished.get(model)
        if not results:
            continue
        seeds = ", ".join(f"{r['seed']} ({r['best_epoch']})" for r in results)
        cells = [mean_std([r[key] for r in results], *style) for _, key, *style in COLUMNS]
        lines.append("| " + " | ".join([NAMES[model], seeds] + cells) + " |")
    return "\n".join(lines + [""] + running)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="UCIHAR")
    parser.add_argument("--published", help="default: results/<dataset>/published")
    args = parser.parse_args(argv)
    published = pathlib.Path(args.published or pathlib.Path(__file__).resolve().parent
                             / args.dataset / "published")
    if not published.is_dir():
        sys.exit(f"error: {published} does not exist: train runs first (README, Results)")
    print(summarize(published))


if __name__ == "__main__":
    main()
