"""The exported graphs of one dataset against `make predict`: parity, size and latency.

    python bench/export_parity.py models/<NAME>/export PREDICTIONS.csv

For every export in the folder (saved_model, model.onnx, model.tflite) whose runtime is
installed, each image of the predictions CSV is decoded here (Pillow, EXIF orientation, RGB: the
full decode, as an app would) and fed to the graph alone, one image a call; the script prints the
share of images whose top-1 class equals predict's, the largest difference of a probability,
the export's size and, for the SavedModel, the median latency of one image. It imports nothing
from pipeline/: plain TensorFlow, onnxruntime and ai_edge_litert only.
"""
import csv
import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageOps


def pixels(path):
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))[None]


def savedmodel(path):
    import tensorflow as tf
    model = tf.saved_model.load(path)
    return lambda x: model.serve(tf.constant(x)).numpy()[0]


def onnx(path):
    import onnxruntime
    session = onnxruntime.InferenceSession(path)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0][0]


def litert(path):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=path)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(x):
        interpreter.resize_tensor_input(source["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(target["index"])[0]
    return run


RUNNERS = {"saved_model": savedmodel, "model.onnx": onnx, "model.tflite": litert}


def size_of(path):  # export_model._size's twin: this script imports nothing from pipeline/
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names)


def main(folder, predictions):
    with open(predictions, newline="") as f:
        rows = list(csv.DictReader(f))
    for name, runner in RUNNERS.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        with open(path + ".json") as f:
            described = json.load(f)
        classes, model = described["class_names"], described["model"]
        try:
            run = runner(path)
        except ImportError as error:
            print(f"{name}: runtime not installed ({error})")
            continue
        expected = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
        got = np.array([run(pixels(r["path"])) for r in rows])
        same = np.mean(got.argmax(axis=1) == expected.argmax(axis=1))
        print(f"{name} ({model}): {len(rows)} images, same top-1 {same:.3f}, largest probability "
              f"difference {np.abs(got - expected).max():.4f} (mean "
              f"{np.abs(got - expected).mean():.4f}), {size_of(path) / 2**20:.1f} MB")
        if name == "saved_model":
            image = pixels(rows[0]["path"])
            run(image)  # the first call traces
            times = []
            for _ in range(20):
                start = time.perf_counter()
                run(image)
                times.append(time.perf_counter() - start)
            print(f"saved_model: one {image.shape[2]}x{image.shape[1]} image, median "
                  f"{1000 * np.median(times):.0f} ms over 20 calls")
    assert not any(m == "pipeline" or m.startswith("pipeline.") for m in sys.modules)


if __name__ == "__main__":
    main(*sys.argv[1:3])
