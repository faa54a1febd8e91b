"""Retrain a search study's best config at full budget, one run per seed, into
results/<dataset>/searched/<model>-seed<N>/, where results/choose_best.py looks for them.

    python3 results/retrain_best.py --study bnlstm-10ep-all-seed0-... --seeds 0 1 2 3

Each run trains the config of the study's best.json for its training_epochs, with the
study's run options (--precise-bn, --bn-scale-init, --lr-schedule), as
`train.py --config <study>/best.json --seed N` would. Rerunning the command continues:
a finished seed is skipped, an interrupted one resumes from its checkpoint, and a
finished run's checkpoint is deleted (nothing resumes a finished run; it is not
committed). Two processes may share a study's seeds (--seeds 0 1, --seeds 2 3).
"""
import argparse
import json
import pathlib
import shutil
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import datasets  # noqa: E402
import train  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent


def study_best(results, dataset, study):
    """The study's best.json path and contents; one line if it has none."""
    path = pathlib.Path(results) / dataset / "search" / study / "best.json"
    try:
        return path, json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise train.TrainingError(f"{path} is missing or unreadable ({error}): name a study "
                                  f"of {path.parent.parent} that has finished a trial") from None


def planned_run(best_path, best, seed):
    """What the run's config.json holds (train.run_spec), with where the config came from:
    in words (config_source) and as the study and trial (searched_from)."""
    settings, config = best["settings"], best["config"]
    options = {option: settings[option] for option in train.RUN_OPTIONS}
    spec = train.run_spec(settings["dataset"], settings["model"], config, seed,
                          config["training_epochs"], **options)
    return dict(spec, config_source=f"{best_path} ({train.describe(best_path)})",
                searched_from=dict(study=best["study"], trial=best["trial"]))


def prepare(run_dir, planned):
    """True if run_dir is finished; else make it ready to train (new, or resumable).
    A folder that trained something else is refused, never overwritten."""
    config_path = run_dir / "config.json"
    if config_path.is_file():
        held = train.read_run(run_dir)
        differs = [key for key in ("model", "seed", "epochs", "config", *train.RUN_OPTIONS)
                   if held.get(key) != planned[key]]
        if differs:
            raise train.TrainingError(
                f"{run_dir} trained another run (its {', '.join(differs)} differ from the "
                f"study's best now): move it away to retrain the study's best there")
        if (run_dir / "result.json").is_file():
            return True
        if (run_dir / "checkpoint.pt").is_file():
            return False
        shutil.rmtree(run_dir)  # killed before its first epoch ended: nothing to keep
    run_dir.mkdir(parents=True)
    train.write_json(config_path, planned)
    return False


def retrain(results, dataset, study, seeds, device="auto", data_dir=None):
    """Train (or continue) the study's best config with each seed; returns the run folders."""
    best_path, best = study_best(results, dataset, study)
    model = best["settings"]["model"]
    data, folders = None, []
    for seed in seeds:
        run_dir = pathlib.Path(results) / dataset / "searched" / f"{model}-seed{seed}"
        folders.append(run_dir)
        if prepare(run_dir, planned_run(best_path, best, seed)):
            print(f"{run_dir}: finished, skipped", flush=True)
        else:
            print(f"{run_dir}: training trial {best['trial']} of {study}, seed {seed}",
                  flush=True)
            data = data or datasets.load(dataset, data_dir)
            train.train(run_dir, data, device=device)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return folders


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(train.METRIC), default="UCIHAR")
    parser.add_argument("--study", required=True,
                        help="a folder name under results/<dataset>/search/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--data-dir", help="default: data/ or $LARNN_DATA_DIR")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    try:
        train.resolve_device(args.device)
        retrain(args.results_dir, args.dataset, args.study, args.seeds, args.device,
                args.data_dir)
    except (train.TrainingError, datasets.DatasetError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("\nstopped: rerun the same command to continue")


if __name__ == "__main__":
    main()
