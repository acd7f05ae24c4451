"""Is the dense head below logreg, or is that one split's draw? Both models, trained as the
pipeline trains them, on R random re-splits of the cached images (bench/QUALITY_NOTES.md, section
g). `make bench`'s `resplits` phase (BENCH_ACCURACY=1, BENCH_RESPLITS) runs the shipped head;
this script also runs variants of it:

    [R=30] [VARIANTS=shipped,pool1,...] PYTHONPATH=. .venv/bin/python bench/resplit.py FEATURES_DIR

Every re-split keeps the cache's split sizes (cats_vs_dogs: 2,000 train, 522 validation, 478
test) and each class's share of the whole. Logreg: StandardScaler, one LogisticRegression per C
of C_GRID, the lowest validation loss kept (train_head.train_logreg). The dense head:
heads.build_dense_head with the config's settings, Adam at HEAD_LR, EarlyStopping on val_loss
with its best weights restored (train_head.train_dense, but fed from memory and shuffled whole
each epoch, where train_dense reads shuffled blocks of the cache). The pipeline's own split runs
first, as a control left out of the means.

The re-splits share their photos, so their gaps are not independent: the interval of the mean
gap is Nadeau and Bengio's corrected one (`mean_interval`), about 3x wider than the plain
t-interval here.
"""
import json
import os
import sys
import time

from pipeline import runtime

runtime.start(os.environ.get("BACKEND", ""))  # before Keras is imported (as bench.py does)

# isort: split
import keras  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402  (scikit-learn's own dependency)
from sklearn.metrics import log_loss  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from pipeline import cache, heads  # noqa: E402
from pipeline.config import Config  # noqa: E402

SPLITS = ("train", "validation", "test")
VARIANTS = {  # name: changes to the config's head settings; "cells": the map averaged first
    "shipped": {},
    "pool1": {"head_pool": 1},  # the article's flattened 4x4 map
    "units_64": {"hidden_units": 64},
    "dropout_0.7": {"dropout": 0.7},
    "lr_3e-5": {"head_lr": 3e-5},
    # the map averaged to one cell (global average pooling), which HEAD_POOL never reaches:
    # build_dense_head keeps at least a 2x2 layout
    "gap": {"cells": 1},
    "gap_lr_3e-4": {"cells": 1, "head_lr": 3e-4},
    "gap_lr_1e-3": {"cells": 1, "head_lr": 1e-3},
}


def figures(config, repeats):
    """`make bench`'s figures: the shipped head's mean gap over logreg across `repeats`
    re-splits of config's cache, with its 95% interval, per split; and the re-splits where
    the head is at or above logreg."""
    gaps, sizes = dense_against_logreg(config, repeats, ["shipped"])
    out = {"resplit_count": repeats}
    for split, suffix in (("validation", ""), ("test", "_test")):
        key = f"resplit_dense_minus_logreg{suffix}"
        out[key], out[f"{key}_ci95_low"], out[f"{key}_ci95_high"] = mean_interval(
            gaps["shipped"][split], sizes[split], sizes["train"])
        out[f"resplit_dense_ge_logreg{suffix}"] = int(np.sum(np.asarray(gaps["shipped"][split])
                                                             >= 0))
    return out


def dense_against_logreg(config, repeats, variants, log=print):
    """({variant: {validation: [gap per re-split], test: [...]}}, {split: size}), where a gap
    is dense - logreg accuracy; one JSON line per re-split to `log`."""
    if repeats < 2:
        raise ValueError(f"{repeats} re-splits: use at least 2 (an interval needs two)")
    x, y, own = load(config.features_dir)
    sizes = {split: len(rows) for split, rows in own.items()}
    gaps = {name: {"validation": [], "test": []} for name in variants}
    for r in range(-1, repeats):  # -1: the pipeline's own split, a control left out of the means
        split = own if r < 0 else random_split(y, sizes, seed=r)
        start = time.perf_counter()
        record = {"resplit": r if r >= 0 else "the pipeline's own",
                  "logreg": accuracies(fit_logreg(x, y, split, config), y, split)}
        for name in variants:
            record[name] = accuracies(fit_dense(x, y, split, config, VARIANTS[name]), y, split)
            if r >= 0:
                for k in gaps[name]:
                    gaps[name][k].append(record[name][k] - record["logreg"][k])
        log(json.dumps({**record, "seconds": round(time.perf_counter() - start, 1)}))
    return gaps, sizes


def load(features_dir):
    """Every image's plain (unaugmented) features and label, and the pipeline's own split as
    indices into them."""
    with cache.FeatureStore(features_dir) as store:
        rows = {split: store.rows(split) for split in SPLITS}
        every = np.concatenate(list(rows.values()))
        starts = np.cumsum([0] + [len(r) for r in rows.values()])
        own = {split: np.arange(starts[i], starts[i + 1]) for i, split in enumerate(SPLITS)}
        return store.read(every), store.labels[every].astype(np.int64), own


def random_split(labels, sizes, seed):
    """{split: indices}, drawn at random: the given split sizes, each class's share kept."""
    rng = np.random.default_rng(seed)
    parts = {split: [] for split in sizes}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        share, start = len(members) / len(labels), 0
        for i, (split, size) in enumerate(sizes.items()):  # the last split takes the rest
            stop = start + round(size * share) if i < len(sizes) - 1 else len(members)
            parts[split].append(members[start:stop])
            start = stop
    return {split: rng.permutation(np.concatenate(p)) for split, p in parts.items()}


def accuracies(predicted, y, split):
    return {k: round(float(np.mean(p == y[split[k]])), 4) for k, p in predicted.items()}


def fit_logreg(x, y, split, config):
    x = x.reshape(len(x), -1)  # logreg reads the flattened map
    scaler = StandardScaler().fit(x[split["train"]])
    standard = {k: scaler.transform(x[rows]) for k, rows in split.items()}
    candidates = []
    for C in config.c_values:
        model = heads.logistic_regression(C, config.seed).fit(standard["train"],
                                                              y[split["train"]])
        validation = model.predict_proba(standard["validation"])
        candidates.append((log_loss(y[split["validation"]], validation, labels=model.classes_),
                           -np.mean(validation.argmax(1) == y[split["validation"]]), model))
    best = min(candidates, key=lambda c: c[:2])[2]  # train_logreg's order: loss, then accuracy
    return {k: best.predict(standard[k]) for k in ("validation", "test")}


def fit_dense(x, y, split, config, changes):
    changes = dict(changes)
    if "cells" in changes:
        x = average_cells(x, changes.pop("cells"))
    config = config.replace(**changes)
    keras.backend.clear_session()  # one graph per head, not 31 x variants piling up
    runtime.set_seed(config.seed)
    train = x[split["train"]].astype(np.float64)
    # as train_head.feature_moments: the mean feature map and one scale
    mean, scale = train.mean(axis=0), float(np.sqrt(np.mean(train.var(axis=0))))
    classes = int(y.max()) + 1
    head = heads.build_dense_head(x.shape[1:], classes, config.hidden_units, config.dropout,
                                  config.head_pool, standardize=(mean.astype(np.float32), scale))
    head.compile(heads.optimizer(config.head_lr), heads.loss_for(classes), metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                         restore_best_weights=True)
    # as train_dense: a sigmoid head takes (n, 1) float targets, a softmax head class indices
    targets = y.astype(np.float32)[:, None] if classes == 2 else y.astype(np.int32)
    head.fit(x[split["train"]], targets[split["train"]], batch_size=config.batch_size,
             epochs=config.epochs, verbose=0, callbacks=[stop],
             validation_data=(x[split["validation"]], targets[split["validation"]]))
    return {k: heads.class_probabilities(head.predict(x[split[k]], batch_size=256, verbose=0))
            .argmax(1) for k in ("validation", "test")}


def average_cells(x, cells):
    """(n, side, side, c) feature maps averaged to (n, cells, cells, c)."""
    n, side, _, channels = x.shape
    step = side // cells
    return x.reshape(n, cells, step, cells, step, channels).mean(axis=(2, 4))


def mean_interval(values, n_scored, n_train):
    """The mean gap over re-splits and its 95% interval. Re-splits of one set of photos overlap,
    so the plain t-interval (variance / R) is too narrow: Nadeau & Bengio's correction (Machine
    Learning 52, 2003) takes variance x (1/R + n_scored/n_train) instead."""
    values = np.asarray(values, dtype=np.float64)
    variance = values.var(ddof=1) * (1 / len(values) + n_scored / n_train)
    half = stats.t.ppf(0.975, len(values) - 1) * np.sqrt(variance)
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


if __name__ == "__main__":
    repeats, chosen = int(os.environ.get("R") or 30), os.environ.get("VARIANTS", "shipped")
    features = os.path.abspath(sys.argv[1])
    config = Config(features_root=os.path.dirname(features), name=os.path.basename(features))
    gaps, sizes = dense_against_logreg(config, repeats, chosen.split(","),
                                       log=lambda line: print(line, flush=True))
    for name, by_split in gaps.items():
        summary = {}
        for split, values in by_split.items():
            summary[f"{split}_gap_mean_ci95"] = [round(v, 4) for v in mean_interval(
                values, sizes[split], sizes["train"])]
            summary[f"{split}_resplits_dense_ge_logreg"] = int(np.sum(np.asarray(values) >= 0))
        print(json.dumps({"variant": name, "resplits": repeats, **summary}), flush=True)
