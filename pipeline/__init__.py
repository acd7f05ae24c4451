"""Transfer learning for image classification on cached VGG16 features.

Stages (each a module with `run(config)`): extract -> train_head -> finetune -> evaluate,
plus predict, report, batch and demo. See README.md.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter
