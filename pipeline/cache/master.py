"""The master, features/<NAME>/features.h5: the file users open.

    label, sha256, split, path, file_size, file_mtime_ns   one entry a row, in feature order
    features                                                virtual: rows of the segments
    view_features, view_sha256, view_index                  AUGMENT=K's views (virtual)
    cut_features, cut_view_*                                FINETUNE_FROM=cache's cut
    segments, unreadable_sha256, unreadable_reason          plumbing; attributes: identity,
                                                            class_names, index_digest, ...

The master holds no features of its own: `features` is an HDF5 virtual dataset whose rows map,
a run of consecutive rows at a time, onto the `features` of the segment files beside it
(relative paths, so the folder can move). Rows are stored in feature order (segment, then row),
stable across reruns, which keeps the mapping to few long runs. A virtual row whose segment is
missing reads as NaN, which the store refuses, never as zeros that would look like data.

`write_master` replaces the file atomically, streamed into its temporary file WRITE_ROWS rows at
a time. Every index column is checksummed (Fletcher-32) but the paths, whose HDF5 checksums
would cover only pointers. The readers here (`previous_files`, `previous_unreadable`,
`master_attribute`) treat a master that fails layout.open_master as absent, so that extract
rewrites it; `identity_problem` refuses an identity no backbone could be built from.
"""
import hashlib
import json
import os
from dataclasses import dataclass

import h5py
import numpy as np

from ..config import UserError
from ..fs import artifacts, files
from .identity import identity_problem
from .index import Previous, Rows, runs
from .layout import DAMAGE, FEATURE_DATASETS, MASTER, STR, checksummed, open_master

WRITE_ROWS = 65536        # rows of the master's index written (or checked) at a time


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
            f.create_virtual_dataset("features", _virtual_layout(
                rows.segments, rows.segment[order], rows.segment_row[order],
                rows.segment_rows[order], feature_shape, dtype), fillvalue=np.nan)
            _write_views(f, "", views, feature_shape, dtype)  # only with AUGMENT
            if cut is not None:
                f.create_virtual_dataset("cut_features", _virtual_layout(
                    cut.segments, cut.segment[order], cut.segment_row[order],
                    cut.segment_rows[order], cut.shape, cut.dtype), fillvalue=np.nan)
                _write_views(f, "cut_", cut.views, cut.shape, cut.dtype)
            f["features"].attrs["note"] = (
                "virtual: read from the segments/ folder beside this file; copied alone it "
                "reads as NaN. `make export` writes a file that stands alone")
            # checksummed like the segments (fixed-length strings: see write_segment_filled);
            # only the paths stay variable-length, as their length has no bound
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
    f.create_virtual_dataset(f"{prefix}view_features", _virtual_layout(
        names, np.array([number[v["segment"]] for v in views]),
        np.array([v["segment_row"] for v in views]),
        np.array([v["segment_rows"] for v in views]), shape, dtype), fillvalue=np.nan)
    checksummed(f, f"{prefix}view_sha256", np.array([v["sha256"] for v in views], "S64"))
    checksummed(f, f"{prefix}view_index", np.array([v["view"] for v in views], np.int64))


def _write_column(f, name, column, order, kind):
    """column[order] as dataset `name`, WRITE_ROWS rows at a time: checksummed in chunks as
    `checksummed` does, but the paths, variable-length strings, are not (HDF5 checksums only
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


def _virtual_layout(names, segment, row, segment_rows, feature_shape, dtype):
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


def master_segments(features_dir):
    """The segments (relative paths) that features.h5 on disk uses; none when it is unreadable."""
    try:
        with open_master(os.path.join(features_dir, MASTER)) as f:
            return set(f["segments"].asstr()[:])
    except DAMAGE:
        return set()


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
            check_index(f)
            if identity_problem(decode_attr(f.attrs.get("identity"))):
                return None  # as damaged: extract rewrites it
            return decode_attr(f.attrs[key])
    except DAMAGE:
        return None


def side_file(features_dir, name):
    """The path of a list extract writes beside the cache (skipped.csv, label_conflicts.csv)
    when it is the one features.h5 names by its sha256; None when the master names no such
    file; the file as it is under a master older than that record. A list that is not the
    named one (an extract killed between the two, or an edit) is refused in one line: it
    would describe another run than the cache."""
    side_files = master_attribute(features_dir, "side_files")
    path = os.path.join(features_dir, name)
    if side_files is None:  # a cache from before masters named them: the list as it is
        return path if os.path.isfile(path) else None
    recorded = side_files.get(name)
    if recorded is None:
        return None
    if not os.path.lexists(path) or artifacts.file_sha256(path) != recorded:
        raise UserError(f"{path} is not the list {os.path.join(features_dir, MASTER)} names "
                        "(an extract was interrupted, or the file changed): run `make extract` "
                        "again")
    return path


def check_index(f):
    """Read every dataset of a master but the features through its checksums, WRITE_ROWS rows
    at a time, keeping nothing: a million rows' index decoded is hundreds of MB."""
    for name, item in f.items():
        if name not in FEATURE_DATASETS:
            if not item.shape:
                item[()]
            for start in range(0, len(item) if item.shape else 0, WRITE_ROWS):
                item[start:start + WRITE_ROWS]


def read_index(f, names=None):
    """Every dataset of a master but `features` (or those of `names` that it has), read whole
    (through the checksums of those that have them), strings decoded: {name: array}."""
    index = {}
    for name, item in f.items():
        if name not in FEATURE_DATASETS and (names is None or name in names):
            index[name] = item.asstr()[()] if h5py.check_string_dtype(item.dtype) else item[()]
    return index


def decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value.item() if isinstance(value, np.generic) else value
