"""Stage three: fine-tune the top of the backbone together with the stage-two dense head.

    python -m pipeline finetune [--name NAME] [--unfreeze STAGE|N] [--finetune-epochs 10]
                                [--lr 1e-4] [--finetune-from cache|images] [--fresh 1]

Fine-tuning starts from the trained head, never a random one: a random head sends large errors back
through the base and destroys what the base learned. Every epoch is backed up, so a killed run
continues where it stopped; FRESH=1 starts again from the head.

The layers below UNFREEZE are frozen, so they give the same output for the same input every
epoch. With FINETUNE_FROM=cache (the default), extract has cached that output, the *cut* (the
output of the stage below UNFREEZE's, data/backbones.py), for every image and AUGMENT view:
fine-tuning trains the layers above the cut and the head on those activations, reading each
training image as another cached view every epoch, as train-head does. It decodes no image and
runs no frozen layer, so it needs only features/<NAME>/. FINETUNE_FROM=images (or a cache without
the cut) decodes and augments the images every epoch and runs the whole base. Either way
finetuned.keras is the whole model, image -> probabilities.

    -> models/<NAME>/finetuned.keras (image -> probabilities), finetune_metrics.json,
       finetune_history.png, finetune_log.csv (a row an epoch: the history, also across resumes);
       for resuming: finetune_backup/
"""
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from . import cache
from .cache import batches, settings, views
from .config import Config, UserError, warn
from .data import augment, backbones, datasets, images
from .fs import artifacts, files
from .model import backbone, calibration, finetuning, heads, registry, resume, runtime
from .reporting import plots

RETRAIN = finetuning.RETRAIN


@dataclass
class FinetuneResult:
    """What a fine-tuning run made: its three files and the record finetune_metrics.json holds."""
    identity: dict
    split_digest: str         # registry.record checks it
    class_names: list
    config: dict
    weights: str              # the backbone weights' fingerprint
    weights_notice: str
    unfreeze: str
    trainable_layers: list
    source: str               # "cache" (the cut's activations) or "images"; JSON: finetune_from
    validation: dict          # {"accuracy", "loss"} of the restored best weights
    test: dict                # the same on the test split ({} when there is none)
    epochs: int               # epochs trained in total, over every resumed run
    best_epoch: int           # 1-based; 0: no epoch beat the head
    seconds: float
    history: dict
    resumed_from_epoch: int   # epochs already done when this run started (0 = fresh)
    calibration: dict         # calibration.fit on the validation split: the temperature
    head_validation: dict     # {"accuracy", "loss"} of the head on the base, before any step
    class_weight: dict        # heads.class_weights' record: the setting and each class's weight
    file_sha256: str = ""     # ties the model file to this record
    model_path: str = ""
    metrics_path: str = ""
    plot_path: str = ""


def run(config: Config, *, callbacks=()) -> FinetuneResult:
    """Fine-tune from the cache (or the images: `training_source`), resuming an interrupted run.
    `callbacks` join Keras's fit after the backup (the tests' kill switches)."""
    start = time.perf_counter()
    # Two fine-tunes of one dataset would overwrite each other's backups: one at a time. (Other
    # stages write models/<NAME> too, so strays are left alone; each file is replaced atomically.)
    return settings.run(config, "finetune",
                        lambda resolved: _finetune(resolved, start, callbacks), config.models_dir)


def _finetune(config, start, extra_callbacks):
    runtime.set_seed(config.seed)
    with cache.FeatureStore(config.features_dir) as store:           # "no cache" refused here
        head_record = registry.record(config, "dense")  # train-head's last head, or refused
        weights = backbone.weights_of_cache(config.weights, store.attrs)
        artifacts.require_same_identity(head_record.identity, store.identity,
                                        registry.path(config, "dense"))
        head = registry.load(config, "dense")
        source = training_source(config, store)
        if source == "cache":  # the layers above the cut, on its cached activations
            data = cached_datasets(config, store)
            model, whole, trainable = finetuning.build_model_on_cut(config, weights, head, store)
            on_error = batches.one_line_on_damage(store)
        else:  # the whole model on decoded (augmented) images
            data = make_datasets(config, store)
            model, trainable = finetuning.build_model(config, weights, head, store,
                                           augmented=config.finetune_augment)
            whole, on_error = augment.without_augmentation(model), images.one_line_on_change(
                data["train"], data["validation"], data["test"], data["step0"][0])
        class_weight, weighting = heads.class_weights(
            config.class_weight, store.labels[store.rows("train")], list(store.class_names))
        unfreeze = store.feature_identity.entry.unfreeze_stage(config.unfreeze)
        resumable = {"identity_id": backbone.identity_id(store.identity), "lr": config.lr,
                     "optimizer": config.finetune_optimizer, "unfreeze": unfreeze,
                     "finetune_augment": config.finetune_augment, "finetune_from": source,
                     "head_sha256": head_record.file_sha256,
                     # what was weighed, not the word: auto on balanced classes weighs nothing
                     "class_weight": config.class_weight if class_weight else "none"}
        # backups from before FINETUNE_AUGMENT augmented exactly when the head had seen views
        state = resume.resume_state(config, resumable, head_record.get("views", 0) > 0)
        done = state["epochs"] if state else 0
        early, backup, callbacks = resume.make_callbacks(config, resumable, state, start,
                                                         extra_callbacks)
        if source == "cache":  # each epoch's views, as in a run never interrupted
            data["train"].start_at(done)
            callbacks.insert(0, batches.FollowEpochs(data["train"]))
        # A run that early stopping ended stays ended; otherwise train up to EPOCHS (maybe 0 more)
        target = done if state and state["stopped"] else max(done, config.finetune_epochs)
        with on_error:
            if state is None:  # a resumed model is no longer the head's: nothing to compare
                finetuning.check_composition(model, head, *data["step0"])
            # before fit restores a backup, the model is the head on the base: the "epoch 0"
            # that an epoch must beat (Backup.on_train_begin), and the last line compares with
            head_scores = model.evaluate(data["validation"], verbose=0, return_dict=True)
            backup.start = None if state else head_scores["loss"]
            model.fit(data["train"], validation_data=data["validation"], initial_epoch=done,
                      epochs=target, callbacks=callbacks, class_weight=class_weight,
                      shuffle=False,  # the dataset shuffles itself, seeded
                      verbose=1 if sys.stdout.isatty() else 2)  # logs: a line an epoch
            # EarlyStopping.on_train_end has put the best epoch's weights back (also after a
            # resume); `whole` shares them
            scores = {name: {key: float(value) for key, value in model.evaluate(
                data[name], return_dict=True, verbose=0).items() if key in ("accuracy", "loss")}
                if data[name] else {} for name in ("validation", "test")}
            fitted = calibration.fit_model(model, data["validation"],
                                           store.labels[store.rows("validation")])
        history = resume.log_history(config, target)
        epochs = len(history.get("loss", []))
        head_scores = {key: float(head_scores[key]) for key in ("accuracy", "loss")}
        made = FinetuneResult(
            identity=store.identity, split_digest=store.split_digest(), config=config.to_dict(),
            class_names=list(store.class_names), weights=weights.fingerprint,
            weights_notice=weights.notice, unfreeze=unfreeze, trainable_layers=trainable,
            source=source, validation=scores["validation"], test=scores["test"], epochs=epochs,
            best_epoch=int(early.best_epoch) + 1 if epochs else 0, seconds=backup.seconds(),
            history=history, resumed_from_epoch=done, calibration=fitted,
            head_validation=head_scores, class_weight=weighting)
    result = _write_outputs(config, made, whole, head_record.get("history", {}))
    _print_summary(config, result, head_scores)
    return result


def _print_summary(config, result, head_scores):
    """The class weights and notices, then the last line: what early stopping compared and kept."""
    if result.class_weight["weights"]:
        print(f"finetune {config.dataset_name}: {heads.describe_weighting(result.class_weight)}")
    if result.weights_notice:
        warn(result.weights_notice)
    if result.calibration["note"]:
        warn(f"finetuned: {result.calibration['note']}")
    kept = resume.outcome(head_scores, result.history, result.best_epoch, result.validation)
    epochs = f"{result.epochs} epoch{'s' if result.epochs != 1 else ''}"
    print(f"finetune {config.dataset_name}: {kept}; {epochs} from the {result.source}, "
          f"T={result.calibration['temperature']:.2f}, {result.seconds:.1f} s -> "
          f"{result.model_path}")


def training_source(config, store):
    """"cache" when the cache holds what FINETUNE_FROM=cache trains on: the activations at
    UNFREEZE's cut and, with FINETUNE_AUGMENT, their augmented views. Otherwise "images", after
    one line that says how to cache them."""
    if config.finetune_from == "images":
        return "images"
    identity, cut = store.feature_identity, store.cut
    layer, entry = backbone.unfreeze_cut(identity, config.unfreeze), identity.entry
    unfreeze = entry.unfreeze_stage(config.unfreeze)
    named = f"BACKBONE={entry.name} " if entry.name != backbones.DEFAULT else ""  # this cache's
    why = None
    if layer == identity.output_layer:
        why = f"UNFREEZE={unfreeze} trains no layer of the base"
    elif layer is None:
        why = f"UNFREEZE={unfreeze} trains every layer: its input is the image"
    elif not cut or cut["layer"] != layer:
        why = (f"the cache holds no {layer} activations: `make extract {named}UNFREEZE="
               f"{unfreeze}` caches them")
    elif config.finetune_augment and not store.cut_views():
        why = (f"the cache holds no augmented views of {layer}: `make extract AUGMENT=5` caches "
               "them (FINETUNE_AUGMENT=0: the plain activations)")
    if why:
        print(f"finetune {config.dataset_name}: from the images, as {why} "
              "(FINETUNE_FROM=images chooses the images without this line)")
        return "images"
    try:
        made = backbone.FeatureIdentity.read(cut["identity"])
    except UserError:
        made = None
    features = store.feature_identity
    if made is None or made != features.cut(layer, made.storage):
        raise UserError(f"{store.path}'s {layer} activations were made by another backbone than "
                        f"its features: {RETRAIN}")
    return "cache"


# --- Inputs: the images the cache was built from, still the same ------------------------------

def splits_and_targets(config, store):
    """({split: its rows}, every row's target): float targets of shape (n, 1) for the sigmoid
    head, class indices for the softmax one, as in stage two."""
    split = {s: store.rows(s) for s in datasets.SPLITS}
    if not len(split["train"]) or not len(split["validation"]):
        raise UserError(f"the cache of {config.dataset_name} has no train or no validation "
                        "images: add images or change SPLIT, then " + RETRAIN)
    targets = (store.labels.astype(np.float32)[:, None] if len(store.class_names) == 2
               else store.labels.astype(np.int32))
    return split, targets


def make_datasets(config, store):
    """Image datasets of the cache's rows: "train" (shuffled), "validation", "test"
    (None when empty), and "step0": the first validation batch with its cached features."""
    # SIZE and the preprocessing belong to the cache: images must match them
    size, preprocess = store.feature_identity.image_size, store.feature_identity.entry.preprocess
    paths = checked_image_paths(config, store)
    split, targets = splits_and_targets(config, store)

    def dataset(rows, **kwargs):
        return images.labelled_dataset(paths[rows], targets[rows], size, config.batch_size,
                                       preprocess=preprocess, **kwargs) if len(rows) else None

    first = split["validation"][:config.batch_size]
    return {"train": dataset(split["train"], shuffle_seed=config.seed),
            "validation": dataset(split["validation"]), "test": dataset(split["test"]),
            "step0": (dataset(first), store.read(first))}


def cached_datasets(config, store):
    """The cut's cached activations as Keras datasets: "train" (shuffled; with FINETUNE_AUGMENT
    each image is read as another cached view every epoch, views.epoch_reader), "validation",
    "test" (plain; None when empty), and "step0": the first validation batch's activations with
    its cached features. No image is decoded and no layer below the cut runs."""
    split, targets = splits_and_targets(config, store)
    per_image = store.cut_views() if config.finetune_augment else 0
    read = views.epoch_reader(store, config.seed, "cut_", per_image)

    def dataset(rows, **kwargs):
        return batches.CachedFeatures(store, rows, targets, config.batch_size,
                                     dataset="cut_features", **kwargs) if len(rows) else None

    first = split["validation"][:config.batch_size]
    return {"train": dataset(split["train"], seed=config.seed, read=read),
            "validation": dataset(split["validation"]), "test": dataset(split["test"]),
            "step0": (store.read(first, "cut_features"), store.read(first))}


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
        if ((stat.st_size, stat.st_mtime_ns) != (size, mtime_ns)
                and artifacts.file_sha256(full) != sha):
            raise UserError(f"DATA no longer matches the cache: {full} changed since `make "
                            f"extract`; {RETRAIN}")
        out.append(full)
    return np.asarray(out, dtype=object)


# --- Outputs ----------------------------------------------------------------------------------

def _write_outputs(config, made, model, head_history):
    """Save `model` (image after load_image -> probabilities), the plot and `made`, with its
    paths and the model's sha256, as one commit (finetune_metrics.json last): returns `made`."""
    made.model_path, made.plot_path, made.metrics_path = paths = [
        artifacts.path(config, name) for name in (
            artifacts.FINETUNED, artifacts.FINETUNE_HISTORY_PLOT, artifacts.FINETUNE_METRICS)]
    with files.replacing_together(paths) as temporary:
        model.save(temporary[made.model_path])
        made.file_sha256 = artifacts.file_sha256(temporary[made.model_path])
        plots.plot_history([("head", head_history), ("fine-tune", made.history)],
                           temporary[made.plot_path], f"{config.dataset_name}: dense head, "
                           f"then fine-tuning from {made.unfreeze}")
        record = {key: value for key, value in dataclasses.asdict(made).items()
                  if key not in ("model_path", "plot_path", "metrics_path", "source")}
        artifacts.write_json(temporary[made.metrics_path], {  # versions: the backend among them
            **record, "finetune_from": made.source, "versions": backbone.library_versions(),
            "identity_id": backbone.identity_id(made.identity)})
    return made
