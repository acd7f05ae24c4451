"""Many classes end to end: softmax heads, per-class metrics, a confusion matrix that stays
readable."""
import json

import keras
import numpy as np
import pytest
from helpers import make_image_folder
from PIL import Image

from pipeline import evaluate, extract, finetune, train_head
from pipeline import report as report_stage
from pipeline.cache import FeatureStore
from pipeline.fs import artifacts
from pipeline.model import heads
from pipeline.reporting import plots

CLASSES = ("cat", "dog", "golden retriever")


def test_three_classes_end_to_end(tmp_path, make_config):
    data = make_image_folder(tmp_path / "data", classes=CLASSES, per_class=6)
    config = make_config(data, split="34/33/33")  # a few test images of each class
    assert extract.run(config).rows == 18
    train_head.run(config)
    finetune.run(config)
    evaluate.run(config)

    with FeatureStore(config.features_dir) as store:
        assert store.class_names == list(CLASSES)
        features = store.read(np.arange(len(store)))
    head = keras.saving.load_model(artifacts.path(config, artifacts.HEAD), compile=False)
    assert head.layers[-1].activation.__name__ == "softmax"
    probabilities = head.predict(features, verbose=0)
    assert probabilities.shape == (18, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    logreg, _ = heads.load_logreg(artifacts.path(config, artifacts.LOGREG))
    assert logreg.predict_proba(features.reshape(18, -1)).shape == (18, 3)
    tuned = keras.saving.load_model(artifacts.path(config, artifacts.FINETUNED), compile=False)
    assert tuned.output_shape == (None, 3)

    with open(artifacts.path(config, artifacts.EVALUATION)) as f:
        report = json.load(f)
    assert report["class_names"] == list(CLASSES)
    assert set(report["models"]) == {"logreg", "dense", "finetuned"}
    for _, scores in report["models"].items():
        per_class = scores["classification_report"]
        assert all(set(per_class[c]) >= {"precision", "recall", "f1-score", "support"}
                   for c in CLASSES)
        matrix = np.asarray(scores["confusion_matrix"])
        assert matrix.shape == (3, 3) and matrix.sum() == report["images"]
        assert scores["roc_auc"] is None  # binary only
        png = artifacts.path(config, scores["confusion_matrix_png"]["file"])
        with Image.open(png) as image:
            assert image.format == "PNG"
        # one-vs-rest: a curve, an AUC and an average precision per class
        curves = scores["curves"]
        assert set(curves["roc_auc"]) == set(curves["average_precision"]) == set(CLASSES)
        present = [v for v in curves["roc_auc"].values() if v is not None]  # classes in the split
        assert all(0 <= v <= 1 for v in present)
        assert curves["macro_roc_auc"] == (pytest.approx(np.mean(present)) if present else None)
        assert len(scores["confused_pairs"]) <= 3  # of the three pairs, those with mistakes
    result = report_stage.run(config)  # a curves picture per model, each inline
    text = open(result.path).read()
    assert "One-vs-rest: each class against all the others" in text
    assert "ROC and precision-recall curves" in result.sections
    for model in report["models"]:  # every class in the test split has a curve
        assert f"![ROC and precision-recall, {report_stage.TITLES[model]}](curves_{model}-" in text


def test_dozens_of_classes_with_few_images_each(tmp_path, make_config):
    # Split folders (layout b), so every class surely has training images: with two images a
    # class, content-hash splits would leave some classes out of train.
    classes = tuple(f"class {i:02d}" for i in range(30))
    make_image_folder(tmp_path / "data" / "train", classes=classes, per_class=2, pixels=32)
    make_image_folder(tmp_path / "data" / "validation", classes=classes, per_class=1, pixels=32,
                      seed=1)
    config = make_config(tmp_path / "data", head="dense", epochs=2)  # logreg: ~40 s for 30 classes
    assert extract.run(config).rows == 90
    train_head.run(config)
    result = evaluate.run(config)

    with open(result.path) as f:
        report = json.load(f)
    scores = report["models"]["dense"]
    assert np.asarray(scores["confusion_matrix"]).shape == (30, 30)
    assert set(classes) <= set(scores["classification_report"])
    png = artifacts.path(config, scores["confusion_matrix_png"]["file"])
    two = plots.plot_confusion_matrix([[1, 0], [0, 1]], ["a", "b"], str(tmp_path / "two.png"))
    with Image.open(png) as image:  # the figure grows with the class count, so labels fit
        assert image.size[0] > two.get_size_inches()[0] * two.dpi * 1.5
        assert image.size[1] > two.get_size_inches()[1] * two.dpi * 1.5
