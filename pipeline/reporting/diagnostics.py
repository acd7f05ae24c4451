"""What evaluate computes for the report beyond the scores: ROC and precision-recall curves, the
most-confused class pairs, a 2-D projection of the cached features, and each stage's time.

Shared by evaluate only; it imports no stage. The figures are drawn here and returned as PNG
bytes, for evaluate to write under hashed names (reporting/pictures.py) and name in evaluation.json.
"""
import numpy as np
from sklearn import metrics

from . import plots

CURVE_CLASSES = 10       # one-vs-rest curves drawn per figure: the classes with the lowest AUC
CONFUSED_PAIRS = 5       # pairs listed per model
PROJECTION_ROWS = 2000   # rows of the cache read for the projection, at most (a fixed-seed sample)
PROJECTION_BLOCK = 256   # rows read at a time, each block averaged over positions before keeping


def curves(probabilities, labels, class_names):
    """({"roc_auc": {class: AUC or None}, "average_precision": {...}, "macro_roc_auc",
    "macro_average_precision"}, the curves to draw). Two classes: one curve, of the second class
    as positive (as roc_auc). More: one-vs-rest, one per class; a class absent from the split, or
    the only one present, has no curve (None)."""
    n = len(class_names)
    positives = [1] if n == 2 else range(n)
    entry = {"roc_auc": {}, "average_precision": {}}
    drawn = []
    for k in positives:
        truth = (labels == k).astype(int)
        if truth.min() == truth.max():
            entry["roc_auc"][class_names[k]] = entry["average_precision"][class_names[k]] = None
            continue
        score = probabilities[:, k]
        auc = float(metrics.roc_auc_score(truth, score))
        ap = float(metrics.average_precision_score(truth, score))
        entry["roc_auc"][class_names[k]], entry["average_precision"][class_names[k]] = auc, ap
        fpr, tpr, _ = metrics.roc_curve(truth, score)
        precision, recall, _ = metrics.precision_recall_curve(truth, score)
        drawn.append((class_names[k], fpr, tpr, auc, recall, precision, ap, k))
    for key, macro in (("roc_auc", "macro_roc_auc"), ("average_precision",
                                                      "macro_average_precision")):
        values = [v for v in entry[key].values() if v is not None]
        entry[macro] = float(np.mean(values)) if values else None
    drawn = sorted(drawn, key=lambda c: c[3])[:CURVE_CLASSES]  # the hardest classes
    return entry, drawn


def confused_pairs(matrix, class_names, top=CONFUSED_PAIRS):
    """The class pairs most often taken for each other, both directions counted together, most
    first: [{"a", "b", "a_as_b", "b_as_a", "total", "share"}], share of the two classes' images.
    Two classes: the one pair (when there is a mistake)."""
    matrix = np.asarray(matrix)
    pairs = []
    for a in range(len(class_names)):
        for b in range(a + 1, len(class_names)):
            total = int(matrix[a, b] + matrix[b, a])
            if total:
                images = int(matrix[a].sum() + matrix[b].sum())
                pairs.append({"a": class_names[a], "b": class_names[b],
                              "a_as_b": int(matrix[a, b]), "b_as_a": int(matrix[b, a]),
                              "total": total, "share": total / images})
    pairs.sort(key=lambda p: (-p["total"], -p["share"]))
    return pairs[:top]


def projection(store, marked_rows, seed, cap=PROJECTION_ROWS):
    """PCA of the cached feature maps to 2-D: ({"rows", "of", "explained_variance", "marked"},
    points, labels, marked mask). Reads at most `cap` rows, through FeatureStore (never an
    image): every row of `marked_rows` (the mistakes, up to cap), then a fixed-seed sample of the
    rest. Each map is averaged over its positions first, so memory is cap x channels."""
    from sklearn.decomposition import PCA

    total = len(store)
    marked_rows = np.unique(np.asarray(marked_rows, dtype=np.int64))[:cap]
    rest = np.setdiff1d(np.arange(total), marked_rows)
    take = min(len(rest), cap - len(marked_rows))
    sample = np.random.default_rng(seed).choice(rest, size=take, replace=False)
    rows = np.sort(np.concatenate([marked_rows, sample]))
    pooled = []
    for start in range(0, len(rows), PROJECTION_BLOCK):
        block = store.read(rows[start:start + PROJECTION_BLOCK])
        pooled.append(block.reshape(len(block), -1, block.shape[-1]).mean(axis=1)
                      if block.ndim > 2 else block)
    features = np.concatenate(pooled).astype(np.float64)
    components = min(2, *features.shape)
    pca = PCA(n_components=components, random_state=seed)
    points = pca.fit_transform(features)
    if components < 2:  # one row or one channel: a line
        points = np.pad(points, ((0, 0), (0, 2 - components)))
    marked = np.isin(rows, marked_rows)
    entry = {"rows": int(len(rows)), "of": int(total), "marked": int(marked.sum()),
             "explained_variance": [float(v) for v in pca.explained_variance_ratio_]}
    return entry, points, store.labels[rows], marked


def projection_png(points, labels, class_names, marked, model_title, split, entry):
    """The projection's figure as PNG bytes."""
    variance = ", ".join(f"{v:.0%}" for v in entry["explained_variance"])
    fig = plots.plot_projection(
        points, labels, class_names, marked,
        title=f"PCA of the cached features ({entry['rows']} of {entry['of']} images)",
        note=f"explained variance {variance}; circled: the {split} images the "
             f"{model_title} gets wrong")
    return plots.png_bytes(fig)


def stage_times(attrs, trained, train_rows, evaluate_seconds, evaluate_images):
    """[{"stage", "seconds", "images"}] from what each stage recorded: extract in the cache's
    attributes (the images it computed), train-head and finetune in their metrics (training
    images x epochs), evaluate here (images x models scored). A stage with no record is left
    out."""
    out = []
    extract = attrs.get("extract_timing")
    if isinstance(extract, dict) and _number(extract.get("seconds")) and \
            _number(extract.get("images")):
        out.append({"stage": "extract", "seconds": float(extract["seconds"]),
                    "images": int(extract["images"])})
    for model, stage in (("logreg", "train-head (logistic regression)"),
                         ("dense", "train-head (dense head)"),
                         ("finetuned", "finetune")):
        record = trained.get(model)
        if record is None or not _number(record.get("seconds")):
            continue
        epochs = record.get("epochs") or 1
        out.append({"stage": stage, "seconds": float(record.get("seconds")),
                    "images": int(train_rows * epochs)})
    out.append({"stage": "evaluate", "seconds": float(evaluate_seconds),
                "images": int(evaluate_images)})
    return out


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
