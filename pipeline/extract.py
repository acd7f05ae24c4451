"""Stage one: every image once through the frozen base (BACKBONE), its feature map cached by
content.

    python -m pipeline extract --data DIR [--name NAME] [--backbone vgg16] [--weights imagenet|
                               none|FILE] [--size 150] [--feature-layer STAGE]

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

from . import cache
from .cache import index, settings, views
from .config import Config, UserError, warn
from .data import backbones, datasets
from .engines import featurize
from .engines.featurize import CUT, FEATURES
from .fs import artifacts
from .model import backbone

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
    cut: str = ""       # the layer whose activations are cached for fine-tuning, if any


def run(config: Config) -> ExtractResult:
    """Cache the features of DATA, holding features/<NAME>'s lock; a setting not told keeps the
    value the cache recorded (cache.settings)."""
    return settings.run(config, "extract", _run_on_engine, config.features_dir)


def _run_on_engine(config):
    with _engine(config) as engine:  # a Ray cluster this run started stops here, also on failure
        return _run(config, engine)


@contextlib.contextmanager
def _engine(config):
    """Where PRECISION=auto is decided, files are hashed and features computed: this process
    (ENGINE=local), or a Ray cluster (ENGINE=ray, pipeline/engines/ray_engine.py)."""
    if config.engine == "ray":
        from .engines import (
            ray_engine,  # Ray is an optional dependency: imported only when asked for
        )
        with ray_engine.RayEngine(config) as engine:
            yield engine
    else:
        yield types.SimpleNamespace(resolve_precision=backbone.resolve_precision,
                                    sha256_of=_sha256_here, compute=_compute_here)


def _compute_here(config, weights, identity, targets, jobs, known):
    featurizer = featurize.Featurizer(weights, identity, targets, config.seed, config.batch_size)
    return featurize.compute_here(featurizer, jobs, config.features_dir, known,
                                  f"extract {config.dataset_name}")


def _sha256_here(paths):
    return [artifacts.file_sha256(path) for path in tqdm(
        paths, desc="hashing", unit="file", leave=False, disable=len(paths) < 2000)]


def _run(config, engine):
    start = time.perf_counter()
    dataset = datasets.discover(config.data, config.labels, config.label_columns)
    entry = backbones.get(config.backbone)
    weights = backbone.resolve_weights(config.weights, entry)
    precision = engine.resolve_precision(config.precision, entry)
    storage = backbone.resolve_storage(config.storage)
    identity = backbone.identity_of(weights, config.size, precision, storage, entry,
                                    config.feature_layer)
    targets, cut = cached_layers(config, identity)
    out = config.features_dir

    cache.remove_strays(out)  # left by a killed run: no other run writes them now
    shas, sizes, mtimes = _hash_files(dataset, cache.previous_files(out), engine.sha256_of)
    # rows of another shape or dtype than the identity's are damage, computed again
    known = {t.role: cache.inventory(out, t.identity_id, t.shape, t.dtype) for t in targets}
    unreadable = cache.previous_unreadable(out)
    rows, wanted_views, computed = _compute_missing(
        config, engine, dataset, (shas, sizes, mtimes), unreadable, weights, identity,
        targets, known)
    skipped = list(dataset.skipped)
    if unreadable:
        bad = np.isin(shas, index.as_keys(list(unreadable)))
        skipped += [(dataset.files[at].path, unreadable[shas[at].decode()])
                    for at in np.flatnonzero(bad).tolist()]
    del shas, sizes, mtimes
    _check_every_class_has_an_image(dataset, rows)

    keep = rows.sha256 if not wanted_views else np.concatenate(
        [rows.sha256, index.as_keys([v[0] for v in wanted_views])])
    placed = {t.role: cache.compact(out, t.identity_id, known[t.role].only(keep))
              for t in targets}
    layers = {t.role: cache.Layer.of(t.layer, placed[t.role], rows.sha256,
                                     views.records(wanted_views, placed[t.role]), t.shape,
                                     t.dtype) for t in targets}
    rows.place(placed[FEATURES])
    view_rows, cut_rows = layers[FEATURES].views, layers.get(CUT)
    attrs = cache_attributes(config, dataset, weights, identity, rows, view_rows, cut,
                             cut_rows)
    # what the report's stage times read: the time and the images this run computed
    attrs["extract_timing"] = {"seconds": round(time.perf_counter() - start, 3),
                               "images": len(computed["images"])}
    conflicts = label_conflicts(rows, dataset.class_names)
    # the lists beside the cache first, the master last: it names them by their sha256, so a
    # run killed in between leaves lists that readers see do not match (cache.side_file)
    attrs["side_files"] = datasets.write_side_files(out, skipped, conflicts)
    previous = settings.read(out)  # a DATA that moved changes the record, not the rows
    changed = (attrs["index_digest"] != cache.master_attribute(out, "index_digest")
               or previous is None or previous.values != attrs["settings"]
               or attrs["side_files"] != cache.master_attribute(out, "side_files"))
    if changed:
        referenced = set(cache.write_master(
            out, rows, attrs, identity.feature_shape, identity.dtype, unreadable, view_rows,
            cut_rows))
        for target in targets:
            cache.remove_unreferenced(out, target.identity_id, referenced)

    new_images = np.isin(rows.sha256, index.as_keys(list(computed["images"])))
    result = ExtractResult(
        features_path=os.path.join(out, cache.MASTER), rows=len(rows),
        new=len(computed["images"]), reused=len(rows) - int(new_images.sum()),
        skipped=len(skipped), seconds=time.perf_counter() - start, identity=identity.as_dict(),
        changed=changed, views=sum(v["view"] <= config.augment for v in view_rows),
        new_views=computed["views"], cut=cut["layer"] if cut else "")
    _print_summary(config, result, weights)
    if conflicts:
        _warn_conflicts(config, conflicts)
    return result


def _print_summary(config, result, weights):
    """One line of what extract did; skipped.csv is named only when it lists something."""
    augmented = (f", {result.views} augmented views ({result.new_views} new)" if config.augment
                 else "")
    at_cut = f", {result.cut} activations for finetune" if result.cut else ""
    skipped = (f", {result.skipped} skipped (see {config.features_dir}/skipped.csv)"
               if result.skipped else "")
    print(f"extract {config.dataset_name} ({config.backbone}): {result.rows} rows, {result.new} "
          f"new, {result.reused} reused{skipped}{augmented}{at_cut}, {result.seconds:.1f} s")
    if weights.notice:
        warn(weights.notice)


def _compute_missing(config, engine, dataset, columns, unreadable, weights, identity, targets,
                     known):
    """Compute what the layers' indexes `known` ({role: index}) lack, until nothing is missing:
    a second round computes only the views of an image that became its class's training image
    because the one before it did not decode. Returns (rows, the views they keep, what went
    through the backbone: {"images": sha256s, "views": count}); `unreadable` grows in place."""
    previous_views = cache.master_attribute(config.features_dir, "augment")
    computed = {"images": set(), "views": 0}
    while True:
        rows, wanted_views, jobs = _plan(config, dataset, columns, unreadable, previous_views,
                                         known)
        if not jobs:
            return rows, wanted_views, computed
        newly_unreadable = engine.compute(config, weights, identity, targets, jobs,
                                          [known[t.role] for t in targets])
        unreadable.update(newly_unreadable)
        for job in (job for job in jobs if job.sha256 not in newly_unreadable):
            computed["images"].update(job.sha256 for view, _, _ in job.inputs if not view)
            computed["views"] += sum(view > 0 for view, _, _ in job.inputs)


def label_conflicts(rows, class_names):
    """[(sha256, class, path)] of every row whose content (sha256) also has a row of another
    class: the same picture taught as two classes."""
    pairs = np.unique(np.rec.fromarrays([rows.sha256, rows.label]))  # (content, label) once
    shas, counts = np.unique(pairs.f0, return_counts=True)
    torn = np.isin(rows.sha256, shas[counts > 1])
    return [(rows.sha256[at].decode(), class_names[rows.label[at]], rows.path[at])
            for at in np.flatnonzero(torn).tolist()]


def _warn_conflicts(config, conflicts):
    contents = len({sha for sha, _, _ in conflicts})
    classes = sorted({class_name for _, class_name, _ in conflicts})
    shown = ", ".join(repr(c) for c in classes[:5]) + (", ..." if len(classes) > 5 else "")
    warn(f"extract {config.dataset_name}: {contents} image content(s) appear under more than one "
         f"class ({shown}): each copy teaches a different answer; the files are listed in "
         f"{os.path.join(config.features_dir, datasets.CONFLICTS)}")


def _plan(config, dataset, columns, unreadable, previous_views, known):
    """(rows, the views they keep, featurize.Jobs of what the targets' indexes `known` lack),
    for the files that are not known to be unreadable."""
    shas, sizes, mtimes = columns
    good = ~np.isin(shas, index.as_keys(list(unreadable))) if unreadable else \
        np.ones(len(shas), bool)
    rows = _rows(dataset, config.split_fractions, shas, sizes, mtimes, good)
    if dataset.layout != "splits":
        _give_every_class_a_training_image(rows)
    # AUGMENT=K: K augmented views of each training image, keyed like images (views.py)
    wanted_views = views.wanted(config, rows, previous_views, known[FEATURES])
    candidates = _candidates(dataset.root, rows, wanted_views, config.augment)
    return rows, wanted_views, featurize.plan(candidates, list(known.values()))


def cached_layers(config, identity):
    """The featurize.Targets extract keeps, by role: FEATURES, FEATURE_LAYER's output (the
    base's by default), and with FINETUNE_FROM=cache CUT, the cut fine-tuning starts from
    (UNFREEZE's input) when it lies below FEATURE_LAYER; and the cut's description for
    features.h5 (None without one)."""
    size = identity.image_size
    targets = [featurize.Target(identity.output_layer, identity.id, identity.storage, FEATURES,
                                identity.feature_shape)]
    layer = cut_layer(config, identity)
    if not layer:  # FINETUNE_FROM=images, or UNFREEZE trains every layer: no activations to keep
        return targets, None
    cut_identity = identity.cut(layer, config.cut_storage)
    cut = {"layer": layer, "identity": cut_identity.as_dict(), "identity_id": cut_identity.id}
    return targets + [featurize.Target(layer, cut["identity_id"], config.cut_storage, CUT,
                                       identity.entry.layer_shape(layer, size))], cut


def cut_layer(config, identity):
    """The layer extract caches for FINETUNE_FROM=cache: UNFREEZE's input, if it lies below the
    features' layer (the heads' input: with FEATURE_LAYER at it, nothing is left to fine-tune
    there, and at UNFREEZE=0 it is the features themselves); None otherwise."""
    if config.finetune_from != "cache":
        return None
    entry = identity.entry
    layer = entry.cut_of(config.unfreeze)
    if layer is None or entry.position(layer) >= entry.position(identity.output_layer):
        return None
    return layer


def _candidates(root, rows, wanted_views, augment):
    """[(key, image sha256, view, full path)]: every row's plain input (once per content) and
    the views 1..AUGMENT of the training rows."""
    out, seen = [], set()
    for sha, path in zip(rows.sha256.tolist(), rows.path.tolist()):
        if sha not in seen:
            seen.add(sha)
            out.append((sha.decode(), sha.decode(), 0, os.path.join(root, path)))
    out += [(key, sha, view, os.path.join(root, path))
            for key, sha, view, path in wanted_views if view <= augment]
    return out


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
    """The master's rows (index.Rows) of the files marked `good`, their places in the segments
    to be filled in by Rows.place once the features are computed and compacted."""
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


def cache_attributes(config, dataset, weights, identity, rows, view_rows=(), cut=None,
                     cut_rows=None):
    """The attributes of features.h5: the identity (a backbone.FeatureIdentity, recorded as its
    dict), the config, the index digest, versions, and
    the cut's identity (`cut`) when it keeps activations for fine-tuning."""
    # What the index says, including where each row's features live: equal digests mean there is
    # nothing to rewrite, and later stages (make batch) use it to know that nothing changed.
    cached = max((v["view"] for v in view_rows), default=0)
    augment = {"augment": views.attributes(config, cached)} if cached else {}
    digest = _index_digest(index.Rows.of(rows), [identity.as_dict(), dataset.class_names]
                           + [[v["key"], v["segment"], v["segment_row"]] for v in view_rows]
                           + list(augment.values())  # nothing, without views: as before
                           + ([cut, cut_rows.digest()] if cut else []))
    return {**augment, **({"cut": cut} if cut else {}),
        "class_names": dataset.class_names,
        "backbone": identity.backbone,
        "weights": identity.weights,
        "image_size": identity.image_size,
        "preprocess": identity.preprocess,
        "identity": identity.as_dict(),
        "identity_id": identity.id,
        "index_digest": digest,
        "weights_spec": weights.spec,
        "weights_path": weights.path,
        "weights_notice": weights.notice,
        "data_root": os.path.abspath(dataset.root),
        "layout": dataset.layout,
        "config": config.to_dict(),
        "settings": settings.record_of(config),  # what later stages take when not told
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
