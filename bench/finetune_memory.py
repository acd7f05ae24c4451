"""`make bench` phase `finetune-memory`: the peak RSS of fine-tuning from the cache on a synthetic
cache of BENCH_SYNTH_ROWS training rows (default 100,000), each with AUGMENT=2 views, at SIZE=150.

The cache is laid out exactly as extract writes it (segments of the features and of the
block4_pool cut, views, features.h5), but its segments' chunks are never written: HDF5 reads an
unwritten chunk as zeros, so 100,000 x 3 rows of 9x9x512 take a few MB of disk instead of 25 GB
(each segment file is lengthened with a hole to the bytes its rows declare, as the cache checks),
while every read still goes through the master's virtual datasets. Fine-tuning computes on zeros
at full cost; memory, not accuracy, is measured. A process of its own fine-tunes for
BENCH_FINETUNE_BATCHES batches (a whole epoch of 100,000 rows takes about 40 minutes on 2 cores)
and its peak RSS is read from the kernel, as /usr/bin/time does.

    python bench/finetune_memory.py FOLDER BATCHES   (the measured process; bench.py starts it)
"""
import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.environ.get("BENCH_SMOKE", "") not in ("", "0")  # bench.py's: every phase, tiny
ROWS = int(os.environ.get("BENCH_SYNTH_ROWS") or (64 if SMOKE else 100_000))
BATCHES = int(os.environ.get("BENCH_FINETUNE_BATCHES") or (1 if SMOKE else 100))
HELD_OUT = 16 if SMOKE else 1000  # validation and test rows each: what each epoch scores
SIZE, VIEWS, PER_SEGMENT = 64 if SMOKE else 150, 2, 4096


def config_of(folder):
    from pipeline.cache import settings
    from pipeline.config import Config
    # resolved as a stage resolves it: the settings not written here take their defaults
    return settings.resolve(Config(
        data=folder, name="synthetic_cut", weights="none", size=SIZE, augment=VIEWS,
        precision="float32", epochs=1, head="dense", finetune_epochs=1, fresh=True,
        features_root=os.path.join(folder, "features"),
        models_root=os.path.join(folder, "models")), None, "extract")


def write_sparse_cache(folder):
    """features/synthetic_cut/ with ROWS training rows (+ HELD_OUT validation and test), VIEWS
    views of each training row, the features and the block4_pool cut, chunks never written."""
    import numpy as np

    from pipeline import cache, extract
    from pipeline.cache import index, views
    from pipeline.data import augment, datasets
    from pipeline.model import backbone
    config = config_of(folder)
    weights = backbone.resolve_weights("none")
    identity = backbone.identity_of(weights, SIZE)
    targets, cut = extract.cached_layers(config, identity)
    total = ROWS + 2 * HELD_OUT
    shas = [hashlib.sha256(f"synthetic-{i}".encode()).hexdigest() for i in range(total)]
    augment_id = augment.identity_id(augment.identity(config.seed))
    keys = shas + [augment.view_key(shas[i], augment_id, v)
                   for v in range(1, VIEWS + 1) for i in range(ROWS)]
    known = [index.SegmentIndex() for _ in targets]
    for target, found in zip(targets, known):
        shape = target.shape
        for first in range(0, len(keys), PER_SEGMENT):
            part = keys[first:first + PER_SEGMENT]
            segment = cache.write_segment_filled(config.features_dir, target.identity_id,
                                                 part, shape, target.dtype,
                                                 lambda dataset: None)
            declared = len(part) * (int(np.prod(shape)) * np.dtype(target.dtype).itemsize + 64)
            pad_sparsely(os.path.join(config.features_dir, segment), declared)
            found.add_segment(segment, part)
    split = np.array([b"train"] * ROWS + [b"validation"] * HELD_OUT + [b"test"] * HELD_OUT)
    rows = index.Rows([], np.zeros(total, np.int32),
                      path=np.array([f"{'cd'[i % 2]}/{i:06d}.jpg" for i in range(total)],
                                    dtype=object),
                      label=np.arange(total) % 2, sha256=index.as_keys(shas), split=split,
                      size=np.zeros(total, np.int64), mtime_ns=np.zeros(total, np.int64),
                      segment_row=np.zeros(total, np.int64),
                      segment_rows=np.zeros(total, np.int64))
    rows.place(known[0])
    wanted = [(augment.view_key(shas[i], augment_id, v), shas[i], v, "")
              for v in range(1, VIEWS + 1) for i in range(ROWS)]
    view_rows = views.records(wanted, known[0])
    cut_rows = cache.Layer.of(cut["layer"], known[1], rows.sha256, views.records(wanted, known[1]),
                              targets[1].shape, targets[1].dtype)
    dataset = datasets.Dataset(root=folder, layout="folders", class_names=["c", "d"], files=[],
                               skipped=[])
    attrs = extract.cache_attributes(config, dataset, weights, identity, rows, view_rows, cut,
                                     cut_rows)
    cache.write_master(config.features_dir, rows, attrs, identity.feature_shape,
                       np.float32, {}, view_rows, cut_rows)
    return config


def pad_sparsely(path, size):
    """Lengthen the file at `path` to `size` bytes with a hole (no disk blocks on Linux file
    systems): the cache refuses a segment that declares more rows than its bytes could hold,
    and these rows are never written. HDF5 ignores bytes past its end of file."""
    if os.path.getsize(path) < size:
        os.truncate(path, size)


def peak_rss_gb(folder, batches, log):
    """Run this file's fine-tuning in a process of its own; its peak RSS in GB (10^9 bytes)."""
    import support  # bench/support.py: the launcher that reads a child's own peak
    report = log + ".rusage"
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", support.LAUNCHER, report, sys.executable,
                        os.path.abspath(__file__), folder, str(batches)], cwd=ROOT, stdout=out,
                       stderr=subprocess.STDOUT, check=True)
    with open(report) as f:
        code, maxrss = (int(v) for v in f.read().split())
    if code != 0:
        sys.exit(f"fine-tuning on the synthetic cache failed: see {log}")
    return maxrss * 1024 / 1e9  # KiB on Linux


def figures(work):
    import shutil
    import time

    from pipeline import train_head
    folder = os.path.join(work, "synthetic_cut")
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    config = write_sparse_cache(folder)
    written = time.perf_counter() - start
    train_head.run(config)  # the head that fine-tuning starts from (one epoch on zeros)
    gb = peak_rss_gb(folder, BATCHES, os.path.join(work, "finetune_memory.log"))
    shutil.rmtree(folder, ignore_errors=True)
    return {"finetune_cache_peak_rss_gb": gb, "finetune_cache_synthetic_rows": ROWS,
            "finetune_cache_synthetic_views": VIEWS, "finetune_cache_batches": BATCHES,
            "finetune_cache_synthetic_write_seconds": written}


def main(folder, batches):
    import keras

    from pipeline import finetune

    class StopAfter(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 >= batches:
                self.model.stop_training = True

    result = finetune.run(config_of(folder), callbacks=[StopAfter()])
    assert result.source == "cache", result.source
    print(f"fine-tuned {batches} batches from the cache of {ROWS} training rows")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
