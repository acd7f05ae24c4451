"""Know the data from the cache: near-duplicates and leakage, likely label errors, outliers.

    python -m pipeline audit [--name NAME] [--duplicate-threshold 0.6] [--audit-folds 5]

Reads features/<NAME>/features.h5 only (no image is decoded, no backbone runs for the figures)
and writes models/<NAME>/audit/. The measures are pipeline/analysis's: near-duplicates by a
whitened regional descriptor of the feature maps (analysis/near_duplicates.py), label issues by
confident learning on out-of-fold probabilities plus identical files under different labels
(analysis/label_issues.py), outliers by the distance to the training rows (analysis/outliers.py).

The outputs are one commit: near_duplicates, label_issues and outliers (CSV) and the picture
are written first under names holding their content's hash (reporting/pictures.py:
near_duplicates-<hash>.csv ...), then audit.json, which names them, is written last. A kill
before it leaves the previous audit.json naming its own files; readers take a file only through
`output` (named in audit.json, with the recorded hash). outlier_model.npz, which predict
reuses, records the cache it was made on and is checked against the cache itself
(analysis/outliers.load_outlier_model).
"""
import csv
import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from . import cache
from .analysis import label_issues as label_analysis
from .analysis import near_duplicates as duplicate_analysis
from .analysis import outliers
from .cache import settings
from .config import Config, UserError, warn
from .fs import escape, files
from .reporting import pictures, plots
from .reporting.thumbnails import short_name, thumbnail

FOLDER = outliers.FOLDER              # models/<NAME>/audit/
SUMMARY = "audit.json"
OUTLIER_MODEL = outliers.FILE         # the measure predict reuses while the cache is the same
# content-hashed outputs (reporting/pictures.py), named in audit.json under "outputs"
NEAR_DUPLICATES, LABEL_ISSUES, OUTLIERS, PICTURE = ("near_duplicates", "label_issues",
                                                    "outliers", "audit")
OUTPUTS = (NEAR_DUPLICATES, LABEL_ISSUES, OUTLIERS, PICTURE)
LEGACY = ("near_duplicates.csv", "label_issues.csv", "outliers.csv", "audit.png")
PICTURE_COLUMNS = 6
SETTINGS = ("duplicate_threshold", "audit_folds", "outlier_percentile")  # recorded in audit.json


@dataclass
class AuditResult:
    folder: str              # models/<NAME>/audit
    rows: int                # cached images audited
    duplicate_pairs: int     # pairs at or above the threshold (near_duplicates)
    leakage_pairs: int       # of which across splits
    label_issues: int        # rows in label_issues
    outliers: int            # rows in outliers
    summary: dict            # audit.json


@dataclass
class Cached:
    """What the audit reads from the cache, once."""
    y: np.ndarray
    class_names: list
    paths: np.ndarray
    shas: np.ndarray
    splits: np.ndarray
    attrs: dict              # identity, identity_id, index_digest, shape
    root: str                # where the images are, for the picture only
    descriptors: np.ndarray  # (n, c) analysis.near_duplicates.regional_gem of every map
    pooled: np.ndarray       # (n, c) globally average-pooled maps
    regions: np.ndarray      # (n, 4c) analysis.label_issues.grid_pooled: the label model's input
    spread: np.ndarray       # (n, c) each channel's standard deviation over the map
    outlier_model: outliers.OutlierModel


def run(config: Config) -> AuditResult:
    """Audit the cache, holding models/<NAME>'s lock (every writer of that folder does)."""
    return settings.run(config, "audit", _audit, config.models_dir)


def _audit(config):
    start = time.perf_counter()
    cached = _read(config)
    timings = {"read_s": time.perf_counter() - start}
    tick = time.perf_counter()
    pairs = _near_duplicates(cached, config.duplicate_threshold)
    timings["near_duplicates_s"] = time.perf_counter() - tick
    tick = time.perf_counter()
    issues = _label_issues(cached, config.audit_folds, config.seed)
    timings["label_issues_s"] = time.perf_counter() - tick
    unlike = _outliers(cached)
    folder = os.path.join(config.models_dir, FOLDER)
    files.no_link_folder(folder)  # a link planted here would send the files elsewhere
    os.makedirs(folder, exist_ok=True)
    outliers.save_outlier_model(os.path.join(folder, OUTLIER_MODEL), cached.outlier_model,
                                cached.attrs["index_digest"], cached.attrs["shape"],
                                config.outlier_percentile)
    records = _write_outputs(folder, cached, pairs, issues, unlike)
    summary = _summary(config, cached, pairs, issues, unlike, records, timings)
    summary["seconds"]["total_s"] = round(time.perf_counter() - start, 3)
    _commit(folder, summary, records)
    result = AuditResult(folder, len(cached.y), len(pairs["i"]), int(pairs["cross"].sum()),
                         len(issues["rows"]), len(unlike[0]), summary)
    _print(config, result, cached.outlier_model.threshold, issues, time.perf_counter() - start)
    return result


def _read(config):
    """The labels, paths and splits, and the descriptors of every row, read a block at a time:
    memory ~ rows x channels x 7, never the maps of the whole cache."""
    with cache.FeatureStore(config.features_dir) as store:
        y = np.asarray(store.labels, np.int64)
        class_names = list(store.class_names)
        _check_auditable(store, y, class_names, config.audit_folds)
        channels = store.shape()[-1]
        descriptors = np.empty((len(store), channels), np.float32)
        pooled = np.empty((len(store), channels), np.float32)
        spread = np.empty((len(store), channels), np.float32)
        regions = np.empty((len(store), label_analysis.GRID ** 2 * channels), np.float32)
        for start in range(0, len(store), cache.READ_BLOCK):
            maps = store.read(np.arange(start, min(start + cache.READ_BLOCK, len(store))))
            descriptors[start:start + len(maps)] = duplicate_analysis.regional_gem(maps)
            pooled[start:start + len(maps)], spread[start:start + len(maps)] = \
                outliers.summaries(maps)
            regions[start:start + len(maps)] = label_analysis.grid_pooled(maps)
        attrs = {"identity": store.identity, "identity_id": store.attrs.get("identity_id", ""),
                 "index_digest": store.attrs.get("index_digest", ""), "shape": store.shape()}
        return Cached(y, class_names, store.paths, store.sha256, store.splits, attrs,
                      store.image_root(config.data), descriptors, pooled, regions, spread,
                      outliers.outlier_model(store, config.outlier_percentile, pooled, spread))


def _near_duplicates(cached, threshold):
    """The pairs of different files at or above `threshold`, the same file's rows set aside
    (they are extract's business, and counted) before the most similar are kept."""
    train = cached.splits == "train"
    whitening = duplicate_analysis.Descriptor.fit(cached.descriptors[train if train.any()
                                                                     else slice(None)])
    vectors = whitening.apply(cached.descriptors)
    (i, j, similarity), identical = duplicate_analysis.pairs(vectors, threshold,
                                                             groups=cached.shas)
    cross = cached.splits[i] != cached.splits[j]
    return {"i": i, "j": j, "similarity": similarity, "cross": cross, "identical": identical,
            "truncated": len(i) >= duplicate_analysis.MAX_PAIRS}


def _label_issues(cached, folds, seed):
    """Identical files under different labels first, then the confident-learning candidates."""
    probabilities = label_analysis.out_of_fold_probabilities(cached.regions, cached.y, folds,
                                                             seed)
    found = label_analysis.label_issues(probabilities, cached.y)
    conflicts, conflict_suggested = label_analysis.conflicting_copies(cached.shas, cached.y)
    rows, suggested = label_analysis.merge(conflicts, conflict_suggested, found)
    accuracy = float((probabilities.argmax(1) == cached.y).mean())
    return {"rows": rows, "suggested": suggested, "found": found, "conflicts": len(conflicts),
            "given": probabilities[np.arange(len(cached.y)), cached.y], "accuracy": accuracy,
            "weak": accuracy < label_analysis.WEAK_ACCURACY}


def _outliers(cached):
    """(rows past the outlier threshold, farthest first; distance; nearest class) of every row."""
    distance, nearest = cached.outlier_model.distance_of(cached.pooled, cached.spread)
    unlike = np.flatnonzero(distance > cached.outlier_model.threshold)
    return unlike[np.argsort(-distance[unlike], kind="stable")], distance, nearest


def _csv_bytes(header, rows):
    out = io.StringIO(newline="")
    writer = escape.csv_writer(out)  # every text cell spreadsheet-safe
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def _write_outputs(folder, cached, pairs, issues, unlike):
    """The CSVs and the picture under their content's names; {output: record}."""
    paths, splits, names, y = cached.paths, cached.splits, cached.class_names, cached.y
    tables = {
        NEAR_DUPLICATES: (["path_a", "split_a", "path_b", "split_b", "similarity", "cross_split"],
                          ([paths[a], splits[a], paths[b], splits[b],
                            round(float(s), 6), int(c)] for a, b, s, c in
                           zip(pairs["i"], pairs["j"], pairs["similarity"], pairs["cross"]))),
        LABEL_ISSUES: (["path", "split", "label", "suggested", "label_probability"],
                       ([paths[r], splits[r], names[y[r]], names[s],
                         round(float(issues["given"][r]), 6)]
                        for r, s in zip(issues["rows"], issues["suggested"]))),
        OUTLIERS: (["path", "split", "label", "nearest_class", "distance"],
                   ([paths[r], splits[r], names[y[r]], names[unlike[2][r]],
                     round(float(unlike[1][r]), 6)] for r in unlike[0])),
    }
    records = {key: pictures.write(folder, key, _csv_bytes(*table), "csv")
               for key, table in tables.items()}
    png = _picture(cached, pairs, issues, unlike)
    records[PICTURE] = pictures.write(folder, PICTURE, png) if png is not None else None
    return records


def _summary(config, cached, pairs, issues, unlike, records, timings):
    cross, found = pairs["cross"], issues["found"]
    names = cached.class_names
    summary = {
        "rows": int(len(cached.y)), "class_names": names,
        "rows_per_split": {s: int((cached.splits == s).sum())
                           for s in ("train", "validation", "test")},
        "identity": cached.attrs["identity"], "identity_id": cached.attrs["identity_id"],
        "index_digest": cached.attrs["index_digest"],
        "settings": {k: getattr(config, k) for k in SETTINGS + ("seed",)},
        "dataset_settings": settings.record_of(config),  # those the cache was made with
        "outputs": records,
        "near_duplicates": {
            "threshold": config.duplicate_threshold,
            "threshold_set_by": "DUPLICATE_THRESHOLD (config.py; chosen on photos with edited "
                                "copies, see docs/audit.md)",
            "measure": "cosine similarity of whitened regional GeM descriptors of the feature "
                       "maps (pipeline/analysis/near_duplicates.py)",
            "pairs": int(len(pairs["i"])), "cross_split_pairs": int(cross.sum()),
            "cross_split_by_splits": _pairs_by_splits(cached.splits, pairs["i"], pairs["j"],
                                                      cross),
            "identical_files_left_out": pairs["identical"],
            "truncated_at": duplicate_analysis.MAX_PAIRS if pairs["truncated"] else None},
        "label_issues": {
            "candidates": int(len(issues["rows"])), "folds": config.audit_folds,
            "identical_files_with_different_labels": issues["conflicts"],
            "model": f"StandardScaler + LogisticRegression(C={label_analysis.LOGREG_C}) on the "
                     f"features' means over {label_analysis.GRID} x {label_analysis.GRID} "
                     "regions, out of fold; confident joint",
            "class_thresholds": {names[k]: float(t) for k, t in enumerate(found.thresholds)},
            "confident_joint": found.joint.tolist(),
            "threshold_set_by": "per class: mean out-of-fold probability of the class over the "
                                "rows labelled with it",
            "out_of_fold_accuracy": issues["accuracy"], "weak": issues["weak"],
            "note": _weak_note(issues["accuracy"]) if issues["weak"] else ""},
        "outliers": {"rows": int(len(unlike[0])), "threshold": cached.outlier_model.threshold,
                     "threshold_set_by": f"{config.outlier_percentile:g}th percentile of the "
                                         f"{cached.outlier_model.calibrated_on} rows' distances",
                     "measure": outliers.MEASURE},
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return summary


def _weak_note(accuracy):
    return (f"the features classify only {accuracy:.0%} of the images right out of fold: many "
            "correct labels look doubtful to them, so the label-issue candidates are weak "
            "evidence (better features, such as WEIGHTS=imagenet, make them stronger)")


def _commit(folder, summary, records):
    """audit.json last, naming this run's files: the commit point. Then the files no audit.json
    names any more, and the fixed names of earlier versions, are removed."""
    with files.replacing(os.path.join(folder, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    pictures.remove_stale(folder, OUTPUTS, list(records.values()))
    for name in LEGACY:  # a link there goes too (its target stays): nothing reads these names
        legacy = os.path.join(folder, name)
        if os.path.islink(legacy) or os.path.isfile(legacy):
            os.remove(legacy)


def output(folder, summary, key):
    """The bytes of the output `key` (NEAR_DUPLICATES, ...) that `summary` (audit.json, read
    back, untrusted) names, or (None, why) when it is missing or not what was recorded."""
    records = summary.get("outputs") if isinstance(summary, dict) else None
    return pictures.verified(folder, records.get(key) if isinstance(records, dict) else None)


def output_rows(folder, summary, key):
    """The rows (dicts) of one of the audit's CSVs, or (None, why)."""
    data, why = output(folder, summary, key)
    if data is None:
        return None, why
    try:
        return list(escape.csv_dicts(io.StringIO(data.decode("utf-8"), newline=""))), ""
    except (UnicodeDecodeError, csv.Error):
        return None, "not a CSV"


def _print(config, result, outlier_threshold, issues, seconds):
    print(f"audit {config.dataset_name}: {result.rows} images, {result.duplicate_pairs} "
          f"near-duplicate pairs (similarity >= {config.duplicate_threshold:g}), "
          f"{result.leakage_pairs} across splits (leakage); {result.label_issues} label-issue "
          f"candidates ({issues['conflicts']} identical files under different labels); "
          f"{result.outliers} outliers (distance > {outlier_threshold:.3f}); {seconds:.1f} s; "
          f"wrote {result.folder}")
    if issues["weak"]:
        warn(f"label issues: {_weak_note(issues['accuracy'])}")


def current_summary(config):
    """audit.json when it describes the cache as it is now (same rows, labels, splits, features)
    with the same settings, else None: what `make batch` needs to skip an audit."""
    from .fs import artifacts
    summary = artifacts.json_or_empty(os.path.join(config.models_dir, FOLDER, SUMMARY))
    if not summary or not os.path.exists(os.path.join(config.features_dir, cache.MASTER)):
        return None
    digest = cache.master_attribute(config.features_dir, "index_digest")
    wanted = {k: getattr(config, k) for k in SETTINGS + ("seed",)}
    if digest and summary.get("index_digest") == digest and summary.get("settings") == wanted:
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


PICTURE_ROWS = 6   # of each kind in audit.png


def _picture(cached, pairs, issues, unlike):
    """audit.png's bytes: the top near-duplicate pairs side by side, the top label-issue
    candidates, the farthest outliers, each kind on rows of its own, titled by what it holds;
    None when there is nothing to show. Display only: PIL opens these few files for
    thumbnails; no figure above depends on them."""
    paths, splits, names, y, root = (cached.paths, cached.splits, cached.class_names, cached.y,
                                     cached.root)
    kinds, cells = [], []

    def new_row():
        if len(cells) % PICTURE_COLUMNS:
            cells.extend([(np.ones((2, 2, 3)), "")] *
                            (PICTURE_COLUMNS - len(cells) % PICTURE_COLUMNS))
    shown = list(zip(pairs["i"], pairs["j"], pairs["similarity"]))[:PICTURE_ROWS // 2]
    for rank, (a, b, s) in enumerate(shown, 1):
        for r in (a, b):
            cells.append((thumbnail(os.path.join(root, paths[r]))[0],
                             f"pair {rank}: {s:.3f}\n{splits[r]}: {short_name(paths[r])}"))
    if shown:
        kinds.append("near-duplicate pairs (by twos)")
    new_row()
    for rank, (r, s) in enumerate(zip(issues["rows"][:PICTURE_ROWS],
                                      issues["suggested"][:PICTURE_ROWS]), 1):
        cells.append((thumbnail(os.path.join(root, paths[r]))[0],
                         f"issue {rank}: {names[y[r]]} -> {names[s]}\n"
                         f"p(label) {issues['given'][r]:.3f}  {short_name(paths[r])}"))
    if len(issues["rows"]):
        kinds.append("label-issue candidates")
    new_row()
    for rank, r in enumerate(unlike[0][:PICTURE_ROWS], 1):
        cells.append((thumbnail(os.path.join(root, paths[r]))[0], f"outlier {rank}: "
                      f"{unlike[1][r]:.3f}\n{splits[r]}: {short_name(paths[r])}"))
    if len(unlike[0]):
        kinds.append("outliers")
    if not kinds:
        return None
    title = ", ".join(kinds)
    return plots.png_bytes(plots.plot_misclassified_grid(
        cells, columns=PICTURE_COLUMNS, title=title[0].upper() + title[1:]))
