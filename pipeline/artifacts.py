"""The files in models/<NAME>/ that stages hand to each other, and the identity check between them.

Each saved model travels with a JSON file that records the config and the feature identity it was
made with; a later stage refuses a model whose identity differs from the cache it is used with.
"""
import hashlib
import json
import os

from .config import UserError

HEAD = "head.keras"                       # dense head: feature map -> probabilities
HEAD_CHECKPOINT = "head_checkpoint.keras"
HEAD_LOG = "head_log.csv"
LOGREG = "logreg.npz"                     # arrays of the sklearn pipeline + metadata (heads.save_logreg)
LEGACY_LOGREG = "logreg.joblib"           # a pickle written by earlier versions: never loaded
HEAD_METRICS = "head_metrics.json"
HEAD_HISTORY_PLOT = "head_history.png"
FINETUNED = "finetuned.keras"             # image (after load_image) -> probabilities
FINETUNE_BACKUP = "finetune_backup"       # for resuming: Keras's BackupAndRestore + EarlyStopping's memory
FINETUNE_LOG = "finetune_log.csv"
FINETUNE_METRICS = "finetune_metrics.json"
FINETUNE_HISTORY_PLOT = "finetune_history.png"
EVALUATION = "evaluation.json"
PREDICTIONS = "predictions.csv"
REPORT = "report.md"

# The models a dataset can have, by the names evaluate and predict use: the file, and where its
# record (identity, class names, validation scores, the file's sha256) is kept.
MODEL_FILES = {"logreg": LOGREG, "head": HEAD, "finetuned": FINETUNED}
MAKE = {"logreg": "make train-head", "head": "make train-head", "finetuned": "make finetune"}


def path(config, filename):
    return os.path.join(config.models_dir, filename)


def write_json(file_path, data):
    """Atomically: a reader never sees half a file."""
    os.makedirs(os.path.dirname(file_path) or ".", exist_ok=True)
    with open(file_path + ".tmp", "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=float)
        f.write("\n")
    os.replace(file_path + ".tmp", file_path)


def read_json(file_path, missing_hint):
    if not os.path.exists(file_path):
        raise UserError(f"{file_path} does not exist: {missing_hint}")
    with open(file_path) as f:
        return json.load(f)


def model_record(config, model):
    """The record written with a model file by the run that made it, after checking that the
    file is still that run's (its sha256 is in the record). An interrupted run leaves new files
    beside old ones; a file with no record, or another file's record, is refused, so no stage
    ever scores one run's head with another run's metrics."""
    file_path = path(config, MODEL_FILES[model])
    if not os.path.exists(file_path):
        raise UserError(f"there is no {file_path}: run `{MAKE[model]}`")
    if model == "finetuned":
        record = json_or_empty(path(config, FINETUNE_METRICS))
    else:
        entry = "dense" if model == "head" else model
        metrics = json_or_empty(path(config, HEAD_METRICS))
        record = {**metrics, **metrics.get("models", {}).get(entry, {"file_sha256": None})}
    if record.get("file_sha256") != file_sha256(file_path):
        raise UserError(f"{file_path} is not the file its metrics describe (an interrupted or "
                        f"older run left it): rerun `{MAKE[model]}`")
    return record


def load_model(config, model):
    """The model `model` ('logreg', 'head' or 'finetuned') after `model_record`'s check, loaded
    so that no code in the file can run: logreg from plain arrays, Keras files in safe mode."""
    file_path = path(config, MODEL_FILES[model])
    try:
        if model == "logreg":
            from .heads import load_logreg
            return load_logreg(file_path)[0]  # allow_pickle=False: object arrays raise
        import keras
        return keras.saving.load_model(file_path, compile=False, safe_mode=True)
    except Exception as error:  # safe mode refuses lambdas: ValueError; a broken zip: others
        raise UserError(f"{file_path} cannot be loaded safely ({type(error).__name__}: "
                        f"{' '.join(str(error).split())[:160]}): rerun `{MAKE[model]}`") from None


def legacy_notice(config):
    """One line about a logreg.joblib of an earlier version, which is never loaded."""
    legacy = path(config, LEGACY_LOGREG)
    if os.path.exists(legacy) and not os.path.exists(path(config, LOGREG)):
        return (f"{legacy} is a pickle from an earlier version and is not loaded (loading a "
                "pickle can run code): rerun `make train-head` to replace it")
    return ""


def file_sha256(file_path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(file_path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_or_empty(file_path):
    try:
        with open(file_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def require_same_identity(made_with, cache_identity, what):
    """Refuse `what` (a model file) when it was made on features of another identity."""
    if made_with != cache_identity:
        changed = sorted(k for k in set(made_with) | set(cache_identity)
                         if made_with.get(k) != cache_identity.get(k))
        raise UserError(f"{what} was trained on features of another identity (different "
                        f"{', '.join(changed)}) than the current cache: retrain it with "
                        "`make train-head` (and `make finetune`)")
