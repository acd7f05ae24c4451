"""`make bench` phase `finetune-cache` (BENCH_ACCURACY=1): fine-tuning from the cached cut
(FINETUNE_FROM=cache, the default) against fine-tuning from the images (FINETUNE_FROM=images).

    BENCH_CUT_N=50           images per class folder for the extract cost figures (AUGMENT=2)
    BENCH_CUT_AUGMENT=5      the views per training image that fine-tuning from the cache reads
    BENCH_FINETUNE_EPOCHS=5  fine-tuning epochs from the cache (as accuracy.py's)

Figures, each pair measured in this one run:
- cut_extract_seconds_{none,float16,float32}: a fresh extract of BENCH_CUT_N images per folder
  with AUGMENT=2, without the cut and with it in each storage; cut_mb_per_1000_rows_{float16,
  float32} (and features_mb_per_1000_rows): the segment files' bytes per 1000 rows, where a row
  is one image or one view;
- finetune_epoch_seconds_{cache,images}: one fine-tuning epoch of all cats_vs_dogs, from the same
  head with the same settings, whole (training pass and validation) and its training pass alone;
- cache_acc_*: the dense head and the model fine-tuned from the cache, on validation and test.
"""
import os
import shutil
import time

import keras
import support  # bench/support.py: EpochTimer

from pipeline import backbone, cache, extract, finetune, registry, train_head

CUT_N = int(os.environ.get("BENCH_CUT_N") or 50)
CUT_AUGMENT = int(os.environ.get("BENCH_CUT_AUGMENT") or 5)


class EpochWall(keras.callbacks.Callback):
    """Seconds of each whole epoch: its training pass and its validation."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def figures(config, root, work, first_images, finetune_epochs):
    out = extract_costs(config, work, first_images)
    cached = config.replace(augment=CUT_AUGMENT,
                            models_root=os.path.join(root, f"models_cache{CUT_AUGMENT}"))
    start = time.perf_counter()
    extract.run(cached)  # the plain cache, K views and the cut (only what is missing)
    out["cache_extract_seconds"] = time.perf_counter() - start
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
    tuned = finetune.run(cached.replace(finetune_epochs=finetune_epochs, fresh=True))
    out.update(cache_finetune_seconds=tuned.seconds, cache_finetune_best_epoch=tuned.best_epoch,
               cache_finetune_epoch_acc=registry.record(cached, "finetuned")
               .entry["history"]["val_accuracy"])
    import accuracy  # bench/accuracy.py: the three models scored one way
    scored = accuracy.scores(cached, prefix="cache_acc", intervals=True)
    out.update(scored)
    for suffix in ("", "_test"):
        out[f"cache_finetuned_minus_dense{suffix}"] = (scored[f"cache_acc_finetuned{suffix}"]
                                                       - scored[f"cache_acc_dense{suffix}"])
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
