"""Stage four: every trained model scored on the held-out split, with the numbers sklearn gives."""
import os
import shutil

import keras
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score
from trained_run import run_config, shared_trained_run

from pipeline import cache, evaluate, extract, train_head
from pipeline.config import UserError
from pipeline.data import images
from pipeline.fs import artifacts
from pipeline.model import heads
from pipeline.reporting import diagnostics, plots


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_trained_run(tmp_path_factory)


def copy_run(config, root):
    """A private copy of the trained run, for tests that change it."""
    for folder in ("features", "models"):
        shutil.copytree(os.path.join(os.path.dirname(config.features_root), folder),
                        os.path.join(root, folder))
    return config.replace(features_root=os.path.join(root, "features"),
                          models_root=os.path.join(root, "models"))


def expected_probabilities(config, model, store, rows):
    """The model's outputs on the test rows, computed here without evaluate's code."""
    if model == "logreg":
        logreg, _ = heads.load_logreg(artifacts.path(config, artifacts.LOGREG))
        return logreg.predict_proba(store.read(rows).reshape(len(rows), -1))
    if model == "dense":
        head = keras.saving.load_model(artifacts.path(config, artifacts.HEAD))
        return heads.class_probabilities(head.predict(store.read(rows), verbose=0))
    network = keras.saving.load_model(artifacts.path(config, artifacts.FINETUNED))
    batch = np.stack([images.load_image(os.path.join(config.data, p), config.size)
                      for p in store.paths[rows]])
    return heads.class_probabilities(network.predict(batch, verbose=0))


def test_every_model_is_scored_on_the_test_split(run, capsys):
    result = evaluate.run(run)
    report = artifacts.read_json(result.path, "")
    # 5 train, 8 validation, 7 test images: every split is small, and says so with the classes
    out = capsys.readouterr().out
    assert [line.split(" split")[0] for line in report["small_sample"]] == \
        ["the train", "the validation", "the test"]
    for line in report["small_sample"]:
        assert "fewer than 30 images" in line and "horizontal" in line and f"!!! {line}" in out
    for m in report["models"].values():  # the 95% interval of each accuracy
        low, high = m["accuracy_ci95"]
        assert (low, high) == pytest.approx(diagnostics.wilson_interval(
            round(m["accuracy"] * report["images"]), report["images"]))
        assert low <= m["accuracy"] <= high and high - low > 0.3  # 7 images: wide
        assert f"accuracy {m['accuracy']:.3f} (95% interval {low:.3f}-{high:.3f})" in out
    assert result.split == report["split"] == "test"
    assert set(report["models"]) == {"logreg", "dense", "finetuned"}
    with cache.FeatureStore(run.features_dir) as store:
        rows = store.rows("test")
        labels = store.labels[rows]
        for model, m in report["models"].items():
            predicted = expected_probabilities(run, model, store, rows).argmax(axis=1)
            assert m["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-9), model
            assert result.accuracy[model] == m["accuracy"]
            matrix = np.asarray(m["confusion_matrix"])
            assert matrix.shape == (2, 2) and matrix.sum() == len(rows) == report["images"]
            assert np.trace(matrix) == np.sum(predicted == labels)
            assert m["roc_auc"] == pytest.approx(roc_auc_score(
                labels, expected_probabilities(run, model, store, rows)[:, 1]), abs=1e-9)
            assert set(m["classification_report"]) >= {"horizontal", "vertical", "macro avg"}
            assert "precision" in m["classification_report_text"]
            assert m["misclassified_count"] == len(m["misclassified"]) == \
                np.sum(predicted != labels)
            with Image.open(artifacts.path(run, m["confusion_matrix_png"]["file"])) as png:
                assert png.format == "PNG" and png.size[0] > 200
    assert report["identity"] == extract_identity(run)
    assert report["data_root"] == os.path.abspath(run.data)


def extract_identity(config):
    with cache.FeatureStore(config.features_dir) as store:
        return store.identity


def test_missing_models_are_left_out(run, tmp_path):
    config = copy_run(run, tmp_path)
    os.remove(artifacts.path(config, artifacts.FINETUNED))
    os.remove(artifacts.path(config, artifacts.LOGREG))
    report = artifacts.read_json(evaluate.run(config).path, "")
    assert set(report["models"]) == {"dense"}
    assert not [name for name in os.listdir(config.models_dir)  # a gone model's pictures
                if name.startswith(("confusion_finetuned", "curves_logreg"))]


def test_no_model_at_all_names_train_head(image_folder, make_config):
    config = make_config(image_folder, split="50/25/25")
    extract.run(config)
    with pytest.raises(UserError, match="make train-head"):
        evaluate.run(config)


def test_models_of_another_identity_are_refused(run, tmp_path):
    config = copy_run(run, tmp_path)
    extract.run(config.replace(size=64))  # the cache now holds 64-pixel features
    with pytest.raises(UserError, match="^SIZE=32 but .* was extracted with SIZE=64"):
        evaluate.run(config)  # told the size the models were made at
    with pytest.raises(UserError, match="another identity .*image_size"):
        evaluate.run(config.replace(size=None))


def test_validation_stands_in_without_a_test_split(tmp_path):
    config = run_config(str(tmp_path), split="50/50/0", head="logreg")
    from helpers import make_image_folder
    make_image_folder(config.data, per_class=6)
    extract.run(config)
    train_head.run(config)
    result = evaluate.run(config)
    report = artifacts.read_json(result.path, "")
    with cache.FeatureStore(config.features_dir) as store:
        assert len(store.rows("test")) == 0
        assert result.split == "validation" and report["images"] == len(store.rows("validation"))
    assert set(report["models"]) == {"logreg"}


def test_score_multiclass_and_the_most_confident_mistakes_first():
    probabilities = np.array([[0.8, 0.1, 0.1],    # right
                              [0.1, 0.3, 0.6],    # wrong: 2 for 1, 0.6
                              [0.05, 0.9, 0.05],  # wrong: 1 for 2, 0.9
                              [0.2, 0.2, 0.6]])   # right
    labels = np.array([0, 1, 2, 2])
    m = evaluate.score(probabilities, labels, ["a", "b", "c"], np.array(["w", "x", "y", "z"]))
    assert m["accuracy"] == 0.5 and m["roc_auc"] is None
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    assert [e["path"] for e in m["misclassified"]] == ["y", "x"]
    assert m["misclassified"][0] == {"path": "y", "true": "c", "predicted": "b", "probability": 0.9}
    assert m["classification_report"]["c"]["recall"] == 0.5


@pytest.mark.parametrize("classes", [2, 3])
def test_roc_and_precision_recall_are_one_vs_rest_beyond_two_classes(classes):
    rng = np.random.default_rng(0)
    labels = np.arange(30) % classes
    probabilities = rng.dirichlet(np.ones(classes), 30)
    probabilities[np.arange(30), labels] += 0.5  # mostly right
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    names = ["a", "b", "c"][:classes]
    entry, drawn = diagnostics.curves(probabilities, labels, names)
    positives = names[1:] if classes == 2 else names  # two classes: the second is positive
    assert list(entry["roc_auc"]) == [c for c in names if c in positives] and \
        len(drawn) == len(positives)
    for k, name in enumerate(names):
        if name in positives:
            truth = labels == k
            assert entry["roc_auc"][name] == pytest.approx(
                roc_auc_score(truth, probabilities[:, k]))
            assert entry["average_precision"][name] == pytest.approx(
                average_precision_score(truth, probabilities[:, k]))
    assert entry["macro_roc_auc"] == pytest.approx(np.mean(list(entry["roc_auc"].values())))


def test_the_most_confused_pairs_count_both_directions():
    matrix = [[5, 3, 0], [1, 4, 0], [0, 2, 6]]
    pairs = diagnostics.confused_pairs(matrix, ["a", "b", "c"])
    assert [(p["a"], p["b"], p["a_as_b"], p["b_as_a"], p["total"]) for p in pairs] == \
        [("a", "b", 3, 1, 4), ("b", "c", 0, 2, 2)]  # a-c: never confused, not listed
    assert pairs[0]["share"] == pytest.approx(4 / 13)
    two = diagnostics.confused_pairs([[3, 1], [2, 4]], ["x", "y"])
    assert two == [{"a": "x", "b": "y", "a_as_b": 1, "b_as_a": 2, "total": 3, "share": 0.3}]


@pytest.mark.parametrize("classes", [2, 40])
def test_confusion_matrix_figure_grows_with_the_classes(tmp_path, classes):
    names = [f"class_{i:02d}" for i in range(classes)]
    matrix = np.diag(np.arange(1, classes + 1))
    path = str(tmp_path / "cm.png")
    fig = plots.plot_confusion_matrix(matrix, names, path, title="t")
    width, height = fig.get_size_inches()
    assert (width > 15) == (classes == 40) and height > 4
    with Image.open(path) as png:
        assert png.format == "PNG"


def test_the_projection_reads_a_fixed_sample_that_keeps_every_mistake(run):
    with cache.FeatureStore(run.features_dir) as store:
        marked = store.rows("test")[:3]
        entry, points, labels, mask = diagnostics.projection(store, marked, seed=0, cap=8)
        again = diagnostics.projection(store, marked, seed=0, cap=8)[1]
        assert labels.shape == (8,) and set(labels.tolist()) <= {0, 1}
    assert entry["rows"] == 8 and entry["of"] == 20 and entry["marked"] == mask.sum() == 3
    assert points.shape == (8, 2) and len(entry["explained_variance"]) == 2
    np.testing.assert_array_equal(points, again)  # the same seed, the same rows and points


def test_the_wilson_interval_stays_in_range_and_matches_known_values():
    assert diagnostics.wilson_interval(6, 8) == pytest.approx((0.4093, 0.9285), abs=1e-4)
    assert diagnostics.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert diagnostics.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert diagnostics.wilson_interval(0, 0) == (0.0, 1.0)
    low, high = diagnostics.wilson_interval(780, 1000)  # many images: narrow, around 0.78
    assert 0.75 < low < 0.78 < high < 0.81


def test_a_split_is_small_below_30_images_of_a_class():
    labels = [0] * 40 + [1] * 29 + [0] * 30 + [1] * 30
    splits = ["train"] * 69 + ["test"] * 60
    assert diagnostics.small_splits(labels, splits, ["cats", "dogs"]) == [
        "the train split has fewer than 30 images of a class (dogs 29): its accuracy is "
        "uncertain by several points, see the 95% interval"]


def test_ties_are_equal_accuracies_at_the_shown_precision():
    accuracies = {"logreg": 0.75, "dense": 0.7500001, "finetuned": 0.625}
    assert diagnostics.tied_with(accuracies, "logreg") == ["dense"]
    assert diagnostics.tied_with({**accuracies, "dense": 0.7494}, "logreg") == []  # 0.749
