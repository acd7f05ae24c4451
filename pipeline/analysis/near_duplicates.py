"""Near-duplicates: a descriptor of each feature map that a copy keeps, and a tiled pair search.

The descriptor (`Descriptor`) is regional generalised-mean pooling, R-MAC style: the map's whole
area and four overlapping windows (each 3/4 of a side, in the corners) are each GeM-pooled
(power GEM_POWER, between average and max pooling) and L2-normalised, and the five are summed.
A crop, a resize or a small rotation moves things across the map's few cells; pooled regions
barely notice, where a flattened map changes cell by cell. The sum is then whitened: centred on
the training rows' mean and scaled along their principal axes by 1 / sqrt(variance + the mean
variance), a shrunk whitening that a few hundred training rows can estimate, so the directions
in which every photo differs from every other weigh less than the rare ones a copy shares with
its original. Unit length last: the dot product of two descriptors is their similarity, 1 for
the same picture.

`pairs` finds every pair at or above a threshold from block x block tiles of the similarity
matrix (memory ~ block^2 + the pairs kept, never n^2). Pairs within one group (rows of the same
file, by content hash) are set aside before the MAX_PAIRS most similar are kept, so a thousand
copies of one file never push real pairs out.
"""
from dataclasses import dataclass

import numpy as np

GEM_POWER = 3.0
WINDOW = 0.75            # side of the corner windows, as a share of the map's side
BLOCK = 2048             # rows per tile side: 2048 x 2048 float32 = 16 MB a tile
MAX_PAIRS = 100_000      # pairs kept at most, the most similar


def gem(maps, power=GEM_POWER):
    """Generalised-mean pooling of (n, h, w, c) maps over h and w -> (n, c)."""
    clipped = np.maximum(np.asarray(maps, np.float32), 0)
    return np.mean(clipped ** power, axis=(1, 2)) ** (1.0 / power)


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def regional_gem(maps):
    """(n, h, w, c) -> (n, c): the sum of the L2-normalised GeM of the whole map and of its four
    corner windows (the whole map alone when it is one cell). The power is taken once and each
    region averages it."""
    powered = np.maximum(np.asarray(maps, np.float32), 0) ** np.float32(GEM_POWER)
    h, w = powered.shape[1:3]

    def region(top, left, rows, cols):
        mean = powered[:, top:top + rows, left:left + cols].mean(axis=(1, 2))
        return _unit(mean ** np.float32(1.0 / GEM_POWER))
    total = region(0, 0, h, w)
    if h > 1 or w > 1:
        wh, ww = max(1, round(WINDOW * h)), max(1, round(WINDOW * w))
        for top in (0, h - wh):
            for left in (0, w - ww):
                total = total + region(top, left, wh, ww)
    return total


@dataclass
class Descriptor:
    """regional_gem descriptors -> unit vectors whose dot product is the near-duplicate
    similarity. `mean` and `whitening` (channels x channels) come from the training rows."""
    mean: np.ndarray
    whitening: np.ndarray

    @classmethod
    def fit(cls, descriptors, block=4096):
        """Learn the centring and the shrunk whitening from the training rows' descriptors."""
        total, outer = 0.0, 0.0
        for start in range(0, len(descriptors), block):
            d = np.asarray(descriptors[start:start + block], np.float64)
            total, outer = total + d.sum(0), outer + d.T @ d
        n = len(descriptors)
        mean = total / n
        covariance = outer / n - np.outer(mean, mean)
        variance, axes = np.linalg.eigh(covariance)
        variance = np.maximum(variance, 0)
        scale = 1.0 / np.sqrt(variance + max(variance.mean(), 1e-12))
        return cls(mean.astype(np.float32), (axes * scale).astype(np.float32))

    @classmethod
    def fit_on(cls, maps):
        """From the training rows' feature maps (n, h, w, c)."""
        return cls.fit(regional_gem(maps))

    def apply(self, descriptors, block=4096):
        """(n, c) descriptors -> (n, c) unit vectors, a block at a time."""
        out = np.empty((len(descriptors), self.whitening.shape[1]), np.float32)
        for start in range(0, len(descriptors), block):
            d = np.asarray(descriptors[start:start + block], np.float32)
            out[start:start + len(d)] = _unit((d - self.mean) @ self.whitening)
        return out

    def vectors(self, maps):
        """(n, h, w, c) maps -> (n, c) unit vectors."""
        return self.apply(regional_gem(maps))


def pairs(vectors, threshold, groups=None, block=BLOCK, max_pairs=None):
    """((i, j, similarity) of the pairs i < j with vectors[i] . vectors[j] >= threshold and
    groups[i] != groups[j], most similar first, at most max_pairs; the number of pairs at or
    above the threshold within a group, left out). From block x block tiles: memory ~ block^2
    + the pairs kept. max_pairs=None: MAX_PAIRS."""
    max_pairs = MAX_PAIRS if max_pairs is None else max_pairs
    n = len(vectors)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    found, kept, same = [], 0, 0
    for a in range(0, n, block):
        for b in range(a, n, block):
            tile = vectors[a:a + block] @ vectors[b:b + block].T
            if a == b:  # each pair once, no image with itself
                tile = np.where(np.triu(np.ones(tile.shape, bool), k=1), tile, -np.inf)
            i, j = np.nonzero(tile >= threshold)
            if not len(i):
                continue
            within = groups[i + a] == groups[j + b]
            same += int(within.sum())
            i, j = i[~within], j[~within]
            found.append((i + a, j + b, tile[i, j]))
            kept += len(i)
            if kept > 2 * max_pairs:  # prune now and then: memory stays ~ max_pairs
                found = [_top(*(np.concatenate(x) for x in zip(*found)), max_pairs)]
                kept = len(found[0][0])
    if not kept:
        empty = np.zeros(0, np.int64)
        return (empty, empty, np.zeros(0, np.float32)), same
    i, j, s = _top(*(np.concatenate(x) for x in zip(*found)), max_pairs)
    order = np.lexsort((j, i, -s))  # most similar first, ties in row order
    return (i[order], j[order], s[order]), same


def _top(i, j, s, count):
    """The `count` entries of largest similarity s."""
    if len(s) > count:
        keep = np.argpartition(-s, count - 1)[:count]
        i, j, s = i[keep], j[keep], s[keep]
    return i, j, s
