"""`make bench` phase `finetune-cache` (BENCH_ACCURACY=1): fine-tuning from the cached cut
(FINETUNE_FROM=cache, the default) against fine-tuning from the images (FINETUNE_FROM=images).

    BENCH_CUT_N=50           images per class folder for the extract cost figures (AUGMENT=2)
    BENCH_CUT_AUGMENT=5      the views per training image that fine-tuning from the cache reads
    BENCH_FINETUNE_EPOCHS=5  fine-tuning epochs from the cache (as accuracy.py's)
    BENCH_CUT_SEEDS=0,1,2    phase `finetune-cache-seeds`: the seeds each way is trained at
    BENCH_CUT_AUGMENTS=5,10  ... and the views per image of the ways from the cache
    BENCH_E2E_AUGMENT=10     phase `finetune-e2e`: the views per image of the way from the cache
    BENCH_E2E_EPOCHS=10      ... and the fine-tuning epochs of both ways (FINETUNE_EPOCHS)

Figures, each pair measured in this one run:
- cut_extract_seconds_{none,float16,float32}: a fresh extract of BENCH_CUT_N images per folder
  with AUGMENT=2, without the cut and with it in each storage; cut_mb_per_1000_rows_{float16,
  float32} (and features_mb_per_1000_rows): the segment files' bytes per 1000 rows, where a row
  is one image or one view;
- finetune_epoch_seconds_{cache,images}: one fine-tuning epoch of all cats_vs_dogs, from the same
  head with the same settings, whole (training pass and validation) and its training pass alone.
Phase `finetune-cache-seeds` (`seeds`): accuracy from the images and from the cache at K views,
over seeds, with intervals. Phase `finetune-e2e` (`end_to_end`): the wall clock from an empty
cache to finetuned.keras, each stage timed, both ways in one run.
"""
import json
import os
import shutil
import time

import keras
import support  # bench/support.py: EpochTimer

from pipeline import cache, extract, finetune, train_head
from pipeline.model import backbone

CUT_N = int(os.environ.get("BENCH_CUT_N") or 50)
CUT_AUGMENT = int(os.environ.get("BENCH_CUT_AUGMENT") or 5)
SEEDS = [int(s) for s in (os.environ.get("BENCH_CUT_SEEDS") or "0,1,2").split(",") if s]
SEED_AUGMENTS = [int(k) for k in (os.environ.get("BENCH_CUT_AUGMENTS") or "5,10").split(",") if k]
E2E_AUGMENT = int(os.environ.get("BENCH_E2E_AUGMENT") or 10)
E2E_EPOCHS = int(os.environ.get("BENCH_E2E_EPOCHS") or 10)


class EpochWall(keras.callbacks.Callback):
    """Seconds of each whole epoch: its training pass and its validation."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def figures(config, root, work, first_images):
    out = extract_costs(config, work, first_images)
    cached = config.replace(augment=CUT_AUGMENT,
                            models_root=os.path.join(root, f"models_cache{CUT_AUGMENT}"))
    extract.run(cached)  # the plain cache, K views and the cut (only what is missing)
    train_head.run(cached)
    for source in ("images", "cache"):  # one epoch each, from the same head
        wall, timer = EpochWall(), support.EpochTimer()
        run = finetune.run(cached.replace(finetune_from=source, finetune_epochs=1, fresh=True),
                           callbacks=[wall, timer])
        assert run.source == source, run.source
        out[f"finetune_epoch_seconds_{source}"] = wall.seconds[0]
        out[f"finetune_train_pass_seconds_{source}"] = timer.seconds[0]
    out["finetune_epoch_speedup"] = (out["finetune_epoch_seconds_images"]
                                     / out["finetune_epoch_seconds_cache"])
    out["finetune_train_pass_speedup"] = (out["finetune_train_pass_seconds_images"]
                                          / out["finetune_train_pass_seconds_cache"])
    return out


def extract_costs(config, work, first_images):
    """A fresh extract of CUT_N images per folder with AUGMENT=2: without the cut, and with it in
    float16 and float32; the disk each layer takes per 1000 rows."""
    folder = os.path.join(work, "cut_costs")
    data = os.path.join(folder, "data")
    if not os.path.isdir(data):
        first_images(config.data, data, CUT_N)
    out = {}
    for name, changes in (("none", dict(finetune_from="images")),
                          ("float16", dict(cut_storage="float16")),
                          ("float32", dict(cut_storage="float32"))):
        root = os.path.join(folder, f"features_{name}")
        shutil.rmtree(root, ignore_errors=True)
        run = config.replace(data=data, name="cut_costs", augment=2, features_root=root,
                             **changes)
        result = extract.run(run)
        out[f"cut_extract_seconds_{name}"] = result.seconds
        rows = result.rows + result.views
        with cache.FeatureStore(run.features_dir) as store:
            layers = {"features_mb_per_1000_rows": backbone.identity_id(store.identity)}
            if store.cut:
                layers[f"cut_mb_per_1000_rows_{name}"] = store.cut["identity_id"]
        for key, identity_id in layers.items():
            where = cache.segment_dir(run.features_dir, identity_id)
            size = sum(entry.stat().st_size for entry in os.scandir(where))
            out[key] = size / rows * 1000 / 1e6
    return out


def seeds(config, root, finetune_epochs, scores):
    """The fine-tuned model from the images (AUGMENT=0, fresh augmentation every epoch) and from
    the cache with BENCH_CUT_AUGMENTS views, each trained at SEEDS (head, fine-tuning and, from
    the cache, the views: SEED is part of the augmentation's identity, so each seed's views are
    extracted once): validation and test accuracy per seed, their means and 95% t-intervals,
    and the mean paired gap cache - images. `scores`: accuracy.scores, the three models scored
    one way."""
    out = {}
    runs = [("images", 0)] + [(f"cache{k}", k) for k in SEED_AUGMENTS]
    for k in sorted({k for _, k in runs}, reverse=True):
        extract.run(config.replace(augment=k))  # SEED=0's views, before any training
    log = os.path.join(root, "seeds.jsonl")  # each run as it ends: a cut-short phase keeps them
    for seed in SEEDS:  # seed by seed: every way has as many seeds as any other when cut short
        for name, k in runs:
            run = config.replace(augment=k, seed=seed, finetune_epochs=finetune_epochs,
                                 finetune_from="images" if k == 0 else "cache",
                                 models_root=os.path.join(root, f"models_{name}_seed{seed}"))
            extract.run(run)  # AUGMENT=k's master, with this seed's views (computed once)
            train_head.run(run)
            tuned = finetune.run(run)
            assert tuned.source == ("images" if k == 0 else "cache"), tuned.source
            scored = scores(run, prefix="acc")
            with open(log, "a") as f:
                f.write(json.dumps({"way": name, "seed": seed, "seconds": tuned.seconds,
                                    "best_epoch": tuned.best_epoch, **scored}) + "\n")
            for model in ("dense", "finetuned"):
                for suffix in ("", "_test"):
                    out.setdefault(f"seeds_{name}_{model}{suffix}", []).append(
                        scored[f"acc_{model}{suffix}"])
            out.setdefault(f"seeds_{name}_finetune_seconds", []).append(tuned.seconds)
    for name, _ in runs:
        for suffix in ("", "_test"):
            out[f"seeds_{name}_finetuned{suffix}_mean"], out[
                f"seeds_{name}_finetuned{suffix}_ci95"] = _mean_interval(
                out[f"seeds_{name}_finetuned{suffix}"])
            if name != "images":
                gaps = [a - b for a, b in zip(out[f"seeds_{name}_finetuned{suffix}"],
                                              out[f"seeds_images_finetuned{suffix}"])]
                out[f"seeds_{name}_minus_images{suffix}_mean"], out[
                    f"seeds_{name}_minus_images{suffix}_ci95"] = _mean_interval(gaps)
    extract.run(config)  # back to AUGMENT=0
    return out


def end_to_end(config, root, scores):
    """From an empty cache to finetuned.keras, SEED=0, E2E_EPOCHS of fine-tuning (early stopping
    as configured): extract with E2E_AUGMENT views and the cut + train-head + fine-tuning from
    the cache, against extract with no views + train-head + fine-tuning from the images. Each
    stage's seconds (e2e_<way>_<stage>_seconds), the epochs run and both models' accuracy."""
    out = {}
    for way, changes in ((f"cache{E2E_AUGMENT}", dict(augment=E2E_AUGMENT, finetune_from="cache")),
                         ("images", dict(augment=0, finetune_from="images"))):
        folder = os.path.join(root, f"e2e_{way}")
        shutil.rmtree(folder, ignore_errors=True)  # empty: every stage computes everything
        run = config.replace(features_root=os.path.join(folder, "features"),
                             models_root=os.path.join(folder, "models"), seed=0,
                             finetune_epochs=E2E_EPOCHS, **changes)
        seconds = {}
        for stage, module in (("extract", extract), ("train_head", train_head),
                              ("finetune", finetune)):
            start = time.perf_counter()
            result = module.run(run)
            seconds[stage] = time.perf_counter() - start
        assert result.source == changes["finetune_from"], result.source
        name = f"e2e_{way}"
        out.update({f"{name}_{stage}_seconds": s for stage, s in seconds.items()})
        out[f"{name}_seconds"] = sum(seconds.values())
        out[f"{name}_epochs"], out[f"{name}_best_epoch"] = result.epochs, result.best_epoch
        scored = scores(run, prefix="acc")
        for model in ("dense", "finetuned"):
            for suffix in ("", "_test"):
                out[f"{name}_{model}{suffix}"] = scored[f"acc_{model}{suffix}"]
    return out


def _mean_interval(values):
    """The mean and the half-width of its 95% t-interval."""
    import statistics
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}  # Student's t, n - 1 degrees of freedom
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, t95.get(len(values), 2.0) * statistics.stdev(values) / len(values) ** 0.5
