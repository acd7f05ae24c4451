"""Fine-tuning from the cache (FINETUNE_FROM=cache): extract keeps the activations at UNFREEZE's cut
for every row and AUGMENT view, under a key and identity of their own; finetune trains the layers
above the cut on them, a new view each epoch, without DATA; finetuned.keras is still the whole
image -> probabilities model."""
import json
import os
import shutil

import h5py
import keras
import numpy as np
import pytest
from helpers import make_image_folder

from pipeline import cache, extract, finetune, train_head
from pipeline.cache import FeatureStore, views
from pipeline.data import augment, backbones, images
from pipeline.model import backbone

SETTINGS = dict(split="50/25/25", epochs=2, augment=2)  # 12 images: ~6 train, 3 val, 3 test


@pytest.fixture
def ready(prepared):
    """config.replace(**changes) on this test's own copy of a cache and trained head."""
    return prepared((extract.run, train_head.run), **SETTINGS).replace


def segments_of(config, identity_id):
    folder = cache.segment_dir(config.features_dir, identity_id)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# --------------------------------------------------------------------------------------------
# The cut in the cache
# --------------------------------------------------------------------------------------------

def test_vgg16s_layers_and_shapes_are_known_without_building_it():
    entry = backbones.get("vgg16")
    base = backbone.build_backbone(backbone.resolve_weights("none"), 48)
    assert [layer.name for layer in base.layers[1:]] == [stage.output for stage in entry.chain]
    for layer in base.layers[1:]:
        assert entry.layer_shape(layer.name, 48) == tuple(layer.output.shape[1:])


@pytest.mark.parametrize("unfreeze, cut", [("block5", "block4_pool"), ("block4", "block3_pool"),
                                           ("2", "block5_conv1"), ("13", None),
                                           ("", "block4_pool")])
def test_the_cut_is_the_input_of_the_lowest_trainable_layer(unfreeze, cut):
    assert backbones.get("vgg16").cut_of(unfreeze) == cut


def test_the_cut_is_in_the_key_and_a_new_cut_computes_only_itself(ready):
    config = ready()
    with FeatureStore(config.features_dir) as store:
        features_id = backbone.identity_id(store.identity)
        block4 = store.cut
    assert block4["layer"] == "block4_pool" and block4["identity"]["layer"] == "block4_pool"
    assert block4["identity_id"] != features_id
    features_before = segments_of(config, features_id)

    result = extract.run(config.replace(unfreeze="block4"))  # cut: block3_pool
    with FeatureStore(config.features_dir) as store:
        block3 = store.cut
        assert store.shape("cut_features") == (4, 4, 256)
        assert store.cut_views() == 2
    assert block3["layer"] == "block3_pool"
    assert block3["identity_id"] not in (block4["identity_id"], features_id)
    assert segments_of(config, features_id) == features_before  # no feature row computed again
    assert (result.rows, result.new, result.new_views) == (12, 12, result.views)
    assert segments_of(config, block4["identity_id"])  # the other cut stays: going back is free
    back = extract.run(config)
    assert (back.new, back.new_views, back.cut) == (0, 0, "block4_pool")


def test_an_unchanged_rerun_computes_nothing_and_a_larger_augment_only_new_views(ready):
    config = ready()
    moved = extract.run(config)  # this copy's DATA, where the cache recorded the folder copied
    assert (moved.new, moved.new_views, moved.changed) == (0, 0, True)
    again = extract.run(config)
    assert (again.new, again.new_views, again.changed) == (0, 0, False)
    more = extract.run(config.replace(augment=3))
    with FeatureStore(config.features_dir) as store:
        train = len(store.rows("train"))
        assert store.cut_views() == 3 and store.views == 3
    assert (more.new, more.new_views) == (0, train)  # view 3 of each training image, once


def test_validation_and_test_rows_have_plain_activations_only(ready):
    config = ready()
    with FeatureStore(config.features_dir) as store:
        with h5py.File(store.path, "r") as f:
            with_views = set(f["cut_view_sha256"][:].astype(str))
        train = set(store.sha256[store.rows("train")])
        assert with_views == train
        data = finetune.cached_datasets(config, store)
        for split in ("validation", "test"):
            rows = store.rows(split)
            x = np.concatenate([data[split][i][0] for i in range(len(data[split]))])
            np.testing.assert_array_equal(x, store.read(rows, "cut_features"))


def test_the_cut_equals_the_base_up_to_that_layer_on_the_image_and_its_views(ready):
    config = ready(cut_storage="float32")
    extract.run(config)
    with FeatureStore(config.features_dir) as store:
        row = int(store.rows("train")[0])
        path, sha = os.path.join(config.data, store.paths[row]), store.sha256[row]
        cached = store.read_views([row] * 3, [0, 1, 2], "cut_")
    base = backbone.build_backbone(backbone.resolve_weights("none"), 32)
    bottom = keras.Model(base.input, base.get_layer("block4_pool").output)
    image = images.load_image(path, 32)[None]
    inputs = np.concatenate([image, augment.augment_views(np.repeat(image, 2, 0), [sha] * 2,
                                                          [1, 2], config.seed)])
    np.testing.assert_allclose(cached, bottom.predict(inputs, verbose=0), rtol=1e-5, atol=1e-4)


def test_an_image_is_decoded_once_for_its_row_its_views_and_every_layer(tmp_path, make_config,
                                                                       monkeypatch):
    decoded = []
    original = images.try_load_image
    monkeypatch.setattr(images, "try_load_image",
                        lambda path, *args: decoded.append(path) or original(path, *args))
    config = make_config(make_image_folder(tmp_path / "data", per_class=6), **SETTINGS)
    result = extract.run(config)
    with FeatureStore(config.features_dir) as store:
        train = len(store.rows("train"))
    assert (result.rows, result.views, result.cut) == (12, 2 * train, "block4_pool")
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 12  # once each


# --------------------------------------------------------------------------------------------
# Fine-tuning on it
# --------------------------------------------------------------------------------------------

def test_each_epoch_reads_another_view_and_the_same_seed_the_same_views(ready):
    config = ready()
    with FeatureStore(config.features_dir) as store:
        rows = store.rows("train")

        def epochs(dataset, count):
            """{row: the bytes it was read as} for each of `count` epochs"""
            seen = []
            for _ in range(count):
                read = {}
                for i in range(len(dataset)):
                    number, start = divmod(i * dataset.batch_size, dataset.per_block)
                    batch_rows = dataset.blocks[number][start:start + dataset.batch_size]
                    x, _ = dataset[i]
                    read.update({int(r): x[k].tobytes() for k, r in enumerate(batch_rows)})
                seen.append(read)
                dataset.on_epoch_end()
            return seen

        first = epochs(finetune.cached_datasets(config, store)["train"], 3)
        second = epochs(finetune.cached_datasets(config, store)["train"], 3)
        assert first == second  # the same seed, the same views in the same order
        for row in rows.tolist():  # 2 views + the plain activations: 3 epochs, 3 inputs
            assert len({epoch[row] for epoch in first}) == 3
        chosen = augment.epoch_views(rows, 2, config.seed, 1, len(store))
        expected = store.read_views(rows, chosen, "cut_")
        for k, row in enumerate(rows.tolist()):
            assert first[1][row] == expected[k].tobytes()


def test_fine_tuning_from_the_cache_needs_no_images_and_saves_the_whole_model(ready):
    config = ready(cut_storage="float32", finetune_epochs=2)
    extract.run(config)
    shutil.move(config.data, config.data + ".away")  # no image can be decoded
    result = finetune.run(config)
    assert result.source == "cache" and result.epochs == 2
    shutil.move(config.data + ".away", config.data)

    whole = keras.saving.load_model(result.model_path, safe_mode=True, compile=False)
    base = whole.get_layer("vgg16")
    cut = base.get_layer("block4_pool")
    x = inputs = keras.Input(cut.output.shape[1:])
    for layer in base.layers[base.layers.index(cut) + 1:]:
        x = layer(x)
    on_cut = keras.Model(inputs, whole.layers[-1](x))  # the model that trained, from the file
    with FeatureStore(config.features_dir) as store:
        rows = store.rows("validation")
        paths = [os.path.join(config.data, p) for p in store.paths[rows]]
        activations = store.read(rows, "cut_features")
        labels = store.labels[rows]
    on_images = whole.predict(np.stack([images.load_image(p, 32) for p in paths]), verbose=0)
    np.testing.assert_allclose(on_images, on_cut.predict(activations, verbose=0), atol=1e-5)
    # and the recorded validation accuracy is the saved model's on the images
    assert result.validation["accuracy"] == pytest.approx(
        np.mean((on_images[:, 0] > 0.5) == labels), abs=1e-6)


def test_fine_tuning_on_the_plain_activations_records_the_caches_split(prepared):
    """A cache without views (AUGMENT=0) and FINETUNE_AUGMENT=0: nothing had read the rows'
    hashes before the metrics asked for the split's digest; they must be read while the cache is
    open."""
    settings = {**SETTINGS, "augment": 0}
    config = prepared((extract.run, train_head.run), **settings).replace(finetune_augment=False)
    result = finetune.run(config)
    assert result.source == "cache" and result.epochs == 1
    with open(result.metrics_path) as f:
        assert json.load(f)["split_digest"] == cache.split_digest(config.features_dir)


@pytest.mark.heavy
def test_a_killed_fine_tuning_resumes_at_the_next_epoch_and_its_views(ready, monkeypatch):
    config = ready(finetune_epochs=3, finetune_patience=10)
    for name in ("straight", "killed"):
        for root in (config.features_root, config.models_root):
            shutil.copytree(os.path.join(root, "data"), os.path.join(root, name))
    read_epochs = []  # the epoch of the views each read of the training rows was for
    original = views.epoch_reader

    def recording(store, seed, layer="", per_image=None):
        read = original(store, seed, layer, per_image)
        return lambda indices, epoch: read_epochs.append(epoch) or read(indices, epoch)
    monkeypatch.setattr(views, "epoch_reader", recording)
    uninterrupted = finetune.run(config.replace(name="straight"))
    assert {0, 1, 2} <= set(read_epochs)  # (Keras may read ahead into the next epoch)

    class Killed(Exception):
        pass

    class KillAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise Killed

    killed = config.replace(name="killed")
    with pytest.raises(Killed):
        finetune.run(killed, callbacks=[KillAfterFirstEpoch()])
    read_epochs.clear()
    resumed = finetune.run(killed)
    assert (resumed.source, resumed.resumed_from_epoch, resumed.epochs) == ("cache", 1, 3)
    assert {1, 2} <= set(read_epochs) and 0 not in read_epochs  # epoch 1's views: done
    straight = keras.saving.load_model(uninterrupted.model_path, compile=False).get_weights()
    again = keras.saving.load_model(resumed.model_path, compile=False).get_weights()
    for a, b in zip(straight, again, strict=True):  # Dropout's draws after a restart differ
        np.testing.assert_allclose(a, b, atol=1e-3)


def test_a_cache_without_the_activations_says_how_to_cache_them_and_uses_the_images(
        ready, capsys):
    config = ready()
    extract.run(config.replace(finetune_from="images"))  # the master without the cut
    with FeatureStore(config.features_dir) as store:
        assert store.cut is None
    result = finetune.run(config)
    line = [x for x in capsys.readouterr().out.splitlines() if "no block4_pool" in x]
    assert len(line) == 1 and "`make extract UNFREEZE=block5`" in line[0]
    assert result.source == "images"


def test_fine_tuning_with_augmentation_but_no_cached_views_uses_the_images(ready, capsys):
    # the choice alone: runs from either source are the tests above
    config = ready(augment=0)
    extract.run(config)
    with FeatureStore(config.features_dir) as store:
        assert finetune.training_source(config, store) == "images"
        assert "`make extract AUGMENT=5`" in capsys.readouterr().out
        assert finetune.training_source(config.replace(finetune_augment=False), store) == "cache"


def test_epoch_reader_reads_the_cut_views(ready):
    config = ready()
    with FeatureStore(config.features_dir) as store:
        rows = store.rows("train")
        read = views.epoch_reader(store, config.seed, "cut_", 2)
        chosen = augment.epoch_views(rows, 2, config.seed, 0, len(store))
        np.testing.assert_array_equal(read(rows, 0), store.read_views(rows, chosen, "cut_"))
