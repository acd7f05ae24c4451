"""Stage one: every image once through the frozen VGG16 base, its feature map cached by content.

    python -m pipeline extract --data DIR [--name NAME] [--weights imagenet|none|FILE] [--size 150]

Only images whose content (sha256) is not yet cached under the current identity are computed.
"""
import contextlib
import hashlib
import json
import os
import time
import types
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from . import artifacts, backbone, cache, datasets, images, index, lock, views
from .config import Config, UserError, warn

HASH_AT_ONCE = 65536  # files handed to the engine's sha256_of at a time


@dataclass
class ExtractResult:
    features_path: str
    rows: int
    new: int            # images that went through the backbone in this run
    reused: int         # rows whose features were already cached
    skipped: int        # files listed in skipped.csv
    seconds: float
    identity: dict
    changed: bool       # False when features.h5 was already up to date
    views: int = 0      # augmented views of training images in the cache (AUGMENT)
    new_views: int = 0  # views that went through the backbone in this run


def run(config: Config) -> ExtractResult:
    with _engine(config) as engine:  # a Ray cluster this run started stops here, also on failure
        return _run(config, engine)


@contextlib.contextmanager
def _engine(config):
    """Where PRECISION=auto is decided, files are hashed and features computed: this process
    (ENGINE=local), or a Ray cluster (ENGINE=ray, pipeline/engine_ray.py)."""
    if config.engine == "ray":
        from . import engine_ray  # Ray is an optional dependency: imported only when asked for
        with engine_ray.RayEngine(config) as engine:
            yield engine
    else:
        yield types.SimpleNamespace(resolve_precision=backbone.resolve_precision,
                                    sha256_of=_sha256_here, compute=_compute)


def _sha256_here(paths):
    return [artifacts.file_sha256(path) for path in tqdm(
        paths, desc="hashing", unit="file", leave=False, disable=len(paths) < 2000)]


def _run(config, engine):
    start = time.perf_counter()
    dataset = datasets.discover(config.data, config.labels, config.label_columns)
    fractions = config.split_fractions
    weights = backbone.resolve_weights(config.weights)
    precision = engine.resolve_precision(config.precision)
    storage = backbone.resolve_storage(config.storage)
    identity = backbone.feature_identity(weights, config.size, precision, storage)
    identity_id = backbone.identity_id(identity)
    out = config.features_dir

    with lock.exclusive(out, "extract"):
        cache.remove_strays(out)  # left by a killed run: no other run writes them now
        shas, sizes, mtimes = _hash_files(dataset, cache.previous_files(out), engine.sha256_of)
        known = cache.inventory(out, identity_id)
        unreadable = cache.previous_unreadable(out)
        todo = {}  # sha -> one path with that content
        for at in np.flatnonzero(known.find(shas) < 0).tolist():
            sha = shas[at].decode()
            if sha not in unreadable:
                todo.setdefault(sha, dataset.files[at].path)
        newly_unreadable = (engine.compute(config, weights, identity, identity_id, todo, known)
                            if todo else {})
        unreadable.update(newly_unreadable)

        skipped = list(dataset.skipped)
        good = np.ones(len(shas), bool)
        if unreadable:
            bad = index.as_keys(list(unreadable))
            good = ~np.isin(shas, bad)
            skipped += [(dataset.files[at].path, unreadable[shas[at].decode()])
                        for at in np.flatnonzero(~good).tolist()]
        rows = _rows(dataset, fractions, shas, sizes, mtimes, good)
        del shas, sizes, mtimes
        _check_every_class_has_an_image(dataset, rows)
        if dataset.layout != "splits":
            _give_every_class_a_training_image(rows)

        # AUGMENT=K: K augmented views of each training image, keyed like images (views.py)
        wanted_views = views.wanted(config, rows, cache.master_attribute(out, "augment"), known)
        new_views = views.compute(config, weights, identity, identity_id, dataset.root,
                                  views.missing(config, wanted_views, known), known)
        keep = rows.sha256 if not wanted_views else np.concatenate(
            [rows.sha256, index.as_keys([v[0] for v in wanted_views])])
        known = cache.compact(out, identity_id, known.only(keep))
        _place(rows, known)
        view_rows = views.records(wanted_views, known)
        attrs = cache_attributes(config, dataset, weights, identity, identity_id, rows, view_rows)
        changed = attrs["index_digest"] != cache.master_attribute(out, "index_digest")
        if changed:
            referenced = cache.write_master(out, rows, attrs, backbone.feature_shape(config.size),
                                            backbone.storage_dtype(identity), unreadable,
                                            view_rows)
            cache.remove_unreferenced(out, identity_id, set(referenced))
        datasets.write_skipped_csv(os.path.join(out, "skipped.csv"), skipped)

    result = ExtractResult(
        features_path=os.path.join(out, cache.MASTER), rows=len(rows),
        new=len(todo) - len(newly_unreadable),
        reused=len(rows) - int(np.isin(rows.sha256, index.as_keys(list(todo))).sum()),
        skipped=len(skipped), seconds=time.perf_counter() - start, identity=identity,
        changed=changed, views=sum(v["view"] <= config.augment for v in view_rows),
        new_views=new_views)
    augmented = (f", {result.views} augmented views ({new_views} new)" if config.augment
                 else "")
    print(f"extract {config.dataset_name}: {result.rows} rows, {result.new} new, {result.reused} "
          f"reused, {result.skipped} skipped (see {out}/skipped.csv){augmented}, "
          f"{result.seconds:.1f} s")
    if weights.notice:
        warn(weights.notice)
    return result


def _hash_files(dataset, previous, sha256_of):
    """(sha256, size, mtime_ns) of every candidate, as columns (sha256: index.KEY) in the order
    of dataset.files; unchanged files (same size and mtime as last run) reuse their recorded
    hash, like git's index, so a rerun does not re-read every image. `sha256_of(paths)` hashes
    the others, here or on a cluster."""
    n = len(dataset.files)
    shas, sizes, mtimes = np.zeros(n, index.KEY), np.zeros(n, np.int64), np.zeros(n, np.int64)
    for at, image_file in enumerate(dataset.files):
        stat = os.stat(os.path.join(dataset.root, image_file.path))
        sizes[at], mtimes[at] = stat.st_size, stat.st_mtime_ns
    was = previous.find([f.path for f in dataset.files])
    same = (was >= 0) & (previous.sizes[np.maximum(was, 0)] == sizes) & (
        previous.mtimes[np.maximum(was, 0)] == mtimes) if len(previous) else np.zeros(n, bool)
    shas[same] = previous.shas[was[same]]
    stale = np.flatnonzero(~same)
    for first in range(0, len(stale), HASH_AT_ONCE):  # a list of full paths and one of hashes
        part = stale[first:first + HASH_AT_ONCE]       # is ~200 MB at a million files
        hashed = sha256_of([os.path.join(dataset.root, dataset.files[at].path)
                            for at in part.tolist()])
        if len(hashed) != len(part):
            raise ValueError(f"{len(hashed)} hashes for {len(part)} files")
        shas[part] = index.as_keys(hashed)
    return shas, sizes, mtimes


def _rows(dataset, fractions, shas, sizes, mtimes, good):
    """The master's rows (index.Rows) of the files marked `good`, their places to be filled in
    by `_place`."""
    at = np.flatnonzero(good)
    paths = np.empty(len(at), dtype=object)
    paths[:] = [dataset.files[i].path for i in at.tolist()]
    splits = np.array([datasets.assign_split(dataset, dataset.files[i], shas[i].decode(),
                                             fractions).encode() for i in at.tolist()], "S")
    n = len(at)
    return index.Rows([], np.zeros(n, np.int32), path=paths,
                      label=np.array([dataset.files[i].label for i in at.tolist()], np.int64),
                      sha256=shas[at], split=splits, size=sizes[at], mtime_ns=mtimes[at],
                      segment_row=np.zeros(n, np.int64), segment_rows=np.zeros(n, np.int64))


def _place(rows, known):
    """Where each row's features are, from the (compacted) index."""
    at = known.find(rows.sha256)
    if (at < 0).any():
        raise KeyError(rows.sha256[at < 0][0].decode())
    rows.segments = list(known.segments)
    rows.segment = known.segment[at]
    rows.segment_row = known.row[at].astype(np.int64)
    rows.segment_rows = known.rows_of_segments()[rows.segment]


def _compute(config, weights, identity, identity_id, todo, known):
    """Run the new images through the backbone, one atomic segment per batch. Updates `known`
    in place and returns {sha: reason} for the files that could not be decoded."""
    base = backbone.build_backbone(weights, config.size, identity["precision"])
    features_of = backbone.feature_function(base)
    dtype = backbone.storage_dtype(identity)
    shas = list(todo)
    paths = [os.path.join(config.data, todo[sha]) for sha in shas]
    unreadable = {}
    # closed also on an error, so that the error line does not land on the bar's line
    with tqdm(total=len(shas), desc=f"extract {config.dataset_name}", unit="img",
              smoothing=0.1) as progress:
        # The dataset leads the zip, so its iterator runs to its natural end (no pending work
        # to cancel when the loop stops).
        batches = images.image_batches(paths, config.size, config.batch_size)
        for (batch, reasons), first in zip(batches, range(0, len(shas), config.batch_size)):
            ok = np.array([not r for r in reasons])
            batch_shas = shas[first:first + len(reasons)]
            unreadable.update({s: r for s, r in zip(batch_shas, reasons) if r})
            if ok.any():
                features = features_of(batch[ok]).astype(dtype, copy=False)
                check_finite(features, paths[first], len(reasons))
                good = [s for s, k in zip(batch_shas, ok) if k]
                segment = cache.write_segment(config.features_dir, identity_id, good, features)
                known.update({s: (segment, row, len(good)) for row, s in enumerate(good)})
            progress.update(len(reasons))
    return unreadable


def check_finite(features, first_path, batch_images):
    """Refuse features out of the storage dtype's range: a cache must never hold inf or NaN."""
    if not np.isfinite(features).all():
        raise UserError(f"features of {first_path} (batch of {batch_images}) are not finite"
                        f"{' in float16' * (features.dtype == np.float16)}: the WEIGHTS give "
                        "values out of range; use STORAGE=float32 and PRECISION=float32")


def _check_every_class_has_an_image(dataset, rows):
    present = set(np.unique(rows.label).tolist())
    for label, class_name in enumerate(dataset.class_names):
        if label not in present:
            raise UserError(f"class {class_name!r} has no readable image (see "
                            "skipped.csv): add images that decode, or remove the class")


def _give_every_class_a_training_image(rows):
    """With few images per class, content-hash splits can leave a class with nothing to train on.
    Such a class trains on its image with the smallest hash: still a pure function of content."""
    for label in np.unique(rows.label).tolist():
        members = np.flatnonzero(rows.label == label)
        if not (rows.split[members] == b"train").any():
            smallest = members[np.argmin(rows.sha256[members])]
            if len(b"train") > rows.split.dtype.itemsize:
                rows.split = rows.split.astype("S5")
            rows.split[smallest] = b"train"
    rows.split = np.array(rows.split.tolist(), "S")  # as wide as its longest split, as before


def cache_attributes(config, dataset, weights, identity, identity_id, rows, view_rows=()):
    """The attributes of features.h5: the identity, the config, the index digest, versions."""
    # What the index says, including where each row's features live: equal digests mean there is
    # nothing to rewrite, and later stages (make batch) use it to know that nothing changed.
    cached = max((v["view"] for v in view_rows), default=0)
    augment = {"augment": views.attributes(config, cached)} if cached else {}
    digest = _index_digest(index.Rows.of(rows), [identity, dataset.class_names]
                           + [[v["key"], v["segment"], v["segment_row"]] for v in view_rows]
                           + list(augment.values()))  # nothing, without views: as before
    return {**augment,
        "class_names": dataset.class_names,
        "backbone": identity["backbone"],
        "weights": identity["weights"],
        "image_size": identity["image_size"],
        "preprocess": identity["preprocess"],
        "identity": identity,
        "identity_id": identity_id,
        "index_digest": digest,
        "weights_spec": weights.spec,
        "weights_path": weights.path,
        "weights_notice": weights.notice,
        "data_root": os.path.abspath(dataset.root),
        "layout": dataset.layout,
        "config": config.to_dict(),
        "versions": backbone.library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _index_digest(rows, more):
    """sha256 of the JSON list [[path, label, sha256, split, segment, segment_row] of each row
    by path] + `more`, fed to the hash one item at a time: the same digest as json.dumps of the
    whole list, without that list (hundreds of MB at a million rows)."""
    digest, first = hashlib.sha256(b"["), True
    names = rows.segments
    for at in np.argsort(rows.path, kind="stable").tolist():
        item = [rows.path[at], int(rows.label[at]), rows.sha256[at].decode(),
                rows.split[at].decode(), names[rows.segment[at]], int(rows.segment_row[at])]
        digest.update((("" if first else ", ") + json.dumps(item)).encode())
        first = False
    for item in more:
        digest.update((("" if first else ", ") + json.dumps(item)).encode())
        first = False
    digest.update(b"]")
    return digest.hexdigest()
