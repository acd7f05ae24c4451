"""Transfer learning for image classification on cached features of a frozen backbone.

Stages (each a module with `run(config)`): extract -> train_head -> finetune -> evaluate,
plus predict, report, export-model, batch and demo. See README.md.

`from pipeline import Classifier` gives a trained model as an object (pipeline/classifier.py),
imported on first use so that `python -m pipeline.config` stays fast.
"""
import os

# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 VNNI/bf16/AMX. On
# an AVX2 CPU they still run VGG16's convolutions ~25% faster than the default Eigen kernels,
# forward and backward (`make bench`, options section); the features differ by float round-off
# (~4e-6 relative). Read when TensorFlow is first imported; TF_ENABLE_ONEDNN_OPTS=0 opts out.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def __getattr__(name):
    if name == "Classifier":
        from .classifier import Classifier
        return Classifier
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
