"""`make bench`: the pipeline's performance figures -> a table and bench/results.json.

Settings (environment variables; bench/README.md explains every figure):
    BENCH_N=600              real photos for the throughput, rerun and head figures (balanced over
                             the two classes, train first); the default run took 20 min on
                             2 quiet cores (AMD EPYC), without Ray
    BENCH_SYNTH_ROWS=100000  rows of the synthetic caches for the train-head memory figure (3.3 GB)
                             and the fine-tuning-from-the-cache one (bench/finetune_memory.py)
    BENCH_ACCURACY=1         also the slow accuracy figures (bench/accuracy.py: WEIGHTS,
                             BENCH_FINETUNE_EPOCHS, BENCH_AUGMENT, BENCH_RESPLITS; all of
                             cats_vs_dogs, caches kept in bench/acc/: ~40 min on 2 cores once
                             they exist)
    BENCH_BACKBONE_N=64      photos for the backbone table (bench/backbone_table.py, ~5 min)
    BENCH_RAY=0              skip the ENGINE=ray section (bench/ray_bench.py), which runs when Ray
                             is installed (make install-ray): ~5 min on 2 cores
    BENCH_ONLY=<phases>      only these phases, by title, comma-separated (e.g.
                             accuracy,resplits,demo,augmented-heads,augmented-finetune,
                             float16-heads);
                             the other figures of bench/results.json are kept
    BENCH_DATA=<dir>         the photos (default ../shared/data/cats_vs_dogs, read-only: the
                             benchmark folders are symlinks under bench/work/, git-ignored)
    BACKEND=jax|torch        the Keras backend of this process (default: KERAS_BACKEND, else
                             tensorflow); figure 7 measures every installed backend anyway
    BENCH_SMOKE=1            every phase on a few dozen photos at SIZE=64 (a few minutes on 2
                             cores), no target checked, figures in bench/work/smoke_results.json:
                             CI's proof that each phase still runs, not a measurement
Speed does not depend on the weights' values, so every timing runs with WEIGHTS=none.
TF_ENABLE_ONEDNN_OPTS=0 make bench measures everything with TensorFlow's default CPU kernels (the
"before" of the oneDNN option); figure 6, the speed options, lives in bench/options.py.
"""
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SEED_ENV = dict(os.environ)  # the naive Keras way runs with TensorFlow's defaults, as the seed did

from pipeline.model import runtime  # noqa: E402  first: sets TF_ENABLE_ONEDNN_OPTS, then the backend  # noqa: E402

BACKEND = runtime.start(os.environ.get("BACKEND", ""))  # before anything imports Keras

# isort: split
import backbone_table  # noqa: E402  (bench/backbone_table.py: figure 9, every backbone)
import backends  # noqa: E402  (bench/backends.py: figure 7, every backend and the loader)
import finetune_memory  # noqa: E402  (bench/finetune_memory.py: fine-tuning from the cache)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import options  # noqa: E402  (bench/options.py: figure 6, and the naive Keras way)
import support  # noqa: E402  (bench/support.py: the synthetic cache, the machine)
import targets  # noqa: E402  (bench/targets.py: every figure and its target)

from pipeline import cache, extract, train_head  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.data import images  # noqa: E402
from pipeline.fs import artifacts  # noqa: E402
from pipeline.model import backbone, heads  # noqa: E402

SMOKE = os.environ.get("BENCH_SMOKE", "") not in ("", "0")
N = int(os.environ.get("BENCH_N") or (24 if SMOKE else 600))
SYNTH_ROWS = int(os.environ.get("BENCH_SYNTH_ROWS") or (64 if SMOKE else 100_000))
BACKBONE_N = int(os.environ.get("BENCH_BACKBONE_N") or (24 if SMOKE else 64))  # backbone table
# the smoke run: the table's code path on the default base and one that preprocesses inside
SMOKE_BACKBONES = ["vgg16", "mobilenetv3large"]
ACCURACY = os.environ.get("BENCH_ACCURACY", "") not in ("", "0")
RAY = os.environ.get("BENCH_RAY", "") != "0" and importlib.util.find_spec("ray") is not None
ONLY = os.environ.get("BENCH_ONLY", "")
DATA = os.environ.get("BENCH_DATA") or os.path.join(ROOT, "..", "shared", "data", "cats_vs_dogs")
SIZE, BATCH = (64, 8) if SMOKE else (150, 32)
MODEL_ONLY_BATCHES = 8     # timed in-memory batches (after one untimed warm-up batch)
HEAD_EPOCHS = 2 if SMOKE else 6  # dense-head epochs timed on the cache; patience 5: all run
FROZEN_IMAGES = 16 if SMOKE else 128  # images timed through base + head (x train rows: an epoch)
SYNTH_EPOCHS = 1 if SMOKE else 2  # train-head epochs on the synthetic cache (memory, not speed)
WORK = os.path.join(ROOT, "bench", "work")
RESULTS = os.path.join(WORK, "smoke_results.json") if SMOKE else \
    os.path.join(ROOT, "bench", "results.json")
LOG = os.path.join(WORK, "subprocesses.log")  # stderr of the processes bench/options.py starts


def main():
    if N < 20:
        sys.exit(f"BENCH_N={N}: use at least 20 images (10% of them are the rerun's new images)")
    support.grow_gpu_memory()  # leave GPU memory to the stage processes
    results = {"machine": support.machine(), "versions": support.versions(),
               "settings": dict(BENCH_N=N, BENCH_SYNTH_ROWS=SYNTH_ROWS, BENCH_ACCURACY=ACCURACY,
                                BENCH_SMOKE=SMOKE,
                                size=SIZE, batch_size=BATCH, weights="none", backend=BACKEND,
                                precision=backbone.resolve_precision("auto"),
                                data=os.path.abspath(DATA),
                                model_only_batches=MODEL_ONLY_BATCHES, head_epochs=HEAD_EPOCHS,
                                frozen_images=FROZEN_IMAGES, synth_epochs=SYNTH_EPOCHS,
                                TF_ENABLE_ONEDNN_OPTS=os.environ["TF_ENABLE_ONEDNN_OPTS"],
                                naive_TF_ENABLE_ONEDNN_OPTS=SEED_ENV.get("TF_ENABLE_ONEDNN_OPTS",
                                                                         "(unset)")),
               "details": {}}
    if ONLY and os.path.exists(RESULTS):  # some phases: the other figures stay as last measured
        with open(RESULTS) as f:
            last = json.load(f)
        results = {**last, **results, "details": {**last.get("details", {})}}
    shutil.rmtree(WORK, ignore_errors=True)
    picked = pick_images(DATA, N)
    old, new = [p for i, p in enumerate(picked) if i % 10 != 9], picked[9::10]
    full_dir, inc_dir = link_folder("data/full", picked), link_folder("data/bench", old)
    for _, path in picked:  # warm the page cache: every method then reads the same warm files
        with open(path, "rb") as f:
            f.read()
    config = Config(data=inc_dir, name="bench", weights="none", size=SIZE, batch_size=BATCH,
                    features_root=os.path.join(WORK, "features"),
                    models_root=os.path.join(WORK, "models"))

    phases = [("extraction and reruns", lambda: extraction(config, inc_dir, old, new)),
              ("model-only limit", lambda: model_only([p for _, p in picked])),
              ("naive way", lambda: naive(full_dir)),
              ("head epochs", lambda: head_epochs(config)),
              ("peak RSS of extract", lambda: extract_memory(full_dir)),
              ("peak RSS of train-head", train_head_memory),
              ("finetune-memory", lambda: (finetune_memory.figures(WORK), {})),
              ("speed options", lambda: speed_options(picked, full_dir)),
              ("backends and the loader", lambda: backends.run(picked, WORK, SIZE, BATCH, LOG)),
              ("backbones", lambda: backbone_table.run(
                  picked[:BACKBONE_N], WORK, SMOKE_BACKBONES if SMOKE else None,
                  "50/25/25" if SMOKE else None))]
    if RAY:
        import ray_bench  # bench/ray_bench.py: ENGINE=ray against ENGINE=local
        phases.append(("ENGINE=ray against local", lambda: ray_bench.run(picked, WORK)))
    if ACCURACY:
        import accuracy  # bench/accuracy.py: needs train_head and finetune
        phases += accuracy.phases(DATA, WORK, SIZE, BATCH)
        phases.append(("precisions", lambda: ({"precision_accuracy": backends.precision_accuracy(
            accuracy.config_for(DATA, WORK, SIZE, BATCH)[0])}, {})))
    if ONLY:  # BENCH_ONLY=accuracy: the listed phases alone
        phases = [(title, phase) for title, phase in phases if title in ONLY.split(",")]
    for title, phase in phases:
        print(f"\n=== bench: {title} ===", flush=True)
        start = time.perf_counter()
        figures, details = phase()
        results.update(figures)
        results["details"].update(details,
                                  **{f"phase_seconds_{title}": time.perf_counter() - start})
        targets.derive(results)
        artifacts.write_json(RESULTS, results)  # after every phase: a crash keeps what was measured
    print_table(results)
    print(f"\nwrote {os.path.relpath(RESULTS)}"
          + (" (BENCH_SMOKE=1: every phase ran; the figures are not measurements)" if SMOKE
             else ""))


# --------------------------------------------------------------------------------------------
# Benchmark datasets: folders of symlinks to the read-only photos
# --------------------------------------------------------------------------------------------

def pick_images(data, n):
    """(class, path) of the first n images, alternating between the classes: train first, then
    validation once train runs out (n > 2000 on cats_vs_dogs)."""
    classes = sorted(os.listdir(os.path.join(data, "train")))
    per_class = {c: [] for c in classes}
    for split in ("train", "validation"):
        for c in classes:
            folder = os.path.join(data, split, c)
            if os.path.isdir(folder):
                per_class[c] += [os.path.realpath(os.path.join(folder, f))
                                 for f in sorted(os.listdir(folder)) if not f.startswith(".")]
    longest = max(len(paths) for paths in per_class.values())
    alternating = [(c, per_class[c][i]) for i in range(longest) for c in classes
                   if i < len(per_class[c])]
    if n > len(alternating):
        sys.exit(f"BENCH_N={n} but {data} has only {len(alternating)} images")
    return alternating[:n]


def link_folder(name, picked):
    """WORK/<name>/<class>/<file> -> the photo; layout (a), split 80/10/10 by content hash."""
    root = os.path.join(WORK, name)
    for class_name, path in picked:
        os.makedirs(os.path.join(root, class_name), exist_ok=True)
        os.symlink(path, os.path.join(root, class_name, os.path.basename(path)))
    return root


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# 1 + 3. Extraction throughput, model-only limit, naive Keras way, incremental reruns
# --------------------------------------------------------------------------------------------

def extraction(config, inc_dir, old, new):
    """Extract 90% of the images (timed: files on disk -> rows in HDF5, model build included, TF
    import not), then add the other 10% and rerun, then rerun with nothing new. A full
    extraction of all N images is estimated as N / (the 90% run's images per second)."""
    first, t_first = timed(extract.run, config)
    assert first.new == len(old), first
    for class_name, path in new:
        os.symlink(path, os.path.join(inc_dir, class_name, os.path.basename(path)))
    more, t_more = timed(extract.run, config)
    assert more.new == len(new) and more.reused == len(old), more
    same, t_same = timed(extract.run, config)
    assert same.new == 0 and not same.changed, same
    ips = len(old) / t_first
    full_s = (len(old) + len(new)) / ips
    rows = first.new + first.new_views
    return ({"extract_ips": ips, "extract_rows_ps": rows / t_first,
             "rerun_nothing_new_frac": t_same / full_s,
             "rerun_10pct_new_frac": t_more / full_s},
            {"extract_images": len(old), "extract_rows": rows, "extract_s": t_first,
             "full_extract_s_estimate": full_s,
             "rerun_10pct_new_images": len(new), "rerun_10pct_new_s": t_more,
             "rerun_nothing_new_s": t_same})


def model_only(paths):
    """The same backbone and compiled forward pass as extract (backbone.feature_function) on
    batches decoded once and held in memory: the most extraction could reach."""
    precision = backbone.resolve_precision("auto")  # extract's (the default base), so they compare
    base = backbone.build_backbone(backbone.resolve_weights("none"), SIZE, precision)
    features_of = backbone.feature_function(base)
    decoded = np.stack([images.load_image(p, SIZE) for p in paths[:4 * BATCH]])
    size = min(BATCH, len(decoded))
    batches = [decoded[i:i + size] for i in range(0, len(decoded) - size + 1, size)]
    features_of(batches[0])  # warm-up: tracing and the first run's allocations
    timed_batches = max(2, min(MODEL_ONLY_BATCHES, len(paths) // size))  # fewer for a small N
    start = time.perf_counter()
    for i in range(timed_batches):
        features_of(batches[i % len(batches)])  # returns numpy: waits for the result
    seconds = time.perf_counter() - start
    return ({"model_only_ips": timed_batches * size / seconds},
            {"model_only_images": timed_batches * size, "model_only_s": seconds})


def naive(folder):
    """What a user would write instead, in a process with the environment `make bench` was
    started with: the seed's Keras way (bench/options.py naive) where TensorFlow is installed
    (its image_dataset_from_directory is tf.data), else torchvision's ImageFolder + DataLoader +
    VGG16 (bench/options.py naive_torch), which is what a PyTorch machine offers."""
    way = "naive" if options.has("tensorflow") else "naive_torch"
    if way == "naive_torch" and not options.has("torchvision"):
        print("  no naive way to compare with: neither tensorflow nor torchvision is installed")
        return {}, {}
    naive = options.in_process([way, folder, SIZE, BATCH], SEED_ENV, LOG)
    return ({"naive_keras_ips": naive["ips"]},
            {"naive_way": way, "naive_keras_images": naive["images"],
             "naive_keras_s": naive["seconds"]})


# --------------------------------------------------------------------------------------------
# 2. Head training: an epoch on the cache vs an epoch with the frozen base in the loop
# --------------------------------------------------------------------------------------------

def head_epochs(config):
    timer = support.EpochTimer()
    train_head.run(config.replace(head="dense", epochs=HEAD_EPOCHS), callbacks=[timer])
    cache_epoch = statistics.median(timer.seconds[1:] or timer.seconds)  # 1st epoch: tracing
    with cache.FeatureStore(config.features_dir) as store:
        rows = store.rows("train")
        paths = [os.path.join(config.data, p) for p in store.paths[rows]]
        labels = store.labels[rows].astype(np.float32)[:, None]
        shape, classes = store.features.shape[1:], len(store.class_names)

    # The same head on top of the frozen base, trained on the images: every step pays decoding
    # and the VGG16 forward pass. Timed on the first FROZEN_IMAGES train images (whole batches).
    base = backbone.build_backbone(backbone.resolve_weights("none"), SIZE)
    head = heads.build_dense_head(shape, classes, config.hidden_units, config.dropout,
                                  config.head_pool)
    model = keras.Model(base.input, head(base.output))
    model.compile(optimizer=heads.optimizer(config.head_lr),
                  loss=heads.loss_for(classes), metrics=["accuracy"])
    k = min(len(paths), FROZEN_IMAGES)
    k -= k % BATCH if k >= BATCH else 0
    model.fit(images.labelled_dataset(paths[:BATCH], labels[:BATCH], SIZE, BATCH), verbose=0)
    _, seconds = timed(model.fit, images.labelled_dataset(paths[:k], labels[:k], SIZE, BATCH,
                                                          shuffle_seed=0), verbose=0)
    frozen_epoch = seconds / k * len(paths)
    return ({"head_epoch_s_cache": cache_epoch, "head_epoch_s_frozen_base": frozen_epoch},
            {"head_train_rows": len(paths), "head_epoch_s_cache_all": timer.seconds,
             "frozen_base_timed_images": k, "frozen_base_timed_s": seconds})


# --------------------------------------------------------------------------------------------
# 4. Memory: peak RSS of the CLI stages, each in its own process
# --------------------------------------------------------------------------------------------

def extract_memory(full_dir):
    gb = support.peak_rss_gb(["extract", "--data", full_dir, "--name", "memory",
                              "--weights", "none", "--size", str(SIZE), "--batch-size", str(BATCH),
                              "--features-root", os.path.join(WORK, "memory")],
                             os.path.join(WORK, "extract_memory.log"), ROOT)
    return {"extract_peak_rss_gb": gb}, {"extract_memory_images": N}


def train_head_memory():
    folder = os.path.join(WORK, "synthetic")
    need = SYNTH_ROWS * 4 * int(np.prod(backbone.feature_shape(SIZE))) * 1.1 + 2e9
    free = shutil.disk_usage(WORK).free
    if free < need:
        sys.exit(f"the synthetic cache needs {need / 1e9:.1f} GB on disk, {free / 1e9:.1f} GB "
                 "are free: free some space or lower BENCH_SYNTH_ROWS")
    try:
        (_, seconds) = timed(support.write_synthetic_cache, folder, SYNTH_ROWS, SIZE)
        gb = support.peak_rss_gb(["train-head", "--name", "synthetic", "--data", folder,
                                  "--epochs", str(SYNTH_EPOCHS), *support.SYNTHETIC_ARGS,
                                  "--features-root", os.path.join(folder, "features"),
                                  "--models-root", os.path.join(folder, "models")],
                                 os.path.join(WORK, "train_head_memory.log"), ROOT)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # 3.3 GB at 100,000 rows
    return ({"train_head_peak_rss_gb_100k": gb},
            {"synthetic_rows": SYNTH_ROWS, "synthetic_write_s": seconds})


# --------------------------------------------------------------------------------------------
# 6. The speed options, before and after (bench/options.py)
# --------------------------------------------------------------------------------------------

def speed_options(picked, full_dir):
    if BACKEND != "tensorflow":  # oneDNN on/off and the naive way are TensorFlow's options
        return {}, {}
    gpu = runtime.accelerator() == "gpu"
    figures = {"forward_ips": options.forward_variants(SEED_ENV, LOG, SIZE, gpu,
                                                       runtime.cpu_flags())}
    classes = {path: class_name for class_name, path in picked}

    def extract_ips(paths, name):
        folder = link_folder(f"data/decode_{name}", [(classes[p], p) for p in paths])
        return options.in_process(["extract", folder, int(name == "full"), SIZE, BATCH,
                                   os.path.join(WORK, "features")], dict(os.environ), LOG)["ips"]

    figures.update(options.decoding([p for _, p in picked], SIZE, extract_ips))
    figures["naive_keras_onednn_ips"] = options.in_process(
        ["naive", full_dir, SIZE, BATCH], {**SEED_ENV, "TF_ENABLE_ONEDNN_OPTS": "1"}, LOG)["ips"]
    return {"options": figures}, {}


# --------------------------------------------------------------------------------------------

def print_table(results):
    print(f"\n{'figure':<44} {'value':>10}  {'target':<9} result")
    for key, what, target, passes in targets.table(SYNTH_ROWS):
        if key not in results:
            continue
        value = results[key]
        shown = f"{value:.1%}" if key.endswith("_frac") else f"{value:.3g}"
        verdict = "" if passes is None or SMOKE else ("pass" if passes(value) else "FAIL")
        if key == "train_head_peak_rss_gb_100k" and passes is None:
            verdict = "(target is for 100,000 rows)"
        print(f"{what:<44} {shown:>10}  {target:<9} {verdict}")
    for what, value in backends.table_rows(results):
        print(f"{what:<56} {value}")
    if "backbone_table" in results:
        print(f"\nthe backbones (9), {BACKBONE_N} photos, AUGMENT=5:")
        backbone_table.print_table(results["backbone_table"])
    if "options" in results:
        print(f"\n{'speed option (6)':<44} {'value':>10}")
        for key, value in support.flatten(results["options"]):
            print(f"{key:<44} {value:>10.3g}")
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cpu_count']} cores, {m['ram_gb']:.0f} GB RAM, GPU: "
          f"{', '.join(m['gpus']) or 'none'}; BENCH_N={N}, SIZE={SIZE}, BATCH_SIZE={BATCH}")


if __name__ == "__main__":
    main()
