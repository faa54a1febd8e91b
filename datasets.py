"""UCI HAR and Opportunity: download, verified atomic install, parsing, cached arrays.

    data = UCIHARDataset()            # installs the archive on first use, then caches
    data.X_train.shape                # [N, 128, 9] float32; Y_* are [N] int64 classes

Each dataset has a train, a validation and a test split. The validation split is
carved from the training data only (by subject for UCI HAR, the tail of each training
recording for Opportunity) and is the only split used to choose anything.

The data dir is `data/` beside this file, or $LARNN_DATA_DIR, or the `data_dir`
argument. `python3 data/download_datasets.py --help` is the command-line front end.
Every problem with the data raises DatasetError, whose message is one line saying what
is wrong and how to fix it.
"""
import hashlib
import json
import os
import pathlib
import tempfile
import time
import warnings
import zipfile

import numpy as np
import requests
from tqdm import tqdm

DEFAULT_DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
CACHE_VERSION = 2  # bump when parsing changes, to rebuild every cache
MARKER = ".installed.json"
SPLITS = ("train", "val", "test")


class DatasetError(Exception):
    """A data problem, with a one-line message that says how to fix it."""


def data_dir(path=None):
    return pathlib.Path(path or os.environ.get("LARNN_DATA_DIR") or DEFAULT_DATA_DIR)


# ---------------------------------------------------------------- download ---------

def download(url, destination, attempts=5, backoff_s=1.0, timeout_s=30):
    """Stream `url` to `destination`, resuming a partial `.part` file with HTTP Range,
    retrying with exponential back-off. Returns the destination path."""
    destination = pathlib.Path(destination)
    part = destination.with_name(destination.name + ".part")
    for attempt in range(attempts):
        done = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={done}-"} if done else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as r:
                if r.status_code == 416:  # nothing left to fetch: the part is complete
                    break
                if r.status_code >= 500 and attempt < attempts - 1:
                    raise requests.ConnectionError(f"HTTP {r.status_code}")
                if r.status_code >= 400:
                    raise DatasetError(f"downloading {url} failed: HTTP {r.status_code} "
                                       f"{r.reason}")
                if r.status_code != 206:  # the server ignored Range: start over
                    done = 0
                total = int(r.headers.get("Content-Length", 0)) + done or None
                with open(part, "ab" if done else "wb") as f, tqdm(
                        total=total, initial=done, unit="B", unit_scale=True,
                        desc=destination.name) as bar:
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
                if total is None or part.stat().st_size >= total:
                    break
        except (requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as error:
            if attempt == attempts - 1:
                raise DatasetError(f"cannot download {url} ({type(error).__name__}): "
                                   f"no network?") from None
        except requests.RequestException as error:  # a bad URL, too many redirects, ...
            raise DatasetError(f"cannot download {url}: {type(error).__name__}: "
                               f"{one_line(error)}") from None
        except OSError as error:  # requests' errors are OSErrors too, hence this order
            raise DatasetError(f"cannot write {part} ({error.strerror or error}): free some "
                               f"space or choose another --data-dir") from None
        time.sleep(backoff_s * 2 ** attempt)
    else:
        raise DatasetError(f"downloading {url} kept breaking off after {attempts} attempts; "
                           f"run again to resume")
    os.replace(part, destination)
    return destination


def one_line(error):
    """An exception's message on one line, for our one-line errors."""
    return " ".join(str(error).split())


def fetch_archive(name, source, work_dir):
    """The archive of dataset `name` as a local file: `source` (a path or URL) if given,
    else the dataset's official addresses in turn. A failed download leaves its partial
    file to resume from, and no empty work_dir."""
    spec = SPECS[name]
    if source and not str(source).startswith(("http://", "https://")):
        path = pathlib.Path(source).expanduser()
        if not path.is_file():
            raise DatasetError(f"--archive {source}: no such file")
        return path
    urls = [source] if source else spec["urls"]
    work_dir = pathlib.Path(work_dir)
    work_dir.mkdir(exist_ok=True)
    target = work_dir / spec["archive_name"]
    errors = []
    for url in urls:
        try:
            return download(url, target)
        except DatasetError as error:
            errors.append(str(error))
    if not any(work_dir.iterdir()):
        work_dir.rmdir()
    raise DatasetError("; ".join(errors) + f". Fetch the archive elsewhere and install it "
                       f"with python3 data/download_datasets.py --dataset {name} --archive "
                       f"PATH")


# ----------------------------------------------------------------- install ---------

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_zip(path):
    try:
        archive = zipfile.ZipFile(path)
        bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise DatasetError(f"{path} is not a readable zip archive ({error}): it may be "
                           f"truncated or corrupt; delete it and download again") from None
    if bad is not None:
        raise DatasetError(f"{path}: member {bad!r} fails its CRC check; the archive is "
                           f"corrupt, download it again")
    return archive


def safe_extract(archive, target):
    """Extract every member under `target`, refusing members that would escape it."""
    root = pathlib.Path(target).resolve()
    for name in archive.namelist():
        if not (root / name).resolve().is_relative_to(root):
            raise DatasetError(f"archive member {name!r} would be written outside the data "
                               f"folder; refusing this archive")
    archive.extractall(root)


def extract_dataset(spec, archive_path, target):
    """Extract the archive into `target`, unwrapping nested zips until the dataset's
    folder appears; returns the extracted dataset folder."""
    path = archive_path
    for _ in range(3):
        with open_zip(path) as archive:
            safe_extract(archive, target)
            names = archive.namelist()
        if (target / spec["folder"]).is_dir():
            break
        inner = [n for n in names if n.endswith(".zip")]
        if len(inner) != 1:
            break
        path = target / inner[0]
    folder = target / spec["folder"]
    missing = [m for m in spec["members"] if not (folder / m).is_file()]
    if missing:
        raise DatasetError(f"the archive lacks {len(missing)} required file(s) of "
                           f"{spec['folder']}/, e.g. {missing[0]!r}: is it the right archive?")
    return folder


def install(name, archive=None, root=None, force=False, log=print):
    """Install dataset `name` into the data dir, atomically: the archive is extracted,
    every file parsed and checked and the cached arrays built in a temporary folder,
    and only then does it replace the installed one, so a bad archive leaves the data
    dir as it was. Returns the installed folder."""
    spec = SPECS[name]
    root = data_dir(root)
    folder = root / spec["folder"]
    if (folder / MARKER).is_file() and not force:
        log(f"{name} is already installed in {folder} (use --force to reinstall)")
        return folder
    root.mkdir(parents=True, exist_ok=True)
    archive_path = fetch_archive(name, archive, root / "downloads")
    with tempfile.TemporaryDirectory(dir=root, prefix=f".install-{name}-") as tmp:
        extracted = extract_dataset(spec, archive_path, pathlib.Path(tmp))
        log(f"checking every file of {name} and caching its arrays")
        try:
            DATASETS[name].build_cache(extracted)
        except DatasetError as error:  # name the file as the archive does, not our temp copy
            inside = str(error).replace(f"{tmp}{os.sep}", "")
            raise DatasetError(f"{archive or archive_path}: {inside} (nothing was "
                               f"installed)") from None
        marker = {"dataset": name, "archive": str(archive or archive_path),
                  "sha256": sha256(archive_path)}
        (extracted / MARKER).write_text(json.dumps(marker, indent=1))
        old = pathlib.Path(tmp) / "previous"
        if folder.exists():
            os.replace(folder, old)
        os.replace(extracted, folder)
    log(f"installed {name} in {folder} (archive sha256 {marker['sha256'][:12]}...)")
    return folder


def installed_folder(name, root=None):
    """The dataset's folder, installing it through the normal path if it is missing."""
    folder = data_dir(root) / SPECS[name]["folder"]
    if not (folder / MARKER).is_file():
        install(name, root=root)
    return folder


# ----------------------------------------------------------------- parsing ---------

def read_table(path, columns, dtype=np.float64):
    """A whitespace-separated table of numbers (NaN allowed), `columns` per row; a bad
    row raises DatasetError naming its line."""
    try:
        with warnings.catch_warnings():  # an empty file: our error below, not numpy's warning
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, dtype=dtype, ndmin=2)
    except ValueError:  # numpy's message is about its own options: find the line ourselves
        raise DatasetError(bad_line(path, columns, dtype)) from None
    if table.size == 0:
        raise DatasetError(f"{path} is empty")
    if table.shape[1] != columns:
        raise DatasetError(f"{path}: rows have {table.shape[1]} values, expected {columns}")
    return table


def bad_line(path, columns, dtype):
    """The first line of `path` that is not `columns` numbers of `dtype`, described."""
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            values = line.split()
            if not values:
                continue  # blank lines are skipped, as np.loadtxt does
            for value in values:
                try:
                    dtype(value)
                except ValueError:
                    kind = "an integer" if dtype is np.int64 else "a number"
                    return f"{path} line {number}: {value[:20]!r} is not {kind}"
            if len(values) != columns:
                return f"{path} line {number}: {len(values)} values, expected {columns}"
    return f"{path}: not a table of numbers"


def cached(folder, key, build):
    """`build()`'s arrays, cached in folder/cache-<key>.npz and rebuilt whenever a
    source file or the parser changes."""
    sources = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".txt", ".dat"))
    signature = hashlib.sha256(json.dumps(
        [CACHE_VERSION, key] + [[str(p.relative_to(folder)), p.stat().st_size,
                                 p.stat().st_mtime_ns] for p in sources]).encode()).hexdigest()
    path = folder / f"cache-{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as cache:
                if str(cache["signature"]) == signature:
                    return {k: cache[k] for k in cache.files if k != "signature"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a truncated or corrupted cache: rebuilt below from the installed files
    arrays = build()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, signature=signature, **arrays)
        os.replace(tmp, path)
    except OSError as error:
        raise DatasetError(f"cannot write the cache {path} ({error.strerror or error}): "
                           f"free some space") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return arrays


def archive_sha256(name, folder):
    """The sha256 of the archive recorded by the install marker of `folder`."""
    try:
        return json.loads((folder / MARKER).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DatasetError(f"{folder / MARKER} is unreadable: reinstall with python3 "
                           f"data/download_datasets.py --dataset {name} --force (add "
                           f"--archive PATH offline)") from None


class Dataset:
    """Common interface: X_train/Y_train, X_val/Y_val, X_test/Y_test and `sha256`, the
    archive the data came from."""
    NAME = SEQUENCE_LENGTH = INPUT_FEATURES_SIZE = OUTPUT_CLASSES_SIZE = LABELS = None

    def __init__(self, arrays, folder):
        for key, value in arrays.items():
            setattr(self, key, value)
        self.sha256 = archive_sha256(self.NAME, folder)

    def splits(self):
        return {split: (getattr(self, f"X_{split}"), getattr(self, f"Y_{split}"))
                for split in SPLITS}


# ------------------------------------------------------------------ UCI HAR --------

UCIHAR_SIGNALS = [f"{kind}_{axis}" for kind in ("body_acc", "body_gyro", "total_acc")
                  for axis in "xyz"]
UCIHAR_VAL_FRACTION = 0.2  # of the training subjects, at least one
UCIHAR_SPLIT_SEED = 0


def ucihar_members():
    return [f"{split}/Inertial Signals/{signal}_{split}.txt" for split in ("train", "test")
            for signal in UCIHAR_SIGNALS] + [
        f"{split}/{kind}_{split}.txt" for split in ("train", "test") for kind in ("y", "subject")]


def read_labels(path, low, high, rows):
    labels = read_table(path, 1, dtype=np.int64)[:, 0]
    bad = (labels < low) | (labels > high)
    if bad.any():
        line = int(np.argmax(bad)) + 1
        raise DatasetError(f"{path} line {line}: label {labels[line - 1]} is outside "
                           f"{low}..{high}")
    if rows is not None and len(labels) != rows:
        raise DatasetError(f"{path} has {len(labels)} rows but the signal files have {rows}")
    return labels


def read_ucihar_split(folder, split):
    signals = [read_table(folder / split / "Inertial Signals" / f"{s}_{split}.txt", 128)
               for s in UCIHAR_SIGNALS]
    rows = {len(s) for s in signals}
    if len(rows) != 1:
        raise DatasetError(f"{folder / split}: the signal files disagree on the number of "
                           f"windows ({sorted(rows)})")
    n = rows.pop()
    y = read_labels(folder / split / f"y_{split}.txt", 1, 6, n) - 1
    subjects = read_labels(folder / split / f"subject_{split}.txt", 1, 30, n)
    return np.stack(signals, axis=-1).astype(np.float32), y, subjects


def validation_subjects(subjects):
    """The training subjects held out for validation: a fixed, seeded choice."""
    unique = np.unique(subjects)
    if len(unique) < 2:
        raise DatasetError("the training split has fewer than 2 subjects: cannot carve a "
                           "subject-disjoint validation split")
    n = max(1, round(UCIHAR_VAL_FRACTION * len(unique)))
    chosen = np.random.default_rng(UCIHAR_SPLIT_SEED).choice(unique, n, replace=False)
    return np.sort(chosen)


def build_ucihar(folder):
    X, y, subjects = read_ucihar_split(folder, "train")
    X_test, y_test, _ = read_ucihar_split(folder, "test")
    val = np.isin(subjects, validation_subjects(subjects))
    return dict(X_train=X[~val], Y_train=y[~val], X_val=X[val], Y_val=y[val],
                X_test=X_test, Y_test=y_test, val_subjects=validation_subjects(subjects))


class UCIHARDataset(Dataset):
    """UCI HAR, 9 raw inertial signals, 128-sample windows, 6 activities. Validation:
    20% of the training subjects (seeded), so no subject is in two splits."""
    NAME = "UCIHAR"
    SEQUENCE_LENGTH = 128
    INPUT_FEATURES_SIZE = 9
    OUTPUT_CLASSES_SIZE = 6
    LABELS = ["WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING",
              "LAYING"]

    def __init__(self, data_dir=None):
        folder = installed_folder(self.NAME, data_dir)
        super().__init__(self.build_cache(folder), folder)

    @staticmethod
    def build_cache(folder):
        """Every file parsed and checked, the arrays cached (install() calls this)."""
        return cached(folder, "ucihar", lambda: build_ucihar(folder))


# -------------------------------------------------------------- Opportunity --------

OPPORTUNITY_TRAIN = ["S1-Drill", "S1-ADL1", "S1-ADL2", "S1-ADL3", "S1-ADL4", "S1-ADL5",
                     "S2-Drill", "S2-ADL1", "S2-ADL2", "S2-ADL3", "S3-Drill", "S3-ADL1",
                     "S3-ADL2", "S3-ADL3"]
OPPORTUNITY_TEST = ["S2-ADL4", "S2-ADL5", "S3-ADL4", "S3-ADL5"]
OPPORTUNITY_COLUMNS = 250
OPPORTUNITY_DELETED = np.r_[46:50, 59:63, 72:76, 85:89, 98:102, 134:243, 244:249]
OPPORTUNITY_VAL_FRACTION = 0.15  # the tail of each training recording
OPPORTUNITY_WINDOW, OPPORTUNITY_STEP = 24, 12
OPPORTUNITY_BOUNDS = pathlib.Path(__file__).resolve().parent / "data" / "opportunity_bounds.json"
GESTURE_CODES = {406516: 1, 406517: 2, 404516: 3, 404517: 4, 406520: 5, 404520: 6,
                 406505: 7, 404505: 8, 406519: 9, 404519: 10, 406511: 11, 404511: 12,
                 406508: 13, 404508: 14, 408512: 15, 407521: 16, 405506: 17}
LOCOMOTION_CODES = {1: 1, 2: 2, 4: 3, 5: 4}
GESTURE_LABELS = ["Null", "Open Door 1", "Open Door 2", "Close Door 1", "Close Door 2",
                  "Open Fridge", "Close Fridge", "Open Dishwasher", "Close Dishwasher",
                  "Open Drawer 1", "Close Drawer 1", "Open Drawer 2", "Close Drawer 2",
                  "Open Drawer 3", "Close Drawer 3", "Clean Table", "Drink from Cup",
                  "Toggle Switch"]
LOCOMOTION_LABELS = ["Null", "Stand", "Walk", "Sit", "Lie"]


def interpolate_nans(x):
    """Per channel: NaNs linearly interpolated between readings, held at the last
    reading after it, 0 before the first one (the DeepConvLSTM protocol)."""
    out = x.copy()
    index = np.arange(len(x))
    for j in np.flatnonzero(np.isnan(x).any(axis=0)):
        valid = ~np.isnan(x[:, j])
        if not valid.any():
            out[:, j] = 0.0
            continue
        out[:, j] = np.interp(index, index[valid], x[valid, j])
        out[:index[valid][0], j] = 0.0
    return out


def map_codes(codes, table, path, task):
    """Label codes (0 = Null) as classes 0..len(table); an unknown code names its line."""
    mapped = np.zeros(len(codes), dtype=np.int64)
    for code, label in table.items():
        mapped[codes == code] = label
    unknown = (codes != 0) & (mapped == 0)
    if unknown.any():
        line = int(np.argmax(unknown))
        raise DatasetError(f"{path} line {line + 1}: {task} label code {codes[line]:g} is "
                           f"not one of the protocol's codes")
    return mapped


def windows(x, y):
    """24-sample windows every 12 samples, labelled by their last sample."""
    starts = np.arange(0, len(x) - OPPORTUNITY_WINDOW + 1, OPPORTUNITY_STEP)
    index = starts[:, None] + np.arange(OPPORTUNITY_WINDOW)
    return x[index].astype(np.float32), y[index[:, -1]]


def read_opportunity_file(path, bounds):
    """The 113 channels of a recording, scaled, and its labels, [rows, 2]: locomotion
    and gesture classes."""
    table = read_table(path, OPPORTUNITY_COLUMNS)
    table = np.delete(table, OPPORTUNITY_DELETED, axis=1)
    x = interpolate_nans(table[:, 1:114])
    x = (x - bounds["min"]) / (bounds["max"] - bounds["min"])
    x[x > 1] = 0.99
    x[x < 0] = 0.0
    codes = np.nan_to_num(table[:, 114:116])
    labels = [map_codes(codes[:, column], known, path, task) for column, known, task in
              ((0, LOCOMOTION_CODES, "locomotion"), (1, GESTURE_CODES, "gestures"))]
    return x, np.stack(labels, axis=1)


def build_opportunity(folder):
    """Windows of every split with the labels of both tasks: X_<split> and
    Y_<split>_<task>, one parse of the recordings."""
    bounds = {k: np.asarray(v) for k, v in json.loads(OPPORTUNITY_BOUNDS.read_text()).items()
              if k in ("min", "max")}
    parts = {"train": [], "val": [], "test": []}
    for name in OPPORTUNITY_TRAIN + OPPORTUNITY_TEST:
        x, y = read_opportunity_file(folder / "dataset" / f"{name}.dat", bounds)
        if name in OPPORTUNITY_TEST:
            parts["test"].append(windows(x, y))
            continue
        cut = int(round(len(x) * (1 - OPPORTUNITY_VAL_FRACTION)))
        parts["train"].append(windows(x[:cut], y[:cut]))
        parts["val"].append(windows(x[cut:], y[cut:]))
    arrays = {}
    for split, pieces in parts.items():
        arrays[f"X_{split}"] = np.concatenate([p[0] for p in pieces])
        y = np.concatenate([p[1] for p in pieces])
        arrays[f"Y_{split}_locomotion"], arrays[f"Y_{split}_gestures"] = y[:, 0], y[:, 1]
    return arrays


class OpportunityDataset(Dataset):
    """Opportunity, DeepConvLSTM protocol: 113 channels, 24-sample windows every 12,
    labelled by the last sample; gestures (18 classes, default) or locomotion (5).
    Validation: the last 15% of each training recording."""
    NAME = "Opportunity"
    SEQUENCE_LENGTH = OPPORTUNITY_WINDOW
    INPUT_FEATURES_SIZE = 113
    OUTPUT_CLASSES_SIZE = len(GESTURE_LABELS)
    LABELS = GESTURE_LABELS

    def __init__(self, data_dir=None, task="gestures"):
        if task not in ("gestures", "locomotion"):
            raise DatasetError(f"Opportunity task must be gestures or locomotion, got {task!r}")
        if task == "locomotion":
            self.LABELS = LOCOMOTION_LABELS
            self.OUTPUT_CLASSES_SIZE = len(LOCOMOTION_LABELS)
        folder = installed_folder(self.NAME, data_dir)
        arrays = self.build_cache(folder)
        super().__init__({**{f"X_{split}": arrays[f"X_{split}"] for split in SPLITS},
                          **{f"Y_{split}": arrays[f"Y_{split}_{task}"] for split in SPLITS}},
                         folder)

    @staticmethod
    def build_cache(folder):
        """Every file parsed and checked, the arrays of both tasks cached (install())."""
        return cached(folder, "opportunity", lambda: build_opportunity(folder))


SPECS = {
    "UCIHAR": dict(
        folder="UCI HAR Dataset", archive_name="UCI HAR Dataset.zip", members=ucihar_members(),
        urls=["https://archive.ics.uci.edu/static/public/240/"
              "human+activity+recognition+using+smartphones.zip",
              "https://archive.ics.uci.edu/ml/machine-learning-databases/00240/"
              "UCI%20HAR%20Dataset.zip"]),
    "Opportunity": dict(
        folder="OpportunityUCIDataset", archive_name="OpportunityUCIDataset.zip",
        members=[f"dataset/{n}.dat" for n in OPPORTUNITY_TRAIN + OPPORTUNITY_TEST],
        urls=["https://archive.ics.uci.edu/static/public/226/opportunity+activity+recognition.zip",
              "https://archive.ics.uci.edu/ml/machine-learning-databases/00226/"
              "OpportunityUCIDataset.zip"]),
}
DATASETS = {"UCIHAR": UCIHARDataset, "Opportunity": OpportunityDataset}


def load(name, data_dir=None, **options):
    """The dataset class registered under `name`, loaded."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name](data_dir, **options)
