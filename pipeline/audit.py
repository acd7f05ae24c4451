"""Know the data from the cache: near-duplicates and leakage, likely label errors, outliers.

    python -m pipeline audit [--name NAME] [--duplicate-threshold 0.9] [--audit-folds 5]

Reads features/<NAME>/features.h5 only (no image is decoded, no backbone runs for the figures)
and writes models/<NAME>/audit/: near_duplicates.csv, label_issues.csv, outliers.csv, audit.json
and audit.png (the top pairs and candidates, the only images opened, for display alone), and
outlier_model.npz, the outlier measure that `make predict` reuses while the cache is unchanged.

Near-duplicates are judged in an embedding that keeps the layout. Each feature map is flattened
(first averaged down to at most GRID x GRID cells, so SIZE=150's 4x4 map stays whole), multiplied
by a fixed Gaussian random matrix into DIMENSIONS numbers, centred on the training rows' mean and
L2-normalised. The dot product of two such vectors estimates the cosine similarity of the centred,
flattened maps (Johnson-Lindenstrauss), at 1/16 of the cost at SIZE=150. Flattened, not globally
average-pooled: the map keeps where things are, so two photos of the same kind of scene differ
while a resized, re-encoded copy does not; centred, because ReLU features all point into one
orthant, where any two images score a cosine of 0.99 (bench/audit_planted.py: planted copies
>= 0.96, other pairs <= 0.80 this way, 0.999 vs 0.996 with plain pooled vectors).

- Near-duplicates: the n x n similarity matrix is never held: BLOCK x BLOCK tiles of it are
  computed one at a time and only the pairs at or above DUPLICATE_THRESHOLD are kept (at most
  MAX_PAIRS, the most similar, chosen with argpartition). Pairs of identical files (same sha256)
  are left out; a pair across splits is leakage.
- Label issues: out-of-fold probabilities of every row's given label from AUDIT_FOLDS-fold
  stratified cross-validation (sklearn cross_val_predict) of heads.py's logistic regression on
  the globally average-pooled feature maps (rows x 512), so no row is scored by a model that saw
  it. Pooled, not the embedding: a class is what is in the picture, not where, and so it ranked
  the 5 planted label errors of bench/audit_planted.py 3rd to 48th of 170, the embedding 7th to
  144th. Confident learning: a row is a candidate when its given label's probability is below
  that class's threshold (the mean probability of the class over the rows labelled with it) and
  another class is more likely; candidates are ranked by the given label's probability, lowest
  first.
- Outliers: distance to the nearest training class centroid, past the OUTLIER_PERCENTILE-th
  percentile of validation's (`pipeline/analysis/outliers.py` says which distance and why;
  predict too).
"""
import csv
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from . import cache
from .analysis import outliers
from .config import Config, UserError
from .fs import escape, files, lock
from .model import heads
from .reporting import plots
from .reporting.thumbnails import short_name, thumbnail

FOLDER = outliers.FOLDER              # models/<NAME>/audit/
NEAR_DUPLICATES = "near_duplicates.csv"
LABEL_ISSUES = "label_issues.csv"
OUTLIERS = "outliers.csv"
SUMMARY = "audit.json"
PICTURE = "audit.png"
OUTLIER_MODEL = outliers.FILE        # the measure predict reuses while the cache is the same
GRID = 4                 # cells per side the map is averaged down to, at most, before flattening
DIMENSIONS = 512         # of the random projection: the estimate's spread is ~(1 - cos^2)/sqrt(512)
PROJECTION_SEED = 20240  # fixed: every audit measures alike, so a threshold keeps its meaning
BLOCK = 2048             # rows per tile side: 2048 x 2048 float32 = 16 MB a tile
MAX_PAIRS = 100_000      # near-duplicate pairs kept at most, the most similar
LOGREG_C = 0.1           # regularisation of the cross-validated logistic regression
PICTURE_PAIRS, PICTURE_ISSUES = 6, 6
SETTINGS = ("duplicate_threshold", "audit_folds", "outlier_percentile")  # recorded in audit.json


@dataclass
class AuditResult:
    folder: str              # models/<NAME>/audit
    rows: int                # cached images audited
    duplicate_pairs: int     # pairs at or above the threshold (near_duplicates.csv)
    leakage_pairs: int       # of which across splits
    label_issues: int        # candidates in label_issues.csv
    outliers: int            # rows in outliers.csv
    summary: dict            # audit.json


class Embedding:
    """Feature maps -> unit vectors whose dot products estimate the cosine similarity of the
    centred, flattened maps. `mean` (of the training rows) is set by `fit`."""

    def __init__(self, shape):
        h, w, c = shape
        self.cells = (min(h, GRID), min(w, GRID))
        flat = self.cells[0] * self.cells[1] * c
        # fewer numbers than DIMENSIONS already: kept as they are
        self.projection = None if flat <= DIMENSIONS else (
            np.random.default_rng(PROJECTION_SEED).standard_normal((flat, DIMENSIONS),
                                                                   dtype=np.float32)
            / np.float32(np.sqrt(DIMENSIONS)))
        self.mean = None

    def project(self, features):
        """(n, h, w, c) maps -> (n, d) projected, not yet centred."""
        features = np.asarray(features, np.float32)
        if features.shape[1:3] != self.cells:  # average blocks of cells down to the grid
            rows = np.array_split(np.arange(features.shape[1]), self.cells[0])
            cols = np.array_split(np.arange(features.shape[2]), self.cells[1])
            features = np.stack([np.stack([features[:, r][:, :, k].mean(axis=(1, 2))
                                           for k in cols], axis=1) for r in rows], axis=1)
        flat = features.reshape(len(features), -1)
        return flat if self.projection is None else flat @ self.projection

    def fit(self, projected):
        self.mean = projected.mean(axis=0)
        return self

    def unit(self, projected):
        """Centred and L2-normalised (a zero vector stays zero)."""
        centred = projected - self.mean
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        return centred / np.maximum(norms, 1e-12)


def project_rows(store, embedding, rows, pooled=False):
    """The projected features of `rows`, read a block at a time: memory ~ rows x DIMENSIONS.
    pooled=True: also their globally average-pooled feature maps (rows x channels)."""
    channels = store.shape()[-1]
    out = np.empty((len(rows), embedding.projection.shape[1] if embedding.projection is not None
                    else int(np.prod(embedding.cells)) * channels), np.float32)
    pool = np.empty((len(rows), channels), np.float32) if pooled else None
    for start in range(0, len(rows), cache.READ_BLOCK):
        chunk = rows[start:start + cache.READ_BLOCK]
        features = store.read(chunk)
        out[start:start + len(chunk)] = embedding.project(features)
        if pooled:
            pool[start:start + len(chunk)] = features.mean(axis=(1, 2))
    return (out, pool) if pooled else out


# --- Near-duplicates and label issues, on arrays ----------------------------------------------

def near_duplicates(vectors, threshold, block=BLOCK, max_pairs=MAX_PAIRS):
    """(i, j, similarity) of every pair i < j with vectors[i] . vectors[j] >= threshold, most
    similar first (at most max_pairs of them), from block x block tiles of the similarity
    matrix: memory ~ block^2 + the pairs kept, never n^2."""
    n = len(vectors)
    found_i, found_j, found_s, kept = [], [], [], 0
    for a in range(0, n, block):
        for b in range(a, n, block):
            tile = vectors[a:a + block] @ vectors[b:b + block].T
            if a == b:  # each pair once, no image with itself
                tile = np.triu(tile, k=1) - np.tril(np.ones_like(tile))
            i, j = np.nonzero(tile >= threshold)
            if len(i):
                found_i.append(i + a), found_j.append(j + b), found_s.append(tile[i, j])
                kept += len(i)
            if kept > 2 * max_pairs:  # prune now and then: memory stays ~ max_pairs
                found_i, found_j, found_s = _top([np.concatenate(x) for x in
                                                  (found_i, found_j, found_s)], max_pairs)
                kept = len(found_s[0])
    if not kept:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = (np.concatenate(x) for x in (found_i, found_j, found_s))
    [i], [j], [s] = _top([i, j, s], max_pairs)
    order = np.lexsort((j, i, -s))  # most similar first, ties in row order
    return i[order], j[order], s[order]


def _top(arrays, count):
    """The `count` entries of largest similarity (arrays[2]), as one-element lists."""
    i, j, s = arrays
    if len(s) > count:
        keep = np.argpartition(-s, count - 1)[:count]
        i, j, s = i[keep], j[keep], s[keep]
    return [i], [j], [s]


def out_of_fold_probabilities(x, y, folds, seed=0, estimator=None):
    """(n, classes) probabilities where row r's come from the one fold model that did not train
    on r (StratifiedKFold, shuffled with `seed`). The default estimator is heads.py's logistic
    regression behind a StandardScaler."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if estimator is None:
        estimator = make_pipeline(StandardScaler(), heads.logistic_regression(LOGREG_C, seed))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(estimator, x, y, cv=cv, method="predict_proba")


def label_issues(probabilities, y):
    """(candidate rows, most suspicious first; suggested class per row; per-class thresholds).
    Confident learning: class k's threshold is the mean probability of k over the rows labelled
    k (what "confidently k" means for this model and class); a row is a candidate when the
    probability of its given label is below its class's threshold and another class is more
    likely. Ranked by the given label's probability, lowest first."""
    n, classes = probabilities.shape
    thresholds = np.array([probabilities[y == k, k].mean() if (y == k).any() else 1.0
                           for k in range(classes)])
    given = probabilities[np.arange(n), y]
    others = probabilities.copy()
    others[np.arange(n), y] = -1.0
    suggested = others.argmax(axis=1)
    best_other = others[np.arange(n), suggested]
    candidate = (given < thresholds[y]) & (best_other > given)
    rows = np.flatnonzero(candidate)
    rows = rows[np.lexsort((rows, given[rows]))]
    return rows, suggested, thresholds


# --- The stage --------------------------------------------------------------------------------

def run(config: Config) -> AuditResult:
    """Audit the cache, holding models/<NAME>'s lock (every writer of that folder does)."""
    with lock.exclusive(config.models_dir, "audit"):
        return _audit(config)


def _audit(config):
    start = time.perf_counter()
    with cache.FeatureStore(config.features_dir) as store:
        y = np.asarray(store.labels, np.int64)
        class_names = list(store.class_names)
        _check_auditable(store, y, class_names, config.audit_folds)
        rows = np.arange(len(store))
        embedding = Embedding(store.shape())
        projected, pooled = project_rows(store, embedding, rows, pooled=True)
        paths, shas, splits = store.paths, store.sha256, store.splits
        identity, identity_id = store.identity, store.attrs.get("identity_id", "")
        digest, shape = store.attrs.get("index_digest", ""), store.shape()
        root = store.image_root(config.data)
        model = outliers.outlier_model(store, config.outlier_percentile, pooled)
    vectors = embedding.fit(projected[splits == "train"]).unit(projected)
    del projected
    timings = {"embed_s": time.perf_counter() - start}

    tick = time.perf_counter()
    i, j, similarity = near_duplicates(vectors, config.duplicate_threshold)
    different = shas[i] != shas[j]  # the same file twice is extract's business, not a near copy
    exact = int((~different).sum())
    i, j, similarity = i[different], j[different], similarity[different]
    cross = splits[i] != splits[j]
    timings["near_duplicates_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    probabilities = out_of_fold_probabilities(pooled, y, config.audit_folds, config.seed)
    issues, suggested, class_thresholds = label_issues(probabilities, y)
    timings["label_issues_s"] = time.perf_counter() - tick

    distance, nearest = outliers.outlier_distance(outliers.appearance(pooled), model.present,
                                                  model.centroids)
    unlike = np.flatnonzero(distance > model.threshold)
    unlike = unlike[np.argsort(-distance[unlike], kind="stable")]

    folder = os.path.join(config.models_dir, FOLDER)
    files.no_link_folder(folder)  # a link planted here would send the files elsewhere
    os.makedirs(folder, exist_ok=True)
    safe = escape.csv_cell
    _write_csv(os.path.join(folder, NEAR_DUPLICATES),
               ["path_a", "split_a", "path_b", "split_b", "similarity", "cross_split"],
               ([safe(paths[a]), splits[a], safe(paths[b]), splits[b], round(float(s), 6), int(c)]
                for a, b, s, c in zip(i, j, similarity, cross)))
    given = probabilities[np.arange(len(y)), y]
    _write_csv(os.path.join(folder, LABEL_ISSUES),
               ["path", "split", "label", "suggested", "label_probability"],
               ([safe(paths[r]), splits[r], safe(class_names[y[r]]),
                 safe(class_names[suggested[r]]), round(float(given[r]), 6)] for r in issues))
    _write_csv(os.path.join(folder, OUTLIERS),
               ["path", "split", "label", "nearest_class", "distance"],
               ([safe(paths[r]), splits[r], safe(class_names[y[r]]),
                 safe(class_names[nearest[r]]), round(float(distance[r]), 6)] for r in unlike))

    outliers.save_outlier_model(os.path.join(folder, OUTLIER_MODEL), model, digest, shape,
                       config.outlier_percentile)
    summary = {
        "rows": int(len(y)), "class_names": class_names,
        "rows_per_split": {s: int((splits == s).sum()) for s in ("train", "validation", "test")},
        "identity": identity, "identity_id": identity_id, "index_digest": digest,
        "settings": {k: getattr(config, k) for k in SETTINGS + ("seed",)},
        "embedding": {"grid": list(embedding.cells), "dimensions": int(vectors.shape[1]),
                      "projection_seed": PROJECTION_SEED,
                      "measure": "cosine similarity of the flattened feature maps, centred on the "
                                 "training mean, estimated by a fixed random projection"},
        "near_duplicates": {"threshold": config.duplicate_threshold,
                            "threshold_set_by": "DUPLICATE_THRESHOLD (config.py; planted copies "
                                                "score ~0.95-1, see docs/audit.md)",
                            "pairs": int(len(i)), "cross_split_pairs": int(cross.sum()),
                            "cross_split_by_splits": _pairs_by_splits(splits, i, j, cross),
                            "identical_files_left_out": exact,
                            "truncated_at": MAX_PAIRS if len(i) + exact >= MAX_PAIRS else None},
        "label_issues": {"candidates": int(len(issues)), "folds": config.audit_folds,
                         "model": f"StandardScaler + LogisticRegression(C={LOGREG_C}) on the "
                                  "globally average-pooled features, out of fold",
                         "class_thresholds": {class_names[k]: float(t)
                                              for k, t in enumerate(class_thresholds)},
                         "threshold_set_by": "per class: mean out-of-fold probability of the "
                                             "class over the rows labelled with it",
                         "out_of_fold_accuracy": float((probabilities.argmax(1) == y).mean())},
        "outliers": {"rows": int(len(unlike)), "threshold": model.threshold,
                     "threshold_set_by": f"{config.outlier_percentile:g}th percentile of the "
                                         f"{model.calibrated_on} rows' distances",
                     "measure": "1 - cosine similarity of the square-rooted, globally "
                                "average-pooled features to the nearest training class "
                                "centroid"},
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    picture = os.path.join(folder, PICTURE)
    shown = _picture(picture, root, paths, splits, class_names, y, (i, j, similarity),
                     issues, suggested, given)
    summary["picture"] = PICTURE if shown else None
    summary["seconds"]["total_s"] = round(time.perf_counter() - start, 3)
    with files.replacing(os.path.join(folder, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")

    result = AuditResult(folder, int(len(y)), int(len(i)), int(cross.sum()), int(len(issues)),
                         int(len(unlike)), summary)
    print(f"audit {config.dataset_name}: {len(y)} images, {len(i)} near-duplicate pairs "
          f"(similarity >= {config.duplicate_threshold:g}), {int(cross.sum())} across splits "
          f"(leakage); {len(issues)} label-issue candidates; {len(unlike)} outliers (distance > "
          f"{model.threshold:.3f}); {time.perf_counter() - start:.1f} s; wrote {folder}")
    return result


def current_summary(config):
    """audit.json when it describes the cache as it is now (same rows, labels, splits, features)
    with the same settings, else None: what `make batch` needs to skip an audit."""
    from .fs import artifacts
    summary = artifacts.json_or_empty(os.path.join(config.models_dir, FOLDER, SUMMARY))
    if not summary or not os.path.exists(os.path.join(config.features_dir, cache.MASTER)):
        return None
    digest = cache.master_attribute(config.features_dir, "index_digest")
    settings = {k: getattr(config, k) for k in SETTINGS + ("seed",)}
    if digest and summary.get("index_digest") == digest and summary.get("settings") == settings:
        return summary
    return None


def _check_auditable(store, y, class_names, folds):
    """One line for a cache the audit cannot judge: one class, or a class too small for the
    folds (StratifiedKFold puts at least one of its images in every fold)."""
    counts = np.bincount(y, minlength=len(class_names))
    if (counts > 0).sum() < 2:
        raise UserError(f"{store.path} has images of one class only ({class_names[0]}): the "
                        "audit compares classes; extract a dataset with two or more")
    small = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
    if counts[small] < folds:
        raise UserError(f"class {class_names[small]!r} has {counts[small]} image(s), too few "
                        f"for AUDIT_FOLDS={folds} folds: add images or use AUDIT_FOLDS="
                        f"{max(2, int(counts[small]))}" if counts[small] >= 2 else
                        f"class {class_names[small]!r} has {counts[small]} image: the audit's "
                        "cross-validation needs at least 2 per class: add images")


def _pairs_by_splits(splits, i, j, cross):
    out = {}
    for a, b in zip(splits[i[cross]], splits[j[cross]]):
        key = "/".join(sorted((str(a), str(b))))
        out[key] = out.get(key, 0) + 1
    return out


def _write_csv(path, header, rows):
    with files.replacing(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _picture(path, root, paths, splits, class_names, y, pairs, issues, suggested, given):
    """audit.png: the top near-duplicate pairs side by side, then the top label-issue candidates.
    Display only: PIL opens these few files for thumbnails; no figure above depends on them.
    Returns whether it was drawn (a stale picture is removed otherwise)."""
    i, j, similarity = pairs
    pictures = []
    for rank, (a, b, s) in enumerate(zip(i[:PICTURE_PAIRS], j[:PICTURE_PAIRS],
                                         similarity[:PICTURE_PAIRS]), 1):
        for r in (a, b):
            pictures.append((thumbnail(os.path.join(root, paths[r]))[0],
                             f"pair {rank}: {s:.3f}\n{splits[r]}: {short_name(paths[r])}"))
    if len(pictures) % PICTURE_PAIRS:  # label issues start on a fresh row
        pictures += [(np.ones((2, 2, 3)), "")] * (PICTURE_PAIRS - len(pictures) % PICTURE_PAIRS)
    for rank, r in enumerate(issues[:PICTURE_ISSUES], 1):
        pictures.append((thumbnail(os.path.join(root, paths[r]))[0],
                         f"issue {rank}: {class_names[y[r]]} -> {class_names[suggested[r]]}\n"
                         f"p(label) {given[r]:.3f}  {short_name(paths[r])}"))
    if not pictures:
        if os.path.exists(path):
            os.remove(path)
        return False
    plots.plot_misclassified_grid(pictures, path, columns=PICTURE_PAIRS,
                                  title="Near-duplicate pairs (by twos), then label-issue "
                                        "candidates")
    return True
