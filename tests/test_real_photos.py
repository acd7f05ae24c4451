"""Slow integration tests on the real photos in ../shared/data/cats_vs_dogs (`make test-slow`)."""
import os

import numpy as np
import pytest
from helpers import SHARED_DATA

from pipeline import cache, extract, train_head
from pipeline.model import registry

pytestmark = pytest.mark.slow


@pytest.fixture
def real_photos(tmp_path):
    """40 real photos (20 cats, 20 dogs) as a layout (a) folder of symlinks: raw data stays
    untouched."""
    for class_name in ("cats", "dogs"):
        source = os.path.join(SHARED_DATA, "train", class_name)
        os.makedirs(tmp_path / "photos" / class_name)
        for name in sorted(os.listdir(source))[:20]:
            os.symlink(os.path.join(source, name), tmp_path / "photos" / class_name / name)
    return str(tmp_path / "photos")


def test_real_photos_through_extract_and_train_head(real_photos, make_config):
    config = make_config(real_photos, size=150, batch_size=16, epochs=2, split="70/30/0")
    result = extract.run(config)
    assert (result.rows, result.skipped) == (40, 0)
    with cache.FeatureStore(config.features_dir) as store:
        features = store.read(np.arange(len(store)))
        assert features.shape == (40, 4, 4, 512) and np.isfinite(features).all()
        assert store.class_names == ["cats", "dogs"]
    assert extract.run(config).new == 0
    metrics = train_head.run(config).metrics
    assert set(metrics["models"]) == {"dense", "logreg"}
    with cache.FeatureStore(config.features_dir) as store:  # the recorded score is the head's
        rows = store.rows("validation")
        predicted = registry.predictor(config, "dense")(store.read(rows)).argmax(axis=1)
        expected = np.mean(predicted == store.labels[rows])
    assert metrics["models"]["dense"]["validation"]["accuracy"] == pytest.approx(expected, abs=1e-6)
