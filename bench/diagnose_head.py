"""Experiments behind issue 15's head fix (bench/QUALITY_NOTES.md): variants of the dense head
trained on a feature cache held in memory, each scored on validation and test.

    [SEEDS=0,1,2] .venv/bin/python bench/diagnose_head.py FEATURES_DIR [variant ...]

Every variant trains like train_head.train_dense (standardised features, batch 32, EarlyStopping
on val_loss with its best weights restored, at most 30 epochs, SEED=0) and changes one thing.
"""
import json
import os
import sys
import time

import keras
import numpy as np

from pipeline import cache, train_head

VARIANTS = {
    # name: (head builder options, optimizer, learning rate)
    "article": (dict(), "rmsprop", 1e-4),
    "no_dropout": (dict(dropout=0.0), "rmsprop", 1e-4),
    "lr_1e-5": (dict(), "rmsprop", 1e-5),
    "adam_1e-4": (dict(), "adam", 1e-4),
    "l2_1e-3": (dict(l2=1e-3), "rmsprop", 1e-4),
    "l2_1e-2": (dict(l2=1e-2), "rmsprop", 1e-4),
    "l2_1e-1": (dict(l2=1e-1), "rmsprop", 1e-4),
    "input_dropout_0.5": (dict(input_dropout=0.5), "rmsprop", 1e-4),
    "gap": (dict(pool="gap"), "rmsprop", 1e-4),
    "gap_l2_1e-2": (dict(pool="gap", l2=1e-2), "rmsprop", 1e-4),
    "units_32": (dict(units=32), "rmsprop", 1e-4),
    "l2_3e-2": (dict(l2=3e-2), "rmsprop", 1e-4),
    "adam_l2_1e-2": (dict(l2=1e-2), "adam", 1e-4),
    "adam_l2_1e-1": (dict(l2=1e-1), "adam", 1e-4),
    "adam_gap": (dict(pool="gap"), "adam", 1e-3),
    "adam_input_dropout_0.5": (dict(input_dropout=0.5), "adam", 1e-4),
    "adam_pool2": (dict(pool="pool2"), "adam", 1e-4),
    "adam_gap_units_1024": (dict(pool="gap", units=1024), "adam", 1e-3),
    "adam_gap_lr_3e-4": (dict(pool="gap"), "adam", 3e-4),
    "adam_pool2_lr_3e-4": (dict(pool="pool2"), "adam", 3e-4),
    "adam_pool2_units_64": (dict(pool="pool2", units=64), "adam", 1e-4),
    "input_dropout_0.7": (dict(input_dropout=0.7), "rmsprop", 1e-4),
    "input_dropout_0.5_l2_1e-3": (dict(input_dropout=0.5, l2=1e-3), "rmsprop", 1e-4),
    "input_dropout_0.5_lr_3e-5": (dict(input_dropout=0.5), "rmsprop", 3e-5),
    "gap_lr_1e-3": (dict(pool="gap"), "rmsprop", 1e-3),
    "adamw_1e-4_wd_1e-1": (dict(), "adamw", 1e-4),
    # round 3: Polyak averaging of the weights (the optimizer's use_ema, scored and kept through
    # keras.callbacks.SwapEMAWeights), the head as shipped otherwise
    "adam_pool2_ema_0.99": (dict(pool="pool2"), "adam_ema_0.99", 1e-4),
    "adam_pool2_ema_0.95": (dict(pool="pool2"), "adam_ema_0.95", 1e-4),
    "adam_pool2_smooth_0.1": (dict(pool="pool2", smoothing=0.1), "adam", 1e-4),
    # round 4: regularising the shipped head's inputs, and pooling at two scales
    "adam_pool2_noise_0.5": (dict(pool="pool2", noise=0.5), "adam", 1e-4),
    "adam_pool2_noise_1": (dict(pool="pool2", noise=1.0), "adam", 1e-4),
    "adam_pool2_input_dropout_0.2": (dict(pool="pool2", input_dropout=0.2), "adam", 1e-4),
    "adam_pool2_input_dropout_0.5": (dict(pool="pool2", input_dropout=0.5), "adam", 1e-4),
    "adam_pool2_gap": (dict(pool="pool2+gap"), "adam", 1e-4),
    "adam_pool2_l2_1e-3": (dict(pool="pool2", l2=1e-3), "adam", 1e-4),
}
EPOCHS = int(os.environ.get("EPOCHS") or 30)
PATIENCE = int(os.environ.get("PATIENCE") or 5)


def build(shape, units=256, dropout=0.5, l2=0.0, input_dropout=0.0, pool="flatten", noise=0.0):
    inputs = keras.Input(shape)
    x = inputs
    if input_dropout:
        x = keras.layers.Dropout(input_dropout)(x)
    if noise:
        x = keras.layers.GaussianNoise(noise)(x)
    if pool == "pool2+gap":  # the 2x2 layout and the whole map's average, side by side
        x = keras.layers.Concatenate()([
            keras.layers.Flatten()(keras.layers.AveragePooling2D(2)(x)),
            keras.layers.GlobalAveragePooling2D()(x)])
    elif pool == "pool2":
        x = keras.layers.AveragePooling2D(2)(x)
    if pool != "pool2+gap":
        x = (keras.layers.GlobalAveragePooling2D() if pool == "gap" else keras.layers.Flatten())(x)
    x = keras.layers.Dense(units, activation="relu",
                           kernel_regularizer=keras.regularizers.L2(l2) if l2 else None)(x)
    x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def load(features_dir, per_feature=False):
    """Standardised features of each split: one global scale as train_head does, or (per_feature)
    each feature's own standard deviation, as logreg's StandardScaler does."""
    with cache.FeatureStore(features_dir) as store:
        out = {}
        for split in ("train", "validation", "test"):
            rows = store.rows(split)
            out[split] = (store.read(rows), store.labels[rows].astype(np.float32))
        mean, scale = train_head.feature_moments(store, store.rows("train"))
    if per_feature:
        scale = out["train"][0].std(axis=0) + 1e-6 * scale
    return {k: ((x - mean) / scale, y) for k, (x, y) in out.items()}


def run_variant(data, options, optimizer, lr, seed=0, epochs=EPOCHS):
    keras.utils.set_random_seed(seed)
    smoothing = options.pop("smoothing", 0)
    model = build(data["train"][0].shape[1:], **options)
    ema = optimizer.startswith("adam_ema_")
    opt = {"rmsprop": lambda: keras.optimizers.RMSprop(lr),
           "adam": lambda: keras.optimizers.Adam(lr),
           "adamw": lambda: keras.optimizers.AdamW(lr, weight_decay=0.1)}.get(
        optimizer, lambda: keras.optimizers.Adam(
            lr, use_ema=True, ema_momentum=float(optimizer.removeprefix("adam_ema_"))))()
    model.compile(opt, keras.losses.BinaryCrossentropy(label_smoothing=smoothing),
                  metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=PATIENCE,
                                         restore_best_weights=True)
    # SwapEMAWeights before EarlyStopping: validation and the kept weights are the averages
    callbacks = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] * ema + [stop]
    start = time.perf_counter()
    history = model.fit(*data["train"], batch_size=32, epochs=epochs, verbose=0,
                        validation_data=data["validation"], callbacks=callbacks).history
    scores = {split: model.evaluate(*data[split], verbose=0, return_dict=True)
              for split in ("train", "validation", "test")}
    probabilities = {split: model.predict(data[split][0], verbose=0)[:, 0]
                     for split in ("validation", "test")}
    return probabilities, {
            "val_acc": scores["validation"]["accuracy"], "test_acc": scores["test"]["accuracy"],
            "val_loss": scores["validation"]["loss"], "train_acc": scores["train"]["accuracy"],
            "best_epoch": stop.best_epoch + 1, "best_val_loss": min(history["val_loss"]),
            "epochs": len(history["loss"]),
            "epoch1": {k: round(history[k][0], 3) for k in ("loss", "val_loss")},
            "seconds": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    seeds = [int(x) for x in os.environ.get("SEEDS", "0").split(",")]
    data = {False: load(sys.argv[1])}
    ensembles = {}  # variant -> split -> summed probabilities over its seeds
    for name, seed in [(n, s) for n in sys.argv[2:] or VARIANTS for s in seeds]:
        per_feature = name.startswith("perfeature_")  # perfeature_<variant>
        if per_feature not in data:
            data[per_feature] = load(sys.argv[1], per_feature)
        options, optimizer, lr = VARIANTS[name.removeprefix("perfeature_")]
        probabilities, result = run_variant(data[per_feature], dict(options), optimizer, lr,
                                            seed=seed)
        summed = ensembles.setdefault(name, {})
        for split, p in probabilities.items():
            summed[split] = summed.get(split, 0) + p
        rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
        print(json.dumps({"variant": name, "seed": seed, **rounded}), flush=True)
    if len(seeds) > 1:  # the average of every seed's probabilities: an ensemble of heads
        for name, summed in ensembles.items():
            labels = {split: data[False][split][1] for split in summed}
            accuracy = {split: round(float(np.mean((p / len(seeds) > 0.5) == labels[split])), 4)
                        for split, p in summed.items()}
            print(json.dumps({"variant": name, "ensemble_of_seeds": seeds, **accuracy}), flush=True)
