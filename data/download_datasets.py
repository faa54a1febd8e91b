"""Download and install the datasets (the front end of datasets.install).

    cd data && python3 download_datasets.py                  # both, official addresses
    python3 data/download_datasets.py --dataset UCIHAR --archive ~/UCI_HAR.zip
    python3 data/download_datasets.py --archive https://mirror.example/UCI.zip --dataset UCIHAR

--archive installs from a local file or any URL instead of the official address (for
offline clusters). The data dir is this folder unless --data-dir or $LARNN_DATA_DIR says
otherwise; the loaders in datasets.py read the same place.
"""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import datasets  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=[*datasets.SPECS, "all"], default="all")
    parser.add_argument("--archive", help="install from this local file or URL")
    parser.add_argument("--data-dir", help="where to install (default: this folder, or "
                                           "$LARNN_DATA_DIR)")
    parser.add_argument("--force", action="store_true", help="reinstall if present")
    args = parser.parse_args(argv)
    names = list(datasets.SPECS) if args.dataset == "all" else [args.dataset]
    if args.archive and len(names) > 1:
        parser.error("--archive holds one dataset: name it with --dataset")
    try:
        for name in names:
            datasets.install(name, args.archive, args.data_dir, args.force)
    except datasets.DatasetError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
