"""Classifier heads on a backbone's feature map: the dense Keras head and the logistic baseline.

The dense head is built by one function, `build_dense_head`, used by stage two (trained on cached
features) and stage three (composed with the backbone and fine-tuned), so both share one design.
"""
import json

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from ..config import terminal_text

CLASS_WEIGHT_RATIO = 1.5  # CLASS_WEIGHT=auto weighs the classes past this largest/smallest ratio


def build_dense_head(feature_shape, num_classes, hidden_units, dropout, pool=1, name="head",
                     standardize=(0.0, 1.0)):
    """standardisation -> [AveragePooling2D(pool)] -> Flatten -> Dense(hidden_units, relu) ->
    Dropout -> one sigmoid unit (2 classes) or softmax (HIDDEN_UNITS, DROPOUT and HEAD_POOL in
    config.py). `standardize` is (mean feature map, one scale) of the training features.

    The article flattens the whole (4, 4, 512) map into 8192 inputs: 2.1M weights for 2000
    training images, which it memorises (train accuracy 0.96, validation 0.76 on cats_vs_dogs
    with the stand-in weights). Averaging 2x2 cells first (HEAD_POOL=2, the default) keeps a coarse
    layout at a quarter of the weights: see bench/QUALITY_NOTES.md."""
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    # The standardisation is a fixed layer of the head, not folded into the first Dense layer's
    # weights: the weights stay at the scale they were trained at, so fine-tuning's learning rate
    # means the same for the head whatever the features' scale (folded, the per-weight steps of
    # Adam and RMSprop were scale (~8x) times larger on them: bench/QUALITY_NOTES.md).
    mean, scale = standardize
    shape = tuple(feature_shape)
    x = keras.layers.Normalization(axis=(1, 2, 3), name="standardize",
                                   mean=np.broadcast_to(np.asarray(mean, np.float32), shape),
                                   variance=np.full(shape, scale ** 2, np.float32))(inputs)
    # never below a 2x2 layout: averaging a 2x2 map (SIZE=64, the demo) into one cell loses the
    # where-is-what that tells its two classes apart (dense head 0.79 -> 0.56 on validation)
    pool = min(pool, feature_shape[0] // 2, feature_shape[1] // 2)
    if pool > 1:  # "same": an odd side (SIZE=224: 7) keeps its last row and column
        x = keras.layers.AveragePooling2D(pool, padding="same")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(hidden_units, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    if num_classes == 2:
        outputs = keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
    else:
        outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def optimizer(learning_rate):
    """The dense head's optimizer (HEAD_LR). Adam, not the article's RMSprop: on cats_vs_dogs its
    heads stop at a lower validation loss, from the same start (bench/QUALITY_NOTES.md)."""
    return keras.optimizers.Adam(learning_rate)


def loss_for(num_classes):
    return "binary_crossentropy" if num_classes == 2 else "sparse_categorical_crossentropy"


def class_probabilities(outputs):
    """Model outputs -> (n, num_classes) probabilities, for sigmoid and softmax heads alike."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=1)
    return outputs


def class_weights(setting, train_labels, class_names):
    """(weights, record) for CLASS_WEIGHT=`setting` and the training rows' labels. weights:
    {class index: weight} as Keras's fit and scikit-learn take it, or None to weigh nothing.
    "balanced" always weighs, "none" never, "auto" when the largest class has more than
    CLASS_WEIGHT_RATIO times the images of the smallest. A class's weight is
    images / (classes x its images) (scikit-learn's "balanced"), so the weighted classes count
    alike and the weights average 1 over the images. record: what the metrics keep, the
    setting, each class's training images and weight (null when nothing was weighed)."""
    labels = np.asarray(train_labels).astype(np.int64)
    counts = np.bincount(labels, minlength=len(class_names))
    present = np.flatnonzero(counts)
    weigh = setting == "balanced" or (
        setting == "auto" and len(present) and counts.max() > CLASS_WEIGHT_RATIO
        * counts[present].min())
    weights = None
    if weigh:  # a class absent from training keeps weight 1: it has no loss to weigh
        balanced = compute_class_weight("balanced", classes=present, y=labels)
        weights = {int(c): 1.0 for c in range(len(class_names))}
        weights.update({int(c): float(w) for c, w in zip(present, balanced)})
    record = {"setting": setting,
              "train_images": {name: int(n) for name, n in zip(class_names, counts)},
              "weights": None if weights is None else
              {name: weights[c] for c, name in enumerate(class_names)}}
    return weights, record


def describe_weighting(record):
    """One line on what class_weights' `record` weighed, for the console (class names are
    someone else's text: made inert for the terminal)."""
    counts = ", ".join(f"{terminal_text(name)} {n}" for name, n in record["train_images"].items())
    if record["weights"] is None:
        why = ("CLASS_WEIGHT=none" if record["setting"] == "none" else
               f"CLASS_WEIGHT=auto, the largest class has at most {CLASS_WEIGHT_RATIO:g}x "
               "the images of the smallest")
        return f"classes not weighted ({why}; training images: {counts})"
    weights = ", ".join(f"{terminal_text(name)} {w:.3g}" for name, w in record["weights"].items())
    return (f"classes weighted (CLASS_WEIGHT={record['setting']}; training images: {counts}; "
            f"weights: {weights})")


def logistic_regression(C=1.0, seed=0, class_weight=None):
    """The in-memory classifier of the logreg baseline (lbfgs; keeps float32 features float32).
    class_weight: {class index: weight} (class_weights), or None."""
    return LogisticRegression(C=C, max_iter=1000, random_state=seed, class_weight=class_weight)


def sgd_logistic_regression(C, n_samples, seed=0, class_weight=None):
    """The same model fitted out of core, one block at a time with partial_fit. SGD minimises
    mean(loss) + alpha/2 |w|^2 and LogisticRegression C * sum(loss) + 1/2 |w|^2: equal when
    alpha = 1 / (C * n_samples), so one C grid serves both. class_weight as above."""
    return SGDClassifier(loss="log_loss", alpha=1.0 / (C * n_samples), random_state=seed,
                         class_weight=class_weight)


# The fitted arrays of a logreg pipeline, saved as .npz and read back with allow_pickle=False:
# unlike a joblib (pickle) file, loading it can never run code, whoever put it in models/<NAME>.
LOGREG_FORMAT = "pipeline.heads logreg npz v1"  # a file format: the name predates model/heads.py
ESTIMATORS = {"LogisticRegression": logistic_regression,
              "SGDClassifier": lambda: SGDClassifier(loss="log_loss")}


def save_logreg(file, pipeline, metadata):
    """Write a fitted StandardScaler + LogisticRegression/SGDClassifier and a JSON-able dict of
    metadata (config, identity, class names) to `file` (a path or an open binary file)."""
    scaler, classifier = pipeline[0], pipeline[-1]
    metadata = {**metadata, "format": LOGREG_FORMAT, "estimator": type(classifier).__name__}
    np.savez(file, scaler_mean=scaler.mean_, scaler_scale=scaler.scale_, scaler_var=scaler.var_,
             coef=classifier.coef_, intercept=classifier.intercept_, classes=classifier.classes_,
             metadata=np.array(json.dumps(metadata, sort_keys=True)))


def load_logreg(file, features=None, classes=None):
    """(pipeline, metadata) from `save_logreg`'s file; predict_proba gives what the original did.
    Its arrays are numbers of the shapes a model of `features` inputs (a flattened feature map)
    and `classes` classes has, when given, and agree with each other: else ValueError, instead
    of a traceback from inside scikit-learn when the model is used."""
    with np.load(file, allow_pickle=False) as arrays:
        metadata = json.loads(str(arrays["metadata"]))
        if metadata.get("format") != LOGREG_FORMAT or metadata.get("estimator") not in ESTIMATORS:
            raise ValueError(f"not a {LOGREG_FORMAT} file")
        _check_logreg_shapes(arrays, features, classes)
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_, scaler.var_ = (arrays[k] for k in
                                                    ("scaler_mean", "scaler_scale", "scaler_var"))
        classifier = ESTIMATORS[metadata["estimator"]]()
        classifier.coef_, classifier.intercept_, classifier.classes_ = (
            arrays[k] for k in ("coef", "intercept", "classes"))
    scaler.n_features_in_ = classifier.n_features_in_ = len(scaler.mean_)
    return make_pipeline(scaler, classifier), metadata


def logreg_network(pipeline, feature_shape, name="logreg"):
    """A fitted logreg pipeline (`load_logreg`) as a Keras model of the same feature maps:
    Flatten, the scaler as a Normalization layer and the classifier's weights as one Dense
    layer, giving predict_proba's probabilities (float32 arithmetic, not float64): a sigmoid
    unit for two classes; a softmax, or for SGDClassifier's one-vs-rest normalised sigmoids,
    for more."""
    scaler, classifier = pipeline[0], pipeline[-1]
    coef = np.asarray(classifier.coef_, np.float32)
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Normalization(mean=np.asarray(scaler.mean_, np.float32),
                                   variance=np.asarray(scaler.scale_, np.float32) ** 2,
                                   name="standardize")(x)
    one_vs_rest = len(coef) > 1 and type(classifier).__name__ == "SGDClassifier"
    activation = "sigmoid" if len(coef) == 1 or one_vs_rest else "softmax"
    dense = keras.layers.Dense(len(coef), activation=activation, name="classifier")
    outputs = dense(x)
    dense.set_weights([coef.T, np.asarray(classifier.intercept_, np.float32)])
    if one_vs_rest:
        outputs = outputs / keras.ops.sum(outputs, axis=-1, keepdims=True)
    return keras.Model(inputs, outputs, name=name)


def _check_logreg_shapes(arrays, features, classes):
    coef = arrays["coef"]
    if coef.ndim != 2:
        raise ValueError(f"coef has shape {coef.shape}, not (outputs, features)")
    features = coef.shape[1] if features is None else features
    outputs = coef.shape[0] if classes is None else 1 if classes == 2 else classes
    classes = len(arrays["classes"]) if classes is None else classes
    for key, shape in (("coef", (outputs, features)), ("intercept", (outputs,)),
                       ("classes", (classes,)), ("scaler_mean", (features,)),
                       ("scaler_scale", (features,)), ("scaler_var", (features,))):
        if arrays[key].shape != shape or arrays[key].dtype.kind not in "iuf":
            raise ValueError(f"{key} is {arrays[key].dtype} of shape {arrays[key].shape}, not "
                             f"numbers of shape {shape}")
