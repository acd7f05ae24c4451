"""A trained model as a Python object: `from pipeline import Classifier`.

    clf = Classifier.load("models/pets")             # model="auto"|"logreg"|"dense"|"finetuned"
    clf.classes                                      # ["cats", "dogs"]
    rows = clf.predict(["a.jpg", "b.png"], top_k=2)  # or decoded (height, width, 3) uint8 arrays

Each row is a dict with predictions.csv's columns (path, predicted, p_<class> for every class,
distance_to_training, unlike_training) and `top`, the top_k (class, probability) pairs. `make
predict` goes through the same object (`predict_batches`), so the two cannot disagree: files go
through images.load_image, arrays through images.image_from_array (the same resize and
preprocessing), the model through registry.predictor with its temperature, and the distance to
the training data through the audit's outlier measure (analysis/outliers.py), from the cache.
"""
import os

import numpy as np

from . import cache
from .analysis import outliers
from .config import Config, UserError, warn
from .data import images
from .fs import artifacts
from .model import backbone, registry

PREFERENCE = {"finetuned": 2, "dense": 1, "logreg": 0}  # breaks ties in validation accuracy


class Classifier:
    """One trained model of models/<NAME>, with its classes, temperature and outlier measure."""

    def __init__(self, config, model, record, predict, measure, features_of):
        self.config, self.model, self.record = config, model, record
        self.classes = list(record.class_names)
        self.size = int(record.identity["image_size"])
        # the backbone the model was trained on decides how its images are preprocessed
        self.preprocess = backbone.FeatureIdentity.read(record.identity).entry.preprocess
        self.temperature = record.temperature
        self.measure = measure            # outliers.OutlierModel, or None without a cache
        self._predict, self._features_of = predict, features_of

    @classmethod
    def load(cls, models_dir, model="auto", features_dir=None):
        """The model `model` of `models_dir` (models/<NAME>); its cache is features_dir, by
        default features/<NAME> beside the models folder, as the pipeline lays them out."""
        models_dir = os.path.normpath(models_dir)
        root, name = os.path.split(models_dir)
        features_dir = os.path.normpath(features_dir or os.path.join(
            os.path.dirname(root) or ".", "features", name))
        if os.path.basename(features_dir) != name:
            raise UserError(f"the cache of {models_dir} must be a folder named {name!r}, not "
                            f"{features_dir}")
        return cls.from_config(Config(name=name, models_root=root or ".",
                                      features_root=os.path.dirname(features_dir) or ".",
                                      model=model))

    @classmethod
    def from_config(cls, config):
        """The model MODEL= of config's models/<NAME> (auto: the best validation accuracy)."""
        records = trained_models(config, config.model)
        model = choose(config.model, records, config.models_dir)
        record = records[model]
        predict = registry.predictor(config, model)
        measure, features_of = _outlier_measure(config, model, record)
        return cls(config, model, record, predict, measure, features_of)

    def predict_batch(self, batch):
        """(calibrated (n, classes) probabilities, (n,) distances to the training data or None)
        of a batch of model input (load_image's arrays)."""
        takes_images = registry.KINDS[self.model].takes == "images"
        if self._features_of is None:
            return self._predict(batch), None
        features = self._features_of(batch)
        distance = self.measure.distance(features)[0] if self.measure else None
        return self._predict(batch if takes_images else features), distance

    def row(self, path, probabilities, distance, top_k=1):
        """One image's row: predictions.csv's columns, and `top`, its top_k classes."""
        order = np.argsort(-probabilities, kind="stable")[:max(1, int(top_k))]
        unlike = "" if distance is None else int(distance > self.measure.threshold)
        return {"path": path, "predicted": self.classes[int(order[0])],
                **{f"p_{name}": float(p) for name, p in zip(self.classes, probabilities)},
                "distance_to_training": "" if distance is None else float(distance),
                "unlike_training": unlike,
                "top": [(self.classes[int(i)], float(probabilities[i])) for i in order]}

    def predict_batches(self, paths, batch_size=None, top_k=1):
        """(path, row or None, reason) for every path in order, a batch at a time through
        images.image_batches (the one loader): a file that does not decode has no row and its
        reason; memory stays bounded whatever the number of paths."""
        batch_size = batch_size or self.config.batch_size
        for (batch, reasons), first in zip(images.image_batches(
                paths, self.size, batch_size, preprocess=self.preprocess),
                                           range(0, len(paths), batch_size)):
            ok = np.array([not r for r in reasons])
            probabilities, distances = self.predict_batch(batch[ok]) if ok.any() else ([], None)
            probabilities = iter(probabilities)
            distances = iter(distances if distances is not None else [])
            for path, reason in zip(paths[first:first + len(reasons)], reasons):
                if reason:
                    yield path, None, reason
                else:
                    yield path, self.row(path, next(probabilities), next(distances, None),
                                         top_k), ""

    def predict(self, items, top_k=1):
        """Rows (see `row`) for image files or decoded (height, width, 3) uint8 RGB arrays, in
        order; an array's path is "<array i>". A file that does not decode is a UserError."""
        items = [items] if isinstance(items, (str, os.PathLike, np.ndarray)) else list(items)
        rows = [None] * len(items)
        paths = [(i, os.fspath(x)) for i, x in enumerate(items) if not isinstance(x, np.ndarray)]
        for (i, _), (path, row, reason) in zip(paths, self.predict_batches(
                [p for _, p in paths], top_k=top_k)):
            if reason:
                raise UserError(f"{path} cannot be classified: {reason}")
            rows[i] = row
        arrays = [i for i, x in enumerate(items) if isinstance(x, np.ndarray)]
        for start in range(0, len(arrays), self.config.batch_size):
            chosen = arrays[start:start + self.config.batch_size]
            try:
                batch = np.stack([images.image_from_array(items[i], self.size, self.preprocess)
                                  for i in chosen])
            except ValueError as error:
                raise UserError(str(error)) from None
            probabilities, distances = self.predict_batch(batch)
            for j, i in enumerate(chosen):
                rows[i] = self.row(f"<array {i}>", probabilities[j],
                                   None if distances is None else distances[j], top_k)
        return rows


def trained_models(config, requested="auto"):
    """{model: registry.Record} of the models in models/<NAME>/ that their own runs' metrics
    describe; nothing is loaded here. A file that an interrupted or older run left is refused
    when asked for by name, and passed over with one line by MODEL=auto."""
    found, refused = registry.usable(config, same_split=False)  # it scores nothing
    if requested in refused:
        raise refused[requested]
    for refusal in refused.values():
        warn(f"passed over: {refusal}")
    return found


def choose(requested, records, models_dir):
    if not records:
        raise UserError(f"no trained model in {models_dir}: run `make train-head` "
                        "(and `make finetune`) first")
    if requested == "auto":
        return max(records, key=lambda m: (_or(records[m].validation.get("accuracy")),
                                           PREFERENCE[m]))
    if requested not in records:
        raise UserError(f"MODEL={requested}: there is no {requested} model in {models_dir}: run "
                        f"`{registry.KINDS[requested].make}`, or use MODEL=auto (available: "
                        f"{', '.join(sorted(records))})")
    return requested


def _outlier_measure(config, model, record):
    """(outliers.OutlierModel or None, the frozen base's feature function or None). A model of
    feature maps needs the cache (its features' weights); the fine-tuned model does not, and
    without one goes without the unlike_training column."""
    takes_images = registry.KINDS[model].takes == "images"
    try:
        with cache.FeatureStore(config.features_dir) as store:
            if not takes_images:
                artifacts.require_same_identity(record.identity, store.identity,
                                                registry.path(config, model))
            weights = backbone.weights_of_cache(config.weights, store.attrs)
            identity = store.feature_identity
            try:  # never a reason to withhold the predictions themselves
                measure = outliers.load_outlier_model(config.models_dir, store,
                                                      config.outlier_percentile)
            except UserError as error:
                warn(f"predictions without the unlike_training column: {error}")
                measure = None
    except UserError:
        if not takes_images:
            raise  # a model of feature maps needs the cache
        warn(f"no usable feature cache in {config.features_dir}: predictions without the "
             "unlike_training column (run `make extract` to have it)")
        return None, None
    if measure is None and takes_images:
        return None, None
    # the frozen base with the weights the cache was built with: the features of new images
    return measure, backbone.feature_function(backbone.build_backbone_of(identity, weights))


def _or(value, default=-1.0):
    return default if value is None else value
