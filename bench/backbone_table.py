"""Figure 9, the backbones side by side: `make bench` (phase "backbones"), or alone:

    .venv/bin/python bench/backbone_table.py [PHOTOS] [BACKBONE ...]   (default: 64, every one)
    .venv/bin/python bench/backbone_table.py gmac [BACKBONE ...]       (GMAC at 224 and 150)

For each backbone, in one process, at SIZE=150 with WEIGHTS=none (speed does not depend on the
weights' values), PRECISION=auto and the default views (AUGMENT=5, FINETUNE_FROM=cache):

    model_ips          model-only images/s: its compiled forward pass on batches decoded once and
                       held in memory (backbone.feature_function), the most extraction could reach
    extract_ips        extraction, files -> rows on disk, per image (model build included)
    extract_rows_ps    the same run per row: an image's plain row and its views, each computed
                       once for every cached layer (the features and the cut)
    rows_vs_model      extract_rows_ps / model_ips: the share of the model's own speed extraction
                       keeps (a row costs one forward pass, as an image does in model_ips)
    finetune_epoch_s   one fine-tuning epoch from the cache (the second: the first traces)
    bytes_per_row      the cache's segment bytes (features, cut, views) / its rows

The ratios are measured within one run; on a shared machine the absolute figures are noisy.
"""
import os
import sys
import time

from pipeline.model import runtime  # first: sets TF_ENABLE_ONEDNN_OPTS, then the backend

runtime.start(os.environ.get("BACKEND", ""))  # before anything imports Keras

# isort: split
import keras  # noqa: E402
import numpy as np  # noqa: E402

from pipeline import extract, finetune, train_head  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.data import backbones, images  # noqa: E402
from pipeline.model import backbone  # noqa: E402

SIZE, BATCH, MODEL_BATCHES = 150, 32, 4


class EpochTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def model_only(entry, paths, precision):
    """Images/s of the backbone's forward pass alone, on in-memory decoded batches."""
    base = backbone.build_backbone(backbone.resolve_weights("none", entry), SIZE, precision,
                                   entry=entry)
    features_of = backbone.feature_function(base)
    decoded = np.stack([images.load_image(p, SIZE, entry.preprocess) for p in paths[:BATCH]])
    features_of(decoded)  # warm-up: tracing and the first run's allocations
    start = time.perf_counter()
    for _ in range(MODEL_BATCHES):
        features_of(decoded)
    return MODEL_BATCHES * len(decoded) / (time.perf_counter() - start)


def gmacs(entry, size):
    """Multiply-accumulates of one image through the base at SIZE, in billions, counted from its
    convolutions (depthwise and grouped included) and dense layers."""
    base = backbone.build_backbone(backbone.resolve_weights("none", entry), size, entry=entry)
    total = 0
    for layer in base._flatten_layers(include_self=False, recursive=True):
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                  keras.layers.Dense)):
            continue
        out = layer.output.shape
        kernel = layer.kernel.shape  # (kh, kw, in / groups, out), depthwise (kh, kw, in, mult)
        per_output = int(np.prod(kernel[:-1]))
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            per_output = int(np.prod(kernel[:2]))
        total += int(np.prod(out[1:])) * per_output
    return total / 1e9


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
               for f in files)


def one(entry, data, work, paths, split=None):
    """The figures of one backbone (see the module's docstring)."""
    config = Config(data=data, name=f"bb-{entry.name}", backbone=entry.name, weights="none",
                    split=split, size=SIZE, batch_size=BATCH, epochs=2, finetune_epochs=2,
                    features_root=os.path.join(work, "features"),
                    models_root=os.path.join(work, "models"))
    precision = backbone.resolve_precision("auto", entry)  # extract's, so the two compare
    model_ips = model_only(entry, paths, precision)
    start = time.perf_counter()
    result = extract.run(config)
    seconds = time.perf_counter() - start
    rows = result.new + result.new_views
    train_head.run(config)
    epochs = EpochTimes()
    finetune.run(config, callbacks=[epochs])
    stored = folder_bytes(os.path.join(config.features_dir, "segments"))
    return {"model_ips": model_ips, "extract_ips": result.new / seconds,
            "extract_rows_ps": rows / seconds, "rows_vs_model": rows / seconds / model_ips,
            "finetune_epoch_s": epochs.seconds[-1], "bytes_per_row": stored / rows,
            "rows": rows, "images": result.new, "extract_s": seconds, "precision": precision}


def run(picked, work, names=None, split=None):
    """{"backbone_table": {name: figures}} for `picked` [(class, path)] photos, linked into a
    folder of their own under `work`; `split` (SPLIT) where a few photos need one that leaves
    every split some."""
    data = os.path.join(work, "data", "backbones")
    for class_name, path in picked:
        os.makedirs(os.path.join(data, class_name), exist_ok=True)
        link = os.path.join(data, class_name, os.path.basename(path))
        if not os.path.lexists(link):
            os.symlink(path, link)
    paths = [path for _, path in picked]
    table = {}
    for name in names or backbones.TABLE:
        print(f"--- backbone {name}", flush=True)
        table[name] = one(backbones.get(name), data, work, paths, split)
        print(row(name, table[name]), flush=True)
    return {"backbone_table": table}, {}


HEADER = (f"{'backbone':<17} {'model img/s':>11} {'extract img/s':>13} {'rows/s':>7} "
          f"{'rows/s / model':>14} {'ft epoch s':>10} {'KB/row':>7}")


def row(name, f):
    return (f"{name:<17} {f['model_ips']:>11.1f} {f['extract_ips']:>13.1f} "
            f"{f['extract_rows_ps']:>7.1f} {f['rows_vs_model']:>14.2f} "
            f"{f['finetune_epoch_s']:>10.1f} {f['bytes_per_row'] / 1e3:>7.1f}")


def print_table(table):
    print(HEADER)
    for name, figures in table.items():
        print(row(name, figures))


if __name__ == "__main__":
    import shutil

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench  # the photos and the work folder, as `make bench` picks them
    if sys.argv[1:2] == ["gmac"]:  # the multiply-accumulates alone, at 224 and at SIZE
        for name in sys.argv[2:] or backbones.TABLE:
            entry = backbones.get(name)
            print(f"{name:<17} {gmacs(entry, 224):6.2f} GMAC at 224, {gmacs(entry, SIZE):6.2f} "
                  f"at {SIZE}")
        sys.exit()
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    work = os.path.join(bench.WORK, "backbones")
    shutil.rmtree(work, ignore_errors=True)
    figures, _ = run(bench.pick_images(bench.DATA, count), work, sys.argv[2:] or None)
    print()
    print_table(figures["backbone_table"])
    m = bench.support.machine()
    print(f"\n{m['cpu']}, {m['cpu_count']} cores; {count} photos, SIZE={SIZE}, "
          f"BATCH_SIZE={BATCH}, AUGMENT=5, WEIGHTS=none")
