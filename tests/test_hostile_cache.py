"""The cache layer: hostile and careless input. NAMEs that look like glob patterns,
damaged segments and masters, a full disk, and features.h5 copied without its segments.

Each test checks three things: files outside features/<NAME> are left alone, the outcome, and
the one line the user reads.
"""
import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from helpers import make_image_folder

from pipeline import __main__ as cli
from pipeline import cache, evaluate, extract, predict, train_head
from pipeline.config import UserError
from pipeline.fs import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def contents(top, leave_out=()):
    """{path: sha256 of the bytes} of every file under `top`, except under `leave_out`."""
    found = {}
    for folder, _, names in os.walk(top):
        for name in names:
            path = os.path.join(folder, name)
            if not any(path.startswith(os.path.join(x, "")) for x in leave_out):
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def features_by_path(features_dir):
    with cache.FeatureStore(features_dir) as store:
        return dict(zip(store.paths, store.read(np.arange(len(store)))))


def assert_same_features(a, b):
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path])


def segment_files(features_dir):
    return sorted(os.path.join(folder, name)
                  for folder, _, names in os.walk(os.path.join(features_dir, "segments"))
                  for name in names if name.endswith(".h5"))


def one_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def run_cli(capsys, *argv):
    code = cli.main([*argv, "--augment", "0"])  # as make_config's caches: no views
    return code, capsys.readouterr()


# --------------------------------------------------------------------------------------------
# 1. NAME is a name, never a pattern
# --------------------------------------------------------------------------------------------

def test_a_name_with_brackets_reuses_its_cache(tmp_path, make_config, capsys):
    bracketed = make_config(make_image_folder(tmp_path / "set[1]"))  # NAME = set[1]
    other = make_config(make_image_folder(tmp_path / "other", seed=1))
    extract.run(bracketed)
    extract.run(other)
    segments = segment_files(bracketed.features_dir)
    outside = contents(tmp_path, [bracketed.features_dir])
    capsys.readouterr()

    again = extract.run(bracketed)

    assert contents(tmp_path, [bracketed.features_dir]) == outside
    assert (again.new, again.reused) == (0, 12)
    assert segment_files(bracketed.features_dir) == segments  # none piled up
    assert "12 rows, 0 new, 12 reused" in one_line(capsys.readouterr().out)


def test_a_name_of_glob_characters_leaves_other_datasets_alone(tmp_path, make_config, capsys):
    """NAME='*' (refused by Config now, test_hostile.py) reused and then deleted five other
    datasets' segments; 'set[ab]' is a valid name that globs 'seta' and 'setb' the same way."""
    alpha = make_config(make_image_folder(tmp_path / "seta"))
    beta = make_config(make_image_folder(tmp_path / "setb", seed=1))
    extract.run(alpha)
    extract.run(beta)
    starred = make_config(alpha.data, name="set[ab]")  # the same images as seta, another NAME
    outside = contents(tmp_path, [starred.features_dir])
    capsys.readouterr()

    result = extract.run(starred)

    assert contents(tmp_path, [starred.features_dir]) == outside  # alpha's and beta's segments
    assert (result.new, result.reused) == (12, 0)  # computed for '*', not taken from alpha
    assert_same_features(features_by_path(starred.features_dir),
                         features_by_path(alpha.features_dir))
    assert "12 rows, 12 new, 0 reused" in one_line(capsys.readouterr().out)


def test_only_our_own_temporary_files_are_cleaned_up(image_folder, make_config, capsys):
    config = make_config(image_folder, finetune_from="images")  # the features' segments alone
    extract.run(config)
    folder = config.features_dir
    [segment] = segment_files(folder)
    ours = [files.temporary_name(os.path.join(folder, cache.MASTER)),
            files.temporary_name(segment),
            os.path.join(folder, cache.MASTER + ".tmp"),  # named as before atomic_write
            segment + ".tmp"]
    theirs = [os.path.join(folder, "notes.tmp"), os.path.join(folder, "mine", "draft.h5.tmp"),
              os.path.join(image_folder, "horizontal", "upload.tmp")]
    for path in ours + theirs:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    outside = contents(os.path.dirname(folder), [folder])
    capsys.readouterr()

    again = extract.run(config)

    assert contents(os.path.dirname(folder), [folder]) == outside
    assert [os.path.exists(p) for p in ours + theirs] == [False] * 4 + [True] * 3
    assert again.new == 0
    assert "0 new, 12 reused" in one_line(capsys.readouterr().out)


# --------------------------------------------------------------------------------------------
# 2. Damage is found, named, and repaired by `make extract`
# --------------------------------------------------------------------------------------------

def data_bytes(path, dataset):
    """(offset, size) in the file of a dataset's first chunk, or of its data if not chunked."""
    with h5py.File(path, "r") as f:
        data = f[dataset].id
        if f[dataset].chunks:
            chunk = data.get_chunk_info(0)
            return chunk.byte_offset, chunk.size
        return data.get_offset(), data.get_storage_size()


def damage(path, how):
    """Change the file as a bad disk, a bad copy or a crash would."""
    if how == "changed bytes":  # the middle of the feature data
        offset, size = data_bytes(path, "features")
        with open(path, "r+b") as f:
            f.seek(offset + size // 2)
            f.write(b"\x3f\x80\x00\x00" * 8)  # 1.0f: finite, plausible, wrong
    elif how == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:  # zeroed, as some file systems leave a file after a power cut
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(bytes(size))


@pytest.mark.parametrize("how, reason", [("changed bytes", "checksum mismatch"),
                                         ("truncated", "truncated"),
                                         ("zeroed", "zeroed or not an HDF5 file")])
def test_a_damaged_segment_is_refused_then_recomputed(tmp_path, make_config, monkeypatch,
                                                      capsys, how, reason):
    # keep one segment per batch of 4 images
    monkeypatch.setattr(cache.segments, "COMPACT_BELOW", 1)
    root = make_image_folder(tmp_path / "data")
    config = make_config(root)
    extract.run(config)
    clean = features_by_path(config.features_dir)
    victim = segment_files(config.features_dir)[1]
    with h5py.File(victim, "r") as f:
        victim_rows = len(f["sha256"])
    damage(victim, how)
    outside = contents(tmp_path, [config.features_dir])
    capsys.readouterr()

    with pytest.raises(UserError, match=f"has a damaged segment segments/.*"
                                        f"{os.path.basename(victim)} \\({reason}\\): run "
                                        "`make extract` to recompute it$"):
        with cache.FeatureStore(config.features_dir) as store:
            store.read(np.arange(len(store)))
    code, out = run_cli(capsys, "train-head", "--data", root, "--weights", "none", "--size", "32",
                        "--head", "logreg", "--features-root", config.features_root,
                        "--models-root", config.models_root)
    assert code == 2 and "make extract" in one_line(out.err) and out.err.startswith("error: ")
    repaired = extract.run(config)

    # train-head's lock file is in models/<NAME>, its own
    assert contents(tmp_path, [config.features_dir, config.models_dir]) == outside
    assert (repaired.new, repaired.reused) == (victim_rows, 12 - victim_rows)
    assert_same_features(features_by_path(config.features_dir), clean)
    assert not os.path.exists(victim)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (f"{victim} is damaged ({reason}): deleted; its images will be "
                          "computed again")


def test_a_damaged_test_row_stops_the_dense_head_in_one_line(tmp_path, make_config, monkeypatch,
                                                             capsys):
    """Damage only among the held-out rows surfaced inside Keras as a TensorFlow traceback."""
    monkeypatch.setattr(cache.segments, "COMPACT_BELOW", 1)  # one segment per image: batch_size=1
    root = make_image_folder(tmp_path / "data")
    config = make_config(root, batch_size=1, split="50/25/25")
    extract.run(config)
    with cache.FeatureStore(config.features_dir) as store:
        held_out = set(store.sha256[store.rows("test")])
    victim = next(path for path in segment_files(config.features_dir)
                  if set(h5py.File(path, "r")["sha256"].asstr()[:]) <= held_out)
    damage(victim, "changed bytes")
    capsys.readouterr()
    code, out = run_cli(capsys, "train-head", "--data", root, "--weights", "none", "--size", "32",
                        "--head", "dense", "--epochs", "1", "--split", "50/25/25",
                        "--features-root", config.features_root,
                        "--models-root", config.models_root)
    assert code == 2 and out.err.startswith("error: ")
    assert "damaged segment" in one_line(out.err) and "make extract" in out.err


def test_features_not_finite_behind_valid_checksums_are_refused_then_recomputed(prepared,
                                                                                capsys):
    """NaN or inf written into a segment through HDF5, which recomputes the checksums: every
    stage that reads the rows refuses in one line naming the segment, and extract computes
    them again rather than calling them reused."""
    config = prepared((extract.run, train_head.run), head="logreg", epochs=1,
                      finetune_from="images")
    [victim] = segment_files(config.features_dir)
    with h5py.File(victim, "r+") as f:
        rows = len(f["sha256"])
        # one value a row, never the first one: NaN in even rows, inf in odd ones
        f["features"][:, -1, -1, -1] = np.where(np.arange(rows) % 2, np.inf, np.nan)
    line = (f"^{config.features_dir} has a damaged segment segments/.*{os.path.basename(victim)}"
            " \\(NaN or inf among its features, row \\d+\\): run `make extract` to recompute it$")
    for stage in (train_head.run, lambda c: train_head.run(c.replace(head="dense")),
                  evaluate.run):
        with pytest.raises(UserError, match=line):
            stage(config)
    capsys.readouterr()
    predicted = predict.run(config.replace(images=config.data))  # the model itself is sound
    warned = [x for x in capsys.readouterr().out.splitlines() if x.startswith("!!!")]
    assert len(warned) == 1 and re.search(line[1:], warned[0])
    assert predicted.unlike_training is None

    repaired = extract.run(config)
    assert (repaired.new, repaired.reused) == (rows, 0)
    assert f"{victim} is damaged (NaN or inf among its features): deleted" in \
        capsys.readouterr().out
    assert "logreg" in train_head.run(config).paths


@pytest.mark.parametrize("how, reason", [("changed bytes", "checksum mismatch"),
                                         ("truncated", "truncated"),
                                         ("zeroed", "zeroed or not an HDF5 file")])
def test_a_damaged_master_is_refused_then_rebuilt(image_folder, make_config, capsys, how, reason):
    config = make_config(image_folder)
    extract.run(config)
    clean = features_by_path(config.features_dir)
    master = os.path.join(config.features_dir, cache.MASTER)
    if how == "changed bytes":  # the labels, whose checksum HDF5 keeps like the features'
        offset, _ = data_bytes(master, "label")
        with open(master, "r+b") as f:
            f.seek(offset)
            f.write(b"\x01" * 8)
    else:
        damage(master, how)
    outside = contents(os.path.dirname(image_folder), [config.features_dir])

    with pytest.raises(UserError, match=f"^{master} is damaged \\({reason}\\): run `make extract`"
                                        " to rebuild it$"):
        cache.FeatureStore(config.features_dir)
    capsys.readouterr()
    rebuilt = extract.run(config)

    assert contents(os.path.dirname(image_folder), [config.features_dir]) == outside
    assert (rebuilt.new, rebuilt.reused, rebuilt.changed) == (0, 12, True)
    assert_same_features(features_by_path(config.features_dir), clean)
    assert "12 rows, 0 new, 12 reused" in one_line(capsys.readouterr().out)


def test_a_segment_gone_while_reading_is_an_error_not_nan(image_folder, make_config):
    config = make_config(image_folder, finetune_from="images")
    extract.run(config)
    outside = contents(os.path.dirname(image_folder), [config.features_dir])
    with cache.FeatureStore(config.features_dir) as store:
        [segment] = segment_files(config.features_dir)
        os.remove(segment)  # the virtual dataset would read its rows as NaN
        with pytest.raises(UserError, match=f"^{config.features_dir} lost a segment .*\\(rows 0-11 "
                                            "read as NaN\\): run `make extract` to recompute it$"):
            store.read(np.arange(12))
    assert contents(os.path.dirname(image_folder), [config.features_dir]) == outside


@pytest.mark.parametrize("max_open", [1, 64])  # 1: the reader reopens the master as it reads
def test_a_compaction_under_a_running_reader_is_read_through(tmp_path, make_config, monkeypatch,
                                                            max_open):
    """A re-extract that only merges segments replaces the master and deletes the segments a
    running stage was reading: it reads on, the same features and views; a re-extract with
    other images is refused in one line."""
    monkeypatch.setattr(cache.segments, "COMPACT_BELOW", 1)  # one segment per batch of 4
    monkeypatch.setattr(cache.store, "MAX_OPEN_SEGMENTS", max_open)
    root = make_image_folder(tmp_path / "data")
    config = make_config(root, augment=1, finetune_from="images")
    extract.run(config)
    with cache.FeatureStore(config.features_dir) as store:
        train, rows = store.rows("train"), np.arange(len(store))
        clean = store.read(rows), store.read_views(train, np.ones(len(train), int))
    with cache.FeatureStore(config.features_dir) as store:
        store.read([0])  # a stage under way, one segment open
        monkeypatch.setattr(cache.segments, "COMPACT_BELOW", 4096)
        extract.run(config)
        assert len(segment_files(config.features_dir)) == 1  # the segments it read are gone
        np.testing.assert_array_equal(store.read(rows), clean[0])
        np.testing.assert_array_equal(store.read_views(train, np.ones(len(train), int)),
                                      clean[1])
    with cache.FeatureStore(config.features_dir) as store:
        store.read([0])
        make_image_folder(tmp_path / "more", per_class=1, seed=3)
        shutil.copy(tmp_path / "more" / "horizontal" / "horizontal_00.jpg",
                    os.path.join(root, "horizontal", "added.jpg"))
        extract.run(config)  # one more row, all merged anew: our rows are not the master's
        with pytest.raises(UserError, match=f"^{config.features_dir}/features.h5 was replaced "
                                            "while this stage read it, by a `make extract` with "
                                            "other images or settings: run the same command"):
            store.read(rows)


def test_segments_without_checksums_are_computed_again(image_folder, make_config, capsys):
    """Nothing in a segment from before checksums can be verified, and a shared cache's could
    hold anything: its images are computed again (they were reused as they were)."""
    config = make_config(image_folder, finetune_from="images")
    extract.run(config)
    clean = features_by_path(config.features_dir)
    old = segment_files(config.features_dir)
    for path in old:  # rewritten as before checksums existed
        with h5py.File(path, "r") as f:
            features, shas = f["features"][:], f["sha256"].asstr()[:]
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("sha256", data=shas.astype(object), dtype=cache.STR)
    outside = contents(os.path.dirname(image_folder), [config.features_dir])
    capsys.readouterr()

    again = extract.run(config)

    assert contents(os.path.dirname(image_folder), [config.features_dir]) == outside
    assert (again.new, again.reused) == (12, 0)
    assert_same_features(features_by_path(config.features_dir), clean)
    printed = capsys.readouterr().out.splitlines()
    assert printed[:len(old)] == [f"{path} is damaged (features has no checksums): deleted; its "
                                  "images will be computed again" for path in old]
    assert "12 new, 0 reused" in printed[-1]
    assert extract.run(config).new == 0


# --------------------------------------------------------------------------------------------
# 3. A full disk: one line, nothing lost, and compaction that fits in the space it frees
# --------------------------------------------------------------------------------------------

# Writes past `limit` bytes in any one file fail with EFBIG, as on a full disk, instead of
# killing the process with SIGXFSZ.
LIMITED = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY)); "
           "from pipeline.__main__ import main; sys.exit(main(sys.argv[2:]))")


def extract_with_file_limit(config, limit):
    command = [sys.executable, "-c", LIMITED, str(limit), "extract", "--data", config.data,
               "--weights", "none", "--size", "32", "--batch-size", str(config.batch_size),
               "--precision", config.precision, "--finetune-from", config.finetune_from,
               "--augment", str(config.augment),
               "--features-root", config.features_root]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TQDM_DISABLE": "1"})


def test_a_full_disk_while_writing_a_segment_is_one_line(tmp_path, make_config):
    config = make_config(make_image_folder(tmp_path / "data", per_class=20))
    outside = contents(tmp_path, [config.features_dir])

    done = extract_with_file_limit(config, 4096)  # smaller than one segment of 4 images

    assert contents(tmp_path, [config.features_dir]) == outside
    assert done.returncode == 2, done.stderr  # not a traceback (1) nor a segfault (-11)
    assert not any(s in done.stderr for s in ("Traceback", "Fatal Python error", "Segmentation"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    # `ulimit -f` (EFBIG), named as such: freeing space would not help
    assert len(errors) == 1 and errors[0].startswith(
        "error: over the file-size limit (`ulimit -f`) writing ")
    assert errors[0].endswith(": raise it (`ulimit -f unlimited`), then run the same command "
                              "again; everything finished so far is kept")
    assert [n for _, _, names in os.walk(config.features_dir) for n in names
            if n.endswith(".tmp")] == []
    resumed = extract.run(config)
    assert (resumed.rows, resumed.new) == (40, 40)
    extract.run(config.replace(name="clean"))
    assert_same_features(features_by_path(config.features_dir),
                         features_by_path(config.replace(name="clean").features_dir))


def test_a_full_disk_while_compacting_keeps_the_small_segments(tmp_path, make_config):
    config = make_config(make_image_folder(tmp_path / "data", per_class=20),
                         finetune_from="images")  # the features' segments alone
    clean = config.replace(name="clean")
    extract.run(clean)
    [merged] = segment_files(clean.features_dir)  # 40 rows in one segment
    outside = contents(tmp_path, [config.features_dir])

    done = extract_with_file_limit(config, os.path.getsize(merged) - 1)

    assert contents(tmp_path, [config.features_dir]) == outside
    assert done.returncode == 0, done.stderr
    notice = [line for line in done.stdout.splitlines() if "merge the small" in line]
    assert notice == [f"over the file-size limit (`ulimit -f`) to merge the small segments of "
                      f"{config.features_dir}: they stay as they are (the cache works; they are "
                      "merged on a later run)"]
    assert len(segment_files(config.features_dir)) == 10  # one per batch of 4
    expected = features_by_path(clean.features_dir)
    assert_same_features(features_by_path(config.features_dir), expected)
    later = extract.run(config)  # with room again: merged
    assert (later.new, len(segment_files(config.features_dir))) == (0, 1)
    assert_same_features(features_by_path(config.features_dir), expected)


def test_compaction_merges_group_by_group(tmp_path, make_config, monkeypatch, capsys):
    root = make_image_folder(tmp_path / "data")
    clean = make_config(root, name="clean", finetune_from="images")
    extract.run(clean)
    config = make_config(root, finetune_from="images")
    # 3 segments of 4 rows -> 2 of 6, one split
    monkeypatch.setattr(cache.segments, "COMPACT_BELOW", 6)
    outside = contents(tmp_path, [config.features_dir])
    capsys.readouterr()

    first = extract.run(config)

    assert contents(tmp_path, [config.features_dir]) == outside
    sizes = []
    for path in segment_files(config.features_dir):
        with h5py.File(path, "r") as f:
            sizes.append(len(f["sha256"]))
    assert (first.new, sizes) == (12, [6, 6])
    assert_same_features(features_by_path(config.features_dir),
                         features_by_path(clean.features_dir))
    assert "12 rows, 12 new, 0 reused" in one_line(capsys.readouterr().out)
    assert extract.run(config).changed is False  # nothing left to merge: stable


def test_compaction_builds_at_most_group_bytes_in_memory(tmp_path, make_config, monkeypatch):
    """Groups were COMPACT_BELOW rows whatever a row weighed: 8 GiB in memory at SIZE=1024.
    At SIZE=32 a row is 2 KiB, so a 4 KiB budget merges 12 one-row segments into 6 of 2, and a
    rerun leaves them be (segments of the capped size count as merged, not small)."""
    monkeypatch.setattr(cache.segments, "GROUP_BYTES", 2 * 512 * 4)
    config = make_config(make_image_folder(tmp_path / "data"), batch_size=1, finetune_from="images")
    extract.run(config)
    sizes = []
    for path in segment_files(config.features_dir):
        with h5py.File(path, "r") as f:
            sizes.append(len(f["sha256"]))
    assert sizes == [2] * 6
    before = segment_files(config.features_dir)
    assert extract.run(config).changed is False and segment_files(config.features_dir) == before


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "features.h5")
    with open(path, "wb") as f:
        f.write(b"old")

    def write(f):
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(files.NoSpace, match=f"^no space left on the disk writing {path}: free some "
                                            "space, then run the same command again; everything "
                                            "finished so far is kept$"):
        files.atomic_write(path, write)
    assert os.listdir(tmp_path) == ["features.h5"]
    assert open(path, "rb").read() == b"old"


# --------------------------------------------------------------------------------------------
# 4. `make export`: one file that stands alone
# --------------------------------------------------------------------------------------------

def test_export_writes_a_file_that_stands_alone(image_folder, make_config, tmp_path, capsys):
    config = make_config(image_folder)
    extract.run(config)
    with h5py.File(os.path.join(config.features_dir, cache.MASTER), "r") as f:
        assert "make export" in f["features"].attrs["note"]  # a word for whoever copies it alone
    out = str(tmp_path / "pets.h5")
    outside = contents(tmp_path, [config.features_dir])
    capsys.readouterr()

    code, printed = run_cli(capsys, "export", "--data", image_folder, "--out", out,
                            "--features-root", config.features_root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(out, elsewhere / "pets.h5")
    shutil.rmtree(config.features_dir)  # nothing of the cache is left to lean on

    assert code == 0
    assert contents(tmp_path, [str(elsewhere)]) == {k: v for k, v in outside.items()
                                                    if not k.startswith(config.features_dir)}
    with h5py.File(elsewhere / "pets.h5", "r") as f:
        assert not f["features"].is_virtual and f["features"].fletcher32
        exported = dict(zip(f["path"].asstr()[:], f["features"][:]))
        assert f.attrs["class_names"] == '["horizontal", "vertical"]'
        assert "segments" not in f and len(f["label"]) == len(f["split"]) == 12
    assert not any(np.isnan(v).any() for v in exported.values())
    extract.run(config)  # the same features again, for comparison
    assert_same_features(exported, features_by_path(config.features_dir))
    assert one_line(printed.out).startswith(f"export data: 12 rows -> {out} (")


@pytest.mark.parametrize("out, message", [
    ("", "^error: OUT is not set: use `make export NAME=<name> OUT=<file.h5>`$"),
    ("taken.h5", "^error: OUT=.*taken.h5 exists already: choose another file name, or remove it"),
    ("features/data/copy.h5", "^error: OUT=.*copy.h5 is inside features/, which the pipeline"),
    ("models/copy.h5", "^error: OUT=.*copy.h5 is inside models/, which the pipeline manages"),
    ("missing/copy.h5", "^error: OUT=.*copy.h5: the folder .*missing does not exist; create it"),
    ("nocache", "^error: no feature cache at .*nocache/features.h5: run `make extract"),
])
def test_export_refuses(image_folder, make_config, tmp_path, capsys, out, message):
    config = make_config(image_folder)
    extract.run(config)
    os.makedirs(config.models_root, exist_ok=True)
    (tmp_path / "taken.h5").write_bytes(b"someone's file")
    name = "data"
    if out == "nocache":
        name, out = "nocache", "nocache.h5"
    out = str(tmp_path / out) if out else ""
    everything = contents(tmp_path)
    capsys.readouterr()

    code, printed = run_cli(capsys, "export", "--name", name, "--out", out, "--features-root",
                            config.features_root, "--models-root", config.models_root)

    assert contents(tmp_path) == everything  # not even features/<NAME> changed
    assert code == 2
    assert __import__("re").search(message, one_line(printed.err))


def test_segments_written_in_the_same_instant_on_two_hosts_never_collide(tmp_path, monkeypatch):
    """seg-<time>-<pid>: two hosts (or containers) with the same pid, writing into one shared
    features folder within the clock's resolution, replaced each other's segment."""
    monkeypatch.setattr(time, "time_ns", lambda: 1_700_000_000_000_000_000)
    monkeypatch.setattr(os, "getpid", lambda: 42)
    shape = (1, 1, 1, 512)
    first = cache.write_segment(str(tmp_path), "id", ["a" * 64], np.zeros(shape, np.float32))
    second = cache.write_segment(str(tmp_path), "id", ["b" * 64], np.ones(shape, np.float32))
    assert first != second
    assert set(cache.inventory(str(tmp_path), "id")) == {"a" * 64, "b" * 64}


def test_a_segment_the_os_cannot_read_is_kept_not_deleted(image_folder, make_config, monkeypatch,
                                                          capsys):
    """EACCES or EIO is not damage: the segment is healthy and must survive, with one line."""
    config = make_config(image_folder)
    extract.run(config)
    before = segment_files(config.features_dir)

    def refused(path, *expected):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(cache.layout, "verified_shas", refused)
    capsys.readouterr()
    code, out = run_cli(capsys, "extract", "--data", image_folder, "--weights", "none",
                        "--size", "32", "--precision", config.precision,
                        "--features-root", config.features_root,
                        "--models-root", config.models_root)
    assert code == 2 and "cannot be read (Permission denied): fix its permissions" in \
        one_line(out.err)
    assert segment_files(config.features_dir) == before


def test_a_segments_folder_that_is_a_link_is_refused(image_folder, make_config, tmp_path):
    """Deletions in a linked segments folder would happen outside features/<NAME>."""
    config = make_config(image_folder)
    extract.run(config)
    elsewhere = tmp_path / "elsewhere"
    os.replace(os.path.join(config.features_dir, "segments"), elsewhere)
    os.symlink(elsewhere, os.path.join(config.features_dir, "segments"))
    outside = contents(tmp_path, [config.features_dir])
    with pytest.raises(UserError, match="segments is a link: the cache's segment folders must"):
        extract.run(config)
    assert contents(tmp_path, [config.features_dir]) == outside
