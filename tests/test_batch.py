"""`make batch`: many datasets, a summary, failures recorded, and reruns that cost only what
changed."""
import csv
import errno
import os

import pytest
from helpers import make_image_folder

from pipeline import batch
from pipeline.__main__ import main
from pipeline.config import Config, UserError
from pipeline.fs import artifacts, files
from pipeline.model import registry


def summary_rows(result):
    with open(result.csv_path, newline="") as f:
        return {row["dataset"]: row for row in csv.DictReader(f)}


def summary_accuracies(row, models):
    return {(m, split): row[f"{m}_{split}_accuracy"] for m in models
            for split in ("validation", "test")}


def stage_accuracies(config, models):
    """The summary's figures, from the files the stages wrote: validation accuracy from
    training, test accuracy from evaluate, rounded as the summary rounds them."""
    evaluation = artifacts.read_json(artifacts.path(config, artifacts.EVALUATION), "")
    assert evaluation["split"] == "test"
    return {(m, split): str(round(accuracy, 4)) for m in models for split, accuracy in (
        ("validation", registry.record(config, m).validation["accuracy"]),
        ("test", evaluation["models"][m]["accuracy"]))}


def mtime(config, name, filename):
    return os.stat(os.path.join(config.models_root, name, filename)).st_mtime_ns


# --------------------------------------------------------------------------------------------
# The list of datasets
# --------------------------------------------------------------------------------------------

def test_jobs_from_datasets_and_a_batch_file(tmp_path, make_config):
    batch_file = tmp_path / "datasets.txt"
    batch_file.write_text("# my datasets\n\n"
                          "data/birds\n"
                          "data/cars   vehicles   # a name\n"
                          "'data/my photos' photos photos.csv\n")
    config = make_config("unused", datasets=("x/flowers/",), batch_file=str(batch_file),
                         labels="labels.csv")
    assert batch.jobs_of(config) == [
        batch.Job("x/flowers/", "flowers", "labels.csv"),
        batch.Job("data/birds", "birds", "labels.csv"),
        batch.Job("data/cars", "vehicles", "labels.csv"),
        batch.Job("data/my photos", "photos", "photos.csv"),   # its own labels CSV
    ]


@pytest.mark.parametrize("datasets, lines, message", [
    ((), None, "nothing to do"),
    (("a/data", "b/data"), None, "two datasets are named 'data'"),
    ((), "a x\nb x\n", "two datasets are named 'x'"),
    ((), "a b c vgg16 e\n", "line 1 has 5 fields"),
    ((), "a ../up\n", "is not a dataset name"),
])
def test_unusable_dataset_lists(tmp_path, make_config, datasets, lines, message):
    batch_file = ""
    if lines is not None:
        batch_file = str(tmp_path / "list.txt")
        with open(batch_file, "w") as f:
            f.write(lines)
    with pytest.raises(UserError, match=message):
        batch.jobs_of(make_config("unused", datasets=datasets, batch_file=batch_file))


def test_a_missing_batch_file(make_config):
    with pytest.raises(UserError, match="BATCH_FILE 'nope.txt' does not exist"):
        batch.run(make_config("unused", batch_file="nope.txt"))


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------

@pytest.mark.heavy
def test_two_datasets_then_reruns_cost_only_what_changed(tmp_path, make_config):
    first = make_image_folder(tmp_path / "first", per_class=6, seed=0)
    second = make_image_folder(tmp_path / "second", per_class=5, seed=2)
    config = make_config("unused", datasets=(first, second), finetune=False, split="50/25/25")

    result = batch.run(config)
    rows = summary_rows(result)
    assert list(rows) == ["first", "second"]
    for name, images in (("first", 12), ("second", 10)):
        row = rows[name]
        assert (row["status"], row["classes"], row["images"], row["new_images"]) == \
            ("trained", "2", str(images), str(images))
        assert row["class_names"] == "horizontal; vertical" and row["error"] == ""
        assert summary_accuracies(row, ("logreg", "dense")) == \
            stage_accuracies(config.replace(data=first if name == "first" else second, name=name),
                             ("logreg", "dense"))
        assert row["finetuned_validation_accuracy"] == "" and row["finetune_s"] == ""
        assert float(row["extract_s"]) > 0 and float(row["train_head_s"]) > 0
    markdown = open(result.md_path).read()
    assert "| first | vgg16 | trained | 2: horizontal, vertical | 12 |" in markdown

    # Add two images to the first dataset only: it extracts those two and retrains; the
    # second is skipped entirely, its models untouched.
    make_image_folder(tmp_path / "more", per_class=1, seed=7)
    for class_name in ("horizontal", "vertical"):
        os.replace(tmp_path / "more" / class_name / f"{class_name}_00.jpg",
                   tmp_path / "first" / class_name / "added.jpg")
    head_time = mtime(config, "second", artifacts.HEAD)
    rerun = summary_rows(batch.run(config))
    assert (rerun["first"]["status"], rerun["first"]["images"], rerun["first"]["new_images"]) == \
        ("trained", "14", "2")
    assert (rerun["second"]["status"], rerun["second"]["new_images"]) == ("unchanged", "0")
    assert rerun["second"]["train_head_s"] == rerun["second"]["evaluate_s"] == ""
    assert rerun["second"]["dense_test_accuracy"] == rows["second"]["dense_test_accuracy"]
    assert mtime(config, "second", artifacts.HEAD) == head_time

    # A setting that shapes the models retrains without extracting; FORCE=1 retrains anyway.
    second_only = config.replace(datasets=(second,), epochs=2)
    again = summary_rows(batch.run(second_only))["second"]
    assert (again["status"], again["new_images"]) == ("trained", "0")
    assert mtime(config, "second", artifacts.HEAD) != head_time
    assert summary_rows(batch.run(second_only))["second"]["status"] == "unchanged"
    assert summary_rows(batch.run(second_only.replace(force=True)))["second"]["status"] == "trained"


def test_a_failing_dataset_does_not_stop_the_others(tmp_path, capsys):
    good = make_image_folder(tmp_path / "good", per_class=6)
    one_class = make_image_folder(tmp_path / "lonely", classes=("only",), per_class=3)
    missing = str(tmp_path / "missing")
    out = tmp_path / "out"
    code = main(["batch", "--datasets", missing, good, one_class, "--finetune", "0",
                 "--weights", "none", "--size", "32", "--batch-size", "4", "--epochs", "2",
                 "--split", "50/25/25", "--features-root", str(out / "features"),
                 "--models-root", str(out / "models")])
    assert code == 2  # the batch as a whole failed ...
    assert "2 of 3 datasets failed (missing, lonely)" in capsys.readouterr().err
    with open(out / "models" / batch.SUMMARY_CSV, newline="") as f:
        rows = {row["dataset"]: row for row in csv.DictReader(f)}
    assert [rows[n]["status"] for n in ("missing", "good", "lonely")] == \
        ["failed", "trained", "failed"]  # ... but the good dataset ran, after the failure
    assert "does not exist" in rows["missing"]["error"]
    assert "1 class folder" in rows["lonely"]["error"]
    good_config = Config(data=good, weights="none", augment=0, size=32, batch_size=4, epochs=2,
                         split="50/25/25", features_root=str(out / "features"),
                         models_root=str(out / "models"))
    assert summary_accuracies(rows["good"], ("logreg", "dense")) == \
        stage_accuracies(good_config, ("logreg", "dense"))
    assert rows["good"]["error"] == ""
    markdown = (out / "models" / batch.SUMMARY_MD).read_text()
    assert "| missing | vgg16 | failed |" in markdown and "1 class folder" in markdown


def test_csv_labels_and_fine_tuning_in_a_batch(tmp_path, make_config):
    # A flat folder with a labels CSV, named in BATCH_FILE's third column; FINETUNE on.
    make_image_folder(tmp_path / "classes", per_class=6)
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = []
    for class_name in ("horizontal", "vertical"):
        for i in range(6):
            os.replace(tmp_path / "classes" / class_name / f"{class_name}_{i:02d}.jpg",
                       flat / f"{class_name}_{i:02d}.jpg")
            rows.append(f"{class_name}_{i:02d}.jpg,{class_name} stripes")
    rows[0] = rows[0].replace(".jpg", ".jpeg")      # extension mismatch: still used
    rows[-1] = "gone.jpg,vertical stripes"          # a missing file, and an unlabelled image
    (flat / "labels.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "list.txt").write_text(f"{flat} stripes labels.csv\n")

    result = batch.run(make_config("unused", batch_file=str(tmp_path / "list.txt"),
                                   split="50/25/25"))
    row = summary_rows(result)["stripes"]
    assert row["status"] == "trained" and \
        row["class_names"] == "horizontal stripes; vertical stripes"
    assert (row["images"], row["skipped"], row["missing_files"], row["unlabelled"]) == \
        ("11", "2", "1", "1")
    stripes = make_config(str(flat), name="stripes", split="50/25/25")
    assert summary_accuracies(row, registry.NAMES) == stage_accuracies(stripes, registry.NAMES)
    assert float(row["finetune_s"]) > 0
    assert os.path.exists(os.path.join(os.path.dirname(result.csv_path), "stripes",
                                       artifacts.FINETUNED))
    assert "11 | 2 (1 / 1)" in open(result.md_path).read()


def test_a_run_that_fails_midway_is_not_taken_as_up_to_date(tmp_path, make_config, monkeypatch):
    from pipeline import train_head
    data = make_image_folder(tmp_path / "only", per_class=6)
    config = make_config("unused", datasets=(data,), finetune=False, split="50/25/25", epochs=2)
    assert summary_rows(batch.run(config))["only"]["status"] == "trained"

    def boom(config):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(train_head, "run", boom)
    with pytest.raises(batch.BatchFailed, match="1 of 1 datasets failed") as failed:
        batch.run(config.replace(force=True))
    row = failed.value.result.rows[0]
    assert (row["status"], row["error"]) == ("failed", "RuntimeError: out of memory")
    monkeypatch.undo()
    # Nothing about the data changed, but the last run did not finish: train again.
    assert summary_rows(batch.run(config))["only"]["status"] == "trained"


def test_a_full_disk_writing_the_summary_keeps_both_old_files(tmp_path, monkeypatch):
    """batch_summary.csv and .md are one commit: both are written whole before either
    replaces the last run's, so a disk that fills at the end leaves the last run's pair."""
    def summary(dataset):
        row = dict.fromkeys(batch.COLUMNS, "")
        row.update(dataset=dataset, status="failed", error="no images")
        return batch.BatchResult([row], str(tmp_path / batch.SUMMARY_CSV),
                                 str(tmp_path / batch.SUMMARY_MD))
    batch.write_summary(summary("first"))
    pair = [str(tmp_path / batch.SUMMARY_CSV), str(tmp_path / batch.SUMMARY_MD)]
    before = [open(path).read() for path in pair]
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills as the markdown table is flushed
        if f".{batch.SUMMARY_MD}." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(files.NoSpace, match="^no space left on the disk"):
        batch.write_summary(summary("second"))
    assert [open(path).read() for path in pair] == before
    assert not [name for name in os.listdir(tmp_path) if files.temporary_of(name)]
