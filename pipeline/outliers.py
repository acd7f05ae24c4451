"""The outlier measure: how unlike the training data an image's feature map is.

An image's `appearance` is its globally average-pooled feature map, square-rooted and
L2-normalised. Its distance is 1 - the cosine similarity to its K_NEAREST-th nearest training
image (kNN on normalised features, Sun et al. 2022), among at most REFERENCE_ROWS training rows
(a seeded sample beyond that: memory and time stay bounded). The threshold is the
OUTLIER_PERCENTILE-th percentile of the validation rows' distances. `make audit` computes it from
the cache and saves it (outlier_model.npz, plain arrays); `make predict` reuses it while the cache
is unchanged, and flags new images past the threshold (docs/audit.md has the measurements that
chose this measure over the distance to class centroids).

Shared by the audit and predict; it imports no stage.
"""
import json
import os
from dataclasses import dataclass

import numpy as np

from . import cache, files
from .config import UserError

FOLDER = "audit"             # models/<NAME>/audit/, written by `make audit`
FILE = "outlier_model.npz"   # in FOLDER: the measure predict reuses while the cache is the same
K_NEAREST = 5                # the k-th nearest training image gives the distance
REFERENCE_ROWS = 10_000      # training rows kept as neighbours, at most (10k x 512 float32: 20 MB)
SAMPLE_SEED = 0              # which training rows, when there are more
BLOCK = 4096                 # rows compared with the reference at a time
MEASURE = (f"1 - cosine similarity of the square-rooted, globally average-pooled features to the "
           f"{K_NEAREST}th nearest training image")


def appearance(pooled):
    """Globally average-pooled features (n, channels) -> unit vectors of their square roots:
    what is in the picture, wherever it is; the root keeps a few strong channels from
    outweighing all the others (a Hellinger-style distance)."""
    root = np.sqrt(np.maximum(np.asarray(pooled, np.float32), 0))
    return root / np.maximum(np.linalg.norm(root, axis=1, keepdims=True), 1e-12)


def knn_distance(vectors, reference, reference_labels, k=K_NEAREST, own=None):
    """(1 - cosine similarity to the k-th nearest reference vector, the class of the nearest)
    per row. `own`: per row, its own index in `reference` (-1 for none), never its neighbour."""
    k = min(k, len(reference) - (own is not None and (np.asarray(own) >= 0).any()))
    k = max(k, 1)
    distance = np.empty(len(vectors), np.float32)
    nearest = np.empty(len(vectors), np.int64)
    for start in range(0, len(vectors), BLOCK):
        similarity = vectors[start:start + BLOCK] @ reference.T
        if own is not None:
            mine = np.asarray(own[start:start + BLOCK])
            rows = np.flatnonzero(mine >= 0)
            similarity[rows, mine[rows]] = -np.inf
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        top_similarity = np.take_along_axis(similarity, top, axis=1)
        distance[start:start + len(top)] = 1.0 - top_similarity.min(axis=1)
        nearest[start:start + len(top)] = reference_labels[
            top[np.arange(len(top)), top_similarity.argmax(axis=1)]]
    return distance, nearest


@dataclass
class OutlierModel:
    """What predict needs to say "unlike the training data" of new feature maps."""
    reference: np.ndarray        # (m, channels) training rows' appearance vectors
    reference_labels: np.ndarray  # (m,) their classes
    threshold: float             # the validation rows' OUTLIER_PERCENTILE-th percentile
    calibrated_on: str           # "validation", or "train" when the cache has no validation rows
    reference_rows: np.ndarray = None  # (m,) their rows in the cache, when known

    def distance(self, features):
        """(distance, class of the nearest training image) of feature maps (n, h, w, c)."""
        return self.distance_of_pooled(np.asarray(features, np.float32).mean(axis=(1, 2)))

    def distance_of_pooled(self, pooled, rows=None):
        """The same of globally average-pooled maps; `rows` (their rows in the cache) keeps a
        training row from being its own neighbour."""
        own = None
        if rows is not None and self.reference_rows is not None:
            position = {int(r): k for k, r in enumerate(self.reference_rows)}
            own = np.array([position.get(int(r), -1) for r in rows], np.int64)
        return knn_distance(appearance(pooled), self.reference, self.reference_labels, own=own)


def pooled_rows(store, rows):
    """The globally average-pooled features of `rows` (rows x channels), a block at a time."""
    out = np.empty((len(rows), store.shape()[-1]), np.float32)
    for start in range(0, len(rows), cache.READ_BLOCK):
        chunk = rows[start:start + cache.READ_BLOCK]
        out[start:start + len(chunk)] = store.read(chunk).mean(axis=(1, 2))
    return out


def fit(train_pooled, train_labels, calibration_pooled, percentile, calibrated_on,
        train_rows=None):
    """The measure from training rows (pooled maps, labels) and calibration rows (pooled maps
    of rows that are not among the training ones)."""
    keep = np.arange(len(train_pooled))
    if len(keep) > REFERENCE_ROWS:
        keep = np.sort(np.random.default_rng(SAMPLE_SEED).choice(len(keep), REFERENCE_ROWS,
                                                                 replace=False))
    reference = appearance(train_pooled[keep])
    labels = np.asarray(train_labels)[keep].astype(np.int64)
    model = OutlierModel(reference, labels, 0.0, calibrated_on,
                         None if train_rows is None else np.asarray(train_rows)[keep])
    own = None
    if calibrated_on == "train":  # the calibration rows are the training rows themselves
        own = np.full(len(calibration_pooled), -1, np.int64)
        own[keep] = np.arange(len(keep))
    distance, _ = knn_distance(appearance(calibration_pooled), reference, labels, own=own)
    model.threshold = float(np.percentile(distance, percentile))
    return model


def outlier_model(store, percentile, pooled=None):
    """The outlier measure of a cache: neighbours from the training rows, the threshold from the
    validation rows. `pooled` (all rows, pooled) saves reading the cache again."""
    train, validation = store.rows("train"), store.rows("validation")
    if not len(train):
        raise UserError(f"{store.path} has no training images: rerun `make extract` with a "
                        "train split")
    calibrated_on = "validation" if len(validation) else "train"
    calibration = validation if len(validation) else train
    if pooled is None:
        train_p, calibration_p = pooled_rows(store, train), pooled_rows(store, calibration)
    else:
        train_p, calibration_p = pooled[train], pooled[calibration]
    return fit(train_p, store.labels[train], calibration_p, percentile, calibrated_on, train)


def save_outlier_model(path, model, index_digest, feature_shape, percentile):
    """The measure's arrays and what they were made from (the cache's index digest and feature
    shape, OUTLIER_PERCENTILE), as .npz read back without pickle."""
    metadata = {"index_digest": index_digest, "percentile": percentile,
                "shape": list(feature_shape), "calibrated_on": model.calibrated_on,
                "k": K_NEAREST}
    rows = model.reference_rows if model.reference_rows is not None else np.zeros(0, np.int64)
    with files.replacing(path, "wb") as f:
        np.savez(f, reference=model.reference, reference_labels=model.reference_labels,
                 reference_rows=rows, threshold=np.float64(model.threshold),
                 metadata=np.array(json.dumps(metadata, sort_keys=True)))


def load_outlier_model(models_dir, store, percentile):
    """The audit's saved measure when it was made on this very cache (its index digest) with
    this OUTLIER_PERCENTILE and K_NEAREST, else one computed from the cache now (one read of the
    training and validation rows: about 40 s at 100k images)."""
    path = os.path.join(models_dir, FOLDER, FILE)
    try:
        with files.open_regular(path, "rb") as f, np.load(f, allow_pickle=False) as arrays:
            metadata = json.loads(str(arrays["metadata"]))
            reference, labels = arrays["reference"], arrays["reference_labels"]
            rows, threshold = arrays["reference_rows"], float(arrays["threshold"])
        digest = store.attrs.get("index_digest")
        if (digest and metadata.get("index_digest") == digest
                and metadata.get("percentile") == percentile
                and metadata.get("k") == K_NEAREST
                and metadata.get("shape") == list(store.shape())
                and reference.ndim == 2 and 0 < len(reference) <= REFERENCE_ROWS
                and reference.shape[1] == store.shape()[-1]
                and labels.shape == (len(reference),) and rows.shape in ((0,), labels.shape)
                and np.isfinite(reference).all()
                and np.isin(labels, np.arange(len(store.class_names))).all()
                and np.isin(rows, np.arange(len(store))).all()
                and np.isfinite(threshold)):
            return OutlierModel(reference.astype(np.float32), labels.astype(np.int64),
                                threshold, str(metadata.get("calibrated_on", "validation")),
                                rows.astype(np.int64) if len(rows) else None)
    except (OSError, UserError, ValueError, KeyError, TypeError):
        pass  # none, another cache's, or not ours: computed below
    return outlier_model(store, percentile)
