"""Label issues: confident learning on out-of-fold probabilities, and identical files that carry
different labels.

Every row's class probabilities come from the one fold model that did not train on it
(StratifiedKFold, `out_of_fold_probabilities`), a logistic regression behind a StandardScaler on
each map's means over 2 x 2 regions (`grid_pooled`): some of the layout that a global mean
loses, in 4 x channels numbers where the flattened map has h x w x channels (docs/audit.md
compares them, and test-time augmentation with the cached views, on the benchmark's
choose-part). Then confident learning (Northcutt et al.): class k's threshold is the
mean probability of k over the rows labelled k. A row is a candidate when the probability of its
given label is below its class's threshold and another class is more likely; candidates are
ranked by that probability, lowest first. The confident joint (given label x the most probable
class whose threshold the row reaches) counts how many rows of each class look confidently like
each other one: its off-diagonal estimates the label errors, and is reported. Filtering the
candidates by it (cleanlab's default) found no more planted errors on the benchmark's
choose-part and fewer in all, so it only informs.

`conflicting_copies`: rows whose file (content hash) is also cached under another label. No
model is needed to know that one of the two labels is wrong; they rank before every candidate.
"""
from dataclasses import dataclass

import numpy as np

from ..model import heads

LOGREG_C = 0.1           # regularisation of the cross-validated logistic regression
GRID = 2                 # the model reads each map's mean over GRID x GRID regions
WEAK_ACCURACY = 0.85     # out-of-fold accuracy under which the candidates are called weak


def grid_pooled(maps, cells=GRID):
    """Feature maps (..., h, w, c) -> (..., cells x cells x c): the mean of each of cells x
    cells regions, row by row; a side that does not divide shares its middle cell between two
    regions, and a side of one cell gives every region that cell."""
    maps = np.asarray(maps, np.float32)
    h, w = maps.shape[-3:-1]

    def spans(side):
        return [((k * side) // cells, -(-(k + 1) * side // cells)) for k in range(cells)]
    return np.concatenate([maps[..., r0:r1, c0:c1, :].mean(axis=(-3, -2))
                           for r0, r1 in spans(h) for c0, c1 in spans(w)], axis=-1)


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
    suggested: np.ndarray     # per row: its most probable class other than the given one
    thresholds: np.ndarray    # per class: mean probability over the rows labelled with it
    joint: np.ndarray         # classes x classes: given label x confident class, counts


def label_issues(probabilities, y):
    """The candidates of out-of-fold `probabilities` (n, classes) for given labels y, and the
    confident joint (see the module's docstring)."""
    n, classes = probabilities.shape
    thresholds = np.array([probabilities[y == k, k].mean() if (y == k).any() else 1.0
                           for k in range(classes)])
    confident = np.where(probabilities >= thresholds, probabilities, -1.0)
    has_confident = confident.max(axis=1) >= 0
    joint = np.zeros((classes, classes), np.int64)
    np.add.at(joint, (y[has_confident], confident.argmax(axis=1)[has_confident]), 1)
    given = probabilities[np.arange(n), y]
    others = probabilities.copy()
    others[np.arange(n), y] = -1.0
    suggested = others.argmax(axis=1)
    rows = np.flatnonzero((given < thresholds[y]) & (others[np.arange(n), suggested] > given))
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
