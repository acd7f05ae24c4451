"""The measuring half of bench/audit_bench.py (run that, not this): near-duplicates per edit,
label issues per noise rate, out-of-distribution rates, on one part of the cached feature maps,
for the former measures ("before") and the candidates, the chosen one being pipeline.analysis's.
"""
import time

import numpy as np

from pipeline.analysis import label_issues as li
from pipeline.analysis import near_duplicates as nd
from pipeline.analysis import outliers
from pipeline.config import Config

NOISE = (0.05, 20 / 300, 0.10, 0.20)  # 20 of 300: the issue's end-to-end case
RANKS = (10, 15, 50, 100)


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _root_unit(pooled):
    """The former outlier measure's vectors: square-rooted pooled maps, unit length."""
    return _unit(np.sqrt(np.maximum(pooled, 0)))


# --- near-duplicate candidates: maps (n, h, w, c), train mask -> unit vectors -----------------

def before(maps, train):
    """The former audit's embedding: maps averaged to at most 4 x 4 cells, flattened, a fixed
    Gaussian projection to 512 numbers (seed 20240), centred on the training mean, unit length."""
    maps = np.asarray(maps, np.float32)
    flat = maps.reshape(len(maps), -1)  # 4 x 4 at SIZE=150: no averaging needed
    projection = (np.random.default_rng(20240).standard_normal((flat.shape[1], 512),
                                                                dtype=np.float32)
                  / np.float32(np.sqrt(512)))
    projected = flat @ projection
    return _unit(projected - projected[train].mean(axis=0))


def flat_plain(maps, train):
    return _unit(maps.reshape(len(maps), -1))


def gem_global(maps, train):
    return _unit(nd.gem(maps, nd.GEM_POWER))


def regional(maps, train):
    return _unit(nd.regional_gem(maps))


def shipped(maps, train):
    return nd.Descriptor.fit_on(maps[train]).vectors(maps)


NEAR_DUPLICATE_METHODS = {
    "before: flattened, centred, random projection": before,
    "flattened, uncentred": flat_plain,
    "GeM, global": gem_global,
    "regional GeM (R-MAC regions), no whitening": regional,
    "regional GeM + whitening on train (shipped)": shipped,
}


BEFORE_THRESHOLD = 0.9  # the former DUPLICATE_THRESHOLD, for the former measure


def _threshold_of(name, default):
    return BEFORE_THRESHOLD if name.startswith("before") else default


def near_duplicate_scores(data, part, default):
    """{method: {edit: (precision, recall, recall@10, @50, @100)}}."""
    originals = np.flatnonzero((data["kind"] == "original") & (data["part"] == part))
    train = np.zeros(len(data["kind"]), bool)
    train[originals] = True
    out = {}
    for name, method in NEAR_DUPLICATE_METHODS.items():
        rows = np.flatnonzero((data["kind"] == "original") | (data["kind"] == "copy"))
        rows = rows[data["part"][rows] == part]
        vectors = np.zeros((len(data["kind"]), 1), np.float32)
        fitted = method(data["features"][rows], train[rows])
        vectors = dict(zip(rows, fitted))
        out[name] = {}
        for edit in dict.fromkeys(data["edit"][rows]):
            if not edit:
                continue
            copies = rows[data["edit"][rows] == edit]
            members = np.concatenate([originals, copies])
            v = np.stack([vectors[r] for r in members])
            sim = v @ v.T
            iu = np.triu_indices(len(members), 1)
            s = sim[iu]
            origin = data["origin"][members]
            same = origin[iu[0]] == origin[iu[1]]
            listed = s >= _threshold_of(name, default)
            tp = int((listed & same).sum())
            precision = tp / max(int(listed.sum()), 1) if listed.any() else 1.0
            order = np.argsort(-s, kind="stable")
            at = [int(same[order[:k]].sum()) / int(same.sum()) for k in RANKS]
            out[name][edit] = (precision, tp / int(same.sum()), *at)
    return out


def pooled_false_positives(data, part, threshold, method):
    """Pairs of different originals at or above `threshold`: the false positives every edit's
    precision shares."""
    originals = np.flatnonzero((data["kind"] == "original") & (data["part"] == part))
    v = method(data["features"][originals], np.ones(len(originals), bool))
    s = (v @ v.T)[np.triu_indices(len(originals), 1)]
    return int((s >= threshold).sum()), float(np.sort(s)[-1])


def with_cached_views(data, part, threshold, edits=("mirror", "combined moderate + mirror")):
    """A candidate not shipped: a copy compared with its original's cached AUGMENT views too
    (the best of the plain row and its views), the shipped descriptor. {edit: (recall at
    `threshold`, planted copies whose original is their most similar original)}, and the
    pairs of different originals at or above `threshold` with the views."""
    originals = np.flatnonzero((data["kind"] == "original") & (data["part"] == part))
    at = {int(r): i for i, r in enumerate(data["view_rows"])}
    desc = nd.Descriptor.fit_on(data["features"][originals])
    plain = desc.vectors(data["features"][originals])
    views = np.stack([desc.vectors(data["view_features"][at[int(r)]]) for r in originals])
    index = {int(r): i for i, r in enumerate(originals)}
    out = {}
    for edit in edits:
        copies = np.flatnonzero((data["edit"] == edit) & (data["part"] == part))
        c = desc.vectors(data["features"][copies])
        s = np.maximum(c @ plain.T, np.einsum("cd,nkd->cnk", c, views).max(axis=2))
        own = s[np.arange(len(copies)), [index[int(o)] for o in data["origin"][copies]]]
        out[edit] = (float((own >= threshold).mean()), int(((s > own[:, None]).sum(1) == 0).sum()))
    across = np.einsum("ad,bkd->abk", plain, views).max(axis=2)
    both = np.maximum(plain @ plain.T, np.maximum(across, across.T))
    false = int((both[np.triu_indices(len(originals), 1)] >= threshold).sum())
    return out, false


# --- label issues ------------------------------------------------------------------------------

def _below_mean_rule(p, y):
    """The former rule: a candidate when p(given) < its class's mean and another class is more
    likely; ranked by p(given)."""
    thresholds = np.array([p[y == k, k].mean() for k in range(p.shape[1])])
    given = p[np.arange(len(y)), y]
    others = p.copy()
    others[np.arange(len(y)), y] = -1
    rows = np.flatnonzero((given < thresholds[y]) & (others.max(1) > given))
    return rows[np.argsort(given[rows], kind="stable")]


def _confident_joint_rule(p, y):
    """cleanlab's confident-learning filter: rows off the confident joint's diagonal."""
    thresholds = np.array([p[y == k, k].mean() for k in range(p.shape[1])])
    confident = np.where(p >= thresholds, p, -1.0)
    off = (confident.max(axis=1) >= 0) & (confident.argmax(axis=1) != y)
    rows = np.flatnonzero(off)
    return rows[np.argsort(p[rows, y[rows]], kind="stable")]


FEATURES = {"pooled": lambda maps: maps.mean(axis=(-3, -2)),
            "flattened": lambda maps: maps.reshape(*maps.shape[:-3], -1),
            "regional GeM": nd.regional_gem,
            "square-rooted, flattened": lambda maps: np.sqrt(maps.reshape(*maps.shape[:-3], -1)),
            "mean + spread": lambda maps: np.concatenate([maps.mean(axis=(-3, -2)),
                                                          maps.std(axis=(-3, -2))], axis=-1),
            "square-rooted mean + spread": lambda maps: np.sqrt(np.concatenate(
                [maps.mean(axis=(-3, -2)), maps.std(axis=(-3, -2))], axis=-1)),
            "2 x 2 pooled": li.grid_pooled}
# name -> (features, rule, views: None | "tta" (predict on the views too, averaged) | "train+tta"
# (the fold models also train on their rows' views))
LABEL_METHODS = {
    "before: pooled, below-mean rule": ("pooled", _below_mean_rule, None),
    "after: 2 x 2 pooled, below-mean rule (shipped)": ("2 x 2 pooled", _below_mean_rule, None),
    "pooled, confident joint": ("pooled", _confident_joint_rule, None),
    "flattened, below-mean rule": ("flattened", _below_mean_rule, None),
    "square-rooted, flattened, confident joint": ("square-rooted, flattened",
                                                  _confident_joint_rule, None),
    "pooled, TTA, below-mean rule": ("pooled", _below_mean_rule, "tta"),
    "pooled, TTA, confident joint": ("pooled", _confident_joint_rule, "tta"),
    "pooled, train on views + TTA, below-mean rule": ("pooled", _below_mean_rule, "train+tta"),
    "pooled, train on views + TTA, confident joint": ("pooled", _confident_joint_rule,
                                                      "train+tta"),
    "flattened, TTA, below-mean rule": ("flattened", _below_mean_rule, "tta"),
    "flattened, train on views + TTA, below-mean rule": ("flattened", _below_mean_rule,
                                                         "train+tta"),
    "flattened, train on views + TTA, confident joint": ("flattened", _confident_joint_rule,
                                                         "train+tta"),
    "mean + spread, below-mean rule": ("mean + spread", _below_mean_rule, None),
    "mean + spread, TTA, below-mean rule": ("mean + spread", _below_mean_rule, "tta"),
    "square-rooted mean + spread, below-mean rule": ("square-rooted mean + spread",
                                                     _below_mean_rule, None),
    "2 x 2 pooled, TTA, below-mean rule": ("2 x 2 pooled", _below_mean_rule, "tta"),
}


def out_of_fold_with_views(x, y, views, folds, seed, train_on_views):
    """Test-time augmentation: li.out_of_fold_probabilities's folds, where a held-out row's
    probability is the mean of its fold model's on the row and on each of its cached views
    (views (n, K, c)); with `train_on_views` the fold models also train on their rows' views.
    A row's views never reach a model that predicts that row."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.model import heads
    out = np.zeros((len(x), len(np.unique(y))))
    k = views.shape[1]
    for fit_rows, held_out in StratifiedKFold(folds, shuffle=True,
                                              random_state=seed).split(x, y):
        fit_x, fit_y = x[fit_rows], y[fit_rows]
        if train_on_views:
            fit_x = np.concatenate([fit_x, views[fit_rows].reshape(-1, x.shape[1])])
            fit_y = np.concatenate([fit_y, np.repeat(y[fit_rows], k)])
        model = make_pipeline(StandardScaler(), heads.logistic_regression(li.LOGREG_C, seed))
        model = clone(model).fit(fit_x, fit_y)
        seen = model.predict_proba(views[held_out].reshape(-1, x.shape[1]))
        out[held_out] = (model.predict_proba(x[held_out])
                         + seen.reshape(len(held_out), k, -1).sum(axis=1)) / (k + 1)
    return out


def _views_of_rows(data, rows):
    """(len(rows), K, h, w, c) cached views of `rows` (all originals have them)."""
    at = {int(r): i for i, r in enumerate(data["view_rows"])}
    return data["view_features"][[at[int(r)] for r in rows]]


def label_scores(data, part, folds=5, seed=0, only=None):
    originals = np.flatnonzero((data["kind"] == "original") & (data["part"] == part))
    maps, truth = data["features"][originals], data["label"][originals].astype(np.int64)
    view_maps = _views_of_rows(data, originals)
    methods = {k: v for k, v in LABEL_METHODS.items() if only is None or k in only}
    out = {}
    for rate in NOISE:
        rng = np.random.default_rng(int(rate * 1000) + part)
        flipped = rng.choice(len(truth), int(round(rate * len(truth))), replace=False)
        y = truth.copy()
        y[flipped] = 1 - y[flipped]
        planted = np.zeros(len(y), bool)
        planted[flipped] = True
        probabilities = {}
        for features, _, mode in methods.values():
            if (features, mode) in probabilities:
                continue
            x = FEATURES[features](maps)
            probabilities[features, mode] = (
                li.out_of_fold_probabilities(x, y, folds, seed) if mode is None else
                out_of_fold_with_views(x, y, FEATURES[features](view_maps), folds, seed,
                                       mode == "train+tta"))
        for name, (features, rule, mode) in methods.items():
            p = probabilities[features, mode]
            rows = rule(p, y)
            found = planted[rows]
            top = planted[rows[:2 * len(flipped)]].sum()
            out.setdefault(name, {})[rate] = (
                len(flipped), len(rows), found.sum() / max(len(rows), 1),
                found.sum() / len(flipped), int(top), int(planted[rows[:100]].sum()),
                float((p.argmax(1) == y).mean()))
    return out


# --- out of distribution ----------------------------------------------------------------------

def _split_training(data):
    """400 training and 100 calibration originals (both parts), balanced, seeded."""
    originals = np.flatnonzero(data["kind"] == "original")
    rng = np.random.default_rng(5)
    train, calibration = [], []
    for label in (0, 1):
        mine = rng.permutation(originals[data["label"][originals] == label])
        train += list(mine[:200])
        calibration += list(mine[200:250])
    return np.array(train), np.array(calibration)


def ood_scores(data, part, percentile=99):
    train, calibration = _split_training(data)
    maps = data["features"]
    y = data["label"][train].astype(np.int64)
    new = np.flatnonzero((data["part"] == part) & (data["origin"] < 0))
    kinds = list(dict.fromkeys(data["kind"][new]))
    pooled = maps.mean(axis=(1, 2))
    out = {}

    def rates(distance_of):
        threshold = np.percentile(distance_of(calibration), percentile)
        d = distance_of(new)
        return {k: float((d[data["kind"][new] == k] > threshold).mean()) for k in kinds}

    centroids = _unit(np.stack([_root_unit(pooled[train][y == k]).mean(0)
                                for k in (0, 1)]))
    out["before: nearest class centroid, square-rooted pooled"] = rates(
        lambda r: 1 - (_root_unit(pooled[r]) @ centroids.T).max(axis=1))
    reference = _root_unit(pooled[train])

    def knn(vectors_of, ref, k):
        return lambda r: 1 - np.sort(vectors_of(r) @ ref.T, axis=1)[:, -k]
    for k in (1, 5, 10):
        out[f"kNN k={k}, square-rooted pooled"] = rates(
            knn(lambda r: _root_unit(pooled[r]), reference, k))
    mean = pooled[train].mean(0)
    centred = pooled[train] - mean
    cov = centred.T @ centred / len(train)
    cov += np.eye(len(cov)) * np.trace(cov) / len(cov)
    inverse = np.linalg.inv(cov)
    out["Mahalanobis, pooled, shrunk covariance"] = rates(
        lambda r: np.einsum("ij,jk,ik->i", pooled[r] - mean, inverse, pooled[r] - mean))
    gem = _unit(np.sqrt(nd.gem(maps)))
    out["kNN k=5, square-rooted GeM"] = rates(knn(lambda r: gem[r], gem[train], 5))
    desc = nd.Descriptor.fit_on(maps[train])
    whitened = desc.vectors(maps)
    out["kNN k=5, whitened regional GeM"] = rates(knn(lambda r: whitened[r], whitened[train], 5))
    before_measure = _mahalanobis(np.sqrt(np.maximum(pooled, 0)), train)
    out["before: Mahalanobis, square-rooted pooled (mean only)"] = rates(
        lambda r: before_measure[r])
    out.update(_layer_candidates(data, train, calibration, rates))
    pooled, spread = outliers.summaries(maps)
    model = outliers.fit((pooled[train], spread[train]), y,
                         (pooled[calibration], spread[calibration]), percentile, "validation")
    out["after: shipped (outliers.py)"] = rates(lambda r: model.distance_of(pooled[r],
                                                                            spread[r])[0])
    return out, kinds


def _mahalanobis(x, train, shrink=outliers.SHRINK):
    """Distances of every row of x to x[train]'s mean under their shrunk covariance."""
    x = np.asarray(x, np.float64)
    mean = x[train].mean(0)
    centred = x[train] - mean
    cov = centred.T @ centred / len(train)
    cov += np.eye(len(cov)) * shrink * np.trace(cov) / len(cov)
    d = x - mean
    return np.sqrt(np.maximum(((d @ np.linalg.inv(cov)) * d).sum(1), 0))


def _layer_candidates(data, train, calibration, rates):
    """Out-of-distribution candidates that use the cut's activations (block4_pool) beside the
    top's, and second-order statistics of the maps."""
    top = data["features"].astype(np.float32)
    cut = data["cut"].astype(np.float32)
    def root(x):
        return np.sqrt(np.maximum(x, 0))
    top_mean, cut_mean = root(top.mean(axis=(1, 2))), root(cut.mean(axis=(1, 2)))
    top_std, cut_std = root(top.std(axis=(1, 2))), root(cut.std(axis=(1, 2)))
    d_top, d_cut = _mahalanobis(top_mean, train), _mahalanobis(cut_mean, train)
    out = {"cut only (square-rooted pooled block4_pool)": rates(lambda r: d_cut[r]),
           "top, mean + spatial std": rates(
               lambda r: _mahalanobis(np.hstack([top_mean, top_std]), train)[r]),
           "cut, mean + spatial std": rates(
               lambda r: _mahalanobis(np.hstack([cut_mean, cut_std]), train)[r]),
           "top and cut concatenated": rates(
               lambda r: _mahalanobis(np.hstack([top_mean, cut_mean]), train)[r])}
    for shrink in (1.0, 3.0):
        d = _mahalanobis(cut_mean, train, shrink)
        out[f"cut only, shrunk x{shrink:g}"] = rates(lambda r, d=d: d[r])
    # Lee et al. combine layers' scores; without out-of-distribution data to weigh them, each
    # layer's distance is standardised by the training rows' distances
    def standard(d):
        return (d - d[train].mean()) / d[train].std()
    for name, (a, b) in {"top and cut": (d_top, d_cut)}.items():
        summed = standard(a) + standard(b)
        out[f"{name}: sum of standardised distances"] = rates(lambda r, s=summed: s[r])
        most = np.maximum(standard(a), standard(b))
        out[f"{name}: max of standardised distances"] = rates(lambda r, m=most: m[r])
    return out


def score(path, part, what=("duplicates", "labels", "ood")):
    start = time.perf_counter()
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    label = "choose" if part == 0 else "report"
    print(f"part: {label} ({(data['kind'][data['part'] == part] == 'original').sum()} originals)")
    if "duplicates" in what:
        _print_duplicates(data, part)
    if "labels" in what:
        for name, rates in label_scores(data, part).items():
            print(f"\nlabel issues, {name}: planted, candidates, precision, recall, "
                  "in top 2 x planted, in top 100, out-of-fold accuracy")
            for rate, v in rates.items():
                print(f"  {rate:5.1%}: {v[0]:3d} {v[1]:4d} {v[2]:5.2f} {v[3]:5.2f} {v[4]:3d} "
                      f"{v[5]:3d} {v[6]:5.3f}")
    if "ood" in what:
        ood, kinds = ood_scores(data, part)
        print("\nout of distribution, share flagged: " + " | ".join(kinds))
        for name, rates in ood.items():
            print(f"  {name:52s} " + " ".join(f"{rates[k]:6.3f}" for k in kinds))
    print(f"\n{time.perf_counter() - start:.0f} s")


def _print_duplicates(data, part):
    threshold = Config.__dataclass_fields__["duplicate_threshold"].default
    scores = near_duplicate_scores(data, part, threshold)
    for name, edits in scores.items():
        print(f"\nnear-duplicates, {name}, at {_threshold_of(name, threshold):g}: precision "
              "recall r@10 r@15 r@50 r@100")
        for edit, values in edits.items():
            print(f"  {edit:28s} " + " ".join(f"{v:5.2f}" for v in values))
    for name in ("before: flattened, centred, random projection",
                 "regional GeM + whitening on train (shipped)"):
        originals = data["kind"] == "original"
        sims = []
        for t in (0.5, 0.6, 0.7, 0.8, 0.9):
            sims.append((t, pooled_false_positives(data, part, t, NEAR_DUPLICATE_METHODS[name])))
        print(f"  {name}: false pairs among originals at " +
              ", ".join(f"{t}: {fp}" for t, (fp, _) in sims) + f" (highest {sims[0][1][1]:.3f}; "
              f"{int((originals & (data['part'] == part)).sum())} originals)")
    found, false = with_cached_views(data, part, threshold)
    print(f"\nnot shipped: a copy against its original's cached views too, at {threshold:g}: "
          + ", ".join(f"{edit}: recall {r:.2f}, {first} of 10 nearest their original"
                      for edit, (r, first) in found.items())
          + f"; pairs of different originals at or above: {false}")
