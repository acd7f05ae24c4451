"""Is the dense head below logreg, or is that one split's draw? Both models, trained by the
pipeline's own train_head.train_logreg and train_head.train_dense, on R random re-splits of the
cached images (bench/QUALITY_NOTES.md, section g). `make bench`'s `resplits` phase
(BENCH_ACCURACY=1, BENCH_RESPLITS) runs the shipped head; this script also runs variants of it:

    [R=30] [VARIANTS=shipped,pool1,...] PYTHONPATH=. .venv/bin/python bench/resplit.py FEATURES_DIR

Every re-split keeps the cache's split sizes (cats_vs_dogs: 2,000 train, 522 validation, 478
test) and each class's share of the whole, and hands its rows to the trainers in place of the
cache's splits. Their files go to bench/work/resplit/ (git-ignored), each re-split over the last.
The pipeline's own split runs first, as a control left out of the means.

The re-splits share their photos, so their gaps are not independent: the interval of the mean
gap is Nadeau and Bengio's corrected one (`mean_interval`), about 3x wider than the plain
t-interval here.
"""
import json
import os
import sys
import time

from pipeline.model import runtime

runtime.start(os.environ.get("BACKEND", ""))  # before Keras is imported (as bench.py does)

# isort: split
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402  (scikit-learn's own dependency)

from pipeline import cache, train_head  # noqa: E402
from pipeline.cache import settings  # noqa: E402
from pipeline.config import Config  # noqa: E402

SPLITS = ("train", "validation", "test")
WORK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "work", "resplit")
VARIANTS = {  # name: changes to the config's head settings
    "shipped": {},
    "pool1": {"head_pool": 1},  # the article's flattened 4x4 map
    "units_64": {"hidden_units": 64},
    "dropout_0.7": {"dropout": 0.7},
    "lr_3e-5": {"head_lr": 3e-5},
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
    config = config.replace(models_root=WORK)  # never the dataset's own models
    os.makedirs(config.models_dir, exist_ok=True)
    # the files train-head would commit, written here and never read: the gaps are the figure
    scratch = {kind: os.path.join(config.models_dir, name) for kind, name in
               (("logreg", "resplit.npz"), ("dense", "resplit.keras"), ("plot", "resplit.png"))}
    gaps = {name: {"validation": [], "test": []} for name in variants}
    with cache.FeatureStore(config.features_dir) as store:
        own = {split: store.rows(split) for split in SPLITS}
        sizes = {split: len(rows) for split, rows in own.items()}
        every = np.concatenate(list(own.values()))
        labels = store.labels[every]
        for r in range(-1, repeats):  # -1: the pipeline's own split, left out of the means
            rows = own if r < 0 else {split: np.sort(every[indices]) for split, indices in
                                      random_split(labels, sizes, seed=r).items()}
            start = time.perf_counter()
            runtime.set_seed(config.seed)  # as train_head.run does before its heads
            record = {"resplit": r if r >= 0 else "the pipeline's own",
                      "logreg": accuracies(train_head.train_logreg(
                          config, store, rows, train_head.LOGREG_MEMORY_MB, scratch["logreg"]))}
            for name in variants:
                runtime.set_seed(config.seed)
                entry = train_head.train_dense(config.replace(**VARIANTS[name]), store, rows,
                                               (), scratch)
                record[name] = accuracies(entry)
                if r >= 0:
                    for k in gaps[name]:
                        gaps[name][k].append(record[name][k] - record["logreg"][k])
            log(json.dumps({**record, "seconds": round(time.perf_counter() - start, 1)}))
    return gaps, sizes


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


def accuracies(entry):
    """{validation: accuracy, test: accuracy} of a trainer's metrics entry."""
    return {k: round(entry[k]["accuracy"], 4) for k in ("validation", "test")}


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
    config = settings.resolve(config, settings.read(config.features_dir), "train-head")
    gaps, sizes = dense_against_logreg(config, repeats, chosen.split(","),
                                       log=lambda line: print(line, flush=True))
    for name, by_split in gaps.items():
        summary = {}
        for split, values in by_split.items():
            summary[f"{split}_gap_mean_ci95"] = [round(v, 4) for v in mean_interval(
                values, sizes[split], sizes["train"])]
            summary[f"{split}_resplits_dense_ge_logreg"] = int(np.sum(np.asarray(values) >= 0))
        print(json.dumps({"variant": name, "resplits": repeats, **summary}), flush=True)
