"""The cache machinery at a million images: seconds and peak RSS of each step, at several sizes.

    .venv/bin/python bench/scale.py 100000 300000 1000000   # -> bench/scale.json, a table
    .venv/bin/python bench/scale.py make 1000000   # only step 1-2, kept for a later run

For each size N, under SCALE_ROOT (default /tmp/pipeline-scale, deleted afterwards):
1. N tiny distinct files data/{cats,dogs}/NNNNNNN.jpg (never decoded: their features are cached);
2. their features as ENGINE=local writes them, one 32-row segment per batch, STORAGE=float16 at
   SIZE=150 (16 KiB a row: 16.4 GB at 1M), random values around one centre per class;
3. `first extract`: extract.run with every image cached, as after a killed first run: walk and
   stat, hash every file, inventory (every segment read through its checksums), compaction of the
   32-row segments into 4096-row ones, features.h5 written;
4. `rerun`: extract.run again, nothing new: files not re-hashed (size and mtime), inventory
   again, no master written;
5. `open`: cache.FeatureStore opened (the index loaded, every segment checked);
6. `train-head`: one epoch of the dense head streamed from the cache (HEAD=dense, EPOCHS=1).
Each step runs in a fresh process; its peak RSS is that process's VmHWM. The per-phase seconds
of the extract steps come from timers around extract's and cache's own functions.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SCALE_ROOT = os.environ.get("SCALE_ROOT") or "/tmp/pipeline-scale"
RESULTS = os.environ.get("SCALE_RESULTS") or os.path.join(ROOT, "bench", "scale.json")
ONLY = os.environ.get("SCALE_STEPS")  # e.g. "first extract,rerun,open": the others not run
SIZE, STORAGE, LOCAL_SEGMENT_ROWS = 150, "float16", 32
CLASSES = ("cats", "dogs")
PHASES = [("data.datasets", "discover"), ("extract", "_hash_files"), ("cache", "previous_files"),
          ("cache", "inventory"), ("cache", "compact"), ("cache", "write_master"),
          ("cache", "remove_unreferenced")]


def config(root):
    from pipeline.config import Config
    return Config(data=os.path.join(root, "data"), name="scale", weights="none", size=SIZE,
                  storage=STORAGE, precision="float32", head="dense", epochs=1,
                  features_root=os.path.join(root, "features"),
                  models_root=os.path.join(root, "models"))


def peak_rss_gb():
    """This process's peak resident set size (VmHWM starts afresh at exec)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return round(kib * 1024 / 1e9, 3)


# --------------------------------------------------------------------------------------------
# The steps, each run as `scale.py _step NAME ROOT N` in a process of its own
# --------------------------------------------------------------------------------------------

def make_cache(root, n):
    """The files and the 32-row segments extract would have written for them."""
    import numpy as np

    from pipeline import cache
    from pipeline.model import backbone
    identity = backbone.feature_identity(backbone.resolve_weights("none"), SIZE, "float32",
                                         STORAGE)
    features_dir = config(root).features_dir
    for name in CLASSES:
        os.makedirs(os.path.join(root, "data", name), exist_ok=True)
    rng = np.random.default_rng(0)
    shape = backbone.feature_shape(SIZE)
    centres = rng.standard_normal((len(CLASSES), *shape), dtype=np.float32)
    noise = rng.standard_normal((4096, *shape), dtype=np.float32)  # reused: values don't matter
    for first in range(0, n, LOCAL_SEGMENT_ROWS):
        index = np.arange(first, min(first + LOCAL_SEGMENT_ROWS, n))
        shas = []
        for i in index:
            content = f"synthetic image {i}\n".encode()
            with open(os.path.join(root, "data", CLASSES[i % 2], f"{i:07d}.jpg"), "wb") as f:
                f.write(content)
            shas.append(hashlib.sha256(content).hexdigest())
        features = np.maximum(centres[index % 2] + 2 * noise[index % 4096], 0)
        cache.write_segment(features_dir, backbone.identity_id(identity), shas,
                            features.astype(np.float16))
    return {}


def timed_extract(root, n):
    import importlib

    from pipeline import extract
    phases = {}
    for module_name, name in PHASES:
        module = importlib.import_module(f"pipeline.{module_name}")
        original = getattr(module, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                phases[f"{_name}_s"] = round(time.perf_counter() - start, 2)
                phases[f"peak_rss_gb_after_{_name}"] = peak_rss_gb()
        setattr(module, name, wrapper)
    result = extract.run(config(root))
    assert result.rows == n and result.new == 0, result
    return {**phases, "changed": result.changed}


def open_store(root, n):
    from pipeline import cache
    start = time.perf_counter()
    with cache.FeatureStore(config(root).features_dir) as store:
        assert len(store) == n
        segments = len(store.file["segments"])
    return {"open_s": round(time.perf_counter() - start, 2), "segments": segments}


def train_head(root, n):
    from pipeline import train_head
    result = train_head.run(config(root))
    return {"validation": result.metrics["models"]["dense"]["validation"]}


STEPS = {"make": make_cache, "first extract": timed_extract, "rerun": timed_extract,
         "open": open_store, "train-head": train_head}


def step(name, root, n):
    start = time.perf_counter()
    figures = STEPS[name](root, n)
    figures.update(seconds=round(time.perf_counter() - start, 2), peak_rss_gb=peak_rss_gb())
    print(json.dumps(figures))


# --------------------------------------------------------------------------------------------
# The driver: every step at every size
# --------------------------------------------------------------------------------------------

def measure(n, only_make=False):
    """Every step at n rows. A cache left by `scale.py make n` (its made.json) is measured as it
    is, its setup figures taken from then: the 30 minutes of setup at 1M can run while the code
    it measures is still being changed (making it uses only cache.write_segment)."""
    root = os.path.join(SCALE_ROOT, str(n))
    made = os.path.join(SCALE_ROOT, f"{n}.made.json")
    out = {"rows": n}
    if os.path.exists(made) and not only_make:
        out["make"] = json.load(open(made))
        print(f"{n:>9,} {'make':<14} {json.dumps(out['make'])} (made before)", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
        need = n * 16384 * 1.05 + 2e9
        os.makedirs(SCALE_ROOT, exist_ok=True)
        free = shutil.disk_usage(SCALE_ROOT).free
        if free < need:
            sys.exit(f"{n:,} rows need {need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free")
    try:
        todo = [s for s in STEPS if s not in out and (not ONLY or s in ONLY.split(","))]
        for name in (["make"] if only_make else todo):
            run = subprocess.run([sys.executable, __file__, "_step", name, root, str(n)],
                                 capture_output=True, text=True, cwd=ROOT)
            if run.returncode:
                sys.exit(f"step {name} at {n:,} rows failed:\n{run.stderr[-3000:]}")
            out[name] = json.loads(run.stdout.strip().splitlines()[-1])
            out[name]["disk_gb"] = round(disk_usage(root) / 1e9, 2)
            print(f"{n:>9,} {name:<14} {json.dumps(out[name])}", flush=True)
        if only_make:
            with open(made, "w") as f:
                json.dump(out["make"], f)
            return out
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    shutil.rmtree(root, ignore_errors=True)
    if os.path.exists(made):
        os.remove(made)
    return out


def disk_usage(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder)
               for f in files)


def main(sizes):
    results = json.load(open(RESULTS)) if os.path.exists(RESULTS) else {}
    for n in sizes:
        results[str(n)] = measure(n)
        with open(RESULTS, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_step"]:
        step(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1:2] == ["make"]:
        for n in sys.argv[2:]:
            measure(int(n), only_make=True)
    else:
        main([int(a) for a in sys.argv[1:]] or [100_000, 300_000, 1_000_000])
