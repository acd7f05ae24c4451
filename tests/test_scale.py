"""A million images: the cache's index is held as numpy columns, not one Python object
per row, and features.h5 is streamed to disk in bounded pieces, with the same content as
before. (Seconds and peak memory are measured by bench/scale.py, not here.)"""
import hashlib
import json
import os

import h5py
import numpy as np

from pipeline import cache, extract
from pipeline.cache import index, views
from pipeline.config import Config
from pipeline.data import datasets
from pipeline.fs import files


def sha(i):
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_inventory_is_numpy_columns_and_a_later_segment_wins(tmp_path):
    folder = str(tmp_path)
    shape = (1, 1, 1, 4)
    old = cache.write_segment(folder, "id", [sha(0), sha(1)], np.zeros((2, *shape[1:]),
                                                                      np.float32))
    new = cache.write_segment(folder, "id", [sha(1), sha(2), sha(3)],
                              np.ones((3, *shape[1:]), np.float32))
    known = cache.inventory(folder, "id")
    assert isinstance(known, index.SegmentIndex)
    assert known.keys.dtype == np.dtype("S64") and known.row.dtype == np.int32
    assert known.segment.dtype == np.int32 and len(known.keys) == 4  # no dict of rows
    assert known[sha(0)] == (old, 0, 2)
    assert known[sha(1)] == (new, 0, 3)  # in both: the later segment's
    assert sha(9) not in known and set(known) == {sha(i) for i in range(4)}
    known[sha(9)] = ("segments/id/seg-x.h5", 5, 7)  # as extract's engines add rows
    known.update({sha(0): (new, 2, 3)})
    assert known[sha(9)] == ("segments/id/seg-x.h5", 5, 7) and known[sha(0)] == (new, 2, 3)
    assert list(known.find([sha(2), sha(8)]) >= 0) == [True, False]
    only = known.only(index.as_keys([sha(1), sha(2), sha(8)]))
    assert dict(only.items()) == {sha(1): (new, 0, 3), sha(2): (new, 1, 3)}


def test_segment_index_folds_many_additions(monkeypatch):
    monkeypatch.setattr(index, "MERGE_EVERY", 3)
    known = index.SegmentIndex()
    for i in range(10):
        known[sha(i)] = (f"s{i % 2}", i, 10)
    known[sha(4)] = ("s9", 0, 1)  # later wins, also across folds
    assert len(known) == 10 and known[sha(4)] == ("s9", 0, 1) and known[sha(5)] == ("s1", 5, 10)


def rows_of(folder, n):
    shape = (1, 1, 1, 4)
    features = np.arange(n * 4, dtype=np.float32).reshape(n, *shape[1:])
    shas = [sha(i) for i in range(n)]
    halves = [cache.write_segment(folder, "id", shas[:n // 2], features[:n // 2]),
              cache.write_segment(folder, "id", shas[n // 2:], features[n // 2:])]
    rows = [dict(path=f"{'ab'[i % 2]}/{n - i:04d}.jpg", label=i % 2, sha256=shas[i],
                 split=("train", "validation", "test")[i % 3], size=i, mtime_ns=10 * i,
                 segment=halves[i >= n // 2], segment_row=i % (n // 2), segment_rows=n // 2)
            for i in range(n)]
    return rows, features, shape[1:]


def test_master_is_streamed_in_bounded_pieces_with_the_same_content(tmp_path, monkeypatch):
    """features.h5 was built whole in memory (about 150 MB at a million rows) and written at
    once; it is now written into its temporary file WRITE_ROWS rows at a time."""
    folder = str(tmp_path)
    rows, features, shape = rows_of(folder, 50)
    written = []
    atomic_write = files.atomic_write

    def spy(path, content):
        written.append(content)
        return atomic_write(path, content)
    monkeypatch.setattr(files, "atomic_write", spy)
    monkeypatch.setattr(cache.master, "WRITE_ROWS", 7)  # 8 pieces of 50 rows
    cache.write_master(folder, rows, {"class_names": ["a", "b"]}, shape, np.float32, {})
    assert callable(written[0])  # streamed, not bytes built in memory
    in_order = sorted(rows, key=lambda r: (r["segment"], r["segment_row"], r["path"]))
    with h5py.File(f"{folder}/{cache.MASTER}") as f:
        assert list(f["path"].asstr()[:]) == [r["path"] for r in in_order]
        assert list(f["sha256"][:]) == [r["sha256"].encode() for r in in_order]
        assert list(f["label"][:]) == [r["label"] for r in in_order]
        assert list(f["split"][:]) == [r["split"].encode() for r in in_order]
        assert f["split"].dtype == np.dtype("S10") and f["sha256"].fletcher32
        assert list(f["file_size"][:]) == [r["size"] for r in in_order]
        assert list(f["file_mtime_ns"][:]) == [r["mtime_ns"] for r in in_order]
        np.testing.assert_array_equal(f["features"][:], features)  # bit-identical features
        assert len(list(f["features"].virtual_sources())) == 2  # one run per segment


def test_index_digest_is_that_of_the_whole_json_list(tmp_path):
    """The digest is fed row by row but equals the one of json.dumps of the whole index, so a
    cache written before is not rewritten."""
    rows, _, _ = rows_of(str(tmp_path), 20)
    more = [{"backbone": "x"}, ["a", "b"]]
    whole = json.dumps([[r["path"], r["label"], r["sha256"], r["split"], r["segment"],
                         r["segment_row"]] for r in sorted(rows, key=lambda r: r["path"])]
                       + more)
    assert (extract._index_digest(index.Rows.of(rows), more)
            == hashlib.sha256(whole.encode()).hexdigest())


def test_previous_files_are_columns_that_answer_like_a_dict(tmp_path):
    folder = str(tmp_path)
    rows, _, shape = rows_of(folder, 10)
    cache.write_master(folder, rows, {"class_names": ["a", "b"]}, shape, np.float32, {})
    previous = cache.previous_files(folder)
    assert isinstance(previous, index.Previous) and previous.paths.dtype == object
    assert previous.get(rows[3]["path"]) == (3, 30, rows[3]["sha256"])
    assert previous.get("c/none.jpg", (None, None, None)) == (None, None, None)
    assert list(previous.find(["c/none.jpg", rows[0]["path"]]) >= 0) == [False, True]


def test_views_wanted_reads_columns_as_it_read_dicts():
    config = Config(augment=2, seed=0)
    rows = [dict(path=f"p{i}", label=0, sha256=sha(i), split=("train", "test")[i % 2], size=0,
                 mtime_ns=0, segment="s", segment_row=i, segment_rows=6) for i in range(6)]
    wanted = views.wanted(config, rows, None, index.SegmentIndex())
    train = sorted((r for r in rows if r["split"] == "train"), key=lambda r: r["sha256"])
    assert [(s, v, p) for _, s, v, p in wanted] == [(r["sha256"], v, r["path"])
                                                    for v in (1, 2) for r in train]


def test_hashing_hands_the_engine_bounded_pieces(tmp_path, monkeypatch):
    """The lists of full paths and of hashes were built for all files at once (~200 MB at a
    million); the engine now gets HASH_AT_ONCE files at a time, in order."""
    for i in range(7):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.jpg").write_bytes(str(i).encode())
    dataset = datasets.Dataset(str(tmp_path), "folders", ["a"],
                               [datasets.ImageFile(f"a/{i}.jpg", 0) for i in range(7)], [])
    calls = []

    def sha256_of(paths):
        calls.append(len(paths))
        return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]
    monkeypatch.setattr(extract, "HASH_AT_ONCE", 3)
    shas, sizes, _ = extract._hash_files(dataset, index.Previous(), sha256_of)
    assert calls == [3, 3, 1]
    assert [s.decode() for s in shas] == [sha(i) for i in range(7)] and list(sizes) == [1] * 7


def test_discovery_keeps_no_per_file_dict_or_directory_entry(tmp_path, monkeypatch):
    """A million ImageFile's __dict__ and a folder's DirEntry objects (each with its cached
    stat) were most of the driver's memory after discovery."""
    assert not hasattr(datasets.ImageFile("a/1.jpg", 0), "__dict__")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "1.jpg").write_bytes(b"\xff\xd8\xff")

    def no_scandir(*args):
        raise AssertionError("walk_files keeps names, not os.scandir's entries")
    monkeypatch.setattr(datasets.os, "scandir", no_scandir)
    found = datasets.discover(str(tmp_path))
    assert [(f.path, f.label) for f in found.files] == [("a/1.jpg", 0), ("b/1.jpg", 1)]


def test_views_of_a_large_split_are_looked_up_a_piece_at_a_time(monkeypatch):
    """Without AUGMENT, extract still asks whether view 1 of each training image is cached:
    the keys of a whole split at once were ~350 B a row (as '<U64' and as str)."""
    monkeypatch.setattr(index, "MERGE_EVERY", 2)
    asked = []
    any_cached = views._any_cached
    monkeypatch.setattr(views, "_any_cached",
                        lambda known, keys: asked.append(len(keys)) or any_cached(known, keys))
    rows = [dict(path=f"p{i}", label=0, sha256=sha(i), split="train", size=0, mtime_ns=0,
                 segment="s", segment_row=i, segment_rows=5) for i in range(5)]
    assert views.wanted(Config(augment=0, seed=0), rows, None, index.SegmentIndex()) == []
    assert asked == [2, 2, 1]


def open_files_under(folder):
    """How many of this process's file descriptors point into `folder`."""
    fds = os.listdir("/proc/self/fd")
    targets = []
    for fd in fds:
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed since the listing
            pass
    return sum(t.startswith(str(folder)) for t in targets)


def test_a_reader_keeps_at_most_max_open_segments_open(tmp_path, monkeypatch):
    """HDF5 keeps every segment it has read through the virtual dataset open, about 2 MB each:
    1.8 GB for train-head at 1M rows. FeatureStore closes and reopens the master before it
    would hold more than MAX_OPEN_SEGMENTS, and what it reads stays exact."""
    monkeypatch.setattr(cache.store, "MAX_OPEN_SEGMENTS", 4)
    folder, shape = tmp_path / "many", (1, 1, 4)
    features = np.arange(160 * 4, dtype=np.float32).reshape(160, *shape)
    rows = []
    for s in range(20):  # 20 segments of 8 rows
        shas = [sha(i) for i in range(8 * s, 8 * s + 8)]
        segment = cache.write_segment(str(folder), "id", shas, features[8 * s:8 * s + 8])
        rows += [dict(path=f"a/{i}.jpg", label=i % 2, sha256=h, split="train", size=1,
                      mtime_ns=0, segment=segment, segment_row=i - 8 * s, segment_rows=8)
                 for i, h in zip(range(8 * s, 8 * s + 8), shas)]
    attrs = {"class_names": ["a", "b"], "identity": {"image_size": 32}, "identity_id": "id"}
    cache.write_master(str(folder), rows, attrs, shape, np.float32, {})
    most = 0
    with cache.FeatureStore(str(folder)) as store:
        for piece in np.array_split(np.random.default_rng(0).permutation(160), 40):
            np.testing.assert_array_equal(store.read(piece), features[piece])
            most = max(most, open_files_under(folder / "segments"))
    assert 1 <= most <= 4
