"""The feature cache on disk. This is the only module that touches h5py.

    features/<NAME>/
        features.h5                  the file users open: row index + a virtual `features` dataset
        segments/<identity_id>/      immutable segment files, one folder per feature identity
            seg-<time>-<random>.h5   features (n, h, w, 512) float32 (or float16) and sha256 (n,)
        skipped.csv, .lock (lock.py)

Crash safety comes from never modifying a file in place: every segment and master is built in
memory and written whole by files.atomic_write (temporary file, fsync, rename; an export streams
into its temporary file), so a kill -9 leaves at worst a stray temporary file and segments that
no master points to yet; the next run picks those segments up, so only the batch in flight is
lost. A full disk is one line (files.NoSpace).

Damage is detected, not trusted: segments store `features` and `sha256` in chunks checksummed by
HDF5's Fletcher-32 filter, which fails the read of a chunk whose bytes changed, also through the
master's virtual dataset. Every extract reads every segment through its checksums (`inventory`)
and deletes a damaged one, so its images are computed again.

A shared cache is untrusted: a file is used only in the layout this module writes, so that no
cache reads (or exports) bytes from outside features/<NAME>, and none declares more than its
bytes hold. A segment's `features` and `sha256` are plain, chunked, Fletcher-32 datasets of its
own (no external storage, no virtual dataset, no link to another file), of the identity's row
shape and dtype; anything else is damage, deleted and computed again. So are segments from
before checksums: nothing in them can be verified. A master's virtual datasets read only
segments/<identity_id>/seg-*.h5 files of its own folder, and its datasets are its own.

Paths are built from NAME and listed with os.scandir, never glob: the `[` and `]` that a NAME
may hold are ordinary characters.
"""
import hashlib
import io
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass

import h5py
import numpy as np

from . import files
from .config import MAX_SIZE, MIN_SIZE, UserError
from .index import Previous, Rows, SegmentIndex, runs

MASTER = "features.h5"
STR = h5py.string_dtype("utf-8")
COMPACT_BELOW = 4096      # segments with fewer rows are merged, this many rows to a segment,
GROUP_BYTES = 128 * 2**20  # and at most this many bytes (4096 rows at SIZE=150): one merged
                           # segment is built in memory, so SIZE=1024's 2 MiB rows need fewer
READ_BLOCK = 1024         # rows per contiguous read from the virtual dataset
WRITE_ROWS = 65536        # rows of the master's index written (or checked) at a time
READ_GAP = 16             # unwanted rows a read may span rather than start another
SHUFFLE_ROWS = 32         # rows that stay together when blocks() shuffles: one read each
MAX_OPEN_SEGMENTS = 64    # segment files a FeatureStore keeps open at most (see _touch)
CHUNK_BYTES = 512 * 1024  # per checksummed chunk: under HDF5's 1 MiB chunk cache, so a chunk
                          # is read and verified once however the rows are sliced
DAMAGE = (OSError, KeyError, ValueError, RuntimeError)  # what h5py raises for a broken file
VIEW_DATASETS = ("view_features", "view_sha256", "view_index")  # AUGMENT=K's views (extract)
CUT_DATASETS = ("cut_features", *(f"cut_{name}" for name in VIEW_DATASETS))  # FINETUNE_FROM=cache
FEATURE_DATASETS = ("features", "view_features", "cut_features", "cut_view_features")  # read
                                                                   # on demand, never whole


# --------------------------------------------------------------------------------------------
# Writing (extract)
# --------------------------------------------------------------------------------------------

def remove_strays(folder):
    """Delete the temporary files a killed run left: only the names this module writes (a master,
    a segment or skipped.csv in the making), only in features/<NAME> and its segment folders.
    Call it only while holding extract's lock (lock.exclusive), when no other run can be writing
    them."""
    folders = [folder] + [e.path for e in _entries(os.path.join(folder, "segments"))
                          if e.is_dir(follow_symlinks=False)]
    for where in folders:
        for entry in _entries(where):
            # atomic_write's `.<name>.<hex>.tmp`, or `<name>.tmp` of versions before it
            original = files.original_name(entry.name) or (
                entry.name[:-len(".tmp")] if entry.name.endswith(".h5.tmp") else None)
            if (original and (original in (MASTER, "skipped.csv") or _is_segment(original))
                    and entry.is_file(follow_symlinks=False)):
                os.remove(entry.path)


def segment_dir(features_dir, identity_id):
    return os.path.join(features_dir, "segments", identity_id)


def inventory(features_dir, identity_id, shape=None, dtype=None):
    """sha256 -> (segment path relative to features_dir, row, rows in that segment) for every
    complete segment of this identity, as an index.SegmentIndex (numpy columns, not a dict: a
    million rows). A later segment wins when two hold the same image.

    Every segment is read through its checksums. A damaged one (changed bytes, truncated, zeroed,
    unreadable), or one not laid out as _write_segment writes it, with rows of another `shape`
    or `dtype` than the identity's (when given) among them, is named, deleted (it is in our
    folder, and useless), and its images are left out of the inventory so that extract computes
    them again."""
    found = SegmentIndex()
    for path in _segment_paths(features_dir, identity_id):
        try:
            shas = _verified_shas(path, shape, dtype)
        except DAMAGE as error:
            if getattr(error, "errno", None) is not None:  # the OS refused (EACCES, EIO...):
                raise UserError(f"{path} cannot be read ({os.strerror(error.errno)}): fix its "
                                "permissions or the disk, then run the same command again") \
                    from None  # not damage: a healthy segment must not be deleted for it
            print(f"{path} is damaged ({_damage(error)}): deleted; its images will be computed "
                  "again")
            os.remove(path)
            continue
        found.add_segment(os.path.relpath(path, features_dir), shas)
    found.fold()
    return found


def write_segment(features_dir, identity_id, shas, features):
    """Write one immutable segment atomically and return its path relative to features_dir.
    `features` is float32, or float16 for STORAGE=float16: one dtype per identity's folder."""
    features = np.asarray(features)
    if features.dtype not in (np.float32, np.float16):
        raise TypeError(f"features must be float32 or float16, not {features.dtype}")

    def fill(dataset):
        dataset[...] = features
    return _write_segment(features_dir, identity_id, shas, features.shape[1:], features.dtype,
                          fill)


def _write_segment(features_dir, identity_id, shas, shape, dtype, fill):
    """Build a segment of len(shas) rows in memory, `fill(features dataset)` writing its rows,
    then write it whole. Returns its path relative to features_dir."""
    folder = segment_dir(features_dir, identity_id)
    os.makedirs(folder, exist_ok=True)
    # The time orders segments (a later one wins, `inventory`); 64 random bits, not the pid,
    # keep names unique across hosts and containers (whose pids repeat) sharing a disk, as the
    # workers of a distributed extraction will.
    final = os.path.join(folder, f"seg-{time.time_ns():020d}-{secrets.token_hex(8)}.h5")
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        features = f.create_dataset("features", (len(shas), *shape), dtype, fletcher32=True,
                                    chunks=_chunks(len(shas), shape, dtype))
        fill(features)  # float32 or float16 (STORAGE), as given
        # fixed length, as HDF5 checksums only the pointers of variable-length strings
        f.create_dataset("sha256", data=np.array(shas, "S64"), chunks=True, fletcher32=True)
    files.atomic_write(final, image.getbuffer())
    return os.path.relpath(final, features_dir)


def compact(features_dir, identity_id, known):
    """Merge the small segments of `known` (a SegmentIndex of the rows to keep), so the virtual
    dataset spans few files. Returns `known`, updated in place.

    One pass over the columns, then groups of COMPACT_BELOW rows (fewer when that would exceed
    GROUP_BYTES), each built in memory and written before the next is read: memory and extra
    disk stay at one group, 128 MB at most. A group's sources that the
    features.h5 on disk does not use are deleted as soon as the group is written, so compaction
    fits in the space it frees; the sources that master uses go once the new master is written
    (remove_unreferenced). A crash in between leaves rows in two segments, and the inventory's
    "later segment wins" picks the merged one. Out of space, the rest stay as they are."""
    if not len(known):
        return known
    target = _rows_per_segment(os.path.join(features_dir, known.segments[known.segment[0]]))
    small = np.flatnonzero(known.rows_of_segments()[known.segment] < target)
    if len(np.unique(known.segment[small])) < 2:
        return known
    # rows in the order of their segments' names, then of their rows
    rank = np.argsort(np.argsort(np.array(known.segments + [None], dtype=object)[:-1],
                                 kind="stable"))
    small = small[np.lexsort((known.row[small], rank[known.segment[small]]))]
    left = np.bincount(known.segment[small], minlength=len(known.segments))
    in_use = master_segments(features_dir)
    for first in range(0, len(small), target):
        group = small[first:first + target]
        numbers = known.segment[group]
        edges = [0, *(np.flatnonzero(numbers[1:] != numbers[:-1]) + 1).tolist(), len(group)]
        sources = [(int(numbers[a]), known.row[group[a:b]]) for a, b in zip(edges, edges[1:])]
        try:
            merged = _write_segment(features_dir, identity_id, known.keys[group],
                                    *_merge(features_dir, [(known.segments[n], rows)
                                                           for n, rows in sources]))
        except files.NoSpace:
            print(f"no space left on the disk to merge the small segments of {features_dir}: "
                  "they stay as they are (the cache works; they are merged on a later run)")
            break
        known.segment[group] = known.number(merged, len(group))
        known.row[group] = np.arange(len(group), dtype=np.int32)
        for number, rows in sources:
            left[number] -= len(rows)
            if left[number] == 0 and known.segments[number] not in in_use:
                os.remove(os.path.join(features_dir, known.segments[number]))
    return known


def _rows_per_segment(segment_path):
    """COMPACT_BELOW rows, or fewer when their features would exceed GROUP_BYTES."""
    with h5py.File(segment_path, "r") as f:
        features = f["features"]
        row_bytes = int(np.prod(features.shape[1:])) * features.dtype.itemsize
    return max(1, min(COMPACT_BELOW, GROUP_BYTES // row_bytes))


def _merge(features_dir, group):
    """(shape, dtype, fill) of the merged segment of `group`, read one source at a time."""
    with h5py.File(os.path.join(features_dir, group[0][0]), "r") as f:
        shape, dtype = f["features"].shape[1:], f["features"].dtype

    def fill(dataset):
        at = 0
        for seg, rows in group:
            index = [int(row) for row in rows]
            with h5py.File(os.path.join(features_dir, seg), "r") as f:
                if index == list(range(index[0], index[-1] + 1)):
                    dataset[at:at + len(index)] = f["features"][index[0]:index[-1] + 1]
                else:
                    dataset[at:at + len(index)] = f["features"][index]
            at += len(index)
    return shape, dtype, fill


@dataclass
class Layer:
    """Where a cached layer other than the base's output is, for write_master: FINETUNE_FROM=
    cache's cut. Per row of the master's `rows` (in their order, not the stored one): its segment
    (a number into `segments`), row and the rows of that segment; and its views, as dicts like
    write_master's `views`."""
    name: str
    segments: list
    segment: np.ndarray
    segment_row: np.ndarray
    segment_rows: np.ndarray
    views: list
    shape: tuple
    dtype: object

    @classmethod
    def of(cls, name, known, shas, views, shape, dtype):
        """The layer's places from its index.SegmentIndex, for rows of content `shas`."""
        at = known.find(shas)
        if (at < 0).any():
            raise KeyError(f"{name} of {shas[at < 0][0].decode()}")
        segment = known.segment[at]
        return cls(name, list(known.segments), segment, known.row[at].astype(np.int64),
                   known.rows_of_segments()[segment], list(views), tuple(shape), dtype)

    def digest(self):
        """What the master records of this layer, hashed: equal digests, nothing to rewrite."""
        used = np.unique(self.segment)  # by name: the numbering depends on what was found
        names = [self.segments[n] for n in used.tolist()]
        digest = hashlib.sha256(json.dumps([self.name, names]).encode())
        for column in (np.searchsorted(used, self.segment), self.segment_row):
            digest.update(np.ascontiguousarray(column, np.int64).tobytes())
        digest.update(json.dumps([[v["key"], v["segment"], v["segment_row"]]
                                  for v in self.views]).encode())
        return digest.hexdigest()


def write_master(features_dir, rows, attrs, feature_shape, dtype, unreadable, views=(),
                 cut=None):
    """Atomically replace features.h5. `rows`: an index.Rows, or dicts with path, label,
    sha256, split, size, mtime_ns, segment, segment_row, segment_rows. Rows are stored in
    feature order (segment, then row), which is stable across reruns and keeps the virtual
    mapping to few long runs. The file is streamed into its temporary file, WRITE_ROWS rows at
    a time, never built whole in memory (about 150 MB at a million rows).
    `unreadable` ({sha256: reason}) remembers files that failed to decode, so reruns skip them.
    `views` (AUGMENT=K): dicts with the image's sha256, view (1..K), segment, segment_row and
    segment_rows of augmented views, stored as `view_features`, `view_sha256` and `view_index`.
    `cut` (a Layer, FINETUNE_FROM=cache): the same for the cut's activations, row for row, as
    `cut_features`, `cut_view_features`, `cut_view_sha256` and `cut_view_index`."""
    rows = Rows.of(rows)
    order = rows.stored_order()
    used = np.unique(rows.segment)
    segments = {rows.segments[n] for n in used.tolist()} | {v["segment"] for v in views}
    if cut is not None:
        segments |= {cut.segments[n] for n in np.unique(cut.segment).tolist()}
        segments |= {v["segment"] for v in cut.views}
    segments = sorted(segments)

    def write(fileobj):
        with h5py.File(fileobj, "w") as f:
            # NaN, not zeros, wherever a source is missing: a broken cache must not look like
            # data
            f.create_virtual_dataset("features", _layout(
                rows.segments, rows.segment[order], rows.segment_row[order],
                rows.segment_rows[order], feature_shape, dtype), fillvalue=np.nan)
            _write_views(f, "", views, feature_shape, dtype)  # only with AUGMENT
            if cut is not None:
                f.create_virtual_dataset("cut_features", _layout(
                    cut.segments, cut.segment[order], cut.segment_row[order],
                    cut.segment_rows[order], cut.shape, cut.dtype), fillvalue=np.nan)
                _write_views(f, "cut_", cut.views, cut.shape, cut.dtype)
            f["features"].attrs["note"] = (
                "virtual: read from the segments/ folder beside this file; copied alone it "
                "reads as NaN. `make export` writes a file that stands alone")
            # checksummed like the segments (fixed-length strings: see _write_segment); only
            # the paths stay variable-length, as their length has no bound
            for name, column, kind in (("label", rows.label, np.int64),
                                       ("sha256", rows.sha256, "S64"),
                                       ("split", rows.split, rows.split.dtype),
                                       ("path", rows.path, STR),
                                       ("file_size", rows.size, np.int64),
                                       ("file_mtime_ns", rows.mtime_ns, np.int64)):
                _write_column(f, name, column, order, kind)
            f.create_dataset("segments", data=np.array(segments, dtype=object), dtype=STR)
            bad = sorted(unreadable.items())
            f.create_dataset("unreadable_sha256", data=np.array([s for s, _ in bad],
                                                                dtype=object),
                             dtype=STR, shape=(len(bad),))
            f.create_dataset("unreadable_reason", data=np.array([r for _, r in bad],
                                                                dtype=object),
                             dtype=STR, shape=(len(bad),))
            more = {**attrs, "versions": {**attrs.get("versions", {}),
                                          "h5py": h5py.__version__}}
            for key, value in more.items():
                f.attrs[key] = (value if isinstance(value, (str, int, float))
                                else json.dumps(value))
    files.atomic_write(os.path.join(features_dir, MASTER), write)
    return segments


def _write_views(f, prefix, views, shape, dtype):
    """`views` as <prefix>view_features (virtual), view_sha256 and view_index; nothing without
    views, so that a cache without them is laid out as before."""
    if not views:
        return
    views = sorted(views, key=lambda v: (v["segment"], v["segment_row"]))
    names = sorted({v["segment"] for v in views})
    number = {name: n for n, name in enumerate(names)}
    f.create_virtual_dataset(f"{prefix}view_features", _layout(
        names, np.array([number[v["segment"]] for v in views]),
        np.array([v["segment_row"] for v in views]),
        np.array([v["segment_rows"] for v in views]), shape, dtype), fillvalue=np.nan)
    _checksummed(f, f"{prefix}view_sha256", np.array([v["sha256"] for v in views], "S64"))
    _checksummed(f, f"{prefix}view_index", np.array([v["view"] for v in views], np.int64))


def _write_column(f, name, column, order, kind):
    """column[order] as dataset `name`, WRITE_ROWS rows at a time: checksummed in chunks as
    _checksummed does, but the paths, variable-length strings, are not (HDF5 checksums only
    their pointers)."""
    n = len(order)
    if name == "path":
        dataset = f.create_dataset(name, (n,), STR)
    elif n:  # HDF5 cannot chunk (so cannot checksum) an empty dataset
        dataset = f.create_dataset(name, (n,), kind, chunks=True, fletcher32=True)
    else:
        dataset = f.create_dataset(name, data=np.zeros(0, kind))
    for start in range(0, n, WRITE_ROWS):
        dataset[start:start + WRITE_ROWS] = column[order[start:start + WRITE_ROWS]]


def _layout(names, segment, row, segment_rows, feature_shape, dtype):
    """The virtual layout of rows (in order) over their segments' `features`: one mapping per
    run of consecutive rows of one segment; `segment` numbers into `names`. dtype: the
    segments' own."""
    layout = h5py.VirtualLayout(shape=(len(segment), *feature_shape), dtype=dtype)
    for start, stop in runs(segment, row):
        first = int(row[start])
        source = h5py.VirtualSource(names[segment[start]], "features",
                                    shape=(int(segment_rows[start]), *feature_shape))
        layout[start:stop] = source[first:first + (stop - start)]
    return layout


def remove_unreferenced(features_dir, identity_id, referenced):
    """Delete this identity's segments that the new master does not use (compacted or deleted
    images). Other identities' segments stay: switching back to them costs nothing."""
    for path in _segment_paths(features_dir, identity_id):
        if os.path.relpath(path, features_dir) not in referenced:
            os.remove(path)


def master_segments(features_dir):
    """The segments (relative paths) that features.h5 on disk uses; none when it is unreadable."""
    try:
        with open_master(os.path.join(features_dir, MASTER)) as f:
            return set(f["segments"].asstr()[:])
    except DAMAGE:
        return set()


def _checksummed(f, name, data):
    if len(data):  # HDF5 cannot chunk (so cannot checksum) an empty dataset
        f.create_dataset(name, data=data, chunks=True, fletcher32=True)
    else:
        f.create_dataset(name, data=data)


def _chunks(n, shape, dtype):
    row = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return (max(1, min(n, CHUNK_BYTES // max(row, 1))), *shape)


def _segment_paths(features_dir, identity_id):
    """This identity's complete segment files, oldest first. The exact folder is listed."""
    folder = segment_dir(features_dir, identity_id)
    names = (e.name for e in _entries(folder)
             if _is_segment(e.name) and e.is_file(follow_symlinks=False))
    return [os.path.join(folder, name) for name in sorted(names)]


def _is_segment(name):
    return name.startswith("seg-") and name.endswith(".h5")


def _own_file(features_dir, name):
    """ValueError unless features_dir/<name> is a regular file reached through no link: a
    link there would have HDF5 read a file outside the cache."""
    path = features_dir
    for part in name.split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise ValueError(f"{os.path.relpath(path, features_dir)} is a link")
    if not os.path.isfile(path):
        raise ValueError("not a regular file")


def _entries(folder):
    """The entries of one of the cache's own folders. A link there could lead the deletions
    of `remove_strays`, `inventory` and `remove_unreferenced` out of features/<NAME>."""
    if os.path.islink(folder):
        raise UserError(f"{folder} is a link: the cache's segment folders must be its own; "
                        "move the folder there instead")
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _verified_shas(path, shape=None, dtype=None):
    """A segment's sha256 column, after checking its layout (_segment_datasets) and reading
    every chunk of it through its checksum."""
    with h5py.File(path, "r") as f:
        features, shas = _segment_datasets(f, path, shape, dtype)
        shas = shas[:]  # bytes: index.SegmentIndex keeps them so
        step = features.chunks[0] * max(1, READ_BLOCK // features.chunks[0])
        buffer = np.empty((min(step, len(features)), *features.shape[1:]), features.dtype)
        for start in range(0, len(features), step):
            stop = min(start + step, len(features))
            features.read_direct(buffer, np.s_[start:stop], np.s_[:stop - start])
    return shas


def _segment_datasets(f, path, shape=None, dtype=None):
    """(features, sha256) of an open segment, without reading their data; ValueError (damage)
    unless they are laid out as _write_segment writes them: plain datasets of the file's own,
    chunked with Fletcher-32 and nothing else (a checksum-less segment, from before checksums
    or not ours, cannot be verified), S64 hashes, float32 or float16 rows of `shape` and `dtype`
    when given, and no more rows than the file's bytes hold (a reader allocates what a dataset
    declares: 2^36 hashes asked for 4 TiB)."""
    features, shas = _own_dataset(f, "features"), _own_dataset(f, "sha256")
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


def _own_dataset(f, name):
    """f[name], a dataset stored in `f` itself, or ValueError: not a link (an ExternalLink reads
    another file), not virtual, no external raw storage (both read other files' bytes)."""
    link = f.get(name, getlink=True)
    if link is None:
        raise ValueError(f"no {name} dataset")
    if not isinstance(link, h5py.HardLink):
        raise ValueError(f"{name} is a link ({type(link).__name__})")
    data = f[name]
    if not isinstance(data, h5py.Dataset):
        raise ValueError(f"{name} is not a dataset")
    if data.is_virtual:
        raise ValueError(f"{name} is a virtual dataset")
    if data.external:
        raise ValueError(f"{name} is stored in another file")
    return data


# Datasets of a master that hold one entry per row of the same thing: their lengths must agree.
SAME_ROWS = (("label", "sha256", "split", "path", "file_size", "file_mtime_ns", "features",
              "cut_features"),
             VIEW_DATASETS, tuple(f"cut_{name}" for name in VIEW_DATASETS),
             ("unreadable_sha256", "unreadable_reason"))


def open_master(path):
    """features.h5 open for reading, after `_check_master`; DAMAGE when it is not a master this
    module could have written."""
    f = h5py.File(path, "r")
    try:
        _check_master(f, os.path.getsize(path))
    except BaseException:
        f.close()
        raise
    return f


def _check_master(f, size):
    """ValueError unless every dataset of master `f` is its own (`_own_dataset`, but virtual
    ones may be), every virtual one reads only the `features` of segment files of
    features/<NAME> (`is_segment_name`), every other one declares no more entries than the
    file's `size` bytes hold, and the datasets of one entry a row (SAME_ROWS) agree on their
    length. Metadata only, no data read: a master declaring 2^40 labels kept export looping
    for minutes."""
    lengths = {}
    for name in f:
        link = f.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise ValueError(f"{name} is a link ({type(link).__name__})")
        item = f[name]
        if not isinstance(item, h5py.Dataset):
            raise ValueError(f"{name} is not a dataset")
        if item.external:
            raise ValueError(f"{name} is stored in another file")
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


def is_segment_name(name):
    """Whether `name` (a virtual source's file, an entry of the master's `segments`) is a path
    as write_master records it: segments/<identity_id>/seg-*.h5, relative to features/<NAME>,
    so neither absolute nor with a `..` that would lead out of it."""
    parts = name.split("/")
    return (len(parts) == 3 and parts[0] == "segments" and _is_segment(parts[2])
            and parts[1] not in ("", ".", "..") and "\\" not in name and "%" not in name)


def _damage(error):
    """What is wrong with a file, in a few words, from h5py's error."""
    text = str(error)
    for clue, words in (("filter returned failure", "checksum mismatch"),
                        ("truncated file", "truncated"),
                        ("file signature not found", "zeroed or not an HDF5 file")):
        if clue in text:
            return words
    return text.splitlines()[0][:200] if text else type(error).__name__


# --------------------------------------------------------------------------------------------
# Reading (every later stage)
# --------------------------------------------------------------------------------------------

def _identity_problem(identity):
    """None for an identity whose image_size is a SIZE (config.MIN_SIZE..MAX_SIZE), else what
    is wrong: 1500, read back from a cache, ended in a Keras traceback."""
    size = identity.get("image_size") if isinstance(identity, dict) else None
    if isinstance(size, int) and not isinstance(size, bool) and MIN_SIZE <= size <= MAX_SIZE:
        return None
    shown = repr(size if isinstance(identity, dict) else identity)[:40]
    return f"its identity's image_size is {shown}, not an integer from {MIN_SIZE} to {MAX_SIZE}"


def previous_files(features_dir):
    """path -> (size, mtime_ns, sha256) from the last run, so unchanged files are not re-hashed:
    an index.Previous (sorted columns, `get` like a dict)."""
    path = os.path.join(features_dir, MASTER)
    if not os.path.exists(path):
        return Previous()
    try:
        with open_master(path) as f:
            return Previous(f["path"].asstr()[:], f["file_size"][:], f["file_mtime_ns"][:],
                            f["sha256"][:])
    except DAMAGE:
        return Previous()  # unreadable, damaged or from an older layout: hash everything again


def previous_unreadable(features_dir):
    """{sha256: reason} of files that failed to decode in earlier runs."""
    try:
        with open_master(os.path.join(features_dir, MASTER)) as f:
            return dict(zip(f["unreadable_sha256"].asstr()[:], f["unreadable_reason"].asstr()[:]))
    except DAMAGE:
        return {}


def master_attribute(features_dir, key):
    """One attribute of features.h5, or None when there is no master or it is damaged: its whole
    index is read through the checksums (and its identity checked), so extract rewrites a
    damaged master even when nothing else changed."""
    try:
        with open_master(os.path.join(features_dir, MASTER)) as f:
            _check_index(f)
            if _identity_problem(_decode_attr(f.attrs.get("identity"))):
                return None  # as damaged: extract rewrites it
            return _decode_attr(f.attrs[key])
    except DAMAGE:
        return None


class FeatureStore:
    """Read-only view of features/<NAME>/features.h5.

    The row index (labels, splits, paths, hashes) is loaded into memory; features are read on
    demand, a block of rows at a time, so a cache larger than memory can still be streamed.
    A missing, damaged or changed file is a UserError that names `make extract`, never NaN or
    garbage features.
    """

    def __init__(self, features_dir):
        self.features_dir = features_dir
        self.path = os.path.join(features_dir, MASTER)
        if not os.path.exists(self.path):
            raise UserError(f"no feature cache at {self.path}: run `make extract DATA=<folder>` "
                            "first")
        try:
            self.file = open_master(self.path)
        except DAMAGE as error:
            raise UserError(f"{self.path} is damaged ({_damage(error)}): run `make extract` to "
                            "rebuild it") from None
        try:
            _check_index(self.file)  # every chunk through its checksum, nothing kept
            # what every stage needs; `paths` and `sha256` (about 200 bytes a row as str, which
            # train-head never reads) are loaded on first use
            index = _index(self.file, ("label", "split", "segments", *VIEW_DATASETS[1:],
                                       *CUT_DATASETS[2:]))
            self.features = self.file["features"]
        except DAMAGE as error:
            self.file.close()
            raise UserError(f"{self.path} is damaged ({_damage(error)}): run `make extract` to "
                            "rebuild it") from None
        self._check_segments(index["segments"])
        self._lock = threading.RLock()  # one reader at a time: a reopening closes the file
        self._open, self._sources = set(), {}
        self.labels = index["label"]
        self.splits = index["split"]
        self._paths = self._sha256 = self._split_digest = None
        self.attrs = {k: _decode_attr(v) for k, v in self.file.attrs.items()}
        self._check_identity()
        self._views_by_row(index)
        # The last damage met while reading: a reader running inside another framework (tf.data
        # turns a generator's exception into its own) can raise this one line instead.
        self.damage = None

    def _check_segments(self, segments):
        """Every segment (those listed and those the virtual datasets read) is there, a file of
        features/<NAME>'s own, opens and is laid out as a segment: a missing one would read as
        NaN, a truncated or zeroed one would fail in the middle of training, and a link or a
        segment whose data lives in another file would be read from outside the cache."""
        for name in FEATURE_DATASETS:
            if name in self.file:
                segments = [*segments, *(s.file_name for s in self.file[name].virtual_sources())]
        missing, damaged = [], []
        for seg in sorted(set(segments)):
            path = os.path.join(self.features_dir, seg)
            if not is_segment_name(seg):
                damaged.append(f"{seg[:100]!r} (not a segment of this cache's own)")
                continue
            if not os.path.lexists(path):
                missing.append(seg)
                continue
            try:
                _own_file(self.features_dir, seg)
                with h5py.File(path, "r") as f:
                    _segment_datasets(f, path)
            except DAMAGE as error:
                damaged.append(f"{seg} ({_damage(error)})")
        if missing or damaged:
            self.file.close()
        if missing:
            raise UserError(f"{self.path} refers to {len(missing)} missing segment file(s) such as "
                            f"{missing[0]}: run `make extract` again to rebuild the cache")
        if damaged:
            raise UserError(f"{self.features_dir} has a damaged segment {damaged[0]}: run "
                            "`make extract` to recompute it")

    def _check_identity(self):
        """The identity every stage builds its backbone from (`_identity_problem`)."""
        problem = _identity_problem(self.attrs.get("identity"))
        if problem:
            self.file.close()
            raise UserError(f"{self.path} is damaged or not written by this pipeline ({problem}"
                            "): run `make extract` to rebuild it")

    def _views_by_row(self, index):
        """AUGMENT=K: `views` = K and, per layer ("" for the features, "cut_" for the cut's
        activations), row and view 1..K, the position of that view in `<layer>view_features`
        (-1: none, as for validation and test rows); K = 0 without views."""
        self.views, self.view_features, self._view_at = 0, None, {}
        if "view_features" not in self.file:
            return
        self.view_features = self.file["view_features"]
        # AUGMENT of the last extract; views beyond it (of an earlier, larger AUGMENT) are kept
        # in the file but not read
        self.views = int(self.attrs.get("augment", {}).get("views", 0))
        row_of = {sha: row for row, sha in enumerate(self.sha256)}
        for layer in ("", "cut_"):
            if f"{layer}view_features" not in self.file:
                continue
            at_of = self._view_at[layer] = np.full((len(self.labels), self.views + 1), -1,
                                                   np.int64)
            for at, (sha, view) in enumerate(zip(index[f"{layer}view_sha256"],
                                                 index[f"{layer}view_index"])):
                if sha in row_of and 0 < view <= self.views:
                    at_of[row_of[sha], view] = at

    @property
    def cut(self):
        """The layer whose activations this cache keeps for fine-tuning (FINETUNE_FROM=cache),
        with their identity, or None."""
        return self.attrs.get("cut") if "cut_features" in self.file else None

    def cut_views(self):
        """Training rows' views of the cut's activations: how many of 1..views every row has."""
        at = self._view_at.get("cut_")
        if at is None or not self.views:
            return 0
        train = self.rows("train")
        whole = (at[train, 1:] >= 0).all(axis=0)  # view k cached for every training row
        return int(np.argmin(np.append(whole, False)))

    def read_views(self, indices, views, layer=""):
        """Features of the given rows, each as the view given (0: the plain features, 1..K: an
        augmented view cached by `make extract AUGMENT=K`), as float32. layer="cut_": the cut's
        activations instead (FINETUNE_FROM=cache)."""
        indices, views = np.asarray(indices), np.asarray(views)
        out = np.empty((len(indices), *self.shape(f"{layer}features")), np.float32)
        plain = views == 0
        out[plain] = self.read(indices[plain], f"{layer}features")
        if not plain.all():
            view_at = self._view_at.get(layer)
            at = (view_at[indices[~plain], views[~plain]] if view_at is not None
                  else np.full(int((~plain).sum()), -1))
            if (at < 0).any():
                raise UserError(f"{self.path} has no view {int(views[~plain][at < 0][0])} of row "
                                f"{int(indices[~plain][at < 0][0])}: rerun `make extract` with "
                                "the AUGMENT the head trains with")
            out[~plain] = self.read(at, f"{layer}view_features")
        return out

    def shape(self, dataset="features"):
        """The shape of one row of `dataset`."""
        with self._lock:  # a reader thread may be reopening the file (_touch)
            return self.file[dataset].shape[1:]

    @property
    def paths(self):
        """Each row's image path, relative to the data root (an object array of str)."""
        if self._paths is None:
            self._paths = self._load("path")
        return self._paths

    @property
    def sha256(self):
        """Each row's content hash (an object array of str)."""
        if self._sha256 is None:
            self._sha256 = self._load("sha256")
        return self._sha256

    def _load(self, name):
        try:
            with self._lock:
                return _index(self.file, (name,))[name]
        except DAMAGE as error:
            raise UserError(f"{self.path} is damaged ({_damage(error)}): run `make extract` to "
                            "rebuild it") from None

    def split_digest(self):
        """sha256 of every row's content hash with its split, in the order of the hashes (then
        splits): the split a model trains on. train-head and finetune record it, and
        registry.record refuses a model whose split is not the cache's, as after a re-extract
        with another SPLIT the test rows would be half made of its training rows."""
        if self._split_digest is None:
            shas = np.asarray(self.sha256.tolist(), "S64")
            splits = np.asarray(self.splits.tolist(), "S")
            order = np.lexsort((splits, shas))
            digest = hashlib.sha256()
            for start in range(0, len(order), WRITE_ROWS):
                part = order[start:start + WRITE_ROWS]
                digest.update(b"".join(sha + b" " + split + b"\n" for sha, split in
                                       zip(shas[part].tolist(), splits[part].tolist())))
            self._split_digest = digest.hexdigest()
        return self._split_digest

    @property
    def class_names(self):
        return self.attrs["class_names"]

    @property
    def identity(self):
        return self.attrs["identity"]

    def __len__(self):
        return len(self.labels)

    def image_root(self, data):
        """Where the cached paths live: DATA when it holds any of them, else the folder extract
        read (recorded in the cache), so stages work with or without DATA=..."""
        if data and any(os.path.exists(os.path.join(data, p)) for p in self.paths[:100]):
            return os.path.abspath(data)
        return self.attrs.get("data_root", data)

    def rows(self, split):
        """Indices of the rows in one split, in feature order."""
        return np.flatnonzero(self.splits == split)

    def read(self, indices, dataset="features"):
        """Features of the given rows (any order, no duplicates needed), as float32, from the
        dataset named (`features`, or `view_features` for augmented views)."""
        indices = np.asarray(indices)
        shape = self.shape(dataset)
        if len(indices) == 0:
            return np.zeros((0, *shape), np.float32)
        order = np.argsort(indices)
        wanted = indices[order]
        out = np.empty((len(indices), *shape), np.float32)
        # Contiguous reads beat h5py's point selection. A read spans at most READ_BLOCK rows
        # and never a gap of more than READ_GAP unwanted rows, so rows scattered over a large
        # cache (train-head's shuffled chunks) cost no reads of the rows between them.
        gaps = np.flatnonzero(np.diff(wanted) > READ_GAP)
        first = 0
        while first < len(wanted):
            stop = int(np.searchsorted(wanted, wanted[first] + READ_BLOCK))
            after = gaps[np.searchsorted(gaps, first):]
            stop = min(stop, int(after[0]) + 1) if len(after) else stop
            block = self.block(int(wanted[first]), int(wanted[stop - 1]) + 1, dataset)
            out[order[first:stop]] = block[wanted[first:stop] - wanted[first]]
            first = stop
        return out

    def block(self, start, stop, dataset="features"):
        """Rows start:stop in the stored dtype, each chunk read through its checksum."""
        with self._lock:
            self._touch(dataset, start, stop)
            source = self.file[dataset]
            try:
                block = source[start:stop]
            except DAMAGE as error:
                culprit = self._culprit(start, stop, source)
                self.damage = UserError(f"{self.features_dir} has a damaged segment{culprit} "
                                        f"({_damage(error)}): run `make extract` to recompute it")
                raise self.damage from None
            # NaN is the virtual dataset's fill for a missing source (extract refuses NaN
            # features), and fills whole rows: the first value of each row tells
            if np.isnan(block.reshape(len(block), -1)[:, 0]).any():
                self.damage = UserError(f"{self.features_dir} lost a segment"
                                        f"{self._culprit(start, stop, source)} (rows {start}-"
                                        f"{stop - 1} read as NaN): run `make extract` to "
                                        "recompute it")
                raise self.damage
        return block

    def _touch(self, dataset, start, stop):
        """HDF5 keeps every segment file it has read through the virtual dataset open, each with
        its own chunk cache and metadata: about 2 MB a segment, 1.8 GB for train-head at 1M
        rows (bench/SCALE.md) and more files than `ulimit -n` allows at 100M. Before a read that
        would take the open segments past MAX_OPEN_SEGMENTS, the master is closed, which closes
        them, and opened again."""
        if dataset not in self._sources:  # the first row each mapping covers, and its file
            maps = self.file[dataset].virtual_sources()
            firsts = np.array([m.vspace.get_select_bounds()[0][0] for m in maps], np.int64)
            order = np.argsort(firsts, kind="stable")
            self._sources[dataset] = (firsts[order], [maps[i].file_name for i in order])
        firsts, names = self._sources[dataset]
        first = max(int(np.searchsorted(firsts, start, "right")) - 1, 0)
        touched = set(names[first:int(np.searchsorted(firsts, stop - 1, "right"))])
        if len(self._open | touched) > MAX_OPEN_SEGMENTS:
            self.file.close()
            try:
                self.file = open_master(self.path)
            except DAMAGE as error:
                raise UserError(f"{self.path} is damaged ({_damage(error)}): run `make extract` "
                                "to rebuild it") from None
            self.features = self.file["features"]
            if self.view_features is not None:
                self.view_features = self.file["view_features"]
            self._open = set()
        self._open |= touched

    def _culprit(self, start, stop, dataset):
        """` <segment>` for the first segment under rows start:stop that fails to read, or ''."""
        for source in dataset.virtual_sources():
            (first, *_), (last, *_) = source.vspace.get_select_bounds()
            if first < stop and last >= start:
                try:
                    _verified_shas(os.path.join(self.features_dir, source.file_name))
                except DAMAGE:
                    return f" {source.file_name}"
        return ""

    def blocks(self, rows, size=READ_BLOCK, rng=None, read=None):
        """(row indices, features) for each block of `block_plan`. Only one block is in memory
        at a time, so a cache larger than memory streams. `read(indices)` reads the features
        instead of `self.read`."""
        for indices in block_plan(rows, size, rng):
            yield indices, (read or self.read)(indices)

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SPLIT_DIGESTS = {}  # (master path, its stat) -> split_digest: records() asks once a model


def split_digest(features_dir):
    """FeatureStore(features_dir).split_digest(), computed once for each version of the master
    (a UserError naming `make extract` when there is no usable cache)."""
    path = os.path.join(features_dir, MASTER)
    try:
        info = os.stat(path)
        key = (os.path.abspath(path), info.st_ino, info.st_size, info.st_mtime_ns)
    except OSError:
        key = None
    if key is None or key not in _SPLIT_DIGESTS:
        with FeatureStore(features_dir) as store:
            digest = store.split_digest()
        if key is None:
            return digest
        _SPLIT_DIGESTS.clear()  # one cache at a time
        _SPLIT_DIGESTS[key] = digest
    return _SPLIT_DIGESTS[key]


def block_plan(rows, size=READ_BLOCK, rng=None):
    """The row indices of each block of `size` of `rows`, read together. With a numpy
    Generator, shuffled: a block is pieces of consecutive rows from all over `rows`, in a
    shuffled order, and its rows are shuffled. Rows are stored in extraction order, often one
    class after another, and blocks of consecutive rows of one class made every epoch of the head
    end on a swing to that class (on cats_vs_dogs, 2 blocks of 1024: 98% cats, then 100% dogs).
    A block holds READ_BLOCK // SHUFFLE_ROWS = 32 pieces whatever its size: SHUFFLE_ROWS rows
    each in a block of READ_BLOCK, fewer in the smaller blocks of wide rows (the cut's), whose
    few long pieces would otherwise give each block a class share of its own."""
    if rng is not None and len(rows):
        piece = max(1, size * SHUFFLE_ROWS // READ_BLOCK)
        pieces = [rows[i:i + piece] for i in range(0, len(rows), piece)]
        rows = np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])
    plan = []
    for start in range(0, len(rows), size):
        indices = rows[start:start + size]
        plan.append(rng.permutation(indices) if rng is not None else indices)
    return plan


def export(features_dir, out_path):
    """Write features/<NAME> as one self-contained HDF5 file at out_path (atomically): the
    master's index datasets and attributes, and `features` as a real, checksummed dataset
    copied a block at a time, so that memory stays at one block whatever the cache's size.
    Returns the number of rows."""
    with FeatureStore(features_dir) as store:  # refuses a missing or damaged cache
        n, shape, dtype = len(store), store.features.shape[1:], store.features.dtype

        def write(fileobj):
            with h5py.File(fileobj, "w") as out:
                for name, item in store.file.items():
                    if name not in ("features", "segments", *VIEW_DATASETS, *CUT_DATASETS):
                        # the cache's plumbing, the training views and fine-tuning's
                        # activations, which an exported file leaves out
                        store.file.copy(item, out, name=name)
                for key, value in store.file.attrs.items():
                    out.attrs[key] = value
                features = out.create_dataset("features", (n, *shape), dtype, fletcher32=True,
                                              chunks=_chunks(n, shape, dtype) if n else None)
                for start in range(0, n, READ_BLOCK):
                    stop = min(start + READ_BLOCK, n)
                    features[start:stop] = store.block(start, stop)
        files.atomic_write(out_path, write)
    return n


def _check_index(f):
    """Read every dataset of a master but the features through its checksums, WRITE_ROWS rows
    at a time, keeping nothing: a million rows' index decoded is hundreds of MB."""
    for name, item in f.items():
        if name not in FEATURE_DATASETS:
            if not item.shape:
                item[()]
            for start in range(0, len(item) if item.shape else 0, WRITE_ROWS):
                item[start:start + WRITE_ROWS]


def _index(f, names=None):
    """Every dataset of a master but `features` (or those of `names` that it has), read whole
    (through the checksums of those that have them), strings decoded: {name: array}."""
    index = {}
    for name, item in f.items():
        if name not in FEATURE_DATASETS and (names is None or name in names):
            index[name] = item.asstr()[()] if h5py.check_string_dtype(item.dtype) else item[()]
    return index


def _decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value.item() if isinstance(value, np.generic) else value
