"""Install and load both datasets from tiny generated archives (by path and over HTTP),
every bad input's one-line error, and the real UCI HAR archive when it is beside us."""
import errno
import http.server
import io
import json
import pathlib
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import datasets
import fakedata

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_UCIHAR = ROOT.parent / "shared" / "datasets" / "UCI-HAR-rebuilt-from-HAPT.zip"


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size)
                  for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def ucihar_archive(tmp_path):
    return fakedata.write_archive(tmp_path / "har.zip", fakedata.ucihar_files(),
                                  nested_name="UCI HAR Dataset.zip")


def test_ucihar_install_load_and_subject_disjoint_validation(tmp_path, ucihar_archive):
    root = tmp_path / "data"
    datasets.install("UCIHAR", str(ucihar_archive), root)
    data = datasets.UCIHARDataset(root)
    assert data.X_train.shape[1:] == (128, 9) and data.X_train.dtype == np.float32
    assert len(data.X_train) + len(data.X_val) == 5 * 12 and len(data.X_test) == 2 * 12
    assert data.Y_train.min() >= 0 and data.Y_train.max() <= 5
    assert list(data.val_subjects) and len(data.val_subjects) == 1  # 20% of 5 subjects
    assert data.sha256 == datasets.sha256(ucihar_archive)
    # A second install is a no-op that says so.
    messages = []
    datasets.install("UCIHAR", str(ucihar_archive), root, log=messages.append)
    assert "already installed" in messages[0]


def test_cache_is_rebuilt_when_a_source_changes(tmp_path, ucihar_archive):
    root = tmp_path / "data"
    datasets.install("UCIHAR", str(ucihar_archive), root)
    before = datasets.UCIHARDataset(root).Y_test.copy()
    y_test = root / "UCI HAR Dataset" / "test" / "y_test.txt"
    y_test.write_text("\n".join(["1"] * len(before)) + "\n")
    assert (datasets.UCIHARDataset(root).Y_test == 0).all() and (before != 0).any()


def test_opportunity_protocol(tmp_path):
    archive = fakedata.write_archive(tmp_path / "opp.zip", fakedata.opportunity_files())
    root = tmp_path / "data"
    datasets.install("Opportunity", str(archive), root)
    data = datasets.OpportunityDataset(root)
    assert data.X_train.shape[1:] == (24, 113) and data.OUTPUT_CLASSES_SIZE == 18
    assert 0 <= data.X_train.min() and data.X_train.max() <= 1 and not np.isnan(data.X_train).any()
    per_file_test = (300 - 24) // 12 + 1
    assert len(data.X_test) == 4 * per_file_test
    assert set(np.unique(data.Y_train)) <= set(range(18))
    # Labels are the last sample's gesture code, mapped.
    table = np.loadtxt(root / "OpportunityUCIDataset" / "dataset" / "S2-ADL4.dat")
    expected = [datasets.GESTURE_CODES.get(int(c), 0) for c in table[23:24 + 11 * 12:12, 249]]
    np.testing.assert_array_equal(data.Y_test[:len(expected)], expected)
    locomotion = datasets.OpportunityDataset(root, task="locomotion")
    assert locomotion.OUTPUT_CLASSES_SIZE == 5 and locomotion.Y_test.max() <= 4


# SPEC section 6, written out apart from datasets.py: the raw columns (0-based) that the
# protocol deletes; of the 116 left, 0 is time, 1..113 the channels, 115 the gestures.
SPEC_DELETED = {*range(46, 50), *range(59, 63), *range(72, 76), *range(85, 89),
                *range(98, 102), *range(134, 243), *range(244, 249)}


def test_opportunity_keeps_the_protocols_columns_each_scaled_by_its_own_bounds(tmp_path):
    """Raw column j holds, in row r, the value that channel j's bounds scale to
    0.1 + 0.8 j / 250 + 1e-4 r, unique to the column and row and inside (0, 1); the
    deleted columns hold 1e9, which would show as 0.99 if kept. A wrong list of deleted
    columns, bounds applied to another channel or a shifted window all change X."""
    kept = [j for j in range(datasets.OPPORTUNITY_COLUMNS) if j not in SPEC_DELETED]
    channels, gestures = kept[1:114], kept[115]
    assert len(kept) == 116 and gestures == 249
    bounds = json.loads((ROOT / "data" / "opportunity_bounds.json").read_text())
    low, high = np.array(bounds["min"], float), np.array(bounds["max"], float)
    assert len(set(zip(low, high))) > 1  # else swapped channels would not show
    rows = 240  # the validation tail of 36 rows holds 2 windows
    scaled = 0.1 + 0.8 * np.arange(250)[None, :] / 250 + 1e-4 * np.arange(rows)[:, None]
    table = np.full((rows, 250), 1e9)
    table[:, 0] = np.arange(rows) * 33
    table[:, channels] = low + (high - low) * scaled[:, channels]
    table[:, 243] = 1
    code = list(datasets.GESTURE_CODES)[4]  # class 5
    table[:, gestures] = np.where(np.arange(rows) % 2, code, 0)
    archive = fakedata.write_archive(tmp_path / "opp.zip", fakedata.opportunity_files(table=table))
    datasets.install("Opportunity", str(archive), tmp_path / "data")
    data = datasets.OpportunityDataset(tmp_path / "data")
    cut = round(rows * (1 - datasets.OPPORTUNITY_VAL_FRACTION))
    starts = {"train": range(0, cut - 23, 12), "val": range(cut, rows - 23, 12),
              "test": range(0, rows - 23, 12)}
    for split, (X, Y) in data.splits().items():
        per_recording = len(starts[split])
        assert len(X) == per_recording * (4 if split == "test" else 14), split
        expected = np.stack([scaled[s:s + 24, channels] for s in starts[split]])
        np.testing.assert_allclose(X[:per_recording], expected, atol=1e-6, err_msg=split)
        last = [s + 23 for s in starts[split]]
        np.testing.assert_array_equal(Y[:per_recording], np.where(np.array(last) % 2, 5, 0))


def test_nan_interpolation_follows_the_protocol():
    x = np.array([[np.nan], [1.0], [np.nan], [3.0], [np.nan]])
    np.testing.assert_array_equal(datasets.interpolate_nans(x)[:, 0], [0, 1, 2, 3, 3])


def corrupt(files, member, change):
    """files with member's text replaced by change(text)."""
    return {**files, member: change(files[member])}


SIGNAL = "UCI HAR Dataset/train/Inertial Signals/body_acc_x_train.txt"
OPPORTUNITY = "OpportunityUCIDataset/dataset/S1-ADL2.dat"


def replace_line(number, change):
    """A text change that rewrites line `number` (from 1) with change(line)."""
    def rewrite(text):
        lines = text.splitlines()
        lines[number - 1] = change(lines[number - 1])
        return "\n".join(lines) + "\n"
    return rewrite


def set_value(column, value):
    return lambda line: " ".join(value if i == column else v for i, v in enumerate(line.split()))


# Archives whose structure is right and content is not: (dataset, files, message).
BAD_CONTENT = {
    "a row of the wrong length": ("UCIHAR", corrupt(
        fakedata.ucihar_files(), SIGNAL, replace_line(3, lambda line: line + " 1.0")),
        r"body_acc_x_train.txt line 3: 129 values, expected 128"),
    "an unparsable number": ("UCIHAR", corrupt(
        fakedata.ucihar_files(), SIGNAL, replace_line(5, set_value(7, "1.2.3"))),
        r"body_acc_x_train.txt line 5: '1.2.3' is not a number"),
    "a label that is not an integer": ("UCIHAR", corrupt(
        fakedata.ucihar_files(), "UCI HAR Dataset/train/y_train.txt",
        replace_line(2, lambda line: "walk")), r"y_train.txt line 2: 'walk' is not an integer"),
    "a label out of range": ("UCIHAR", corrupt(
        fakedata.ucihar_files(), "UCI HAR Dataset/test/y_test.txt",
        replace_line(4, lambda line: "7")), r"y_test.txt line 4: label 7 is outside 1..6"),
    "a subject out of range": ("UCIHAR", corrupt(
        fakedata.ucihar_files(), "UCI HAR Dataset/test/subject_test.txt",
        replace_line(1, lambda line: "31")), r"subject_test.txt line 1: label 31 is outside"),
    "signal files that disagree": ("UCIHAR", corrupt(
        fakedata.ucihar_files(), SIGNAL, lambda text: text.split("\n", 1)[1]),
        r"signal files disagree on the number of windows \(\[59, 60\]\)"),
    "labels and signals that disagree": ("UCIHAR", corrupt(
        fakedata.ucihar_files(), "UCI HAR Dataset/test/y_test.txt",
        lambda text: text.split("\n", 1)[1]), r"y_test.txt has 23 rows but the signal files have 24"),
    "an empty file": ("UCIHAR", corrupt(
        fakedata.ucihar_files(), "UCI HAR Dataset/test/subject_test.txt", lambda text: ""),
        r"subject_test.txt is empty"),
    "Opportunity: a row of 249 columns": ("Opportunity", corrupt(
        fakedata.opportunity_files(rows=60), OPPORTUNITY,
        replace_line(9, lambda line: line.rsplit(" ", 1)[0])),
        r"S1-ADL2.dat line 9: 249 values, expected 250"),
    "Opportunity: text in a sensor column": ("Opportunity", corrupt(
        fakedata.opportunity_files(rows=60), OPPORTUNITY, replace_line(2, set_value(20, "high"))),
        r"S1-ADL2.dat line 2: 'high' is not a number"),
    "Opportunity: an unknown gesture code": ("Opportunity", corrupt(
        fakedata.opportunity_files(rows=60), OPPORTUNITY, replace_line(6, set_value(249, "123"))),
        r"S1-ADL2.dat line 6: gestures label code 123 is not one of the protocol's codes"),
    "Opportunity: an unknown locomotion code": ("Opportunity", corrupt(
        fakedata.opportunity_files(rows=60), OPPORTUNITY, replace_line(7, set_value(243, "3"))),
        r"S1-ADL2.dat line 7: locomotion label code 3 is not one of the protocol's codes"),
}


@pytest.mark.parametrize("case", BAD_CONTENT)
def test_bad_content_is_refused_at_install_in_one_line(tmp_path, case):
    """Every file is parsed and checked before the install replaces anything: the error
    names the file (as in the archive), the line and what is wrong."""
    name, files, message = BAD_CONTENT[case]
    good = fakedata.ucihar_files() if name == "UCIHAR" else fakedata.opportunity_files(rows=60)
    root = tmp_path / "data"
    datasets.install(name, str(fakedata.write_archive(tmp_path / "good.zip", good)), root)
    before = snapshot(root)
    bad = fakedata.write_archive(tmp_path / "bad.zip", files)
    with pytest.raises(datasets.DatasetError, match=message) as error:
        datasets.install(name, str(bad), root, force=True)
    assert "\n" not in str(error.value) and ".install-" not in str(error.value)
    assert "nothing was installed" in str(error.value)
    assert snapshot(root) == before
    run = subprocess.run([sys.executable, str(ROOT / "data" / "download_datasets.py"),
                          "--dataset", name, "--archive", str(bad), "--data-dir", str(root),
                          "--force"], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert re.search(message, run.stderr) and snapshot(root) == before


def test_install_builds_the_cache(tmp_path, ucihar_archive, monkeypatch):
    root = tmp_path / "data"
    datasets.install("UCIHAR", str(ucihar_archive), root)
    assert (root / "UCI HAR Dataset" / "cache-ucihar.npz").is_file()
    monkeypatch.setattr(datasets, "build_ucihar", lambda folder: pytest.fail("parsed again"))
    assert len(datasets.UCIHARDataset(root).X_test) == 24


@pytest.mark.parametrize("cut", [0, 100, 0.5, -10])
def test_a_broken_cache_is_rebuilt_from_the_installed_files(tmp_path, ucihar_archive, cut):
    root = tmp_path / "data"
    datasets.install("UCIHAR", str(ucihar_archive), root)
    cache = root / "UCI HAR Dataset" / "cache-ucihar.npz"
    data = cache.read_bytes()
    cache.write_bytes(data[:int(cut * len(data)) if isinstance(cut, float) else cut])
    rebuilt = datasets.UCIHARDataset(root)
    assert len(rebuilt.X_train) and cache.read_bytes() == data


@pytest.mark.parametrize("marker", ["", "{\"dataset\": \"UCIHAR\"", "[]"])
def test_a_broken_install_marker_says_how_to_reinstall(tmp_path, ucihar_archive, marker):
    root = tmp_path / "data"
    datasets.install("UCIHAR", str(ucihar_archive), root)
    (root / "UCI HAR Dataset" / datasets.MARKER).write_text(marker)
    with pytest.raises(datasets.DatasetError, match=r"\.installed\.json is unreadable: "
                       r"reinstall with .* --dataset UCIHAR --force"):
        datasets.UCIHARDataset(root)


def zip_slip_archive(path):
    files = fakedata.ucihar_files()
    files["../escaped.txt"] = "x"
    return fakedata.write_archive(path, files)


BAD_ARCHIVES = {
    "truncated": (lambda p: p.write_bytes(fakedata.zip_bytes(fakedata.ucihar_files())[:5000]),
                  "not a readable zip"),
    "missing member": (lambda p: fakedata.write_archive(p, {
        k: v for k, v in fakedata.ucihar_files().items() if "y_test" not in k}), "lacks"),
    "escaping member": (zip_slip_archive, "outside the data folder"),
    "no such file": (lambda p: None, "no such file"),
}


@pytest.mark.parametrize("case", BAD_ARCHIVES)
def test_bad_archives_leave_the_data_dir_as_it_was(tmp_path, ucihar_archive, case):
    root = tmp_path / "data"
    datasets.install("UCIHAR", str(ucihar_archive), root)
    before = snapshot(root)
    make, message = BAD_ARCHIVES[case]
    bad = tmp_path / "bad.zip"
    make(bad)
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.install("UCIHAR", str(bad), root, force=True)
    assert snapshot(root) == before
    assert not (tmp_path / "escaped.txt").exists()
    # The command line gives the same error on one line, with no traceback.
    run = subprocess.run([sys.executable, str(ROOT / "data" / "download_datasets.py"),
                          "--dataset", "UCIHAR", "--archive", str(bad), "--data-dir", str(root),
                          "--force"], capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    assert snapshot(root) == before


class ArchiveServer(http.server.BaseHTTPRequestHandler):
    """Serves `files` with Range support; `flaky` paths break off the first response."""
    files, flaky, requests_seen = {}, set(), []

    def do_GET(self):
        self.requests_seen.append((self.path, self.headers.get("Range")))
        if self.path == "/loop.zip":  # redirects to itself
            self.send_response(302)
            self.send_header("Location", "/loop.zip")
            self.end_headers()
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if self.path in self.flaky:
            self.flaky.discard(self.path)
            self.wfile.write(data[start:start + len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(ucihar_archive):
    ArchiveServer.files = {"/har.zip": ucihar_archive.read_bytes(),
                           "/truncated.zip": ucihar_archive.read_bytes()[:4000]}
    ArchiveServer.flaky, ArchiveServer.requests_seen = set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ArchiveServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_install_and_resumed_download(tmp_path, server):
    ArchiveServer.flaky = {"/har.zip"}
    root = tmp_path / "data"
    datasets.install("UCIHAR", f"{server}/har.zip", root)
    assert len(datasets.UCIHARDataset(root).X_test) == 24
    ranges = [r for path, r in ArchiveServer.requests_seen if path == "/har.zip"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"


@pytest.mark.parametrize("url,message", [
    ("{server}/missing.zip", "HTTP 404"), ("{server}/truncated.zip", "not a readable zip"),
    ("{server}/loop.zip", "TooManyRedirects"), ("http://", "InvalidURL"),
    ("http://[::1", "InvalidURL")])
def test_http_errors_give_one_line_and_leave_no_empty_downloads_folder(tmp_path, server, url,
                                                                       message):
    root = tmp_path / "data"
    with pytest.raises(datasets.DatasetError, match=message) as error:
        datasets.install("UCIHAR", url.format(server=server), root)
    assert "\n" not in str(error.value)
    assert not (root / "UCI HAR Dataset").exists()
    downloads = root / "downloads"
    assert not downloads.exists() or any(downloads.iterdir())


def test_a_full_disk_gives_one_line(tmp_path, server, monkeypatch):
    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(datasets, "open", lambda *args: FullDisk(), raising=False)
    root = tmp_path / "data"
    with pytest.raises(datasets.DatasetError, match="No space left on device.*--data-dir"):
        datasets.install("UCIHAR", f"{server}/har.zip", root)
    assert not (root / "downloads").exists()


def test_no_network_error_says_how_to_use_archive(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.SPECS["UCIHAR"], "urls", ["http://127.0.0.1:9/none.zip"])
    monkeypatch.setattr(datasets.time, "sleep", lambda s: None)
    with pytest.raises(datasets.DatasetError, match="no network.*install it with python3 "
                       "data/download_datasets.py --dataset UCIHAR --archive PATH"):
        datasets.install("UCIHAR", root=tmp_path)


@pytest.mark.skipif(not SHARED_UCIHAR.is_file(), reason="../shared archive not present")
def test_real_ucihar_archive(tmp_path, monkeypatch):
    root = tmp_path / "data"
    run = subprocess.run([sys.executable, str(ROOT / "data" / "download_datasets.py"),
                          "--dataset", "UCIHAR", "--archive", str(SHARED_UCIHAR),
                          "--data-dir", str(root)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    data = datasets.UCIHARDataset(root)
    assert len(data.X_train) + len(data.X_val) == 7415 and len(data.X_test) == 2996
    assert data.X_test.shape[1:] == (128, 9)
    counts = np.bincount(np.concatenate([data.Y_train, data.Y_val]))
    assert list(counts) == [1226, 1073, 987, 1293, 1423, 1413]
    assert not set(data.val_subjects) & {2, 4, 9, 10, 12, 13, 18, 20, 24}
    # The install cached the arrays: loading again parses nothing.
    monkeypatch.setattr(datasets, "build_ucihar", lambda folder: pytest.fail("parsed again"))
    np.testing.assert_array_equal(datasets.UCIHARDataset(root).X_test, data.X_test)
