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

from . import artifacts, backbone, cache, datasets, images, lock, views
from .config import Config, UserError, warn


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
        files = _hash_files(dataset, cache.previous_files(out), engine.sha256_of)
        known = cache.inventory(out, identity_id)
        unreadable = cache.previous_unreadable(out)
        todo = {}  # sha -> one path with that content
        for image_file, sha, _ in files:
            if sha not in known and sha not in unreadable:
                todo.setdefault(sha, image_file.path)
        newly_unreadable = (engine.compute(config, weights, identity, identity_id, todo, known)
                            if todo else {})
        unreadable.update(newly_unreadable)

        rows, skipped = [], list(dataset.skipped)
        for image_file, sha, stat in files:
            if sha in unreadable:
                skipped.append((image_file.path, unreadable[sha]))
                continue
            segment, segment_row, segment_rows = known[sha]
            rows.append(dict(path=image_file.path, label=image_file.label, sha256=sha,
                             split=datasets.assign_split(dataset, image_file, sha, fractions),
                             size=stat.st_size, mtime_ns=stat.st_mtime_ns, segment=segment,
                             segment_row=segment_row, segment_rows=segment_rows))
        _check_every_class_has_an_image(dataset, rows)
        if dataset.layout != "splits":
            _give_every_class_a_training_image(rows)

        # AUGMENT=K: K augmented views of each training image, keyed like images (views.py)
        wanted_views = views.wanted(config, rows, cache.master_attribute(out, "augment"), known)
        new_views = views.compute(config, weights, identity, identity_id, dataset.root,
                                  views.missing(config, wanted_views, known), known)
        keep = {r["sha256"] for r in rows} | {v[0] for v in wanted_views}
        known = cache.compact(out, identity_id, {s: v for s, v in known.items() if s in keep}, keep)
        for r in rows:
            r["segment"], r["segment_row"], r["segment_rows"] = known[r["sha256"]]
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
        new=len(todo) - len(newly_unreadable), reused=sum(r["sha256"] not in todo for r in rows),
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
    """(ImageFile, sha256, stat) for every candidate; unchanged files (same size and mtime as last
    run) reuse their recorded hash, like git's index, so a rerun does not re-read every image.
    `sha256_of(paths)` hashes the others, here or on a cluster."""
    out, stale = [], []
    for image_file in dataset.files:
        full = os.path.join(dataset.root, image_file.path)
        stat = os.stat(full)
        size, mtime_ns, sha = previous.get(image_file.path, (None, None, None))
        if (size, mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            stale.append((len(out), full))
        out.append((image_file, sha, stat))
    for (at, _), sha in zip(stale, sha256_of([full for _, full in stale]), strict=True):
        out[at] = (out[at][0], sha, out[at][2])
    return out


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
    present = {r["label"] for r in rows}
    for label, class_name in enumerate(dataset.class_names):
        if label not in present:
            raise UserError(f"class {class_name!r} has no readable image (see "
                            "skipped.csv): add images that decode, or remove the class")


def _give_every_class_a_training_image(rows):
    """With few images per class, content-hash splits can leave a class with nothing to train on.
    Such a class trains on its image with the smallest hash: still a pure function of content."""
    by_label = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    for members in by_label.values():
        if not any(r["split"] == "train" for r in members):
            min(members, key=lambda r: r["sha256"])["split"] = "train"


def cache_attributes(config, dataset, weights, identity, identity_id, rows, view_rows=()):
    """The attributes of features.h5: the identity, the config, the index digest, versions."""
    # What the index says, including where each row's features live: equal digests mean there is
    # nothing to rewrite, and later stages (make batch) use it to know that nothing changed.
    cached = max((v["view"] for v in view_rows), default=0)
    augment = {"augment": views.attributes(config, cached)} if cached else {}
    index = json.dumps([[r["path"], r["label"], r["sha256"], r["split"], r["segment"],
                         r["segment_row"]] for r in sorted(rows, key=lambda r: r["path"])]
                       + [identity, dataset.class_names]
                       + [[v["key"], v["segment"], v["segment_row"]] for v in view_rows]
                       + list(augment.values()))  # nothing, without views: digests as before
    return {**augment,
        "class_names": dataset.class_names,
        "backbone": identity["backbone"],
        "weights": identity["weights"],
        "image_size": identity["image_size"],
        "preprocess": identity["preprocess"],
        "identity": identity,
        "identity_id": identity_id,
        "index_digest": hashlib.sha256(index.encode()).hexdigest(),
        "weights_spec": weights.spec,
        "weights_path": weights.path,
        "weights_notice": weights.notice,
        "data_root": os.path.abspath(dataset.root),
        "layout": dataset.layout,
        "config": config.to_dict(),
        "versions": backbone.library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
