"""The frozen convolutional base BACKBONE= picks (data/backbones.py's table) and its weights; it
makes the identity of its features (identity.py, whose names it also offers to its users)."""
import os
from dataclasses import dataclass

import keras
import numpy as np

from ..cache.identity import (  # noqa: F401 - the identity's names, where the backbone's users look
    STORAGE_DTYPES,
    FeatureIdentity,
    identity_id,
)
from ..config import UserError, warn
from ..data import backbones
from ..data.images import preprocess_id
from ..fs.artifacts import file_sha256
from . import runtime

# keras.applications' preprocess_input in "caffe" mode (VGG): RGB -> BGR, then ImageNet's mean
# pixel (in BGR order) subtracted; `preprocessing`'s numbers for those backbones
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
RANDOM_FINGERPRINT = "random-init:glorot-uniform:numpy-seed-0:v1"  # the default backbone's
RANDOM_NOTICE = "weights are random: accuracy is not meaningful"


@dataclass(frozen=True)
class Weights:
    spec: str          # what the user asked for: imagenet | none | auto | <path>
    path: str          # the file actually loaded, "" for random initialisation
    fingerprint: str   # sha256 of that file, or random_fingerprint(the backbone)
    notice: str = ""   # a warning that must follow the results (WEIGHTS=auto fell back to random)

    @property
    def is_random(self):
        return self.fingerprint.startswith("random-init:")


def random_fingerprint(entry):
    """WEIGHTS=none's fingerprint for the backbone `entry`: it names the initialisation
    (the table's random_init), which _random_init reads back from it."""
    return f"random-init:{entry.random_init}:numpy-seed-0:v1"


def resolve_weights(spec, entry=None):
    """Find the weights file for WEIGHTS=spec of the backbone `entry` (a backbones.Backbone;
    None: the default) and fingerprint it, without building a model."""
    spec, entry = spec or "imagenet", entry or backbones.get(None)
    if spec == "none":
        return Weights(spec, "", random_fingerprint(entry))
    if spec in ("imagenet", "auto"):
        try:
            path = _imagenet_file(entry)
        except UserError as error:
            if spec == "imagenet":
                raise
            warn(f"WEIGHTS=auto: {error}")
            warn(f"using random initialisation instead: {RANDOM_NOTICE}")
            return Weights(spec, "", random_fingerprint(entry), notice=RANDOM_NOTICE)
        return Weights(spec, path, file_sha256(path))
    if not os.path.isfile(spec):
        raise UserError(f"WEIGHTS file {spec!r} does not exist: pass WEIGHTS=imagenet, "
                        f"WEIGHTS=none or the path of a {entry.constructor} .h5 / .weights.h5 file")
    if not spec.endswith(".h5"):
        raise UserError(f"WEIGHTS file {spec!r} is not a .h5 or .weights.h5 file: save the "
                        f"{entry.constructor} convolutional base with "
                        f"model.save_weights('{entry.name}.weights.h5')")
    return Weights(spec, os.path.abspath(spec), file_sha256(spec))


def weights_of_cache(spec, cache_attrs):
    """The weights for a stage that builds on an existing cache (finetune, predict on images).

    Without WEIGHTS, or with the WEIGHTS the cache was built with (its record: a stage not told
    WEIGHTS is given those), the weights it was built with; with other WEIGHTS, they must be the
    same weights.
    """
    recorded, where = cache_attrs["weights"], cache_attrs.get("weights_path", "")
    if spec and spec != cache_attrs.get("weights_spec") and os.path.abspath(spec) != where:
        # another WEIGHTS than the cache's own: imagenet means the cache's backbone's file
        weights = resolve_weights(spec, backbones.of_identity(cache_attrs.get("backbone")))
    elif recorded.startswith("random-init:"):
        entry = backbones.of_identity(cache_attrs.get("backbone")) or backbones.get(None)
        weights = Weights(cache_attrs.get("weights_spec", "none"), "", random_fingerprint(entry),
                          notice=cache_attrs.get("weights_notice", ""))
    elif os.path.isfile(where):
        weights = Weights(cache_attrs.get("weights_spec", where), where, file_sha256(where))
    else:
        raise UserError(f"the cache was built with weights {where!r}, which no longer exist: "
                        "put the file back, or run `make extract WEIGHTS=<where it is now>`")
    if weights.fingerprint != recorded and weights.is_random and recorded.startswith(
            "random-init:"):
        raise UserError(f"the cache's random weights were drawn as {recorded}, and this version "
                        f"draws {weights.fingerprint}: run `make extract` again (its features "
                        "are recomputed once)")
    if weights.fingerprint != recorded:
        raise UserError(f"WEIGHTS={spec or where} (fingerprint {weights.fingerprint[:16]}) are not "
                        f"the weights the cache was built with ({recorded[:16]}): pass "
                        f"WEIGHTS={cache_attrs.get('weights_spec') or where}, or rerun "
                        "`make extract` with the new weights")
    return weights


def _imagenet_file(entry):
    """Keras's own download and cache (~/.keras/models) of the backbone's ImageNet weights;
    offline, a clear way out."""
    cached = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "models",
                          entry.weights_file)
    if os.path.isfile(cached):
        return cached
    try:
        return keras.utils.get_file(entry.weights_file, entry.weights_url, cache_subdir="models",
                                    file_hash=entry.weights_hash)
    except Exception as error:  # urllib, socket and SSL errors all mean the same thing here
        reason = " ".join(str(error).split(" -- ")[-1].split())[:120] or type(error).__name__
        raise UserError(f"could not download the ImageNet {entry.constructor} weights ({reason}); "
                        f"offline, copy {entry.weights_file} to {cached} or pass "
                        "WEIGHTS=<file.h5> or WEIGHTS=none") from None


def resolve_precision(precision, entry=None):
    """PRECISION=auto: the fastest precision that keeps accuracy here (runtime.auto_precision)
    for the backbone `entry` (None: the default): float32 instead of mixed bfloat16 on a CPU
    where the table says the base runs faster in float32 (Backbone.cpu_bfloat16)."""
    if precision == "auto":
        chosen = runtime.auto_precision()
        if chosen == "mixed_bfloat16" and not (entry or backbones.get(None)).cpu_bfloat16:
            return "float32"
        return chosen
    if precision not in ("float32", "mixed_float16", "mixed_bfloat16"):
        raise UserError(f"PRECISION={precision!r} is not one of auto, float32, mixed_float16, "
                        "mixed_bfloat16")
    return precision


def resolve_storage(storage):
    if storage not in STORAGE_DTYPES:
        raise UserError(f"STORAGE={storage!r} is not one of {', '.join(STORAGE_DTYPES)}")
    return storage


def identity_of(weights, size, precision="float32", storage="float32", entry=None,
                feature_layer=""):
    """The FeatureIdentity of the features `weights` make at SIZE with the backbone `entry`
    (None: the default), at FEATURE_LAYER's stage (empty: the top; extract's, before any cut)."""
    entry = entry or backbones.get(None)
    layer = None
    if feature_layer and entry.stage(feature_layer, "FEATURE_LAYER") != entry.top:
        layer = entry.stage(feature_layer, "FEATURE_LAYER").output
    return FeatureIdentity(entry.identity, weights.fingerprint, int(size), preprocess_id(entry),
                           precision, storage, layer)


def feature_identity(weights, size, precision="float32", storage="float32", entry=None):
    """Everything that changes the numbers in a feature map, as caches record it (a dict):
    `identity_of(...).as_dict()`. Features are reused only when all of it is equal;
    `identity_id` names the folder that holds them."""
    return identity_of(weights, size, precision, storage, entry).as_dict()


def unfreeze_cut(identity, unfreeze):
    """The cut of UNFREEZE for features of `identity` (a FeatureIdentity): the layer whose output
    is the input of the lowest layer fine-tuning trains, None when every layer trains (the input
    is the image). Refused in one line when UNFREEZE's stage is not below FEATURE_LAYER's, as the
    base then ends before it."""
    entry = identity.entry
    layer, top = entry.cut_of(unfreeze), identity.output_layer
    if layer == entry.top.output:  # UNFREEZE=0: nothing trains, wherever the base ends
        return top
    if layer is not None and entry.position(layer) >= entry.position(top):
        raise UserError(f"UNFREEZE={entry.unfreeze_stage(unfreeze)} trains layers above "
                        f"FEATURE_LAYER's output ({top}), where the base ends: pass a lower "
                        "UNFREEZE, or an empty FEATURE_LAYER (the top of the base)")
    return layer


def layer_output(base, entry, layer):
    """The symbolic output of `layer` (a stage output or, for a chain, any layer) in `base`: the
    top stage's is the base's own output, whatever Keras named its last layer."""
    if layer == entry.top.output:
        return base.output
    return base.get_layer(layer).output


def preprocessing(entry=None, name="preprocess"):
    """The backbone's preprocessing (load_image's last step) as a frozen Keras layer, for a graph
    that takes RGB pixel values (0-255, float), exactly, in layers every format saves, exports and
    converts: VGG's caffe mode as an affine map of the colour channels (a permutation and a bias),
    ResNetV2's tf mode as a rescaling to [-1, 1]; nothing where the model holds its own."""
    entry = entry or backbones.get(None)
    mode = entry.preprocess_module
    if not mode:
        return keras.layers.Identity(name=name)
    if mode in ("vgg16", "vgg19"):
        layer = keras.layers.Dense(3, name=name, trainable=False, dtype="float32")
        layer.build((None, 3))
        reverse = np.eye(3, dtype=np.float32)[::-1]  # output channel j is input channel 2 - j
        layer.set_weights([reverse, -np.asarray(CAFFE_MEAN_BGR, np.float32)])
        return layer
    if mode == "resnet_v2":
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name=name, dtype="float32")
    raise UserError(f"BACKBONE={entry.name}: no preprocessing layer for {mode}'s preprocess_input")


def build_backbone(weights, size=None, precision="float32", entry=None):
    """The backbone `entry` (None: the default) without its classifier, frozen, with `weights`
    loaded. size=None accepts any size. With a mixed precision the variables stay float32 and
    only the arithmetic is reduced."""
    entry = entry or backbones.get(None)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)  # applies to the layers built here only
    try:
        base = getattr(keras.applications, entry.constructor)(
            weights=None, include_top=False, input_shape=(size, size, 3))
    finally:
        keras.config.set_dtype_policy(previous)
    if weights.path:
        try:
            base.load_weights(weights.path)
        except Exception as error:
            reason = " ".join(str(error).split())[:160]  # Keras's message spans lines
            raise UserError(f"WEIGHTS file {weights.path!r} does not fit BACKBONE={entry.name} "
                            f"({type(error).__name__}: {reason}); pass a file saved "
                            f"from keras.applications.{entry.constructor}(include_top=False), "
                            "or the BACKBONE it was saved from") from None
    else:
        _random_init(base, weights.fingerprint.split(":")[1])
    base.trainable = False  # frozen: extraction and the head never change it
    return base


def build_backbone_of(identity, weights):
    """The backbone that made a cache's features (a FeatureIdentity: its backbone, size,
    precision, and FEATURE_LAYER's stage, where the base then ends), to compose with a head or to
    compute features of new images that the cache's heads will read."""
    entry = identity.entry
    base = build_backbone(weights, identity.image_size, identity.precision, entry)
    if identity.output_layer == entry.top.output:
        return base
    return keras.Model(base.input, layer_output(base, entry, identity.output_layer),
                       name=f"{base.name}_to_{identity.output_layer}")


def _random_init(model, scheme, seed=0):
    """Deterministic kernels, so WEIGHTS=none gives the same features every run (and its cache
    identity is honest) whatever Keras's own initialisers do. Every kernel (a variable of 2 or
    more dimensions), in layer order, draws from one seeded generator; biases are zeros, and the
    other vectors (BatchNormalization's, LayerScale's, a Normalization's ImageNet statistics)
    keep the constants their layer starts with.

    scheme "glorot-uniform": limit sqrt(6 / (fan_in + fan_out)), fans counted as for a dense
    kernel. "he-uniform": limit sqrt(6 / fan_in), a depthwise kernel's fan-in being its window,
    so each layer keeps its input's scale: what the deep bases of depthwise convolutions need for
    features that do not vanish (backbones.Backbone.random_init)."""
    if scheme not in ("glorot-uniform", "he-uniform"):
        raise ValueError(f"no random initialisation called {scheme!r}")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        for variable in layer.weights:
            shape = tuple(variable.shape)
            if len(shape) >= 2:
                if scheme == "he-uniform":
                    fan_in = np.prod(shape[:-2] if depthwise else shape[:-1])
                    limit = np.sqrt(6.0 / fan_in)
                else:
                    fan_in, fan_out = np.prod(shape[:-1]), np.prod(shape[:-2]) * shape[-1]
                    limit = np.sqrt(6.0 / (fan_in + fan_out))
                variable.assign(rng.uniform(-limit, limit, shape).astype(np.float32))
            elif variable.path.endswith("bias"):
                variable.assign(np.zeros(shape, np.float32))


def feature_function(base, jit_compile=None):
    """The frozen base's compiled forward pass: a numpy batch of images -> float32 numpy feature
    maps (n, h, w, channels) (a list of arrays for a model of several outputs), on any
    backend. Keras's predict_on_batch compiles it with
    the backend's own compiler (tf.function, jax.jit; PyTorch runs eagerly) once per batch
    shape, so a batch smaller than the largest so far (a run's last one, or one with unreadable
    files taken out) is padded to it: one compilation per run, where JAX would otherwise compile
    the base again for every new size. jit_compile=None: XLA only under JAX, which has no other way
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



def feature_shape(size, entry=None):
    """The shape of one image's features at SIZE: the top of `entry` (None: the default)."""
    return (entry or backbones.get(None)).top.shape(size)
