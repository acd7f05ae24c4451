"""FeatureStore: the read-only view of a cache that every stage after extract reads.

Opening checks the whole cache before a stage spends minutes on it: the master is laid out as
this package writes it (layout.open_master), its index is read through its checksums, every
segment it names is there, its own and laid out as a segment, and its identity can build a
backbone. A missing, damaged or changed cache is one UserError naming `make extract`.

The row index (labels, splits) is then held in memory, `paths` and `sha256` loaded on first
use; features never are. `read` reads any rows through the virtual dataset in few contiguous
reads (at most READ_BLOCK rows, never spanning more than READ_GAP unwanted ones), `blocks`
streams consecutive blocks of rows, so a cache larger than memory streams. A chunk whose bytes
changed fails its Fletcher-32 checksum, a lost segment reads as NaN and a value that is not
finite was written by no extract: each is a UserError naming the segment (`damage` keeps it for
readers inside another framework's threads).

HDF5 keeps every segment file read through a virtual dataset open, about 2 MB each; the store
reopens the master before it would hold more than MAX_OPEN_SEGMENTS (`_touch`).

A re-extract may replace the master and delete the segments it merged while a stage reads: the
store then reads on through the new master when it holds exactly the same rows (`_follow`,
places.row_map), and refuses in one line when it does not.
"""
import hashlib
import os
import threading

import h5py
import numpy as np

from ..config import UserError
from . import checks, layout, places
from .checks import MasterReplaced, SegmentLost, damaged_master
from .identity import FeatureIdentity, identity_problem
from .layout import DAMAGE, MASTER, open_master
from .master import WRITE_ROWS, decode_attr, read_index

READ_BLOCK = 1024         # rows per contiguous read from the virtual dataset
READ_GAP = 16             # unwanted rows a read may span rather than start another
MAX_OPEN_SEGMENTS = 64    # segment files a FeatureStore keeps open at most (see _touch)
# What a master must share with the one a reader opened for the reader to read on through it
SAME_READING = ("identity", "class_names", "augment", "cut")


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
            raise layout.no_cache(features_dir)
        self.file, index, self._opened = checks.open_checked(features_dir, self.path)
        self.features = self.file["features"]
        self._lock = threading.RLock()  # one reader at a time: a reopening closes the file
        self._open, self._sources = set(), {}
        self._row_map = None  # our rows' places in a master that replaced ours (`_follow`)
        self.labels = index["label"]
        self.splits = index["split"]
        self._paths = self._sha256 = self._split_digest = None
        self.attrs = {k: decode_attr(v) for k, v in self.file.attrs.items()}
        self._check_identity()
        self._views_by_row(index)
        # The last damage met while reading: a reader running inside another framework (tf.data
        # turns a generator's exception into its own) can raise this one line instead.
        self.damage = None

    def _check_identity(self):
        """The identity every stage builds its backbone from (`identity_problem`)."""
        problem = identity_problem(self.attrs.get("identity"))
        if problem:
            self.file.close()
            raise UserError(f"{self.path} is damaged or not written by this pipeline ({problem}"
                            "): run `make extract` to rebuild it")

    def _views_by_row(self, index):
        """AUGMENT=K: `views` = K and, per layer ("" for the features, "cut_" for the cut's
        activations), training row and view 1..K, the position of that view in
        `<layer>view_features` (-1: none, as for validation and test rows); K = 0 without views.
        Views are keyed by content: every training row of one sha256 (copies of one image)
        reads the same views."""
        self.views, self.view_features, self._view_at = 0, None, {}
        if "view_features" not in self.file:
            return
        self.view_features = self.file["view_features"]
        # AUGMENT of the last extract; views beyond it (of an earlier, larger AUGMENT) are kept
        # in the file but not read
        self.views = int(self.attrs.get("augment", {}).get("views", 0))
        train = self.rows("train")
        train_shas = np.asarray(self.sha256[train].tolist(), "S64")
        self._view_at = {layer: places.view_table(index, layer, train, train_shas, self.views,
                                                  len(self.labels))
                         for layer in ("", "cut_") if f"{layer}view_features" in self.file}

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
        return self._surviving(lambda: self._read_views(np.asarray(indices), np.asarray(views),
                                                        layer))

    def _read_views(self, indices, views, layer):
        out = np.empty((len(indices), *self.shape(f"{layer}features")), np.float32)
        plain = views == 0
        out[plain] = self._read(self._placed(indices[plain]), f"{layer}features")
        if not plain.all():
            view_at = self._view_at.get(layer)
            at = (view_at[indices[~plain], views[~plain]] if view_at is not None
                  else np.full(int((~plain).sum()), -1))
            if (at < 0).any():
                raise UserError(f"{self.path} has no view {int(views[~plain][at < 0][0])} of row "
                                f"{int(indices[~plain][at < 0][0])}: rerun `make extract` with "
                                "the AUGMENT the head trains with")
            out[~plain] = self._read(at, f"{layer}view_features")
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
        if not self.file:  # h5py's error for a closed file would read as damage
            raise RuntimeError(f"{self.path} read after its FeatureStore was closed")
        try:
            with self._lock:
                return read_index(self.file, (name,))[name]
        except DAMAGE as error:
            raise damaged_master(self.path, error) from None

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
        """The identity as the cache records it (a dict: what models record and compare)."""
        return self.attrs["identity"]

    @property
    def feature_identity(self):
        """The identity read as a FeatureIdentity: its image size, precision, shape, dtype."""
        return FeatureIdentity.read(self.identity)

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
        dataset named (`features`, or `cut_features` for the cut's activations)."""
        return self._surviving(lambda: self._read(self._placed(np.asarray(indices)), dataset))

    def _placed(self, rows):
        """Our rows' places in the master read now: themselves, or where `_follow` found them."""
        return rows if self._row_map is None else self._row_map[rows]

    def _surviving(self, read):
        """read(), and once more through the master another extract put in place of ours, when
        ours lost a segment (compaction deletes the segments it merged) or was replaced while
        read: `_follow` finds our rows there, or the first refusal stands."""
        try:
            return read()
        except (SegmentLost, MasterReplaced) as refusal:
            with self._lock:
                followed = self._follow()
            if followed is None:  # ours is still in place: its segment is lost indeed
                raise refusal from None
            if not followed:
                self.damage = MasterReplaced(
                    f"{self.path} was replaced while this stage read it, by a `make extract` "
                    "with other images or settings: run the same command again")
                raise self.damage from None
            self.damage = None
            return read()

    def _read(self, indices, dataset):
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
                self.damage = checks.unreadable(self.features_dir, start, stop, source, error)
                raise self.damage from None
            if not np.isfinite(block).all():  # extract writes none: the cache is damaged
                self.damage = checks.not_finite(self.features_dir, block, start, stop, source)
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
            # not ours any more: reopening would read another master's rows (`_surviving`)
            if checks.master_stat(self.path) != self._opened:
                raise MasterReplaced(f"{self.path} was replaced or removed while this stage "
                                     "read it: run the same command again")
            self.file.close()
            try:
                self.file = open_master(self.path)
            except DAMAGE as error:
                raise damaged_master(self.path, error) from None
            self.features = self.file["features"]
            if self.view_features is not None:
                self.view_features = self.file["view_features"]
            self._open = set()
        self._open |= touched

    def blocks(self, rows, size=READ_BLOCK):
        """(row indices, features) for each block of `size` consecutive entries of `rows`, in
        their order. Only one block is in memory at a time, so a cache larger than memory
        streams. (The shuffled order training reads in is stream.block_plan.)"""
        for start in range(0, len(rows), size):
            indices = rows[start:start + size]
            yield indices, self.read(indices)

    def write_standalone(self, fileobj, leave_out=()):
        """Write this cache into `fileobj` (an open binary file) as one HDF5 file that stands
        alone: the master's attributes and its datasets but `features` and those in `leave_out`,
        copied as they are, and `features` as a real, checksummed dataset of the stored dtype,
        copied a block at a time, so that memory stays at one block whatever the cache's size.
        What to leave out is the caller's policy (export.LEFT_OUT)."""
        n, shape, dtype = len(self), self.features.shape[1:], self.features.dtype
        with h5py.File(fileobj, "w") as out:
            for name, item in self.file.items():
                if name != "features" and name not in leave_out:
                    self.file.copy(item, out, name=name)
            for key, value in self.file.attrs.items():
                out.attrs[key] = value
            features = out.create_dataset("features", (n, *shape), dtype, fletcher32=True,
                                          chunks=layout.chunks(n, shape, dtype) if n else None)
            for start in range(0, n, READ_BLOCK):
                stop = min(start + READ_BLOCK, n)
                features[start:stop] = self.block(start, stop)

    def _follow(self):
        """Read on through the master on disk when it is another than ours and holds exactly
        our rows (places.row_map) with our identity, classes, views and cut: what an extract
        that changed nothing but the segments (compaction) writes. True when it does; None when
        ours is still in place (or none is); False for another master."""
        if checks.master_stat(self.path) in (None, self._opened):
            return None
        ours = {"path": self.paths, "sha256": self.sha256, "label": self.labels,
                "split": self.splits}
        try:
            f, index, opened = checks.open_checked(self.features_dir, self.path,
                                                   ("path", "sha256"))
        except UserError:
            return False
        attrs = {key: decode_attr(f.attrs[key]) for key in SAME_READING if key in f.attrs}
        same = all(attrs.get(key) == self.attrs.get(key) for key in SAME_READING)
        mapping = places.row_map(ours, index) if same else None
        if mapping is None:
            f.close()
            return False
        self.file.close()
        self.file, self.features, self._opened, self._row_map = f, f["features"], opened, mapping
        self._sources, self._open = {}, set()
        self._views_by_row(index)  # our training rows' views, where the new master has them
        return True

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

