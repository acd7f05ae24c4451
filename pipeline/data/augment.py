"""The training augmentation: one definition for fine-tuning and for the augmented-feature cache.

Fine-tuning applies it to whole training batches in the input pipeline. `make extract AUGMENT=K`
applies it to single images: K augmented views of every training image go through the frozen
base once and are cached beside the plain features, so the head trains on augmented inputs at
cache speed (the Keras guide's "feature extraction with data augmentation", without running the
base every epoch). A view is a function of the image's content, its view number and the
augmentation's identity alone, never of the images it shared a batch with, so it is cached under
a key made of exactly those: `view_key`.

Keras preprocessing layers, keras.ops and numpy only: no backend is imported here.
"""
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


def augment_views(images, shas, views, seed, model=None):
    """images (n, h, w, 3), preprocessed -> view views[i] of image shas[i], for each i.

    Each random layer draws each image's transformation from a seed of its own (`_seed`), then
    transforms the batch in one call: batching costs nothing in reproducibility."""
    model = model or augmentation(seed)
    x = keras.ops.convert_to_tensor(np.asarray(images, np.float32))
    n = len(shas)
    for k, layer in enumerate(model.layers):
        drawn = [layer.get_random_transformation(x[i:i + 1], training=True,
                                                 seed=_seed(seed, shas[i], views[i], k))
                 for i in range(n)]
        x = layer.transform_images(x, _stack(drawn, n), training=True)
    return keras.ops.convert_to_numpy(x).astype(np.float32)


def _stack(transformations, n):
    """One transformation of a batch of n from n transformations of one image each."""
    out = {}
    for key, value in transformations[0].items():
        if key == "batch_size":
            out[key] = n
        elif key == "input_shape":
            out[key] = (n, *tuple(value)[1:])
        elif getattr(value, "shape", None) is not None and len(value.shape) and \
                value.shape[0] == 1:
            out[key] = keras.ops.concatenate([t[key] for t in transformations], axis=0)
        else:  # sizes shared by the batch (image_height, ...)
            out[key] = value
    return out


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
