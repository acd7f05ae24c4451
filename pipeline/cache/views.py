"""Augmented views in the feature cache (`make extract AUGMENT=K`) and reading them back.

extract caches K augmented views (pipeline.data.augment) of every training image beside its plain
features (and beside the cut's activations, for fine-tuning from the cache), in the same
content-keyed segments, computed by pipeline.engines.featurize: a view's key is
augment.view_key(image sha256, augmentation identity, view number). An unchanged rerun finds every
key and computes nothing; a larger K computes only the views it lacks; another augmentation (or
SEED) has other keys and never reuses a view. Validation and test images get no views: they are
always scored plain.
Views belong to a content, not to a row: copies of one image (rows of one sha256) share one set,
computed and cached once, and the store hands it to every training row of that content.
train-head reads each training image as another view every epoch (`epoch_reader`).
"""
import numpy as np

from ..data import augment
from . import index


def attributes(config, cached):
    """What features.h5 records about its views (attrs `augment`): AUGMENT, the views of each
    training image it holds (`cached`: more than AUGMENT after a run with a larger one, kept so
    that going back up costs nothing), and the augmentation's identity."""
    identity = augment.identity(config.seed)
    return {"views": int(config.augment), "cached": int(cached), "identity": identity,
            "identity_id": augment.identity_id(identity)}


def wanted(config, rows, previous, known=()):
    """[(key, image sha256, view, path)] of the views the cache keeps for each content among the
    training rows, once however many rows hold it (the path of its first such row): 1..AUGMENT,
    and those of a larger AUGMENT with the same augmentation: recorded by the features.h5 on
    disk (`previous`: its `augment` attribute, or None) or found in the segments (`known`: the
    keys cached, also by a larger AUGMENT's run that was cut short)."""
    augment_id = augment.identity_id(augment.identity(config.seed))
    upto = config.augment
    if previous and previous.get("identity_id") == augment_id:
        upto = max(upto, int(previous.get("cached", 0)))
    rows = index.Rows.of(rows)
    train = np.flatnonzero(rows.split == b"train")
    train = train[np.argsort(rows.sha256[train], kind="stable")]
    # one set of views per content: copies of an image share it (the store resolves by sha256)
    shas = rows.sha256[train]
    train = train[np.append(True, shas[1:] != shas[:-1])] if len(train) else train

    def cached(view):  # any training image's view `view` in `known`, a piece at a time
        return any(_any_cached(known, [augment.view_key(sha.decode(), augment_id, view)
                                       for sha in rows.sha256[train[i:i + index.MERGE_EVERY]]])
                   for i in range(0, len(train), index.MERGE_EVERY))
    while cached(upto + 1):
        upto += 1
    # view by view: a run cut short has whole views done, which a smaller AUGMENT can use
    return [(augment.view_key(rows.sha256[at].decode(), augment_id, view),
             rows.sha256[at].decode(), view, rows.path[at])
            for view in range(1, upto + 1) for at in train.tolist()]


def _any_cached(known, keys):
    if isinstance(known, index.SegmentIndex):  # extract's: one search for all the keys
        return bool(len(keys)) and bool((known.find(keys) >= 0).any())
    return any(key in known for key in keys)


def records(wanted_views, known):
    """The views for write_master: image sha256, view number and where its features are."""
    out = []
    for key, sha, view, _ in wanted_views:
        if key in known:  # an image that failed to decode has none
            segment, row, rows = known[key]
            out.append(dict(sha256=sha, view=view, key=key, segment=segment, segment_row=row,
                            segment_rows=rows))
    return out


def epoch_reader(store, seed, layer="", views=None):
    """read(indices, epoch) -> features, each training row as its view of that epoch
    (augment.epoch_views: the plain features or one of the cache's K views); None without views.
    layer="cut_": the cut's activations that fine-tuning reads, with `views` of them."""
    views = store.views if views is None else views
    if not views:
        return None

    def read(indices, epoch):
        chosen = augment.epoch_views(indices, views, seed, epoch, len(store))
        return store.read_views(indices, chosen, layer)
    return read
