"""Segments: the immutable files that hold the features, and their compaction.

    features/<NAME>/segments/<identity_id>/seg-<time>-<random>.h5
        features (n, h, w, 512) float32 (or float16), sha256 (n,) S64, both Fletcher-32

Extract writes one segment a batch (`write_segment`). A segment is built in memory and written
whole by files.atomic_write (temporary file, fsync, rename), never modified afterwards: a kill -9
leaves at worst a stray temporary file (`remove_strays`) and segments that no master points to
yet, which the next run's `inventory` picks up, so only the batch in flight is lost. A full
disk is one line (files.NoSpace).

`inventory` reads every segment through its checksums (layout.verified_shas) and deletes a
damaged one, so its images are computed again; the segment written later wins when two hold the
same image. `compact` merges small segments, so that the master's virtual dataset spans few
files, and `remove_unreferenced` deletes those the new master no longer uses.
"""
import io
import os
import secrets
import time

import h5py
import numpy as np

from ..config import UserError
from ..fs import files
from . import layout
from .index import SegmentIndex
from .layout import MASTER, segment_dir
from .master import master_segments

COMPACT_BELOW = 4096      # segments with fewer rows are merged, this many rows to a segment,
GROUP_BYTES = 128 * 2**20  # and at most this many bytes (4096 rows at SIZE=150): one merged
                           # segment is built in memory, so SIZE=1024's 2 MiB rows need fewer


def remove_strays(folder):
    """Delete the temporary files a killed run left: only the names this package writes (a
    master, a segment or skipped.csv in the making), only in features/<NAME> and its segment
    folders. Call it only while holding extract's lock (lock.exclusive), when no other run can
    be writing them."""
    folders = [folder] + [e.path for e in layout.entries(os.path.join(folder, "segments"))
                          if e.is_dir(follow_symlinks=False)]
    for where in folders:
        for entry in layout.entries(where):
            # atomic_write's `.<name>.<hex>.tmp`, or `<name>.tmp` of versions before it
            original = files.original_name(entry.name) or (
                entry.name[:-len(".tmp")] if entry.name.endswith(".h5.tmp") else None)
            if (original and (original in (MASTER, "skipped.csv") or layout.is_segment(original))
                    and entry.is_file(follow_symlinks=False)):
                os.remove(entry.path)


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
    for path in layout.segment_paths(features_dir, identity_id):
        try:
            shas = layout.verified_shas(path, shape, dtype)
        except layout.DAMAGE as error:
            if getattr(error, "errno", None) is not None:  # the OS refused (EACCES, EIO...):
                raise UserError(f"{path} cannot be read ({os.strerror(error.errno)}): fix its "
                                "permissions or the disk, then run the same command again") \
                    from None  # not damage: a healthy segment must not be deleted for it
            print(f"{path} is damaged ({layout.describe(error)}): deleted; its images will be "
                  "computed again")
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
    return write_segment_filled(features_dir, identity_id, shas, features.shape[1:],
                                features.dtype, fill)


def write_segment_filled(features_dir, identity_id, shas, shape, dtype, fill):
    """Build a segment of len(shas) rows in memory, `fill(features dataset)` writing its rows
    (compaction copies from other segments; a synthetic bench cache writes none), then write
    it whole. Returns its path relative to features_dir."""
    folder = segment_dir(features_dir, identity_id)
    os.makedirs(folder, exist_ok=True)
    # The time orders segments (a later one wins, `inventory`); 64 random bits, not the pid,
    # keep names unique across hosts and containers (whose pids repeat) sharing a disk, as the
    # workers of a distributed extraction will.
    final = os.path.join(folder, f"seg-{time.time_ns():020d}-{secrets.token_hex(8)}.h5")
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        features = f.create_dataset("features", (len(shas), *shape), dtype, fletcher32=True,
                                    chunks=layout.chunks(len(shas), shape, dtype))
        fill(features)  # float32 or float16 (STORAGE), as given
        # fixed length, as HDF5 checksums only the pointers of variable-length strings
        f.create_dataset("sha256", data=np.array(shas, "S64"), chunks=True, fletcher32=True)
    files.atomic_write(final, image.getbuffer())
    return os.path.relpath(final, features_dir)


def rows_per_segment(row_bytes):
    """COMPACT_BELOW rows, or fewer when their features would exceed GROUP_BYTES: the rows of a
    merged segment, and of a segment that compaction leaves alone."""
    return max(1, min(COMPACT_BELOW, GROUP_BYTES // row_bytes))


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
    with h5py.File(os.path.join(features_dir, known.segments[known.segment[0]]), "r") as f:
        features = f["features"]
        target = rows_per_segment(int(np.prod(features.shape[1:])) * features.dtype.itemsize)
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
            merged = write_segment_filled(features_dir, identity_id, known.keys[group],
                                          *_merge(features_dir, [(known.segments[n], rows)
                                                                 for n, rows in sources]))
        except files.NoSpace as error:
            print(f"{error.words} to merge the small segments of {features_dir}: "
                  "they stay as they are (the cache works; they are merged on a later run)")
            break
        known.segment[group] = known.number(merged, len(group))
        known.row[group] = np.arange(len(group), dtype=np.int32)
        for number, rows in sources:
            left[number] -= len(rows)
            if left[number] == 0 and known.segments[number] not in in_use:
                os.remove(os.path.join(features_dir, known.segments[number]))
    return known


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


def remove_unreferenced(features_dir, identity_id, referenced):
    """Delete this identity's segments that the new master does not use (compacted or deleted
    images). Other identities' segments stay: switching back to them costs nothing."""
    for path in layout.segment_paths(features_dir, identity_id):
        if os.path.relpath(path, features_dir) not in referenced:
            os.remove(path)
