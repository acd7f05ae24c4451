"""Prediction on new pictures: the CSV holds exactly the model's outputs, bad files are reported."""
import csv
import errno
import os
import shutil

import keras
import numpy as np
import pytest
from trained_run import shared_trained_run

from pipeline import __main__ as cli
from pipeline import predict
from pipeline.config import UserError
from pipeline.data import images
from pipeline.fs import artifacts, files
from pipeline.model import backbone, heads


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_trained_run(tmp_path_factory)


def read_predictions(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows


def direct_probabilities(config, model, paths):
    """What the saved model gives for these files, by the book: load_image, then Keras/sklearn."""
    batch = np.stack([images.load_image(p, config.size) for p in paths])
    if model == "finetuned":
        network = keras.saving.load_model(artifacts.path(config, artifacts.FINETUNED))
        return heads.class_probabilities(network.predict(batch, verbose=0))
    base = backbone.build_backbone(backbone.resolve_weights("none"), config.size)
    features = base.predict(batch, verbose=0)
    if model == "dense":
        head = keras.saving.load_model(artifacts.path(config, artifacts.HEAD))
        return heads.class_probabilities(head.predict(features, verbose=0))
    return heads.load_logreg(artifacts.path(config, artifacts.LOGREG))[0].predict_proba(
        features.reshape(len(features), -1))


@pytest.mark.parametrize("model", ["finetuned", "dense", "logreg"])
def test_predictions_equal_the_models_outputs(run, model):
    # 20 images in batches of 4, walked recursively through the two class folders
    result = predict.run(run.replace(images=run.data, model=model))
    rows = read_predictions(result.path)
    assert result.model == model and result.predicted == len(rows) == 20 and result.skipped == 0
    paths = [row["path"] for row in rows]
    assert paths == sorted(paths) and all(p.startswith(run.data) for p in paths)
    got = np.array([[float(row["p_horizontal"]), float(row["p_vertical"])] for row in rows])
    expected = direct_probabilities(run, model, paths)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert [row["predicted"] for row in rows] == [["horizontal", "vertical"][i]
                                                  for i in expected.argmax(axis=1)]
    assert sum(result.counts.values()) == 20


def test_auto_picks_the_best_validation_accuracy(run, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(os.path.dirname(run.models_dir), models)
    config = run.replace(models_root=str(models), images=os.path.join(run.data, "vertical"))
    records = predict.trained_models(config)
    best = max(records, key=lambda m: (records[m].validation["accuracy"], predict.PREFERENCE[m]))
    assert predict.run(config).model == best
    # make the logistic regression clearly the best: auto follows the metrics (1.5, out of
    # range, would be refused: test_hostile_models)
    metrics_path = artifacts.path(config, artifacts.HEAD_METRICS)
    metrics = artifacts.read_json(metrics_path, "")
    metrics["models"]["logreg"]["validation"]["accuracy"] = 1.0
    metrics["models"]["dense"]["validation"]["accuracy"] = 0.0
    artifacts.write_json(metrics_path, metrics)
    finetune_path = artifacts.path(config, artifacts.FINETUNE_METRICS)
    finetune = artifacts.read_json(finetune_path, "")
    finetune["validation"]["accuracy"] = 0.0
    artifacts.write_json(finetune_path, finetune)
    assert predict.run(config).model == "logreg"
    os.remove(artifacts.path(config, artifacts.LOGREG))
    assert predict.run(config).model in {"dense", "finetuned"}


def test_bad_files_are_skipped_and_reported(run, tmp_path, capsys):
    folder = tmp_path / "new" / "deeper"
    folder.mkdir(parents=True)
    for name in ("a.jpg", "b.png"):
        shutil.copy(os.path.join(run.data, "horizontal", "horizontal_00.jpg"), folder / name)
    (folder / "broken.jpg").write_bytes(b"this is not a picture")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image at all")
    (folder / ".hidden.jpg").write_bytes(b"ignored")
    result = predict.run(run.replace(images=str(tmp_path / "new"), model="finetuned"))
    rows = read_predictions(result.path)
    assert [os.path.basename(r["path"]) for r in rows] == ["a.jpg", "b.png"]
    assert result.skipped == 2
    skipped = read_predictions(artifacts.path(run, predict.SKIPPED))
    assert {os.path.basename(r["path"]): r["reason"] for r in skipped}["empty.jpg"] == \
        "empty file (0 bytes)"
    assert {os.path.basename(r["path"]) for r in skipped} == {"broken.jpg", "empty.jpg"}
    out = capsys.readouterr().out
    assert "skipped 2 file(s)" in out and "1 other files ignored" in out and "a.jpg" in out


def test_a_single_file(run):
    path = os.path.join(run.data, "vertical", "vertical_03.jpg")
    result = predict.run(run.replace(images=path, model="dense"))
    rows = read_predictions(result.path)
    assert [r["path"] for r in rows] == [path]
    np.testing.assert_allclose([float(rows[0]["p_horizontal"]), float(rows[0]["p_vertical"])],
                               direct_probabilities(run, "dense", [path])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target, model, message", [
    ("", "auto", "pass IMAGES="),
    ("missing", "auto", "does not exist"),
    ("empty_folder", "auto", "no images in"),
    ("text_file", "auto", "is not an image file"),
    ("data", "best", "MODEL='best' is not one of"),
])
def test_clear_errors(run, tmp_path, target, model, message):
    (tmp_path / "empty_folder" / "sub").mkdir(parents=True)
    (tmp_path / "empty_folder" / "sub" / "readme.txt").write_text("no pictures here")
    (tmp_path / "text_file").write_text("hello")
    images_arg = {"": "", "data": run.data}.get(target, str(tmp_path / target))
    with pytest.raises(UserError, match=message):
        predict.run(run.replace(images=images_arg, model=model))


def test_a_missing_model_or_no_model(run, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(os.path.dirname(run.models_dir), models)
    config = run.replace(models_root=str(models), images=run.data)
    os.remove(artifacts.path(config, artifacts.FINETUNED))
    with pytest.raises(UserError, match="no finetuned model.*make finetune"):
        predict.run(config.replace(model="finetuned"))
    shutil.rmtree(config.models_dir)
    with pytest.raises(UserError, match="make train-head"):
        predict.run(config)


def test_command_line(run, capsys):
    argv = ["predict", "--data", run.data, "--name", run.name, "--size", "32", "--batch-size", "4",
            "--features-root", run.features_root, "--models-root", run.models_root,
            "--images", os.path.join(run.data, "horizontal"), "--model", "logreg"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "horizontal_00.jpg" in out
    assert len(read_predictions(artifacts.path(run, artifacts.PREDICTIONS))) == 10
    assert cli.main(argv[:-4] + ["--images", os.path.join(run.data, "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_out_names_the_file_and_the_default_table_is_kept(run, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(os.path.dirname(run.models_dir), models)
    config = run.replace(models_root=str(models), images=run.data, model="dense")
    default = predict.run(config)
    before = open(default.path).read()
    capsys.readouterr()  # the table of the run above
    one = os.path.join(run.data, "vertical", "vertical_03.jpg")
    out = str(tmp_path / "one.csv")
    result = predict.run(config.replace(images=one, out=out, top_k=2))
    assert result.path == out and [r["path"] for r in read_predictions(out)] == [one]
    assert os.path.isfile(str(tmp_path / "one_skipped.csv"))
    assert open(default.path).read() == before  # the 20-row table is still there
    # the table: the two classes of the image, most likely first, "!" before an unlike image
    row = read_predictions(out)[0]
    order = sorted(["horizontal", "vertical"], key=lambda c: -float(row[f"p_{c}"]))
    line = next(x for x in capsys.readouterr().out.splitlines() if "vertical_03.jpg " in x)
    assert line.split()[-4::2] == order
    assert ("!" in line.split()) == (row["unlike_training"] == "1")
    for bad, message in (("table.txt", "OUT=.*table.txt: predict writes a CSV"),
                         ("nowhere/x.csv", "the folder .*nowhere does not exist")):
        with pytest.raises(UserError, match=message):
            predict.run(config.replace(out=str(tmp_path / bad)))
    with pytest.raises(UserError, match="TOP_K=0 is out of range"):
        config.replace(top_k=0)


def test_a_full_disk_at_the_end_keeps_both_old_files(run, tmp_path, monkeypatch):
    """predictions.csv and its skipped list are one commit: both are written whole before
    either replaces the last run's, so a disk that fills at the end leaves the last run's
    pair, never a new table beside an old list."""
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, bad in ((old, "broken.jpg"), (new, "other.jpg")):
        folder.mkdir()
        shutil.copy(os.path.join(run.data, "horizontal", "horizontal_00.jpg"), folder / "a.jpg")
        (folder / bad).write_bytes(b"not a picture")
    out = str(tmp_path / "p.csv")
    config = run.replace(model="dense", out=out)
    predict.run(config.replace(images=str(old)))
    pair = [out, str(tmp_path / "p_skipped.csv")]
    before = [open(path).read() for path in pair]
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills as the table itself is flushed
        if ".p.csv." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(files.NoSpace, match="^no space left on the disk"):
        predict.run(config.replace(images=str(new)))
    assert [open(path).read() for path in pair] == before
    assert not [name for name in os.listdir(tmp_path) if files.temporary_of(name)]
