"""The outlier measure: how unlike the training data an image's feature map is.

An image's distance is 1 - the cosine similarity of its `appearance` (its globally average-pooled
feature map, square-rooted and L2-normalised) to the nearest training class centroid. The
threshold is the OUTLIER_PERCENTILE-th percentile of the validation rows' distances. `make audit`
computes it from the cache and saves it (outlier_model.npz, plain arrays); `make predict` reuses
it while the cache is unchanged, and flags new images past the threshold (docs/audit.md has the
measurements that chose this measure over the audit's near-duplicate embedding).

Shared by the audit and predict; it imports no stage.
"""
import json
import os
from dataclasses import dataclass

import numpy as np

from .. import cache
from ..config import UserError
from ..fs import files

FOLDER = "audit"             # models/<NAME>/audit/, written by `make audit`
FILE = "outlier_model.npz"   # in FOLDER: the measure predict reuses while the cache is the same


def class_centroids(vectors, y, classes):
    """(classes present, their unit mean vectors) of the training rows."""
    present = [k for k in range(classes) if (y == k).any()]
    centroids = np.stack([vectors[y == k].mean(axis=0) for k in present])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return np.array(present), centroids


def outlier_distance(vectors, present, centroids):
    """(1 - cosine similarity to the nearest centroid, that centroid's class) per row."""
    similarity = vectors @ centroids.T
    nearest = similarity.argmax(axis=1)
    return 1.0 - similarity[np.arange(len(vectors)), nearest], present[nearest]


def appearance(pooled):
    """Globally average-pooled features (n, channels) -> unit vectors of their square roots:
    what is in the picture, wherever it is; the root keeps a few strong channels from
    outweighing all the others (a Hellinger-style distance)."""
    root = np.sqrt(np.maximum(np.asarray(pooled, np.float32), 0))
    return root / np.maximum(np.linalg.norm(root, axis=1, keepdims=True), 1e-12)


@dataclass
class OutlierModel:
    """What predict needs to say "unlike the training data" of new feature maps."""
    present: np.ndarray      # classes with training rows
    centroids: np.ndarray    # their unit centroids in `appearance` space
    threshold: float         # the validation rows' OUTLIER_PERCENTILE-th percentile
    calibrated_on: str       # "validation", or "train" when the cache has no validation rows

    def distance(self, features):
        """(distance, nearest class) of feature maps (n, h, w, c)."""
        pooled = np.asarray(features, np.float32).mean(axis=(1, 2))
        return outlier_distance(appearance(pooled), self.present, self.centroids)


def pooled_rows(store, rows):
    """The globally average-pooled features of `rows` (rows x channels), a block at a time."""
    out = np.empty((len(rows), store.shape()[-1]), np.float32)
    for start in range(0, len(rows), cache.READ_BLOCK):
        chunk = rows[start:start + cache.READ_BLOCK]
        out[start:start + len(chunk)] = store.read(chunk).mean(axis=(1, 2))
    return out


def outlier_model(store, percentile, pooled=None):
    """The outlier measure of a cache: class centroids from the training rows, the threshold
    from the validation rows. `pooled` (all rows, pooled) saves reading the cache again."""
    train, validation = store.rows("train"), store.rows("validation")
    calibrated_on = "validation" if len(validation) else "train"
    calibration = validation if len(validation) else train
    if not len(train):
        raise UserError(f"{store.path} has no training images: rerun `make extract` with a "
                        "train split")
    if pooled is None:
        train_v, calibration_v = (appearance(pooled_rows(store, r)) for r in (train, calibration))
    else:
        train_v, calibration_v = appearance(pooled[train]), appearance(pooled[calibration])
    present, centroids = class_centroids(train_v, store.labels[train], len(store.class_names))
    distance, _ = outlier_distance(calibration_v, present, centroids)
    return OutlierModel(present, centroids, float(np.percentile(distance, percentile)),
                        calibrated_on)


def save_outlier_model(path, model, index_digest, feature_shape, percentile):
    """The measure's arrays and what they were made from (the cache's index digest and feature
    shape, OUTLIER_PERCENTILE), as .npz read back without pickle."""
    metadata = {"index_digest": index_digest, "percentile": percentile,
                "shape": list(feature_shape), "calibrated_on": model.calibrated_on}
    with files.replacing(path, "wb") as f:
        np.savez(f, present=model.present, centroids=model.centroids,
                 threshold=np.float64(model.threshold),
                 metadata=np.array(json.dumps(metadata, sort_keys=True)))


def load_outlier_model(models_dir, store, percentile):
    """The audit's saved measure when it was made on this very cache (its index digest) with
    this OUTLIER_PERCENTILE, else one computed from the cache now (one read of the training
    and validation rows: about 40 s at 100k images)."""
    path = os.path.join(models_dir, FOLDER, FILE)
    try:
        with files.open_regular(path, "rb") as f, np.load(f, allow_pickle=False) as arrays:
            metadata = json.loads(str(arrays["metadata"]))
            present, centroids = arrays["present"], arrays["centroids"]
            threshold = float(arrays["threshold"])
        digest = store.attrs.get("index_digest")
        if (digest and metadata.get("index_digest") == digest
                and metadata.get("percentile") == percentile
                and metadata.get("shape") == list(store.shape())
                and centroids.shape == (len(present), store.shape()[-1])
                and np.isfinite(centroids).all()
                and np.isin(present, np.arange(len(store.class_names))).all()
                and np.isfinite(threshold)):
            return OutlierModel(present.astype(np.int64),
                                centroids.astype(np.float32), threshold,
                                str(metadata.get("calibrated_on", "validation")))
    except (OSError, UserError, ValueError, KeyError, TypeError):
        pass  # none, another cache's, or not ours: computed below
    return outlier_model(store, percentile)
