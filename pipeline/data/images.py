"""Images: turning one file into model input, and the input pipelines around that.

`load_image` is the only function in the project that turns an image file into a tensor. Every stage
(extract, finetune, evaluate, predict) goes through it, directly or through the input pipeline
below, so training and prediction can never disagree about decoding, orientation, size or scaling.
"""
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import keras
import numpy as np
from PIL import Image, ImageOps

from ..config import UserError
from . import backbones
from .datasets import not_regular_reason

# Part of the cache identity: change it whenever load_image would decode to different numbers.
DECODE_ID = "pil:draft+exif+rgb(white-bg,16bit/257)+bilinear"
DEFAULT_PREPROCESS = backbones.get(backbones.DEFAULT).preprocess


def preprocess_id(entry):
    """The identity's `preprocess` for a backbones.Backbone: the decoding, then its own step."""
    return f"{DECODE_ID}|{entry.preprocess_id}|v1"

# The most pixels load_image decodes for one image (after a JPEG's DCT scaling, see load_image):
# 8192 x 8192. Photos fit: 60-megapixel cameras exist (9504 x 6336 = 60.2 MP), and their JPEGs are
# decoded at a reduced scale anyway. The cost is well above the pixels: an RGBA image this size is
# 256 MB decoded, and decoding, EXIF transposition and compositing on white hold about six such
# copies at once (extract peaked 1.5 GB above its baseline on an 8192 x 8192 RGBA PNG), while
# several images are decoded in parallel. A 13000 x 13000 PNG of 657 KB cost 3.9 GB before
# this budget. Refusing from the header is the only cheap defence: the file's size says nothing.
MAX_PIXELS = 8192 * 8192

# Pillow warns from 89 MP and refuses from 179 MP (Image.MAX_IMAGE_PIXELS, kept as it is). Its
# warning would fire for every image that load_image then refuses with a reason of its own, and for
# every big JPEG that the DCT scaling decodes cheaply: noise either way, once per image size.
# Module-wide, because warnings.catch_warnings is not thread-safe and images decode in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

class ImageRefused(ValueError):
    """A file load_image will not decode; its message is the whole reason shown to the user."""


# --------------------------------------------------------------------------------------------
# The one loader
# --------------------------------------------------------------------------------------------

def load_image(path, size, preprocess=DEFAULT_PREPROCESS):
    """Decode `path` and return a (size, size, 3) float32 array ready for the backbone whose
    `preprocess` (a backbones.Backbone's) is given.

    1. decode (a JPEG is decoded directly at 1/2, 1/4 or 1/8 scale when that is still >= size:
       libjpeg's DCT scaling, several times faster than a full decode followed by a resize);
    2. convert to RGB: grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit, and the
       first frame of an animation;
    3. apply the EXIF orientation;
    4. resize to size x size (bilinear, antialiased);
    5. the backbone's preprocessing of those 0-255 RGB values (the default base's: RGB->BGR,
       ImageNet mean subtracted; none where the model holds its own).
    Raises on a file that cannot be decoded; `try_load_image` turns that into a reason. Raises
    ImageRefused, before reading any pixel, for anything but a regular file and for an image over
    MAX_PIXELS once the JPEG scaling is applied.
    """
    with decode(path, size) as img:
        return _model_input(img, size, preprocess)


def decode(path, size):
    """Steps 1 to 3 of load_image: `path` as an RGB PIL image, upright, decoded at no less than
    `size` pixels a side where the format allows less (a JPEG's DCT scaling). Raises as
    load_image does. The one decoder: load_image builds model input on it, and thumbnails for
    display (thumbnails.py) are cut from it, so neither meets a file the other would refuse."""
    problem = not_regular_reason(path)
    if problem:
        raise ImageRefused(problem)
    try:
        img = Image.open(path)
    except Image.DecompressionBombError:
        # Pillow refuses before it reads a pixel, over 2 * Image.MAX_IMAGE_PIXELS; say it our way
        raise ImageRefused(f"image of more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP is over "
                           f"the {_budget()} per image: downscale it") from None
    with img:
        # The first frame of a GIF/WebP/APNG animation: no other frame is ever decoded, so the
        # number of frames costs nothing. Pillow grows a GIF's canvas to a first frame that
        # exceeds it while opening, so the size checked below is what gets decoded.
        img.seek(0)
        if img.format == "JPEG":
            img.draft("RGB" if img.mode == "RGB" else None, (size, size))
        # After draft: a big JPEG counts at the scale it will really be decoded at.
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise ImageRefused(f"image of {width}x{height} pixels ({width * height / 1e6:.0f} MP) "
                               f"is over the {_budget()} per image: downscale it")
        return _to_rgb(ImageOps.exif_transpose(img))


def image_from_array(array, size, preprocess=DEFAULT_PREPROCESS):
    """An image already decoded, a (height, width, 3) uint8 RGB array, as model input: what
    load_image makes of a JPEG of these pixels. Its decode at a reduced scale (step 1) is
    approximated by a box average at that scale (`draft_scale`, Pillow's reduce), then the same
    resize and preprocessing (steps 4 and 5). ValueError for anything else."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ValueError(f"an image array must be (height, width, 3) uint8 RGB, not "
                         f"{array.dtype} of shape {array.shape}")
    if array.shape[0] * array.shape[1] > MAX_PIXELS:
        raise ValueError(f"an image of {array.shape[1]}x{array.shape[0]} pixels is over the "
                         f"{_budget()} per image: downscale it")
    img = Image.fromarray(array, "RGB")
    scale = draft_scale(img.width, img.height, size)
    return _model_input(img.reduce(scale) if scale > 1 else img, size, preprocess)


def _model_input(img, size, preprocess):
    """An RGB PIL image -> load_image's result: resized (bilinear, antialiased) and
    preprocessed for the backbone (`preprocess`, a backbones.Backbone's)."""
    img = img.resize((size, size), Image.BILINEAR)
    return preprocess(np.asarray(img, dtype=np.float32))


class PillowResize(keras.layers.Layer):
    """load_image's resize as a Keras layer, for graphs that take decoded pixels of any size:
    (n, height, width, 3) pixel values -> (n, size, size, 3), as `image_from_array` computes it
    with Pillow. An image at least twice SIZE is first averaged down by the scale load_image's
    JPEG decode would have used (`draft_scale`, libjpeg's DCT scaling, which a box average
    approximates), then resized with Pillow's BILINEAR filter: a triangle widened by the scale
    when shrinking (so antialiased), the width first, each pass rounded to whole values 0-255.
    Both steps are one weight matrix per axis, applied with matrix products that every converter
    knows (TensorFlow's own antialiased resize has no LiteRT op), in float32 (Pillow: 22-bit
    fixed point, so a value on a half may round the other way)."""

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)

    def call(self, pixels):
        x = keras.ops.cast(pixels, "float32")
        shape = keras.ops.shape(x)
        height, width = shape[1], shape[2]
        scale = _draft_scale_graph(height, width, self.size)
        columns = keras.ops.transpose(_resize_weights(width, scale, self.size))  # (w, size)
        rows = keras.ops.transpose(_resize_weights(height, scale, self.size))    # (h, size)
        x = keras.ops.matmul(keras.ops.transpose(x, (0, 1, 3, 2)), columns)  # (n, h, 3, size)
        x = keras.ops.clip(keras.ops.floor(x + 0.5), 0.0, 255.0)  # half up, as Pillow
        x = keras.ops.matmul(keras.ops.transpose(x, (0, 3, 2, 1)), rows)     # (n, size, 3, size)
        x = keras.ops.clip(keras.ops.floor(x + 0.5), 0.0, 255.0)
        return keras.ops.transpose(x, (0, 3, 1, 2))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "size": self.size}


def draft_scale(width, height, size):
    """The reduction (1, 2, 4 or 8) at which load_image has a JPEG of width x height decoded
    for SIZE `size`: Pillow's draft takes the largest that leaves both sides at least `size`."""
    most = min(width // size, height // size)
    return next((s for s in (8, 4, 2) if most >= s), 1)


def _draft_scale_graph(height, width, size):
    most = keras.ops.minimum(height // size, width // size)
    scale = keras.ops.where(most >= 8, 8, keras.ops.where(most >= 4, 4, keras.ops.where(
        most >= 2, 2, 1)))
    return keras.ops.cast(scale, "float32")


def _resize_weights(length, scale, size):
    """(size, length) weights: a box average of `scale` pixels (the last box holds what is
    left, as Pillow's reduce), then Pillow's bilinear filter from the ceil(length / scale)
    averaged pixels to `size`: output i is centred at (i + 0.5) * ratio, input j at j + 0.5,
    and weighs max(0, 1 - distance / max(ratio, 1)), each row normalised to sum to 1."""
    length = keras.ops.cast(length, "float32")
    reduced = keras.ops.ceil(length / scale)
    source = keras.ops.arange(0.0, length, dtype="float32")
    boxes = keras.ops.arange(0.0, reduced, dtype="float32")
    box = keras.ops.cast(keras.ops.floor(source[None, :] / scale) == boxes[:, None], "float32")
    box = box / keras.ops.sum(box, axis=1, keepdims=True)                  # (reduced, length)
    ratio = reduced / size
    centres = (keras.ops.arange(size, dtype="float32") + 0.5) * ratio
    distance = keras.ops.abs(boxes[None, :] + 0.5 - centres[:, None])
    weights = keras.ops.maximum(1.0 - distance / keras.ops.maximum(ratio, 1.0), 0.0)
    weights = weights / keras.ops.sum(weights, axis=1, keepdims=True)       # (size, reduced)
    return keras.ops.matmul(weights, box)


def _budget():
    side = int(MAX_PIXELS ** 0.5)
    return f"budget of {MAX_PIXELS / 1e6:.0f} MP ({side}x{side})"


def _to_rgb(img):
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit (or wider) grayscale: PIL's convert("L") clips at 255, so scale 0..65535 -> 0..255.
        wide = np.asarray(img, dtype=np.float32)
        img = Image.fromarray(np.clip(wide / 257.0, 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def try_load_image(path, size, preprocess=DEFAULT_PREPROCESS):
    """(array, "") on success, (zeros, reason) on any decoding failure: bad files never stop a
    run."""
    try:
        return load_image(path, size, preprocess), ""
    except ImageRefused as error:
        reason = str(error)
    except Exception as error:  # PIL raises many types for corrupt, truncated or foreign files
        reason = f"{type(error).__name__}: {error}".replace("\n", " ")
        if os.path.exists(path) and os.path.getsize(path) == 0:
            reason = "empty file (0 bytes)"
    return np.zeros((size, size, 3), np.float32), reason


# --------------------------------------------------------------------------------------------
# The input pipeline around the loader, the same on every Keras backend: threads decode in
# parallel (Pillow releases the GIL while it decodes and resizes), a bounded number of images
# ahead of the model, and batches come out in the order of `paths`.
# --------------------------------------------------------------------------------------------

def decode_threads():
    """Threads that decode images: one per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def image_batches(paths, size, batch_size, threads=None, preprocess=DEFAULT_PREPROCESS):
    """(images, reasons) batches in the order of `paths`: images is (n, size, size, 3) float32,
    and reasons[i] is "" when image i loaded, else why not (its image is zeros). Between one and
    two batches (at least two images per thread) are decoded ahead: memory stays bounded."""
    threads = threads or decode_threads()
    ahead = max(2 * batch_size, 2 * threads)
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        pending = deque()
        try:
            for path in paths:
                pending.append(pool.submit(try_load_image, path, size, preprocess))
                if len(pending) >= ahead:
                    yield _batch(pending, batch_size)
            while pending:
                yield _batch(pending, batch_size)
        finally:  # the consumer stopped early: drop the work not yet started
            for future in pending:
                future.cancel()


def _batch(pending, batch_size):
    images, reasons = zip(*[pending.popleft().result()
                            for _ in range(min(batch_size, len(pending)))])
    return np.stack(images), list(reasons)


class LabelledImages(keras.utils.PyDataset):
    """(images, labels) batches for Keras's fit, evaluate and predict, on any backend.

    Keras's own worker threads (`workers`) decode whole batches in parallel, in order, at most
    `max_queue_size` batches ahead. With `shuffle_seed`, every epoch visits the images in a new
    order, the same in every run. A file that fails to load is an error here: these files were
    all decoded once by extract, so a failure means DATA changed since: `changed` keeps the
    one-line error, which Keras may wrap in a framework error (see `one_line_on_change`)."""

    def __init__(self, paths, labels, size, batch_size, shuffle_seed=None, workers=None,
                 preprocess=DEFAULT_PREPROCESS):
        super().__init__(workers=workers or decode_threads(), max_queue_size=4)
        self.preprocess = preprocess
        self.paths, self.labels = np.asarray(paths, dtype=object), np.asarray(labels)
        self.size, self.batch_size, self.seed = size, batch_size, shuffle_seed
        self.epoch, self.changed = 0, None
        self.order = self._order()

    def _order(self):
        if self.seed is None:
            return np.arange(len(self.paths))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths))

    def __len__(self):
        return -(-len(self.paths) // self.batch_size)

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        loaded = []
        for path in self.paths[rows]:
            image, reason = try_load_image(path, self.size, self.preprocess)
            if reason:
                self.changed = UserError(f"{path} no longer decodes ({reason}): DATA changed "
                                         "since `make extract`; rerun it")
                raise self.changed
            loaded.append(image)
        return np.stack(loaded), self.labels[rows]

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self._order()


def labelled_dataset(paths, labels, size, batch_size, shuffle_seed=None,
                     preprocess=DEFAULT_PREPROCESS):
    """The (images, labels) batches that fine-tuning and evaluation read (LabelledImages)."""
    return LabelledImages(paths, labels, size, batch_size, shuffle_seed, preprocess=preprocess)


@contextmanager
def one_line_on_change(*datasets):
    """Under TensorFlow, Keras runs a PyDataset inside tf.data, which turns our error into a
    framework error with a long traceback: raise the dataset's own one line instead."""
    try:
        yield
    except Exception:
        for dataset in datasets:
            if getattr(dataset, "changed", None) is not None:
                raise dataset.changed from None
        raise
