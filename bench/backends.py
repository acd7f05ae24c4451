"""Figure 7 of `make bench`: every Keras backend installed here, each precision, and the loader.

- `speed`: for each backend (tensorflow, jax, torch: those installed) and precision (float32, and
  the half precision this machine has: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with
  native bfloat16), extraction img/s (extract.run, files -> HDF5) and model-only img/s (the same
  forward pass on one batch held in memory). Each runs in a process of its own, because Keras
  picks its backend once per process (bench/options.py does the work).
- `agreement`: how far each backend's and precision's features are from TensorFlow's float32
  ones on the same photos (the largest difference, relative to the largest feature): whether the
  backend belongs to the cache identity.
- `decoding`: img/s of images.image_batches, decoding only, with 1, 2, 4, ... N threads.
- `precision_accuracy` (BENCH_ACCURACY=1): both heads' validation accuracy on cats_vs_dogs
  features extracted in float32 and in the half precision.
"""
import os
import time

import numpy as np
import options

from pipeline import cache, train_head
from pipeline.data import images
from pipeline.model import runtime

IMAGES = 200  # photos per backend and precision (a minute or two each on 2 cores)


def run(picked, work, size, batch, log):
    paths = [path for _, path in picked[:IMAGES]]
    folder = os.path.join(work, "data", "backends")
    for class_name, path in picked[:IMAGES]:
        os.makedirs(os.path.join(folder, class_name), exist_ok=True)
        os.symlink(path, os.path.join(folder, class_name, os.path.basename(path)))
    roots = {}
    figures = {"speed": speed(folder, size, batch, work, log, roots),
               "decode_ips_by_threads": decoding(paths, size, batch)}
    figures["agreement"] = agreement(roots, os.path.basename(folder))
    return {"backends": figures}, {"backends_images": len(paths)}


def installed_backends():
    return [name for name in runtime.BACKENDS if options.has(name)]


def precisions():
    half = {"gpu": "mixed_float16"}.get(runtime.accelerator())
    if half is None and runtime.BF16_FLAGS & runtime.cpu_flags():
        half = "mixed_bfloat16"
    return ["float32"] + ([half] if half else [])


def speed(folder, size, batch, work, log, roots):
    """{backend: {precision: {extract_ips, model_only_ips, ratio}}}; fills `roots` with the
    features root of each run, for `agreement`."""
    out = {}
    for backend in installed_backends():
        env = {**os.environ, "KERAS_BACKEND": backend}
        for precision in precisions():
            root = roots[backend, precision] = os.path.join(work, "backends", backend, precision)
            extract = options.in_process(["extract", folder, 0, size, batch, root, precision],
                                         env, log)["ips"]
            model = options.in_process(["forward", batch, "auto", precision, size], env, log)["ips"]
            out.setdefault(backend, {})[precision] = {
                "extract_ips": extract, "model_only_ips": model, "ratio": extract / model}
            print(f"  {backend:<10} {precision:<15} extract {extract:6.1f} img/s, model only "
                  f"{model:6.1f} img/s, ratio {extract / model:.2f}", flush=True)
    return out


def agreement(roots, name):
    """{backend/precision: largest |difference| / largest |feature|} against TensorFlow's
    float32 features (or the first backend's, where TensorFlow is not installed)."""
    features = {}
    for key, root in roots.items():
        with cache.FeatureStore(os.path.join(root, name)) as store:
            order = np.argsort(store.sha256)  # the same photos in the same order everywhere
            features[key] = store.read(np.arange(len(store)))[order]
    if not features:
        return {}
    reference = features.get(("tensorflow", "float32"), next(iter(features.values())))
    scale = float(np.abs(reference).max()) or 1.0
    return {f"{backend}/{precision}": float(np.abs(f - reference).max()) / scale
            for (backend, precision), f in features.items()}


def decoding(paths, size, batch):
    """{threads: img/s} of the input pipeline alone (images.image_batches), for 1, 2, 4, ... up
    to this machine's cores: how far decoding scales, and what it can feed a GPU."""
    cores = images.decode_threads()
    counts = sorted({2 ** k for k in range(cores.bit_length()) if 2 ** k <= cores} | {cores})
    out = {}
    for threads in counts:
        start = time.perf_counter()
        for _ in images.image_batches(paths, size, batch, threads=threads):
            pass
        out[str(threads)] = len(paths) / (time.perf_counter() - start)
        print(f"  decoding, {threads} threads: {out[str(threads)]:.0f} img/s", flush=True)
    return out


def precision_accuracy(config):
    """{precision: {logreg, dense}} validation accuracy of both heads on features extracted in
    each precision (`config`: bench/accuracy.py's, on all of cats_vs_dogs)."""
    from pipeline import extract
    out = {}
    for precision in precisions():
        each = config.replace(name=f"{config.name}_{precision}", precision=precision, head="both")
        extract.run(each)
        result = train_head.run(each)
        out[precision] = {model: entry["validation"]["accuracy"]
                          for model, entry in result.metrics["models"].items()}
    return out


def table_rows(results):
    """Lines for bench.py's table."""
    figures = results.get("backends", {})
    for backend, by_precision in figures.get("speed", {}).items():
        for precision, f in by_precision.items():
            yield (f"{backend} {precision}: extract / model-only img/s",
                   f"{f['extract_ips']:.1f} / {f['model_only_ips']:.1f} = {f['ratio']:.2f}")
    for key, value in figures.get("agreement", {}).items():
        yield f"features vs tensorflow/float32: {key}", f"{value:.2g}"
    for threads, ips in figures.get("decode_ips_by_threads", {}).items():
        yield f"decoding with {threads} threads (img/s)", f"{ips:.0f}"
    for precision, acc in results.get("precision_accuracy", {}).items():
        yield (f"validation accuracy, {precision}: logreg / dense",
               f"{acc['logreg']:.3f} / {acc['dense']:.3f}")
