"""Datasets: the image files in a DATA folder, their classes, and the split of each.

    DATA/<class>/<images>                         layout "folders": splits by content hash
    DATA/{train,validation,test}/<class>/<images>  layout "splits" (val works too)
    DATA/<images> + LABELS=<csv>                   layout "csv" (labels.py matches the rows)

`walk_files` is the one directory walk of the project: discovery, LABELS datasets and predict
all go through it, so every stage reads, skips and refuses the same files. Turning a file into
model input is images.load_image's job, not this module's.
"""
import os
import stat
from dataclasses import dataclass

from ..config import UserError
from ..fs import artifacts, escape, files
from ..fs.files import file_kind  # noqa: F401 (read from here too: predict)
from . import labels

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
SPLITS = ("train", "validation", "test")
SPLIT_FOLDERS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}

SKIPPED = "skipped.csv"  # files not used, and why (features/<NAME>/)
CONFLICTS = "label_conflicts.csv"  # files whose content is also filed under another class

# The reasons the directory walk gives (written to skipped.csv / predictions_skipped.csv).
NOT_AN_IMAGE = "not an image (extension and content)"
LINK_TO_FOLDER = "link to a folder: not followed; link the files themselves"
BROKEN_LINK = "broken link: its target does not exist"
NOT_UTF8_FILE = "file name is not valid UTF-8: rename it"
NOT_UTF8_FOLDER = "folder name is not valid UTF-8: rename it"



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
MAGIC_BYTES = min(len(magic) for magic, _ in _MAGIC)  # no image file is shorter


def sniff_format(path):
    """The image format named by a file's first bytes, or None (also for anything but a regular
    file, which is never opened).

    Files are found by content, not only by extension, so a file without one is opened, and
    IMAGES=/ walks /proc: only what stat says is a regular file holding bytes is opened (the
    files of /proc report a size of 0, and a read of /proc/kmsg blocks), without blocking and
    checked again once open (a FIFO put in its place after the stat would block the read)."""
    if not_regular_reason(path):
        return None
    try:
        if os.stat(path).st_size < MAGIC_BYTES:
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < MAGIC_BYTES:
            return None
        head = os.read(fd, 12)
    except OSError:
        return None
    finally:
        os.close(fd)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)


def is_image_candidate(path):
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS or sniff_format(path) is not None


@dataclass(slots=True)  # no __dict__: a million of them are held through extract
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
    """Layout (b) without a test folder: half of validation, chosen by content hash, becomes
    test."""
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
        return _discover_csv(data, labels_csv, label_columns)
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
            # names, not DirEntry objects: with its cached stat, an entry costs about 600 bytes,
            # 300 MB for a folder of half a million images
            names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
        except OSError as error:
            yield printable(prefix or folder), f"folder cannot be read ({error.strerror})"
            continue
        subfolders = []
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.join(prefix, name).replace(os.sep, "/")
            try:
                mode = os.lstat(path).st_mode
            except OSError as error:
                yield printable(rel), f"cannot be read ({error.strerror})"
                continue
            if stat.S_ISDIR(mode):
                if is_utf8(name):
                    subfolders.append((path, rel))
                else:
                    yield printable(rel), NOT_UTF8_FOLDER
                continue
            if not is_utf8(name):
                yield printable(rel), NOT_UTF8_FILE
                continue
            if stat.S_ISLNK(mode):
                try:
                    mode = os.stat(path).st_mode
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
                yield rel, (None if is_image_candidate(path) else NOT_AN_IMAGE)
        pending.extend(reversed(subfolders))


def _check_classes(data, class_names, counts):
    if len(class_names) < 2:
        raise UserError(f"{data} has {len(class_names)} class folder(s) {class_names}: put each "
                        "class's images in its own subfolder, DATA/<class>/<image>, at least two "
                        "classes")
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


def _discover_csv(data, labels_csv, label_columns):
    """A flat folder of images labelled by a CSV (labels.py matches rows to files)."""
    csv_path = labels.resolve_labels_path(data, labels_csv)
    inside = os.path.relpath(os.path.abspath(csv_path), os.path.abspath(data)).replace(os.sep, "/")
    candidates, skipped = [], []
    for rel, reason in walk_files(data):
        if rel == inside:
            continue  # the labels CSV itself, when it lives in DATA, is neither image nor skipped
        if reason:
            skipped.append((rel, reason))
        else:
            candidates.append(rel)
    labelled, unmatched = labels.label_files(csv_path, label_columns, candidates)
    class_names = sorted(set(labelled.values()))
    if len(class_names) < 2:
        raise UserError(f"{csv_path} labels {len(labelled)} image(s) of {data} with "
                        f"{len(class_names)} class(es) {class_names}: at least two classes need "
                        "images; check that its file names match the files in DATA")
    index = {c: i for i, c in enumerate(class_names)}
    found = [ImageFile(p, index[label]) for p, label in sorted(labelled.items())]
    return Dataset(data, "csv", class_names, found, skipped + unmatched)


def write_side_files(features_dir, skipped, conflicts):
    """features/<NAME>/skipped.csv (one row per file that was not used, and why) and
    label_conflicts.csv (one row per file whose content is also filed under another class:
    sha256, class, path; no file when there is none), written whole and then renamed together.
    People open them in spreadsheets, so every cell is neutralised (escape.csv_writer).
    Returns {file name: sha256 of what was written, or None for no file}: the master records
    it, and readers take a list only when it matches (cache.side_file)."""
    tables = {SKIPPED: (["path", "reason"], sorted(skipped)),
              CONFLICTS: (["sha256", "class", "path"], sorted(conflicts))}
    written = {name: table for name, table in tables.items() if name == SKIPPED or table[1]}
    paths = {name: os.path.join(features_dir, name) for name in written}
    with files.replacing_together(paths.values()) as temporary:
        for name, (header, rows) in written.items():
            with open(temporary[paths[name]], "x", newline="", encoding="utf-8") as f:
                writer = escape.csv_writer(f)
                writer.writerow(header)
                writer.writerows(rows)
    digests = {name: artifacts.file_sha256(path) for name, path in paths.items()}
    for name in set(tables) - set(written):
        files.remove_file(os.path.join(features_dir, name))
    return {name: digests.get(name) for name in tables}
