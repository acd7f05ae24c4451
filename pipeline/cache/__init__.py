"""The feature cache on disk. This package is the only code that imports h5py.

    features/<NAME>/
        features.h5                  the file users open: row index + a virtual `features` dataset
        segments/<identity_id>/      immutable segment files, one folder per feature identity
            seg-<time>-<random>.h5   features (n, h, w, 512) float32 (or float16) and sha256 (n,)
        skipped.csv, label_conflicts.csv   what was not used, and contents under two classes
                                     (named by sha256 in the master: side_file)
        .lock (lock.py)

Crash safety comes from never modifying a file in place: every segment and master is built in
memory (a master is streamed into its temporary file) and written whole by files.atomic_write
(temporary file, fsync, rename), so a kill -9 leaves at worst a stray temporary file and
segments that no master points to yet; the next run picks those segments up, so only the batch
in flight is lost. A full disk is one line (files.NoSpace).

Damage is detected, not trusted: segments store `features` and `sha256` in chunks checksummed by
HDF5's Fletcher-32 filter, which fails the read of a chunk whose bytes changed, also through the
master's virtual dataset. Every extract reads every segment through its checksums and deletes a
damaged one, so its images are computed again. A shared cache is untrusted: a file is used only
in the layout this package writes, so that no cache reads (or exports) bytes from outside
features/<NAME>, and none declares more than its bytes hold.

The modules, in the order they build on each other:

    layout     names, constants, and the checks that a segment or master is laid out as ours
    master     features.h5: write_master, and the readers extract uses (previous_files...)
    segments   write_segment(_filled), inventory, compact, remove_strays, remove_unreferenced
    checks     what the store refuses on opening and reading, and the line it says
    places     where the store's rows and views are: views by content, rows by path
    store      FeatureStore, the read-only view every later stage reads, and split_digest

and beside them, imported by their own names (`from pipeline.cache import views`):

    identity   FeatureIdentity: what a row was computed with (backbone, weights, size...)
    index      the index of rows as numpy columns
    views      augmented views of each training image, and reading them back
    settings   the settings a cache remembers, and every stage's start (lock, resolve, run)
    batches    cached rows streamed into Keras as (features, target) batches

Imports pipeline.config, fs and data; never a model, analysis, engines, reporting or a stage.

Callers use the names below, `from pipeline import cache; cache.FeatureStore(...)`. They are
bound here when the package is imported: a test that changes a setting the package reads itself
(COMPACT_BELOW, WRITE_ROWS, MAX_OPEN_SEGMENTS...) patches it where it is defined
(`cache.segments.COMPACT_BELOW`); `cache.READ_BLOCK` is what stream, train_head and audit read.
"""
from .layout import (
    CUT_DATASETS,
    DAMAGE,
    FEATURE_DATASETS,
    MASTER,
    STR,
    VIEW_DATASETS,
    is_segment_name,
    open_master,
    segment_dir,
)
from .master import (
    WRITE_ROWS,
    Layer,
    master_attribute,
    master_segments,
    previous_files,
    previous_unreadable,
    side_file,
    write_master,
)
from .segments import (
    COMPACT_BELOW,
    GROUP_BYTES,
    compact,
    inventory,
    remove_strays,
    remove_unreferenced,
    rows_per_segment,
    write_segment,
    write_segment_filled,
)
from .store import MAX_OPEN_SEGMENTS, READ_BLOCK, READ_GAP, FeatureStore, split_digest

__all__ = [
    "COMPACT_BELOW", "CUT_DATASETS", "DAMAGE", "FEATURE_DATASETS", "GROUP_BYTES", "MASTER",
    "MAX_OPEN_SEGMENTS", "READ_BLOCK", "READ_GAP", "STR", "VIEW_DATASETS", "WRITE_ROWS",
    "FeatureStore", "Layer", "compact", "inventory", "is_segment_name", "master_attribute",
    "master_segments", "open_master", "previous_files", "previous_unreadable", "remove_strays",
    "remove_unreferenced", "rows_per_segment", "segment_dir", "side_file", "split_digest",
    "write_master", "write_segment", "write_segment_filled",
]
