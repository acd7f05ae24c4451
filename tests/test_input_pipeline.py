"""The input pipeline around images.load_image: the same on every backend, parallel, bounded,
in order, bad files reported in place."""
import os
import threading

import numpy as np
import pytest

from pipeline.config import UserError
from pipeline.data import images


@pytest.fixture
def paths(image_folder):
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(image_folder)
                   for name in names)
    broken = os.path.join(image_folder, "horizontal", "broken.jpg")
    with open(broken, "wb") as f:
        f.write(b"not a JPEG")
    return found[:5] + [broken] + found[5:]


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("batch_size", [1, 4, 5])
def test_batches_keep_the_files_order_and_report_bad_files_in_place(paths, threads, batch_size):
    batches = list(images.image_batches(paths, 32, batch_size, threads=threads))
    assert [len(reasons) for _, reasons in batches][:-1] == [batch_size] * (len(batches) - 1)
    loaded = np.concatenate([x for x, _ in batches])
    reasons = [r for _, rs in batches for r in rs]
    assert [bool(r) for r in reasons] == [p.endswith("broken.jpg") for p in paths]
    assert "cannot identify image file" in reasons[5] and not loaded[5].any()
    for path, image, reason in zip(paths, loaded, reasons):
        if not reason:
            np.testing.assert_array_equal(image, images.load_image(path, 32))


def test_decoding_runs_at_most_two_batches_ahead(paths, monkeypatch):
    started, lock = [0], threading.Lock()
    load = images.try_load_image

    def counted(path, *args):
        with lock:
            started[0] += 1
        return load(path, *args)
    monkeypatch.setattr(images, "try_load_image", counted)
    consumed = 0
    for x, _ in images.image_batches(paths * 4, 32, batch_size=2, threads=2):
        consumed += len(x)
        assert started[0] <= consumed + 2 * 2 + 2  # this batch, two ahead, and one being queued
    assert consumed == started[0] == len(paths) * 4


def test_training_batches_are_reshuffled_every_epoch_the_same_in_every_run(paths):
    good = [p for p in paths if not p.endswith("broken.jpg")]
    labels = np.arange(len(good))  # a row's label is its position: shows the order

    def epochs(seed):
        data = images.LabelledImages(good, labels, 32, batch_size=3, shuffle_seed=seed, workers=2)
        out = []
        for _ in range(2):  # as Keras's fit does: the batches, then on_epoch_end
            out.append(np.concatenate([y for _, y in data]))
            data.on_epoch_end()
        return out
    first, again = epochs(seed=7), epochs(seed=7)
    assert sorted(first[0]) == list(labels) and list(first[0]) != list(first[1])
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    unshuffled = images.LabelledImages(good, labels, 32, batch_size=3)
    assert list(np.concatenate([y for _, y in unshuffled])) == list(labels)


def test_an_image_that_no_longer_decodes_is_one_line(paths):
    data = images.LabelledImages(paths, np.zeros(len(paths)), 32, batch_size=4)
    with pytest.raises(UserError, match=r"broken.jpg no longer decodes \(.*\): DATA changed "
                                        r"since `make extract`; rerun it"):
        with images.one_line_on_change(data):
            list(data)
    assert data.changed is not None


# --------------------------------------------------------------------------------------------
# featurize's threads: the next batch's input made ahead, its rows written behind
# --------------------------------------------------------------------------------------------

def test_ahead_keeps_the_order_raises_the_producers_error_and_stops_it_when_closed():
    from pipeline.engines.featurize import ahead
    assert list(ahead(iter(range(5)))) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise UserError("the producer's line")
    with pytest.raises(UserError, match="the producer's line"):
        list(ahead(failing()))

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()
    items = ahead(endless())
    assert next(items) == 0
    items.close()  # the consumer stopped: the producer's generator is closed, its thread ended
    assert closed.is_set()


def test_behind_consumes_in_order_and_raises_the_consumers_error_in_the_callers_thread():
    from pipeline.engines.featurize import behind
    seen = []
    with behind(seen.append) as put:
        for n in range(5):
            put(n)
    assert seen == [0, 1, 2, 3, 4]  # all written on leaving the block

    def write(n):
        if n == 1:
            raise OSError("disk full")
        seen.append(n)
    seen.clear()
    with pytest.raises(OSError, match="disk full"):
        with behind(write) as put:
            for n in range(4):
                put(n)
    assert seen == [0]  # nothing written after the failure
