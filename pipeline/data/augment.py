"""The training augmentation: one definition for fine-tuning and for the augmented-feature cache.

Fine-tuning applies it to whole training batches in the input pipeline. `make extract AUGMENT=K`
applies it image by image (ViewFunction: one compiled call a batch): K augmented views of every
training image go through the frozen base once and are cached beside the plain features, so the
head trains on augmented inputs at cache speed (the Keras guide's "feature extraction with data
augmentation", without running the base every epoch). A view is a function of the image's
content, its view number and the augmentation's identity alone, never of the images it shared a
batch with, so it is cached under a key made of exactly those: `view_key`.

Keras preprocessing layers, keras.ops and numpy only: no backend is imported here.
"""
import functools
import hashlib
import json

import keras
import numpy as np

# How a view's random draws are seeded. Part of the identity: a new scheme never reuses views.
SEED_SCHEME = "sha256(seed:image sha256:view:layer)[:4] per image and layer, v1"


LAYER_NAME = "augmentation"  # `without_augmentation` leaves this layer out


def augmentation(seed):
    """The article's augmentations: flips, rotations, zooms and shifts.

    They run on images the loader has already preprocessed for the backbone (for VGG16: BGR,
    ImageNet mean subtracted). The "reflect" fill (Keras's default, written out here) fills
    uncovered corners with mirrored real pixels, so no value appears that the preprocessing could
    not have produced, whichever it is; a "constant" fill of 0 would mean a different colour for
    each backbone (VGG16's ImageNet mean, another's black)."""
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.1, fill_mode="reflect", seed=seed + 1),
        keras.layers.RandomZoom(0.2, fill_mode="reflect", seed=seed + 2),
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 3),
    ], name=LAYER_NAME)


def identity(seed):
    """Everything that decides the views: each layer's class and settings, the seed, and the
    seeding scheme. Written into the cache; any change makes new view keys."""
    ignored = ("name", "seed", "trainable", "dtype")
    layers = [{"class": type(layer).__name__,
               **{k: v for k, v in layer.get_config().items() if k not in ignored}}
              for layer in augmentation(seed).layers]
    return {"layers": layers, "seed": int(seed), "scheme": SEED_SCHEME}


def identity_id(augment_identity):
    text = json.dumps(augment_identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def view_key(sha, augment_id, view):
    """The cache key of view `view` (1..K) of the image with content hash `sha`: 64 hex digits,
    like an image's own sha256, so views live in the same segments as plain features."""
    return hashlib.sha256(f"{sha}:{augment_id}:{view}".encode()).hexdigest()


def _seed(seed, sha, view, layer):
    digest = hashlib.sha256(f"{seed}:{sha}:{view}:{layer}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def augment_views(images, shas, views, seed):
    """images (n, h, w, 3), preprocessed -> view views[i] of image shas[i], for each i, by a
    ViewFunction kept for `seed` (compiling its graph costs seconds; calling it, milliseconds)."""
    return _view_function(seed)(images, shas, views)


@functools.lru_cache(maxsize=4)
def _view_function(seed):
    return ViewFunction(seed)


class ViewFunction:
    """The views of a batch in one compiled call (a Keras model run by predict_on_batch: the
    backend's own compiler), each image's transformation drawn from seeds of its own (`_seed`):
    batching costs nothing in reproducibility. A call of fewer images than `batch` (or than the
    largest call so far) is padded to it, so one graph serves a whole run."""

    def __init__(self, seed, batch=0):
        self.seed, self.largest = seed, batch
        self.layers = augmentation(seed).layers
        self.compiled = {}  # image shape (h, w, channels) -> its model

    def __call__(self, images, shas, views):
        images = np.asarray(images, np.float32)
        n = len(images)
        if not n:
            return images
        seeds = np.array([[[_seed(self.seed, sha, view, k), 0] for k in range(len(self.layers))]
                          for sha, view in zip(shas, views)], np.int32)
        self.largest = max(self.largest, n)
        if n < self.largest:
            images = np.concatenate([images, np.zeros((self.largest - n, *images.shape[1:]),
                                                      np.float32)])
            seeds = np.concatenate([seeds, np.zeros((self.largest - n, *seeds.shape[1:]),
                                                    np.int32)])
        model = self.compiled.get(images.shape[1:]) or self._compile(images.shape[1:])
        return np.asarray(model.predict_on_batch([images, seeds])[:n], np.float32)

    def _compile(self, shape):
        images = keras.Input(shape, name="images")
        seeds = keras.Input((len(self.layers), 2), dtype="int32", name="seeds")
        model = keras.Model([images, seeds], _SeededViews(self.layers)(images, seeds))
        model.compile()  # no optimizer or loss: compiled for predict only
        self.compiled[shape] = model
        return model


class _SeededViews(keras.layers.Layer):
    """The augmentation's layers on a batch, given (n, layers, 2) seeds. Each image's
    transformation is drawn alone (keras.ops.map), at the shapes of a draw for one image, so the
    numbers are those of `layer.get_random_transformation(image, seed=int)` called image by
    image, bit for bit (a vectorised draw computes sin and cos in other float rounding)."""

    def __init__(self, layers, **kwargs):
        super().__init__(**kwargs)
        self.steps = layers
        # the dtype Keras gives an int seed on this backend (int64, uint32 or int32)
        self.seed_dtype = keras.random.SeedGenerator(0).state.dtype

    def build(self, *shapes):  # the augmentation's layers have no weights to build
        self.built = True

    def call(self, images, seeds):
        seeds = keras.ops.cast(seeds, self.seed_dtype)
        one = keras.ops.zeros((1, *images.shape[1:]))
        for k, layer in enumerate(self.steps):
            def draw(seed, layer=layer):  # the entries of one image's draw that are per image
                drawn = layer.get_random_transformation(one, training=True, seed=_Fixed(seed))
                return {key: value for key, value in drawn.items() if _per_image(value)}
            batch = layer.get_random_transformation(images, training=True,
                                                    seed=_Fixed(seeds[0, k]))
            batch.update({key: value[:, 0]
                          for key, value in keras.ops.map(draw, seeds[:, k]).items()})
            images = layer.transform_images(images, batch, training=True)
        return images


class _Fixed(keras.random.SeedGenerator):
    """A seed that every draw reads unchanged, as Keras reads an int seed ([seed, 0]); unlike an
    int, it may be a tensor of a compiled graph. It keeps no state: nothing advances."""

    def __init__(self, value):  # not the base's: its state variable is what this avoids
        self.value = value

    def next(self, ordered=True):
        return self.value


def _per_image(value):
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) > 0 and shape[0] == 1


def epoch_views(rows, views, seed, epoch, n_rows):
    """The view (0 = the plain features, 1..views = augmented) each of `rows` is read as in
    `epoch`: every row starts at its own seeded offset and moves to the next view each epoch,
    so an image is seen as a different view in each of views + 1 consecutive epochs."""
    offsets = np.random.default_rng([seed, 15]).integers(0, views + 1, n_rows)
    return (offsets[np.asarray(rows)] + epoch) % (views + 1)


def without_augmentation(model):
    """A functional `model` without its `augmentation` layer, sharing every other layer (and so
    every weight it learns): what finetune saves. Keras's augmentation layers augment whenever
    they are called without training=False, so a saved model that held them would flip and
    rotate the images of anyone calling it directly, model(x)."""
    inputs = x = keras.Input(model.input.shape[1:], name=model.input.name)
    for layer in model.layers[1:]:
        x = x if layer.name == LAYER_NAME else layer(x)
    return keras.Model(inputs, x, name=model.name)
