"""The slow part of `make bench` (BENCH_ACCURACY=1): validation accuracy of the three models on
the real cats_vs_dogs photos, through the pipeline's own stages.

    WEIGHTS=<file.h5>        the VGG16 weights (default: the stand-in, built once, see below)
    BENCH_FINETUNE_EPOCHS=3  fine-tuning epochs: one takes ~4 min on 2 cores (2000 images at 150 px
                             through VGG16 with block5 training, then 500 validation images)
    BENCH_ACCURACY_N=0       images per class folder, for a quick check of this phase (0 = all)
Then the same heads on a STORAGE=float16 cache (acc_logreg_float16, acc_dense_float16).
On 2 cores the whole phase takes ~25 min: each extraction of 3000 images ~4 min, heads ~1 min,
fine-tuning ~4 min per epoch (measured with oneDNN on).
"""
import os
import subprocess
import sys

import numpy as np

from pipeline import cache, extract, finetune, images, registry, train_head
from pipeline.config import Config

FINETUNE_EPOCHS = int(os.environ.get("BENCH_FINETUNE_EPOCHS") or 3)
PER_FOLDER = int(os.environ.get("BENCH_ACCURACY_N") or 0)
BENCH = os.path.dirname(os.path.abspath(__file__))
STANDIN = os.path.join(BENCH, "standin.weights.h5")   # git-ignored (bench/*.weights.h5)
STANDIN_TOOL = os.path.join(BENCH, "..", "..", "shared", "tools", "standin_weights.py")


def run(data, work, size, batch):
    """Extract all of `data` (layout b: train/ and validation/; with no test/ folder, half of
    validation becomes the test split), train both heads, fine-tune, and score each model on the
    validation split. Returns (figures, details) for bench.py."""
    config = config_for(data, work, size, batch)
    weights = config.weights
    extract.run(config)
    train_head.run(config)
    finetune.run(config)
    figures = validation_accuracy(config)

    # STORAGE=float16 (issue 7: keep it only if it keeps accuracy): its own cache and heads.
    half = config.replace(name="cats_vs_dogs_float16", storage="float16")
    extract.run(half)
    train_head.run(half)
    figures.update({f"{key}_float16": value for key, value in
                    validation_accuracy(half, finetuned=False).items()})
    return figures, {"accuracy_weights": weights, "accuracy_finetune_epochs": FINETUNE_EPOCHS,
                     "accuracy_images_per_folder": PER_FOLDER or "all"}


def config_for(data, work, size, batch):
    """The accuracy phase's Config: all of `data` (or BENCH_ACCURACY_N per folder), WEIGHTS."""
    weights = os.environ.get("WEIGHTS") or standin_weights()
    if PER_FOLDER:
        dest = os.path.join(work, "accuracy_data")
        data = dest if os.path.isdir(dest) else _first_images(data, dest, PER_FOLDER)
    return Config(data=data, name="cats_vs_dogs", weights=weights, size=size, batch_size=batch,
                  head="both", finetune_epochs=FINETUNE_EPOCHS, fresh=True,
                  features_root=os.path.join(work, "accuracy", "features"),
                  models_root=os.path.join(work, "accuracy", "models"))


def validation_accuracy(config, finetuned=True):
    """The saved models, scored here in one way for all three on the cache's validation rows."""
    with cache.FeatureStore(config.features_dir) as store:
        rows = store.rows("validation")
        labels, features = store.labels[rows], store.read(rows)
        paths = [os.path.join(config.data, p) for p in store.paths[rows]]
        size = store.identity["image_size"]
    predicted = {f"acc_{model}": registry.predictor(config, model)(features).argmax(1)
                 for model in ("logreg", "dense")}
    if finetuned:
        predict = registry.predictor(config, "finetuned")
        dataset = images.labelled_dataset(paths, labels, size, config.batch_size)
        predicted["acc_finetuned"] = np.concatenate([predict(x) for x, _ in dataset]).argmax(1)
    return {key: float(np.mean(p == labels)) for key, p in predicted.items()}


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
