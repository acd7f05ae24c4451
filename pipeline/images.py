"""Images: finding them in a dataset folder, assigning splits, and turning one file into model input.

`load_image` is the only function in the project that turns an image file into a tensor. Every stage
(extract, finetune, evaluate, predict) goes through it, directly or through the tf.data pipelines
below, so training and prediction can never disagree about decoding, orientation, size or scaling.
"""
import csv
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from keras.applications import vgg16
from PIL import Image, ImageOps

from .config import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
SPLITS = ("train", "validation", "test")
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}

# Part of the cache identity: change it whenever load_image would produce different numbers.
PREPROCESS_ID = "pil:draft+exif+rgb(white-bg,16bit/257)+bilinear|keras.vgg16.preprocess_input(caffe)|v1"

# The most pixels load_image decodes for one image (after a JPEG's DCT scaling, see load_image):
# 8192 x 8192. Photos fit: 60-megapixel cameras exist (9504 x 6336 = 60.2 MP), and their JPEGs are
# decoded at a reduced scale anyway. The cost is well above the pixels: an RGBA image this size is
# 256 MB decoded, and decoding, EXIF transposition and compositing on white hold about six such
# copies at once (extract peaked 1.5 GB above its baseline on an 8192 x 8192 RGBA PNG), while
# tf.data decodes several images in parallel. A 13000 x 13000 PNG of 657 KB cost 3.9 GB before
# this budget. Refusing from the header is the only cheap defence: the file's size says nothing.
MAX_PIXELS = 8192 * 8192

# Pillow warns from 89 MP and refuses from 179 MP (Image.MAX_IMAGE_PIXELS, kept as it is). Its
# warning would fire for every image that load_image then refuses with a reason of its own, and for
# every big JPEG that the DCT scaling decodes cheaply: noise either way, once per image size.
# Module-wide, because warnings.catch_warnings is not thread-safe and tf.data decodes in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# The reasons the directory walk gives (written to skipped.csv / predictions_skipped.csv).
NOT_AN_IMAGE = "not an image (extension and content)"
LINK_TO_FOLDER = "link to a folder: not followed; link the files themselves"
BROKEN_LINK = "broken link: its target does not exist"
NOT_UTF8_FILE = "file name is not valid UTF-8: rename it"
NOT_UTF8_FOLDER = "folder name is not valid UTF-8: rename it"


class ImageRefused(ValueError):
    """A file load_image will not decode; its message is the whole reason shown to the user."""


def is_utf8(name):
    """False for a name whose bytes are not UTF-8: Python hands those over with surrogate escapes,
    which h5py, TensorFlow and CSV writers refuse to encode (a crash in the middle of a run)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name):
    """A name that any file or terminal can hold: undecodable bytes become \\xNN (caf\\xe9.jpg), so
    the user can still tell which file is meant."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def file_kind(mode):
    """What a non-regular entry is, for reasons like "not a regular file (FIFO)"."""
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
             (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))
    return next((kind for test, kind in kinds if test(mode)), "special file")


def not_regular_reason(path):
    """None for a regular file (or a link to one); otherwise why it must not be opened. Decided by
    stat alone: opening a FIFO blocks until someone writes to it (extract hung forever), and
    opening a device can have effects of its own."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return BROKEN_LINK if os.path.islink(path) else "file not found"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    return None if stat.S_ISREG(mode) else f"not a regular file ({file_kind(mode)})"


# The first bytes of each format we read, so a photo saved without (or with a wrong) extension is
# still found, and a text file named .jpg is reported instead of crashing a decoder.
_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"),
          (b"GIF89a", "gif"), (b"BM", "bmp"))


def sniff_format(path):
    """The image format named by a file's first bytes, or None (also for anything but a regular
    file, which is never opened)."""
    if not_regular_reason(path):
        return None
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def is_image_candidate(path):
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS or sniff_format(path) is not None


# --------------------------------------------------------------------------------------------
# The one loader
# --------------------------------------------------------------------------------------------

def load_image(path, size):
    """Decode `path` and return a (size, size, 3) float32 array ready for VGG16.

    1. decode (a JPEG is decoded directly at 1/2, 1/4 or 1/8 scale when that is still >= size:
       libjpeg's DCT scaling, several times faster than a full decode followed by a resize);
    2. convert to RGB: grayscale, palette, RGBA/LA (composited on white), CMYK, 16-bit, and the
       first frame of an animation;
    3. apply the EXIF orientation;
    4. resize to size x size (bilinear, antialiased);
    5. keras.applications.vgg16.preprocess_input (RGB->BGR, ImageNet mean subtracted).
    Raises on a file that cannot be decoded; `try_load_image` turns that into a reason. Raises
    ImageRefused, before reading any pixel, for anything but a regular file and for an image over
    MAX_PIXELS once the JPEG scaling is applied.
    """
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
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        img = img.resize((size, size), Image.BILINEAR)
        array = np.asarray(img, dtype=np.float32)
    return vgg16.preprocess_input(array)


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


def try_load_image(path, size):
    """(array, "") on success, (zeros, reason) on any decoding failure: bad files never stop a run."""
    try:
        return load_image(path, size), ""
    except ImageRefused as error:
        reason = str(error)
    except Exception as error:  # PIL raises many types for corrupt, truncated or foreign files
        reason = f"{type(error).__name__}: {error}".replace("\n", " ")
        if os.path.exists(path) and os.path.getsize(path) == 0:
            reason = "empty file (0 bytes)"
    return np.zeros((size, size, 3), np.float32), reason


# --------------------------------------------------------------------------------------------
# tf.data pipelines around the loader: decoding runs in parallel and ahead of the model
# --------------------------------------------------------------------------------------------

def _load_op(paths, size):
    def load(path):
        return try_load_image(path.decode(), size)

    def tf_load(path):
        image, reason = tf.numpy_function(load, [path], (tf.float32, tf.string), stateful=False)
        image.set_shape((size, size, 3))
        reason.set_shape(())
        return image, reason

    ds = tf.data.Dataset.from_tensor_slices(np.asarray(paths, dtype=object).astype(str))
    return ds.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def image_batches(paths, size, batch_size):
    """Batches of (images, reasons) in the order of `paths`; reason "" means the image loaded."""
    return _load_op(paths, size).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def labelled_dataset(paths, labels, size, batch_size, augment=None, shuffle_seed=None):
    """Batches of (images, labels) for training and evaluation. A file that fails to load is an
    error here: these files were all decoded once by extract, so a failure means DATA changed."""
    def check(image, reason):
        tf.debugging.assert_equal(tf.strings.length(reason), 0,
                                  message="an image that extract read can no longer be decoded")
        return image

    images = _load_op(paths, size).map(check)
    ds = tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(np.asarray(labels))))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:  # augmentation runs on whole batches, in the input pipeline,
        # one batch at a time: its seeded random layers draw from one generator state, so batches
        # mapped in parallel would take their draws in a racy order and no two runs would agree.
        ds = ds.map(lambda x, y: (augment(x, training=True), y))
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------
# Dataset discovery and splits
# --------------------------------------------------------------------------------------------

@dataclass
class ImageFile:
    path: str             # relative to the dataset root, with "/" separators
    label: int
    split: str = ""       # "" = decided later from the content hash (layout a, CSV labels)


@dataclass
class Dataset:
    root: str
    layout: str           # "folders" (a), "splits" (b) or "csv"
    class_names: list
    files: list           # ImageFile, sorted by path
    skipped: list         # (path, reason) for files that are not images or have no label

    @property
    def has_test_folder(self):
        return any(f.split == "test" for f in self.files)


def split_for(sha256_hex, fractions):
    """train / validation / test from the content hash: the same image always lands in the same
    split, and adding images never moves old ones."""
    u = int(sha256_hex[:8], 16) / 2**32
    train, validation, _ = fractions
    return "train" if u < train else "validation" if u < train + validation else "test"


def carve_test(sha256_hex):
    """Layout (b) without a test folder: half of validation, chosen by content hash, becomes test."""
    return "test" if int(sha256_hex[8:16], 16) % 2 else "validation"


def assign_split(dataset, image_file, sha256_hex, fractions):
    """The split of one image, once its content hash is known."""
    if not image_file.split:
        return split_for(sha256_hex, fractions)
    if image_file.split == "validation" and not dataset.has_test_folder:
        return carve_test(sha256_hex)
    return image_file.split


def discover(data, labels_csv="", label_columns="filename,label"):
    """Find the classes and images under `data`. Raises UserError for a dataset that cannot work."""
    check_data_folder(data)
    if labels_csv:
        from .labels import discover_csv  # CSV-labelled flat folders (make batch, issue 6)
        return discover_csv(data, labels_csv, label_columns)
    subdirs = _subdirs(data)
    split_dirs = {d: SPLIT_FOLDERS[d.lower()] for d in subdirs if d.lower() in SPLIT_FOLDERS}
    if "train" in split_dirs.values():
        return _discover_splits(data, split_dirs)
    return _discover_folders(data, subdirs)


def check_data_folder(data):
    """DATA must be an existing folder (or a link to one) whose name can be written down."""
    what = "pass DATA=<folder with one subfolder of images per class> (DATA/<class>/<image>)"
    try:
        mode = os.stat(data).st_mode if data else None
    except OSError:
        mode = None
    if mode is None:
        raise UserError(f"DATA folder {data!r} does not exist: {what}, or run `make demo-data` "
                        "for the demo")
    if not stat.S_ISDIR(mode):
        kind = "file" if stat.S_ISREG(mode) else file_kind(mode)
        raise UserError(f"DATA={printable(data)} is a {kind}, not a folder: {what}; a flat "
                        "folder of images also needs LABELS=<csv>")
    if not is_utf8(data):
        raise UserError(f"DATA={printable(data)}: the folder's name is not valid UTF-8: rename it")


def _subdirs(folder):
    """The class (or split) folders of `folder`: links to folders count, as DATA itself may be
    one; everything below them is walked by walk_files, which follows no folder link."""
    names = sorted(d for d in os.listdir(folder)
                   if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
    for name in names:
        if not is_utf8(name):  # a class name is stored in features.h5 and printed everywhere
            raise UserError(f"class folder '{printable(os.path.join(folder, name))}': "
                            f"{NOT_UTF8_FOLDER}")
    return names


def walk_files(folder, rel_prefix=""):
    """Yield (path, reason or None) for every entry below `folder`, recursively: reason None for
    an image to read, otherwise why the entry is not read. Paths are rel_prefix joined with the
    path below `folder`, with "/" separators. The one directory walk of the project (discovery,
    LABELS datasets, predict), so every stage refuses the same things:

    * only regular files are read; FIFOs, sockets and devices are reported without being
      opened (opening a FIFO blocks forever);
    * a link to a regular file is followed (a common way to assemble a dataset without copying);
    * a link to a folder is reported, not followed: that is how a loop (cats/loop -> .) turned
      24 images into 504 rows, and how a walk left DATA. `folder` itself may be a link;
    * broken links and names that are not UTF-8 are reported (the name, printable());
    * names starting with "." are ignored silently (.DS_Store, .git).
    Within a folder, its files come first, then its subfolders, each sorted by name.
    """
    # An explicit stack, not recursion: a hostile tree a thousand folders deep must not end in a
    # RecursionError. Popping the first subfolder next keeps os.walk's top-down order.
    pending = [(folder, rel_prefix)]
    while pending:
        folder, prefix = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted((e for e in listing if not e.name.startswith(".")),
                                 key=lambda e: e.name)
        except OSError as error:
            yield printable(prefix or folder), f"folder cannot be read ({error.strerror})"
            continue
        subfolders = []
        for entry in entries:
            rel = os.path.join(prefix, entry.name).replace(os.sep, "/")
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as error:
                yield printable(rel), f"cannot be read ({error.strerror})"
                continue
            if stat.S_ISDIR(mode):
                if is_utf8(entry.name):
                    subfolders.append((entry.path, rel))
                else:
                    yield printable(rel), NOT_UTF8_FOLDER
                continue
            if not is_utf8(entry.name):
                yield printable(rel), NOT_UTF8_FILE
                continue
            if stat.S_ISLNK(mode):
                try:
                    mode = os.stat(entry.path).st_mode
                except FileNotFoundError:
                    yield rel, BROKEN_LINK
                    continue
                except OSError as error:  # e.g. a link to itself
                    yield rel, f"link cannot be followed ({error.strerror})"
                    continue
                if stat.S_ISDIR(mode):
                    yield rel, LINK_TO_FOLDER
                    continue
            if not stat.S_ISREG(mode):
                yield rel, f"not a regular file ({file_kind(mode)})"
            else:
                yield rel, (None if is_image_candidate(entry.path) else NOT_AN_IMAGE)
        pending.extend(reversed(subfolders))


def _check_classes(data, class_names, counts):
    if len(class_names) < 2:
        raise UserError(f"{data} has {len(class_names)} class folder(s) {class_names}: put each "
                        "class's images in its own subfolder, DATA/<class>/<image>, at least two classes")
    empty = [c for c in class_names if counts.get(c, 0) == 0]
    if empty:
        raise UserError(f"class folder {os.path.join(data, empty[0])!r} has no images: add images "
                        "or remove the folder")


def _discover_folders(data, class_names):
    files, skipped, counts = [], [], {}
    for label, class_name in enumerate(class_names):
        for rel, reason in walk_files(os.path.join(data, class_name), class_name):
            if reason:
                skipped.append((rel, reason))
            else:
                files.append(ImageFile(rel, label))
                counts[class_name] = counts.get(class_name, 0) + 1
    _check_classes(data, class_names, counts)
    return Dataset(data, "folders", class_names, files, skipped)


def _discover_splits(data, split_dirs):
    class_names = sorted({c for d in split_dirs for c in _subdirs(os.path.join(data, d))})
    files, skipped, counts = [], [], {}
    for folder, split in sorted(split_dirs.items()):
        for class_name in _subdirs(os.path.join(data, folder)):
            label = class_names.index(class_name)
            for rel, reason in walk_files(os.path.join(data, folder, class_name),
                                          f"{folder}/{class_name}"):
                if reason:
                    skipped.append((rel, reason))
                else:
                    files.append(ImageFile(rel, label, split))
                    counts[class_name] = counts.get(class_name, 0) + 1
    _check_classes(data, class_names, counts)
    return Dataset(data, "splits", class_names, sorted(files, key=lambda f: f.path), skipped)


def write_skipped_csv(path, skipped):
    """features/<NAME>/skipped.csv: one row per file that was not used, and why."""
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(sorted(skipped))
    os.replace(path + ".tmp", path)
