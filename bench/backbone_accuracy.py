"""`make bench` phases `feature-layer` and `backbones-finetune` (BENCH_ACCURACY=1): accuracy on
the real cats_vs_dogs photos of the heads on an earlier stage of VGG16, and of extract ->
train-head -> finetune (from the cache) -> evaluate for several backbones, each stage timed.

    WEIGHTS=<file.h5>          VGG16's pretrained weights (default: the stand-in, accuracy.py)
    BENCH_SUBSET_TRAIN=250     training photos per class (the first ones by file name); every
                               validation photo is kept, and half of them, by content hash,
                               become the test split (the folder has no test/). 0: all
    BENCH_FEATURE_LAYERS=block4  the earlier stages compared with the top of VGG16 (block4 is
                               the cut the default UNFREEZE caches: extract computes nothing)
    BENCH_BACKBONES=vgg16:pretrained,vgg16:none,efficientnetv2b0:none,mobilenetv3large:none
                               backbone:weights[:storage] of `backbones-finetune`; `pretrained`
                               is WEIGHTS, which fits VGG16 only; storage (default float16) is
                               STORAGE and CUT_STORAGE
    BENCH_FINETUNE_EPOCHS=5    fine-tuning epochs (as accuracy.py's)

Every run uses the pipeline's defaults (AUGMENT=5, PRECISION=auto, the default UNFREEZE and
FINETUNE_FROM=cache, SIZE=150, SEED=0) except STORAGE=float16 (unless told otherwise above): it
equals CUT_STORAGE, so the cached cut serves as FEATURE_LAYER=block4 as it is, and the VGG16 cache
with pretrained weights is shared by both phases. Caches and models live in bench/acc/
(git-ignored) and are kept: extract is incremental, so a rerun pays only for training.
Validation accuracy is the one each model's run recorded, test accuracy is `make evaluate`'s;
both with their 95% Wilson interval.
"""
import json
import os
import time

from pipeline import cache, evaluate, extract, finetune, train_head
from pipeline.config import Config
from pipeline.model import registry
from pipeline.reporting import diagnostics

SUBSET_TRAIN = int(os.environ.get("BENCH_SUBSET_TRAIN") or 250)
FEATURE_LAYERS = [s for s in (os.environ.get("BENCH_FEATURE_LAYERS") or "block4").split(",") if s]
BACKBONES = [(spec.split(":") + ["float16"])[:3] for spec in (os.environ.get("BENCH_BACKBONES") or (
    "vgg16:pretrained,vgg16:none,efficientnetv2b0:none,mobilenetv3large:none")
    ).split(",")]
HEADS = ("logreg", "dense")


def phases(base):
    """(title, phase) pairs for accuracy.phases, each phase returning (figures, details). `base`:
    a Config with DATA, SIZE, BATCH_SIZE, FINETUNE_EPOCHS, the pretrained WEIGHTS and the caches'
    features_root, whose folder holds this module's models too."""
    return [("feature-layer", lambda: (feature_layer(base), {})),
            ("backbones-finetune", lambda: (backbones_finetune(base), {}))]


def feature_layer(base):
    """logreg and the dense head on the top of VGG16 (pretrained weights) and on each of
    BENCH_FEATURE_LAYERS: {"feature_layer_table": [one row per layer and head]}."""
    config = _config(base, "vgg16", "pretrained")
    table = []
    for layer in ["", *FEATURE_LAYERS]:
        run = config.replace(feature_layer=layer, models_root=os.path.join(
            _root(base), "models_feature_layer", layer or "top"))
        seconds = {"extract": _timed(extract.run, run), "train-head": _timed(train_head.run, run)}
        scored = _evaluated(run)
        for head in HEADS:
            table.append({"feature_layer": layer or "top", "model": head,
                          **_features_shape(run), **scored[head],
                          **{f"{stage}_s": s for stage, s in seconds.items()}})
    extract.run(config)  # back to the top of the base (nothing to compute): the cache as found
    _print(table, ["feature_layer", "model", "features"])
    return {"feature_layer_table": table}


def backbones_finetune(base):
    """For each backbone:weights of BENCH_BACKBONES, extract -> train-head -> finetune ->
    evaluate, each stage timed: {"backbone_accuracy_table": [one row per backbone and model]}."""
    table = []
    for name, weights, storage in BACKBONES:
        config = _config(base, name, weights, storage)
        seconds = {stage: _timed(function, config) for stage, function in (
            ("extract", extract.run), ("train-head", train_head.run),
            ("finetune", finetune.run))}
        start = time.perf_counter()
        scored = _evaluated(config)
        seconds["evaluate"] = time.perf_counter() - start
        for model in (*HEADS, "finetuned"):
            table.append({"backbone": name, "weights": weights, "storage": storage,
                          "model": model, **scored[model],
                          **{f"{stage}_s": s for stage, s in seconds.items()}})
    _print(table, ["backbone", "weights", "storage", "model"])
    return {"backbone_accuracy_table": table}


def _root(base):
    return os.path.dirname(base.features_root)


def _config(base, name, weights, storage="float16"):
    """The Config of one backbone and weights (`pretrained`: base's) on the subset of base's
    DATA, its cache named after both (and a STORAGE other than float16), with the defaults but
    STORAGE and CUT_STORAGE. Every setting a cache records is told, so none is taken from an
    earlier run's cache."""
    subset = _subset(base.data, _root(base))
    suffix = "" if storage == "float16" else f"_{storage}"
    return Config(data=subset, name=f"{os.path.basename(subset)}_{name}_{weights}{suffix}",
                  backbone=name, feature_layer="",
                  weights=base.weights if weights == "pretrained" else weights,
                  size=base.size, batch_size=base.batch_size, storage=storage,
                  cut_storage=storage,
                  precision=Config().told_or_default("precision"),
                  augment=Config().told_or_default("augment"), head="both",
                  **{name: Config().told_or_default(name)
                     for name in ("seed", "unfreeze", "finetune_from")},
                  finetune_epochs=base.finetune_epochs, fresh=True,
                  features_root=base.features_root,
                  models_root=os.path.join(_root(base), "models_backbones"))


def _subset(data, root):
    """<root>/train<N>/: symlinks to the first BENCH_SUBSET_TRAIN training photos of each class
    (by file name) and to every validation photo; `data` itself when the subset is all."""
    if not SUBSET_TRAIN:
        return data
    dest = os.path.join(root, f"train{SUBSET_TRAIN}")
    for split, keep in (("train", SUBSET_TRAIN), ("validation", None)):
        for class_name in sorted(os.listdir(os.path.join(data, split))):
            folder, linked = os.path.join(data, split, class_name), os.path.join(dest, split,
                                                                                 class_name)
            if os.path.isdir(linked):  # made by an earlier run: the same names
                continue
            os.makedirs(linked)
            for name in sorted(os.listdir(folder))[:keep]:
                os.symlink(os.path.realpath(os.path.join(folder, name)),
                           os.path.join(linked, name))
    return dest


def _evaluated(config):
    """Each model's validation accuracy (its run's record) and test accuracy (`make evaluate`),
    with their 95% Wilson intervals and image counts."""
    result = evaluate.run(config)
    with open(result.path) as f:
        report = json.load(f)
    with cache.FeatureStore(config.features_dir) as store:
        validation_images = len(store.rows("validation"))
    out = {}
    for model, entry in report["models"].items():
        val = registry.record(config, model).validation["accuracy"]
        out[model] = {"validation": val, "validation_images": validation_images,
                      "validation_ci95": list(diagnostics.accuracy_interval(
                          val, validation_images)),
                      result.split: entry["accuracy"], f"{result.split}_images": report["images"],
                      f"{result.split}_ci95": entry["accuracy_ci95"]}
    return out


def _features_shape(config):
    with cache.FeatureStore(config.features_dir) as store:
        return {"features": "x".join(str(n) for n in store.features.shape[1:])}


def _timed(function, config):
    start = time.perf_counter()
    function(config)
    return time.perf_counter() - start


def _print(table, keys):
    """The table as Markdown rows, as docs/backbones.md shows it."""
    stages = [k for k in table[0] if k.endswith("_s")]
    for row in table:
        cells = [str(row[k]) for k in keys]
        for split in ("validation", "test"):
            if split in row:
                low, high = row[f"{split}_ci95"]
                cells.append(f"{row[split]:.3f} ({low:.3f}-{high:.3f})")
        cells += [f"{row[s]:.0f}" for s in stages]
        print("| " + " | ".join(cells) + " |")
