"""Stage two: heads trained on the cached features stream them, reproduce, beat chance, and
predict exactly what the frozen base plus the head predicts on the images themselves."""
import errno
import hashlib
import json
import os
import re

import keras
import numpy as np
import pytest
from helpers import make_image_folder
from trained_run import trained_run_copy

from pipeline import __main__ as cli
from pipeline import cache, extract, train_head
from pipeline.cache import FeatureStore, batches
from pipeline.config import Config
from pipeline.data import demo, images
from pipeline.fs import artifacts, files
from pipeline.model import backbone, heads, registry
from pipeline.reporting import plots

IDENTITY = {"backbone": "synthetic", "weights": "synthetic", "image_size": 32, "preprocess": "none"}


def synthetic_cache(features_dir, labels, splits, shape=(1, 2, 4), class_names=("a", "b"),
                    identity=IDENTITY, seed=0, factor=1.0):
    """features.h5 written by the cache package: Gaussian features whose first channel is shifted
    by the class, so a linear model separates the classes well (all of them times `factor`)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(len(labels), *shape)).astype(np.float32)
    features[..., 0] += 3.0 * labels.reshape(-1, *[1] * (len(shape) - 1))
    features *= factor
    shas = [f"{seed:08x}{i:056x}" for i in range(len(labels))]
    segment = cache.write_segment(features_dir, "synthetic", shas, features)
    rows = [dict(path=f"{class_names[label]}/{i:05d}.jpg", label=int(label), sha256=sha,
                 split=split, size=1, mtime_ns=0, segment=segment, segment_row=i,
                 segment_rows=len(labels))
            for i, (label, split, sha) in enumerate(zip(labels, splits, shas))]
    attrs = {"class_names": list(class_names), "identity": identity, "identity_id": "synthetic"}
    cache.write_master(features_dir, rows, attrs, shape, np.float32, {})
    return features


def balanced(n, splits=("train",) * 6 + ("validation",) * 2 + ("test",) * 2):
    """n rows, classes alternating, splits cycling 60/20/20."""
    return [i % 2 for i in range(n)], [splits[(i // 2) % len(splits)] for i in range(n)]


@pytest.fixture
def synthetic_config(tmp_path):
    """A Config whose NAME points at a synthetic cache of 200 rows (120 train)."""
    config = Config(name="synthetic", augment=0, size=32, batch_size=16, epochs=3,
                    features_root=str(tmp_path / "features"), models_root=str(tmp_path / "models"))
    synthetic_cache(config.features_dir, *balanced(200))
    return config


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory):
    """The demo data, 100 images per class at 64 pixels, extracted once with WEIGHTS=none."""
    root = tmp_path_factory.mktemp("demo")
    demo.generate(str(root / "data"), per_class=100, pixels=64)
    config = Config(data=str(root / "data"), augment=0, weights="none", size=64, split="70/30/0",
                    features_root=str(root / "features"), models_root=str(root / "models"))
    extract.run(config)
    return config


def without_timings(metrics):
    """The models' metrics, less what differs between identical runs: seconds, and the file's
    sha256 (a .keras or .npz zip records the time it was written)."""
    return {name: {k: v for k, v in entry.items() if k not in ("seconds", "file_sha256")}
            for name, entry in metrics["models"].items()}


# --------------------------------------------------------------------------------------------
# The head on cached features is the head on the images
# --------------------------------------------------------------------------------------------

def test_head_on_cached_features_equals_frozen_base_plus_head_on_images(tmp_path, make_config):
    config = make_config(make_image_folder(tmp_path / "data", per_class=8), split="50/50/0",
                         head="dense", epochs=2)
    extract.run(config)
    train_head.run(config)
    head = keras.saving.load_model(artifacts.path(config, artifacts.HEAD))
    base = backbone.build_backbone(backbone.resolve_weights("none"), config.size)
    inputs = keras.Input((config.size, config.size, 3))
    composed = keras.Model(inputs, head(base(inputs)))

    with FeatureStore(config.features_dir) as store:
        rows = np.arange(len(store))
        on_features = head.predict(store.read(rows), verbose=0)
        pictures = np.stack([images.load_image(os.path.join(config.data, store.paths[r]),
                                               config.size) for r in rows])
    on_images = composed.predict(pictures, verbose=0)
    assert on_features.shape == (len(rows), 1)
    np.testing.assert_allclose(on_images, on_features, atol=1e-4)
    assert np.ptp(on_features) > 1e-3  # a constant output would pass trivially


@pytest.mark.parametrize("num_classes, xla", [(2, False), (3, False), (2, True)])
def test_saved_head_is_the_best_epoch_on_raw_features(tmp_path, monkeypatch, num_classes, xla):
    """head.keras, its standardisation included, scores on raw features what the best epoch
    scored on validation (with XLA as without)."""
    monkeypatch.setattr(train_head, "XLA_MIN_ROWS", 0 if xla else 10**9)
    config = Config(name="synthetic", augment=0, head="dense", epochs=6, batch_size=16,
                    features_root=str(tmp_path / "features"), models_root=str(tmp_path / "models"))
    _, splits = balanced(200)
    synthetic_cache(config.features_dir, [i % num_classes for i in range(200)], splits,
                    class_names=("a", "b", "c")[:num_classes])
    result = train_head.run(config)
    dense = result.metrics["models"]["dense"]
    best = dense["best_epoch"] - 1
    history = dense["history"]
    assert dense["validation"]["loss"] == pytest.approx(history["val_loss"][best], abs=1e-5)
    assert dense["validation"]["accuracy"] == pytest.approx(history["val_accuracy"][best])
    head = keras.saving.load_model(result.paths["dense"])
    built = heads.build_dense_head((1, 2, 4), num_classes, 256, 0.5, config.head_pool)
    assert [type(layer).__name__ for layer in head.layers] == \
        [type(layer).__name__ for layer in built.layers]
    assert head.output_shape == (None, 1 if num_classes == 2 else num_classes)


def test_the_saved_head_keeps_its_weights_at_the_scale_it_trained_at(tmp_path):
    """The standardisation is the head's first layer, not folded into its first Dense layer:
    heads trained on features x and on 100 x have the same weights, so fine-tuning's learning
    rate acts alike on both. Folded, the second head's first-layer weights were 100 times
    smaller, and RMSprop's fixed-size steps 100 times larger relative to them."""
    weights = []
    for factor in (1.0, 100.0):
        config = Config(name=f"times{factor:g}", augment=0, head="dense", epochs=2, batch_size=16,
                        features_root=str(tmp_path / "features"),
                        models_root=str(tmp_path / "models"))
        synthetic_cache(config.features_dir, *balanced(200), factor=factor)
        head = keras.saving.load_model(train_head.run(config).paths["dense"])
        weights.append([w for layer in head.layers if layer.trainable_weights
                        for w in layer.get_weights()])
    for small, large in zip(*weights):
        np.testing.assert_allclose(large, small, rtol=1e-3, atol=1e-5)
    assert head.layers[1].name == "standardize"


# --------------------------------------------------------------------------------------------
# Learning and reproducibility on the demo data
# --------------------------------------------------------------------------------------------

@pytest.mark.heavy
def test_both_heads_beat_chance_on_demo_data_and_score_the_same_on_a_float16_cache(
        demo_config, tmp_path):
    """STORAGE=float16 rounds the features to 11 significant bits; the heads read them back as
    float32 and land where they land on the float32 cache."""
    full = demo_config.replace(models_root=str(tmp_path / "full"))
    half = demo_config.replace(storage="float16", features_root=str(tmp_path / "features"),
                               models_root=str(tmp_path / "half"))
    extract.run(half)
    full_run, half_run = train_head.run(full), train_head.run(half)
    assert half_run.metrics["identity"]["storage"] == "float16"
    scores = full_run.metrics["models"], half_run.metrics["models"]
    for name in ("dense", "logreg"):
        full_acc, half_acc = (s[name]["validation"]["accuracy"] for s in scores)
        assert full_acc > 0.65 and abs(full_acc - half_acc) <= 0.05, (name, full_acc, half_acc)
    assert "test" not in scores[0]["dense"]  # SPLIT=70/30/0: no test rows, no test entry
    for name in artifacts.HEAD, artifacts.HEAD_CHECKPOINT, artifacts.HEAD_LOG, artifacts.LOGREG, \
            artifacts.HEAD_HISTORY_PLOT:
        assert os.path.getsize(artifacts.path(full, name)) > 0


def test_same_seed_same_metrics(demo_config, tmp_path):
    runs = [train_head.run(demo_config.replace(models_root=str(tmp_path / f"run{i}"), seed=seed,
                                               epochs=3))
            for i, seed in enumerate((0, 0, 1))]
    assert without_timings(runs[0].metrics) == without_timings(runs[1].metrics)
    histories = [run.metrics["models"]["dense"]["history"] for run in runs]
    assert histories[0] != histories[2]  # the seed is used


# --------------------------------------------------------------------------------------------
# Files and contract
# --------------------------------------------------------------------------------------------

def test_metrics_and_logreg_bundle_carry_the_cache_identity(synthetic_config):
    result = train_head.run(synthetic_config)
    with open(artifacts.path(synthetic_config, artifacts.HEAD_METRICS)) as f:
        metrics = json.load(f)
    assert metrics["identity"] == IDENTITY and metrics["class_names"] == ["a", "b"]
    assert metrics["identity_id"] == backbone.identity_id(IDENTITY)
    told = {k: v for k, v in json.loads(synthetic_config.to_json()).items() if v is not None}
    assert told.items() <= metrics["config"].items()  # as told, and what it was not told filled
    assert None not in metrics["config"].values()      # in from the cache (cache.settings)
    for name in ("dense", "logreg"):
        assert set(metrics["models"][name]["validation"]) == {"accuracy", "loss"}
        assert set(metrics["models"][name]["test"]) == {"accuracy", "loss"}
    dense = metrics["models"]["dense"]
    assert dense["epochs"] == len(dense["history"]["loss"]) and 1 <= dense["best_epoch"] <= 3
    logreg, saved = heads.load_logreg(result.paths["logreg"])
    assert saved["identity"] == IDENTITY and saved["class_names"] == ["a", "b"]
    assert saved["config"] == metrics["config"]
    assert logreg.predict_proba(np.zeros((3, 8), np.float32)).shape == (3, 2)
    for name in ("dense", "logreg"):  # each file is tied to its own metrics by its sha256
        assert metrics["models"][name]["file_sha256"] == artifacts.file_sha256(result.paths[name])


def test_one_head_keeps_the_other_models_entry_only_on_the_same_identity(synthetic_config):
    first = train_head.run(synthetic_config.replace(head="logreg"))
    kept = train_head.run(synthetic_config.replace(head="dense"))
    assert kept.metrics["models"]["logreg"] == first.metrics["models"]["logreg"]
    again = train_head.run(synthetic_config.replace(head="logreg"))
    assert again.metrics["models"]["dense"] == kept.metrics["models"]["dense"]

    other = dict(IDENTITY, weights="other")
    synthetic_cache(synthetic_config.features_dir, *balanced(200), identity=other)
    fresh = train_head.run(synthetic_config.replace(head="dense"))
    assert set(fresh.metrics["models"]) == {"dense"} and fresh.metrics["identity"] == other


@pytest.mark.parametrize("num_classes", [2, 3])
def test_logreg_out_of_core_when_the_features_do_not_fit(tmp_path, num_classes):
    config = Config(name="big", augment=0, head="logreg",
                    features_root=str(tmp_path / "features"), models_root=str(tmp_path / "models"))
    labels, splits = balanced(300)
    labels = [i % num_classes for i in range(300)]
    synthetic_cache(config.features_dir, labels, splits,
                    class_names=("a", "b", "c")[:num_classes])
    logreg = train_head.run(config, logreg_memory_mb=0).metrics["models"]["logreg"]
    assert logreg["solver"] == "sgd"
    assert logreg["validation"]["accuracy"] > 0.8 and logreg["test"]["accuracy"] > 0.8
    assert logreg["C"] in config.c_values


def test_streaming_visits_every_row_once_per_epoch_in_a_seeded_order(synthetic_config,
                                                                     monkeypatch):
    monkeypatch.setattr(cache, "READ_BLOCK", 16)  # many blocks from 200 rows
    with FeatureStore(synthetic_config.features_dir) as store:
        rows = store.rows("train")
        targets = np.arange(len(store))  # a row's target is its index: shows the order
        def epochs(seed, n=2):
            ds = batches.CachedFeatures(store, rows, targets, batch_size=5, seed=seed)
            out = []
            for _ in range(n):  # as Keras's fit does: the batches, then on_epoch_end
                out.append(list(ds))
                ds.on_epoch_end()
            return out
        first, again = epochs(seed=3), epochs(seed=3)
        features = store.read(np.arange(len(store)))
    orders = [np.concatenate([y for _, y in epoch]) for epoch in first]
    for order in orders:
        assert sorted(order) == list(rows)  # each training row once
    assert list(orders[0]) != list(orders[1]) != list(rows)  # reshuffled every epoch
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first[0], again[0]))  # seeded
    for x, y in first[0]:
        np.testing.assert_array_equal(x, features[y])  # each row with its own features
    assert max(len(y) for _, y in first[0]) == 5


# --------------------------------------------------------------------------------------------
# Errors: one line, non-zero exit, the fix named
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("missing", r"no feature cache at .*run `make extract"),
    ("no-train", r"no rows in the train split.*rerun `make extract NAME=bad`"),
    ("one-class", r"has only one class \['a'\].*rerun `make extract NAME=bad`"),
    ("train-lacks-a-class", r"no images of class\(es\) \['b'\].*rerun `make extract NAME=bad`"),
])
def test_errors_exit_non_zero_with_one_line(tmp_path, capsys, case, message):
    features = tmp_path / "features" / "bad"
    if case == "no-train":
        synthetic_cache(str(features), *balanced(20, splits=("validation", "test")))
    if case == "one-class":
        synthetic_cache(str(features), [0] * 20, balanced(20)[1], class_names=("a",))
    if case == "train-lacks-a-class":
        labels, splits = balanced(20)
        synthetic_cache(str(features), [int(s != "train") for s in splits], splits)
    code = cli.main(["train-head", "--name", "bad", "--augment", "0",
                     "--features-root", str(tmp_path / "features"),
                     "--models-root", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert re.search(message, err)
    assert not os.path.exists(tmp_path / "models" / "bad" / artifacts.HEAD_METRICS)


# --------------------------------------------------------------------------------------------
# The plot
# --------------------------------------------------------------------------------------------

def test_plot_history_continues_each_segment_where_the_last_one_ended(tmp_path):
    head = {"accuracy": [0.6, 0.7, 0.8], "val_accuracy": [0.5, 0.6, 0.7],
            "loss": [0.9, 0.6, 0.5], "val_loss": [1.0, 0.8, 0.7]}
    tune = {"accuracy": [0.85, 0.9], "val_accuracy": [0.75, 0.8],
            "loss": [0.4, 0.3], "val_loss": [0.6, 0.5]}
    path = str(tmp_path / "history.png")
    fig = plots.plot_history([("head", head), ("fine-tune", tune)], path, title="t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    accuracy, loss = fig.axes[:2]
    lines = {line.get_label(): line for line in accuracy.get_lines()}
    assert list(lines["head training"].get_xdata()) == [1, 2, 3]
    assert list(lines["fine-tune validation"].get_xdata()) == [4, 5]
    assert lines["head training"].get_linestyle() == "-"
    assert lines["head validation"].get_linestyle() == "--"
    assert list(loss.get_lines()[0].get_ydata()) == head["loss"]


def test_streaming_keeps_at_most_two_blocks_in_memory(synthetic_config, monkeypatch):
    """The read-ahead kept every block of an epoch (the whole split in float32: 2.6 GB at
    100k rows of SIZE=150) until the epoch ended; only this block and the next may stay."""
    monkeypatch.setattr(cache, "READ_BLOCK", 10)  # 12 blocks of 10 from the 120 train rows
    with FeatureStore(synthetic_config.features_dir) as store:
        targets = np.arange(len(store))
        ds = batches.CachedFeatures(store, store.rows("train"), targets, batch_size=5,
                                       seed=0)
        held = []
        for index in range(len(ds)):
            ds[index]
            held.append(len(ds.reads))
    assert len(ds.blocks) == 12 and max(held) <= 2


def file_states(folder):
    """{name: (inode, sha256)} of the files in `folder`: a file replaced by the same bytes shows."""
    states = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                states[name] = (os.stat(path).st_ino, hashlib.sha256(f.read()).hexdigest())
    return states


@pytest.mark.parametrize("failing, code, words", [
    ("head.keras", errno.ENOSPC, "no space left on the disk.*: free some space"),
    ("head_metrics.json", errno.EFBIG, "over the file-size limit \\(`ulimit -f`\\).*: raise it")])
def test_a_full_disk_with_head_both_replaces_nothing(tmp_path_factory, tmp_path, monkeypatch,
                                                     failing, code, words):
    """HEAD=both writes logreg.npz, head.keras, its plot and head_metrics.json as one commit: a
    failure on any of them leaves every old file, each still the one its metrics describe."""
    config = trained_run_copy(tmp_path_factory, tmp_path)
    before = file_states(config.models_dir)

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    if failing == "head.keras":
        monkeypatch.setattr(keras.Model, "save", full)
    else:
        monkeypatch.setattr(artifacts, "write_json", full)
    with pytest.raises(files.NoSpace, match=f"^{words}"):
        train_head.run(config.replace(head="both", epochs=1))
    after = file_states(config.models_dir)
    committed = ["logreg.npz", "head.keras", "head_history.png", "head_metrics.json"]
    assert [after[name] for name in committed] == [before[name] for name in committed]
    assert not [name for name in after if files.temporary_of(name)]
    for model in ("logreg", "dense"):
        assert registry.record(config, model).file_sha256
