"""What bench.py needs beside its timings: the machine, the library versions, a synthetic
feature cache of any size for the train-head memory figure, and an epoch timer for Keras fits."""
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time

import keras
import numpy as np

from pipeline import cache, extract
from pipeline.config import Config
from pipeline.data import datasets
from pipeline.model import backbone, runtime

CHUNK = 4096  # rows per segment: at COMPACT_BELOW, so extract never merges them
# the settings that the synthetic cache was written with, for every stage run on it
SYNTHETIC_ARGS = ["--augment", "0"]
CLASSES = ["cats", "dogs"]


def machine():
    """CPU model, cores, RAM and GPUs of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "cpus_usable": (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else None),
            "ram_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            "gpus": gpu_names(), "bf16_cpu": bool(runtime.BF16_FLAGS & runtime.cpu_flags())}


def gpu_names():
    """The GPUs that nvidia-smi lists (empty without an NVIDIA driver): the same on every
    backend, and without starting one on the GPU."""
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()]


def grow_gpu_memory():
    """Under TensorFlow, take GPU memory as needed, not all of it at the first op, so the stage
    processes that bench starts find some (JAX and PyTorch need this through XLA_PYTHON_..._
    PREALLOCATE=false, set by bench/gpu.sh, or allocate lazily already)."""
    if runtime.backend() == "tensorflow":
        import tensorflow as tf
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)


def versions():
    out = backbone.library_versions()
    out["h5py"] = importlib.metadata.version("h5py")  # metadata: only pipeline/cache imports it
    out["python"] = platform.python_version()
    return out


def write_synthetic_cache(folder, rows, size, seed=0):
    """folder/features/synthetic/: a cache exactly as extract writes it (segments + features.h5,
    WEIGHTS=none identity), with `rows` feature maps drawn from two ReLU'd Gaussian clusters, one
    per class, so a head has something to learn. Split 80/10/10 by row number. It holds no
    augmented views: train-head reads it with AUGMENT=0 (SYNTHETIC_ARGS)."""
    config = Config(data=folder, name="synthetic", weights="none", size=size, augment=0,
                    features_root=os.path.join(folder, "features"))
    weights = backbone.resolve_weights("none")
    identity = backbone.identity_of(weights, size)
    identity_id = identity.id
    shape = backbone.feature_shape(size)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(CLASSES), *shape), dtype=np.float32)
    out = []
    for first in range(0, rows, CHUNK):
        index = np.arange(first, min(first + CHUNK, rows))
        labels = index % len(CLASSES)
        noise = rng.standard_normal((len(index), *shape), dtype=np.float32)
        features = np.maximum(centres[labels] + 2 * noise, 0)
        shas = [hashlib.sha256(f"synthetic-{i}".encode()).hexdigest() for i in index]
        segment = cache.write_segment(config.features_dir, identity_id, shas, features)
        out += [dict(path=f"{CLASSES[label]}/{i:06d}.jpg", label=int(label), sha256=sha,
                     split="train" if i % 10 < 8 else "validation" if i % 10 == 8 else "test",
                     size=0, mtime_ns=0, segment=segment, segment_row=row,
                     segment_rows=len(index))
                for row, (i, label, sha) in enumerate(zip(index, labels, shas))]
    dataset = datasets.Dataset(root=folder, layout="folders", class_names=CLASSES, files=[],
                             skipped=[])
    attrs = extract.cache_attributes(config, dataset, weights, identity, out)
    cache.write_master(config.features_dir, out, attrs, shape, np.float32, {})
    return config.features_dir


# A child's ru_maxrss on Linux starts at its parent's RSS when it was forked (exec keeps the
# forked copy's high-water mark), and this process holds TensorFlow and several models. So a
# small launcher process starts the stage and reports the stage's own peak, as /usr/bin/time does.
LAUNCHER = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[2:]); "
            "_, status, usage = os.wait4(child.pid, 0); "
            "open(sys.argv[1], 'w')"
            ".write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')")


def peak_rss_gb(args, log, cwd):
    """Run `python -m pipeline ARGS` and return its peak resident set size in GB (10^9 bytes)."""
    report = log + ".rusage"
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", LAUNCHER, report, sys.executable, "-m", "pipeline",
                        *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=True)
    with open(report) as f:
        code, maxrss = (int(v) for v in f.read().split())
    if code != 0:
        sys.exit(f"`python -m pipeline {' '.join(args)}` failed: see {log}")
    return maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux


class EpochTimer(keras.callbacks.Callback):
    """Seconds of each epoch's training pass (epoch start -> validation start)."""

    def __init__(self):
        super().__init__()
        self.seconds, self._start, self._trained = [], None, None

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._trained = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        if self._start is not None and self._trained is None:
            self._trained = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append((self._trained or time.perf_counter()) - self._start)
        self._start = None


def flatten(figures, prefix=""):
    for key, value in figures.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
