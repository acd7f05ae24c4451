"""The slow part of `make bench` (BENCH_ACCURACY=1): does every stage earn its keep?
Validation and test accuracy of the three models on the real cats_vs_dogs photos, the dense head
on AUGMENT=0/5/10 caches, and the demo, all through the pipeline's own stages.

    WEIGHTS=<file.h5>        the VGG16 weights (default: the stand-in, built once, see below)
    BENCH_FINETUNE_EPOCHS=5  fine-tuning epochs: one takes ~4 min on 2 cores (2000 images at 150 px
                             through VGG16 with block5 training, then 522 validation images)
    BENCH_ACCURACY_N=0       images per class folder, for a quick check of this phase (0 = all)
    BENCH_AUGMENT=5,10       the AUGMENT values whose dense heads are compared with AUGMENT=0
    BENCH_FLOAT16=1          0 leaves out the heads on a STORAGE=float16 cache
    BENCH_RESPLITS=30        random re-splits of the cache on which the dense head and logreg
                             are trained again (~30 s each on 2 cores; 0 leaves them out)
The caches live in bench/acc/ (git-ignored) and are kept between runs: extract is incremental,
so only the first run pays for them (~4 min per 3000 images, ~15 min per 5 views of the 2000
training images on 2 cores). Models are trained afresh on every run.
"""
import os
import shutil
import statistics
import subprocess
import sys
import time

import backbone_accuracy  # bench/backbone_accuracy.py: FEATURE_LAYER, and other backbones
import finetune_cache  # bench/finetune_cache.py: fine-tuning from the cached cut
import keras
import numpy as np
import resplit  # bench/resplit.py: the heads on re-splits of the cache
import support  # bench/support.py: EpochTimer

from pipeline import cache, extract, finetune, train_head
from pipeline.config import Config
from pipeline.data import augment, images
from pipeline.data import demo as demo_data
from pipeline.model import backbone, heads, registry

FINETUNE_EPOCHS = int(os.environ.get("BENCH_FINETUNE_EPOCHS") or 5)
PER_FOLDER = int(os.environ.get("BENCH_ACCURACY_N") or 0)
RESPLITS = int(os.environ.get("BENCH_RESPLITS") or 30)
AUGMENTS = [int(k) for k in (os.environ.get("BENCH_AUGMENT") or "5,10").split(",") if k]
BENCH = os.path.dirname(os.path.abspath(__file__))
ACC = os.path.join(BENCH, "acc")                      # git-ignored, kept between runs
STANDIN = os.path.join(BENCH, "standin.weights.h5")   # git-ignored (bench/*.weights.h5)
STANDIN_TOOL = os.path.join(BENCH, "..", "..", "shared", "tools", "standin_weights.py")
FROZEN_IMAGES = 128  # images timed through the frozen base with augmentation in the loop
SPLITS = ("validation", "test")


def phases(data, work, size, batch):
    """bench.py's accuracy phases, in order, each returning (figures, details): the three models
    (AUGMENT=0), the head and logreg on BENCH_RESPLITS re-splits of their cache, the demo, the
    dense heads on AUGMENT=K views, the three models with AUGMENT=5, fine-tuning from the cache
    (bench/finetune_cache.py: costs, seeds, end to end), STORAGE=float16 (BENCH_FLOAT16=0
    leaves it out), then the heads on an earlier stage of VGG16 and other backbones fine-tuned
    (bench/backbone_accuracy.py). bench.py writes results.json after each one."""
    config, root = config_for(data, work, size, batch)
    weights = config.weights
    details = {"accuracy_weights": weights, "accuracy_images_per_folder": PER_FOLDER or "all",
               "accuracy_finetune_epochs": FINETUNE_EPOCHS, "accuracy_augment": AUGMENTS}
    out = [("accuracy", lambda: (three_models(config), details)),
           ("resplits", lambda: (resplits(config), {})),
           ("demo", lambda: (demo(root), {})),
           ("augmented-heads", lambda: (augmented_heads(config, root), {})),
           ("augmented-finetune", lambda: (augmented_three_models(config, root), {})),
           ("finetune-cache", lambda: (finetune_cache.figures(
               config, root, work, _first_images), {})),
           ("finetune-cache-seeds", lambda: (finetune_cache.seeds(
               config, root, FINETUNE_EPOCHS, scores), {})),
           ("finetune-e2e", lambda: (finetune_cache.end_to_end(config, root, scores), {}))]
    if os.environ.get("BENCH_FLOAT16", "1") != "0":
        out.append(("float16-heads", lambda: (float16_heads(config), {})))
    return out + backbone_accuracy.phases(config)


def config_for(data, work, size, batch):
    """(the accuracy phases' Config, the folder of their caches and models): all of `data`, or
    BENCH_ACCURACY_N images per class folder, with WEIGHTS (default: the stand-in)."""
    weights = os.environ.get("WEIGHTS") or standin_weights()
    root = ACC
    if PER_FOLDER:
        dest = os.path.join(work, "accuracy_data")
        data = dest if os.path.isdir(dest) else _first_images(data, dest, PER_FOLDER)
        root = work
    # float32: accuracy figures that compare across machines (PRECISION=auto differs by CPU)
    # AUGMENT and SEED told (their defaults): `extract.run(config)` goes back to them after the
    # AUGMENT=K and seed phases, where settings not told would keep the cache's last ones
    config = Config(data=data, name="cats_vs_dogs", weights=weights, size=size, batch_size=batch,
                    head="both", finetune_epochs=FINETUNE_EPOCHS, fresh=True, precision="float32",
                    **{name: Config().told_or_default(name) for name in (
                        "augment", "seed", "unfreeze", "finetune_from", "cut_storage")},
                    features_root=os.path.join(root, "features"),
                    models_root=os.path.join(root, "models"))
    return config, root


def three_models(config):
    """logreg, dense head and fine-tuned model with the defaults (AUGMENT=0), on validation and
    test, and each fine-tuning epoch's validation accuracy against the head's."""
    extract.run(config)  # AUGMENT=0: the plain cache (views of other runs are kept)
    train_head.run(config)
    tuned = finetune.run(config)
    figures = scores(config, intervals=True)
    head_val = registry.record(config, "dense").validation["accuracy"]
    epochs_val = registry.record(config, "finetuned").entry["history"]["val_accuracy"]
    figures.update(finetune_epoch_acc=epochs_val, acc_dense_keras_validation=head_val,
                   finetune_best_epoch=tuned.best_epoch, finetune_seconds=tuned.seconds,
                   finetune_worst_epoch_vs_head=min(epochs_val) - head_val)
    for suffix in ("", "_test"):
        figures[f"dense_minus_logreg{suffix}"] = (figures[f"acc_dense{suffix}"]
                                                  - figures[f"acc_logreg{suffix}"])
        figures[f"finetuned_minus_dense{suffix}"] = (figures[f"acc_finetuned{suffix}"]
                                                     - figures[f"acc_dense{suffix}"])
    return figures


def resplits(config):
    """The dense head and logreg on BENCH_RESPLITS random re-splits of the plain cache (same
    sizes, same class shares): is the head's gap over logreg the model's, or one split's draw?"""
    if not RESPLITS:
        return {}
    extract.run(config)  # the plain cache, as three_models leaves it (nothing new to compute)
    return resplit.figures(config, RESPLITS)


def augmented_three_models(config, root, k=5):
    """The three models again with AUGMENT=5: the dense head on the views, then fine-tuning (on
    augmented images, as with the defaults). Figures prefixed `augment5_`."""
    augmented = config.replace(augment=k,
                               models_root=os.path.join(root, f"models_augment{k}_finetuned"))
    figures = three_models(augmented)
    extract.run(config)  # back to AUGMENT=0 (the views stay cached)
    return {f"augment{k}_{key}": value for key, value in figures.items()}


def augmented_heads(config, root):
    figures = {}
    for k in AUGMENTS:  # the dense head on K augmented views of each training image
        figures.update(augmented_head(config.replace(augment=k), root))
    figures.update(frozen_base_with_augmentation(config))
    extract.run(config)  # back to AUGMENT=0 (the views stay cached)
    return figures


def float16_heads(config):
    """STORAGE=float16 (kept only if it keeps accuracy): its own cache and heads."""
    half = config.replace(name="cats_vs_dogs_float16", storage="float16")
    extract.run(half)
    train_head.run(half)
    return {f"{key}_float16": value for key, value in scores(half, finetuned=False).items()}


def augmented_head(config, root):
    """Extract AUGMENT=K views (incremental), train the dense head on them, time its epochs."""
    k = config.augment
    extract.run(config)
    timer = support.EpochTimer()
    models = config.replace(head="dense", models_root=os.path.join(root, f"models_augment{k}"))
    train_head.run(models, callbacks=[timer])
    record = registry.record(models, "dense")
    return {f"acc_dense_augment{k}": record.validation["accuracy"],
            f"acc_dense_augment{k}_test": record.test["accuracy"],
            f"head_epoch_s_views_augment{k}": statistics.median(timer.seconds[1:] or
                                                                timer.seconds)}


def frozen_base_with_augmentation(config):
    """The article's second method: the same dense head on the frozen base, with the
    augmentation in front of it, so every step pays decoding, augmentation and VGG16.
    Timed on FROZEN_IMAGES training images, scaled to the training split."""
    with cache.FeatureStore(config.features_dir) as store:
        rows = store.rows("train")
        paths = [os.path.join(store.image_root(config.data), p) for p in store.paths[rows]]
        labels = store.labels[rows].astype(np.float32)[:, None]
        shape = store.features.shape[1:]
        weights = backbone.weights_of_cache(config.weights, store.attrs)
    base = backbone.build_backbone(weights, config.size)
    head = heads.build_dense_head(shape, 2, config.hidden_units, config.dropout,
                                  config.head_pool)
    inputs = keras.Input(base.input_shape[1:])
    augmentation = augment.augmentation(config.told_or_default("seed"))
    model = keras.Model(inputs, head(base(augmentation(inputs))))
    model.compile(optimizer=heads.optimizer(config.head_lr),
                  loss=heads.loss_for(2), metrics=["accuracy"])
    b = config.batch_size
    k = max(b, min(len(paths), FROZEN_IMAGES) // b * b)
    warm = images.labelled_dataset(paths[:b], labels[:b], config.size, b)
    model.fit(warm, verbose=0)  # tracing
    timed = images.labelled_dataset(paths[:k], labels[:k], config.size, b, shuffle_seed=0)
    start = time.perf_counter()
    model.fit(timed, verbose=0)
    return {"head_epoch_s_frozen_augmented": (time.perf_counter() - start) / k * len(paths)}


def scores(config, finetuned=True, prefix="acc", intervals=False):
    """The saved models, scored here in one way for all three on the cache's validation and
    test rows: {prefix_<model>: validation accuracy, prefix_<model>_test: test accuracy}.
    `intervals`: also the 95% interval of each later stage's gain on each split,
    {later}_minus_{earlier}[_test]_ci95_low and _high (`paired_interval`)."""
    out = {}
    for split in SPLITS:
        with cache.FeatureStore(config.features_dir) as store:
            rows = store.rows(split)
            labels, features = store.labels[rows], store.read(rows)
            paths = [os.path.join(store.image_root(config.data), p) for p in store.paths[rows]]
            size = store.feature_identity.image_size
        predicted = {model: registry.predictor(config, model)(features).argmax(1)
                     for model in ("logreg", "dense")}
        if finetuned:
            predict = registry.predictor(config, "finetuned")
            dataset = images.labelled_dataset(paths, labels, size, config.batch_size)
            predicted["finetuned"] = np.concatenate([predict(x) for x, _ in dataset]).argmax(1)
        suffix = "" if split == "validation" else "_test"
        correct = {model: p == labels for model, p in predicted.items()}
        out.update({f"{prefix}_{model}{suffix}": float(np.mean(c)) for model, c in correct.items()})
        for later, earlier in [("dense", "logreg"), ("finetuned", "dense")] if intervals else []:
            if later in correct:
                low, high = paired_interval(correct[later], correct[earlier])
                key = f"{later}_minus_{earlier}{suffix}_ci95"
                out.update({f"{key}_low": low, f"{key}_high": high})
    return out


def paired_interval(correct_a, correct_b, resamples=10_000, seed=0):
    """The 95% interval of accuracy(a) - accuracy(b) on one split, by a paired bootstrap: the
    split's images are drawn again with replacement, each keeping both models' verdicts on it.
    It is the noise of a split of this size: a gap inside it could go either way on another
    draw of the same number of photos."""
    difference = correct_a.astype(np.float64) - correct_b
    draws = np.random.default_rng(seed).integers(0, len(difference),
                                                 (resamples, len(difference)))
    low, high = np.percentile(difference[draws].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def demo(root, runs=2):
    """`make demo`'s stages (WEIGHTS=auto, SIZE=64, 2 fine-tuning epochs) `runs` times from
    scratch with the same seed: test accuracy of each model, and whether every run agreed."""
    data = os.path.join(root, "demo_data")
    if not os.path.exists(data):
        demo_data.generate(data)
    results = []
    for i in range(runs):
        folder = os.path.join(root, f"demo_run{i}")
        shutil.rmtree(folder, ignore_errors=True)
        config = Config(data=data, name="demo", weights="auto", size=64, finetune_epochs=2,
                        features_root=os.path.join(folder, "features"),
                        models_root=os.path.join(folder, "models"))
        extract.run(config)
        train_head.run(config)
        finetune.run(config)
        results.append(scores(config, prefix="demo"))
    first = results[0]
    return {**first, "demo_runs_agree": float(all(r == first for r in results)),
            "demo_finetuned_minus_dense_test": first["demo_finetuned_test"]
            - first["demo_dense_test"]}


def standin_weights():
    """ImageNet-initialised VGG16 conv layers taken from an edge detector, because the ImageNet
    weights cannot be downloaded here (read the tool's docstring). Built once, then reused."""
    if not os.path.exists(STANDIN):
        subprocess.run([sys.executable, STANDIN_TOOL, STANDIN], check=True)
    return STANDIN


def _first_images(data, dest, per_folder):
    """dest/<split>/<class>/: symlinks to the first `per_folder` images of each folder of data."""
    for split in ("train", "validation"):
        for class_name in sorted(os.listdir(os.path.join(data, split))):
            folder = os.path.join(data, split, class_name)
            os.makedirs(os.path.join(dest, split, class_name))
            for name in sorted(os.listdir(folder))[:per_folder]:
                os.symlink(os.path.realpath(os.path.join(folder, name)),
                           os.path.join(dest, split, class_name, name))
    return dest
