"""Experiments behind issue 15's fine-tuning fix (bench/QUALITY_NOTES.md), at a fraction of the
cost of real fine-tuning: the frozen blocks 1-4 run once per image (and once per augmented view),
their block4_pool outputs are kept in bench/acc/block4/, and block5 + the trained head train on
those. That is exactly UNFREEZE=block5 fine-tuning, minus the cost of blocks 1-4.

    .venv/bin/python bench/diagnose_finetune.py cache FEATURES_DIR MODELS_DIR WEIGHTS [VIEWS]
    .venv/bin/python bench/diagnose_finetune.py run FEATURES_DIR MODELS_DIR WEIGHTS VARIANT...

`cache` computes the plain block4_pool outputs of every row and VIEWS augmented views of the
training rows (pipeline.augment's augmentation, one view per epoch). `run` fine-tunes each
VARIANT (below) from the head in MODELS_DIR and prints, per variant, the loss of the first
batch before any step, the training loss of the first steps with the accuracy on 256
validation images after each, and per epoch the training
loss/accuracy and the validation and test accuracy.
"""
import json
import os
import sys
import time

import keras
import numpy as np

from pipeline import backbone, cache, images, registry
from pipeline.config import Config

BLOCK4 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "acc", "block4")


def rmsprop(lr):
    return keras.optimizers.RMSprop(lr)


VARIANTS = {
    # name: (optimizer factory, epochs, augmented views?, head dropout kept?)
    "article_plain": (lambda: rmsprop(1e-5), 1, False, True),
    "article_aug": (lambda: rmsprop(1e-5), 1, True, True),
    "rmsprop_1e-6_aug": (lambda: rmsprop(1e-6), 1, True, True),
    "adam_1e-5_aug": (lambda: keras.optimizers.Adam(1e-5), 1, True, True),
    "sgd_1e-4_aug": (lambda: keras.optimizers.SGD(1e-4, momentum=0.9), 1, True, True),
    "sgd_1e-3_aug": (lambda: keras.optimizers.SGD(1e-3, momentum=0.9), 1, True, True),
    "sgd_1e-2_aug": (lambda: keras.optimizers.SGD(1e-2, momentum=0.9), 1, True, True),
    "rmsprop_warmup_aug": (lambda: rmsprop(keras.optimizers.schedules.CosineDecay(
        0.0, 1000, warmup_target=1e-5, warmup_steps=63)), 1, True, True),
    "article_aug_nodropout": (lambda: rmsprop(1e-5), 1, True, False),
    "article_plain_3": (lambda: rmsprop(1e-5), 3, False, True),
    "adam_1e-5_plain_3": (lambda: keras.optimizers.Adam(1e-5), 3, False, True),
    "sgd_1e-4_plain_3": (lambda: keras.optimizers.SGD(1e-4, momentum=0.9), 3, False, True),
    "rmsprop_warmup_plain_3": (lambda: rmsprop(keras.optimizers.schedules.CosineDecay(
        0.0, 10**6, warmup_target=1e-5, warmup_steps=63)), 3, False, True),
    "rmsprop_3e-5_warmup_plain_3": (lambda: rmsprop(keras.optimizers.schedules.CosineDecay(
        0.0, 10**6, warmup_target=3e-5, warmup_steps=63)), 3, False, True),
    "sgd_1e-5_aug": (lambda: keras.optimizers.SGD(1e-5, momentum=0.9), 1, True, True),
}


def config_for(features_dir, models_dir, weights):
    name = os.path.basename(os.path.normpath(features_dir))
    return Config(data="/work/shared/data/cats_vs_dogs", name=name, weights=weights,
                  features_root=os.path.dirname(os.path.normpath(features_dir)),
                  models_root=os.path.dirname(os.path.normpath(models_dir)))


def split_models(weights_path, size):
    """(blocks 1-4 up to block4_pool, block5) of VGG16 with the given weights."""
    base = backbone.build_backbone(backbone.resolve_weights(weights_path), size)
    bottom = keras.Model(base.input, base.get_layer("block4_pool").output)
    top_in = keras.Input(bottom.output.shape[1:])
    x = top_in
    for layer in base.layers[base.layers.index(base.get_layer("block5_conv1")):]:
        x = layer(x)
    return bottom, keras.Model(top_in, x, name="block5")


def make_cache(features_dir, models_dir, weights, views):
    from pipeline import augment
    config = config_for(features_dir, models_dir, weights)
    with cache.FeatureStore(features_dir) as store:
        size = store.identity["image_size"]
        paths = np.array([os.path.join(store.image_root(config.data), p) for p in store.paths])
        train = store.rows("train")
    bottom, _ = split_models(weights, size)
    os.makedirs(BLOCK4, exist_ok=True)
    aug = augment.augmentation(config.seed)
    jobs = [("plain", np.arange(len(paths)), None)] + [
        (f"view{v}", train, v) for v in range(1, views + 1)]
    for name, rows, view in jobs:
        out = os.path.join(BLOCK4, name + ".npy")
        if os.path.exists(out):
            continue
        start, chunks = time.perf_counter(), []
        for batch, _ in images.image_batches(paths[rows], size, 32):
            batch = np.asarray(batch)
            if view is not None:
                batch = np.asarray(aug(batch, training=True))
            chunks.append(np.asarray(bottom(batch, training=False)).astype(np.float16))
        np.save(out, np.concatenate(chunks))
        print(f"{name}: {len(rows)} images in {time.perf_counter() - start:.0f} s", flush=True)


def run(features_dir, models_dir, weights, names):
    config = config_for(features_dir, models_dir, weights)
    with cache.FeatureStore(features_dir) as store:
        size, labels = store.identity["image_size"], store.labels.astype(np.float32)
        split = {s: store.rows(s) for s in ("train", "validation", "test")}
    plain = np.load(os.path.join(BLOCK4, "plain.npy"))
    views = sorted(f for f in os.listdir(BLOCK4) if f.startswith("view"))
    for name in names:
        make_optimizer, epochs, augmented, dropout = VARIANTS[name]
        keras.utils.set_random_seed(0)
        _, block5 = split_models(weights, size)
        head = registry.load(config, "dense")
        if not dropout:
            for layer in head.layers:
                if isinstance(layer, keras.layers.Dropout):
                    layer.rate = 0.0
        inputs = keras.Input(plain.shape[1:])
        for layer in block5.layers:  # each layer: the base froze them, and block5's own
            layer.trainable = True    # trainable is already True (QUALITY_NOTES, section e)
        model = keras.Model(inputs, head(block5(inputs)))
        model.compile(make_optimizer(), "binary_crossentropy", metrics=["accuracy"])
        head_model = keras.Model(inputs, head(block5(inputs, training=False), training=False))
        rng = np.random.default_rng(0)
        record = {"variant": name, "steps": [], "epochs": []}

        def score(rows, x, model=model):
            s = model.evaluate(x.astype(np.float32), labels[rows][:, None], batch_size=64,
                               verbose=0, return_dict=True)
            return round(s["accuracy"], 4), round(s["loss"], 4)
        record["start"] = {s: score(split[s], plain[split[s]]) for s in ("validation", "test")}
        record["start"]["validation_256"] = score(split["validation"][:256],
                                                  plain[split["validation"][:256]])
        record["start"]["train_plain"] = score(split["train"], plain[split["train"]])
        if views:  # the head on augmented training images: as good as on plain ones?
            record["start"]["train_view1"] = score(split["train"], np.load(
                os.path.join(BLOCK4, views[0])))
        for epoch in range(epochs):
            x_all = (np.load(os.path.join(BLOCK4, views[epoch % len(views)]), mmap_mode="r")
                     if augmented else plain[split["train"]])
            order = rng.permutation(len(split["train"]))
            losses, accs, start = [], [], time.perf_counter()
            for step in range(0, len(order), 32):
                pick = order[step:step + 32]
                x, y = np.asarray(x_all[pick], np.float32), labels[split["train"][pick]][:, None]
                if epoch == 0 and step == 0:
                    p = np.clip(np.asarray(head_model(x)), 1e-7, 1 - 1e-7)
                    record["first_batch_loss"] = round(float(np.mean(
                        -y * np.log(p) - (1 - y) * np.log(1 - p))), 4)
                model.reset_metrics()  # per-batch figures, not running means
                loss, acc = model.train_on_batch(x, y)
                losses.append(loss)
                accs.append(acc)
                if epoch == 0 and step // 32 + 1 in (1, 2, 4, 8, 16, 32):  # after that step
                    early = split["validation"][:256]
                    record["steps"].append((step // 32 + 1, round(float(loss), 4),
                                            score(early, plain[early])[0]))
            record["epochs"].append({
                "train_loss": round(float(np.mean(losses)), 4),
                "train_acc": round(float(np.mean(accs)), 4),
                **{s: score(split[s], plain[split[s]]) for s in ("validation", "test")},
                "seconds": round(time.perf_counter() - start)})
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    command, features, models, weights_file, *rest = sys.argv[1:]
    if command == "cache":
        make_cache(features, models, weights_file, int(rest[0]) if rest else 2)
    else:
        run(features, models, weights_file, rest or list(VARIANTS))
