"""AUGMENT=K: augmented views of the training images in the feature cache, keyed by content,
view number and the augmentation's identity, computed once, never for validation or test rows,
and read back by train-head as another view every epoch."""
import h5py
import keras
import numpy as np
import pytest
from helpers import make_image_folder

from pipeline import cache, export, extract, train_head
from pipeline.cache import FeatureStore, batches, views
from pipeline.config import Config, UserError
from pipeline.data import augment, images
from pipeline.model import backbone

SETTINGS = dict(split="50/25/25", epochs=2)  # 12 images: about 6 train, 3 validation, 3 test


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=6)


def pictures(n=4, pixels=32, seed=0):
    return np.random.default_rng(seed).normal(0, 60, (n, pixels, pixels, 3)).astype(np.float32)


SHAS = [f"{i:064x}" for i in range(4)]


# --------------------------------------------------------------------------------------------
# The augmentation and its identity
# --------------------------------------------------------------------------------------------

def test_a_view_depends_on_the_image_the_view_and_the_seed_never_on_its_batch():
    x = pictures()
    together = augment.augment_views(x, SHAS, [1] * 4, seed=0)
    alone = np.concatenate([augment.augment_views(x[i:i + 1], SHAS[i:i + 1], [1], seed=0)
                            for i in range(4)])
    reversed_batch = augment.augment_views(x[::-1], SHAS[::-1], [1] * 4, seed=0)[::-1]
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(together, reversed_batch)
    np.testing.assert_array_equal(together, augment.augment_views(x, SHAS, [1] * 4, seed=0))
    assert np.abs(together - x).mean() > 1  # augmented, not a copy
    for other in (augment.augment_views(x, SHAS, [2] * 4, seed=0),
                  augment.augment_views(x, SHAS, [1] * 4, seed=1)):
        assert not np.allclose(together, other)


def test_the_compiled_views_are_the_affine_map_drawn_image_by_image_from_its_own_seed():
    """The cache's identity: a view is RandomAffine's map drawn eagerly for that image alone from
    the int seed augment.view_seed gives it. The compiled batch (padded to a larger batch, as
    extract pads it) must give these numbers, bit for bit on TensorFlow."""
    x, views = pictures(3), [1, 4, 2]
    affine, = augment.augmentation(7).layers
    expected = [keras.ops.convert_to_numpy(affine.transform(
        x[i:i + 1], affine.draw(1, seed=augment.view_seed(7, SHAS[i], views[i]))))
        for i in range(3)]
    compiled = augment.ViewFunction(7, batch=4)(x, SHAS[:3], views)
    assert compiled.shape == x.shape and compiled.dtype == np.float32
    if keras.backend.backend() == "tensorflow":
        np.testing.assert_array_equal(compiled, np.concatenate(expected))
    else:  # XLA's jit fuses and reorders the float arithmetic: the same draws, rounded anew
        np.testing.assert_allclose(compiled, np.concatenate(expected), rtol=0, atol=1e-3)


# draws in [0, 1): flip (< 0.5 flips), angle, zoom, shift across, shift down; 0.5 is "none"
@pytest.mark.parametrize("draws, expected", [
    ([0.9, 0.5, 0.5, 0.5, 0.5], lambda x: x),
    ([0.1, 0.5, 0.5, 0.5, 0.5], lambda x: x[:, :, ::-1]),                       # mirrored
    ([0.9, 0.5, 0.5, 0.5 + 1 / 6, 0.5], lambda x: x[:, :, :-1]),                 # 1 px right
    ([0.9, 0.5, 0.5, 0.5, 0.5 - 1 / 4], lambda x: x[:, 1:]),                     # 1 px up
    ([0.9, 3.0, 0.5, 0.5, 0.5], lambda x: np.rot90(x, 2, axes=(1, 2))),  # by pi
])
def test_one_affine_map_flips_rotates_and_shifts_as_drawn(draws, expected):
    x = np.random.default_rng(0).normal(0, 60, (2, 20, 30, 3)).astype(np.float32)
    affine, = augment.augmentation(0).layers
    out = keras.ops.convert_to_numpy(affine.transform(x, np.array([draws] * 2, np.float32)))
    want = expected(x)
    if want.shape != x.shape:  # a shift: compare the pixels that moved
        out = out[:, :, 1:] if draws[3] != 0.5 else out[:, :-1]
    np.testing.assert_allclose(out, want, atol=1e-3)


def test_saved_weights_keep_the_augmentations_random_state(tmp_path):
    """A fine-tuning backup (BackupAndRestore saves the model's weights) must carry on drawing
    where the run stopped, not start the augmentation over."""
    def model():
        inputs = keras.Input((16, 16, 3))
        return keras.Model(inputs, augment.augmentation(0)(inputs, training=True))
    x = pictures(2, pixels=16)
    trained = model()
    trained(x)  # one batch drawn: the state has moved on
    trained.save_weights(tmp_path / "backup.weights.h5")
    resumed = model()
    resumed.load_weights(tmp_path / "backup.weights.h5")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(resumed(x)),
                                  keras.ops.convert_to_numpy(trained(x)))
    assert not np.allclose(keras.ops.convert_to_numpy(model()(x)),
                           keras.ops.convert_to_numpy(resumed(x)))


@pytest.mark.parametrize("change", ["seed", "layer setting", "view", "image"])
def test_every_part_of_a_view_key_changes_it(monkeypatch, change):
    sha, key = SHAS[0], augment.view_key(SHAS[0], augment.identity_id(augment.identity(0)), 1)
    # Fits where an image's sha256 goes (64 lowercase hex digits), and is not that sha256.
    assert len(key) == 64 and set(key) <= set("0123456789abcdef") and key != sha
    if change == "layer setting":
        monkeypatch.setattr(augment, "augmentation", lambda seed: keras.Sequential(
            [augment.RandomAffine(translation=0.2, seed=seed)]))
    seed, view = (1 if change == "seed" else 0), (2 if change == "view" else 1)
    sha = SHAS[1] if change == "image" else sha
    assert augment.view_key(sha, augment.identity_id(augment.identity(seed)), view) != key


def test_each_epoch_reads_an_image_as_another_view():
    rows = np.arange(50)
    epochs = np.stack([augment.epoch_views(rows, 3, seed=0, epoch=e, n_rows=50) for e in range(4)])
    assert set(np.unique(epochs)) == {0, 1, 2, 3}
    assert all(len(set(epochs[:, i])) == 4 for i in rows)  # 4 epochs: all 4 views of each
    np.testing.assert_array_equal(epochs[0], augment.epoch_views(rows, 3, 0, 0, 50))  # seeded


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------

def test_views_are_computed_once_and_a_larger_augment_computes_only_new_ones(folder,
                                                                          make_config):
    first = extract.run(make_config(folder, augment=2, **SETTINGS))
    config = make_config(folder, augment=2, **SETTINGS)
    with FeatureStore(config.features_dir) as store:
        train = len(store.rows("train"))
        plain_features = store.read(np.arange(len(store)))
    assert (first.views, first.new_views, store.views) == (2 * train, 2 * train, 2)

    again = extract.run(config)
    assert (again.new, again.new_views, again.views, again.changed) == (0, 0, 2 * train, False)
    more = extract.run(make_config(folder, augment=3, **SETTINGS))
    assert (more.new, more.new_views, more.views) == (0, train, 3 * train)
    fewer = extract.run(make_config(folder, augment=1, **SETTINGS))
    with FeatureStore(config.features_dir) as store:
        assert (fewer.new_views, fewer.views, store.views) == (0, train, 1)
    back = extract.run(make_config(folder, augment=3, **SETTINGS))
    assert (back.new_views, back.views) == (0, 3 * train)  # going back up costs nothing
    other_seed = extract.run(make_config(folder, augment=3, seed=1, **SETTINGS))
    assert other_seed.new_views == 3 * train  # another augmentation: no view is reused
    with FeatureStore(config.features_dir) as store:
        np.testing.assert_array_equal(store.read(np.arange(len(store))), plain_features)


def test_views_of_a_run_cut_short_survive_a_run_with_a_smaller_augment(folder, make_config,
                                                                        monkeypatch):
    # a segment a batch, as on a large dataset
    monkeypatch.setattr(cache.segments, "COMPACT_BELOW", 1)
    config = make_config(folder, augment=3, **SETTINGS)
    extract.run(config.replace(augment=0))
    write_master = cache.write_master

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after every view was computed, before features.h5 names them
    monkeypatch.setattr(cache, "write_master", killed)
    with pytest.raises(KeyboardInterrupt):
        extract.run(config)
    monkeypatch.setattr(cache, "write_master", write_master)
    assert extract.run(config.replace(augment=1)).new_views == 0
    again = extract.run(config)
    assert again.new_views == 0 and again.views > 0


def test_views_are_the_augmented_images_through_the_base_and_only_of_training_rows(
        folder, make_config):
    config = make_config(folder, augment=2, **SETTINGS)
    extract.run(config)
    base = backbone.build_backbone(backbone.resolve_weights("none"), config.size)
    with FeatureStore(config.features_dir) as store:
        train = store.rows("train")
        paths = [f"{store.image_root(config.data)}/{p}" for p in store.paths[train]]
        plain = np.stack([images.load_image(p, config.size) for p in paths])
        for view in (1, 2):
            expected = np.asarray(base(augment.augment_views(plain, list(store.sha256[train]),
                                                             [view] * len(train), config.seed)))
            np.testing.assert_allclose(store.read_views(train, [view] * len(train)), expected,
                                       rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(store.read_views(train, [0] * len(train)),
                                      store.read(train))
        for split in ("validation", "test"):
            rows = store.rows(split)
            assert len(rows)
            with pytest.raises(UserError, match=r"has no view 1 of row .*AUGMENT"):
                store.read_views(rows, [1] * len(rows))


def test_a_cache_without_views_reads_as_before_and_export_leaves_views_out(folder, make_config,
                                                                          tmp_path):
    config = make_config(folder, augment=0, **SETTINGS)
    extract.run(config)
    with FeatureStore(config.features_dir) as store:
        assert store.views == 0 and views.epoch_reader(store, 0) is None
    extract.run(config.replace(augment=1))
    out = str(tmp_path / "alone.h5")
    export.run(config.replace(out=out, augment=None))  # AUGMENT=0 now contradicts the cache
    with FeatureStore(config.features_dir) as store, h5py.File(out, "r") as alone:
        assert store.views == 1
        assert not set(cache.VIEW_DATASETS) & set(alone)
        np.testing.assert_array_equal(alone["features"][()], store.read(np.arange(len(store))))


# --------------------------------------------------------------------------------------------
# train-head reads the views
# --------------------------------------------------------------------------------------------

def test_train_head_reads_a_view_of_each_training_image_every_epoch(folder, make_config):
    config = make_config(folder, augment=2, **SETTINGS)
    extract.run(config)
    with FeatureStore(config.features_dir) as store:
        rows = store.rows("train")
        every = {v: store.read_views(rows, [v] * len(rows)) for v in range(3)}
        read = views.epoch_reader(store, config.seed)
        targets = np.arange(len(store))  # a row's target is its index
        ds = batches.CachedFeatures(store, rows, targets, 4, seed=0, read=read)
        for epoch in range(3):
            expected = augment.epoch_views(rows, 2, config.seed, epoch, len(store))
            for x, y in ds:
                for features, row in zip(x, y):
                    where = int(np.flatnonzero(rows == row)[0])
                    np.testing.assert_array_equal(features, every[expected[where]][where])
            ds.on_epoch_end()  # as Keras's fit does
    result = train_head.run(config.replace(head="dense"))
    assert result.metrics["models"]["dense"]["views"] == 2


@pytest.mark.parametrize("extracted, asked", [(1, 2), (2, 1), (1, 0)])
def test_train_head_with_other_views_than_the_cache_holds_is_refused_naming_extract(
        folder, make_config, extracted, asked):
    """It trained on the cache's views without a word: AUGMENT=2 on a cache with 1 view (or a
    plain one) looked as if it had worked. AUGMENT not told takes what the cache holds."""
    config = make_config(folder, augment=extracted, **SETTINGS)
    extract.run(config)
    for head in ("dense", "logreg"):
        with pytest.raises(UserError, match=rf"AUGMENT={asked} but .* was extracted with "
                                            rf"AUGMENT={extracted}: run `make extract NAME=\S+ "
                                            rf"AUGMENT={asked}` first, or leave AUGMENT out"):
            train_head.run(config.replace(augment=asked, head=head))
    dense = train_head.run(config.replace(augment=None, head="dense")).metrics["models"]["dense"]
    assert dense["views"] == extracted


def test_augment_out_of_range_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"AUGMENT=-1 is out of range"):
        Config(augment=-1, features_root=str(tmp_path))
