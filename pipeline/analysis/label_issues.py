"""Label issues: confident learning on out-of-fold probabilities, and identical files that carry
different labels.

Every row's class probabilities come from the one fold model that did not train on it
(StratifiedKFold, `out_of_fold_probabilities`), a logistic regression behind a StandardScaler on
`label_features`: the square-rooted, flattened map, randomly projected to LABEL_DIMENSIONS
numbers (chosen over pooled maps and regional descriptors on the benchmark's choose-part,
docs/audit.md). Then the confident joint (Northcutt et al.,
"Confident learning"): class k's threshold is the mean probability of k over the rows labelled
k; a row labelled i counts as confidently j when p_j reaches j's threshold (the most probable
such j); a row is a candidate when that j is not i. Candidates are ranked by the probability of
their given label, lowest first.

`conflicting_copies`: rows whose file (content hash) is also cached under another label. No
model is needed to know that one of the two labels is wrong; they rank before every candidate.
"""
from dataclasses import dataclass

import numpy as np

from ..model import heads

LOGREG_C = 0.1           # regularisation of the cross-validated logistic regression
GRID = 4                 # cells per side the map is averaged down to, at most
LABEL_DIMENSIONS = 1024  # of the fixed random projection of the flattened map
PROJECTION_SEED = 20240  # fixed: every audit's label model reads the same projection
WEAK_ACCURACY = 0.85     # out-of-fold accuracy under which the candidates are called weak


def label_features(maps):
    """(n, h, w, c) feature maps -> (n, LABEL_DIMENSIONS): what the label model reads. The map
    (averaged down to at most GRID x GRID cells) square-rooted, flattened and multiplied by a
    fixed Gaussian matrix: where things are and what they are, in bounded memory."""
    maps = np.asarray(maps, np.float32)
    h, w, c = maps.shape[1:]
    cells = (min(h, GRID), min(w, GRID))
    if (h, w) != cells:  # average blocks of cells down to the grid
        rows = np.array_split(np.arange(h), cells[0])
        cols = np.array_split(np.arange(w), cells[1])
        maps = np.stack([np.stack([maps[:, r][:, :, k].mean(axis=(1, 2)) for k in cols], axis=1)
                         for r in rows], axis=1)
    flat = np.sqrt(np.maximum(maps, 0)).reshape(len(maps), -1)
    if flat.shape[1] <= LABEL_DIMENSIONS:
        return flat
    return flat @ _projection(flat.shape[1])


def _projection(inputs):
    rng = np.random.default_rng(PROJECTION_SEED)
    return (rng.standard_normal((inputs, LABEL_DIMENSIONS), dtype=np.float32)
            / np.float32(np.sqrt(LABEL_DIMENSIONS)))


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


@dataclass
class LabelIssues:
    rows: np.ndarray          # candidate rows, most suspicious first
    suggested: np.ndarray     # per row: the class it is confidently (its most probable other)
    thresholds: np.ndarray    # per class: mean probability over the rows labelled with it
    joint: np.ndarray         # classes x classes: given label x confident class, counts


def label_issues(probabilities, y):
    """The confident-learning candidates of out-of-fold `probabilities` (n, classes) for given
    labels y (see the module's docstring)."""
    n, classes = probabilities.shape
    thresholds = np.array([probabilities[y == k, k].mean() if (y == k).any() else 1.0
                           for k in range(classes)])
    confident = np.where(probabilities >= thresholds, probabilities, -1.0)
    has_confident = confident.max(axis=1) >= 0
    confident_class = confident.argmax(axis=1)
    joint = np.zeros((classes, classes), np.int64)
    np.add.at(joint, (y[has_confident], confident_class[has_confident]), 1)
    others = probabilities.copy()
    others[np.arange(n), y] = -1.0
    suggested = np.where(has_confident & (confident_class != y), confident_class,
                         others.argmax(axis=1))
    given = probabilities[np.arange(n), y]
    rows = np.flatnonzero(has_confident & (confident_class != y))
    rows = rows[np.lexsort((rows, given[rows]))]
    return LabelIssues(rows, suggested, thresholds, joint)


def conflicting_copies(shas, y):
    """(rows whose content hash is also cached under another label, the other label of each),
    grouped by file."""
    shas = np.asarray(shas)
    order = np.lexsort((y, shas))
    rows, other = [], []
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and shas[order[stop]] == shas[order[start]]:
            stop += 1
        group = order[start:stop]
        labels = y[group]
        if labels.min() != labels.max():
            for r in group:  # suggest the most common other label of the same file
                differing = labels[labels != y[r]]
                rows.append(r)
                other.append(np.bincount(differing).argmax())
        start = stop
    return np.array(rows, np.int64), np.array(other, np.int64)


def merge(conflicts, conflict_suggested, issues):
    """(rows, suggested per row of `rows`): conflicting copies first, then the candidates not
    among them."""
    seen = set(conflicts.tolist())
    rest = np.array([r for r in issues.rows if r not in seen], np.int64)
    rows = np.concatenate([conflicts, rest]).astype(np.int64)
    suggested = np.concatenate([conflict_suggested, issues.suggested[rest]]).astype(np.int64)
    return rows, suggested
