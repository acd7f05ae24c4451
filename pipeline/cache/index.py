"""The cache's index of rows as numpy columns, not one Python object per row (no h5py here).

At a million images a dict {sha256: (segment, row, rows)} costs about 400 bytes a row (the key's
str, the tuple, its ints, the dict's slot); these columns cost 72: the key as 64 ASCII bytes, a
segment number into a list of names and the row as int32, and the segment's row count once per
segment. Keys are kept sorted, so a lookup is a binary search.
"""
import numpy as np

KEY = "S64"           # a sha256 (or a view's key, augment.view_key) as 64 hex digits
MERGE_EVERY = 65536   # entries added one at a time are folded into the columns this often


def as_keys(keys):
    """An array of KEY from str or bytes keys (or an array of KEY)."""
    if isinstance(keys, np.ndarray):
        return keys if keys.dtype == np.dtype(KEY) else as_keys(keys.tolist())
    # straight from the list: np.asarray of str would first make a '<U64' array, 256 B a key
    return np.array([k.encode() if isinstance(k, str) else k for k in keys], KEY).reshape(-1)


class SegmentIndex:
    """key -> (segment, row, rows in that segment), used like the dict it replaces (`in`, [],
    update, items, len), plus vectorised `find`. When a key is added twice, the later wins:
    segments are added oldest first (cache.inventory), and a new segment replaces an old one."""

    def __init__(self):
        self.segments, self.segment_rows = [], []  # per segment number: its name, its rows
        self._number = {}                          # segment name -> number
        self.keys = np.empty(0, KEY)               # sorted, unique
        self.segment = np.empty(0, np.int32)       # per key: segment number
        self.row = np.empty(0, np.int32)           # per key: row in that segment
        self._recent = {}                          # key -> (segment number, row), not folded yet
        self._added = []                           # (keys, segments, rows) arrays, not folded

    # ---------------------------------------------------------------------------------------
    # adding
    # ---------------------------------------------------------------------------------------

    def number(self, segment, rows):
        """The number of `segment` (a path relative to features_dir), added when new."""
        if segment not in self._number:
            self._number[segment] = len(self.segments)
            self.segments.append(segment)
            self.segment_rows.append(int(rows))
        return self._number[segment]

    def add_segment(self, segment, keys):
        """Every row of one segment, keys in row order."""
        keys = as_keys(keys)
        self._fold_recent()
        number = self.number(segment, len(keys))
        self._added.append((keys, np.full(len(keys), number, np.int32),
                            np.arange(len(keys), dtype=np.int32)))
        if sum(len(k) for k, _, _ in self._added) >= MERGE_EVERY:
            self.fold()

    def __setitem__(self, key, value):
        segment, row, rows = value
        self._recent[_key(key)] = (self.number(segment, rows), int(row))
        if len(self._recent) >= MERGE_EVERY:
            self.fold()

    def update(self, mapping):
        for key, value in mapping.items():
            self[key] = value

    def _fold_recent(self):
        if self._recent:
            keys = np.array(list(self._recent), KEY)
            numbers = np.array([v for v, _ in self._recent.values()], np.int32)
            rows = np.array([r for _, r in self._recent.values()], np.int32)
            self._added.append((keys, numbers, rows))
            self._recent = {}

    def fold(self):
        """Fold everything added into the sorted columns; a later entry wins over an earlier."""
        self._fold_recent()
        if not self._added:
            return
        keys = np.concatenate([self.keys] + [k for k, _, _ in self._added])
        segment = np.concatenate([self.segment] + [s for _, s, _ in self._added])
        row = np.concatenate([self.row] + [r for _, _, r in self._added])
        self._added = []
        order = np.argsort(keys, kind="stable")  # equal keys stay in the order they came
        keys = keys[order]
        last = np.append(keys[1:] != keys[:-1], True) if len(keys) else np.ones(0, bool)
        self.keys, self.segment, self.row = keys[last], segment[order[last]], row[order[last]]

    # ---------------------------------------------------------------------------------------
    # reading
    # ---------------------------------------------------------------------------------------

    def find(self, keys):
        """Position of each key in the columns (keys, segment, row), -1 where absent."""
        self.fold()
        keys = as_keys(keys)
        at = np.searchsorted(self.keys, keys)
        found = at < len(self.keys)
        found[found] = self.keys[at[found]] == keys[found]
        return np.where(found, at, -1)

    def __contains__(self, key):
        return self.find([_key(key)])[0] >= 0

    def __getitem__(self, key):
        at = self.find([_key(key)])[0]
        if at < 0:
            raise KeyError(key)
        return self._entry(at)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def _entry(self, at):
        number = int(self.segment[at])
        return self.segments[number], int(self.row[at]), self.segment_rows[number]

    def __len__(self):
        self.fold()
        return len(self.keys)

    def __iter__(self):
        self.fold()
        return (k.decode() for k in self.keys)

    def items(self):
        self.fold()
        return ((k.decode(), self._entry(at)) for at, k in enumerate(self.keys))

    def only(self, keys):
        """A new index of the given keys that this one holds."""
        at = self.find(keys)
        at = np.unique(at[at >= 0])
        out = SegmentIndex()
        out.segments, out.segment_rows = list(self.segments), list(self.segment_rows)
        out._number = dict(self._number)
        out.keys, out.segment, out.row = self.keys[at], self.segment[at], self.row[at]
        return out

    def rows_of_segments(self):
        """Rows per segment number, as an array over `segments`."""
        self.fold()
        return np.asarray(self.segment_rows, np.int64)


def _key(key):
    return key if isinstance(key, bytes) else key.encode()


# --------------------------------------------------------------------------------------------
# The rows of a master, and what the master records of files already hashed
# --------------------------------------------------------------------------------------------

ROW_FIELDS = ("path", "label", "sha256", "split", "size", "mtime_ns", "segment_row",
              "segment_rows")


class Rows:
    """The rows of features.h5 as columns: `path` (object array of str), `label`, `sha256`
    (KEY), `split` (bytes), `size`, `mtime_ns`, `segment_row`, `segment_rows` and `segment`,
    a number into `segments` (names)."""

    def __init__(self, segments, segment, **columns):
        self.segments, self.segment = list(segments), np.asarray(segment, np.int32)
        for name in ROW_FIELDS:
            setattr(self, name, columns[name])

    @classmethod
    def from_dicts(cls, rows):
        """From dicts with the keys of ROW_FIELDS and `segment` (a name), as tests write them."""
        rows = list(rows)
        numbers = {}
        segment = [numbers.setdefault(r["segment"], len(numbers)) for r in rows]
        columns = {
            "path": np.array([r["path"] for r in rows] + [None], dtype=object)[:-1],
            "label": np.array([r["label"] for r in rows], np.int64),
            "sha256": np.array([r["sha256"] for r in rows], KEY),
            "split": np.array([r["split"].encode() for r in rows], "S"),
            "size": np.array([r["size"] for r in rows], np.int64),
            "mtime_ns": np.array([r["mtime_ns"] for r in rows], np.int64),
            "segment_row": np.array([r["segment_row"] for r in rows], np.int64),
            "segment_rows": np.array([r["segment_rows"] for r in rows], np.int64)}
        return cls(list(numbers), segment, **columns)

    @classmethod
    def of(cls, rows):
        return rows if isinstance(rows, cls) else cls.from_dicts(rows)

    def __len__(self):
        return len(self.label)

    def place(self, known):
        """Point every row at where its features are in `known` (a compacted SegmentIndex)."""
        at = known.find(self.sha256)
        if (at < 0).any():
            raise KeyError(self.sha256[at < 0][0].decode())
        self.segments = list(known.segments)
        self.segment = known.segment[at]
        self.segment_row = known.row[at].astype(np.int64)
        self.segment_rows = known.rows_of_segments()[self.segment]

    def segment_names(self):
        """Per row, its segment's name (an object array)."""
        return np.array(self.segments + [None], dtype=object)[:-1][self.segment]

    def stored_order(self):
        """The order rows are stored in: by segment (name), row, then path (images with the
        same content share a row)."""
        by_path = np.argsort(self.path, kind="stable")
        rank = np.argsort(np.argsort(np.array(self.segments + [None], dtype=object)[:-1],
                                     kind="stable"))
        return by_path[np.lexsort((self.segment_row[by_path], rank[self.segment[by_path]]))]


def runs(segment, row):
    """(start, stop) of each run of consecutive rows of one segment in (segment, row) order."""
    if len(segment) == 0:
        return []
    breaks = np.flatnonzero((segment[1:] != segment[:-1]) | (row[1:] != row[:-1] + 1)) + 1
    edges = np.concatenate([[0], breaks, [len(segment)]])
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


class Previous:
    """path -> (size, mtime_ns, sha256) of the last run's master, as sorted columns; `get` as
    the dict it replaces, `find` for many paths at once."""

    def __init__(self, paths=(), sizes=(), mtimes=(), shas=()):
        paths = np.array(list(paths) + [None], dtype=object)[:-1]
        order = np.argsort(paths, kind="stable")
        self.paths, self.sizes = paths[order], np.asarray(sizes, np.int64)[order]
        self.mtimes, self.shas = np.asarray(mtimes, np.int64)[order], as_keys(shas)[order]

    def find(self, paths):
        """Position of each path, -1 where the last run did not have it."""
        paths = np.array(list(paths) + [None], dtype=object)[:-1]
        if len(self.paths) == 0:
            return np.full(len(paths), -1)
        at = np.minimum(np.searchsorted(self.paths, paths), len(self.paths) - 1)
        return np.where(self.paths[at] == paths, at, -1)

    def get(self, path, default=None):
        at = self.find([path])[0]
        if at < 0:
            return default
        return int(self.sizes[at]), int(self.mtimes[at]), self.shas[at].decode()

    def __len__(self):
        return len(self.paths)
