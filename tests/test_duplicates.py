"""Copies of one image: one set of augmented views per content, shared by every row that holds
it, and the same content filed under two classes reported by extract."""
import csv
import os
import shutil

import numpy as np
import pytest
from helpers import make_image_folder

from pipeline import batch, cache, extract, finetune
from pipeline.config import UserError
from pipeline.data import datasets

pytestmark = pytest.mark.filterwarnings("ignore")


def split_folder_with_copies(root):
    """DATA/{train,validation,test}/<class>/...: one training image copied twice more inside
    train and once into validation."""
    for seed, split in enumerate(("train", "validation", "test")):
        make_image_folder(root / split, per_class=3, seed=seed)
    original = root / "train" / "horizontal" / "horizontal_00.jpg"
    for copy in ("train/horizontal/copy_1.jpg", "train/horizontal/copy_2.jpg",
                 "validation/horizontal/copy_v.jpg"):
        shutil.copy(original, root / copy)
    return str(root)


def test_copies_in_train_share_one_set_of_views_and_every_stage_reads_them(tmp_path,
                                                                            make_config):
    data = split_folder_with_copies(tmp_path / "data")
    config = make_config(data, augment=2, epochs=1, finetune_from="cache",
                         finetune_augment=True)
    result = extract.run(config)
    # 8 training rows, 6 contents: each content's views are computed and counted once
    assert (result.rows, result.views, result.new_views) == (21, 12, 12)
    with cache.FeatureStore(config.features_dir) as store:
        train = store.rows("train")
        original = [at for at in train if store.paths[at].endswith("horizontal_00.jpg")][0]
        copies = train[[store.sha256[at] == store.sha256[original] for at in train]]
        assert len(copies) == 3
        for layer in ("", "cut_"):
            for view in (1, 2):
                read = store.read_views(copies, [view] * 3, layer)
                np.testing.assert_array_equal(read, np.broadcast_to(read[0], read.shape))
        assert store.cut_views() == 2
    assert extract.run(config).new_views == 0  # a rerun finds every view
    # train-head (dense, reading views), evaluate and audit; then finetune from the cut's views
    row = batch.run(config.replace(datasets=(data,), finetune=False)).rows[0]
    assert (row["status"], row["error"]) == ("trained", "")
    assert finetune.run(config).source == "cache"


def test_one_content_under_two_classes_is_reported_in_one_line_with_its_list(
        tmp_path, make_config, capsys):
    data = make_image_folder(tmp_path / "data", per_class=4)
    shutil.copy(os.path.join(data, "horizontal", "horizontal_00.jpg"),
                os.path.join(data, "vertical", "copy.jpg"))
    config = make_config(data, augment=1)
    extract.run(config)
    listed = os.path.join(config.features_dir, datasets.CONFLICTS)
    lines = [line for line in capsys.readouterr().out.splitlines() if "more than one class" in line]
    assert lines == [f"!!! extract data: 1 image content(s) appear under more than one class "
                     f"('horizontal', 'vertical'): each copy teaches a different answer; the "
                     f"files are listed in {listed}"]
    with open(listed, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((row["class"], row["path"]) for row in rows) == [
        ("horizontal", "horizontal/horizontal_00.jpg"), ("vertical", "vertical/copy.jpg")]
    assert len({row["sha256"] for row in rows}) == 1

    os.remove(os.path.join(data, "vertical", "copy.jpg"))  # resolved: no list, no line
    extract.run(config)
    assert not os.path.exists(listed)
    assert "more than one class" not in capsys.readouterr().out


def test_the_lists_beside_the_cache_are_the_ones_its_master_names(tmp_path, make_config,
                                                                   monkeypatch):
    """skipped.csv and label_conflicts.csv are written before features.h5, which names them by
    their sha256: an extract killed between the two leaves lists that the readers (report,
    batch) refuse in one line instead of taking them for the cache's."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    config = make_config(data)
    extract.run(config)
    assert cache.side_file(config.features_dir, datasets.CONFLICTS) is None  # none written
    with open(cache.side_file(config.features_dir, datasets.SKIPPED), newline="") as f:
        assert list(csv.DictReader(f)) == []
    with open(os.path.join(data, "vertical", "broken.jpg"), "wb") as f:
        f.write(b"not a picture")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cache, "write_master", killed)  # after the lists, before the master
    with pytest.raises(KeyboardInterrupt):
        extract.run(config)
    monkeypatch.undo()
    stale = "skipped.csv is not the list .*features.h5 names .*run `make extract` again"
    with pytest.raises(UserError, match=stale):
        cache.side_file(config.features_dir, datasets.SKIPPED)
    with pytest.raises(UserError, match=stale):
        batch._skip_counts(config)

    extract.run(config)  # the rerun commits both
    with open(cache.side_file(config.features_dir, datasets.SKIPPED), newline="") as f:
        assert [os.path.basename(r["path"]) for r in csv.DictReader(f)] == ["broken.jpg"]
