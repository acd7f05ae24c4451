"""The one path from image files to cached rows, on both engines.

    Job (one image, and the rows it lacks) -> decoded once (images.image_batches) -> its plain
    input and its augmented views (augment.ViewFunction, one compiled call a batch) -> one
    forward pass of the frozen base that returns every cached layer -> rows checked finite, in
    each layer's storage dtype

The forward passes set the pace: the next batch's input is made in a thread of its own
(`ahead`) while the base runs, and ENGINE=local writes the last batch's rows in another
(`behind`).

A *target* is one layer whose output the cache keeps, under an identity of its own: the features
train-head reads (the base's output, or FEATURE_LAYER's stage) and, for fine-tuning from the
cache, the input of the lowest trainable layer (the *cut*: the output of the stage below
UNFREEZE's, data/backbones.py). A row's key is
the image's sha256 for its plain input and augment.view_key(...) for its view k. A job lists, for
each of its inputs, the targets that lack that key, so a rerun computes nothing, a larger AUGMENT
computes only the new views, and a new cut computes only what it lacks. An image is decoded once
for its plain input and all its views.

ENGINE=local writes one segment per batch and target (`compute_here`); ENGINE=ray's actors
(ray_engine.Extractor) collect a Ray batch into one segment per target. Both run
`Featurizer.batches`, so both write the same numbers.
"""
import contextlib
import queue
import threading
from dataclasses import dataclass

import keras
import numpy as np
from tqdm import tqdm

from .. import cache
from ..config import UserError
from ..data import augment, images
from ..model import backbone

FEATURES, CUT = "features", "cut"  # the roles of the cached layers


@dataclass(frozen=True)
class Target:
    """One cached layer: its name in the backbone, the identity_id its segments are kept under,
    the storage they keep (float32 | float16), its role (FEATURES or CUT) and one row's shape."""
    layer: str
    identity_id: str
    storage: str
    role: str = FEATURES
    shape: tuple = ()

    @property
    def dtype(self):
        return backbone.STORAGE_DTYPES[self.storage]


@dataclass(frozen=True)
class Job:
    """One image to decode (`path`, content `sha256`) and its inputs still to compute:
    ((view, key, needs), ...), view 0 being the plain image and `needs` the numbers of the
    targets that lack that key."""
    sha256: str
    path: str
    inputs: tuple


@dataclass
class Batch:
    """Rows of one forward pass: input i has key keys[i], is wanted by the targets needs[i], and
    its activations at target t are outputs[t][i]."""
    keys: list
    needs: list
    outputs: list

    def rows_for(self, target):
        """(keys, activations) of the rows that target number `target` lacks."""
        wanted = [i for i, needs in enumerate(self.needs) if target in needs]
        return [self.keys[i] for i in wanted], self.outputs[target][wanted]


def plan(candidates, targets_known):
    """Jobs for `candidates` [(key, image sha256, view, full path)], each input listing the
    targets whose index (targets_known: one index.SegmentIndex per target) lacks its key; inputs
    no target lacks are left out, and so are images with nothing left to compute."""
    if not candidates:
        return []
    keys = [key for key, _, _, _ in candidates]
    missing = np.stack([known.find(keys) < 0 for known in targets_known])  # (targets, inputs)
    jobs = {}
    for at in np.flatnonzero(missing.any(axis=0)).tolist():
        key, sha, view, path = candidates[at]
        needs = tuple(np.flatnonzero(missing[:, at]).tolist())
        jobs.setdefault(sha, (path, []))[1].append((view, key, needs))
    return [Job(sha, path, tuple(inputs)) for sha, (path, inputs) in jobs.items()]


class Featurizer:
    """The frozen base, built once with one output per target, and the augmentation."""

    def __init__(self, weights, identity, targets, seed, batch_size, threads=None):
        entry = identity.entry  # a backbone.FeatureIdentity's
        base = backbone.build_backbone(weights, identity.image_size, identity.precision, entry)
        # one pass, every target: the cut's activations are on the way to the features
        model = keras.Model(base.input,
                            [backbone.layer_output(base, entry, t.layer) for t in targets])
        for target, out in zip(targets, model.outputs):  # rows must be what the cache declares
            if target.shape and tuple(out.shape[1:]) != tuple(target.shape):
                raise ValueError(f"{entry.name}'s {target.layer} is {tuple(out.shape[1:])} at "
                                 f"SIZE={identity.image_size}, not the table's {target.shape}")
        self.forward = backbone.feature_function(model)
        self.preprocess = entry.preprocess
        self.targets, self.size, self.seed = list(targets), identity.image_size, seed
        self.views = augment.ViewFunction(seed, batch_size)  # one graph for the run
        self.batch_size, self.threads = batch_size, threads
        self.unreadable = {}  # sha256 -> why its image did not decode, after `batches`

    def batches(self, jobs, progress=None):
        """Batch after Batch of at most BATCH_SIZE inputs for `jobs`, each image decoded once
        for all its inputs; images that fail to decode go to `self.unreadable`. `progress`
        (a tqdm bar) advances by each job's inputs. The next batch's input (decoding and the
        views) is made in a thread of its own while the base runs on this one."""
        for x, items in ahead(self._inputs(jobs, progress)):
            yield self._forward(x, items, progress)

    def _inputs(self, jobs, progress):
        """(model input, its items (decoded image, sha256, view, key, needs, path)) of each
        batch, its views augmented."""
        pending = []
        paths = [job.path for job in jobs]
        decoded = images.image_batches(paths, self.size, self.batch_size, self.threads,
                                       self.preprocess)
        # the decoder leads the zip, so its iterator runs to its natural end
        for (batch, reasons), first in zip(decoded, range(0, len(jobs), self.batch_size)):
            for job, image, reason in zip(jobs[first:first + len(reasons)], batch, reasons):
                if reason:
                    self.unreadable[job.sha256] = reason
                    if progress is not None:
                        progress.update(len(job.inputs))
                    continue
                pending += [(image, job.sha256, view, key, needs, job.path)
                            for view, key, needs in job.inputs]
            while len(pending) >= self.batch_size:
                yield self._input(pending[:self.batch_size])
                pending = pending[self.batch_size:]
        if pending:
            yield self._input(pending)

    def _input(self, items):
        x = np.stack([image for image, *_ in items])
        views = np.array([view for _, _, view, *_ in items])
        augmented = np.flatnonzero(views > 0)
        if len(augmented):  # a view is a function of its image, key and seed alone
            x[augmented] = self.views(x[augmented], [items[i][1] for i in augmented],
                                      views[augmented].tolist())
        return x, items

    def _forward(self, x, items, progress):
        outputs = self.forward(x)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        rows = []
        for target, out in zip(self.targets, outputs):
            out = out.astype(target.dtype, copy=False)
            check_finite(out, target, items[0][5], len(items))
            rows.append(out)
        if progress is not None:
            progress.update(len(items))
        return Batch([key for _, _, _, key, _, _ in items], [needs for *_, needs, _ in items],
                     rows)


def ahead(items, depth=1):
    """The items of the iterator `items`, made in a thread of their own at most `depth` ahead of
    the consumer, so that making the next one (decoding, augmenting: work that releases the
    GIL) overlaps the consumer's forward pass. An exception there is raised here; closing this
    generator (the consumer stopped, or failed) stops and closes `items` too."""
    box, stop, end = queue.Queue(depth), threading.Event(), object()

    def put(entry):  # False once the consumer has gone
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as error:  # noqa: BLE001  raised again in the consumer's thread
            put((end, error))
        finally:  # a generator's own `finally` (the decoder's pool) runs here, in this thread
            getattr(items, "close", lambda: None)()

    thread = threading.Thread(target=produce, name="featurize-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = box.get()
            if item is end:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


def check_finite(rows, target, first_path, batch_rows):
    """Refuse rows out of the storage dtype's range: a cache must never hold inf or NaN."""
    if not np.isfinite(rows).all():
        variable = "STORAGE" if target.role == FEATURES else "CUT_STORAGE"
        raise UserError(f"{target.layer} of {first_path} (batch of {batch_rows}) is not finite"
                        f"{' in float16' * (rows.dtype == np.float16)}: the WEIGHTS give values "
                        f"out of range; use {variable}=float32 and PRECISION=float32")


def compute_here(featurizer, jobs, features_dir, targets_known, description):
    """ENGINE=local: run `jobs` through `featurizer`, one atomic segment per batch and target,
    written in a thread of their own while the base runs on the next batch. Updates
    targets_known (key -> segment, row, rows, per target) in place and returns {sha256: reason}
    for the images that could not be decoded."""
    def write(batch):
        for number, target in enumerate(featurizer.targets):
            keys, rows = batch.rows_for(number)
            if keys:
                segment = cache.write_segment(features_dir, target.identity_id, keys, rows)
                targets_known[number].update(
                    {key: (segment, row, len(keys)) for row, key in enumerate(keys)})

    total = sum(len(job.inputs) for job in jobs)
    # closed also on an error, so that the error line does not land on the bar's line
    with tqdm(total=total, desc=description, unit="row", smoothing=0.1) as progress, \
            behind(write) as put:
        for batch in featurizer.batches(jobs, progress):
            put(batch)
    return featurizer.unreadable


@contextlib.contextmanager
def behind(consume, depth=2):
    """`put(item)` hands item to `consume` in a thread of its own, at most `depth` items behind,
    in order. Leaving the block waits for every item put; the first exception of `consume` is
    raised by the next `put` or on leaving (items put after it are dropped)."""
    box, failed = queue.Queue(depth), []

    def run():
        while (item := box.get()) is not box:
            if not failed:
                try:
                    consume(item)
                except BaseException as error:  # noqa: BLE001  raised in the caller's thread
                    failed.append(error)

    def put(item):
        if failed:
            raise failed[0]
        box.put(item)

    thread = threading.Thread(target=run, name="featurize-behind", daemon=True)
    thread.start()
    try:
        yield put
    finally:
        box.put(box)  # the end: the queue itself, never an item
        thread.join()
    if failed:
        raise failed[0]
