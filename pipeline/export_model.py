"""Export a trained model as one graph that leaves the pipeline: pixels in, probabilities out.

    python -m pipeline export-model --name NAME [--model auto|logreg|dense|finetuned]
                                    [--format savedmodel|onnx|litert]

    -> models/<NAME>/export/saved_model/ (FORMAT=savedmodel), model.onnx or model.tflite,
       and beside it the same name + .json: what the graph is (export_description)

The graph takes a batch of decoded uint8 RGB images, (n, height, width, 3), of any height and
width, and returns (n, classes) probabilities in the order of the JSON's class_names. Inside it,
in order: the resize to the model's SIZE (images.PillowResize: the arithmetic of Pillow's resize
in images.load_image, to within one pixel level), the backbone's preprocessing
(backbone.preprocessing), the backbone and the head (or the whole fine-tuned model, or logreg's
weights as a Dense layer: heads.logreg_network) and the model's temperature
(calibration.temperature_graph). The model is the one `make predict` and the Classifier use
(classifier.Classifier), so the JSON's threshold is predict's. Keras's own model.export writes
every format; onnx and litert need their converters (pyproject.toml's extras).

Where the export and `make predict` can differ: load_image decodes a JPEG at least twice SIZE
at a reduced scale (libjpeg's DCT scaling) before it resizes, while the graph receives the pixels
of the full decode; and Pillow rounds in fixed point (a pixel level now and then). docs/stages.md
has the measured differences.
"""
import importlib
import os
import shutil
import time
from dataclasses import dataclass, replace

import keras
import numpy as np

from . import cache
from .analysis import outliers
from .classifier import Classifier
from .config import Config, UserError
from .data import images
from .fs import artifacts, files, lock
from .model import backbone, calibration, heads, registry, runtime

FOLDER = "export"                       # in models/<NAME>/
FORMATS = {  # FORMAT -> (the file or folder written, Keras's name of the format, the extra)
    "savedmodel": ("saved_model", "tf_saved_model", ""),
    "onnx": ("model.onnx", "onnx", "onnx"),
    "litert": ("model.tflite", "litert", "litert"),  # converted by TensorFlow's own tf.lite
}
CONVERTERS = {"onnx": ("tf2onnx", "onnx")}  # the modules a format's conversion imports
STATISTICS = ".outliers.npz"  # beside the graph: the outlier measure's arrays


@dataclass
class ExportModelResult:
    path: str             # the SavedModel folder, .onnx or .tflite file
    description: str      # the JSON beside it
    model: str            # logreg, dense or finetuned
    format: str
    bytes: int
    seconds: float


def run(config: Config) -> ExportModelResult:
    """Export MODEL as FORMAT, holding models/<NAME>'s lock (no train-head or finetune replaces
    the model meanwhile)."""
    if runtime.backend() != "tensorflow":
        raise UserError(f"export-model writes TensorFlow graphs: run it with BACKEND=tensorflow "
                        f"(the backend now is {runtime.backend()})")
    with lock.exclusive(config.models_dir, "export-model"):
        return _export(config)


def _export(config):
    start = time.perf_counter()
    name, keras_format, extra = FORMATS[config.format]
    for module in CONVERTERS.get(config.format, ()):  # before minutes of work, not after
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"FORMAT={config.format} needs its converter ({module}): pip install "
                            f"-e '.[{extra}]', or use FORMAT=savedmodel") from None
    classifier = Classifier.from_config(config)
    graph = build_graph(config, classifier)
    folder = files.no_link_folder(os.path.join(config.models_dir, FOLDER))
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, name)
    _write(graph, target, keras_format, extra)
    description = target + ".json"
    statistics = _write_statistics(target + STATISTICS, classifier.measure)
    # the JSON last: it names the graph's statistics file by its sha256
    artifacts.write_json(description, export_description(config, classifier, statistics))
    size = _size(target)
    seconds = time.perf_counter() - start
    print(f"export-model {config.dataset_name}: the {classifier.model} model "
          f"(T={classifier.temperature:.2f}) as {config.format}, {size / 2**20:.1f} MB, "
          f"{seconds:.1f} s -> {target} (classes and settings in {description})")
    return ExportModelResult(target, description, classifier.model, config.format, size, seconds)


def build_graph(config, classifier):
    """The Keras model uint8 pixels (n, height, width, 3) -> calibrated probabilities (n,
    classes) of `classifier`'s model (see the module's docstring)."""
    size = classifier.size
    pixels = keras.Input((None, None, 3), dtype="uint8", name="pixels")
    x = images.PillowResize(size, name="resize")(pixels)  # load_image's resize
    # training=False: a fine-tuned model saved with augmentation layers must not augment
    entry = backbone.FeatureIdentity.read(classifier.record.identity).entry
    probabilities = _network(config, classifier)(backbone.preprocessing(entry)(x),
                                                 training=False)
    if probabilities.shape[-1] == 1:  # a sigmoid unit: p of the second class
        probabilities = keras.ops.concatenate([1.0 - probabilities, probabilities], axis=-1)
    probabilities = calibration.temperature_graph(probabilities, classifier.temperature)
    graph = keras.Model(pixels, probabilities, name=f"{classifier.model}_classifier")
    _constant_statistics(graph)
    graph(np.zeros((1, size, size, 3), np.uint8))  # the ONNX exporter wants a model called once
    return graph


def _constant_statistics(model):
    """Keras's Normalization layer, built from a given mean and variance (the heads'
    standardisation), holds them as eager tensors, which tf2onnx turns into inputs of the graph
    rather than constants ("Required inputs ... are missing"). Held as numpy arrays, they are
    traced as constants by every format, with the same values."""
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, keras.layers.Normalization) and layer.built:
            layer.mean, layer.variance = (np.asarray(layer.mean), np.asarray(layer.variance))
        _constant_statistics(layer)


def _network(config, classifier):
    """The model, in float32: load_image's output (n, SIZE, SIZE, 3) -> probabilities (sigmoid
    or softmax)."""
    if registry.KINDS[classifier.model].takes == "images":
        return in_float32(registry.load(config, classifier.model))  # the whole fine-tuned model
    with cache.FeatureStore(config.features_dir) as store:  # the base its features came from
        weights = backbone.weights_of_cache(config.weights, store.attrs)
        identity = store.feature_identity
    # its BACKBONE and FEATURE_LAYER, in float32 arithmetic
    base = backbone.build_backbone_of(replace(identity, precision="float32"), weights)
    head = registry.load(config, classifier.model)
    head = (heads.logreg_network(head, tuple(base.output.shape[1:]))
            if classifier.model == "logreg" else in_float32(head))
    inputs = keras.Input((classifier.size, classifier.size, 3), name="image")
    return keras.Model(inputs, head(base(inputs)), name=classifier.model)


def in_float32(model):
    """`model` rebuilt with float32 arithmetic in every layer, with its weights (which mixed
    precision keeps in float32 anyway): an export runs anywhere, and ONNX Runtime has no
    bfloat16 convolution, which PRECISION=auto picks on CPUs with bfloat16 instructions."""
    copy = model.__class__.from_config(_float32_policies(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy


def _float32_policies(config):
    """A Keras config with every dtype policy made float32."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            return {**config, "config": {**config.get("config", {}), "name": "float32"}}
        return {key: _float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_policies(value) for value in config]
    return config


def _write(graph, target, keras_format, extra):
    """graph.export to a temporary name beside `target`, then renamed over it: a failed or killed
    export leaves the previous one whole. A converter that is missing or fails: one line."""
    temporary = files.temporary_name(target) + os.path.splitext(target)[1]
    try:
        graph.export(temporary, format=keras_format, verbose=False)
        _replace(temporary, target)
    except ImportError as error:
        raise UserError(f"FORMAT={extra} needs its converter ({error.name or error}): pip install "
                        f"-e '.[{extra}]', or use FORMAT=savedmodel") from None
    except UserError:
        raise
    except Exception as error:
        if files.is_full(error):
            raise files.NoSpace(f"no space left on the disk writing {target}: free some space, "
                                "then run the same command again") from None
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"FORMAT={extra or 'savedmodel'}: the converter failed "
                        f"({type(error).__name__}: {reason}); FORMAT=savedmodel is the format "
                        "that always works (docs/stages.md)") from None
    finally:
        _remove_any(temporary)


def _replace(temporary, target):
    """Rename `temporary` (a file or a SavedModel folder) over `target`: a folder is moved
    aside first, as a rename cannot replace a folder that is not empty."""
    aside = None
    if os.path.isdir(target) and not os.path.islink(target):
        aside = files.temporary_name(target)
        os.rename(target, aside)
    elif os.path.lexists(target):
        os.remove(target)  # a file or a link: the name only, never what it points to
    os.rename(temporary, target)
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def _remove_any(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _size(path):
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names)


def _write_statistics(path, measure):
    """predict's outlier measure's arrays (outliers.OutlierModel: the training mean and the
    inverse of its shrunk covariance of the square-rooted per-channel means and spatial standard
    deviations of the features, and each class's mean) as plain arrays; None, and no file,
    without a measure."""
    if measure is None:
        if os.path.lexists(path):
            os.remove(path)  # another model's: the JSON will say there is none
        return None
    with files.replacing(path, "wb") as f:
        np.savez(f, mean=measure.mean, precision=measure.precision,
                 class_means=measure.class_means, present=measure.present)
    return path


def export_description(config, classifier, statistics=None):
    """The JSON beside the graph: what it takes and returns, the class names, the model and its
    identity, the settings it was trained with, the temperature and predict's outlier
    measure, its arrays in the `statistics` file (the graph itself returns only the
    probabilities)."""
    record, measure = classifier.record, classifier.measure
    return {
        "format": config.format, "model": classifier.model,
        "class_names": classifier.classes,
        "input": {"name": "pixels", "dtype": "uint8", "shape": [None, None, None, 3],
                  "channels": "RGB, decoded, EXIF orientation applied"},
        "output": {"dtype": "float32", "shape": [None, len(classifier.classes)],
                   "meaning": "the probability of each class, in the order of class_names"},
        "inside": ["resize to image_size x image_size (bilinear, antialiased, rounded)",
                   "the backbone's preprocessing", "backbone and head", "temperature"],
        "image_size": classifier.size, "temperature": classifier.temperature,
        "calibration": record.get("calibration", {}),
        "identity": record.identity, "identity_id": backbone.identity_id(record.identity),
        "settings": record.get("config") or _recorded_settings(config, record),
        "validation": record.validation, "test": record.test,
        "weights_notice": record.weights_notice, "model_sha256": record.file_sha256,
        "outliers": None if measure is None or statistics is None else {
            "measure": outliers.MEASURE,
            "layer": backbone.FeatureIdentity.read(record.identity).output_layer,
            "statistics": os.path.basename(statistics),
            "statistics_sha256": artifacts.file_sha256(statistics),
            "arrays": "mean (2 x channels,), precision (2 x channels, 2 x channels): the "
                      "distance is sqrt((x - mean) precision (x - mean)) of x = the square roots "
                      "of the map's per-channel mean over height and width, then of its "
                      "per-channel standard deviation over them; class_means and present: the "
                      "nearest class",
            "classes": [classifier.classes[int(k)] for k in measure.present],
            "threshold": measure.threshold, "percentile": config.outlier_percentile,
            "calibrated_on": measure.calibrated_on},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _recorded_settings(config, record):
    """The settings of the run that made a model whose entry holds none (the heads: in
    head_metrics.json's top level)."""
    metrics = artifacts.json_or_empty(artifacts.path(config, registry.KINDS[record.kind].metrics))
    settings = metrics.get("config") if isinstance(metrics, dict) else None
    return settings if isinstance(settings, dict) else {}
