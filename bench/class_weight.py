"""CLASS_WEIGHT on an imbalanced subset of cats_vs_dogs: the balanced accuracy of the dense head
and of logreg trained without class weights (CLASS_WEIGHT=none) and with them (auto), on one
cache extracted once.

    python bench/class_weight.py WEIGHTS_FILE [WORK]      (WORK: bench/work/class_weight)

The subset, symlinks to ../shared/data/cats_vs_dogs (BENCH_DATA): train 400 cats and 100 dogs
(4:1) from its train/; validation and test 100 cats and 100 dogs each, from its validation/
(disjoint halves). SIZE=150, AUGMENT=0, SEED=0, the other settings at their defaults; the weights
file is the stand-in one (`python ../shared/tools/standin_weights.py OUT.weights.h5`), as
ImageNet's cannot be downloaded here. Balanced accuracy is scikit-learn's (the mean of the
classes' recalls): on these balanced held-out splits, what an unweighted head that favours cats
loses. Prints a table and writes WORK/class_weight.json.
"""
import json
import os
import sys

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from pipeline import cache, extract, train_head
from pipeline.config import Config
from pipeline.model import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("BENCH_DATA") or os.path.join(ROOT, "..", "shared", "data", "cats_vs_dogs")
# split -> (source folder, first image, images) per class, in file-name order
SUBSET = {"train": {"cats": ("train", 0, 400), "dogs": ("train", 0, 100)},
          "validation": {"cats": ("validation", 0, 100), "dogs": ("validation", 0, 100)},
          "test": {"cats": ("validation", 100, 100), "dogs": ("validation", 100, 100)}}
SETTINGS = ("none", "auto")


def link_subset(folder):
    """folder/<split>/<class>/<file> -> the photos of SUBSET (layout: train/validation/test)."""
    for split, classes in SUBSET.items():
        for name, (source, first, count) in classes.items():
            os.makedirs(os.path.join(folder, split, name), exist_ok=True)
            files = sorted(os.listdir(os.path.join(DATA, source, name)))[first:first + count]
            for file in files:
                link = os.path.join(folder, split, name, file)
                if not os.path.lexists(link):
                    os.symlink(os.path.realpath(os.path.join(DATA, source, name, file)), link)


def scores(config, store, split):
    rows = store.rows(split)
    labels = store.labels[rows]
    out = {}
    for model in ("logreg", "dense"):
        predict = registry.predictor(config, model)
        predicted = np.concatenate([predict(features) for _, features in
                                    store.blocks(rows)]).argmax(axis=1)
        out[model] = {"balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
                      "accuracy": float(accuracy_score(labels, predicted)),
                      "recall": {name: float(np.mean(predicted[labels == c] == c))
                                 for c, name in enumerate(store.class_names)}}
    return out


def main(weights, work):
    data = os.path.join(work, "data")
    link_subset(data)
    config = Config(data=data, name="imbalanced", weights=os.path.abspath(weights), size=150,
                    augment=0, finetune_from="images", seed=0,
                    features_root=os.path.join(work, "features"))
    extract.run(config)  # once: both settings train on these rows
    results = {}
    for setting in SETTINGS:
        each = config.replace(class_weight=setting, models_root=os.path.join(work, setting))
        metrics = train_head.run(each).metrics
        with cache.FeatureStore(config.features_dir) as store:
            results[setting] = {split: scores(each, store, split)
                                for split in ("validation", "test")}
        results[setting]["class_weight"] = metrics["models"]["dense"]["class_weight"]
    with open(os.path.join(work, "class_weight.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'CLASS_WEIGHT':<13}{'model':<8}{'split':<12}{'balanced acc.':>14}{'accuracy':>10}"
          f"{'recall cats':>13}{'recall dogs':>13}")
    for setting in SETTINGS:
        for model in ("logreg", "dense"):
            for split in ("validation", "test"):
                s = results[setting][split][model]
                print(f"{setting:<13}{model:<8}{split:<12}{s['balanced_accuracy']:>14.3f}"
                      f"{s['accuracy']:>10.3f}{s['recall']['cats']:>13.3f}"
                      f"{s['recall']['dogs']:>13.3f}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else
         os.path.join(ROOT, "bench", "work", "class_weight"))
