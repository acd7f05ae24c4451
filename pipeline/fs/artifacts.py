"""The files in models/<NAME>/ that stages hand to each other, and the identity check between them.

Each saved model travels with a JSON file that records the config and the feature identity it was
made with; a later stage refuses a model whose identity differs from the cache it is used with.
"""
import hashlib
import json
import os

from ..config import UserError
from . import files

HEAD = "head.keras"                       # dense head: feature map -> probabilities
HEAD_CHECKPOINT = "head_checkpoint.keras"
HEAD_LOG = "head_log.csv"
LOGREG = "logreg.npz"                     # arrays of the sklearn pipeline + metadata
                                          # (heads.save_logreg)
LEGACY_LOGREG = "logreg.joblib"           # a pickle written by earlier versions: never loaded
HEAD_METRICS = "head_metrics.json"
HEAD_HISTORY_PLOT = "head_history.png"
FINETUNED = "finetuned.keras"             # image (after load_image) -> probabilities
FINETUNE_BACKUP = "finetune_backup"       # for resuming: Keras's BackupAndRestore + EarlyStopping's
                                          # memory
FINETUNE_LOG = "finetune_log.csv"
FINETUNE_METRICS = "finetune_metrics.json"
FINETUNE_HISTORY_PLOT = "finetune_history.png"
EVALUATION = "evaluation.json"
PREDICTIONS = "predictions.csv"
REPORT = "report.md"
LOGS = "logs"                             # TensorBoard: logs/head, logs/finetune (logs.py)


def path(config, filename):
    return os.path.join(config.models_dir, filename)


def write_json(file_path, data):
    """Atomically: a reader never sees half a file."""
    os.makedirs(os.path.dirname(file_path) or ".", exist_ok=True)
    with files.replacing(file_path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=float)
        f.write("\n")


def read_json(file_path, missing_hint):
    """The JSON in `file_path`; a missing file, one that is not a regular file (a FIFO would
    hang the reader) or not JSON is refused in one line ending in `missing_hint`."""
    if not os.path.exists(file_path):
        raise UserError(f"{file_path} does not exist: {missing_hint}")
    with files.open_regular(file_path, fix=f"remove it; {missing_hint}") as f:
        try:
            return json.load(f)
        except ValueError:
            raise UserError(f"{file_path} is not JSON (half written, or not ours): "
                            f"{missing_hint}") from None


def file_sha256(file_path, chunk=1 << 22):
    """Of a regular file only: anything else is refused in one line (files.open_regular)."""
    digest = hashlib.sha256()
    with files.open_regular(file_path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_or_empty(file_path):
    """A JSON file's content, or {} when it is missing, not a regular file or not JSON (a
    half-written file)."""
    try:
        with files.open_regular(file_path) as f:
            return json.load(f)
    except (OSError, ValueError, UserError):
        return {}


def require_same_identity(made_with, cache_identity, what):
    """Refuse `what` (a model file) when it was made on features of another identity."""
    if made_with != cache_identity:
        changed = sorted(k for k in set(made_with) | set(cache_identity)
                         if made_with.get(k) != cache_identity.get(k))
        raise UserError(f"{what} was trained on features of another identity (different "
                        f"{', '.join(changed)}) than the current cache: retrain it with "
                        "`make train-head` (and `make finetune`)")
