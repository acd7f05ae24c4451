"""Experiments behind issue 15's second round (bench/QUALITY_NOTES.md, section d): block5 + a
trained head fine-tuned on cached block4_pool outputs (`diagnose_finetune.py cache` writes
bench/acc/block4/plain.npy; `diagnose_fold.py views FIRST LAST` writes augmented views, each
with a seed of its own), with the head's standardisation folded into its first Dense layer (as
train-head saved it before) or kept as a Normalization layer in front of it (as it does now).

    .venv/bin/python bench/diagnose_fold.py views 1 4
    [MODELS=bench/acc/models_augment5] [VIEWS=4] .venv/bin/python bench/diagnose_fold.py run \
        OPTIMIZER:LR:EPOCHS:fold|unfold[:aug][:wN] ...

OPTIMIZER is rmsprop, adam or sgd (momentum 0.9); the rate rises linearly over the first epoch
(FINETUNE_WARMUP=1), or over N epochs with the option `wN`. `aug` trains each epoch on another
cached augmented view of the training images instead of the plain ones. One JSON line per epoch:
training, validation and test (accuracy, loss).
"""
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pipeline import runtime  # noqa: E402

runtime.start("tensorflow", False)
import keras  # noqa: E402

from pipeline import augment, backbone, cache, images, registry, train_head  # noqa: E402
from pipeline.config import Config  # noqa: E402

ACC = os.path.join(ROOT, "bench", "acc")
FEATURES = os.path.join(ACC, "features", "cats_vs_dogs")
WEIGHTS = os.path.join(ROOT, "bench", "standin.weights.h5")
DATA = os.path.join(ROOT, "..", "shared", "data", "cats_vs_dogs")
MODELS = os.environ.get("MODELS") or os.path.join(ACC, "models")
VIEWS = int(os.environ.get("VIEWS") or 4)
# CUT=block3: blocks 4 and 5 train on cached block3_pool outputs (UNFREEZE=block4), in
# bench/acc/block3/; the default block4 is UNFREEZE=block5 on bench/acc/block4/.
CUT = os.environ.get("CUT") or "block4"
CACHED = os.path.join(ACC, CUT)


def base(size):
    return backbone.build_backbone(backbone.resolve_weights(WEIGHTS), size)


def top(size):
    """The VGG16 layers above CUT_pool, on CUT_pool outputs: the layers that fine-tuning trains."""
    vgg = base(size)
    cut = vgg.get_layer(f"{CUT}_pool")
    x = inputs = keras.Input(cut.output.shape[1:])
    for layer in vgg.layers[vgg.layers.index(cut) + 1:]:
        x = layer(x)
    model = keras.Model(inputs, x, name="top")
    # build_backbone freezes the whole base. Round 2's replica left these layers frozen, so only
    # the head trained in it (QUALITY_NOTES.md, section e): fine-tuning trains them.
    for layer in model.layers:  # (the new Model's own trainable is already True: set each layer)
        layer.trainable = True
    return model


def bottom(size):
    vgg = base(size)
    return keras.Model(vgg.input, vgg.get_layer(f"{CUT}_pool").output)


def plain_outputs():
    """CUT_pool outputs of every row's plain image (diagnose_finetune.py cache's plain.npy)."""
    out = os.path.join(CACHED, "plain.npy")
    with cache.FeatureStore(FEATURES) as store:
        size = store.identity["image_size"]
        paths = [os.path.join(store.image_root(DATA), p) for p in store.paths]
    os.makedirs(CACHED, exist_ok=True)
    model, start, chunks = bottom(size), time.perf_counter(), []
    for batch, _ in images.image_batches(paths, size, 32):
        chunks.append(np.asarray(model.predict_on_batch(np.asarray(batch))).astype(np.float16))
    np.save(out, np.concatenate(chunks))
    print(f"{out}: {len(paths)} images in {time.perf_counter() - start:.0f} s", flush=True)


def unfold(head, mean, scale):
    """A head whose first Dense layer absorbed (x - mean) / scale, as a Normalization layer
    followed by that layer with its weights at the scale they were trained at."""
    dense = next(layer for layer in head.layers if isinstance(layer, keras.layers.Dense))
    kernel, bias = dense.get_weights()
    pooled = keras.ops.convert_to_numpy(keras.Model(head.input, dense.input)(mean[None]))
    dense.set_weights([kernel * scale, bias + pooled.reshape(-1) @ kernel])
    inputs = keras.Input(head.input.shape[1:])
    standardize = keras.layers.Normalization(axis=(1, 2, 3), mean=mean,
                                             variance=np.full(mean.shape, scale ** 2))
    return keras.Model(inputs, head(standardize(inputs)))


def views(first, last):
    with cache.FeatureStore(FEATURES) as store:
        size = store.identity["image_size"]
        paths = np.array([os.path.join(store.image_root(DATA), p) for p in store.paths])
        train = store.rows("train")
    model = bottom(size)
    os.makedirs(CACHED, exist_ok=True)
    for view in range(first, last + 1):
        out = os.path.join(CACHED, f"view{view}.npy")
        if os.path.exists(out):
            continue
        layers, start, chunks = augment.augmentation(1000 * view), time.perf_counter(), []
        for batch, _ in images.image_batches(paths[train], size, 32):
            batch = np.asarray(layers(np.asarray(batch), training=True))
            chunks.append(np.asarray(model.predict_on_batch(batch)).astype(np.float16))
        np.save(out, np.concatenate(chunks))
        print(f"{out}: {len(train)} images in {time.perf_counter() - start:.0f} s", flush=True)


def run(specs):
    config = Config(data=DATA, name="cats_vs_dogs", weights=WEIGHTS,
                    features_root=os.path.dirname(FEATURES), models_root=MODELS)
    with cache.FeatureStore(FEATURES) as store:
        size, labels = store.identity["image_size"], store.labels.astype(np.float32)
        split = {s: store.rows(s) for s in ("train", "validation", "test")}
        mean, scale = train_head.feature_moments(store, split["train"])
    plain = np.load(os.path.join(CACHED, "plain.npy"))
    steps = -(-len(split["train"]) // 32)
    for spec in specs:
        name, lr, epochs, fold, *options = spec.split(":")
        lr, epochs = float(lr), int(epochs)
        keras.utils.set_random_seed(0)
        head = registry.load(config, "dense")
        if fold == "unfold" and not any(layer.name == "standardize" for layer in head.layers):
            head = unfold(head, mean, scale)
        warm = next((int(o[1:]) for o in options if o.startswith("w")), 1)  # wN: N epochs
        rate = keras.optimizers.schedules.CosineDecay(0.0, 10**6, warmup_target=lr,
                                                      warmup_steps=steps * warm)
        optimizer = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam,
                     "sgd": lambda r: keras.optimizers.SGD(r, momentum=0.9)}[name](rate)
        inputs = keras.Input(plain.shape[1:])
        model = keras.Model(inputs, head(top(size)(inputs)))
        model.compile(optimizer, "binary_crossentropy", metrics=["accuracy"])

        def score(rows, model=model):
            s = model.evaluate(plain[rows].astype(np.float32), labels[rows][:, None],
                               batch_size=64, verbose=0, return_dict=True)
            return round(s["accuracy"], 4), round(s["loss"], 4)
        print(json.dumps({"spec": spec, "start": {s: score(split[s]) for s in
                                                  ("validation", "test")}}), flush=True)
        rng = np.random.default_rng(0)
        for epoch in range(epochs):
            start, shuffle = time.perf_counter(), rng.permutation(len(split["train"]))
            order = split["train"][shuffle]
            if "aug" in options:  # another cached augmented view of every image each epoch
                view = os.path.join(CACHED, f"view{epoch % VIEWS + 1}.npy")
                x = np.load(view, mmap_mode="r")[shuffle].astype(np.float32)
            else:
                x = plain[order].astype(np.float32)
            fit = model.fit(x, labels[order][:, None], batch_size=32, verbose=0, shuffle=False)
            print(json.dumps({"epoch": epoch + 1, "train": (round(fit.history["accuracy"][0], 4),
                                                            round(fit.history["loss"][0], 4)),
                              **{s: score(split[s]) for s in ("validation", "test")},
                              "seconds": round(time.perf_counter() - start)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "plain":
        plain_outputs()
    elif sys.argv[1] == "views":
        views(int(sys.argv[2]), int(sys.argv[3]))
    else:
        run(sys.argv[2:])
