"""Resuming fine-tuning: Keras's BackupAndRestore, plus what EarlyStopping needs across a restart.

After each epoch `Backup` (Keras's BackupAndRestore) saves the weights, the optimizer state and
the epochs done in models/<NAME>/finetune_backup/keras/, and beside them STATE (the settings the
run was made with, EarlyStopping's memory) and the best epoch's weights. A kill at any moment
leaves a backup to continue from; `resume_state` decides whether to continue it, and
`log_history` cuts finetune_log.csv back to the epochs the backup holds.
"""
import csv
import os
import shutil
import time

import keras
import numpy as np

from ..config import UserError
from ..fs import artifacts, files
from . import logs

STATE = "state.json"  # in finetune_backup/: settings, epochs done, EarlyStopping's memory
MEMORY = ("wait", "best", "best_epoch")   # what EarlyStopping needs, besides its best weights


def resume_state(config, settings, augmented_before_the_setting=False):
    """The backup's state to continue from, or None to start from the head (removing the backup
    of the earlier run). Settings a backup predates take the value they had then: RMSprop,
    `augmented_before_the_setting` for FINETUNE_AUGMENT, no class weights for CLASS_WEIGHT."""
    # a link planted at (or in) the backup would have its target read, copied over or deleted
    folder = files.no_link_folder(artifacts.path(config, artifacts.FINETUNE_BACKUP))
    state = {} if config.fresh else artifacts.json_or_empty(os.path.join(folder, STATE))
    old = state.get("settings")
    if old and any(old[key] != settings[key] for key in ("identity_id", "head_sha256")):
        print(f"finetune {config.dataset_name}: the head or the cache changed since the last "
              "backup: starting again from the new head")
        old = None
    made_with = old and {"UNFREEZE": old["unfreeze"], "LR": old["lr"],
                         "FINETUNE_OPTIMIZER": old.get("optimizer", "rmsprop"),
                         "FINETUNE_AUGMENT": int(old.get("finetune_augment",
                                                         augmented_before_the_setting)),
                         "FINETUNE_FROM": old.get("finetune_from", "images"),
                         "CLASS_WEIGHT": old.get("class_weight", "none")}
    asked = {"UNFREEZE": settings["unfreeze"], "LR": settings["lr"],
             "FINETUNE_OPTIMIZER": settings["optimizer"],
             "FINETUNE_AUGMENT": int(settings["finetune_augment"]),
             "FINETUNE_FROM": settings["finetune_from"],
             "CLASS_WEIGHT": settings["class_weight"]}
    if made_with and made_with != asked:
        # another model or optimizer: the augmentation's layers hold their random generators'
        # state, so even FINETUNE_AUGMENT changes what the backup must restore
        raise UserError(f"{folder} was made with "
                        f"{' '.join(f'{k}={v}' for k, v in made_with.items())}: pass those to "
                        "continue it, or FRESH=1 to start over")
    if old:
        print(f"finetune {config.dataset_name}: continuing after epoch {state['epochs']} of the "
              "backup (FRESH=1 starts again from the head)")
        log_history(config, state["epochs"])  # drop the row of an epoch the backup lacks
        return state
    shutil.rmtree(folder, ignore_errors=True)
    return None


def outcome(head, history, best_epoch, kept):
    """What early stopping compared and kept: the validation loss of the head (`head`, before
    any step) and of the epoch with the lowest one (`history`: a value per epoch), which way it
    went, and which weights finetuned.keras holds (`best_epoch`, 1-based, 0 for the head) with
    their validation scores (`kept`). One line, for the end of a fine-tuning."""
    losses, accuracies = history.get("val_loss", []), history.get("val_accuracy", [])
    if not losses:
        return "no epoch trained: kept the head, unchanged"
    lowest = int(np.argmin(losses))
    if best_epoch:  # early stopping's best: the lowest validation loss, below the head's
        return (f"validation loss fell from {head['loss']:.3f} (the head) to "
                f"{losses[best_epoch - 1]:.3f} (epoch {best_epoch} of {len(losses)}, the "
                f"lowest): kept epoch "
                f"{best_epoch}, validation accuracy {head['accuracy']:.3f} -> "
                f"{kept['accuracy']:.3f}")
    went = "rose" if losses[lowest] > head["loss"] else "did not fall"  # equal: the head kept
    return (f"validation loss {went}: no epoch went below the head's {head['loss']:.3f} (the "
            f"lowest, epoch {lowest + 1} of {len(losses)}: {losses[lowest]:.3f}, validation "
            f"accuracy {accuracies[lowest]:.3f} against the head's {head['accuracy']:.3f}): "
            "kept the head, unchanged")


def make_callbacks(config, settings, state, started, extra=()):
    """EarlyStopping, the CSV log and the backup, in the order they must run at an epoch's end:
    EarlyStopping updates its memory and CSVLogger writes the epoch's row before the backup saves.
    `extra` (the tests' kill switches) come last, after the backup."""
    early = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.finetune_patience,
                                          restore_best_weights=True)
    backup = Backup(files.no_link_folder(artifacts.path(config, artifacts.FINETUNE_BACKUP)),
                    settings, state, early, started)
    # Keras opens the log by name: a link planted there is removed first, never written through
    log = keras.callbacks.CSVLogger(files.no_link(artifacts.path(config, artifacts.FINETUNE_LOG)),
                                    append=bool(state))  # a fresh start starts the log over
    board = logs.tensorboard(config, "finetune", fresh=not state)  # None without a writer
    return early, backup, [early, log, *([board] if board else []), backup, *extra]


class Backup(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore (weights, optimizer state, epochs done) in finetune_backup/keras/,
    and beside it what Keras does not keep: STATE and EarlyStopping's best weights.

    double_checkpoint: Keras copies its last backup to *.bkp before writing the next. A copy that
    holds the epochs STATE says means a kill came during that write or before STATE followed it:
    the copy is put back. (Keras itself falls back to it only if the weights file cannot be
    opened: not if the epoch file is cut short, nor if the weights are already the next epoch's.)
    delete_checkpoint=False: a finished run keeps its backup, so a rerun trains nothing more."""

    def __init__(self, folder, settings, state, early, started):
        super().__init__(os.path.join(folder, "keras"), double_checkpoint=True,
                         delete_checkpoint=False)
        self.folder, self.settings, self.state, self.early = folder, settings, state, early
        self.started, self.seconds_before = started, state["seconds"] if state else 0.0
        self.start = None  # a fresh start: the validation loss of the head, before any step

    def on_train_begin(self, logs=None):
        # The _*_path attributes name Keras's files (BackupAndRestore has no public names).
        previous = artifacts.json_or_empty(self._prev_training_metadata_path)
        if self.state and previous.get("epoch") == self.state["epochs"]:
            shutil.copyfile(self._prev_weights_path, self._weights_path)
            shutil.copyfile(self._prev_training_metadata_path, self._training_metadata_path)
        super().on_train_begin(logs)  # loads the weights and optimizer state, sets the first epoch
        if self.start is not None:
            # EarlyStopping starts from the head (Keras's epoch -1): an epoch must beat the head's
            # validation loss to be kept, and if none does, the head's weights are restored.
            # Fine-tuning may only make the model better on validation, never hand back a worse
            # one (on the demo: test accuracy 0.907 for the head, 0.860 after fine-tuning).
            self.early.best, self.early.best_epoch = self.start, -1
            self.early.best_weights = self.model.get_weights()
            os.makedirs(self.folder, exist_ok=True)
            files.atomic_write(self._best_path(-1),
                               lambda f: np.savez(f, *self.early.best_weights))
        if self.state:  # EarlyStopping, before us in the list, has just reset its memory
            for key in MEMORY:
                setattr(self.early, key, self.state["early"][key])
            with np.load(self._best_path(self.early.best_epoch)) as f:
                self.early.best_weights = [f[f"arr_{i}"] for i in range(len(f.files))]

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)  # Keras's backup first: STATE never runs ahead of it
        best = self._best_path(self.early.best_epoch)
        if self.early.best_epoch == epoch:  # under a new name: STATE still names the last best
            files.atomic_write(best, lambda f: np.savez(f, *self.early.best_weights))
        artifacts.write_json(os.path.join(self.folder, STATE), {
            "settings": self.settings, "epochs": epoch + 1, "seconds": self.seconds(),
            "stopped": bool(self.model.stop_training),  # early stopping ended the run
            "early": {key: getattr(self.early, key) for key in MEMORY}})
        for entry in os.scandir(self.folder):  # never glob: NAME may hold [ ] (set[1])
            if entry.name.startswith("best-epoch-") and entry.path != best:
                os.remove(entry.path)

    def _best_path(self, epoch):
        return os.path.join(self.folder, f"best-epoch-{epoch}.npz")  # Keras's 0-based epoch

    def seconds(self):
        return self.seconds_before + time.perf_counter() - self.started


def log_history(config, epochs):
    """finetune_log.csv cut to its first `epochs` epochs, as {metric: [a value an epoch]}. A kill
    after CSVLogger wrote an epoch's row but before the backup held that epoch leaves a row that
    the resumed run writes again."""
    path = artifacts.path(config, artifacts.FINETUNE_LOG)
    if not os.path.exists(path):
        return {}
    with files.open_regular(path, newline="",
                            fix="remove it, then run `make finetune` again") as f:
        header, *rows = csv.reader(f)
    rows = [row for row in rows if len(row) == len(header) and int(row[0]) < epochs]  # whole rows
    with files.replacing(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return {key: [float(row[i]) for row in rows] for i, key in enumerate(header) if key != "epoch"}
