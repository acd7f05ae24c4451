"""CLASS_WEIGHT=auto|balanced|none: which classes are weighed and by how much, and that the dense
head, logreg and fine-tuning (from the cache and from the images) train with those weights and
record them."""
import os

import keras
import numpy as np
import pytest
from helpers import copy_folders, make_image_folder, tiny_config

from pipeline import extract, finetune, train_head
from pipeline.cache import FeatureStore
from pipeline.config import Config, UserError
from pipeline.fs import artifacts
from pipeline.model import heads

NAMES = ["a", "b"]


def test_auto_weighs_past_one_and_a_half_times_balanced_always_none_never():
    four_to_one = [0] * 8 + [1] * 2
    weights, record = heads.class_weights("auto", four_to_one, NAMES)
    assert weights == pytest.approx({0: 10 / 16, 1: 10 / 4})  # images / (classes x its images)
    assert record == {"setting": "auto", "train_images": {"a": 8, "b": 2},
                      "weights": pytest.approx({"a": 0.625, "b": 2.5})}
    assert heads.class_weights("auto", [0] * 6 + [1] * 4, NAMES)[0] is None  # 1.5x: not more
    assert heads.class_weights("auto", [0] * 7 + [1] * 4, NAMES)[0] is not None  # 1.75x
    assert heads.class_weights("balanced", [0] * 5 + [1] * 5, NAMES)[0] == {0: 1.0, 1: 1.0}
    weights, record = heads.class_weights("none", four_to_one, NAMES)
    assert weights is None and record["weights"] is None
    assert "not weighted (CLASS_WEIGHT=none" in heads.describe_weighting(record)


def test_weighted_classes_count_alike_and_an_absent_class_keeps_weight_one():
    labels = [0] * 9 + [1] * 3 + [2]
    weights, _ = heads.class_weights("balanced", labels, ["a", "b", "c", "d"])
    counts = np.bincount(labels, minlength=4)
    assert [weights[c] * counts[c] for c in range(3)] == pytest.approx([13 / 3] * 3)
    assert weights[3] == 1.0


def test_a_bad_class_weight_is_refused_naming_the_variable():
    with pytest.raises(UserError, match=r"CLASS_WEIGHT='yes' is not one of auto, balanced, none"):
        Config(class_weight="yes")


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """A cache of 20 horizontal and 5 vertical striped images (train about 4:1), extracted once;
    each test trains on its own copy."""
    root = tmp_path_factory.mktemp("imbalanced")
    make_image_folder(root / "data", per_class=20)
    for name in sorted(os.listdir(root / "data" / "vertical"))[5:]:
        os.remove(root / "data" / "vertical" / name)
    extract.run(settings(root))
    return root


def settings(root, **changes):
    return tiny_config(str(root), root / "data", split="60/40/0", epochs=2, **changes)


@pytest.fixture
def fits(monkeypatch):
    """The class_weight of every Keras fit, in order."""
    seen, fit = [], keras.Model.fit

    def spy(model, *args, **kwargs):
        seen.append(kwargs.get("class_weight"))
        return fit(model, *args, **kwargs)
    monkeypatch.setattr(keras.Model, "fit", spy)
    return seen


def expected_weights(config):
    with FeatureStore(config.features_dir) as store:
        counts = np.bincount(store.labels[store.rows("train")], minlength=2)
    assert counts.max() > 1.5 * counts.min(), counts  # the folder is imbalanced enough for auto
    return {name: counts.sum() / (2 * n) for name, n in zip(NAMES, counts)}, counts


@pytest.mark.parametrize("setting", ["auto", "none"])
def test_both_heads_train_with_the_weights_and_record_them(imbalanced, tmp_path, fits,
                                                           monkeypatch, setting):
    copy_folders(imbalanced, tmp_path, ("data", "features"))
    config = settings(tmp_path, class_weight=setting)
    expected, counts = expected_weights(config)
    estimators, logistic = [], heads.logistic_regression

    def kept(*args, **kwargs):
        estimators.append(logistic(*args, **kwargs))
        return estimators[-1]
    monkeypatch.setattr(heads, "logistic_regression", kept)
    metrics = train_head.run(config).metrics
    weighted = setting == "auto"
    for model in ("logreg", "dense"):
        record = metrics["models"][model]["class_weight"]
        assert record["setting"] == setting
        assert record["train_images"] == {"horizontal": counts[0], "vertical": counts[1]}
        assert record["weights"] == (pytest.approx(dict(zip(record["train_images"],
                                                            expected.values())))
                                     if weighted else None)
    by_index = pytest.approx(dict(enumerate(expected.values()))) if weighted else None
    assert fits == [by_index]  # the dense head's one fit
    assert estimators and all(e.class_weight == by_index for e in estimators)  # one per C
    written = artifacts.read_json(artifacts.path(config, artifacts.HEAD_METRICS), "")
    assert written["models"]["dense"]["class_weight"] == record


@pytest.mark.parametrize("source", ["cache", "images"])
def test_fine_tuning_trains_with_the_weights_and_records_them(imbalanced, tmp_path, fits,
                                                              source):
    copy_folders(imbalanced, tmp_path, ("data", "features"))
    config = settings(tmp_path, class_weight="balanced", finetune_from=source,
                      finetune_augment=False)
    expected, _ = expected_weights(config)
    train_head.run(config.replace(head="dense"))
    result = finetune.run(config)
    assert result.source == source
    by_index = pytest.approx(dict(enumerate(expected.values())))
    assert fits == [by_index, by_index]  # the head's fit, then fine-tuning's
    record = artifacts.read_json(result.metrics_path, "")["class_weight"]
    assert record["setting"] == "balanced"
    assert record["weights"] == pytest.approx(dict(zip(["horizontal", "vertical"],
                                                       expected.values())))
