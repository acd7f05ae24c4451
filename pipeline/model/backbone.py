"""The frozen VGG16 convolutional base and its weights; it makes the identity of its features
(identity.py, whose names it also offers to its users)."""
import os
from dataclasses import dataclass

import keras
import numpy as np

from ..cache.identity import (  # noqa: F401 - the identity's names, where the backbone's users look
    BACKBONE_ID,
    LAYERS,
    OUTPUT_LAYER,
    STORAGE_DTYPES,
    FeatureIdentity,
    identity_id,
    layer_shape,
)
from ..config import UserError, warn
from ..data.images import PREPROCESS_ID
from ..fs.artifacts import file_sha256
from . import runtime

IMAGENET_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
                + IMAGENET_FILE)
IMAGENET_MD5 = "6d6bbae143d832006294945121d1f1fc"  # the hash Keras itself checks
# keras.applications.vgg16.preprocess_input ("caffe"): RGB -> BGR, then ImageNet's mean pixel
# (in BGR order) subtracted; load_image's last step, and `preprocessing`'s numbers
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
RANDOM_FINGERPRINT = "random-init:glorot-uniform:numpy-seed-0:v1"
RANDOM_NOTICE = "weights are random: accuracy is not meaningful"


@dataclass(frozen=True)
class Weights:
    spec: str          # what the user asked for: imagenet | none | auto | <path>
    path: str          # the file actually loaded, "" for random initialisation
    fingerprint: str   # sha256 of that file, or RANDOM_FINGERPRINT
    notice: str = ""   # a warning that must follow the results (WEIGHTS=auto fell back to random)

    @property
    def is_random(self):
        return self.fingerprint == RANDOM_FINGERPRINT


def resolve_weights(spec):
    """Find the weights file for WEIGHTS=spec and fingerprint it, without building a model."""
    spec = spec or "imagenet"
    if spec == "none":
        return Weights(spec, "", RANDOM_FINGERPRINT)
    if spec in ("imagenet", "auto"):
        try:
            path = _imagenet_file()
        except UserError as error:
            if spec == "imagenet":
                raise
            warn(f"WEIGHTS=auto: {error}")
            warn(f"using random initialisation instead: {RANDOM_NOTICE}")
            return Weights(spec, "", RANDOM_FINGERPRINT, notice=RANDOM_NOTICE)
        return Weights(spec, path, file_sha256(path))
    if not os.path.isfile(spec):
        raise UserError(f"WEIGHTS file {spec!r} does not exist: pass WEIGHTS=imagenet, "
                        "WEIGHTS=none or the path of a VGG16 .h5 / .weights.h5 file")
    if not spec.endswith(".h5"):
        raise UserError(f"WEIGHTS file {spec!r} is not a .h5 or .weights.h5 file: save the VGG16 "
                        "convolutional base with model.save_weights('vgg16.weights.h5')")
    return Weights(spec, os.path.abspath(spec), file_sha256(spec))


def weights_of_cache(spec, cache_attrs):
    """The weights for a stage that builds on an existing cache (finetune, predict on images).

    Without WEIGHTS, those the cache was built with; with WEIGHTS, they must be the same weights.
    """
    recorded, where = cache_attrs["weights"], cache_attrs.get("weights_path", "")
    if spec:
        weights = resolve_weights(spec)
    elif recorded == RANDOM_FINGERPRINT:
        weights = Weights(cache_attrs.get("weights_spec", "none"), "", RANDOM_FINGERPRINT,
                          notice=cache_attrs.get("weights_notice", ""))
    elif os.path.isfile(where):
        weights = Weights(cache_attrs.get("weights_spec", where), where, file_sha256(where))
    else:
        raise UserError(f"the cache was built with weights {where!r}, which no longer exist: "
                        "put the file back or pass WEIGHTS=<the same weights file>")
    if weights.fingerprint != recorded:
        raise UserError(f"WEIGHTS={spec or where} (fingerprint {weights.fingerprint[:16]}) are not "
                        f"the weights the cache was built with ({recorded[:16]}): pass "
                        f"WEIGHTS={cache_attrs.get('weights_spec') or where}, or rerun "
                        "`make extract` with the new weights")
    return weights


def _imagenet_file():
    """Keras's own download and cache (~/.keras/models); offline, a clear way out."""
    cached = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "models",
                          IMAGENET_FILE)
    if os.path.isfile(cached):
        return cached
    try:
        return keras.utils.get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models",
                                    file_hash=IMAGENET_MD5)
    except Exception as error:  # urllib, socket and SSL errors all mean the same thing here
        reason = " ".join(str(error).split(" -- ")[-1].split())[:120] or type(error).__name__
        raise UserError(f"could not download the ImageNet VGG16 weights ({reason}); offline, copy "
                        f"{IMAGENET_FILE} to {cached} or pass WEIGHTS=<file.h5>") from None


def resolve_precision(precision):
    """PRECISION=auto: the fastest precision that keeps accuracy here (runtime.auto_precision)."""
    if precision == "auto":
        return runtime.auto_precision()
    if precision not in ("float32", "mixed_float16", "mixed_bfloat16"):
        raise UserError(f"PRECISION={precision!r} is not one of auto, float32, mixed_float16, "
                        "mixed_bfloat16")
    return precision


def resolve_storage(storage):
    if storage not in STORAGE_DTYPES:
        raise UserError(f"STORAGE={storage!r} is not one of {', '.join(STORAGE_DTYPES)}")
    return storage


def identity_of(weights, size, precision="float32", storage="float32"):
    """The FeatureIdentity of the features `weights` make at SIZE (extract's, before any cut)."""
    return FeatureIdentity(BACKBONE_ID, weights.fingerprint, int(size), PREPROCESS_ID, precision,
                           storage)


def feature_identity(weights, size, precision="float32", storage="float32"):
    """Everything that changes the numbers in a feature map, as caches record it (a dict):
    `identity_of(...).as_dict()`. Features are reused only when all of it is equal;
    `identity_id` names the folder that holds them."""
    return identity_of(weights, size, precision, storage).as_dict()


def first_trainable(unfreeze):
    """The position in LAYERS of the lowest layer that UNFREEZE trains: a block name ("block5")
    or a count of top convolutional layers; len(LAYERS) when nothing in the base trains."""
    convs = [i for i, name in enumerate(LAYERS) if "_conv" in name]
    blocks = sorted({name.split("_")[0] for name in LAYERS})
    text = str(unfreeze).strip()
    if text.isdigit() and int(text) <= len(convs):
        return convs[len(convs) - int(text)] if int(text) else len(LAYERS)
    if text in blocks:
        return LAYERS.index(f"{text}_conv1")
    raise UserError(f"UNFREEZE={unfreeze!r} is neither a block name ({', '.join(blocks)}) nor "
                    f"a count of top convolutional layers (0-{len(convs)}): use e.g. "
                    "UNFREEZE=block5")


def cut_layer(unfreeze):
    """The layer whose output is the input of UNFREEZE's lowest trainable layer: what fine-tuning
    from the cache reads (block4_pool for UNFREEZE=block5). None when every layer trains, as
    then the images themselves are the input."""
    first = first_trainable(unfreeze)
    return LAYERS[first - 1] if first > 0 else None


def preprocessing(name="preprocess"):
    """The backbone's preprocessing as a frozen Keras layer, for a graph that takes RGB pixel
    values (0-255, float): the numbers load_image's last step gives (vgg16.preprocess_input),
    exactly, as an affine map of the colour channels (a permutation and a bias), so it saves,
    exports and converts like any Dense layer."""
    layer = keras.layers.Dense(3, name=name, trainable=False, dtype="float32")
    layer.build((None, 3))
    reverse = np.eye(3, dtype=np.float32)[::-1]  # output channel j is input channel 2 - j
    layer.set_weights([reverse, -np.asarray(CAFFE_MEAN_BGR, np.float32)])
    return layer


def build_backbone(weights, size=None, precision="float32"):
    """VGG16 without its classifier, frozen, with `weights` loaded. size=None accepts any size.
    With a mixed precision the variables stay float32 and only the arithmetic is reduced."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)  # applies to the layers built here only
    try:
        base = keras.applications.VGG16(weights=None, include_top=False,
                                        input_shape=(size, size, 3))
    finally:
        keras.config.set_dtype_policy(previous)
    if weights.path:
        try:
            base.load_weights(weights.path)
        except Exception as error:
            raise UserError(f"WEIGHTS file {weights.path!r} does not fit VGG16's convolutional "
                            f"base ({type(error).__name__}: {str(error)[:160]}); pass a file saved "
                            "from keras.applications.VGG16(include_top=False)") from None
    else:
        _random_init(base)
    base.trainable = False  # frozen: extraction and the head never change it
    return base


def build_backbone_of(identity, weights):
    """The backbone that made a cache's features (a FeatureIdentity: its size and precision), to
    compose with a head or to compute features of new images that the cache's heads will read."""
    return build_backbone(weights, identity.image_size, identity.precision)


def _random_init(model, seed=0):
    """Deterministic Glorot-uniform weights, so WEIGHTS=none gives the same features every run
    (and its cache identity is honest) whatever Keras's own initialisers do."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not layer.weights:
            continue
        kernel, bias = layer.get_weights()
        fan_in, fan_out = np.prod(kernel.shape[:-1]), np.prod(kernel.shape[:-2]) * kernel.shape[-1]
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        layer.set_weights([rng.uniform(-limit, limit, kernel.shape).astype(np.float32),
                           np.zeros_like(bias)])


def feature_function(base, jit_compile=None):
    """The frozen base's compiled forward pass: a numpy batch of images -> float32 numpy feature
    maps (n, size//32, size//32, 512) (a list of arrays for a model of several outputs), on any
    backend. Keras's predict_on_batch compiles it with
    the backend's own compiler (tf.function, jax.jit; PyTorch runs eagerly) once per batch
    shape, so a batch smaller than the largest so far (a run's last one, or one with unreadable
    files taken out) is padded to it: one compilation per run, where JAX would otherwise compile
    VGG16 again for every new size. jit_compile=None: XLA only under JAX, which has no other way
    to compile; under TensorFlow XLA was 12% slower on the CPU (`make bench`, figure 6)."""
    if jit_compile is None:
        jit_compile = runtime.backend() == "jax"
    base.compile(jit_compile=jit_compile)  # no optimizer or loss: compiled for predict only
    largest = 0

    def features(images):
        nonlocal largest
        n, largest = len(images), max(largest, len(images))
        if n < largest:
            padding = np.zeros((largest - n, *images.shape[1:]), images.dtype)
            images = np.concatenate([images, padding])
        outputs = base.predict_on_batch(images)  # a list for a model of several outputs
        if isinstance(outputs, (list, tuple)):
            return [np.asarray(out[:n], dtype=np.float32) for out in outputs]
        return np.asarray(outputs[:n], dtype=np.float32)
    return features


def library_versions():
    import PIL
    import sklearn
    return {"backend": runtime.backend(), **runtime.framework_version(),
            "keras": keras.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "scikit-learn": sklearn.__version__}


def feature_shape(size):
    return layer_shape(OUTPUT_LAYER, size)
