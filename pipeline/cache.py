"""The feature cache on disk. This is the only module that touches h5py.

    features/<NAME>/
        features.h5                  the file users open: row index + a virtual `features` dataset
        segments/<identity_id>/      immutable segment files, one folder per feature identity
            seg-<time>-<pid>.h5      features (n, h, w, 512) float32 (or float16) and sha256 (n,)
        skipped.csv, .extract.lock

Crash safety comes from never modifying a file in place: every file is built in memory and
written whole by files.atomic_write (temporary file, fsync, rename), so a kill -9 leaves at worst
a stray temporary file and segments that no master points to yet; the next run picks those
segments up, so only the batch in flight is lost. A full disk is one line (files.NoSpace).

Paths are built from NAME and listed with os.scandir, never glob: `[`, `*` or `?` in a NAME
are ordinary characters.
"""
import fcntl
import io
import json
import os
import time
from contextlib import contextmanager

import h5py
import numpy as np

from . import files
from .config import UserError

MASTER = "features.h5"
STR = h5py.string_dtype("utf-8")
COMPACT_BELOW = 4096      # segments with fewer rows are merged, this many rows to a segment
READ_BLOCK = 1024         # rows per contiguous read from the virtual dataset


# --------------------------------------------------------------------------------------------
# Writing (extract)
# --------------------------------------------------------------------------------------------

@contextmanager
def exclusive(folder, stage="extract", remove_strays=True):
    """Only one `stage` at a time writes `folder` (extract: features/<NAME>, finetune:
    models/<NAME>). The OS drops the lock when its holder dies, even by kill -9."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f".{stage}.lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise UserError(f"another {stage} (pid {holder}) is writing {folder}: wait for it "
                            "to finish, then run this again") from None
        lock.seek(0), lock.truncate(), lock.write(str(os.getpid())), lock.flush()
        if remove_strays:
            _remove_strays(folder)
        yield


def _remove_strays(folder):
    """Delete the temporary files a killed run left: only the names this module writes (a master
    or a segment in the making), only in features/<NAME> and its segment folders."""
    folders = [folder] + [e.path for e in _entries(os.path.join(folder, "segments"))
                          if e.is_dir(follow_symlinks=False)]
    for where in folders:
        for entry in _entries(where):
            # atomic_write's `.<name>.<hex>.tmp`, or `<name>.tmp` of versions before it
            original = files.original_name(entry.name) or (
                entry.name[:-len(".tmp")] if entry.name.endswith(".h5.tmp") else None)
            if (original and (original == MASTER or _is_segment(original))
                    and entry.is_file(follow_symlinks=False)):
                os.remove(entry.path)


def segment_dir(features_dir, identity_id):
    return os.path.join(features_dir, "segments", identity_id)


def inventory(features_dir, identity_id):
    """sha256 -> (segment path relative to features_dir, row, rows in that segment) for every
    complete segment of this identity. A later segment wins when two hold the same image."""
    found = {}
    for path in _segment_paths(features_dir, identity_id):
        rel = os.path.relpath(path, features_dir)
        with h5py.File(path, "r") as f:
            shas = f["sha256"].asstr()[:]
        found.update({sha: (rel, row, len(shas)) for row, sha in enumerate(shas)})
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
    final = os.path.join(folder, f"seg-{time.time_ns():020d}-{os.getpid()}.h5")
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        fill(f.create_dataset("features", (len(shas), *shape), dtype))  # float32 or float16
        f.create_dataset("sha256", data=np.array(shas, dtype=object), dtype=STR)
    files.atomic_write(final, image.getbuffer())
    return os.path.relpath(final, features_dir)


def compact(features_dir, identity_id, known, keep):
    """Merge the small segments, so the virtual dataset spans few files. Only rows whose sha is
    in `keep` are carried over. Returns the updated inventory.

    One pass over the rows, then groups of COMPACT_BELOW rows, each built in memory and written
    before the next is read: memory and extra disk stay at one group. A group's sources that the
    features.h5 on disk does not use are deleted as soon as the group is written, so compaction
    fits in the space it frees; the sources that master uses go once the new master is written
    (remove_unreferenced). A crash in between leaves rows in two segments, and the inventory's
    "later segment wins" picks the merged one. Out of space, the rest stay as they are."""
    small = {seg for seg, _, n in known.values() if n < COMPACT_BELOW}
    if len(small) < 2:
        return known
    rows_of = {}
    for sha, (seg, row, _) in known.items():
        if seg in small and sha in keep:
            rows_of.setdefault(seg, []).append((row, sha))
    groups, room = [[]], COMPACT_BELOW  # [(segment, [(row, sha), ...]), ...] per group
    for seg in sorted(rows_of):
        rows = sorted(rows_of[seg])
        while rows:
            groups[-1].append((seg, rows[:room]))
            room, rows = room - len(rows[:room]), rows[room:]
            if room == 0:
                groups.append([])
                room = COMPACT_BELOW
    left = {seg: len(rows) for seg, rows in rows_of.items()}
    in_use = master_segments(features_dir)
    updated = {sha: v for sha, v in known.items() if v[0] not in small or sha in keep}
    for group in filter(None, groups):
        shas = [sha for _, rows in group for _, sha in rows]
        try:
            merged = _write_segment(features_dir, identity_id, shas, *_merge(features_dir, group))
        except files.NoSpace:
            print(f"no space left on the disk to merge the small segments of {features_dir}: "
                  "they stay as they are (the cache works; they are merged on a later run)")
            break
        updated.update({sha: (merged, row, len(shas)) for row, sha in enumerate(shas)})
        for seg, rows in group:
            left[seg] -= len(rows)
            if left[seg] == 0 and seg not in in_use:
                os.remove(os.path.join(features_dir, seg))
    return updated


def _merge(features_dir, group):
    """(shape, dtype, fill) of the merged segment of `group`, read one source at a time."""
    with h5py.File(os.path.join(features_dir, group[0][0]), "r") as f:
        shape, dtype = f["features"].shape[1:], f["features"].dtype

    def fill(dataset):
        at = 0
        for seg, rows in group:
            index = [row for row, _ in rows]
            with h5py.File(os.path.join(features_dir, seg), "r") as f:
                if index == list(range(index[0], index[-1] + 1)):
                    dataset[at:at + len(index)] = f["features"][index[0]:index[-1] + 1]
                else:
                    dataset[at:at + len(index)] = f["features"][index]
            at += len(index)
    return shape, dtype, fill


def write_master(features_dir, rows, attrs, feature_shape, dtype, unreadable):
    """Atomically replace features.h5. `rows`: dicts with path, label, sha256, split, size,
    mtime_ns, segment, segment_row, segment_rows. Rows are stored in feature order (segment,
    then row), which is stable across reruns and keeps the virtual mapping to few long runs.
    `unreadable` ({sha256: reason}) remembers files that failed to decode, so reruns skip them."""
    rows = sorted(rows, key=lambda r: (r["segment"], r["segment_row"], r["path"]))
    n = len(rows)
    layout = h5py.VirtualLayout(shape=(n, *feature_shape), dtype=dtype)  # the segments' dtype
    segments = sorted({r["segment"] for r in rows})
    start = 0
    while start < n:  # one mapping per run of consecutive rows of one segment
        seg, first = rows[start]["segment"], rows[start]["segment_row"]
        stop = start + 1
        while (stop < n and rows[stop]["segment"] == seg
               and rows[stop]["segment_row"] == first + (stop - start)):
            stop += 1
        source = h5py.VirtualSource(seg, "features",
                                    shape=(rows[start]["segment_rows"], *feature_shape))
        layout[start:stop] = source[first:first + (stop - start)]
        start = stop
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        # NaN, not zeros, wherever a source is missing: a broken cache must not look like data
        f.create_virtual_dataset("features", layout, fillvalue=np.nan)
        f.create_dataset("label", data=np.array([r["label"] for r in rows], np.int64))
        for key in ("path", "sha256", "split"):
            f.create_dataset(key, data=np.array([r[key] for r in rows], dtype=object), dtype=STR)
        f.create_dataset("file_size", data=np.array([r["size"] for r in rows], np.int64))
        f.create_dataset("file_mtime_ns", data=np.array([r["mtime_ns"] for r in rows], np.int64))
        f.create_dataset("segments", data=np.array(segments, dtype=object), dtype=STR)
        bad = sorted(unreadable.items())
        f.create_dataset("unreadable_sha256", data=np.array([s for s, _ in bad], dtype=object),
                         dtype=STR, shape=(len(bad),))
        f.create_dataset("unreadable_reason", data=np.array([r for _, r in bad], dtype=object),
                         dtype=STR, shape=(len(bad),))
        attrs = {**attrs, "versions": {**attrs.get("versions", {}), "h5py": h5py.__version__}}
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
    files.atomic_write(os.path.join(features_dir, MASTER), image.getbuffer())
    return segments


def remove_unreferenced(features_dir, identity_id, referenced):
    """Delete this identity's segments that the new master does not use (compacted or deleted
    images). Other identities' segments stay: switching back to them costs nothing."""
    for path in _segment_paths(features_dir, identity_id):
        if os.path.relpath(path, features_dir) not in referenced:
            os.remove(path)


def master_segments(features_dir):
    """The segments (relative paths) that features.h5 on disk uses; none when it is unreadable."""
    try:
        with h5py.File(os.path.join(features_dir, MASTER), "r") as f:
            return set(f["segments"].asstr()[:])
    except (OSError, KeyError):
        return set()


def _segment_paths(features_dir, identity_id):
    """This identity's complete segment files, oldest first. The exact folder is listed."""
    folder = segment_dir(features_dir, identity_id)
    names = (e.name for e in _entries(folder)
             if _is_segment(e.name) and e.is_file(follow_symlinks=False))
    return [os.path.join(folder, name) for name in sorted(names)]


def _is_segment(name):
    return name.startswith("seg-") and name.endswith(".h5")


def _entries(folder):
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


# --------------------------------------------------------------------------------------------
# Reading (every later stage)
# --------------------------------------------------------------------------------------------

def previous_files(features_dir):
    """path -> (size, mtime_ns, sha256) from the last run, so unchanged files are not re-hashed."""
    path = os.path.join(features_dir, MASTER)
    if not os.path.exists(path):
        return {}
    try:
        with h5py.File(path, "r") as f:
            return dict(zip(f["path"].asstr()[:],
                            zip(f["file_size"][:].tolist(), f["file_mtime_ns"][:].tolist(),
                                f["sha256"].asstr()[:])))
    except (OSError, KeyError):
        return {}  # unreadable or from an older layout: hash everything again


def previous_unreadable(features_dir):
    """{sha256: reason} of files that failed to decode in earlier runs."""
    try:
        with h5py.File(os.path.join(features_dir, MASTER), "r") as f:
            return dict(zip(f["unreadable_sha256"].asstr()[:], f["unreadable_reason"].asstr()[:]))
    except (OSError, KeyError):
        return {}


def master_attribute(features_dir, key):
    """One attribute of features.h5, or None when there is no (readable) master."""
    try:
        with h5py.File(os.path.join(features_dir, MASTER), "r") as f:
            return _decode_attr(f.attrs[key])
    except (OSError, KeyError):
        return None


class FeatureStore:
    """Read-only view of features/<NAME>/features.h5.

    The row index (labels, splits, paths, hashes) is loaded into memory; features are read on
    demand, a block of rows at a time, so a cache larger than memory can still be streamed.
    """

    def __init__(self, features_dir):
        self.features_dir = features_dir
        self.path = os.path.join(features_dir, MASTER)
        if not os.path.exists(self.path):
            raise UserError(f"no feature cache at {self.path}: run `make extract DATA=<folder>` first")
        self.file = h5py.File(self.path, "r")
        missing = [s for s in self.file["segments"].asstr()[:]
                   if not os.path.exists(os.path.join(features_dir, s))]
        if missing:
            self.file.close()
            raise UserError(f"{self.path} refers to {len(missing)} missing segment file(s) such as "
                            f"{missing[0]}: run `make extract` again to rebuild the cache")
        self.features = self.file["features"]
        self.labels = self.file["label"][:]
        self.splits = self.file["split"].asstr()[:]
        self.paths = self.file["path"].asstr()[:]
        self.sha256 = self.file["sha256"].asstr()[:]
        self.attrs = {k: _decode_attr(v) for k, v in self.file.attrs.items()}

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

    def read(self, indices):
        """Features of the given rows (any order, no duplicates needed), as float32."""
        indices = np.asarray(indices)
        if len(indices) == 0:
            return np.zeros((0, *self.features.shape[1:]), np.float32)
        order = np.argsort(indices)
        wanted = indices[order]
        out = np.empty((len(indices), *self.features.shape[1:]), np.float32)
        for start in range(int(wanted[0]), int(wanted[-1]) + 1, READ_BLOCK):
            inside = (wanted >= start) & (wanted < start + READ_BLOCK)
            if inside.any():  # contiguous block reads beat h5py's point selection
                block = self.features[start:int(wanted[inside][-1]) + 1]
                out[order[inside]] = block[wanted[inside] - start]
        return out

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value.item() if isinstance(value, np.generic) else value
