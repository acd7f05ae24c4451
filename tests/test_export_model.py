"""make export-model: one graph, raw pixels -> calibrated probabilities, that plain TensorFlow
(no pipeline import), onnxruntime and the LiteRT interpreter run, and that agrees with `make
predict` and the Classifier."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import edit_json
from PIL import Image, ImageOps
from trained_run import trained_run_copy

from pipeline import Classifier, export_model
from pipeline import __main__ as cli
from pipeline.config import UserError
from pipeline.fs import artifacts

TEMPERATURE = 1.5  # set in every record, so the graph's temperature is tested, not only T = 1
TOP1_SHARE, WITHIN = 0.95, 0.05  # the parity the exports promise against make predict

# argv: the images, then the SavedModels; prints {model folder: probabilities of each image}
PLAIN_TENSORFLOW = """
import json, sys
import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps
images = [a for a in sys.argv[1:] if not a.endswith("saved_model")]
out = {}
for folder in sys.argv[1 + len(images):]:
    model = tf.saved_model.load(folder)
    out[folder] = []
    for path in images:
        pixels = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        out[folder].append(model.serve(tf.constant(pixels[None])).numpy()[0].tolist())
assert not any(name == "pipeline" or name.startswith("pipeline.") for name in sys.modules)
print(json.dumps(out))
"""
MODELS = ("finetuned", "dense", "logreg")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = trained_run_copy(tmp_path_factory, tmp_path_factory.mktemp("export"))
    for name in (artifacts.HEAD_METRICS, artifacts.FINETUNE_METRICS):
        def set_temperature(metrics):
            for entry in metrics.get("models", {"": metrics}).values():
                entry["calibration"]["temperature"] = TEMPERATURE
        edit_json(artifacts.path(config, name), set_temperature)
    return config


@pytest.fixture(scope="module")
def predicted_by_make(run, tmp_path_factory):
    """predicted_by_make(model): predictions.csv rows of `make predict MODEL=model` on the
    run's images, by path; made once per model for the module's tests, which only read them."""
    made, folder = {}, tmp_path_factory.mktemp("predicted")

    def rows(model):
        if model not in made:
            out = str(folder / f"{model}.csv")
            assert cli.main(["predict", "--data", run.data, "--name", run.name, "--images",
                             run.data, "--model", model, "--out", out, *roots(run),
                             "--weights", "none", "--batch-size", "4",
                             "--precision", "float32"]) == 0
            with open(out, newline="") as f:
                made[model] = {row["path"]: row for row in csv.DictReader(f)}
        return made[model]
    return rows


def roots(config):
    return ["--features-root", config.features_root, "--models-root", config.models_root]


def pixels(path):
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def assert_parity(probabilities, rows, class_names):
    """Same top-1 on TOP1_SHARE of the images, every probability within WITHIN."""
    expected = np.array([[float(row[f"p_{c}"]) for c in class_names] for row in rows])
    got = np.asarray(probabilities)
    assert got.shape == expected.shape
    assert np.mean(got.argmax(axis=1) == expected.argmax(axis=1)) >= TOP1_SHARE
    assert np.abs(got - expected).max() <= WITHIN


@pytest.mark.heavy
def test_plain_tensorflow_runs_each_savedmodel_as_make_predict(run, predicted_by_make, tmp_path):
    exported = {}
    for model in MODELS:
        result = export_model.run(run.replace(model=model))
        assert result.model == model
        assert result.path.endswith(os.path.join("export", "saved_model"))
        assert os.path.isfile(os.path.join(result.path, "saved_model.pb"))
        with open(result.description) as f:
            described = json.load(f)
        assert described["class_names"] == ["horizontal", "vertical"]
        assert described["temperature"] == TEMPERATURE and described["model"] == model
        assert described["outliers"]["threshold"] > 0 and described["outliers"]["classes"] == [
            "horizontal", "vertical"]
        with np.load(os.path.join(os.path.dirname(result.path),
                                  described["outliers"]["statistics"]),
                     allow_pickle=False) as statistics:
            # a mean and a spread per channel
            assert statistics["precision"].shape == (1024, 1024)
            assert statistics["mean"].shape == (1024,)
        assert described["identity"]["image_size"] == run.size
        assert described["settings"]["seed"] == 0
        # each export replaces the last one in models/<NAME>/export/: keep a copy to run
        exported[model] = shutil.copytree(result.path, tmp_path / model / "saved_model")
    paths = sorted(predicted_by_make("finetuned"))
    plain = subprocess.run([sys.executable, "-c", PLAIN_TENSORFLOW, *paths,
                            *map(str, exported.values())],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env={**os.environ, "PYTHONPATH": ""})
    assert plain.returncode == 0, plain.stderr[-2000:]
    probabilities = json.loads(plain.stdout.strip().splitlines()[-1])
    for model, folder in exported.items():
        rows = predicted_by_make(model)
        assert_parity(probabilities[str(folder)], [rows[p] for p in paths],
                      ["horizontal", "vertical"])


def test_the_classifier_is_make_predicts_path(run, predicted_by_make):
    rows = predicted_by_make("finetuned")
    classifier = Classifier.load(run.models_dir, model="finetuned")
    assert classifier.classes == ["horizontal", "vertical"]
    assert classifier.temperature == TEMPERATURE
    paths = sorted(rows)
    from_files = classifier.predict(paths, top_k=2)
    for row, path in zip(from_files, paths):
        assert row["predicted"] == rows[path]["predicted"]
        for key in ("p_horizontal", "p_vertical", "distance_to_training"):
            assert row[key] == pytest.approx(float(rows[path][key]), rel=1e-6, abs=1e-7)
        assert row["unlike_training"] == int(rows[path]["unlike_training"])
        assert [name for name, _ in row["top"]] == sorted(
            ["horizontal", "vertical"], key=lambda c: -row[f"p_{c}"])
    # decoded arrays: the same resize and preprocessing as the files
    from_arrays = classifier.predict([pixels(p) for p in paths[:4]])
    assert [r["path"] for r in from_arrays] == [f"<array {i}>" for i in range(4)]
    np.testing.assert_allclose([r["p_vertical"] for r in from_arrays],
                               [r["p_vertical"] for r in from_files[:4]], atol=1e-6)
    with pytest.raises(UserError, match=r"\(height, width, 3\) uint8"):
        classifier.predict(np.zeros((4, 4), np.float32))


def test_onnx_runs_in_onnxruntime_as_make_predict(run, predicted_by_make):
    onnxruntime = pytest.importorskip("onnxruntime")  # the `onnx` extra (pyproject.toml)
    pytest.importorskip("tf2onnx")
    rows = predicted_by_make("dense")
    result = export_model.run(run.replace(model="dense", format="onnx"))
    session = onnxruntime.InferenceSession(result.path)
    name = session.get_inputs()[0].name
    paths = sorted(rows)
    got = [session.run(None, {name: pixels(p)[None]})[0][0] for p in paths]
    assert_parity(got, [rows[p] for p in paths], ["horizontal", "vertical"])


def test_litert_runs_in_its_interpreter_as_make_predict(run, predicted_by_make):
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")  # `litert` extra
    rows = predicted_by_make("logreg")
    result = export_model.run(run.replace(model="logreg", format="litert"))
    interpreter = interpreter_module.Interpreter(model_path=result.path)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    paths, got = sorted(rows), []
    for path in paths:
        image = pixels(path)[None]
        interpreter.resize_tensor_input(source["index"], image.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], image)
        interpreter.invoke()
        got.append(interpreter.get_tensor(target["index"])[0])
    assert_parity(got, [rows[p] for p in paths], ["horizontal", "vertical"])


def test_a_missing_converter_and_a_bad_format_are_one_line(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"FORMAT=onnx needs its converter \(tf2onnx\): pip "
                                        r"install -e '\.\[onnx\]'"):
        export_model.run(run.replace(model="dense", format="onnx"))
    with pytest.raises(UserError, match="FORMAT='tflite' is not one of savedmodel, onnx, litert"):
        run.replace(format="tflite")
    folder = os.path.join(run.models_dir, "export")  # refused before any work: no temporaries
    assert not [n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                if n.endswith(".tmp") or ".tmp." in n]


def test_the_saved_fine_tuned_model_does_not_augment_when_called(run):
    # Keras's augmentation layers augment whenever called without training=False: a
    # finetuned.keras that held them flipped and rotated the images of model(x)
    from pipeline.data import images
    from pipeline.model import registry
    network = registry.load(run, "finetuned")
    assert "augmentation" not in [layer.name for layer in network.layers]
    x = np.stack([images.load_image(os.path.join(run.data, "horizontal", f"horizontal_0{i}.jpg"),
                                    run.size) for i in range(4)])
    np.testing.assert_allclose(np.asarray(network(x)), network.predict_on_batch(x), atol=1e-6)


def test_predict_and_evaluate_apply_the_recorded_temperature(run, predicted_by_make):
    from pipeline import evaluate
    from pipeline.data import images
    from pipeline.model import calibration, registry
    rows = predicted_by_make("finetuned")
    paths = sorted(rows)
    raw = registry.predictor(run, "finetuned", calibrated=False)(
        np.stack([images.load_image(p, run.size) for p in paths]))
    expected = calibration.apply_temperature(raw, TEMPERATURE)
    assert np.abs(expected - raw).max() > 1e-3  # the temperature changes these numbers
    got = [[float(rows[p]["p_horizontal"]), float(rows[p]["p_vertical"])] for p in paths]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    evaluate.run(run)
    scored = artifacts.read_json(artifacts.path(run, artifacts.EVALUATION), "")["models"]
    for model in ("logreg", "dense", "finetuned"):
        assert scored[model]["temperature"] == TEMPERATURE
        assert scored[model]["calibration"]["ece"] != scored[model]["calibration_before"]["ece"]
