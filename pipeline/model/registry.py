"""The kinds of model, each with one name used everywhere: HEAD=, MODEL=, the metrics files,
evaluation.json, the tables, the batch summary and the bench.

A kind knows its file in models/<NAME>/, the JSON that the run that made it writes beside it,
its title, what it reads (cached feature maps or images) and how a batch of those becomes class
probabilities. Every stage reads a model's record through `record` and its function through
`predictor`, so the layout of those files is known here and in the stage that writes them.
"""
import math
import numbers
import os
from dataclasses import dataclass

import numpy as np

from ..config import MAX_SIZE, MIN_SIZE, MODEL_NAMES, UserError
from ..fs import artifacts
from . import calibration


@dataclass(frozen=True)
class Kind:
    name: str       # the one name
    title: str      # in tables, plots and the report
    file: str       # in models/<NAME>/
    metrics: str    # the JSON its run writes, in models/<NAME>/
    entry: str      # its entry under "models" in that JSON; "" when the JSON is its alone
    takes: str      # "features" (cached feature maps) or "images" (after images.load_image)
    make: str       # the command that makes it


KINDS = {kind.name: kind for kind in (  # in the order of every table
    Kind("logreg", "logistic regression", artifacts.LOGREG, artifacts.HEAD_METRICS, "logreg",
         "features", "make train-head"),
    Kind("dense", "dense head", artifacts.HEAD, artifacts.HEAD_METRICS, "dense",
         "features", "make train-head"),
    Kind("finetuned", "fine-tuned", artifacts.FINETUNED, artifacts.FINETUNE_METRICS, "",
         "images", "make finetune"),
)}
NAMES = tuple(KINDS)
assert NAMES == MODEL_NAMES, "config.MODEL_NAMES lists the kinds, in this order"
TITLES = {name: kind.title for name, kind in KINDS.items()}


@dataclass(frozen=True)
class Record:
    """What the run that made a model wrote about it."""
    kind: str
    identity: dict            # the feature identity it was trained on
    class_names: list
    validation: dict          # {"accuracy", "loss"}
    test: dict                # the same, {} without a test split
    weights_notice: str       # non-empty when the backbone's weights were random
    file_sha256: str          # of the model file that run saved
    entry: dict               # everything else the run recorded (epochs, history, C, ...)

    def get(self, key, default=None):
        return self.entry.get(key, default)

    @property
    def temperature(self):
        """The temperature fitted on the validation split (calibration.py); 1 for a model
        whose run recorded none."""
        return float(self.entry.get("calibration", {}).get("temperature", 1.0))


def path(config, name):
    return artifacts.path(config, KINDS[name].file)


def record(config, name, same_split=True):
    """The record of model `name`, after checking that the file in models/<NAME> is the one
    that run saved (its sha256). An interrupted run leaves new files beside old ones: a file
    with no record, or with another file's record, is refused, so no stage ever scores one
    run's model with another run's metrics. same_split: also refuse a model trained on another
    split than the cache's, for every stage that scores it on the cache's splits or trains on
    from it; predict, which scores nothing, passes False."""
    kind, file_path = KINDS[name], path(config, name)
    if not os.path.exists(file_path):
        raise UserError(f"there is no {file_path}: run `{kind.make}`")
    metrics_path = artifacts.path(config, kind.metrics)
    metrics = artifacts.json_or_empty(metrics_path)
    models = metrics.get("models") if isinstance(metrics, dict) else None
    entry = (models.get(kind.entry, {}) if isinstance(models, dict) else {}) if kind.entry \
        else metrics
    if not isinstance(entry, dict) or not entry or \
            entry.get("file_sha256") != artifacts.file_sha256(file_path):
        raise UserError(f"{file_path} is not the file its metrics describe (an interrupted or "
                        f"older run left it): rerun `{kind.make}`")
    # what is read back steers MODEL=auto and fills the report: checked, as a file anyone with
    # write access to models/<NAME> could have edited
    check = Checker(metrics_path, f"rerun `{kind.make}`")
    # the side the images are resized to: 1500 ended in a Keras traceback
    check.number(check(metrics, "identity", dict), "image_size", MIN_SIZE, MAX_SIZE,
                 integer=True, where="identity.")
    check.texts(metrics, "class_names")
    check(metrics, "weights_notice", str, optional=True)
    where = f"models.{kind.entry}." if kind.entry else ""
    for split in ("validation", "test"):
        scores = check(entry, split, dict, optional=True, where=where) or {}
        if scores or split == "validation":
            check.number(scores, "accuracy", 0, 1, where=f"{where}{split}.")
            # a diverged run's loss is NaN, and still its loss
            check.number(scores, "loss", 0, nan=True, where=f"{where}{split}.")
    check.number(entry, "seconds", 0, optional=True, where=where)
    for key in ("epochs", "best_epoch", "views"):
        check.number(entry, key, 0, optional=True, integer=True, where=where)
    fitted = check(entry, "calibration", dict, optional=True, where=where)
    if fitted is not None:  # a temperature of 0 or 1e6 would turn every prediction to 0 or 1/k
        check.number(fitted, "temperature", *calibration.BOUNDS, where=f"{where}calibration.")
    if same_split:
        _check_split(config, metrics, file_path, kind)
    return Record(name, metrics["identity"], list(metrics["class_names"]),
                  entry.get("validation", {}), entry.get("test", {}),
                  metrics.get("weights_notice", ""), entry["file_sha256"], entry)


def _check_split(config, metrics, file_path, kind):
    """Refuse a model trained on another split than the cache's (cache.split_digest): after a
    re-extract with another SPLIT, its test rows were half made of the model's training rows
    and evaluate reported accuracy 1.000. A model made before models recorded their split is
    refused too: nothing tells that its test rows are unseen, and retraining costs minutes."""
    from .. import cache  # h5py, only when a model is read back
    recorded = metrics.get("split_digest")
    if recorded != cache.split_digest(config.features_dir):
        why = ("records no split (made by an earlier version)" if recorded is None else
               f"was trained on another split than {config.features_dir}'s")
        fix = ("`make train-head`" if kind.make == "make train-head" else
               "`make train-head`, then `make finetune`")
        raise UserError(f"{file_path} {why}: its test rows may be training rows; rerun {fix}")


class Checker:
    """Checks of a JSON file read back, each refusing it in one line that names the file, the
    key, the bad value and `fix`."""

    def __init__(self, path, fix):
        self.path, self.fix = path, fix

    def refuse(self, key, value, wanted):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise UserError(f"{self.path} is damaged or not written by this pipeline ({key} is "
                        f"{shown}, not {wanted}): {self.fix}")

    def __call__(self, data, key, kind, optional=False, where=""):
        """data[key], refused unless of `kind` (or missing, when `optional`)."""
        if optional and key not in data:
            return None
        value = data.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.refuse(where + key, value, f"a {kind.__name__}")
        return value

    def number(self, data, key, low, high=math.inf, optional=False, integer=False, nan=False,
               where=""):
        """data[key], refused unless a number (an integer) from `low` to `high`, or NaN."""
        if optional and key not in data:
            return None
        value = data.get(key)
        kind = numbers.Integral if integer else numbers.Real
        if not (isinstance(value, kind) and not isinstance(value, bool)
                and (low <= value <= high or nan and math.isnan(value))):
            wanted = "an integer" if integer else "a number"
            self.refuse(where + key, value, f"{wanted} from {low} to {high}" if high < math.inf
                        else f"{wanted} not below {low}")
        return value

    def texts(self, data, key, where=""):
        """data[key], refused unless a list of strings."""
        value = self(data, key, list, where=where)
        if not all(isinstance(v, str) for v in value):
            self.refuse(where + key, value, "a list of texts")
        return value


def records(config, same_split=True):
    """({name: record} of the models present whose files their records describe, {name: the
    one-line refusal of each other model file present}), in table order (same_split: `record`)."""
    found, refused = {}, {}
    for name in NAMES:
        if os.path.exists(path(config, name)):
            try:
                found[name] = record(config, name, same_split)
            except UserError as refusal:
                refused[name] = refusal
    legacy = artifacts.path(config, artifacts.LEGACY_LOGREG)
    if os.path.exists(legacy) and "logreg" not in found and "logreg" not in refused:
        refused["logreg"] = UserError(f"{legacy} is a pickle from an earlier version and is not "
                                      "loaded (loading a pickle can run code): rerun `make "
                                      "train-head`")
    return found, refused


def usable(config, store=None, same_split=True):
    """({name: record} of the models in models/<NAME> that can be used, in table order; {name:
    the one-line refusal of each other model file present}). The one answer evaluate, report,
    predict and batch share. A model is usable when its file is the one its record describes
    (`records`), and, given the cache's `store`, when it was made on that cache's features and
    for its classes. same_split=False for a caller that scores nothing (predict)."""
    found, refused = records(config, same_split)
    if store is None:
        return found, refused
    usable_now = {}
    for name, made in found.items():
        what = path(config, name)
        try:
            artifacts.require_same_identity(made.identity, store.identity, what)
            if made.class_names != list(store.class_names):
                raise UserError(f"{what} was trained for classes {made.class_names}, the cache "
                                f"has {list(store.class_names)}: retrain it with `make "
                                "train-head` (and `make finetune`)")
            usable_now[name] = made
        except UserError as refusal:
            refused[name] = refusal
    return usable_now, {name: refused[name] for name in NAMES if name in refused}


def load(config, name):
    """The model, loaded so that no code in its file can run: logreg from plain arrays
    (allow_pickle=False), Keras files in safe mode (which refuses Lambda layers)."""
    file_path = path(config, name)
    if name == "logreg":  # its arrays' shapes are checked against what its record says
        from .backbone import FeatureIdentity
        made = record(config, name, same_split=False)  # loading scores nothing
        expected = (math.prod(FeatureIdentity.read(made.identity).feature_shape),
                    len(made.class_names))
    try:
        if name == "logreg":
            from .heads import load_logreg
            return load_logreg(file_path, *expected)[0]
        import keras
        return keras.saving.load_model(file_path, compile=False, safe_mode=True)
    except Exception as error:  # safe mode and object arrays: ValueError; a bad zip: others
        reason = " ".join(str(error).split())[:160]
        raise UserError(f"{file_path} cannot be loaded safely ({type(error).__name__}: {reason}): "
                        f"rerun `{KINDS[name].make}`") from None


def predictor(config, name, calibrated=True):
    """A function from a batch of what the model takes (feature maps or images) to (n, classes)
    float64 class probabilities: the one way every stage and the bench score a model.
    calibrated: with the model's temperature applied (Record.temperature); False gives the
    network's own probabilities."""
    model = load(config, name)
    temperature = record(config, name, same_split=False).temperature if calibrated else 1.0
    if name == "logreg":
        raw = lambda x: np.asarray(model.predict_proba(np.asarray(x).reshape(len(x), -1)),
                                   np.float64)
    else:
        from .heads import class_probabilities
        # predict_on_batch: compiled by the backend, inference mode, numpy out (no autograd)
        raw = lambda x: class_probabilities(model.predict_on_batch(np.asarray(x)))
    return lambda x: calibration.apply_temperature(raw(x), temperature)


@dataclass(frozen=True)
class Evaluation:
    """What `make evaluate` wrote (evaluation.json): every model's scores on one split."""
    path: str
    split: str                # "test", or "validation" when the cache has no test rows
    images: int
    class_names: list
    identity: dict
    data_root: str            # where the scored images are, for the report's pictures
    weights_notice: str
    models: dict              # name -> accuracy, loss, roc_auc, confusion matrix, mistakes...
    projection: object = None   # unchecked here: the report's sections check what they show
    stage_times: object = None


def evaluation(config, required=True):
    """evaluation.json as an Evaluation; None when there is none and it is not `required`. Every
    value the report reads is checked first (types, ranges, the mistakes' paths relative to
    the data), so that an edited file is refused in one line naming `make evaluate`."""
    file_path = artifacts.path(config, artifacts.EVALUATION)
    if not required and not os.path.exists(file_path):
        return None
    e = artifacts.read_json(file_path, "run `make evaluate` first")
    check = Checker(file_path, "run `make evaluate` again")
    if not isinstance(e, dict):
        check.refuse("the whole file", e, "an object")
    if check(e, "split", str) not in ("test", "validation"):
        check.refuse("split", e["split"], "test or validation")
    check.number(e, "images", 0, integer=True)
    class_names = check.texts(e, "class_names")
    check(e, "identity", dict)
    check(e, "data_root", str, optional=True)
    check(e, "weights_notice", str, optional=True)
    models = check(e, "models", dict)
    for name, scores in models.items():
        if name not in KINDS:
            check.refuse("models", name, f"one of {', '.join(NAMES)}")
        _check_scores(check, scores, class_names, f"models.{name}.")
    return Evaluation(file_path, e["split"], int(e["images"]), list(class_names),
                      e["identity"], e.get("data_root", ""), e.get("weights_notice", ""), models,
                      e.get("projection"), e.get("stage_times"))


def _check_scores(check, scores, class_names, where):
    """One model's entry in evaluation.json, as evaluate.score writes it."""
    if not isinstance(scores, dict):
        check.refuse(where[:-1], scores, "an object")
    check.number(scores, "accuracy", 0, 1, where=where)
    check.number(scores, "loss", 0, nan=True, where=where)
    if scores.get("roc_auc") is not None:
        check.number(scores, "roc_auc", 0, 1, where=where)
    check.number(scores, "misclassified_count", 0, integer=True, where=where)
    for row_name, row in check(scores, "classification_report", dict, where=where).items():
        if isinstance(row, dict):  # per class and the averages; "accuracy" is a bare number
            for key in ("precision", "recall", "f1-score"):
                check.number(row, key, 0, 1, optional=True, where=f"{where}{row_name}.")
            check.number(row, "support", 0, optional=True, where=f"{where}{row_name}.")
    for i, mistake in enumerate(check(scores, "misclassified", list, where=where)):
        at = f"{where}misclassified[{i}]."
        if not isinstance(mistake, dict):
            check.refuse(at[:-1], mistake, "an object")
        path = check(mistake, "path", str, where=at)
        # relative to the data, inside it: as evaluate writes the cache's paths
        if not path or os.path.isabs(path) or ".." in path.replace("\\", "/").split("/"):
            check.refuse(at + "path", path, "a path inside the data folder")
        for key in ("true", "predicted"):
            if check(mistake, key, str, where=at) not in class_names:
                check.refuse(at + key, mistake[key], "one of class_names")
        check.number(mistake, "probability", 0, 1, where=at)
