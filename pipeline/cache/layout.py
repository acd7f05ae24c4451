"""The layout the cache writes, and the checks that a file on disk is in it.

A shared cache is untrusted: a file is used only in the layout this package writes, so that no
cache reads (or exports) bytes from outside features/<NAME>, and none declares more than its
bytes hold. Everything that decides "is this ours, and whole?" is here, used by the writer
(segments.inventory, master.previous_files...) and the reader (store.FeatureStore) alike:

- names: a segment is segments/<identity_id>/seg-*.h5 under features/<NAME>, reached through no
  link (`is_segment_name`, `own_file`, `entries`); folders are listed with os.scandir, never
  glob, as the `[` and `]` that a NAME may hold are ordinary characters;
- datasets: `own_dataset` refuses links, external storage and (but in a master) virtual
  datasets, which would all read another file's bytes;
- a segment (`segment_datasets`, `verified_shas`): plain, chunked, Fletcher-32 `features` and
  `sha256` of the identity's row shape and dtype, no more rows than its bytes hold, every chunk
  read through its checksum;
- a master (`open_master`, `check_master`): its datasets its own, its virtual ones reading only
  its segments' `features`, and the datasets of one entry a row agreeing on their length.

Anything else is damage: one of DAMAGE, which callers turn into a deletion (a segment, computed
again) or a one-line UserError naming `make extract`; `describe` says what is wrong in a few
words.
"""
import os

import h5py
import numpy as np

from ..config import UserError

MASTER = "features.h5"
STR = h5py.string_dtype("utf-8")
CHUNK_BYTES = 512 * 1024  # per checksummed chunk: under HDF5's 1 MiB chunk cache, so a chunk
                          # is read and verified once however the rows are sliced
VERIFY_ROWS = 1024        # rows of a segment read at a time to verify their checksums
DAMAGE = (OSError, KeyError, ValueError, RuntimeError)  # what h5py raises for a broken file
NOT_FINITE = "NaN or inf among its features"  # what is wrong with a segment extract never wrote
VIEW_DATASETS = ("view_features", "view_sha256", "view_index")  # AUGMENT=K's views (extract)
CUT_DATASETS = ("cut_features", *(f"cut_{name}" for name in VIEW_DATASETS))  # FINETUNE_FROM=cache
FEATURE_DATASETS = ("features", "view_features", "cut_features", "cut_view_features")  # read
                                                                   # on demand, never whole
# Datasets of a master that hold one entry per row of the same thing: their lengths must agree.
SAME_ROWS = (("label", "sha256", "split", "path", "file_size", "file_mtime_ns", "features",
              "cut_features"),
             VIEW_DATASETS, tuple(f"cut_{name}" for name in VIEW_DATASETS),
             ("unreadable_sha256", "unreadable_reason"))


# --------------------------------------------------------------------------------------------
# Names and folders
# --------------------------------------------------------------------------------------------

def segment_dir(features_dir, identity_id):
    return os.path.join(features_dir, "segments", identity_id)


def segment_paths(features_dir, identity_id):
    """This identity's complete segment files, oldest first. The exact folder is listed."""
    folder = segment_dir(features_dir, identity_id)
    names = (e.name for e in entries(folder)
             if is_segment(e.name) and e.is_file(follow_symlinks=False))
    return [os.path.join(folder, name) for name in sorted(names)]


def is_segment(name):
    return name.startswith("seg-") and name.endswith(".h5")


def is_segment_name(name):
    """Whether `name` (a virtual source's file, an entry of the master's `segments`) is a path
    as write_master records it: segments/<identity_id>/seg-*.h5, relative to features/<NAME>,
    so neither absolute nor with a `..` that would lead out of it."""
    parts = name.split("/")
    return (len(parts) == 3 and parts[0] == "segments" and is_segment(parts[2])
            and parts[1] not in ("", ".", "..") and "\\" not in name and "%" not in name)


def own_file(features_dir, name):
    """ValueError unless features_dir/<name> is a regular file reached through no link: a
    link there would have HDF5 read a file outside the cache."""
    path = features_dir
    for part in name.split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise ValueError(f"{os.path.relpath(path, features_dir)} is a link")
    if not os.path.isfile(path):
        raise ValueError("not a regular file")


def entries(folder):
    """The entries of one of the cache's own folders. A link there could lead the deletions
    of `remove_strays`, `inventory` and `remove_unreferenced` out of features/<NAME>."""
    if os.path.islink(folder):
        raise UserError(f"{folder} is a link: the cache's segment folders must be its own; "
                        "move the folder there instead")
    try:
        with os.scandir(folder) as found:
            return list(found)
    except (FileNotFoundError, NotADirectoryError):
        return []


# --------------------------------------------------------------------------------------------
# Datasets as this package writes them
# --------------------------------------------------------------------------------------------

def chunks(n, shape, dtype):
    """Chunks of CHUNK_BYTES at most, whole rows each, for n rows of `shape` and `dtype`."""
    row = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return (max(1, min(n, CHUNK_BYTES // max(row, 1))), *shape)


def checksummed(f, name, data):
    if len(data):  # HDF5 cannot chunk (so cannot checksum) an empty dataset
        f.create_dataset(name, data=data, chunks=True, fletcher32=True)
    else:
        f.create_dataset(name, data=data)


def own_dataset(f, name, virtual=False):
    """f[name], a dataset stored in `f` itself, or ValueError: not a link (an ExternalLink reads
    another file), no external raw storage, and not virtual unless `virtual` (both read other
    files' bytes; a master's virtual datasets are checked by `check_master`)."""
    link = f.get(name, getlink=True)
    if link is None:
        raise ValueError(f"no {name} dataset")
    if not isinstance(link, h5py.HardLink):
        raise ValueError(f"{name} is a link ({type(link).__name__})")
    data = f[name]
    if not isinstance(data, h5py.Dataset):
        raise ValueError(f"{name} is not a dataset")
    if data.is_virtual and not virtual:
        raise ValueError(f"{name} is a virtual dataset")
    if data.external:
        raise ValueError(f"{name} is stored in another file")
    return data


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------

def verified_shas(path, shape=None, dtype=None):
    """A segment's sha256 column, after checking its layout (segment_datasets) and reading
    every chunk of it through its checksum. A value that is not finite (NaN, inf) is damage
    too: extract never writes one (featurize.check_finite), and a file rewritten through HDF5
    carries valid checksums over whatever it was given."""
    with h5py.File(path, "r") as f:
        features, shas = segment_datasets(f, path, shape, dtype)
        shas = shas[:]  # bytes: index.SegmentIndex keeps them so
        step = features.chunks[0] * max(1, VERIFY_ROWS // features.chunks[0])
        buffer = np.empty((min(step, len(features)), *features.shape[1:]), features.dtype)
        for start in range(0, len(features), step):
            stop = min(start + step, len(features))
            features.read_direct(buffer, np.s_[start:stop], np.s_[:stop - start])
            if not np.isfinite(buffer[:stop - start]).all():
                raise ValueError(NOT_FINITE)
    return shas


def segment_datasets(f, path, shape=None, dtype=None):
    """(features, sha256) of an open segment, without reading their data; ValueError (damage)
    unless they are laid out as segments.write_segment writes them: plain datasets of the file's
    own, chunked with Fletcher-32 and nothing else (a checksum-less segment, from before
    checksums or not ours, cannot be verified), S64 hashes, float32 or float16 rows of `shape`
    and `dtype` when given, and no more rows than the file's bytes hold (a reader allocates what
    a dataset declares: 2^36 hashes asked for 4 TiB)."""
    features, shas = own_dataset(f, "features"), own_dataset(f, "sha256")
    for name, data in (("features", features), ("sha256", shas)):
        if data.chunks is None or not data.fletcher32:
            raise ValueError(f"{name} has no checksums")
        if data.compression or data.shuffle or data.scaleoffset is not None:
            raise ValueError(f"{name} is compressed")  # its size would tell nothing
    if shas.ndim != 1 or shas.dtype != np.dtype("S64"):
        raise ValueError(f"sha256 is {shas.dtype} {shas.shape}, not 64-byte hashes")
    if (features.ndim != 4 or features.dtype not in (np.float32, np.float16)
            or shape is not None and features.shape[1:] != tuple(shape)
            or dtype is not None and features.dtype != np.dtype(dtype)):
        wanted = f", not {np.dtype(dtype)} {tuple(shape)}" if shape is not None else ""
        raise ValueError(f"rows of {features.dtype} {features.shape[1:]}{wanted}")
    if len(features) != len(shas):
        raise ValueError(f"{len(features)} feature rows for {len(shas)} hashes")
    size = os.path.getsize(path)
    if features.nbytes + shas.nbytes > size:  # uncompressed: every row is in the file
        raise ValueError(f"declares {len(shas)} rows, more than its {size} bytes hold")
    return features, shas


# --------------------------------------------------------------------------------------------
# The master
# --------------------------------------------------------------------------------------------

def no_cache(features_dir):
    """The UserError for a stage that needs features/<NAME>/features.h5 where there is none."""
    name = os.path.basename(os.path.normpath(features_dir))
    return UserError(f"no feature cache at {os.path.join(features_dir, MASTER)}: run `make "
                     f"extract DATA=<folder> NAME={name}` first (a stage reads the cache of "
                     "NAME, or of DATA's folder name)")


def open_master(path):
    """features.h5 open for reading, after `check_master`; DAMAGE when it is not a master this
    package could have written."""
    f = h5py.File(path, "r")
    try:
        check_master(f, os.path.getsize(path))
    except BaseException:
        f.close()
        raise
    return f


def check_master(f, size):
    """ValueError unless every dataset of master `f` is its own (`own_dataset`, but virtual
    ones may be), every virtual one reads only the `features` of segment files of
    features/<NAME> (`is_segment_name`), every other one declares no more entries than the
    file's `size` bytes hold, and the datasets of one entry a row (SAME_ROWS) agree on their
    length. Metadata only, no data read: a master declaring 2^40 labels kept export looping
    for minutes."""
    lengths = {}
    for name in f:
        item = own_dataset(f, name, virtual=True)
        if item.is_virtual:
            for source in item.virtual_sources():
                if not is_segment_name(source.file_name):
                    raise ValueError(f"{name} reads {source.file_name[:100]!r}, not a segment "
                                     "of its own folder")
                if source.dset_name != "features":  # the one dataset a segment's check covers
                    raise ValueError(f"{name} reads {source.dset_name[:100]!r} of a segment, "
                                     "not its features")
        elif item.size * max(item.dtype.itemsize, 1) > size:  # a string's pointer is >= 8 bytes
            raise ValueError(f"{name} declares {item.size} entries, more than the file's {size} "
                             "bytes hold")
        lengths[name] = len(item) if item.shape else None
    for group in SAME_ROWS:
        found = {lengths[name] for name in group if name in lengths}
        if len(found) > 1:
            raise ValueError(f"{', '.join(n for n in group if n in lengths)} differ in length")


def describe(error):
    """What is wrong with a file, in a few words, from h5py's error."""
    text = str(error)
    for clue, words in (("filter returned failure", "checksum mismatch"),
                        ("truncated file", "truncated"),
                        ("file signature not found", "zeroed or not an HDF5 file")):
        if clue in text:
            return words
    return text.splitlines()[0][:200] if text else type(error).__name__
