"""Tiny archives in the official layouts of UCI HAR and Opportunity, for the tests.

The signals carry the class in their mean, so a model can learn them in a few steps.
"""
import io
import zipfile

import numpy as np

import datasets


def ucihar_files(subjects=(1, 3, 5, 6, 7), test_subjects=(2, 4), per_subject=12, seed=0):
    """{member name: text} of a UCI HAR archive."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, subs in (("train", subjects), ("test", test_subjects)):
        subject = np.repeat(subs, per_subject)
        y = rng.integers(1, 7, len(subject))
        y[:6] = np.arange(1, 7)
        for i, signal in enumerate(datasets.UCIHAR_SIGNALS):
            x = rng.normal(0, 0.3, (len(y), 128)) + (y[:, None] - 3.5) * (0.2 + 0.1 * i)
            files[f"{split}/Inertial Signals/{signal}_{split}.txt"] = "\n".join(
                " ".join(f"{v: .7e}" for v in row) for row in x) + "\n"
        files[f"{split}/y_{split}.txt"] = "\n".join(map(str, y)) + "\n"
        files[f"{split}/subject_{split}.txt"] = "\n".join(map(str, subject)) + "\n"
    return {f"UCI HAR Dataset/{name}": text for name, text in files.items()}


def opportunity_files(rows=300, seed=0, table=None):
    """{member name: text} of an Opportunity archive: 250 columns, NaNs, label codes;
    or, if given, the same [rows, 250] table in every recording."""
    rng = np.random.default_rng(seed)
    codes = list(datasets.GESTURE_CODES)
    files = {}
    for name in datasets.OPPORTUNITY_TRAIN + datasets.OPPORTUNITY_TEST:
        if table is None:
            recording = rng.normal(0, 500, (rows, datasets.OPPORTUNITY_COLUMNS))
            recording[:, 0] = np.arange(rows) * 33
            recording[rng.random(recording.shape) < 0.05] = np.nan
            recording[:3, 5] = np.nan  # leading NaNs become 0
            recording[:, 243] = rng.choice([0, 1, 2, 4, 5], rows)      # locomotion
            recording[:, 249] = rng.choice([0] + codes, rows)          # ML_Both_Arms gestures
        else:
            recording = table
        files[f"OpportunityUCIDataset/dataset/{name}.dat"] = "\n".join(
            " ".join("NaN" if np.isnan(v) else f"{v:.10g}" for v in row)
            for row in recording) + "\n"
    return files


def zip_bytes(files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def write_archive(path, files, nested_name=None):
    """Write `files` as a zip at `path`, wrapped in an outer zip if nested_name is given
    (as the official UCI download wraps the dataset's own zip)."""
    data = zip_bytes(files)
    if nested_name:
        data = zip_bytes({nested_name: data})
    path.write_bytes(data)
    return path
