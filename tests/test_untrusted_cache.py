"""A shared features/<NAME> is untrusted: a segment or a master is used only in the layout
pipeline/cache writes, so that no cache reads (or exports) bytes from outside itself, and none
declares more than its bytes hold.

Each test checks that the files outside features/<NAME> and models/<NAME> are unchanged, the
outcome, the one line the user reads, and that the run after the refusal is clean.
"""
import os

import h5py
import numpy as np
import pytest
from test_hostile_cache import assert_same_features, features_by_path, one_line, segment_files
from test_hostile_models import finishes, outside

from pipeline import cache, export, extract
from pipeline.config import UserError

ROW = (1, 1, 512)  # block5_pool at SIZE=32


@pytest.fixture
def cached(prepared):
    """12 tiny images extracted into one segment (no cut kept for fine-tuning); the clean
    features by path."""
    config = prepared((extract.run,), name="tiny", finetune_from="images")
    [segment] = segment_files(config.features_dir)
    return config, segment, features_by_path(config.features_dir)


def rewrite_segment(segment, how, elsewhere):
    """Replace `segment` by one of the same rows whose `features` is laid out as `how` says,
    reading from the file `elsewhere` (outside the cache) where the layout allows it."""
    with h5py.File(segment, "r") as f:
        features, shas = f["features"][:], f["sha256"][:]
    n = len(shas)
    if how == "external storage":
        with open(elsewhere, "wb") as out:
            out.write(np.ones((n, *ROW), np.float32).tobytes())
    elif how in ("absolute virtual source", "external link"):
        with h5py.File(elsewhere, "w") as out:
            out.create_dataset("features", data=np.ones((n, *ROW), np.float32))
    os.remove(segment)
    with h5py.File(segment, "w") as f:
        if how == "external storage":
            f.create_dataset("features", (n, *ROW), np.float32,
                             external=[(elsewhere, 0, h5py.h5f.UNLIMITED)])
        elif how == "absolute virtual source":
            layout = h5py.VirtualLayout((n, *ROW), np.float32)
            layout[:] = h5py.VirtualSource(elsewhere, "features", shape=(n, *ROW))
            f.create_virtual_dataset("features", layout)
        elif how == "external link":
            f["features"] = h5py.ExternalLink(elsewhere, "features")
        elif how == "other shape":  # checksummed and well formed, but not this identity's rows
            f.create_dataset("features", data=np.ones((n, 2, 2, 512), np.float32),
                             chunks=True, fletcher32=True)
        elif how == "other dtype":
            f.create_dataset("features", data=features.astype(np.float16), chunks=True,
                             fletcher32=True)
        else:  # "no checksums": as before checksums existed
            f.create_dataset("features", data=features)
        f.create_dataset("sha256", data=shas, chunks=True, fletcher32=True)


@pytest.mark.parametrize("how, reason", [
    ("external storage", "features is stored in another file"),
    ("absolute virtual source", "features is a virtual dataset"),
    ("external link", r"features is a link \(ExternalLink\)"),
    ("other shape", r"rows of float32 \(2, 2, 512\), not float32 \(1, 1, 512\)"),
    ("other dtype", r"rows of float16 \(1, 1, 512\), not float32 \(1, 1, 512\)"),
    ("no checksums", "features has no checksums"),
])
def test_a_segment_not_in_our_layout_is_computed_again(cached, tmp_path, capsys, how, reason):
    """A segment reading another file (external storage, a virtual source, an external link)
    passed as a checksum-less one: extract reused its 12 rows and `make export` copied the
    other file's bytes. Rows of another shape or dtype were reused as well."""
    config, segment, clean = cached
    rewrite_segment(segment, how, str(tmp_path / "elsewhere.bin"))
    before = outside(config, tmp_path)
    capsys.readouterr()

    again = extract.run(config)

    assert outside(config, tmp_path) == before
    assert (again.new, again.reused) == (12, 0)
    assert not os.path.exists(segment)
    printed = capsys.readouterr().out.splitlines()
    assert __import__("re").fullmatch(
        f"{segment} is damaged \\({reason}\\): deleted; its images will be computed again",
        printed[0]), printed[0]
    assert_same_features(features_by_path(config.features_dir), clean)
    exported = export.run(config.replace(out=str(tmp_path / "out.h5")))
    with h5py.File(exported.path, "r") as f:
        assert not (f["features"][:] == 1).all()  # not the file elsewhere
    capsys.readouterr()
    assert extract.run(config).new == 0  # the run after is clean
    assert "12 rows, 0 new, 12 reused" in one_line(capsys.readouterr().out)


def test_a_segment_declaring_more_rows_than_it_holds_is_computed_again(cached, tmp_path,
                                                                       capsys):
    """A 800 KB segment declaring 2^36 hashes: reading them asked for 4 TiB (a traceback)."""
    config, segment, clean = cached
    with h5py.File(segment, "r") as f:
        features, shas = f["features"][:], f["sha256"][:]
    os.remove(segment)
    with h5py.File(segment, "w") as f:
        big = f.create_dataset("features", (2**36, *ROW), np.float32, chunks=(1, *ROW),
                               fletcher32=True)
        big[:len(features)] = features
        hashes = f.create_dataset("sha256", (2**36,), "S64", chunks=(64,), fletcher32=True)
        hashes[:len(shas)] = shas
    before = outside(config, tmp_path)
    capsys.readouterr()

    again = extract.run(config)

    assert outside(config, tmp_path) == before
    assert (again.new, again.reused) == (12, 0)
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed == (f"{segment} is damaged (declares {2**36} rows, more than its "
                       f"{printed.split('its ')[1].split(' bytes')[0]} bytes hold): deleted; "
                       "its images will be computed again")
    assert_same_features(features_by_path(config.features_dir), clean)
    assert extract.run(config).new == 0


def rewrite_master(master, how, elsewhere, segment):
    """Edit features.h5 in place as `how` says, towards the file `elsewhere` outside the cache."""
    with h5py.File(master, "r+") as f:
        n = len(f["label"])
        if how == "absolute virtual source":
            with h5py.File(elsewhere, "w") as out:
                out.create_dataset("features", data=np.ones((n, *ROW), np.float32))
            source = elsewhere
        elif how == "relative source with ..":
            source = os.path.join("..", "..", os.path.relpath(segment, os.path.dirname(
                os.path.dirname(master))))
        elif how == "another dataset of a segment":  # say, an ExternalLink planted there
            source = os.path.relpath(segment, os.path.dirname(master))
        if how in ("absolute virtual source", "relative source with ..",
                   "another dataset of a segment"):
            layout = h5py.VirtualLayout((n, *ROW), np.float32)
            layout[:] = h5py.VirtualSource(source, "features" if "source" in how else "elsewhere",
                                           shape=(n, *ROW))
            del f["features"]
            f.create_virtual_dataset("features", layout, fillvalue=np.nan)
        elif how == "external link":
            with h5py.File(elsewhere, "w") as out:
                out.create_dataset("label", data=np.zeros(n, np.int64))
            del f["label"]
            f["label"] = h5py.ExternalLink(elsewhere, "label")
        elif how == "external storage":
            with open(elsewhere, "wb") as out:
                out.write(np.zeros(n, np.int64).tobytes())
            del f["file_size"]
            f.create_dataset("file_size", (n,), np.int64, external=[(elsewhere, 0, 8 * n)])
        else:  # "2^40 labels" in a file of a few KB: export looped for minutes
            labels = f["label"][:]
            del f["label"]
            f.create_dataset("label", (2**40,), np.int64, chunks=(64,), fletcher32=True)
            f["label"][:n] = labels


@pytest.mark.parametrize("how, reason", [
    ("absolute virtual source", "features reads '/.*elsewhere.h5', not a segment of its own "
                                "folder"),
    ("relative source with ..", "features reads '../../.*', not a segment of its own folder"),
    ("another dataset of a segment", "features reads 'elsewhere' of a segment, not its "
                                     "features"),
    ("external link", r"label is a link \(ExternalLink\)"),
    ("external storage", "file_size is stored in another file"),
    ("2^40 labels", f"label declares {2**40} entries, more than the file's [0-9]+ bytes hold"),
])
def test_a_master_not_in_our_layout_is_refused_then_rebuilt(cached, tmp_path, capsys, how,
                                                            reason):
    config, segment, clean = cached
    master = os.path.join(config.features_dir, cache.MASTER)
    rewrite_master(master, how, str(tmp_path / "elsewhere.h5"), segment)
    before = outside(config, tmp_path)
    out = str(tmp_path / "out.h5")

    for stage in (lambda: cache.FeatureStore(config.features_dir),
                  lambda: export.run(config.replace(out=out))):
        with pytest.raises(UserError, match=f"^{master} is damaged \\({reason}\\): run "
                                            "`make extract` to rebuild it$"):
            finishes(stage, [], seconds=60)  # 2^40 labels: "blocked" means it looped
    assert outside(config, tmp_path) == before
    assert not os.path.exists(out)
    capsys.readouterr()
    rebuilt = extract.run(config)

    assert outside(config, tmp_path) == before
    assert (rebuilt.new, rebuilt.reused, rebuilt.changed) == (0, 12, True)
    assert_same_features(features_by_path(config.features_dir), clean)
    assert "12 rows, 0 new, 12 reused" in one_line(capsys.readouterr().out)


def test_a_master_reading_a_linked_segment_is_refused(cached, tmp_path):
    """A segment file that is a link, where the master expects one, would be read outside."""
    config, segment, _ = cached
    moved = str(tmp_path / "moved.h5")
    os.replace(segment, moved)
    os.symlink(moved, segment)
    before = outside(config, tmp_path)
    name = os.path.relpath(segment, config.features_dir)
    with pytest.raises(UserError, match=f"has a damaged segment {name} \\({name} is a link\\): "
                                        "run `make extract` to recompute it$"):
        cache.FeatureStore(config.features_dir)
    assert outside(config, tmp_path) == before
