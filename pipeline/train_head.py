"""Stage two: classifier heads trained on the cached feature maps, in seconds instead of hours.

    python -m pipeline train-head [--name NAME] [--head dense|logreg|both] [--epochs 30] [--seed 0]

dense:  heads.build_dense_head trained with Keras `fit`, streaming features from the cache
        -> models/<NAME>/head.keras, head_checkpoint.keras, head_log.csv, head_history.png
logreg: StandardScaler + LogisticRegression, C chosen on the validation split
        -> models/<NAME>/logreg.npz (plain arrays: loading it runs no code)
both:   -> models/<NAME>/head_metrics.json (validation/test metrics and the cache identity)
"""
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass

import keras
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, log_loss
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from . import cache
from .cache import batches, settings, views
from .cache.batches import CachedFeatures, one_line_on_damage
from .config import Config, UserError, warn
from .fs import artifacts, files
from .model import backbone, calibration, heads, logs, runtime
from .reporting import plots

STANDARDIZE = True           # False: train on raw feature maps, as the article does
LOGREG_MEMORY_MB = 256       # train features up to this size are fitted in memory, else SGD
XLA_MIN_ROWS = 1000          # train the dense head with XLA from this many training rows
SGD_EPOCHS = 5               # passes over the cache for the out-of-core logreg


@dataclass
class TrainHeadResult:
    metrics: dict            # what head_metrics.json holds
    paths: dict              # what -> file written in models/<NAME>/
    seconds: float


def run(config: Config, *, callbacks=(), logreg_memory_mb=LOGREG_MEMORY_MB) -> TrainHeadResult:
    """Train the heads of HEAD on the cache. `callbacks` join the dense head's Keras fit (the
    bench times epochs with one); past `logreg_memory_mb` of training features, logreg is fitted
    out of core. Holds models/<NAME>'s lock: two train-heads (or one beside a finetune, an
    evaluate or a report) would each save a model the other's metrics do not describe."""
    return settings.run(config, "train-head",
                        lambda resolved: _train(resolved, callbacks, logreg_memory_mb),
                        config.models_dir)


def _train(config, callbacks, logreg_memory_mb):
    start = time.perf_counter()
    runtime.set_seed(config.seed)  # python, numpy, the backend and Keras: weights, dropout
    with cache.FeatureStore(config.features_dir) as store:
        rows = {split: store.rows(split) for split in ("train", "validation", "test")}
        _check_trainable(store, rows)
        _check_views(config, store)  # before logreg's minutes: the dense head would refuse
        metrics_path = artifacts.path(config, artifacts.HEAD_METRICS)
        metrics = {"identity": store.identity, "identity_id": backbone.identity_id(store.identity),
                   "split_digest": store.split_digest(),  # registry.record checks it
                   "class_names": list(store.class_names), "config": config.to_dict(),
                   "weights_notice": store.attrs.get("weights_notice", ""),
                   "versions": backbone.library_versions(),  # the backend among them
                   "models": _kept_models(metrics_path, store, config.head)}
        paths = committed_paths(config)
        os.makedirs(config.models_dir, exist_ok=True)
        # One commit: every file goes to a temporary and they replace the old ones together,
        # head_metrics.json (which names the models by their sha256) last. A failure anywhere,
        # a full disk among them, leaves every old file as it was, each still the one its
        # metrics describe.
        with files.replacing_together(paths.values()) as temporary:
            # logreg first: its in-memory features are freed before TensorFlow's runtime starts
            if "logreg" in paths:
                metrics["models"]["logreg"] = train_logreg(config, store, rows, logreg_memory_mb,
                                                           temporary[paths["logreg"]])
            if "dense" in paths:
                metrics["models"]["dense"] = train_dense(
                    config, store, rows, callbacks,
                    {what: temporary[paths[what]] for what in ("dense", "plot")})
            artifacts.write_json(temporary[metrics_path], metrics)
    legacy = artifacts.path(config, artifacts.LEGACY_LOGREG)
    if "logreg" in paths and os.path.exists(legacy):
        os.remove(legacy)  # the pickle of an earlier version, replaced by logreg.npz
    if "dense" in paths:
        paths.update(working_paths(config))
    result = TrainHeadResult(metrics, paths, time.perf_counter() - start)
    _print_summary(config, result)
    return result


def committed_paths(config):
    """What -> path of the files HEAD's run replaces as one commit, head_metrics.json last."""
    paths = {}
    if config.head in ("logreg", "both"):
        paths["logreg"] = artifacts.path(config, artifacts.LOGREG)
    if config.head in ("dense", "both"):
        paths.update(dense=artifacts.path(config, artifacts.HEAD),
                     plot=artifacts.path(config, artifacts.HEAD_HISTORY_PLOT))
    return {**paths, "metrics": artifacts.path(config, artifacts.HEAD_METRICS)}


def working_paths(config):
    """The dense head's working files, written while it trains (outside the commit)."""
    return {"checkpoint": artifacts.path(config, artifacts.HEAD_CHECKPOINT),
            "log": artifacts.path(config, artifacts.HEAD_LOG)}


def _check_trainable(store, rows):
    """Refuse a cache that cannot train a classifier, naming the fix."""
    if len(rows["train"]) == 0:
        raise UserError(f"{store.path} has no rows in the train split: add images (DATA/<class>/ "
                        "or DATA/train/<class>/) and rerun `make extract`")
    names = list(store.class_names)
    if len(names) < 2:
        raise UserError(f"{store.path} has only one class {names}: a classifier needs at least "
                        "two, so add a folder of images per class and rerun `make extract`")
    missing = [names[c] for c in range(len(names)) if not np.any(store.labels[rows["train"]] == c)]
    if missing:
        raise UserError(f"the train split of {store.path} has no images of class(es) {missing}: "
                        "add images of every class and rerun `make extract`")
    if len(rows["validation"]) == 0:
        raise UserError(f"{store.path} has no rows in the validation split, which picks the best "
                        "epoch and C: rerun `make extract` with SPLIT=80/10/10 (or add "
                        "DATA/validation/<class>/ folders)")


def _check_views(config, store):
    """The dense head reads the views of the last extract: AUGMENT=K (K > 0) asks for exactly K,
    and a cache with others would be trained on without a word. AUGMENT=0 takes what is there."""
    if config.head != "logreg" and 0 < config.augment != store.views:
        raise UserError(f"AUGMENT={config.augment} but {store.path} holds {store.views} augmented "
                        f"view(s) per training image: run `make extract AUGMENT={config.augment}` "
                        "first (only views not yet cached are computed)")


def _kept_models(metrics_path, store, head):
    """HEAD=dense or HEAD=logreg keeps the other model's entry, if made on these same features."""
    if head == "both" or not os.path.exists(metrics_path):
        return {}
    with files.open_regular(metrics_path, fix="remove it, then run `make train-head` again") as f:
        try:
            old = json.load(f)
        except ValueError:  # half written, or not ours: the other model is retrained later
            return {}
    if not isinstance(old, dict) or not isinstance(old.get("models"), dict):
        return {}
    if old.get("identity") != store.identity or old.get("class_names") != list(store.class_names) \
            or old.get("split_digest") != store.split_digest():  # trained on another split
        return {}
    other = "logreg" if head == "dense" else "dense"
    return {other: old["models"][other]} if other in old.get("models", {}) else {}


# --------------------------------------------------------------------------------------------
# The standardisation's moments
# --------------------------------------------------------------------------------------------

def feature_moments(store, rows):
    """The mean feature map of `rows` and one global scale (the RMS deviation from that mean),
    in one streamed pass with float64 sums."""
    total, squares = 0.0, 0.0
    for _, features in store.blocks(rows):
        features = features.astype(np.float64)
        total, squares = total + features.sum(axis=0), squares + (features ** 2).sum(axis=0)
    mean = total / len(rows)
    scale = float(np.sqrt(max(np.mean(squares / len(rows) - mean ** 2), 0.0)))
    return mean.astype(np.float32), scale if scale > 0 else 1.0


# --------------------------------------------------------------------------------------------
# The dense head
# --------------------------------------------------------------------------------------------

def train_dense(config, store, rows, callbacks, out):
    """Train the dense head; save it and its history plot to out["dense"] and out["plot"]
    (the caller's temporaries); returns its head_metrics.json entry."""
    names, shape = list(store.class_names), store.features.shape[1:]
    # sigmoid head: float targets of shape (n, 1); softmax head: integer class indices
    targets = (store.labels.astype(np.float32)[:, None] if len(names) == 2
               else store.labels.astype(np.int32))
    weights, weighting = class_weights(config, store, rows)
    # with AUGMENT views in the cache, each epoch reads every training image as another view
    train = CachedFeatures(store, rows["train"], targets, config.batch_size, seed=config.seed,
                           read=views.epoch_reader(store, config.seed))
    validation = CachedFeatures(store, rows["validation"], targets, config.batch_size)
    paths = working_paths(config)

    # The head standardises its inputs, (x - mean feature map) / one scale, with a fixed layer:
    # without it, features that share a large common component (random weights especially)
    # keep the head near chance for dozens of epochs.
    mean, scale = feature_moments(store, rows["train"]) if STANDARDIZE else (0.0, 1.0)
    head = heads.build_dense_head(shape, len(names), config.hidden_units, config.dropout,
                                  config.head_pool, standardize=(mean, scale))
    # XLA fuses the update of the 2M weights into one pass: epochs about 2x faster on a CPU at
    # BATCH_SIZE=32, for a compilation of a few seconds that only a large training split repays
    xla = len(rows["train"]) >= XLA_MIN_ROWS
    # the head's own layers, compiled apart: head.keras then carries no optimizer state
    trainer = _compiled(keras.Model(head.inputs, head.outputs, name="head_trainer"),
                        len(names), config.head_lr, xla)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                         restore_best_weights=True)
    board = logs.tensorboard(config, "head")  # models/<NAME>/logs/head, None without a writer
    # Keras opens these two by name: a link planted there is removed first, never written through
    callbacks = [batches.FollowEpochs(train), stop,  # each epoch reads its own views and order
                 keras.callbacks.ModelCheckpoint(files.no_link(paths["checkpoint"])),
                 keras.callbacks.CSVLogger(files.no_link(paths["log"])), *callbacks,
                 *([board] if board else [])]
    start = time.perf_counter()
    with one_line_on_damage(store):
        history = trainer.fit(train, validation_data=validation, epochs=config.epochs,
                              callbacks=callbacks, class_weight=weights,  # validation: unweighted
                              shuffle=False,  # the dataset shuffles
                              verbose=1 if sys.stdout.isatty() else 2).history  # a line an epoch
    seconds = time.perf_counter() - start

    head.save(out["dense"])

    _compiled(head, len(names), config.head_lr)  # after saving: no unused optimizer in the file
    with one_line_on_damage(store):
        entry = {"validation": _evaluate_dense(head, validation),
                 "calibration": calibration.fit_model(head, validation,
                                                      store.labels[rows["validation"]])}
        if len(rows["test"]):
            test = CachedFeatures(store, rows["test"], targets, config.batch_size)
            entry["test"] = _evaluate_dense(head, test)
    # file_sha256 ties the file to these metrics
    entry.update(file_sha256=artifacts.file_sha256(out["dense"]),
                 epochs=len(history["loss"]), best_epoch=int(stop.best_epoch) + 1,  # 1-based
                 views=int(store.views),  # augmented views per training image it read
                 class_weight=weighting,
                 seconds=seconds, history={k: [float(v) for v in history[k]] for k in
                                           ("accuracy", "val_accuracy", "loss", "val_loss")})
    notice = store.attrs.get("weights_notice", "")
    plots.plot_history([("head", entry["history"])], out["plot"],
                       f"{config.dataset_name}: dense head on cached features"
                       + (f" ({notice})" if notice else ""))
    return entry


def class_weights(config, store, rows):
    """heads.class_weights of CLASS_WEIGHT on the training rows: (weights for the fit, record)."""
    return heads.class_weights(config.class_weight, store.labels[rows["train"]],
                               list(store.class_names))


def _compiled(model, num_classes, learning_rate, xla=False):
    model.compile(optimizer=heads.optimizer(learning_rate),
                  loss=heads.loss_for(num_classes), metrics=["accuracy"], jit_compile=xla)
    return model


def _evaluate_dense(model, dataset):
    scores = model.evaluate(dataset, verbose=0, return_dict=True)
    return {"accuracy": float(scores["accuracy"]), "loss": float(scores["loss"])}


# --------------------------------------------------------------------------------------------
# The logistic-regression baseline
# --------------------------------------------------------------------------------------------

def train_logreg(config, store, rows, memory_mb, out):
    """Fit one candidate per C on train, keep the one with the lowest validation loss. In memory
    when the training features fit `memory_mb`, else out of core: SGD with log loss on streamed
    blocks, the same model fitted approximately. Saves it to `out` (the caller's temporary);
    returns its head_metrics.json entry."""
    budget = memory_mb * 2**20
    row_bytes = 4 * int(np.prod(store.features.shape[1:]))
    in_memory = len(rows["train"]) * row_bytes <= budget
    start = time.perf_counter()
    fit = _fit_in_memory if in_memory else _fit_out_of_core
    grid = config.c_values  # one candidate per C, the one with the lowest validation loss kept
    weights, weighting = class_weights(config, store, rows)
    candidates = fit(store, rows["train"], len(store.class_names), grid, config.seed, weights)
    scores, probabilities = _evaluate_pipelines(store, rows["validation"], candidates)
    best = min(range(len(grid)), key=lambda i: (scores[i]["loss"], -scores[i]["accuracy"]))
    model = candidates[best]
    seconds = time.perf_counter() - start

    entry = {"validation": scores[best], "calibration": calibration.fit(
        probabilities[best], store.labels[rows["validation"]])}
    if len(rows["test"]):
        entry["test"] = _evaluate_pipelines(store, rows["test"], [model])[0][0]
    entry.update(C=grid[best], seconds=seconds, solver="lbfgs" if in_memory else "sgd",
                 class_weight=weighting,
                 validation_by_C={str(c): s for c, s in zip(grid, scores)})
    metadata = {"class_names": list(store.class_names), "identity": store.identity,
                "config": config.to_dict()}
    files.atomic_write(out, lambda f: heads.save_logreg(f, model, metadata))
    entry["file_sha256"] = artifacts.file_sha256(out)  # ties the file to these metrics
    return entry


def _fit_in_memory(store, train_rows, num_classes, grid, seed, class_weight=None):
    # The training features are held once, standardised in place; the scaler's statistics are
    # gathered block by block, as its fit on the whole array would make a float64 copy of it.
    x = np.empty((len(train_rows), int(np.prod(store.features.shape[1:]))), np.float32)
    scaler, start = StandardScaler(), 0
    for _, features in store.blocks(train_rows):
        x[start:start + len(features)] = features.reshape(len(features), -1)
        scaler.partial_fit(x[start:start + len(features)])
        start += len(features)
    for start in range(0, len(x), cache.READ_BLOCK):
        block = slice(start, start + cache.READ_BLOCK)
        x[block] = scaler.transform(x[block])
    y = store.labels[train_rows]
    candidates = []
    for C in tqdm(grid, desc="logreg (one fit per C)", leave=False):
        with warnings.catch_warnings():  # a weakly regularised fit may stop at max_iter: fine
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = heads.logistic_regression(C, seed, class_weight).fit(x, y)
            candidates.append(make_pipeline(scaler, model))
    return candidates


def _fit_out_of_core(store, train_rows, num_classes, grid, seed, class_weight=None):
    scaler = StandardScaler()
    for _, features in store.blocks(train_rows):
        scaler.partial_fit(features.reshape(len(features), -1))
    models = [heads.sgd_logistic_regression(C, len(train_rows), seed, class_weight)
              for C in grid]
    classes = np.arange(num_classes)
    progress = tqdm(total=SGD_EPOCHS * len(train_rows), desc="logreg (SGD, out of core)",
                    unit="row", leave=False)
    for epoch in range(SGD_EPOCHS):  # every candidate sees each block, so one read serves all
        shuffled = np.random.default_rng([seed, epoch])
        for indices in batches.block_plan(train_rows, cache.READ_BLOCK, shuffled):
            features = store.read(indices)
            x = scaler.transform(features.reshape(len(features), -1), copy=False)
            for model in models:
                model.partial_fit(x, store.labels[indices], classes=classes)
            progress.update(len(indices))
    progress.close()
    return [make_pipeline(scaler, model) for model in models]


def _evaluate_pipelines(store, rows, pipelines):
    """([accuracy and log loss], [(n, classes) probabilities]) of each fitted pipeline on
    `rows`, streaming the features once."""
    probabilities = [[] for _ in pipelines]
    for _, features in store.blocks(rows):
        x = features.reshape(len(features), -1)
        for out, pipeline in zip(probabilities, pipelines):
            out.append(pipeline.predict_proba(x))
    y = store.labels[rows]
    labels = np.arange(len(store.class_names))
    scores, stacked = [], [np.concatenate(out) for out in probabilities]
    for p in stacked:
        scores.append({"accuracy": float(accuracy_score(y, p.argmax(axis=1))),
                       "loss": float(log_loss(y, p, labels=labels))})
    return scores, stacked


def _print_summary(config, result):
    parts = []
    for name, entry in result.metrics["models"].items():
        if config.head in (name, "both"):
            detail = (f"best epoch {entry['best_epoch']} of {entry['epochs']}" if name == "dense"
                      else f"C={entry['C']:g}, {entry['solver']}")
            fitted = entry.get("calibration", {})
            parts.append(f"{name} val acc {entry['validation']['accuracy']:.3f} ({detail}, "
                         f"T={fitted.get('temperature', 1.0):.2f}, {entry['seconds']:.1f} s)")
            if fitted.get("note"):
                warn(f"{name}: {fitted['note']}")
    print(f"train-head {config.dataset_name}: {'; '.join(parts)} -> {result.paths['metrics']}")
    weighting = next((entry["class_weight"] for name, entry in result.metrics["models"].items()
                      if config.head in (name, "both")), None)
    if weighting:
        print(f"train-head {config.dataset_name}: {heads.describe_weighting(weighting)}")
    if result.metrics["weights_notice"]:
        warn(result.metrics["weights_notice"])
