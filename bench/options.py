"""Figure 6 of `make bench`: the speed options, each measured before and after.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it is imported, so every forward-pass variant
and the naive Keras way run in a process of their own:

    python bench/options.py forward BATCH XLA PRECISION SIZE           -> JSON: img/s
    python bench/options.py naive FOLDER SIZE BATCH                    -> JSON: img/s
    python bench/options.py naive_torch FOLDER SIZE BATCH              -> JSON: img/s
    python bench/options.py extract FOLDER FULL_DECODING SIZE BATCH OUT [PRECISION] -> JSON: img/s

XLA is 1, 0 or auto (the backend's default). Each runs on the Keras backend that KERAS_BACKEND
names in its environment.

bench.py calls `forward_variants` and `decoding`, which start those processes (so each
measurement also starts from a fresh process, as a user's `make extract` does).
"""
import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.environ.get("BENCH_SMOKE", "") not in ("", "0")  # bench.py's: every phase, tiny
FORWARD_IMAGES = 16 if SMOKE else 160  # timed images per forward variant, after a warm-up batch
DECODE_IMAGES = 200           # photos for the decoding figures


# --------------------------------------------------------------------------------------------
# In a process of its own
# --------------------------------------------------------------------------------------------

def forward(batch, xla, precision, size):
    """Images/s of the frozen base's compiled forward pass on one in-memory batch."""
    import numpy as np

    from pipeline.model import backbone
    base = backbone.build_backbone(backbone.resolve_weights("none"), size, precision)
    run = backbone.feature_function(base, jit_compile=xla)  # extract's forward pass
    x = np.random.default_rng(0).uniform(-120, 150, (batch, size, size, 3)).astype(np.float32)
    run(x)  # warm-up: tracing, compilation, first allocations
    done, start = 0, time.perf_counter()
    while done < FORWARD_IMAGES:
        run(x)  # returns numpy: waits for the result
        done += batch
    return {"ips": done / (time.perf_counter() - start), "images": done}


def naive(folder, size, batch):
    """The seed's way, model build included: image_dataset_from_directory -> map(preprocess_input)
    -> model.predict -> np.save. It imports no pipeline code, so it runs with TensorFlow's own
    defaults (whatever the environment that started `make bench` says)."""
    import keras
    import numpy as np
    start = time.perf_counter()
    ds = keras.utils.image_dataset_from_directory(folder, image_size=(size, size), shuffle=False,
                                                  batch_size=batch, verbose=False)
    ds = ds.map(lambda x, y: (keras.applications.vgg16.preprocess_input(x), y))
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
    features = model.predict(ds, verbose=0)
    np.save(os.path.join(folder, "..", "naive_features.npy"), features)
    seconds = time.perf_counter() - start
    return {"ips": len(features) / seconds, "images": len(features), "seconds": seconds}


def naive_torch(folder, size, batch):
    """What a PyTorch user would write instead, model build included: torchvision's ImageFolder
    (PIL decoding, Resize, ToTensor, ImageNet Normalize) -> DataLoader with a worker per core ->
    torchvision's VGG16 `features` under autocast on the GPU -> np.save. Runs only where
    torchvision is installed (it has no CPU build on this project's CPU machine)."""
    import numpy as np
    import torch
    import torchvision
    from torchvision import transforms
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prepare = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                  transforms.Normalize([0.485, 0.456, 0.406],
                                                       [0.229, 0.224, 0.225])])
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(folder, prepare),
                                         batch_size=batch, num_workers=os.cpu_count(),
                                         pin_memory=device == "cuda")
    model = torchvision.models.vgg16(weights=None).features.to(device).eval()
    out = []
    with torch.inference_mode(), torch.autocast(device, enabled=device == "cuda"):
        for x, _ in loader:
            out.append(model(x.to(device, non_blocking=True)).float().cpu().numpy())
    features = np.concatenate(out)
    np.save(os.path.join(folder, "..", "naive_torch_features.npy"), features)
    seconds = time.perf_counter() - start
    return {"ips": len(features) / seconds, "images": len(features), "seconds": seconds}


def has(module):
    """Whether `module` can be imported here (without importing it)."""
    return importlib.util.find_spec(module) is not None


def extract_folder(folder, full_decoding, size, batch, features_root, precision="auto"):
    """Images/s of extract.run on `folder` (WEIGHTS=none), with or without DCT-scaled decoding."""
    from pipeline import extract
    from pipeline.config import Config
    config = Config(data=folder, name=os.path.basename(folder), weights="none", size=size,
                    batch_size=batch, precision=precision, features_root=features_root)
    with full_jpeg_decoding() if full_decoding else nullcontext():
        start = time.perf_counter()
        result = extract.run(config)
        seconds = time.perf_counter() - start
    return {"ips": result.new / seconds, "images": result.new, "seconds": seconds}


# --------------------------------------------------------------------------------------------
# Called by bench.py
# --------------------------------------------------------------------------------------------

def in_process(args, env, log):
    """Run this file with `args` in a new process with environment `env`; its JSON line."""
    import subprocess
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)],
                              env=env, stdout=subprocess.PIPE, stderr=out, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"bench/options.py {' '.join(map(str, args))} failed: see {log}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def forward_variants(env, log, size, gpu, cpu_flags):
    """{variant: img/s}. eigen = TensorFlow's default kernels on an AVX2 CPU, onednn = ours."""
    variants = {"eigen_b32": (0, 32, 0, "float32")}
    # BENCH_SMOKE: one batch size, as the others run the same code (each variant is a process)
    variants.update({f"onednn_b{b}": (1, b, 0, "float32") for b in
                     ((8,) if SMOKE else (8, 16, 32, 64))})
    variants["onednn_xla_b32"] = (1, 32, 1, "float32")
    if gpu:
        variants["onednn_mixed_float16_b32"] = (1, 32, 0, "mixed_float16")
        if not SMOKE:
            variants["onednn_mixed_float16_b64"] = (1, 64, 0, "mixed_float16")
    if gpu or {"avx512_bf16", "amx_bf16"} & cpu_flags:  # no bf16 arithmetic on plain AVX2
        variants["onednn_mixed_bfloat16_b32"] = (1, 32, 0, "mixed_bfloat16")
    out = {}
    for name, (onednn, batch, xla, precision) in variants.items():
        out[name] = in_process(["forward", batch, xla, precision, size],
                               {**env, "TF_ENABLE_ONEDNN_OPTS": str(onednn)}, log)["ips"]
        print(f"  forward pass, {name}: {out[name]:.2f} img/s", flush=True)
    return out


@contextmanager
def full_jpeg_decoding():
    """Inside the block, the loader decodes every JPEG at full size (no DCT scaling): the
    'before' of the draft() call in images.load_image."""
    from PIL import JpegImagePlugin
    draft = JpegImagePlugin.JpegImageFile.draft
    JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None
    try:
        yield
    finally:
        JpegImagePlugin.JpegImageFile.draft = draft


def decoding(paths, size, extract_ips):
    """The loader with and without DCT-scaled decoding: img/s of decoding alone (one thread), the
    mean and largest pixel difference it makes (0-255 units), and extraction img/s for both.
    `extract_ips(paths, name)` times an extraction of `paths` (name: "full" or "draft")."""
    import numpy as np

    from pipeline.data import images
    paths = paths[:DECODE_IMAGES]
    out = {}
    for name, mode in (("full", full_jpeg_decoding), ("draft", nullcontext)):
        with mode():
            start = time.perf_counter()
            decoded = [images.load_image(p, size) for p in paths]
            out[f"decode_ips_{name}"] = len(paths) / (time.perf_counter() - start)
        out[f"extract_ips_{name}"] = extract_ips(paths, name)
        out[name] = np.stack(decoded)
    difference = np.abs(out.pop("full") - out.pop("draft"))
    out["draft_mean_abs_pixel_difference"] = float(difference.mean())
    out["draft_max_abs_pixel_difference"] = float(difference.max())
    return out


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "forward":
        xla = {"1": True, "0": False}.get(args[1])  # auto: None, the backend's default
        print(json.dumps(forward(int(args[0]), xla, args[2], int(args[3]))))
    elif command in ("naive", "naive_torch"):
        way = naive if command == "naive" else naive_torch
        print(json.dumps(way(args[0], int(args[1]), int(args[2]))))
    elif command == "extract":
        print(json.dumps(extract_folder(args[0], args[1] == "1", int(args[2]), int(args[3]),
                                        *args[4:6])))
    else:
        sys.exit(f"unknown command {command!r}: forward | naive | naive_torch | extract")
