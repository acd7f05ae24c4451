"""Shared fixtures: tiny deterministic datasets and a Config that writes under tmp_path.

Everything runs on the CPU with 32-pixel images and WEIGHTS=none (deterministic random weights),
so a whole stage takes a second or two.
"""
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only, also on a GPU machine
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest
from helpers import make_image_folder

from pipeline.config import Config


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def make_config(tmp_path):
    """Config(...) with outputs under tmp_path and tiny, fast settings; override any field."""
    def make(data, **changes):
        # precision: float32 on every machine (auto would pick bfloat16 on a bf16 CPU)
        # augment=0: no views unless a test asks for them (AUGMENT=5 by default)
        defaults = dict(data=str(data), weights="none", size=32, batch_size=4, epochs=3,
                        precision="float32", augment=0,
                        finetune_epochs=1, features_root=str(tmp_path / "features"),
                        models_root=str(tmp_path / "models"))
        return Config(**{**defaults, **changes})
    return make


@pytest.fixture(scope="session")
def tiny_weights_file(tmp_path_factory):
    """A real VGG16 conv-base weights file, made here: random but not the WEIGHTS=none ones."""
    import keras
    path = str(tmp_path_factory.mktemp("weights") / "vgg16_test.weights.h5")
    keras.utils.set_random_seed(1)
    keras.applications.VGG16(weights=None, include_top=False,
                             input_shape=(None, None, 3)).save_weights(path)
    return path
