"""The fixes that make each stage earn its keep, one small deterministic test each
(bench/QUALITY_NOTES.md has the experiments behind them)."""
import os
import re

import keras
import numpy as np
import pytest
from helpers import make_image_folder
from test_train_head import synthetic_cache

from pipeline import cache, extract, finetune, train_head
from pipeline.cache import FeatureStore, batches, settings
from pipeline.config import Config
from pipeline.data import images
from pipeline.model import backbone, finetuning, logs, registry


@pytest.fixture
def class_sorted(tmp_path):
    """A cache of 256 training rows stored one class after the other, as extract stores a
    DATA/train/cats, DATA/train/dogs dataset."""
    config = Config(name="sorted", augment=0, size=32, batch_size=32,
                    features_root=str(tmp_path / "features"), models_root=str(tmp_path / "models"))
    synthetic_cache(config.features_dir, [0] * 128 + [1] * 128, ["train"] * 256)
    return config


@pytest.mark.parametrize("block", [64, 128])
def test_shuffled_blocks_and_batches_mix_a_class_sorted_cache(class_sorted, monkeypatch, block):
    # Blocks of consecutive rows were single-class here: each epoch of the head saw all cats,
    # then all dogs, and ended tilted to the last class (cats_vs_dogs: dense head 0.734 -> 0.761)
    with FeatureStore(class_sorted.features_dir) as store:
        rows = store.rows("train")
        for epoch in range(3):
            rng = np.random.default_rng([0, epoch])
            order = np.concatenate(batches.block_plan(rows, block, rng))
            assert 0.3 < store.labels[order[:128]].mean() < 0.7  # the first half of the epoch
        monkeypatch.setattr(cache, "READ_BLOCK", block)  # train-head's blocks
        ds = batches.CachedFeatures(store, rows, store.labels.astype(np.float32)[:, None],
                                       32, seed=0)
        batch_means = [y.mean() for _, y in ds]
    assert min(batch_means) > 0.05 and max(batch_means) < 0.95


def test_small_blocks_of_wide_rows_mix_the_classes_as_large_ones_do(class_sorted):
    # Fine-tuning from the cache reads blocks of 384 rows of 9x9x512 (batches.BLOCK_BYTES): of
    # 32-row pieces, each block was 12 pieces and had a class share of its own (epoch 5 of
    # cats_vs_dogs collapsed, train accuracy 0.80 -> 0.69). Blocks keep 32 pieces at any size.
    with FeatureStore(class_sorted.features_dir) as store:
        rows = store.rows("train")
        for epoch in range(3):
            for indices in batches.block_plan(rows, 96, np.random.default_rng([0, epoch])):
                assert 0.35 < store.labels[indices].mean() < 0.65  # 32-row pieces: 1/3, 2/3


def test_scattered_rows_are_read_exactly_without_reading_the_rows_between(class_sorted,
                                                                          monkeypatch):
    read_rows = []
    with FeatureStore(class_sorted.features_dir) as store:
        everything = store.read(np.arange(len(store)))
        block = store.block
        monkeypatch.setattr(store, "block", lambda start, stop, dataset=None: (
            read_rows.append(stop - start), block(start, stop, dataset))[1])
        wanted = np.concatenate([np.arange(200, 232), np.arange(0, 32), np.arange(100, 132)])
        np.testing.assert_array_equal(store.read(wanted), everything[wanted])
    assert sorted(read_rows) == [32, 32, 32]  # three runs, not rows 0-231 at once
    assert cache.READ_GAP < 68  # the gaps between those runs


# --------------------------------------------------------------------------------------------
# TensorBoard logs of every training run
# --------------------------------------------------------------------------------------------

def event_files(folder):
    return [name for _, _, names in os.walk(folder) for name in names if "tfevents" in name]


def test_train_head_writes_tensorboard_logs_under_tensorflow(tmp_path, capsys):
    config = Config(name="logged", augment=0, size=32, batch_size=16, epochs=2, head="dense",
                    features_root=str(tmp_path / "features"), models_root=str(tmp_path / "models"))
    synthetic_cache(config.features_dir, [i % 2 for i in range(60)],
                    ["train", "train", "validation"] * 20)
    train_head.run(config)
    written = event_files(os.path.join(config.models_dir, "logs", "head"))
    if keras.backend.backend() == "tensorflow":
        assert written
    else:  # writing them would import TensorFlow into a JAX or PyTorch run
        assert not written
        assert "head: no TensorBoard logs under BACKEND=" in capsys.readouterr().out


@pytest.mark.parametrize("run", ["head", "finetune"])
def test_without_a_summary_writer_training_goes_on_with_a_notice(tmp_path, monkeypatch, capsys,
                                                                 run):
    monkeypatch.setattr(logs.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(logs.keras.backend, "backend", lambda: "tensorflow")
    config = Config(name="unlogged", features_root=str(tmp_path), models_root=str(tmp_path))
    assert logs.tensorboard(config, run) is None
    assert re.search(rf"{run}: no TensorBoard logs in .*logs/{run}: .*pip install tensorflow",
                     capsys.readouterr().out)
    assert not os.path.exists(os.path.join(config.models_dir, "logs"))


# --------------------------------------------------------------------------------------------
# Fine-tuning does not start by undoing the head
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned_start(tmp_path_factory):
    """A dataset with its cache and trained dense head (WEIGHTS=none, 32 px)."""
    root = tmp_path_factory.mktemp("tuned_start")
    data = make_image_folder(root / "data", per_class=8)
    config = Config(data=data, augment=0, weights="none", size=32, batch_size=4, split="50/25/25",
                    epochs=2,
                    head="dense", features_root=str(root / "features"),
                    models_root=str(root / "models"))
    extract.run(config)
    train_head.run(config)
    # the settings as finetune resolves them (what extract recorded, else the defaults)
    return settings.resolve(config, settings.read(config.features_dir), "finetune")


@pytest.mark.parametrize("optimizer, warmup, moves_at_least, moves_at_most", [
    ("adam", 1, 0.0, 0.0), ("rmsprop", 1, 0.0, 0.0),
    ("adam", 0, 0.9, 1.01), ("rmsprop", 0, 3.0, 4.0)])
def test_the_first_fine_tuning_step_moves_no_weight_by_more_than_the_warm_up_allows(
        tuned_start, optimizer, warmup, moves_at_least, moves_at_most):
    # An adaptive optimizer's first step moves every weight by about LR in the sign of its
    # gradient (Adam: LR; RMSprop: LR / sqrt(1 - rho) = 3.2 LR): all of block5 and the head at
    # once, which flipped the head's predictions on cats_vs_dogs. With FINETUNE_WARMUP the rate
    # rises from 0 and the first step moves nothing.
    config = tuned_start.replace(finetune_warmup=warmup, finetune_optimizer=optimizer)
    keras.utils.set_random_seed(0)
    with FeatureStore(config.features_dir) as store:
        x, y = next(iter(finetune.make_datasets(config, store)["train"]))
        head = registry.load(config, "dense")
        model, _ = finetuning.build_model(config, backbone.weights_of_cache("", store.attrs), head,
                                        store)
    before = [np.array(w) for w in model.trainable_weights]
    model.train_on_batch(x, y)
    moved = max(float(np.max(np.abs(np.array(w) - b)))
                for w, b in zip(model.trainable_weights, before))
    assert moves_at_least * config.lr <= moved <= moves_at_most * config.lr


def test_fine_tuning_that_never_beats_the_head_hands_back_the_head(tuned_start, tmp_path):
    # LR=0.5 wrecks block5 in one epoch: the model kept must be the head on the base, exactly
    config = tuned_start.replace(lr=0.5, finetune_warmup=0, finetune_epochs=1, fresh=True)
    result = finetune.run(config)
    assert result.best_epoch == 0  # "epoch 0": the head
    with FeatureStore(config.features_dir) as store:
        rows = store.rows("validation")
        features = store.read(rows)
        paths = [os.path.join(store.image_root(config.data), p) for p in store.paths[rows]]
    pictures = np.stack([images.load_image(p, config.size) for p in paths])
    np.testing.assert_allclose(registry.predictor(config, "finetuned")(pictures),
                               registry.predictor(config, "dense")(features), atol=1e-4)


@pytest.mark.parametrize("augment, finetune_augment", [(0, True), (1, True), (0, False)])
def test_fine_tuning_augments_unless_finetune_augment_is_0(tuned_start, tmp_path, monkeypatch,
                                                           augment, finetune_augment):
    # Round 2 augmented only for a head trained on views, from a replica in which block5 never
    # trained; with block5 training, augmented fine-tuning of a plain head beat plain fine-tuning
    # on cats_vs_dogs (+1.2 / +2.7 points: bench/QUALITY_NOTES.md, section f)
    config = tuned_start.replace(augment=augment, finetune_augment=finetune_augment,
                                 finetune_epochs=1, models_root=str(tmp_path / "models"),
                                 finetune_from="images")  # the model on images, with its layers
    extract.run(config)
    train_head.run(config)
    built, build_model = [], finetuning.build_model

    class Built(Exception):
        pass

    def spy(*args, **kwargs):  # keeps the model finetune.run would train, and stops it there
        built.append(build_model(*args, **kwargs))
        raise Built
    monkeypatch.setattr(finetuning, "build_model", spy)
    with pytest.raises(Built):
        finetune.run(config)
    model = built[0][0]
    with FeatureStore(config.features_dir) as store:
        first = store.rows("train")[:4]
        plain = np.stack([images.load_image(os.path.join(store.image_root(config.data), p),
                                            config.size) for p in store.paths[first]])
    extract.run(config.replace(augment=0))  # the module's cache as it was
    # the augmentation sits first in the model (active in training only), or is not there
    layers = {layer.name: layer for layer in model.layers}
    assert ("augmentation" in layers) == finetune_augment
    if finetune_augment:
        seen = keras.ops.convert_to_numpy(layers["augmentation"](plain, training=True))
        assert np.abs(seen - plain).max() > 1
        unseen = keras.ops.convert_to_numpy(layers["augmentation"](plain, training=False))
        np.testing.assert_array_equal(unseen, plain)  # prediction sees the plain image
