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
# v2: one seed per image for its whole RandomAffine draw (v1 seeded each of four Keras layers).
SEED_SCHEME = "sha256(seed:image sha256:view:0)[:4] per image, one RandomAffine draw, v2"


LAYER_NAME = "augmentation"  # `without_augmentation` leaves this layer out


def augmentation(seed):
    """The article's augmentations: flips, rotations, zooms and shifts, as one RandomAffine.

    They run on images the loader has already preprocessed for the backbone (for VGG16: BGR,
    ImageNet mean subtracted). The "reflect" fill (Keras's default, written out here) fills
    uncovered corners with mirrored real pixels, so no value appears that the preprocessing could
    not have produced, whichever it is; a "constant" fill of 0 would mean a different colour for
    each backbone (VGG16's ImageNet mean, another's black)."""
    return keras.Sequential([RandomAffine(rotation=0.1, zoom=0.2, translation=0.1, flip=True,
                                          fill_mode="reflect", seed=seed)], name=LAYER_NAME)


@keras.saving.register_keras_serializable(package="pipeline")
class RandomAffine(keras.layers.Layer):
    """A random horizontal flip, rotation (± rotation × 2π), zoom (± zoom, both axes alike) and
    shift (± translation × the side) per image, composed into one affine map: the image is
    resampled once, as the article's ImageDataGenerator did. Keras's RandomFlip, RandomRotation,
    RandomZoom and RandomTranslation in turn, with the same ranges, resample it three times,
    blurring it each time, at 2.6 times the CPU: 1.6 ms against 0.6 ms a 150-pixel view, the
    largest cost of extraction outside the base (docs/backbones.md, "Where extraction's time
    goes").

    `draw(n, seed)` gives n images' parameters; `transform(images, draws)` applies them; called
    on a batch with training=True (Keras's default for its random layers too), it draws from the
    layer's own SeedGenerator, whose state its saved weights (a fine-tuning backup) keep."""

    def __init__(self, rotation=0.1, zoom=0.2, translation=0.1, flip=True,
                 interpolation="bilinear", fill_mode="reflect", seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rotation, self.zoom, self.translation, self.flip = rotation, zoom, translation, flip
        self.interpolation, self.fill_mode, self.seed = interpolation, fill_mode, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def get_config(self):
        return {**super().get_config(), "rotation": self.rotation, "zoom": self.zoom,
                "translation": self.translation, "flip": self.flip,
                "interpolation": self.interpolation, "fill_mode": self.fill_mode,
                "seed": self.seed}

    def call(self, images, training=True):
        if not training:
            return images
        return self.transform(images, self.draw(keras.ops.shape(images)[0],
                                                self.seed_generator))

    def compute_output_shape(self, shape):
        return shape

    # The SeedGenerator's state is no variable of the layer's own, so Keras would save nothing:
    # a fine-tuning backup keeps it here, and a resumed run draws on where it stopped.
    def save_own_variables(self, store):
        store["seed_state"] = keras.ops.convert_to_numpy(self.seed_generator.state)

    def load_own_variables(self, store):
        try:
            state = store["seed_state"]
        except KeyError:  # a backup from before this layer kept its state: start afresh
            return
        self.seed_generator.state.assign(np.asarray(state))

    @staticmethod
    def draw(n, seed):
        """(n, 5) uniform draws in [0, 1): flip, angle, zoom, shift across, shift down."""
        return keras.random.uniform((n, 5), seed=seed)

    def transform(self, images, draws):
        """images (n, h, w, c) -> each mapped by the affine map its row of draws picks."""
        h, w = images.shape[1], images.shape[2]
        return keras.ops.image.affine_transform(
            images, self.matrices(draws, h, w), interpolation=self.interpolation,
            fill_mode=self.fill_mode)

    def matrices(self, draws, h, w):
        """The (n, 8) maps from output to input pixel (affine_transform's convention), about the
        image's centre c: input = c + Z·F·R·(output - shift - c), Z the zoom, R the rotation
        and F the flip of the x axis."""
        ops, u = keras.ops, 2.0 * draws - 1.0  # each in [-1, 1)
        flip = ops.where(draws[:, 0] < 0.5, -1.0, 1.0) if self.flip else ops.ones_like(u[:, 0])
        angle = u[:, 1] * (self.rotation * 2.0 * np.pi)
        scale = 1.0 + u[:, 2] * self.zoom
        shift_x, shift_y = u[:, 3] * (self.translation * w), u[:, 4] * (self.translation * h)
        cos, sin = ops.cos(angle), ops.sin(angle)
        a00, a01 = scale * flip * cos, -scale * flip * sin
        a10, a11 = scale * sin, scale * cos
        cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
        ox, oy = shift_x + cx, shift_y + cy  # input = c + A·(output - o)
        zero = ops.zeros_like(scale)
        return ops.stack([a00, a01, cx - a00 * ox - a01 * oy,
                          a10, a11, cy - a10 * ox - a11 * oy, zero, zero], axis=1)


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


def view_seed(seed, sha, view):
    """The int seed of one view's draw: a function of SEED, the image's content and the view."""
    digest = hashlib.sha256(f"{seed}:{sha}:{view}:0".encode()).digest()
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
    backend's own compiler), each image's transformation drawn from a seed of its own
    (`view_seed`): batching costs nothing in reproducibility. A call of fewer images than `batch`
    (or than the largest call so far) is padded to it, so one graph serves a whole run."""

    def __init__(self, seed, batch=0):
        self.seed, self.largest = seed, batch
        self.affine, = augmentation(seed).layers
        self.compiled = {}  # image shape (h, w, channels) -> its model

    def __call__(self, images, shas, views):
        images = np.asarray(images, np.float32)
        n = len(images)
        if not n:
            return images
        seeds = np.array([[view_seed(self.seed, sha, view), 0] for sha, view in zip(shas, views)],
                         np.int32)
        self.largest = max(self.largest, n)
        if n < self.largest:
            images = np.concatenate([images, np.zeros((self.largest - n, *images.shape[1:]),
                                                      np.float32)])
            seeds = np.concatenate([seeds, np.zeros((self.largest - n, 2), np.int32)])
        model = self.compiled.get(images.shape[1:]) or self._compile(images.shape[1:])
        return np.asarray(model.predict_on_batch([images, seeds])[:n], np.float32)

    def _compile(self, shape):
        images = keras.Input(shape, name="images")
        seeds = keras.Input((2,), dtype="int32", name="seeds")
        model = keras.Model([images, seeds], _SeededViews(self.affine)(images, seeds))
        model.compile()  # no optimizer or loss: compiled for predict only
        self.compiled[shape] = model
        return model


class _SeededViews(keras.layers.Layer):
    """RandomAffine on a batch, given (n, 2) seeds. Each image's map is drawn and computed alone
    (keras.ops.map), at the shapes of one image's, so the numbers are those of
    `affine.transform(image, affine.draw(1, seed=int))` called image by image, bit for bit (a
    vectorised sin and cos round differently)."""

    def __init__(self, affine, **kwargs):
        super().__init__(**kwargs)
        self.affine = affine
        # the dtype Keras gives an int seed on this backend (int64, uint32 or int32)
        self.seed_dtype = keras.random.SeedGenerator(0).state.dtype

    def build(self, *shapes):  # RandomAffine has no weights to build
        self.built = True

    def call(self, images, seeds):
        h, w = images.shape[1], images.shape[2]

        def one(seed):  # one image's map, as (1, 8)
            return self.affine.matrices(self.affine.draw(1, _Fixed(seed)), h, w)
        matrices = keras.ops.map(one, keras.ops.cast(seeds, self.seed_dtype))[:, 0]
        return keras.ops.image.affine_transform(
            images, matrices, interpolation=self.affine.interpolation,
            fill_mode=self.affine.fill_mode)


class _Fixed(keras.random.SeedGenerator):
    """A seed that every draw reads unchanged, as Keras reads an int seed ([seed, 0]); unlike an
    int, it may be a tensor of a compiled graph. It keeps no state: nothing advances."""

    def __init__(self, value):  # not the base's: its state variable is what this avoids
        self.value = value

    def next(self, ordered=True):
        return self.value


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
