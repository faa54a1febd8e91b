"""Write the config the evidence supports to results/<dataset>/best.json (best-<model>.json
for a baseline), which train.py trains by default: a study's best config if its runs
retrained at full budget beat the published config's runs on validation, else the
published config.

    python3 results/choose_best.py --model larnn --study larnn-10ep-all-seed0-last-tenth-...

The evidence, finished runs of results/<dataset>/: the study's best config retrained
with the study's run options in searched/<model>-seed<N>/, and the published config
(published.json) trained with the same options, in published/ or investigation/. Their
mean validation scores (at each run's best-validation epoch) over the seeds both have
decide; the test split decides nothing. The file records the study, the trial, the run
options and every seed's score.
"""
import argparse
import json
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import larnn  # noqa: E402
import train  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent


def finished_runs(folders, model, config, options):
    """{seed: validation score} of the finished runs in folders that trained `config`
    with `options` (the run options)."""
    scores = {}
    for folder in folders:
        for path in sorted(pathlib.Path(folder).glob("*/result.json")):
            run = {**train.RUN_OPTIONS, **json.loads((path.parent / "config.json").read_text())}
            same = run["model"] == model and run["config"] == config and not run.get(
                "max_samples") and all(run[key] == value for key, value in options.items())
            if same:
                scores[run["seed"]] = json.loads(path.read_text())["val_score"]
    return scores


def choose(results, dataset, model, study):
    """The dict best.json gets, and one line saying what was chosen and why."""
    root = pathlib.Path(results) / dataset
    try:
        found = json.loads((root / "search" / study / "best.json").read_text())
        published = train.load_config(root / "published.json")
    except (OSError, ValueError) as error:
        raise train.TrainingError(f"study {study} of {root / 'search'} has no best.json "
                                  f"({error}): run or name the study") from None
    if found["settings"]["model"] != model:
        raise train.TrainingError(f"study {study} searched the {found['settings']['model']}, "
                                  f"not the {model}")
    options = {key: found["settings"][key] for key in train.RUN_OPTIONS}
    searched = finished_runs([root / "searched"], model, found["config"], options)
    baseline = finished_runs([root / "published", root / "investigation"], model, published,
                             options)
    seeds = sorted(searched.keys() & baseline.keys())
    if len(seeds) < 2:
        raise train.TrainingError(
            f"the study's best config has finished runs with seeds {sorted(searched)} in "
            f"{root / 'searched'}, the published one with the same options seeds "
            f"{sorted(baseline)}: retrain both with at least two common seeds first")
    means = {name: statistics.mean(scores[seed] for seed in seeds)
             for name, scores in (("searched", searched), ("published", baseline))}
    chosen = "searched" if means["searched"] > means["published"] else "published"
    best = dict(source="results/choose_best.py", chosen=chosen, study=study,
                trial=found["trial"], options=options,
                evidence=dict(val_metric=found["val_metric"], seeds=seeds,
                              searched={s: searched[s] for s in seeds},
                              published={s: baseline[s] for s in seeds},
                              searched_mean=means["searched"],
                              published_mean=means["published"]),
                config=found["config"] if chosen == "searched" else published)
    line = (f"{chosen}: mean validation {found['val_metric']} over seeds {seeds}, the study's "
            f"best config {means['searched']:.4f}, the published one {means['published']:.4f}")
    return best, line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(train.METRIC), default="UCIHAR")
    parser.add_argument("--model", choices=larnn.MODELS, default="larnn")
    parser.add_argument("--study", required=True, help="a folder name under "
                                                       "results/<dataset>/search/")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    try:
        best, line = choose(args.results_dir, args.dataset, args.model, args.study)
    except train.TrainingError as error:
        sys.exit(f"error: {error}")
    path = train.best_config_path(args.results_dir, args.dataset, args.model)
    train.write_json(path, best)
    print(f"{path}: {line}")


if __name__ == "__main__":
    main()
