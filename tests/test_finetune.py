"""Stage three: fine-tuning starts exactly from the head, trains only what UNFREEZE says, resumes
after a kill, and refuses inputs that do not belong together."""
import csv
import json
import os
import shutil

import keras
import numpy as np
import pytest
from helpers import make_image_folder
from sklearn.metrics import log_loss

from pipeline import __main__ as cli
from pipeline import extract, finetune, train_head
from pipeline.cache import FeatureStore
from pipeline.config import UserError
from pipeline.data import demo, images
from pipeline.fs import artifacts, lock
from pipeline.model import backbone, finetuning, registry, resume

# 12 images: about 6 train, 3 validation, 3 test; no cached views: fine-tuning from the images
SETTINGS = dict(split="50/25/25", epochs=2, augment=0)


@pytest.fixture
def ready(prepared):
    """config.replace(**changes) on this test's own copy of a cache and trained head."""
    return prepared((extract.run, train_head.run), **SETTINGS).replace


def weights_by_layer(model):
    return {layer.name: [np.array(w) for w in layer.get_weights()]
            for layer in model.layers if layer.weights}


def changed(before, after):
    return any(not np.array_equal(a, b) for a, b in zip(before, after))


def read_log(config):
    with open(artifacts.path(config, artifacts.FINETUNE_LOG)) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


class Recorder(keras.callbacks.Callback):
    """Remembers which epochs ran and the weights the model started from."""
    def on_train_begin(self, logs=None):
        self.epochs, self.start_weights = [], self.model.get_weights()

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


class Killed(Exception):
    pass


class KillAfter(keras.callbacks.Callback):
    """Dies at the end of epoch `epoch` (0-based), after the backup callback has run."""
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.weights = self.model.get_weights()
            raise Killed


def test_one_epoch_on_the_demo_data_through_the_cli(tmp_path, make_config, capsys):
    data = str(tmp_path / "demo")
    demo.generate(data, per_class=12)
    config = make_config(data, name="demo", split="60/20/20")
    extract.run(config)
    train_head.run(config)
    args = ["--data", data, "--name", "demo", "--weights", "none", "--size", "32",
            "--batch-size", "8", "--finetune-epochs", "1", "--augment", "0",
            "--features-root", config.features_root,
            "--models-root", config.models_root]
    assert cli.main(["finetune", *args]) == 0

    with open(artifacts.path(config, artifacts.FINETUNE_METRICS)) as f:
        metrics = json.load(f)
    with FeatureStore(config.features_dir) as store:
        assert metrics["identity"] == store.identity
        rows = store.rows("test")
        paths = [os.path.join(data, p) for p in store.paths[rows]]
        labels = store.labels[rows]
    assert metrics["weights"] == backbone.RANDOM_FINGERPRINT
    assert metrics["class_names"] == list(demo.CLASSES)
    head_loss = registry.record(config, "dense").validation["loss"]
    assert metrics["head_validation"]["loss"] == pytest.approx(head_loss, rel=1e-4)
    beat_the_head = metrics["history"]["val_loss"][0] < head_loss  # else the head is kept: 0
    assert (metrics["epochs"], metrics["best_epoch"], metrics["resumed_from_epoch"]) == \
        (1, int(beat_the_head), 0)
    # the last line: both losses compared, which way it went, what was kept
    last = capsys.readouterr().out.strip().splitlines()[-1]
    epoch_loss = f"{metrics['history']['val_loss'][0]:.3f}"
    assert f"{head_loss:.3f}" in last and epoch_loss in last and "epoch 1 of 1" in last
    assert ("fell" in last and "kept epoch 1" in last) if beat_the_head else \
        ("validation loss rose" in last or "did not fall" in last) and "kept the head" in last
    assert metrics["trainable_layers"] == ["block5_conv1", "block5_conv2", "block5_conv3"]
    assert sorted(metrics["history"]) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert read_log(config) == [0]
    assert os.path.getsize(artifacts.path(config, artifacts.FINETUNE_HISTORY_PLOT)) > 1000

    model = keras.saving.load_model(artifacts.path(config, artifacts.FINETUNED), compile=False)
    probabilities = model.predict(np.stack([images.load_image(p, 32) for p in paths]), verbose=0)
    assert probabilities.shape == (len(paths), 1)
    # the recorded test scores are the saved model's on the test images
    assert metrics["test"]["accuracy"] == pytest.approx(
        np.mean((probabilities[:, 0] > 0.5) == labels), abs=1e-6)
    assert metrics["test"]["loss"] == pytest.approx(
        log_loss(labels, probabilities[:, 0], labels=[0, 1]), rel=1e-3)


HISTORY = {"val_loss": [0.52, 0.47, 0.49], "val_accuracy": [0.6, 0.7, 0.65]}


def test_the_last_line_says_the_loss_fell_and_which_epoch_was_kept():
    line = resume.outcome({"loss": 0.5, "accuracy": 0.583}, HISTORY, 2, {"accuracy": 0.7})
    assert line == ("validation loss fell from 0.500 (the head) to 0.470 (epoch 2 of 3, the "
                    "lowest): kept epoch 2, validation accuracy 0.583 -> 0.700")


def test_the_last_line_says_the_loss_rose_and_the_head_was_kept_whatever_the_accuracy():
    line = resume.outcome({"loss": 0.45, "accuracy": 0.583}, HISTORY, 0, {"accuracy": 0.583})
    assert line == ("validation loss rose: no epoch went below the head's 0.450 (the lowest, "
                    "epoch 2 of 3: 0.470, validation accuracy 0.700 against the head's 0.583): "
                    "kept the head, unchanged")
    line = resume.outcome({"loss": 0.47, "accuracy": 0.6}, HISTORY, 0, {"accuracy": 0.6})
    assert line.startswith("validation loss did not fall: no epoch went below the head's 0.470")


def test_at_step_zero_the_composed_model_equals_the_head_on_cached_features(ready):
    config = ready()
    with FeatureStore(config.features_dir) as store:
        rows = np.arange(len(store))
        features, labels = store.read(rows), store.labels[rows]
        paths = [os.path.join(config.data, p) for p in store.paths[rows]]
        weights = backbone.weights_of_cache("", store.attrs)
        identity = store.feature_identity
    head = keras.saving.load_model(artifacts.path(config, artifacts.HEAD), compile=False)
    model, _ = finetuning.compose(weights, head, identity)
    batches = images.labelled_dataset(paths, labels, 32, batch_size=5)

    composed, cached = finetuning.check_composition(model, head, batches, features)
    np.testing.assert_allclose(composed, cached, atol=1e-6)
    assert composed.shape == (12, 1) and np.ptp(composed) > 1e-4  # the images really differ
    with pytest.raises(UserError, match="cache is stale.*make extract"):
        finetuning.check_composition(model, head, batches, features[::-1])


class Snapshot(keras.callbacks.Callback):
    """The model's sub-models' weights at the end of the last epoch, before EarlyStopping puts
    the best ones back (which may be the head's own, when no epoch beat it)."""
    def on_epoch_end(self, epoch, logs=None):
        self.layers = {name: weights_by_layer(self.model.get_layer(name))
                       for name in ("vgg16", "head")}


def test_only_block5_and_the_head_change(ready):
    config = ready()
    snapshot = Snapshot()
    result = finetune.run(config, callbacks=[snapshot])
    assert result.trainable_layers == ["block5_conv1", "block5_conv2", "block5_conv3"]

    base_before = weights_by_layer(backbone.build_backbone(backbone.resolve_weights("none"), 32))
    base_after = snapshot.layers["vgg16"]
    assert base_before.keys() == base_after.keys() and len(base_after) == 13
    for name in base_before:
        moved = changed(base_before[name], base_after[name])
        assert moved == name.startswith("block5"), name
    head_before = weights_by_layer(keras.saving.load_model(artifacts.path(config, artifacts.HEAD)))
    head_after = snapshot.layers["head"]
    assert head_before.keys() == head_after.keys()
    assert all(changed(head_before[name], head_after[name]) for name in head_before)


@pytest.mark.parametrize("unfreeze, trainable", [
    ("block5", ["block5_conv1", "block5_conv2", "block5_conv3"]),
    ("block4", ["block4_conv1", "block4_conv2", "block4_conv3",
                "block5_conv1", "block5_conv2", "block5_conv3"]),
    ("2", ["block5_conv2", "block5_conv3"]),
    ("0", []),
])
def test_unfreeze_by_block_name_or_conv_count(unfreeze, trainable):
    weights = backbone.resolve_weights("none")
    base = backbone.build_backbone(weights, 32)
    identity = backbone.identity_of(weights, 32)
    assert finetuning.set_trainable(base, unfreeze, identity) == trainable
    assert [w.path.split("/")[0] for w in base.trainable_weights] == \
        [name for name in trainable for _ in ("kernel", "bias")]


@pytest.mark.parametrize("unfreeze", ["block6", "14", "top", "-1"])
def test_a_bad_unfreeze_is_refused(unfreeze):
    weights = backbone.resolve_weights("none")
    base = backbone.build_backbone(weights, 32)
    with pytest.raises(UserError, match="UNFREEZE=.*block5"):
        finetuning.set_trainable(base, unfreeze, backbone.identity_of(weights, 32))


@pytest.mark.heavy
def test_a_killed_run_continues_at_the_next_epoch(ready):
    config = ready(finetune_epochs=3)
    kill = KillAfter(epoch=0)  # killed after epoch 1 of 3
    with pytest.raises(Killed):
        finetune.run(config, callbacks=[kill])
    assert read_log(config) == [0]

    recorder = Recorder()
    result = finetune.run(config, callbacks=[recorder])
    assert recorder.epochs == [1, 2]  # epoch 2 of 3 onwards, from the checkpoint's weights
    assert all(np.array_equal(a, b) for a, b in zip(kill.weights, recorder.start_weights))
    assert (result.resumed_from_epoch, result.epochs) == (1, 3)
    assert read_log(config) == [0, 1, 2]
    with open(result.metrics_path) as f:
        history = json.load(f)["history"]
    assert len(history["val_loss"]) == 3  # EarlyStopping's memory of epoch 1 survived the kill:
    assert result.best_epoch == int(np.argmin(history["val_loss"])) + 1

    again = Recorder()  # a finished run has nothing left to train ...
    assert finetune.run(config, callbacks=[again]).epochs == 3
    assert again.epochs == []
    with pytest.raises(UserError, match="UNFREEZE=block5 .*FRESH=1"):  # ... and keeps its settings
        finetune.run(config.replace(unfreeze="block4"))
    with pytest.raises(UserError, match="FINETUNE_OPTIMIZER=adam .*FRESH=1"):
        finetune.run(config.replace(finetune_optimizer="rmsprop"))
    with pytest.raises(UserError, match="FINETUNE_AUGMENT=1 .*FRESH=1"):  # other layers
        finetune.run(config.replace(finetune_augment=False))
    with pytest.raises(UserError, match="CLASS_WEIGHT=(none|auto): .*FRESH=1"):  # another loss
        finetune.run(config.replace(class_weight="balanced"))

    config = config.replace(finetune_epochs=1)
    fresh = Recorder()
    result = finetune.run(config.replace(fresh=True), callbacks=[fresh])
    assert (fresh.epochs, result.resumed_from_epoch, read_log(config)) == ([0], 0, [0])

    train_head.run(config.replace(seed=1))  # a new head makes the checkpoint obsolete
    restart = Recorder()
    result = finetune.run(config, callbacks=[restart])
    assert (restart.epochs, result.resumed_from_epoch) == ([0], 0)


def test_a_backup_from_before_finetune_augment_keeps_the_augmentation_it_was_made_with(ready):
    # such a backup augmented exactly when the head had seen views: this head saw none, so
    # continuing it with the new default (augmented) would restore into other layers
    config = ready(finetune_epochs=2)
    with pytest.raises(Killed):
        finetune.run(config, callbacks=[KillAfter(epoch=0)])
    state_path = os.path.join(artifacts.path(config, artifacts.FINETUNE_BACKUP), resume.STATE)
    with open(state_path) as f:
        state = json.load(f)
    del state["settings"]["finetune_augment"]
    with open(state_path, "w") as f:
        json.dump(state, f)
    with pytest.raises(UserError, match="FINETUNE_AUGMENT=0 .*FRESH=1"):
        finetune.run(config)
    resumed = finetune.run(config.replace(finetune_augment=False, finetune_from="images"))
    assert (resumed.resumed_from_epoch, resumed.epochs) == (1, 2)


def test_early_stopping_remembers_its_best_epoch_across_a_restart(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="rmsprop", loss="mse")  # the backup saves the optimizer's state too
    model.optimizer.build(model.trainable_variables)
    model.stop_training = False  # as fit sets it

    def run_until_killed(state, epochs):
        """The callbacks finetune builds (EarlyStopping, then the backup), through `epochs`."""
        early = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
        backup = resume.Backup(str(tmp_path), {}, state, early, started=0.0)
        for callback in (early, backup):
            callback.set_model(model)
            callback.on_train_begin()
        for epoch, val_loss, fill in epochs:  # `fill`: the weights this epoch ends with
            model.set_weights([np.full_like(w, fill) for w in model.get_weights()])
            for callback in (early, backup):
                callback.on_epoch_end(epoch, {"val_loss": val_loss})
        return early

    run_until_killed(None, [(0, 0.5, 7.0), (1, 0.9, 1.0)])  # epoch 0 is the best
    with open(tmp_path / resume.STATE) as f:
        state = json.load(f)
    early = run_until_killed(state, [(2, 0.8, 2.0), (3, 0.9, 3.0)])  # no better than epoch 0's 0.5
    memory = {"wait": early.wait, "best": early.best, "best_epoch": early.best_epoch}
    assert model.stop_training and memory == {"wait": 3, "best": 0.5, "best_epoch": 0}
    early.on_train_end()
    assert all(np.array_equal(w, np.full_like(w, 7.0)) for w in model.get_weights())


@pytest.mark.parametrize("kill", ["while Keras writes the weights", "while Keras writes the epoch",
                                  "before the state follows"])
def test_a_kill_during_a_backup_resumes_from_the_last_whole_one(tmp_path, monkeypatch, kill):
    """Killed during the backup of epoch 3: the resumed run trains epoch 3 again, from the
    weights and optimizer state of epoch 2, whatever Keras had written of epoch 3."""
    x = np.random.default_rng(0).random((8, 2), dtype=np.float32)

    def fit(state, seed, before_backup=(), after_backup=()):  # callbacks as finetune has them
        keras.utils.set_random_seed(seed)  # a restarted process starts from other weights
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="rmsprop", loss="mse")
        early = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
        backup = resume.Backup(str(tmp_path), {}, state, early, started=0.0)
        model.fit(x, x[:, :1], validation_data=(x, x[:, :1]), initial_epoch=(state or {}).get(
            "epochs", 0), epochs=3, callbacks=[early, *before_backup, backup, *after_backup],
            verbose=0)

    class KillDuringBackup(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.weights = self.model.get_weights()
            if epoch < 2:
                return
            def write_half(filepath, overwrite=True):
                self.model.__class__.save_weights(self.model, filepath)
                with open(filepath, "r+b") as f:
                    f.truncate(os.path.getsize(filepath) // 2)
                raise Killed
            def die(path, data):
                if kill == "while Keras writes the epoch":
                    open(tmp_path / "keras" / "training_metadata.json", "w").close()
                raise Killed
            if kill == "while Keras writes the weights":
                monkeypatch.setattr(self.model, "save_weights", write_half)
            else:
                monkeypatch.setattr(finetune.artifacts, "write_json", die)

    killer = KillDuringBackup()
    with pytest.raises(Killed):
        fit(None, seed=0, before_backup=[killer])
    monkeypatch.undo()
    with open(tmp_path / resume.STATE) as f:
        state = json.load(f)
    assert state["epochs"] == 2

    class Recorder2(Recorder):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self.iterations = int(self.model.optimizer.iterations)

    recorder = Recorder2()
    fit(state, seed=1, after_backup=[recorder])
    assert recorder.epochs == [2] and recorder.iterations == 2  # one step an epoch
    assert all(np.array_equal(a, b) for a, b in zip(killer.weights, recorder.start_weights))


def test_no_cache_and_no_head_are_refused(tmp_path, make_config):
    data = make_image_folder(tmp_path / "data", per_class=6)
    config = make_config(data, **SETTINGS)
    with pytest.raises(UserError, match="no feature cache.*make extract"):
        finetune.run(config)
    extract.run(config)
    with pytest.raises(UserError, match="there is no .*head.keras: run `make train-head`"):
        finetune.run(config)


@pytest.mark.heavy
def test_the_same_seed_fine_tunes_to_the_same_weights(ready):
    """Augmentation draws from seeded generators; batches augmented in parallel would take their
    draws in a racy order. Batch 1: six augmented train batches an epoch."""
    config = ready(batch_size=1, finetune_epochs=2, fresh=True)
    runs = []
    for _ in range(2):
        finetune.run(config)
        runs.append(weights_by_layer(keras.saving.load_model(
            artifacts.path(config, artifacts.FINETUNED), compile=False)))
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert not changed(runs[0][name], runs[1][name]), name


def test_a_second_finetune_of_the_same_dataset_fails_clearly(ready):
    config = ready()
    with lock.exclusive(config.models_dir, "finetune"):
        with pytest.raises(UserError, match="another finetune .* is writing .*: wait for it"):
            finetune.run(config)


def test_the_cli_prints_one_line_and_exits_non_zero(tmp_path, capsys):
    assert cli.main(["finetune", "--data", str(tmp_path / "data"),
                     "--features-root", str(tmp_path / "features")]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "make extract" in message


@pytest.mark.parametrize("change, message", [
    ("delete", "no longer matches the cache: .* is gone; pass the DATA.*make extract"),
    ("replace", "no longer matches the cache: .* changed since `make extract`"),
])
def test_data_that_no_longer_matches_the_cache_is_refused(ready, change, message):
    config = ready()
    with FeatureStore(config.features_dir) as store:
        first, second = (os.path.join(config.data, p) for p in store.paths[:2])
    if change == "delete":
        os.remove(first)
    else:
        shutil.copyfile(second, first)  # another image under the same name
    with pytest.raises(UserError, match=message):
        finetune.run(config)


def test_other_weights_or_a_head_of_another_identity_are_refused(ready, tiny_weights_file):
    config = ready()
    with pytest.raises(UserError, match=r"^WEIGHTS=\S+ but .* was extracted with WEIGHTS=none: "
                                        r"run `make extract NAME=\S+ WEIGHTS="):
        finetune.run(config.replace(weights=tiny_weights_file))

    metrics_path = artifacts.path(config, artifacts.HEAD_METRICS)
    with open(metrics_path) as f:
        metrics = json.load(f)
    metrics["identity"]["image_size"] = 64
    artifacts.write_json(metrics_path, metrics)
    with pytest.raises(UserError, match="head.keras was trained on .*image_size.*make train-head"):
        finetune.run(config)
