"""What models/<NAME> and features/<NAME> hold is untrusted: a model is scored only on the split
it was trained on, its arrays and recorded identity are checked, the directory walk opens
nothing that could block, and temporary files left by a kill are cleaned.

Each test checks that the files outside features/<NAME> and models/<NAME> are unchanged, the
outcome, the one line the user reads, and that the run after the refusal is clean.
"""
import json
import os

import h5py
import numpy as np
import pytest
from helpers import edit_json, make_image_folder
from test_hostile_models import finishes, outside

from pipeline import batch, cache, evaluate, export, extract, predict, train_head
from pipeline.config import UserError
from pipeline.fs import artifacts, lock
from pipeline.model import registry

VICTIM = b"a file of the user's, outside features/ and models/\n"


@pytest.fixture
def trained(prepared, tmp_path):
    """10 tiny images a class extracted (SPLIT=40/30/30), logreg trained on them, a victim."""
    (tmp_path / "victim.txt").write_bytes(VICTIM)
    return prepared((extract.run, train_head.run), per_class=10, split="40/30/30", epochs=1,
                    name="tiny", head="logreg", finetune_from="images")


# --------------------------------------------------------------------------------------------
# 3: a model is scored on the split it was trained on
# --------------------------------------------------------------------------------------------

def test_a_model_trained_on_another_split_is_refused(trained, tmp_path):
    """Trained, re-extracted with another SPLIT: evaluate scored logreg on a test split half
    made of its training rows (accuracy 1.000)."""
    resplit = trained.replace(split="80/10/10")
    extract.run(resplit)
    before = outside(resplit, tmp_path)
    model = registry.path(resplit, "logreg")

    with pytest.raises(UserError, match=f"^{model} was trained on another split than "
                                        f"{resplit.features_dir}'s: its test rows may be "
                                        "training rows; rerun `make train-head`$"):
        evaluate.run(resplit)
    assert outside(resplit, tmp_path) == before
    assert not os.path.exists(artifacts.path(resplit, artifacts.EVALUATION))
    # predicting new images scores nothing on the splits: the model still serves
    assert predict.run(resplit.replace(images=resplit.data, model="logreg")).predicted > 0
    train_head.run(resplit)
    assert set(evaluate.run(resplit).accuracy) == {"logreg"}  # the run after is clean


def test_a_dense_run_does_not_keep_a_logreg_of_another_split(trained, tmp_path):
    """HEAD=dense keeps the logreg entry of head_metrics.json: not when its split was another."""
    resplit = trained.replace(split="80/10/10", head="dense")
    extract.run(resplit)
    train_head.run(resplit)
    with pytest.raises(UserError, match="logreg.npz is not the file its metrics describe"):
        registry.record(resplit, "logreg")
    registry.record(resplit, "dense")


def test_a_model_that_records_no_split_is_refused(trained, tmp_path):
    metrics = artifacts.path(trained, artifacts.HEAD_METRICS)
    edit_json(metrics, lambda m: m.pop("split_digest", None))
    before = outside(trained, tmp_path)
    model = registry.path(trained, "logreg")

    with pytest.raises(UserError, match=f"^{model} records no split \\(made by an earlier "
                                        "version\\): its test rows may be training rows; "
                                        "rerun `make train-head`$"):
        evaluate.run(trained)
    assert outside(trained, tmp_path) == before
    train_head.run(trained)
    assert set(evaluate.run(trained).accuracy) == {"logreg"}


# --------------------------------------------------------------------------------------------
# 4: the other values read back
# --------------------------------------------------------------------------------------------

def test_a_logreg_of_the_wrong_shape_is_one_line(trained, tmp_path):
    """coef of 10 features for 512: a ValueError traceback from inside scikit-learn."""
    model = registry.path(trained, "logreg")
    with np.load(model, allow_pickle=False) as arrays:
        arrays = dict(arrays)
    arrays["coef"] = arrays["coef"][:, :10]
    with open(model, "wb") as f:
        np.savez(f, **arrays)
    edit_json(artifacts.path(trained, artifacts.HEAD_METRICS),  # as its writer would
              lambda m: m["models"]["logreg"].update(file_sha256=artifacts.file_sha256(model)))
    before = outside(trained, tmp_path)

    with pytest.raises(UserError, match=rf"^{model} cannot be loaded safely \(ValueError: coef "
                                        r"is float\d+ of shape \(1, 10\), not numbers of shape "
                                        r"\(1, 512\)\): rerun `make train-head`$"):
        evaluate.run(trained)
    assert outside(trained, tmp_path) == before
    train_head.run(trained)
    assert set(evaluate.run(trained).accuracy) == {"logreg"}


def test_an_image_size_out_of_range_in_a_model_is_refused(trained, tmp_path):
    metrics = artifacts.path(trained, artifacts.HEAD_METRICS)
    edit_json(metrics, lambda m: m["identity"].update(image_size=1500))
    before = outside(trained, tmp_path)

    with pytest.raises(UserError, match=f"^{metrics} is damaged or not written by this pipeline "
                                        r"\(identity.image_size is 1500, not an integer from 32 "
                                        r"to 1024\): rerun `make train-head`$"):
        predict.run(trained.replace(images=trained.data, model="logreg"))
    assert outside(trained, tmp_path) == before
    train_head.run(trained)
    assert registry.record(trained, "logreg").identity["image_size"] == 32


def test_an_image_size_out_of_range_in_the_cache_is_refused_then_rebuilt(trained, tmp_path):
    master = os.path.join(trained.features_dir, cache.MASTER)
    with h5py.File(master, "r+") as f:
        identity = json.loads(f.attrs["identity"])
        f.attrs["identity"] = json.dumps({**identity, "image_size": 1500})
    before = outside(trained, tmp_path)

    with pytest.raises(UserError, match=f"^{master} is damaged or not written by this pipeline "
                                        r"\(its identity's image_size is 1500, not an integer "
                                        r"from 32 to 1024\): run `make extract` to rebuild it$"):
        train_head.run(trained)
    assert outside(trained, tmp_path) == before
    rebuilt = extract.run(trained)
    assert (rebuilt.new, rebuilt.changed) == (0, True)
    with cache.FeatureStore(trained.features_dir) as store:
        assert store.identity["image_size"] == 32


# --------------------------------------------------------------------------------------------
# 5: the walk opens nothing that could block
# --------------------------------------------------------------------------------------------

def test_sniffing_never_blocks_on_a_fifo_that_stat_called_a_file(tmp_path, monkeypatch):
    """Between the walk's stat and the sniff's open a file can become a FIFO (and /proc/kmsg,
    a regular file to stat, blocks a read): the sniff opens without blocking, checks what it
    opened, and reads nothing of what the file system says is empty."""
    folder = make_image_folder(tmp_path / "images", per_class=2)
    fifo = os.path.join(folder, "horizontal", "photo")  # no extension: sniffed
    os.mkfifo(fifo)
    empty = os.path.join(folder, "horizontal", "empty")
    open(empty, "wb").close()
    from pipeline.data import datasets
    monkeypatch.setattr(datasets, "not_regular_reason", lambda path: None)  # the race, lost

    assert finishes(lambda: datasets.sniff_format(fifo), [fifo], seconds=20) is None
    assert datasets.sniff_format(empty) is None
    walked = dict(finishes(lambda: list(datasets.walk_files(folder)), [fifo], seconds=20))
    assert walked["horizontal/photo"] == "not a regular file (FIFO)"
    assert walked["horizontal/horizontal_00.jpg"] is None


# --------------------------------------------------------------------------------------------
# 6: the temporary files a kill -9 leaves in models/<NAME> and beside OUT
# --------------------------------------------------------------------------------------------

def test_a_writer_of_models_removes_the_temporaries_a_killed_one_left(trained, tmp_path):
    folder = trained.models_dir
    ours = [os.path.join(folder, name) for name in (
        ".head_metrics.json.1a2b3c4d.tmp", ".logreg.npz.0badf00d.tmp",
        ".head.keras.deadbeef.tmp.keras")]  # files.replacing_path's, for Keras
    theirs = [os.path.join(folder, name) for name in (
        "notes.tmp", ".head_metrics.json.tmp", ".predictions.csv.89abcdef.tmp")]  # the last:
    for path in ours + theirs:                                      # predict's, lockless
        with open(path, "wb") as f:
            f.write(b"left by a kill -9")
    link = os.path.join(folder, ".evaluation.json.fedcba98.tmp")
    os.symlink(tmp_path / "victim.txt", link)
    before = outside(trained, tmp_path)

    result = evaluate.run(trained)  # a writer of models/<NAME>, as train-head, finetune, report

    assert outside(trained, tmp_path) == before
    assert [os.path.exists(p) for p in ours + theirs] == [False] * 3 + [True] * 3
    assert os.path.islink(link)  # left, and never followed
    assert set(result.accuracy) == {"logreg"}
    assert set(lock.UNLOCKED) == {artifacts.PREDICTIONS, predict.SKIPPED, batch.STATE}


def test_an_export_removes_only_its_own_temporaries_beside_out(trained, tmp_path):
    out = tmp_path / "exports" / "tiny.h5"
    out.parent.mkdir()
    ours = out.parent / ".tiny.h5.1a2b3c4d.tmp"
    theirs = [out.parent / ".other.h5.1a2b3c4d.tmp", out.parent / "notes.tmp"]
    for path in [ours, *theirs]:
        path.write_bytes(b"left by a kill -9")
    before = outside(trained, tmp_path)

    export.run(trained.replace(out=str(out)))

    after = outside(trained, tmp_path)
    assert after.keys() - before.keys() == {str(out)} and before.keys() - after.keys() == {
        str(ours)}
    assert all(after[path] == before[path] for path in before if path != str(ours))
    with h5py.File(out, "r") as f:
        assert len(f["label"]) == 20
