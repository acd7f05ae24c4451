"""The outlier measure: how unlike the training data an image's feature map is.

An image's `appearance` is, per channel of its feature map, the mean over the map's positions
and their standard deviation (how unevenly the channel fires across the picture: a texture
statistic, like a Gram matrix's diagonal), both square-rooted (so a few strong channels do not
outweigh all the others): 2 x channels numbers. Its distance is the Mahalanobis distance of that
vector to the training rows' mean, under their covariance shrunk towards a multiple of the
identity (covariance + SHRINK x its mean variance x I): a few hundred training rows estimate it
and its inverse stays well conditioned. A photo varies along the directions photos vary in; a
drawing, noise or a flat picture leaves them, in its mean or in its spread. The threshold is the
OUTLIER_PERCENTILE-th percentile of the validation rows' distances. `make audit` computes it from
the cache and saves it (outlier_model.npz, plain arrays); `make predict` reuses it while the cache
is unchanged, and flags new images past the threshold (docs/audit.md has the measurements that
chose this measure over the mean alone, the distance to class centroids and to the nearest
training images, and the cut's activations).

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
SHRINK = 10.0                # covariance + SHRINK x mean variance x identity
MEASURE = ("Mahalanobis distance of the square-rooted per-channel mean and spatial standard "
           "deviation of the features to the training mean, covariance shrunk by "
           f"{SHRINK:g} x its mean variance")


def summaries(maps):
    """Feature maps (n, h, w, c) -> (their per-channel means, standard deviations), (n, c)
    each: all the measure needs of a map."""
    maps = np.asarray(maps, np.float32)
    return maps.mean(axis=(1, 2)), maps.std(axis=(1, 2))


def appearance(pooled, spread):
    """Per-channel means and spatial standard deviations (n, c) each -> their square roots side
    by side (n, 2c)."""
    return np.sqrt(np.maximum(np.hstack([np.asarray(pooled, np.float32),
                                         np.asarray(spread, np.float32)]), 0))


@dataclass
class OutlierModel:
    """What predict needs to say "unlike the training data" of new feature maps."""
    mean: np.ndarray         # (2c,) of the training rows' appearance
    precision: np.ndarray    # (2c, 2c) the inverse of their shrunk covariance
    class_means: np.ndarray  # (classes, 2c): to name the nearest class
    present: np.ndarray      # (classes,) which class each row of class_means is
    threshold: float         # the validation rows' OUTLIER_PERCENTILE-th percentile
    calibrated_on: str       # "validation", or "train" when the cache has no validation rows

    def distance(self, features):
        """(distance, nearest class) of feature maps (n, h, w, c)."""
        return self.distance_of(*summaries(features))

    def distance_of(self, pooled, spread, block=4096):
        """(distance, nearest class) of maps' `summaries` (n, c) each, a block at a time."""
        distance = np.empty(len(pooled), np.float32)
        nearest = np.empty(len(pooled), np.int64)
        for start in range(0, len(pooled), block):
            x = appearance(pooled[start:start + block], spread[start:start + block])
            centred = x - self.mean
            distance[start:start + len(x)] = np.sqrt(np.maximum(  # matrix products: BLAS
                ((centred @ self.precision) * centred).sum(axis=1), 0))
            gaps = ((x[:, None, :] - self.class_means[None]) ** 2).sum(axis=2)
            nearest[start:start + len(x)] = self.present[gaps.argmin(axis=1)]
        return distance, nearest


def summary_rows(store, rows):
    """The `summaries` of `rows`' maps, (rows, c) each, a block at a time."""
    pooled = np.empty((len(rows), store.shape()[-1]), np.float32)
    spread = np.empty_like(pooled)
    for start in range(0, len(rows), cache.READ_BLOCK):
        chunk = rows[start:start + cache.READ_BLOCK]
        pooled[start:start + len(chunk)], spread[start:start + len(chunk)] = summaries(
            store.read(chunk))
    return pooled, spread


def fit(train, train_labels, calibration, percentile, calibrated_on):
    """The measure from training rows' and calibration rows' `summaries` ((pooled, spread)
    pairs) and the training rows' labels."""
    x = appearance(*train).astype(np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / len(x)
    covariance += np.eye(len(covariance)) * SHRINK * max(np.trace(covariance) / len(covariance),
                                                         1e-12)
    labels = np.asarray(train_labels)
    present = np.unique(labels).astype(np.int64)
    class_means = np.stack([x[labels == k].mean(axis=0) for k in present])
    model = OutlierModel(mean.astype(np.float32), np.linalg.inv(covariance).astype(np.float32),
                         class_means.astype(np.float32), present, 0.0, calibrated_on)
    distance, _ = model.distance_of(*calibration)
    model.threshold = float(np.percentile(distance, percentile))
    return model


def outlier_model(store, percentile, pooled=None, spread=None):
    """The outlier measure of a cache: mean and covariance from the training rows, the threshold
    from the validation rows. `pooled` and `spread` (every row's `summaries`) save reading the
    cache again."""
    train, validation = store.rows("train"), store.rows("validation")
    if not len(train):
        raise UserError(f"{store.path} has no training images: rerun `make extract` with a "
                        "train split")
    calibrated_on = "validation" if len(validation) else "train"
    calibration = validation if len(validation) else train
    if pooled is None or spread is None:
        train_s, calibration_s = summary_rows(store, train), summary_rows(store, calibration)
    else:
        train_s = pooled[train], spread[train]
        calibration_s = pooled[calibration], spread[calibration]
    return fit(train_s, store.labels[train], calibration_s, percentile, calibrated_on)


def save_outlier_model(path, model, index_digest, feature_shape, percentile):
    """The measure's arrays and what they were made from (the cache's index digest and feature
    shape, OUTLIER_PERCENTILE), as .npz read back without pickle."""
    metadata = {"index_digest": index_digest, "percentile": percentile, "measure": MEASURE,
                "shape": list(feature_shape), "calibrated_on": model.calibrated_on}
    with files.replacing(path, "wb") as f:
        np.savez(f, mean=model.mean, precision=model.precision, class_means=model.class_means,
                 present=model.present, threshold=np.float64(model.threshold),
                 metadata=np.array(json.dumps(metadata, sort_keys=True)))


def load_outlier_model(models_dir, store, percentile):
    """The audit's saved measure when it was made on this very cache (its index digest) with
    this OUTLIER_PERCENTILE and this measure, else one computed from the cache now (one read of
    the training and validation rows: about 40 s at 100k images)."""
    path = os.path.join(models_dir, FOLDER, FILE)
    width = 2 * store.shape()[-1]  # the appearance: a mean and a spread per channel
    try:
        with files.open_regular(path, "rb") as f, np.load(f, allow_pickle=False) as arrays:
            metadata = json.loads(str(arrays["metadata"]))
            loaded = {k: arrays[k] for k in ("mean", "precision", "class_means", "present")}
            threshold = float(arrays["threshold"])
        digest = store.attrs.get("index_digest")
        if (digest and metadata.get("index_digest") == digest
                and metadata.get("percentile") == percentile
                and metadata.get("measure") == MEASURE
                and metadata.get("shape") == list(store.shape())
                and loaded["mean"].shape == (width,)
                and loaded["precision"].shape == (width, width)
                and loaded["class_means"].shape == (len(loaded["present"]), width)
                and loaded["present"].ndim == 1
                and all(np.isfinite(loaded[k]).all() for k in ("mean", "precision",
                                                               "class_means"))
                and np.isin(loaded["present"], np.arange(len(store.class_names))).all()
                and np.isfinite(threshold)):
            return OutlierModel(loaded["mean"].astype(np.float32),
                                loaded["precision"].astype(np.float32),
                                loaded["class_means"].astype(np.float32),
                                loaded["present"].astype(np.int64), threshold,
                                str(metadata.get("calibrated_on", "validation")))
    except (OSError, UserError, ValueError, KeyError, TypeError):
        pass  # none, another cache's, or not ours: computed below
    return outlier_model(store, percentile)
