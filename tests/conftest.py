"""Shared fixtures: tiny deterministic datasets and a Config that writes under tmp_path.

Everything runs on the CPU with 32-pixel images and WEIGHTS=none (deterministic random weights),
so a whole stage takes a second or two.
"""
import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only, also on a GPU machine
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Each xdist worker gets its share of the cores for the BLAS under numpy and scikit-learn: two
# workers whose OpenBLAS each spins a thread per core made a 512 x 512 eigh (the audit's
# whitening) take seconds instead of a tenth of one. Read when numpy loads: before any import.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # a worker (the parent process runs no test)
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, str(max(1, _share)))

import pytest
from helpers import make_image_folder, prepared_copy, tiny_config


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


@pytest.fixture
def make_config(tmp_path):
    """Config(...) with outputs under tmp_path and tiny, fast settings; override any field."""
    return lambda data, **changes: tiny_config(str(tmp_path), data, **changes)


@pytest.fixture
def prepared(tmp_path_factory, tmp_path):
    """prepared(stages, per_class=6, **settings): the Config of this test's own copy of the
    stages' output, which they made once (`helpers.prepared_copy`)."""
    return lambda stages, **settings: prepared_copy(tmp_path_factory, tmp_path, stages,
                                                    **settings)


@pytest.fixture(scope="session")
def tiny_weights_file(tmp_path_factory):
    """A real VGG16 conv-base weights file, made here: random but not the WEIGHTS=none ones."""
    import keras
    path = str(tmp_path_factory.mktemp("weights") / "vgg16_test.weights.h5")
    keras.utils.set_random_seed(1)
    keras.applications.VGG16(weights=None, include_top=False,
                             input_shape=(None, None, 3)).save_weights(path)
    return path


# The modules that take longest start first. With --dist loadscope each xdist worker is handed
# the next module when it finishes one, so a long module handed out last keeps one worker busy
# while the other idles: longest first evens the two out. Measured with `pytest --durations=0`.
LONGEST_FIRST = ("test_export_model.py", "test_batch.py", "test_train_head.py",
                 "test_finetune.py", "test_backbones.py", "test_audit.py", "test_quality.py",
                 "test_finetune_cache.py")


def pytest_collection_modifyitems(items):
    rank = {name: at for at, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep order
