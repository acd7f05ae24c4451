"""Temperature scaling (model/calibration.py): fitted on validation, applied everywhere the same
way, and the one-layer pieces of the exported graph that must equal the pipeline's numbers."""
import numpy as np
import pytest
from helpers import edit_json
from keras.applications import vgg16
from PIL import Image
from trained_run import shared_trained_run

from pipeline.config import UserError
from pipeline.data import images
from pipeline.fs import artifacts
from pipeline.model import backbone, calibration, registry


def overconfident(n, classes, temperature, seed=0):
    """(probabilities softmax(z), labels drawn from softmax(z / temperature)): a model whose
    probabilities are too sharp by exactly `temperature`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, classes))
    truth = np.exp(z / temperature)
    truth /= truth.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=p) for p in truth])
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True), labels


@pytest.mark.parametrize("classes", [2, 4])
def test_the_fit_finds_the_temperature_and_lowers_the_ece(classes):
    p, labels = overconfident(4000, classes, temperature=2.0)
    fitted = calibration.fit(p, labels)
    assert fitted["temperature"] == pytest.approx(2.0, rel=0.1)
    assert fitted["nll_after"] < fitted["nll_before"]
    assert fitted["ece_after"] < fitted["ece_before"] / 2 and fitted["note"] == ""


def test_the_temperature_keeps_the_prediction_and_sums_to_one():
    p, _ = overconfident(200, 3, 2.0)
    for t in (0.5, 1.0, 3.0):
        q = calibration.apply_temperature(p, t)
        assert (q.argmax(axis=1) == p.argmax(axis=1)).all()
        np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-12)
    # two classes: the sigmoid of the logit divided by T
    q = calibration.apply_temperature(np.array([[0.2, 0.8]]), 2.0)
    np.testing.assert_allclose(q[0, 1], 1 / (1 + np.exp(-np.log(4) / 2)), rtol=1e-12)
    assert calibration.apply_temperature(p, 1.0) is not None
    np.testing.assert_array_equal(calibration.apply_temperature(p, 1.0), p)


def test_a_small_validation_split_keeps_t_1_and_says_so():
    p, labels = overconfident(calibration.MIN_IMAGES - 1, 2, 2.0)
    fitted = calibration.fit(p, labels)
    assert fitted["temperature"] == 1.0 and fitted["ece_after"] == fitted["ece_before"]
    assert f"{calibration.MIN_IMAGES - 1} images, fewer than" in fitted["note"]


def test_the_graph_applies_the_same_formula():
    p, _ = overconfident(50, 3, 2.0)
    p[0] = [1.0, 0.0, 0.0]  # a zero probability: clipped the same way in both
    graph = np.asarray(calibration.temperature_graph(p.astype(np.float32), 1.7))
    np.testing.assert_allclose(graph, calibration.apply_temperature(p, 1.7), atol=1e-6)


def test_the_preprocessing_layer_is_vgg16s_exactly():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(backbone.preprocessing()(pixels)),
                                  vgg16.preprocess_input(pixels.copy()))


@pytest.mark.parametrize("shape, size", [((40, 40), 32), ((375, 500), 150), ((20, 31), 64),
                                         ((150, 150), 150), ((700, 1300), 80), ((35, 99), 32)])
def test_the_resize_layer_is_pillows_within_one_level(shape, size):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    smooth = np.stack([xx * 255 / shape[1], yy * 255 / shape[0], (xx + yy) % 50 * 5], -1)
    for array in (rng.integers(0, 256, (*shape, 3)), smooth):
        array = array.astype(np.uint8)
        image, scale = Image.fromarray(array), images.draft_scale(shape[1], shape[0], size)
        image = image.reduce(scale) if scale > 1 else image  # what load_image's JPEG draft does
        pillow = np.asarray(image.resize((size, size), Image.BILINEAR), float)
        layer = np.asarray(images.PillowResize(size)(array[None]))[0]
        assert np.abs(layer - pillow).max() <= 1
        # Pillow rounds its weights to 22 bits and its reduce to whole values, where the layer
        # rounds only after each resize pass: values near a half may round the other way, and
        # a smooth gradient has many of them; never by more than one level (above)
        assert np.mean(layer != pillow) < 0.5


def test_a_recorded_temperature_out_of_range_is_refused(tmp_path_factory, tmp_path):
    import shutil
    run = shared_trained_run(tmp_path_factory)
    shutil.copytree(run.models_dir, tmp_path / "models" / "tiny")
    config = run.replace(models_root=str(tmp_path / "models"))
    path = artifacts.path(config, artifacts.FINETUNE_METRICS)
    assert registry.record(config, "finetuned", same_split=False).temperature == 1.0
    edit_json(path, lambda m: m["calibration"].update(temperature=1e6))
    with pytest.raises(UserError, match="calibration.temperature is 1000000.0, not a number"):
        registry.record(config, "finetuned", same_split=False)
