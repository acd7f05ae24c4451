"""The same pipeline on every Keras backend: the backend and precision choices, a quiet console,
and every stage under each other installed backend in a process of its own
(tests/backend_worker.py), compared with this process's backend on the same images."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import Config, UserError
from pipeline.model import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "backend_worker.py")
# Features of the same images under two backends, in float32: the largest difference relative to
# the largest feature. Measured 3e-6 between JAX and TensorFlow (PyTorch and TensorFlow agreed
# bit for bit, both on oneDNN); mixed bfloat16 moves them by 8e-3. So the backend is round-off and
# stays out of the cache identity, while the precision is in it.
BACKEND_TOLERANCE = 1e-4
OTHERS = [b for b in runtime.BACKENDS if b != runtime.backend()]


@pytest.mark.parametrize("device, flags, backend, expected", [
    ("gpu", set(), "jax", "mixed_float16"),
    ("gpu", {"avx2"}, "tensorflow", "mixed_float16"),
    ("cpu", {"avx2", "avx512f"}, "tensorflow", "float32"),                 # Zen 3, Skylake
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, "tensorflow", "mixed_bfloat16"),  # Zen 4
    ("cpu", {"avx2", "amx_bf16", "amx_tile"}, "torch", "mixed_bfloat16"),  # Sapphire Rapids
    ("cpu", {"avx2", "avx512_bf16"}, "jax", "float32"),  # XLA's CPU convolutions: no faster
    ("cpu", set(), "torch", "float32"),                  # not Linux: no flags known
])
def test_auto_precision_picks_the_fastest_that_keeps_accuracy(device, flags, backend, expected):
    assert runtime.auto_precision(device, flags, backend) == expected


def test_a_backend_that_is_not_one_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"BACKEND='theano' is not one of tensorflow, jax, torch"):
        Config(backend="theano")
    with pytest.raises(UserError, match="is not one of"):
        runtime.backend_name("mxnet")


def test_a_backend_cannot_change_once_keras_runs():
    other = OTHERS[0]
    with pytest.raises(UserError, match=f"BACKEND={other} but Keras already runs on"):
        runtime.start(other)
    assert runtime.start(runtime.backend()) == runtime.backend()  # the same one: fine


def _stage(args, tmp_path, env_changes=()):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-m", "pipeline", *args,
                           "--features-root", str(tmp_path / "features")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.heavy
@pytest.mark.skipif(not runtime.importable("tensorflow"), reason="tensorflow is not installed")
def test_the_console_shows_no_framework_start_up_lines_unless_verbose(image_folder, tmp_path):
    args = ["extract", "--data", image_folder, "--weights", "none", "--size", "32",
            "--backend", "tensorflow"]
    quiet = _stage(args, tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    for line in ("oneDNN custom operations", "absl::InitializeLog", "cuda drivers",
                 "cpu_feature_guard"):
        assert line not in quiet.stderr + quiet.stdout
    assert "extract data (vgg16): 12 rows" in quiet.stdout  # our own lines still come through
    loud = _stage([*args, "--verbose", "1", "--name", "loud"], tmp_path)
    assert loud.returncode == 0 and "oneDNN custom operations" in loud.stderr


# --------------------------------------------------------------------------------------------
# Every stage under each other backend
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def here(tmp_path_factory):
    """Every stage under this process's backend, through the same worker code, in-process."""
    import backend_worker
    from helpers import make_image_folder
    root = tmp_path_factory.mktemp("here")
    data = make_image_folder(root / "data", per_class=10)
    weights = str(root / "vgg16.weights.h5")
    import keras
    keras.utils.set_random_seed(1)
    keras.applications.VGG16(weights=None, include_top=False,
                             input_shape=(None, None, 3)).save_weights(weights)
    backend_worker.main(str(root), data, weights, "")
    return root, data, weights, dict(np.load(root / "worker.npz"))


@pytest.fixture(scope="module", params=OTHERS)
def there(request, here, tmp_path_factory):
    backend = request.param
    if not runtime.importable(backend):
        pytest.skip(f"{backend} is not installed (CI installs jax: make test-backends)")
    root = tmp_path_factory.mktemp(backend)
    here_root, data, weights, _ = here
    done = subprocess.run([sys.executable, WORKER, str(root), data, weights,
                           str(here_root / "models")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": backend}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(root / "worker.json") as f:
        return json.load(f), dict(np.load(root / "worker.npz"))


@pytest.mark.cross_backend
def test_every_stage_runs_without_tensorflow_unless_it_is_the_backend(there):
    info, _ = there
    assert info["versions"]["backend"] == info["backend"]  # recorded in the cache
    assert info["tensorflow_imported"] == (info["backend"] == "tensorflow")


@pytest.mark.cross_backend
def test_features_agree_across_backends_within_round_off(here, there):
    mine, theirs = here[3]["features"], there[1]["features"]
    gap = np.abs(mine - theirs).max() / np.abs(mine).max()
    assert gap <= BACKEND_TOLERANCE


@pytest.mark.cross_backend
def test_a_model_saved_under_one_backend_predicts_the_same_under_another(here, there):
    mine, theirs = here[3], there[1]
    for model in ("dense", "finetuned"):  # this backend's files, scored by the other backend
        np.testing.assert_allclose(theirs[f"other_{model}"], mine[f"own_{model}"], atol=1e-4)


@pytest.mark.cross_backend
def test_augmentation_is_seeded_on_every_backend(here, there):
    for views in (here[3]["augmented"], there[1]["augmented"]):
        first, second, same_seed = views
        np.testing.assert_array_equal(first, same_seed)  # the same seed, the same views
        assert np.abs(first - second).max() > 1  # the next call draws new views
