"""Streaming cached rows into Keras: the (features, target) batches that train-head and
fine-tuning from the cache fit on, a block of rows at a time, on any backend."""
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import keras
import numpy as np

from .. import cache

BLOCK_BYTES = 64 * 2**20  # float32 bytes of one block read; two are in memory at a time
SHUFFLE_ROWS = 32         # rows that stay together in a shuffled block of cache.READ_BLOCK rows


def block_plan(rows, size, rng=None):
    """The row indices of each block of `size` of `rows`, read together. With a numpy
    Generator, shuffled: a block is pieces of consecutive rows from all over `rows`, in a
    shuffled order, and its rows are shuffled. Rows are stored in extraction order, often one
    class after another, and blocks of consecutive rows of one class made every epoch of the head
    end on a swing to that class (on cats_vs_dogs, 2 blocks of 1024: 98% cats, then 100% dogs).
    A block holds READ_BLOCK // SHUFFLE_ROWS = 32 pieces whatever its size: SHUFFLE_ROWS rows
    each in a block of READ_BLOCK, fewer in the smaller blocks of wide rows (the cut's), whose
    few long pieces would otherwise give each block a class share of its own. Pieces of
    consecutive rows keep the store's reads few and contiguous."""
    if rng is not None and len(rows):
        piece = max(1, size * SHUFFLE_ROWS // cache.READ_BLOCK)
        pieces = [rows[i:i + piece] for i in range(0, len(rows), piece)]
        rows = np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])
    plan = []
    for start in range(0, len(rows), size):
        indices = rows[start:start + size]
        plan.append(rng.permutation(indices) if rng is not None else indices)
    return plan


class CachedFeatures(keras.utils.PyDataset):
    """(features, target) batches over `rows` of the cache, for Keras's fit and evaluate on any
    backend. The cache is read a block of rows at a time (block_plan), the next block in
    a thread of its own while the model trains on this one, so at most two blocks are in memory
    whatever the cache's size. With a seed, every epoch visits the rows in a new order, the same
    in every run. `read(indices, epoch)` reads the features instead of the store
    (views.epoch_reader: another augmented view of each image every epoch); `dataset` names the
    store's dataset read otherwise ("cut_features": fine-tuning's activations). A block holds
    at most cache.READ_BLOCK rows and BLOCK_BYTES of float32, so wide rows stream as well."""

    def __init__(self, store, rows, targets, batch_size, seed=None, read=None,
                 dataset="features", epoch=0):
        super().__init__(workers=1)  # batches in order, from one thread: the block cache holds
        self.store, self.rows, self.targets, self.read = store, rows, targets, read
        self.batch_size, self.seed, self.epoch, self.dataset = batch_size, seed, epoch, dataset
        row_bytes = 4 * int(np.prod(store.shape(dataset)))
        rows_per_block = min(cache.READ_BLOCK, max(1, BLOCK_BYTES // row_bytes))
        # whole batches per block: one short batch per epoch, at the very end at most
        self.per_block = max(1, rows_per_block // batch_size) * batch_size
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="cache-read")
        self._plan()

    def _plan(self):
        rng = None if self.seed is None else np.random.default_rng([self.seed, self.epoch])
        self.blocks = block_plan(self.rows, self.per_block, rng)
        self.reads = {}  # block number -> its read (a Future), the current one and the next

    def _read(self, indices):
        if self.read is None:
            return self.store.read(indices, self.dataset)
        return self.read(indices, self.epoch)

    def _block(self, number):
        # only this block and the next are kept: a block already used is dropped, or an epoch
        # would hold every block it read (the whole split in float32) until its end
        self.reads = {n: read for n, read in self.reads.items() if n in (number, number + 1)}
        if number not in self.reads:
            self.reads = {number: self.reader.submit(self._read, self.blocks[number])}
        if number + 1 < len(self.blocks) and number + 1 not in self.reads:
            self.reads[number + 1] = self.reader.submit(self._read, self.blocks[number + 1])
        return self.reads[number].result()

    def __len__(self):
        return -(-len(self.rows) // self.batch_size)

    def __getitem__(self, index):
        number, start = divmod(index * self.batch_size, self.per_block)
        batch = slice(start, start + self.batch_size)
        return self._block(number)[batch], self.targets[self.blocks[number][batch]]

    def on_epoch_end(self):
        self.epoch += 1
        self._plan()

    def start_at(self, epoch):
        """Read as epoch `epoch` does: its views and its order."""
        self.epoch = epoch
        self._plan()


class FollowEpochs(keras.callbacks.Callback):
    """Sets a CachedFeatures' epoch from fit's own count as each epoch begins, so that epoch e
    reads epoch e's views and order on every backend and after a resume: JAX's trainer calls
    the dataset's on_epoch_end once before the first epoch (after peeking at a batch to build
    the model), which a dataset counting those calls took for an epoch."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch, logs=None):
        if self.dataset.epoch != epoch:
            self.dataset.start_at(epoch)


@contextmanager
def one_line_on_damage(store):
    """A damaged segment met while Keras reads the cache can reach us as a framework error (under
    TensorFlow, Keras runs the dataset inside tf.data): raise FeatureStore's own one line."""
    try:
        yield
    except Exception:
        if store.damage is not None:
            raise store.damage from None
        raise
