"""Datasets labelled by a CSV (LABELS=<csv>): matching rows to files, and every quirk reported."""
import csv
import os
import re
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from PIL import Image

from pipeline import extract
from pipeline.cache import FeatureStore
from pipeline.config import UserError
from pipeline.data import datasets, labels
from pipeline.fs import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat_folder(root, names, pixels=16):
    """root/<name> for each name: small distinct pictures (content differs, so hashes differ)."""
    os.makedirs(root, exist_ok=True)
    for i, name in enumerate(names):
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)).save(
            os.path.join(root, name))
    return str(root)


def write_csv(path, rows, header=("filename", "label"), delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def by_path(dataset):
    return {f.path: dataset.class_names[f.label] for f in dataset.files}


def test_plain_csv(tmp_path):
    data = flat_folder(tmp_path / "data", ["a1.png", "a2.png", "b1.png", "b2.png"])
    csv_path = write_csv(tmp_path / "labels.csv", [("a1.png", "ant"), ("a2.png", "ant"),
                                                   ("b1.png", "bee"), ("b2.png", "bee")])
    dataset = datasets.discover(data, csv_path)  # a LABELS csv: labels.py matches its rows
    assert dataset.layout == "csv"
    assert dataset.class_names == ["ant", "bee"]
    assert by_path(dataset) == {"a1.png": "ant", "a2.png": "ant", "b1.png": "bee", "b2.png": "bee"}
    assert all(f.split == "" for f in dataset.files)  # splits come from content hashes later
    assert [f.path for f in dataset.files] == sorted(f.path for f in dataset.files)
    assert dataset.skipped == []


def test_the_four_quirks_of_the_issue(tmp_path, capsys):
    data = flat_folder(tmp_path / "data", ["cat1.jpeg", "cat2.jpg", "dog1.png", "dog2.png",
                                           "stray.png"])
    csv_path = write_csv(tmp_path / "labels.csv", [
        ("cat1.jpg", "cat"),                  # extension mismatch: the file is cat1.jpeg
        ("cat2.jpg", " cat "),                # surrounding spaces are stripped
        ("dog1.png", "golden retriever"),     # a label with spaces is a class name as written
        ("dog2.png", "golden retriever"),
        ("gone.jpg", "cat"),                  # names a file that does not exist
    ])                                        # stray.png has no row
    dataset = datasets.discover(data, csv_path)
    assert dataset.class_names == ["cat", "golden retriever"]
    assert by_path(dataset) == {"cat1.jpeg": "cat", "cat2.jpg": "cat",
                                "dog1.png": "golden retriever", "dog2.png": "golden retriever"}
    reasons = dict(dataset.skipped)
    assert set(reasons) == {"gone.jpg", "stray.png"}
    assert reasons["gone.jpg"].startswith(labels.MISSING_FILE) and "line 6" in reasons["gone.jpg"]
    assert reasons["stray.png"] == labels.UNLABELLED
    assert "cat1.jpg -> cat1.jpeg (extension differs)" in capsys.readouterr().out


@pytest.mark.parametrize("written, on_disk, note", [
    ("sub/x.png", "sub/x.png", ""),              # a path relative to DATA
    ("./sub/x.png", "sub/x.png", ""),
    ("sub\\x.png", "sub/x.png", ""),             # written on Windows
    ("x.png", "sub/x.png", ""),                  # the file name alone, unique below DATA
    ("X.PNG", "x.png", "case differs"),
    ("x", "x.png", "extension differs"),         # no extension at all
    ("x.JPG", "x.png", "extension differs"),
])
def test_how_names_are_matched(tmp_path, capsys, written, on_disk, note):
    data = flat_folder(tmp_path / "data", [on_disk, "other.png"])
    csv_path = write_csv(tmp_path / "l.csv", [(written, "a"), ("other.png", "b")])
    assert by_path(datasets.discover(data, csv_path)) == {on_disk: "a", "other.png": "b"}
    out = capsys.readouterr().out
    if note:  # a lenient match is printed as a note ...
        assert f"{written} -> {on_disk} ({note})" in out
    else:     # ... an exact one is not
        assert "matched a file only by ignoring" not in out


def test_ambiguous_and_empty_rows_are_skipped(tmp_path):
    data = flat_folder(tmp_path / "data", ["p/same.png", "q/same.png", "e.png",
                                           "ok1.png", "ok2.png"])
    with open(os.path.join(data, "readme.txt"), "w") as f:
        f.write("not an image")
    csv_path = write_csv(tmp_path / "l.csv", [
        ("same.png", "a"),                        # two files have this name: ambiguous
        ("e.png", ""),                            # no label
        ("", "a"),                                # no file name
        ("ok1.png", "a"), ("ok1.png", "a"),       # a repeated, agreeing row is harmless
        ("ok2.png", "b"),
    ])
    dataset = datasets.discover(data, csv_path)
    assert by_path(dataset) == {"ok1.png": "a", "ok2.png": "b"}
    reasons = dict(dataset.skipped)
    assert "several files" in reasons["same.png"]
    assert "empty label" in reasons["e.png"]
    assert "empty file name" in reasons["<l.csv line 4>"]
    assert reasons["readme.txt"].startswith("not an image")
    assert reasons["p/same.png"] == reasons["q/same.png"] == labels.UNLABELLED


def test_other_columns_delimiters_and_a_byte_order_mark(tmp_path):
    data = flat_folder(tmp_path / "data", ["a.png", "b.png"])
    csv_path = str(tmp_path / "l.csv")
    with open(csv_path, "w", encoding="utf-8-sig", newline="") as f:  # as Excel saves it
        f.write("id;Species;File\n1;ant;a.png\n2;bee;b.png\n\n")
    dataset = datasets.discover(data, csv_path, "file,species")  # header matched ignoring case
    assert by_path(dataset) == {"a.png": "ant", "b.png": "bee"}


def test_a_relative_labels_path_is_looked_for_in_data_first(tmp_path, monkeypatch):
    data = flat_folder(tmp_path / "data", ["a.png", "b.png"])
    write_csv(os.path.join(data, "labels.csv"), [("a.png", "ant"), ("b.png", "bee")])
    monkeypatch.chdir(tmp_path)
    dataset = datasets.discover(data, "labels.csv")
    assert by_path(dataset) == {"a.png": "ant", "b.png": "bee"}
    assert dataset.skipped == []  # the CSV inside DATA is not reported as "not an image"


@pytest.mark.parametrize("rows, columns, message", [
    ([("a.png", "ant"), ("b.png", "ant")], "filename,label", "1 class"),
    ([("x.png", "ant"), ("y.png", "bee")], "filename,label", "0 class"),
    ([("a.png", "ant")], "file,label", "no column 'file'"),
    ([("a.png", "ant")], "filename", "LABEL_COLUMNS='filename' is not two column names"),
])
def test_unusable_csv_raises_user_error(tmp_path, rows, columns, message):
    data = flat_folder(tmp_path / "data", ["a.png", "b.png"])
    csv_path = write_csv(tmp_path / "l.csv", rows)
    with pytest.raises(UserError, match=message):
        datasets.discover(data, csv_path, columns)


def test_a_missing_csv_raises_user_error(tmp_path):
    data = flat_folder(tmp_path / "data", ["a.png"])
    with pytest.raises(UserError, match="LABELS file 'nope.csv' not found"):
        datasets.discover(data, "nope.csv")


def test_extract_with_csv_labels(tmp_path, make_config):
    names = [f"img{i:02d}.png" for i in range(12)]
    data = flat_folder(tmp_path / "data", names + ["unlabelled.png"])
    rows = [(n, "odd class" if i % 2 else "even class") for i, n in enumerate(names)]
    csv_path = write_csv(tmp_path / "l.csv", rows + [("missing.png", "even class")])
    config = make_config(data, labels=csv_path)
    result = extract.run(config)
    assert (result.rows, result.new, result.skipped) == (12, 12, 2)
    with open(os.path.join(config.features_dir, "skipped.csv")) as f:
        skipped = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert skipped["unlabelled.png"] == labels.UNLABELLED
    assert skipped["missing.png"].startswith(labels.MISSING_FILE)
    with FeatureStore(config.features_dir) as store:
        assert store.class_names == ["even class", "odd class"]
        assert store.attrs["layout"] == "csv"
        fractions = config.split_fractions
        for path, split, sha, label in zip(store.paths, store.splits, store.sha256, store.labels):
            assert split == datasets.split_for(sha, fractions)  # as in layout (a)
            assert store.class_names[label] == dict(rows)[path]
    assert extract.run(config).changed is False  # the CSV is read again, nothing else changes


# --------------------------------------------------------------------------------------------
# An untrusted LABELS file
# --------------------------------------------------------------------------------------------

def outside_snapshot(root, skip):
    """{path: bytes} of the files under `root`, less those under the folders in `skip`."""
    found = {}
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if os.path.join(folder, d) not in skip]
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.join(folder, name)] = f.read()
    return found


def run_extract(tmp_path, make_config, rows, images=("a1.png", "a2.png", "b1.png", "b2.png")):
    """extract on a flat folder labelled by `rows`; (config, files outside features/<NAME> and
    models/<NAME> before the run, a function giving them now)."""
    data = flat_folder(tmp_path / "data", images)
    config = make_config(data, labels=write_csv(tmp_path / "l.csv", rows), name="csv")
    skip = {str(tmp_path / "features" / "csv"), str(tmp_path / "models" / "csv")}
    return config, outside_snapshot(tmp_path, skip), lambda: outside_snapshot(tmp_path, skip)


@pytest.mark.parametrize("header", [False, True])
def test_a_huge_one_line_csv_is_refused_quickly_in_bounded_memory(tmp_path, header):
    """300 MB without a line break (sparse: no disk used), read in a child process whose peak
    memory is measured: the line is refused after MAX_LINE characters, not read whole."""
    csv_path = tmp_path / "huge.csv"
    with open(csv_path, "wb") as f:
        f.write(b"filename,label\n" if header else b"")
        f.truncate(300 * 2**20)
    child = (
        "import sys, time\n"
        "from pipeline.data import labels\n"
        "from pipeline.config import UserError\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    labels.read_rows(sys.argv[1], 'filename,label')\n"
        "except UserError as error:\n"
        "    print(error)\n"
        "print(time.perf_counter() - start)\n"
        # VmHWM: this process's peak (ru_maxrss would carry the forking pytest's over exec)
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n")
    done = subprocess.run([sys.executable, "-c", child, str(csv_path)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    message, seconds, peak_kb = done.stdout.splitlines()
    assert re.fullmatch(r"LABELS file .*huge.csv has a line longer than 65536 characters: .*"
                        r"pass LABELS=.*", message)
    assert float(seconds) < 5 and int(peak_kb) < 200 * 1024  # far below the file's 300 MB


@pytest.mark.parametrize("kind, name", [
    ("climbs", "../../x/hostname.png"),
    ("climbs", "sub/../../../x/hostname.png"),
    ("absolute", "{outside}"),             # /tmp/.../x/hostname.png: an absolute path
    ("absolute", "/etc/hostname.png"),
    ("absolute", "\\x\\hostname.png"),     # \\x\\hostname.png: absolute on Windows
    ("absolute", "C:\\x\\hostname.png"),
])
def test_a_row_leaving_data_is_refused_in_one_line(tmp_path, make_config, kind, name):
    """A row naming a file outside DATA must not bind to DATA's file of the same name."""
    hostname = tmp_path / "x" / "hostname.png"  # outside DATA, and one of that name inside
    hostname.parent.mkdir()
    hostname.write_text("outside\n")
    name = name.format(outside=hostname)
    config, before, now = run_extract(tmp_path, make_config, [
        ("a1.png", "a"), ("a2.png", "a"), ("b1.png", "b"), (name, "b")],
        images=("a1.png", "a2.png", "b1.png", "hostname.png"))
    what = "a path that leaves DATA" if kind == "climbs" else "an absolute path"
    with pytest.raises(UserError, match=rf"^\S*l\.csv line 5 names {re.escape(repr(name))}, "
                                        rf"{what}: name each image by its path relative to DATA"):
        extract.run(config)
    assert now() == before
    assert not os.path.exists(os.path.join(config.features_dir, "features.h5"))


def test_an_image_under_two_classes_is_refused_naming_the_files(tmp_path, make_config):
    config, before, now = run_extract(tmp_path, make_config, [
        ("a1.png", "a"), ("a2.png", "a"), ("a2.png", "b"), ("b1.png", "b"), ("b2.png", "b"),
        ("b2.png", "c")])
    with pytest.raises(UserError, match=r"^.*l.csv gives 2 image\(s\) two or more labels: "
                                        r"a2.png \(a, b\); b2.png \(b, c\): keep one row per "
                                        r"image$"):
        extract.run(config)
    assert now() == before


def test_labels_are_one_class_in_nfc_and_nfd(tmp_path, make_config):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    config, before, now = run_extract(tmp_path, make_config, [
        ("a1.png", nfc), ("a2.png", nfd), ("b1.png", "thé"), ("b2.png", "thé")])
    extract.run(config)
    assert now() == before
    with FeatureStore(config.features_dir) as store:
        assert store.class_names == [nfc, unicodedata.normalize("NFC", "thé")]
        assert sorted(store.labels.tolist()) == [0, 0, 1, 1]


def test_a_label_like_a_formula_is_written_as_text_in_predictions(tmp_path, make_config):
    from pipeline import predict, train_head
    names = [f"{c}{i}.png" for c in "ab" for i in range(6)]
    config, before, now = run_extract(tmp_path, make_config, [
        (name, "=HYPERLINK(\"http://x\")" if name[0] == "a" else "@SUM(1)") for name in names],
        images=names)
    config = config.replace(split="50/50/0", head="logreg")
    extract.run(config)
    train_head.run(config)
    before = now()
    result = predict.run(config.replace(images=config.data))
    assert now() == before
    with open(result.path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert {row[1] for row in rows[1:]} <= {"'=HYPERLINK(\"http://x\")", "'@SUM(1)"}
    assert len(rows) == 13 and not any(cell[:1] in "=+-@" for row in rows for cell in row[:2])
    assert escape.csv_cell("-1") == "'-1" and escape.csv_cell("a-b") == "a-b"
