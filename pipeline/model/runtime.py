"""What the pipeline runs on: the Keras backend, a quiet start, and the fastest safe precision.

Keras reads KERAS_BACKEND once, when it is first imported, and the model code is the same on
every backend (keras, keras.ops and numpy only). The CLI calls `start` before it imports a stage,
so `BACKEND=jax` or `--backend jax` choose the backend; in Python, set KERAS_BACKEND before
importing pipeline's stages.

This module imports no framework at the top: `python -m pipeline.config` (make help) stays fast,
and a JAX or PyTorch run never imports TensorFlow.
"""
import contextlib
import importlib.util
import os
import sys

from ..config import BACKENDS, UserError  # noqa: F401 (BACKENDS: read from here too)

DEFAULT_BACKEND = "tensorflow"
INSTALL = {"tensorflow": "tensorflow", "jax": "jax[cpu] (or jax[cuda12] on a GPU)",
           "torch": "torch"}
# CPU flags (/proc/cpuinfo) of native bfloat16 arithmetic: AVX-512 BF16 (Cooper Lake, Zen 4 and
# later) and AMX (Sapphire Rapids and later). Without them, bfloat16 is emulated and slower.
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
# The backends whose CPU kernels use those instructions (oneDNN): VGG16 ran ~2x faster in mixed
# bfloat16 under TensorFlow and PyTorch on a Zen 4 CPU, and no faster under JAX, whose XLA CPU
# convolutions compute bfloat16 in float32 (`make bench`, backends section).
BF16_CPU_BACKENDS = ("tensorflow", "torch")


def backend_name(backend=""):
    """The backend a run uses: BACKEND if given, else KERAS_BACKEND, else tensorflow."""
    name = backend or os.environ.get("KERAS_BACKEND") or DEFAULT_BACKEND
    if name not in BACKENDS:
        raise UserError(f"BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def start(backend="", verbose=False):
    """Choose the backend and import Keras on it, before any stage imports Keras. Unless
    `verbose`, the frameworks' start-up lines are silenced (see `_quiet_stderr`)."""
    name = backend_name(backend)
    if "keras" in sys.modules:  # too late to choose: Keras has picked its backend already
        import keras
        if keras.backend.backend() != name:
            raise UserError(f"BACKEND={name} but Keras already runs on "
                            f"{keras.backend.backend()} in this process: set KERAS_BACKEND={name} "
                            "before Python imports Keras")
        return name
    os.environ["KERAS_BACKEND"] = name
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")   # TensorFlow's C++ log, after start-up
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    with contextlib.nullcontext() if verbose else _quiet_stderr():
        try:
            import keras  # noqa: F401  imports the backend's framework, which prints at import
        except ImportError as error:
            missing = getattr(error, "name", None) or name
            raise UserError(f"BACKEND={name} needs {missing}, which is not installed: pip install "
                            f"{INSTALL.get(missing, missing)}, or choose another BACKEND") from None
    keep_tensorflow_out()
    return name


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null while the frameworks load. TensorFlow writes its
    start-up lines ("oneDNN custom operations are on", "Could not find cuda drivers", twice per
    import) from C++ before its logging is set up, where no log-level variable reaches them
    (TF_CPP_MIN_LOG_LEVEL, ABSL_MIN_LOG_LEVEL and GLOG_minloglevel were each tried). Python's
    sys.stderr is the same descriptor, so a failing import's traceback is printed after the
    descriptor is restored, by whoever catches it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def importable(module):
    """Whether `module` is installed (without importing it)."""
    return importlib.util.find_spec(module) is not None


def backend():
    """The backend Keras runs on in this process (imports Keras if nothing has yet)."""
    import keras
    return keras.backend.backend()


def keep_tensorflow_out():
    """Under JAX or PyTorch, make TensorFlow look absent to Keras for the rest of the process.
    Keras asks whether TensorFlow is installed, and imports it if so, under any backend: to seed
    it (set_random_seed), to serialise a layer's config (get_config, model.save), for tf.data.
    None of that needs it here, and importing it costs seconds and GPU memory. Keras caches the
    answer in its lazy module (keras.src: no public switch exists); a None in sys.modules makes
    the one import it tries fail."""
    if backend() == "tensorflow" or "tensorflow" in sys.modules:
        return
    from keras.src.utils.module_utils import tensorflow as lazy_tensorflow
    sys.modules["tensorflow"] = None
    try:
        lazy_tensorflow.available  # noqa: B018 (tries the import once and caches False)
    finally:
        del sys.modules["tensorflow"]


def set_seed(seed):
    """keras.utils.set_random_seed (Python's, NumPy's and the backend's generators and Keras's
    global one, which unseeded initialisers and dropout draw from), without TensorFlow under
    another backend."""
    import keras
    keep_tensorflow_out()
    keras.utils.set_random_seed(seed)


def framework_version():
    """{framework: version} of the framework under Keras, for caches' and models' records."""
    name = backend()
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[name]
    return {name: sys.modules[module].__version__ if module in sys.modules
            else __import__(module).__version__}


def accelerator():
    """"gpu" when the backend sees a GPU, else "cpu"."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf
        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if name == "jax":
        import jax
        return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def cpu_flags():
    """The CPU's feature flags (avx2, avx512_bf16, amx_bf16, ...) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f
                             if line.startswith("flags")), []))
    except OSError:  # not Linux: no flags, so float32
        return set()


def auto_precision(device=None, flags=None, backend_=None):
    """PRECISION=auto: the fastest precision that keeps accuracy (`make bench` measures both).

    - a GPU: mixed_float16 (tensor cores);
    - a CPU with native bfloat16 (BF16_FLAGS), under a backend that uses it: mixed_bfloat16,
      about twice float32's speed;
    - any other CPU: float32, since half precision is emulated there and no faster.
    `device`, `flags` and `backend_` default to this process's; tests pass others."""
    device = device or accelerator()
    if device == "gpu":
        return "mixed_float16"
    flags = cpu_flags() if flags is None else flags
    native = BF16_FLAGS & set(flags) and (backend_ or backend()) in BF16_CPU_BACKENDS
    return "mixed_bfloat16" if native else "float32"
