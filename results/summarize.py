"""Print the results tables of README.md and results/<dataset>/README.md from the run
folders under results/<dataset>/.

    python3 results/summarize.py [--dataset UCIHAR] [--published DIR]
    python3 results/summarize.py --variants      # the investigations, per variant
    python3 results/summarize.py --per-run       # the investigations, per run
    python3 results/summarize.py --glance        # README.md's results at a glance
    python3 results/summarize.py --studies       # the search studies, and a figure each

A finished run has a result.json (train.py writes it after the last epoch); an
unfinished one is listed with its progress from history.json. Per model, every number
is the mean ± sample standard deviation over the finished seeds (± is left out with
one seed). --variants does the same over published/ and investigation/ with one row
per model and variant: the run options and config entries by which the runs differ
from the published runs of their model (runs differing only in seed are grouped), and
over searched/ where results/retrain_best.py made it: a study's best config is named by
its trial. --glance marks the setup train.py trains by default where a command chose
it (best.json, best-<model>.json). --per-run prints one row per finished run of those
folders, with the stability figures of the investigations (results/<dataset>/README.md). --studies prints one row per search
study under results/<dataset>/search/ and draws its trials.png there: the validation
score of each trial in order, and the best so far; then per study how the score moved
with each searched entry.
"""
import argparse
import json
import math
import pathlib
import statistics
import sys

from hyperopt.pyll import Apply

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import hyperopt_optimize  # noqa: E402
import larnn  # noqa: E402
from train import (METRIC, RUN_OPTIONS, best_config_path, recorded_options,  # noqa: E402
                   write_atomic)

# The paper's UCI HAR figures (official archive, maximum test accuracy over epochs).
PAPER = {"larnn": "91.92%", "lstm": "91.65% (2 layers)"}
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


def read_runs(folder):
    """(finished, unfinished) runs of a folder: (run folder, config.json, result.json) and
    one line of progress per unfinished run."""
    finished, running = [], []
    for run in sorted(pathlib.Path(folder).iterdir()):
        config = json.loads((run / "config.json").read_text())
        if (run / "result.json").exists():
            finished.append((run, config, json.loads((run / "result.json").read_text())))
        elif (run / "history.json").exists():
            history = json.loads((run / "history.json").read_text())
            metric = METRIC[config["dataset"]]
            best = max(history, key=lambda r: r["val"][metric])
            name = larnn.MODEL_NAMES[config["model"]]
            running.append(f"- {run.name} ({name} seed {config['seed']}): "
                           f"unfinished, {len(history)} of {config['epochs']} epochs, best "
                           f"validation {metric} so far {best['val'][metric]:.4f} (epoch "
                           f"{best['epoch']})")
    return finished, running


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows]


def setup(config):
    """Everything that defines a run of config.json but its seed: options, config, and
    the sample cap of a reduced run."""
    run = {**RUN_OPTIONS, **config}
    cap = {"max_samples": run["max_samples"]} if run.get("max_samples") else {}
    return {**cap, **{option: run[option] for option in RUN_OPTIONS}, **run["config"]}


def reduced(config):
    """'' for a run on every window, else what says it is not comparable."""
    cap = config.get("max_samples")
    return f"reduced run: at most {cap} windows per split" if cap else ""


SEARCHED = "searched config"  # how a variant names a study's best config


def variant(config, reference):
    """How a run's setup differs from the reference setup, e.g. 'bn_scale_init=0.1'; a
    study's best config (results/retrain_best.py's runs) is named by its trial."""
    found = config.get("searched_from")
    changes = [f"{key}={value}" for key, value in setup(config).items()
               if reference.get(key) != value and not (found and key in config["config"])]
    if found:
        changes.insert(0, f"{SEARCHED} (trial {found['trial']})")
    return ", ".join(changes) or "as published"


def group_runs(folders, by_variant=False):
    """({(model, variant): [result.json with the run's "setup", ...]} over the finished
    runs of folders, the first folder being the published runs, in model order; one line
    per unfinished run). Without by_variant the variant is ""."""
    finished, running = [], []
    for folder in folders:
        done, underway = read_runs(folder)
        finished += done
        running += underway
    references = {}  # model -> the setup of its published runs
    for run, config, _ in finished:
        if run.parent == pathlib.Path(folders[0]):
            references.setdefault(config["model"], setup(config))
    groups = {}  # (model, variant) -> results, published first
    for _, config, result in finished:
        model = config["model"]
        label = variant(config, references.get(model, {})) if by_variant else reduced(config)
        groups.setdefault((model, label), []).append(dict(result, setup=setup(config)))
    order = sorted(groups, key=lambda group: larnn.MODELS.index(group[0]))
    return {group: groups[group] for group in order}, running


def seeds(results):
    return ", ".join(f"{r['seed']} ({r['best_epoch']})" for r in results)


def summarize(folders, by_variant=False):
    """The markdown table (one row per model, or per model and variant) over the runs of
    folders, the first being the published runs, and one line per unfinished run."""
    groups, running = group_runs(folders, by_variant)
    rows = []
    for (model, label), results in groups.items():
        cells = [mean_std([r[key] for r in results], *style) for _, key, *style in COLUMNS]
        name = larnn.MODEL_NAMES[model] + (f" ({label})" if label and not by_variant else "")
        rows.append([name] + ([label] if by_variant else [])
                    + [seeds(results)] + cells)
    header = (["model"] + (["variant"] if by_variant else []) + ["seeds (best-val epoch)"]
              + [column[0] for column in COLUMNS])
    return "\n".join(table(header, rows) + [""] + running)


def default_setup(published, model):
    """(file name, setup) of the config train.py trains the model with by default where a
    command wrote it (results/choose_best.py, or a search at full budget), else None."""
    results = pathlib.Path(published).parent
    path = best_config_path(results.parent, results.name, model)
    if not path.is_file():
        return None
    config = json.loads(path.read_text())["config"]
    return path.name, setup(dict(recorded_options(path), config=config))


def glance(folders):
    """README.md's results at a glance: per model, the runs as published, the variant
    with the highest mean validation score at the best-validation epoch (chosen by
    validation, never by test), the search's best config retrained, and the setup
    train.py trains by default where a command chose one (marked), with the paper's
    figure beside them."""
    groups, _ = group_runs(folders, by_variant=True)
    rows = []
    for model in larnn.MODELS:
        variants = {label: results for (m, label), results in groups.items() if m == model}
        best = max((label for label in variants if label != "as published"), default=None,
                   key=lambda label: statistics.mean(r["val_score"] for r in variants[label]))
        default = default_setup(folders[0], model)
        searched = [label for label in variants if label.startswith(SEARCHED)]
        chosen = [label for label, results in variants.items()
                  if default and results[0]["setup"] == default[1]]
        for label in dict.fromkeys(["as published", best, *searched, *chosen]):
            results = variants.get(label)
            if results:
                shown = label + (f" (train.py's default: {default[0]})"
                                 if label in chosen else "")
                rows.append([larnn.MODEL_NAMES[model], shown, seeds(results),
                             mean_std([r["val_score"] for r in results], 100, 2, "%"),
                             *(mean_std([r[key] for r in results], *style)
                               for _, key, *style in COLUMNS[:2]),
                             PAPER.get(model, "-") if label == "as published" else ""])
    header = ["model", "setup", "seeds (best-val epoch)", "val score @ best val",
              *(column[0] for column in COLUMNS[:2]), "paper (max test acc. over epochs)"]
    return "\n".join(table(header, rows))


def magnitude(x):
    """280 -> '280', 2e12 -> '2·10^12': the size of a blown-up loss, readably."""
    if x < 1000:
        return f"{x:.3g}"
    mantissa, exponent = f"{x:.0e}".split("e")  # rounds 9.9e18 up to 1e+19
    exponent = int(exponent)
    return f"10^{exponent}" if mantissa == "1" else f"{mantissa}·10^{exponent}"


def stability(history):
    """The eval-mode BatchNorm blow-ups and collapses of a run: epochs whose validation
    loss exceeds 10 (their largest, or how many are infinite), and over the second half
    of training the mean validation and test accuracies and the mean change of the
    validation accuracy between consecutive epochs, in points."""
    losses = [r["val"]["loss"] for r in history if not r["val"]["loss"] <= 10]
    infinite = sum(not math.isfinite(loss) for loss in losses)
    largest = f"{infinite} infinite" if infinite else magnitude(max(
        losses, default=max(r["val"]["loss"] for r in history)))
    late = history[len(history) // 2:]
    val = [r["val"]["accuracy"] for r in late]
    test = [r["test"]["accuracy"] for r in late]
    change = statistics.mean(abs(a - b) for a, b in zip(val[1:], val))
    return [f"{len(losses)} ({largest})", f"{100 * statistics.mean(val):.1f}% / "
            f"{100 * statistics.mean(test):.1f}% ({100 * change:.1f} points)"]


def per_run(folders):
    """The markdown table with one row per finished run, and one line per unfinished run."""
    rows, lines = [], []
    for folder in folders:
        finished, running = read_runs(folder)
        lines += running
        for run, config, r in finished:
            history = json.loads((run / "history.json").read_text())
            rows.append([f"`{run.parent.name}/{run.name}`", str(r["best_epoch"]),
                         f"{100 * r['val_score']:.2f}%", f"{100 * r['test_accuracy']:.2f}%",
                         f"{r['test_f1_weighted']:.4f}",
                         f"{100 * r['test_accuracy_final_epoch']:.2f}%"] + stability(history))
    header = ["run", "best-val epoch", "val score", "test acc. @ best val", "weighted F1",
              "final-epoch test acc.", "epochs with val loss > 10 (largest)",
              "mean val / test acc., second half of training (mean val change between epochs)"]
    return "\n".join(table(header, rows) + [""] + lines)


def read_study(folder):
    """(settings.json, the trial records in order) of a study folder."""
    settings = json.loads((folder / "settings.json").read_text())
    trials = [json.loads(path.read_text())
              for path in sorted((folder / "trials").glob("trial-*.json"))]
    return settings, trials


def short(value):
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def searched_entries(settings):
    """The config entries the study's space searches (the others are fixed)."""
    space = hyperopt_optimize.study_space(settings)
    return [key for key, value in space.items() if isinstance(value, Apply)]


def studies(search):
    """The markdown table with one row per study under the search folder; draws each
    study's trials.png."""
    rows = []
    for folder in sorted(path.parent for path in pathlib.Path(search).glob("*/settings.json")):
        settings, trials = read_study(folder)
        ok = [t for t in trials if t["status"] == "ok"]
        best = max(ok, key=lambda t: t["val_score"], default=None)
        config = ", ".join(f"{key}={short(best['config'][key])}"
                           for key in searched_entries(settings)) if best else "-"
        rows.append([f"`{folder.name}`", larnn.MODEL_NAMES[settings["model"]],
                     f"{len(trials)} ({len(trials) - len(ok)} failed)",
                     str(best["trial"]) if best else "-",
                     f"{100 * best['val_score']:.2f}%" if best else "-", config])
        if trials:
            draw_study(folder, settings, trials)
    header = ["study", "model", "trials (failed)", "best trial", "its validation score",
              "its searched entries"]
    return "\n".join(table(header, rows))


def choice_mean(value, values, scores):
    """'residual: 88.10% (3 trials)': the mean score of the trials where values == value."""
    chosen = [score for v, score in zip(values, scores) if v == value]
    n = len(chosen)
    return f"{value}: {100 * statistics.mean(chosen):.2f}% ({n} trial{'s' * (n != 1)})"


def entry_effects(search):
    """Per study, a markdown table: how the validation score of its finished trials moved
    with each searched entry. Numbers: Spearman's rank correlation with its p-value;
    choices: the mean score per value. TPE proposes near its best trials, so these say
    what went with a good score within the study, not what causes it."""
    from scipy.stats import spearmanr
    parts = []
    for folder in sorted(path.parent for path in pathlib.Path(search).glob("*/settings.json")):
        settings, trials = read_study(folder)
        ok = [t for t in trials if t["status"] == "ok"]
        if len(ok) < 3:
            continue
        scores = [t["val_score"] for t in ok]
        rows = []
        for key in searched_entries(settings):
            values = [t["config"][key] for t in ok]
            if len(set(values)) == 1:
                text = "one value tried"
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                rho, p = spearmanr(values, scores)
                text = f"ρ {rho:+.2f} (p {p:.2f})"
            else:
                text = "; ".join(choice_mean(value, values, scores)
                                 for value in sorted(set(values), key=str))
            rows.append([key, text])
        parts += [f"`{folder.name}`, {len(ok)} finished trials:", ""] + table(
            ["entry", "with the validation score"], rows) + [""]
    return "\n".join(parts)


def draw_study(folder, settings, trials):
    """trials.png: each trial's validation score in order (failed ones as crosses at the
    bottom) and the best so far."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    scores = [100 * t["val_score"] if t["status"] == "ok" else None for t in trials]
    valid = [score for score in scores if score is not None]
    floor = min(valid, default=0)
    best, so_far = None, []
    for score in scores:
        best = score if best is None or (score is not None and score > best) else best
        so_far.append(best)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([i for i, v in enumerate(scores) if v is not None], valid, "o", label="trial")
    ax.step(range(len(scores)), so_far, where="post", label="best so far")
    failed = [i for i, v in enumerate(scores) if v is None]
    if failed:
        ax.plot(failed, [floor] * len(failed), "x", color="tab:red", label="failed")
    metric = settings.get("objective", "last-tenth")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"validation {METRIC[settings['dataset']]}, {metric} (%)")
    ax.set_title(f"{folder.name}: {len(trials)} trials, {settings['epochs']} epochs each")
    ax.legend()
    fig.tight_layout()
    write_atomic(folder / "trials.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="UCIHAR")
    parser.add_argument("--published", help="default: results/<dataset>/published")
    tables = parser.add_mutually_exclusive_group()
    tables.add_argument("--variants", action="store_true",
                        help="one row per model and variant over the published folder "
                             "and the investigation/ folder beside it")
    tables.add_argument("--glance", action="store_true",
                        help="per model, as published and the variant best on validation "
                             "(README.md's results at a glance)")
    tables.add_argument("--per-run", action="store_true",
                        help="one row per run of the published folder and of the "
                             "investigation/ folder beside it")
    tables.add_argument("--studies", action="store_true",
                        help="one row per search study, and its trials.png")
    args = parser.parse_args(argv)
    published = pathlib.Path(args.published or pathlib.Path(__file__).resolve().parent
                             / args.dataset / "published")
    if args.studies:
        print(studies(published.parent / "search") + "\n\n" + entry_effects(
            published.parent / "search"))
        return
    both = args.per_run or args.variants or args.glance
    folders = [published, published.parent / "investigation"] if both else [published]
    for folder in folders:
        if not folder.is_dir():
            sys.exit(f"error: {folder} does not exist: train runs first "
                     f"(results/<dataset>/README.md)")
    searched = published.parent / "searched"  # results/retrain_best.py's runs, once made
    folders += [searched] if both and searched.is_dir() else []
    if args.glance:
        print(glance(folders))
    else:
        print(per_run(folders) if args.per_run else summarize(folders, args.variants))


if __name__ == "__main__":
    main()
