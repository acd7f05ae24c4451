"""What FeatureStore refuses while it opens or reads a cache, and the one line it says.

A master that fails to open, a segment that is missing, not ours or not laid out as one, a chunk
whose checksum fails and a value that is not finite are each one UserError naming `make
extract`. Two are kinds of their own, as the store may read on past them (`FeatureStore.
_surviving`): SegmentLost (rows read as the virtual dataset's NaN fill: their segment is gone,
as when another extract compacted the cache under this reader) and MasterReplaced (the master on
disk is no longer the one this reader opened).
"""
import os

import h5py
import numpy as np

from ..config import UserError
from . import layout
from .layout import CUT_DATASETS, DAMAGE, FEATURE_DATASETS, VIEW_DATASETS, open_master
from .master import check_index, read_index


class SegmentLost(UserError):
    """Rows read as NaN whole: the segment behind them is gone."""


class MasterReplaced(UserError):
    """features.h5 was replaced since the store opened it."""


def damaged_master(path, error):
    """The one line for a master that fails to open or read."""
    return UserError(f"{path} is damaged ({layout.describe(error)}): run `make extract` to "
                     "rebuild it")


def check_segments(features_dir, master_path, f, segments):
    """Every segment of master `f` (those listed and those the virtual datasets read) is there,
    a file of features/<NAME>'s own, opens and is laid out as a segment: a missing one would
    read as NaN, a truncated or zeroed one would fail in the middle of training, and a link or
    a segment whose data lives in another file would be read from outside the cache."""
    for name in FEATURE_DATASETS:
        if name in f:
            segments = [*segments, *(s.file_name for s in f[name].virtual_sources())]
    missing, damaged = [], []
    for seg in sorted(set(segments)):
        path = os.path.join(features_dir, seg)
        if not layout.is_segment_name(seg):
            damaged.append(f"{seg[:100]!r} (not a segment of this cache's own)")
            continue
        if not os.path.lexists(path):
            missing.append(seg)
            continue
        try:
            layout.own_file(features_dir, seg)
            with h5py.File(path, "r") as segment:
                layout.segment_datasets(segment, path)
        except DAMAGE as error:
            damaged.append(f"{seg} ({layout.describe(error)})")
    if missing:
        raise UserError(f"{master_path} refers to {len(missing)} missing segment file(s) such as "
                        f"{missing[0]}: run `make extract` again to rebuild the cache")
    if damaged:
        raise UserError(f"{features_dir} has a damaged segment {damaged[0]}: run "
                        "`make extract` to recompute it")


def culprit(features_dir, start, stop, dataset):
    """` <segment>` for the first segment under rows start:stop of virtual `dataset` that fails
    to read (layout.verified_shas), or ''."""
    for source in dataset.virtual_sources():
        (first, *_), (last, *_) = source.vspace.get_select_bounds()
        if first < stop and last >= start:
            try:
                layout.verified_shas(os.path.join(features_dir, source.file_name))
            except DAMAGE:
                return f" {source.file_name}"
    return ""


def unreadable(features_dir, start, stop, dataset, error):
    """The one line for rows start:stop whose chunks fail to read (a checksum, a truncation)."""
    return UserError(f"{features_dir} has a damaged segment"
                     f"{culprit(features_dir, start, stop, dataset)} ({layout.describe(error)}): "
                     "run `make extract` to recompute it")


def not_finite(features_dir, block, start, stop, dataset):
    """The one line for rows start:stop (`block`) holding a value that is not finite. NaN is the
    virtual dataset's fill for a missing source, which fills whole rows (SegmentLost); any other
    NaN or inf was written into a segment (HDF5 recomputes the checksums of what it writes),
    which the next extract deletes and computes again (layout.verified_shas)."""
    rows = block.reshape(len(block), -1)
    bad = ~np.isfinite(rows).all(axis=1)
    where = culprit(features_dir, start, stop, dataset)
    fix = "run `make extract` to recompute it"
    if np.isnan(rows[bad]).all():
        return SegmentLost(f"{features_dir} lost a segment{where} (rows {start}-{stop - 1} read "
                           f"as NaN): {fix}")
    first = start + int(np.argmax(bad))
    return UserError(f"{features_dir} has a damaged segment{where} ({layout.NOT_FINITE}, row "
                     f"{first}): {fix}")


def master_stat(path):
    """What tells one master file from the next one written under its name, or None."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns


def open_checked(features_dir, path, more=()):
    """(the master at `path` open, its index of what every reader needs and of `more`, its
    master_stat), after checking it: laid out as this package writes it (layout.open_master),
    its index read through its checksums, its segments there and its own (`check_segments`);
    a UserError naming `make extract` if not. `path` and `sha256` (about 200 bytes a row as str,
    which train-head never reads) are read only when asked for in `more`."""
    opened = master_stat(path)
    try:
        f = open_master(path)
    except DAMAGE as error:
        raise damaged_master(path, error) from None
    try:
        check_index(f)  # every chunk through its checksum, nothing kept
        index = read_index(f, ("label", "split", "segments", *VIEW_DATASETS[1:],
                               *CUT_DATASETS[2:], *more))
        check_segments(features_dir, path, f, index["segments"])
    except DAMAGE as error:
        f.close()
        raise damaged_master(path, error) from None
    except BaseException:
        f.close()
        raise
    return f, index, opened
