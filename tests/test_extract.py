"""Stage one: the feature cache is correct, incremental, crash-safe, and reports bad input."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from pipeline import __main__ as cli
from pipeline import cache, extract
from pipeline.config import UserError
from pipeline.data import images
from pipeline.fs import lock
from pipeline.model import backbone, runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_cache(config):
    with cache.FeatureStore(config.features_dir) as store:
        return {p: f for p, f in zip(store.paths, store.read(np.arange(len(store))))}


def test_cache_shapes_and_attributes(image_folder, make_config):
    config = make_config(image_folder)
    result = extract.run(config)
    assert (result.rows, result.new, result.reused, result.skipped) == (12, 12, 0, 0)
    with h5py.File(result.features_path, "r") as f:
        assert f["features"].shape == (12, 1, 1, 512) and f["features"].dtype == np.float32
        assert f["label"].shape == (12,) and sorted(set(f["label"][:])) == [0, 1]
        assert set(f["split"].asstr()[:]) <= {"train", "validation", "test"}
        assert all(len(h) == 64 for h in f["sha256"].asstr()[:])
        assert f["path"].asstr()[0].startswith(("horizontal/", "vertical/"))
        assert f.attrs["class_names"] == '["horizontal", "vertical"]'
        # the default backbone's identity, byte for byte as before BACKBONE: old caches stay valid
        assert f.attrs["backbone"] == "keras.applications.VGG16(include_top=False)"
        assert f.attrs["weights"] == backbone.RANDOM_FINGERPRINT
        assert f.attrs["image_size"] == 32
        assert f.attrs["preprocess"] == ("pil:draft+exif+rgb(white-bg,16bit/257)+bilinear"
                                         "|keras.vgg16.preprocess_input(caffe)|v1")
        versions = json.loads(f.attrs["versions"])
        assert versions["backend"] == runtime.backend() and runtime.backend() in versions
        assert "keras" in versions and "h5py" in versions
        assert not np.isnan(f["features"][:]).any()


def test_features_equal_a_direct_keras_computation(image_folder, make_config, tiny_weights_file):
    config = make_config(image_folder, weights=tiny_weights_file)
    extract.run(config)
    cached = read_cache(config)
    base = backbone.build_backbone(backbone.resolve_weights(tiny_weights_file), 32)
    for rel in sorted(cached)[:3]:
        direct = base.predict(images.load_image(os.path.join(image_folder, rel), 32)[None],
                              verbose=0)
        np.testing.assert_allclose(cached[rel], direct[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_the_forward_pass_takes_any_batch_size_and_returns_float32(precision):
    base = backbone.build_backbone(backbone.resolve_weights("none"), 32, precision)
    features_of = backbone.feature_function(base)
    x = np.random.default_rng(0).uniform(-100, 100, (4, 32, 32, 3)).astype(np.float32)
    outputs = [features_of(x[:n]) for n in (4, 3, 1)]  # a run's last batch is smaller
    assert [o.shape for o in outputs] == [(4, 1, 1, 512), (3, 1, 1, 512), (1, 1, 1, 512)]
    assert all(o.dtype == np.float32 for o in outputs)
    np.testing.assert_allclose(outputs[1], outputs[0][:3], rtol=1e-5, atol=1e-5)


def test_rerun_is_incremental(image_folder, make_config):
    config = make_config(image_folder)
    first = extract.run(config)
    again = extract.run(config)
    assert (again.new, again.reused, again.changed) == (0, 12, False)

    shutil.copy(os.path.join(image_folder, "vertical", "vertical_00.jpg"),
                os.path.join(image_folder, "vertical", "copy_same_content.jpg"))
    from PIL import Image
    Image.new("RGB", (40, 40), (9, 99, 199)).save(
        os.path.join(image_folder, "horizontal", "new.jpg"))
    added = extract.run(config)
    assert (added.rows, added.new, added.changed) == (14, 1, True)

    os.rename(os.path.join(image_folder, "horizontal", "new.jpg"),
              os.path.join(image_folder, "vertical", "moved.jpg"))
    os.remove(os.path.join(image_folder, "horizontal", "horizontal_00.jpg"))
    moved = extract.run(config)
    assert (moved.rows, moved.new) == (13, 0)
    with cache.FeatureStore(config.features_dir) as store:
        assert "vertical/moved.jpg" in store.paths and "horizontal/new.jpg" not in store.paths
        assert store.labels[list(store.paths).index("vertical/moved.jpg")] == 1
        # compacted into one segment file for the features and one for the cut's activations
        assert len(store.file["segments"]) == 2

    resized = extract.run(config.replace(size=64))
    assert resized.new == 12 and resized.identity != first.identity  # 13 rows, 12 distinct images
    assert resized.identity["image_size"] == 64


def test_float16_storage_is_its_own_identity_and_rounds_only(image_folder, make_config,
                                                            tiny_weights_file):
    config = make_config(image_folder, weights=tiny_weights_file)
    full = extract.run(config)
    full32 = read_cache(config)
    half = extract.run(config.replace(storage="float16"))
    half32 = read_cache(config)  # read back as float32
    assert half.new == 12 and half.identity == {**full.identity, "storage": "float16"}
    assert "storage" not in full.identity  # float32 caches made before STORAGE keep their id
    with h5py.File(half.features_path, "r") as f:
        assert f["features"].dtype == np.float16
    for rel in full32:
        assert half32[rel].dtype == np.float32
        np.testing.assert_allclose(half32[rel], full32[rel].astype(np.float16), rtol=0, atol=0)
    back = extract.run(config)  # float32 again: its segments are still there
    assert (back.new, back.reused) == (0, 12)


@pytest.mark.parametrize("precision, tolerance", [("mixed_float16", 0.005),
                                                  ("mixed_bfloat16", 0.03)])
def test_mixed_precision_features_are_their_own_identity_and_close_to_float32(
        image_folder, make_config, tiny_weights_file, precision, tolerance):
    """What PRECISION=auto picks on a GPU (float16), and bfloat16, computed here on the CPU:
    within `tolerance` of the largest float32 feature (seen: 0.09% and 0.8%)."""
    config = make_config(image_folder, weights=tiny_weights_file)
    extract.run(config)
    full = read_cache(config)
    mixed = extract.run(config.replace(precision=precision))
    assert mixed.new == 12 and mixed.identity["precision"] == precision
    reduced = read_cache(config)
    largest = max(np.abs(f).max() for f in full.values())
    for rel in full:
        np.testing.assert_allclose(reduced[rel], full[rel], rtol=0, atol=tolerance * largest)


def test_unknown_storage_is_refused(image_folder, make_config):
    with pytest.raises(UserError, match="STORAGE='int8' is not one of float32, float16"):
        extract.run(make_config(image_folder, storage="int8"))


def test_row_order_is_stable(image_folder, make_config):
    config = make_config(image_folder)
    extract.run(config)
    before = list(cache.FeatureStore(config.features_dir).paths)
    from PIL import Image
    Image.new("RGB", (40, 40), (1, 2, 3)).save(os.path.join(image_folder, "horizontal", "aaa.jpg"))
    extract.run(config)
    after = list(cache.FeatureStore(config.features_dir).paths)
    assert after[:len(before)] == before and after[-1] == "horizontal/aaa.jpg"


def test_bad_files_are_skipped_and_listed(image_folder, make_config):
    good = open(os.path.join(image_folder, "vertical", "vertical_01.jpg"), "rb").read()
    bad = {"horizontal/empty.jpg": b"", "horizontal/truncated.jpg": good[:200],
           "vertical/text.png": b"this is not a picture", "vertical/data.bin": b"\x00\x01\x02"}
    for rel, content in bad.items():
        with open(os.path.join(image_folder, rel), "wb") as f:
            f.write(content)
    config = make_config(image_folder)
    result = extract.run(config)
    assert (result.rows, result.skipped) == (12, 4)
    with open(os.path.join(config.features_dir, "skipped.csv")) as f:
        reasons = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert set(reasons) == set(bad)
    assert reasons["horizontal/empty.jpg"] == "empty file (0 bytes)"
    assert reasons["vertical/data.bin"].startswith("not an image")
    assert extract.run(config).new == 0  # bad files are remembered, not retried


def test_a_class_with_only_bad_files_is_fatal(tmp_path, make_config):
    from helpers import make_image_folder
    root = make_image_folder(tmp_path / "data", per_class=2)
    for name in os.listdir(os.path.join(root, "vertical")):
        open(os.path.join(root, "vertical", name), "wb").close()
    with pytest.raises(UserError, match="class 'vertical' has no readable image"):
        extract.run(make_config(root))


def test_a_second_writer_fails_clearly(image_folder, make_config):
    config = make_config(image_folder)
    with lock.exclusive(config.features_dir, "extract"):
        with pytest.raises(UserError, match="another extract .* is writing"):
            extract.run(config)


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/folder"], "DATA folder '/nonexistent/folder' does not exist"),
    (["--weights", "/nonexistent/w.weights.h5"], "WEIGHTS file .* does not exist"),
    (["--weights", __file__], "not a .h5"),
])
def test_fatal_errors_exit_non_zero_with_one_line(image_folder, tmp_path, capsys, args, message):
    argv = ["extract", "--data", image_folder, "--weights", "none", "--size", "32",
            "--features-root", str(tmp_path / "f")] + args
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(message, err)


def test_kill_9_then_rerun_equals_a_clean_run(tmp_path, make_config):
    from helpers import make_image_folder
    root = make_image_folder(tmp_path / "data", per_class=20)
    config = make_config(root, batch_size=2, name="killed")
    command = [sys.executable, "-m", "pipeline", "extract", "--data", root, "--name", "killed",
               "--weights", "none", "--size", "32", "--batch-size", "2",
               "--precision", config.precision, "--augment", "0",
               "--features-root", config.features_root]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    segments = os.path.join(config.features_dir, "segments")
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        found = [f for _, _, files in os.walk(segments) for f in files if f.endswith(".h5")]
        if len(found) >= 6:  # three batches' segments of the features and of the cut
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # features.h5 is never half-written
    assert not os.path.exists(os.path.join(config.features_dir, "features.h5"))

    resumed = extract.run(config)
    assert resumed.reused >= 6 and resumed.new + resumed.reused == 40
    clean = extract.run(config.replace(name="clean"))
    killed, fresh = read_cache(config), read_cache(config.replace(name="clean"))
    assert killed.keys() == fresh.keys()
    for path in fresh:
        np.testing.assert_array_equal(killed[path], fresh[path])
    assert clean.new == 40


def test_missing_segment_is_detected(image_folder, make_config):
    config = make_config(image_folder)
    extract.run(config)
    for dirpath, _, files in os.walk(os.path.join(config.features_dir, "segments")):
        for name in files:
            os.remove(os.path.join(dirpath, name))
    with pytest.raises(UserError, match="missing segment"):
        cache.FeatureStore(config.features_dir)


def test_every_class_gets_a_training_image(tmp_path, make_config):
    from helpers import make_image_folder
    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=1)
    extract.run(make_config(root, split="10/45/45"))
    with cache.FeatureStore(make_config(root).features_dir) as store:
        assert sorted(store.labels[store.rows("train")]) == [0, 1, 2, 3]
