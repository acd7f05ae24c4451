"""Stage three: fine-tune the top of VGG16 together with the stage-two dense head, on images.

    python -m pipeline finetune [--name NAME] [--unfreeze block5|N] [--finetune-epochs 10]
                                [--lr 1e-5] [--fresh 1]

Fine-tuning starts from the trained head, never a random one: a random head sends large errors back
through the base and destroys what the base learned. Every epoch is checkpointed, so a killed run
continues where it stopped; FRESH=1 starts again from the head.

    -> models/<NAME>/finetuned.keras (image -> probabilities), finetune_metrics.json,
       finetune_history.png, finetune_log.csv; for resuming: finetune_checkpoint.keras,
       finetune_state.json, finetune_best_weights.npz
"""
import csv
import os
import sys
import time
from dataclasses import dataclass

import keras
import numpy as np
from tqdm import tqdm

from . import artifacts, backbone, cache, heads, images, plots
from .config import Config, UserError

PATIENCE = 3                              # epochs without a lower val_loss before stopping
STATE = "finetune_state.json"             # epochs done, history, EarlyStopping's memory
BEST = "finetune_best_weights.npz"        # the best epoch's weights (EarlyStopping's copy)
MATCH_ATOL = 1e-2  # step 0, composed vs head on cached features: loose enough for GPU TF32 math,
                   # far below what other images, weights or preprocessing would change
RETRAIN = "run `make extract` then `make train-head`"


@dataclass
class FinetuneResult:
    model_path: str
    metrics_path: str
    plot_path: str
    validation: dict          # {"accuracy", "loss"} of the restored best weights
    test: dict                # the same on the test split ({} when there is none)
    epochs: int               # epochs trained in total, over every resumed run
    best_epoch: int           # 1-based
    resumed_from_epoch: int   # epochs already done when this run started (0 = fresh)
    trainable_layers: list
    seconds: float


def run(config: Config) -> FinetuneResult:
    start = time.perf_counter()
    if config.finetune_epochs < 1:
        raise UserError(f"EPOCHS={config.finetune_epochs} trains nothing: use EPOCHS=1 or more")
    # Two fine-tunes of one dataset would overwrite each other's checkpoints: one at a time. (Other
    # stages write models/<NAME> too, so strays are left alone; each file is replaced atomically.)
    with cache.exclusive(config.models_dir, "finetune", remove_strays=False):
        return _finetune(config, start)


def _finetune(config, start):
    keras.utils.set_random_seed(config.seed)
    with cache.FeatureStore(config.features_dir) as store:           # "no cache" refused here
        head_record = artifacts.model_record(config, "head")  # this run's head, or refused
        weights = backbone.weights_of_cache(config.weights, store.attrs)
        artifacts.require_same_identity(head_record["identity"], store.identity,
                                        artifacts.path(config, artifacts.HEAD))
        data = make_datasets(config, store)
        head = artifacts.load_model(config, "head")
        model, trainable = build_model(config, weights, head, store)
        settings = {"identity_id": backbone.identity_id(store.identity), "unfreeze": config.unfreeze,
                    "lr": config.lr, "head_sha256": head_record["file_sha256"]}
        state = resume_state(config, settings)
        if state is None:  # a resumed model is no longer the head's: nothing to compare
            check_composition(model, head, *data["step0"])
        else:
            model.optimizer.build(model.trainable_variables)
            model.load_weights(artifacts.path(config, artifacts.FINETUNE_CHECKPOINT))  # + optimizer
            print(f"finetune {config.dataset_name}: continuing after epoch {state['epochs']} "
                  "of the checkpoint (FRESH=1 starts again from the head)")

    done = state["epochs"] if state else 0
    early = ResumableEarlyStopping(state, monitor="val_loss", patience=PATIENCE,
                                   restore_best_weights=True)
    if state:
        early.resume_weights = _load_best(config)
    checkpoint = EpochCheckpoint(config, settings, early, state, start)
    _trim_log(config, done)
    callbacks = [early, keras.callbacks.CSVLogger(artifacts.path(config, artifacts.FINETUNE_LOG),
                                                  append=True),
                 checkpoint, *config.extras.get("callbacks", [])]   # extras: tests' kill switches
    # A run that early stopping ended stays ended; otherwise train up to EPOCHS (possibly 0 more).
    target = done if state and state["stopped"] else max(done, config.finetune_epochs)
    model.fit(data["train"], validation_data=data["validation"], initial_epoch=done, epochs=target,
              callbacks=callbacks, shuffle=False,  # shuffle=False: the dataset shuffles itself
              verbose=1 if sys.stdout.isatty() else 2)  # logs: a line an epoch
    # EarlyStopping.on_train_end has put the best epoch's weights back (also after a resume).

    validation_scores = model.evaluate(data["validation"], return_dict=True, verbose=0)
    test_scores = (model.evaluate(data["test"], return_dict=True, verbose=0)
                   if data["test"] is not None else {})
    result = _write_outputs(config, store, weights, model, head_record, checkpoint, early,
                            trainable, done, validation_scores, test_scores)
    print(f"finetune {config.dataset_name}: {result.epochs} epochs (best {result.best_epoch}), "
          f"validation accuracy {result.validation['accuracy']:.3f}, {result.seconds:.1f} s "
          f"-> {result.model_path}")
    if weights.notice:
        print(f"!!! {weights.notice}")
    return result


# --------------------------------------------------------------------------------------------
# Inputs: the images the cache was built from, still the same
# --------------------------------------------------------------------------------------------

def make_datasets(config, store):
    """Image datasets of the cache's rows: "train" (augmented, shuffled), "validation", "test"
    (None when empty), and "step0": the first validation batch with its cached features."""
    size = store.identity["image_size"]  # SIZE belongs to the cache: images must match it
    paths = checked_image_paths(config, store)
    split = {s: store.rows(s) for s in images.SPLITS}
    if not len(split["train"]) or not len(split["validation"]):
        raise UserError(f"the cache of {config.dataset_name} has no train or no validation "
                        "images: add images or change SPLIT, then " + RETRAIN)
    # as in stage two: float targets of shape (n, 1) for the sigmoid head, class indices else
    targets = (store.labels.astype(np.float32)[:, None] if len(store.class_names) == 2
               else store.labels.astype(np.int32))

    def dataset(rows, **kwargs):
        return images.labelled_dataset(paths[rows], targets[rows], size, config.batch,
                                       **kwargs) if len(rows) else None

    first = split["validation"][:config.batch]
    return {"train": dataset(split["train"], augment=augmentation(config.seed),
                             shuffle_seed=config.seed),
            "validation": dataset(split["validation"]), "test": dataset(split["test"]),
            "step0": (dataset(first), store.read(first))}


def checked_image_paths(config, store):
    """The path of every cached row, after checking the file still has the cached content.
    A file whose size and mtime are those extract recorded is trusted; any other is re-hashed."""
    root = store.image_root(config.data)
    recorded = cache.previous_files(config.features_dir)
    out = []
    for rel, sha in tqdm(list(zip(store.paths, store.sha256)), desc="checking DATA", unit="file",
                         leave=False, disable=len(store.paths) < 2000):
        full = os.path.join(root, rel)
        if not os.path.isfile(full):
            raise UserError(f"DATA no longer matches the cache: {full} is gone; pass the "
                            f"DATA the cache was made from, or {RETRAIN}")
        stat = os.stat(full)
        size, mtime_ns, _ = recorded.get(rel, (None, None, None))
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns) and backbone.file_sha256(full) != sha:
            raise UserError(f"DATA no longer matches the cache: {full} changed since `make "
                            f"extract`; {RETRAIN}")
        out.append(full)
    return np.asarray(out, dtype=object)


def augmentation(seed):
    """The article's augmentations, applied to training batches only, in the input pipeline.

    They run on images that are already VGG16-preprocessed (BGR, ImageNet mean subtracted). The
    "reflect" fill (Keras's default, written out here) fills uncovered corners with mirrored real
    pixels, so no value appears that the preprocessing could not have produced; a "constant" fill
    would have to be 0 here, which now means the ImageNet mean colour, not black."""
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.1, fill_mode="reflect", seed=seed + 1),
        keras.layers.RandomZoom(0.2, fill_mode="reflect", seed=seed + 2),
        keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 3),
    ], name="augmentation")


# --------------------------------------------------------------------------------------------
# The model: backbone + trained head, and what trains
# --------------------------------------------------------------------------------------------

def build_model(config, weights, head, store):
    """The cache's backbone + the trained head, compiled with UNFREEZE's layers and the head
    trainable. Returns (model, names of the base's layers that train)."""
    model, base = compose(weights, head, store.identity)
    trainable = set_trainable(base, config.unfreeze)
    # Recompile after changing `trainable`: fit uses the trainable set the model was compiled with.
    # RMSprop at 1e-5 as in the article: a small, per-weight scaled step adjusts the pretrained
    # filters instead of overwriting them.
    model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=config.lr),
                  loss=heads.loss_for(len(store.class_names)), metrics=["accuracy"])
    return model, trainable


def compose(weights, head, identity):
    """image (after load_image) -> probabilities: the cache's backbone, then the trained head."""
    base = backbone.build_backbone_of(identity, weights)
    size = identity["image_size"]
    inputs = keras.Input((size, size, 3), name="image")
    # training=False keeps the base in inference mode even while it trains (the keras-io recipe
    # for bases with BatchNormalization; VGG16 has none, so it changes nothing but is safe).
    features = base(inputs, training=False)
    head.trainable = True
    outputs = head(features)  # the head's Dropout is active during fit, as in stage two
    return keras.Model(inputs, outputs, name="finetuned"), base


def set_trainable(base, unfreeze):
    """Freeze every layer below UNFREEZE: a block name ("block5") or a count of top conv layers.
    Returns the names of the base's layers that train."""
    layers = base.layers
    convs = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Conv2D)]
    blocks = sorted({layers[i].name.split("_")[0] for i in convs})
    text = str(unfreeze).strip()
    if text.isdigit() and int(text) <= len(convs):
        first = convs[len(convs) - int(text)] if int(text) else len(layers)
    elif text in blocks:
        first = next(i for i, layer in enumerate(layers) if layer.name.startswith(text + "_"))
    else:
        raise UserError(f"UNFREEZE={unfreeze!r} is neither a block name ({', '.join(blocks)}) nor "
                        f"a count of top convolutional layers (0-{len(convs)}): use e.g. UNFREEZE=block5")
    base.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= first
    return [layer.name for layer in layers if layer.trainable and layer.weights]


def check_composition(model, head, image_batches, features):
    """Before any training step the composed model must predict what the head predicts on the
    cached features of the same images; otherwise the cache and the images disagree.
    Returns (composed predictions, head predictions)."""
    composed = model.predict(image_batches, verbose=0)
    cached = head.predict(features, verbose=0)
    gap = float(np.max(np.abs(composed - cached))) if len(features) else 0.0
    if not gap <= MATCH_ATOL:
        raise UserError(f"the backbone + head predict differently (by {gap:.2g}) from the head on "
                        f"the cached features of the same images: the cache is stale; {RETRAIN}")
    return composed, cached


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------

class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose memory (best val_loss, its epoch and weights, epochs waited) survives a
    restart: without it a resumed run would forget the best epoch and restore a worse one."""

    def __init__(self, state=None, **kwargs):
        super().__init__(**kwargs)
        self.resume = (state or {}).get("early")
        self.resume_weights = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # resets everything
        if self.resume:
            self.wait, self.best, self.best_epoch = (self.resume[k] for k in ("wait", "best", "best_epoch"))
            self.best_weights = self.resume_weights

    def memory(self):
        return {"wait": self.wait, "best": self.best, "best_epoch": self.best_epoch}


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: the model with its optimizer state, EarlyStopping's best weights, and the
    state (epochs done, history), each written to a temporary name and then all renamed together.
    (ModelCheckpoint writes in place, so a kill during its save leaves a file that cannot load.)
    The state is renamed last, so a resume never claims an epoch the weights do not hold; a kill
    in the microseconds between renames leaves the weights one epoch ahead of the state."""

    def __init__(self, config, settings, early, state, started):
        super().__init__()
        self.config, self.settings, self.early, self.started = config, settings, early, started
        self.history = {k: list(v) for k, v in (state or {}).get("history", {}).items()}
        self.seconds_before = (state or {}).get("seconds", 0.0)

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        model_path = artifacts.path(self.config, artifacts.FINETUNE_CHECKPOINT)
        best_path = artifacts.path(self.config, BEST)
        self.model.save(_partial(model_path))
        renames = [(_partial(model_path), model_path)]
        if self.early.best_epoch == epoch and self.early.best_weights is not None:
            with open(best_path + ".tmp", "wb") as f:
                np.savez(f, *self.early.best_weights)
            renames.append((best_path + ".tmp", best_path))
        state = {"settings": self.settings, "epochs": epoch + 1, "history": self.history,
                 "stopped": bool(self.model.stop_training), "early": self.early.memory(),
                 "seconds": self.seconds()}
        for tmp, final in renames:
            os.replace(tmp, final)
        artifacts.write_json(artifacts.path(self.config, STATE), state)

    def seconds(self):
        return self.seconds_before + time.perf_counter() - self.started


def resume_state(config, settings):
    """The saved state to continue from, or None to start from the head (removing old files)."""
    files = [artifacts.path(config, f) for f in (artifacts.FINETUNE_CHECKPOINT, STATE, BEST,
                                                 artifacts.FINETUNE_LOG)]
    state = None
    if not config.fresh and all(os.path.exists(f) for f in files[:3]):
        state = artifacts.read_json(files[1], "")
        old = state["settings"]
        if (old["identity_id"], old["head_sha256"]) != (settings["identity_id"], settings["head_sha256"]):
            print(f"finetune {config.dataset_name}: the head or the cache changed since the last "
                  "checkpoint: starting again from the new head")
            state = None
        elif (old["unfreeze"], old["lr"]) != (settings["unfreeze"], settings["lr"]):
            raise UserError(f"{files[0]} was made with UNFREEZE={old['unfreeze']} LR={old['lr']}: "
                            "pass those to continue it, or FRESH=1 to start over")
    if state is None:
        for f in files:
            if os.path.exists(f):
                os.remove(f)
    return state


def _load_best(config):
    with np.load(artifacts.path(config, BEST)) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _trim_log(config, epochs_done):
    """Keep the CSV log's rows of the epochs the checkpoint holds, so a resumed run appends after
    them without repeating the epoch that was interrupted."""
    path = artifacts.path(config, artifacts.FINETUNE_LOG)
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < epochs_done]
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(path + ".tmp", path)


def _partial(path):
    """A temporary name Keras still accepts (it wants the .keras extension)."""
    return path[:-len(".keras")] + ".partial.keras"


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def _write_outputs(config, store, weights, model, head_record, checkpoint, early, trainable,
                   done, validation, test):
    model_path = artifacts.path(config, artifacts.FINETUNED)
    model.save(_partial(model_path))
    os.replace(_partial(model_path), model_path)
    history = checkpoint.history
    epochs = len(history.get("loss", []))
    scores = lambda s: {"accuracy": float(s["accuracy"]), "loss": float(s["loss"])} if s else {}
    metrics = {
        "identity": store.identity, "identity_id": backbone.identity_id(store.identity),
        "class_names": list(store.class_names), "config": config.to_dict(),
        "weights": weights.fingerprint, "weights_notice": weights.notice,
        "unfreeze": config.unfreeze, "trainable_layers": trainable,
        "validation": scores(validation), "test": scores(test), "epochs": epochs,
        "best_epoch": int(early.best_epoch) + 1 if epochs else 0, "seconds": checkpoint.seconds(),
        "history": history, "resumed_from_epoch": done,
        "file_sha256": artifacts.file_sha256(model_path),  # ties the file to these metrics
    }
    metrics_path = artifacts.path(config, artifacts.FINETUNE_METRICS)
    artifacts.write_json(metrics_path, metrics)
    plot_path = artifacts.path(config, artifacts.FINETUNE_HISTORY_PLOT)
    plots.plot_history([("head", head_record.get("history", {})),
                        ("fine-tune", history)], plot_path,
                       f"{config.dataset_name}: dense head, then fine-tuning from {config.unfreeze}")
    return FinetuneResult(model_path, metrics_path, plot_path, metrics["validation"],
                          metrics["test"], epochs, metrics["best_epoch"], done, trainable,
                          metrics["seconds"])
