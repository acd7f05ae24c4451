"""Where a FeatureStore's rows and views are in a master: views by content, and rows by path in
a master that another extract put in place of the one the store opened.

Views belong to a content (sha256), not to a row: every training row of one content reads the
same views (`view_table`). An extract that only compacted the cache (merged small segments into
one, deleted the old ones) writes a master holding the same rows in another order; a reader that
opened the old one can read on through the new one once each of its rows is found there, by its
path, with the same content, label and split (`row_map`).
"""
import numpy as np


def view_table(index, layer, train, train_shas, views, rows):
    """(rows, views + 1) positions in `<layer>view_features` of master `index` (read_index's
    dict): for each training row (`train`, of content `train_shas`, S64) and view 1..views,
    the entry of its content and that view; -1 elsewhere (view 0, other splits, none cached)."""
    table = np.full((rows, views + 1), -1, np.int64)
    keys = np.asarray(index[f"{layer}view_sha256"], "S64")
    numbers = np.asarray(index[f"{layer}view_index"])
    for view in range(1, views + 1):
        table[train, view] = _positions(keys, numbers == view, train_shas)
    return table


def _positions(keys, chosen, wanted):
    """For each of `wanted`, the position in `keys` of an entry marked `chosen` with that key,
    -1 where there is none."""
    positions = np.flatnonzero(chosen)
    order = np.argsort(keys[positions], kind="stable")
    ordered = keys[positions][order]
    if not len(ordered):
        return np.full(len(wanted), -1, np.int64)
    at = np.minimum(np.searchsorted(ordered, wanted), len(ordered) - 1)
    return np.where(ordered[at] == wanted, positions[order][at], -1)


def row_map(ours, theirs):
    """For each of our rows, its row in the other master, when that master holds exactly our
    rows (the same paths, each with the same sha256, label and split), else None. `ours` and
    `theirs`: {"path", "sha256", "label", "split"} columns."""
    if len(ours["path"]) != len(theirs["path"]):
        return None
    mine = np.argsort(np.asarray(ours["path"], dtype=object), kind="stable")
    other = np.argsort(np.asarray(theirs["path"], dtype=object), kind="stable")
    mapping = np.empty(len(mine), np.int64)
    mapping[mine] = other
    for name in ("path", "sha256", "label", "split"):
        if not np.array_equal(np.asarray(ours[name])[mine].astype(object),
                              np.asarray(theirs[name])[other].astype(object)):
            return None
    return mapping
