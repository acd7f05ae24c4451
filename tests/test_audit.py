"""`make audit`: near-duplicates and leakage, out-of-fold label issues, outliers, from the cache
alone; and predict's unlike_training column."""
import csv
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import make_image_folder
from PIL import Image
from sklearn.base import BaseEstimator, ClassifierMixin
from trained_run import shared_trained_run

from pipeline import audit, cache, extract, predict
from pipeline.__main__ import main
from pipeline.analysis import label_issues as label_analysis
from pipeline.analysis import near_duplicates as duplicate_analysis
from pipeline.analysis import outliers
from pipeline.config import UserError


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def audit_rows(result, key):
    """The rows of one of the audit's CSVs, as audit.json names it."""
    rows, why = audit.output_rows(result.folder, result.summary, key)
    assert rows is not None, why
    return rows


def split_folder(root, per_class=6):
    """root/{train,validation,test}/<class>/*: distinct striped images in every split."""
    for seed, split in enumerate(("train", "validation", "test")):
        make_image_folder(os.path.join(root, split), per_class=per_class, seed=seed + 1)
    return str(root)


def renamed(folder, split, name, new_name):
    return os.path.join(folder, split, name.split("_")[0], new_name)


@pytest.fixture
def audited(tmp_path, make_config):
    """A cache with planted copies of train/horizontal/horizontal_00.jpg: lossless PNG copies
    in test and in validation (leakage; other bytes, the same pixels), and a PNG copy of
    horizontal_01 in train itself (no leakage); then the audit. Copies made by edits are
    measured on real photos (bench/audit_bench.py): random weights at 32 pixels see even a
    re-encoding as another picture."""
    data = split_folder(tmp_path / "data")
    original = Image.open(os.path.join(data, "train", "horizontal", "horizontal_00.jpg"))
    original.save(renamed(data, "test", "horizontal_", "copy_png.png"))
    original.save(renamed(data, "validation", "horizontal_", "copy_lossless.png"),
                  compress_level=1)
    Image.open(os.path.join(data, "train", "horizontal", "horizontal_01.jpg")).save(
        renamed(data, "train", "horizontal_", "copy_in_train.png"))
    # random weights see 32-pixel stripes through a 1x1 map: distinct stripes reach 0.7 there,
    # copies 0.99 and more, so the threshold sits between (photos: docs/audit.md)
    config = make_config(data, name="audited", duplicate_threshold=0.97)
    extract.run(config)
    return config, audit.run(config)


def pair_names(rows):
    return {frozenset((os.path.basename(r["path_a"]), os.path.basename(r["path_b"]))): r
            for r in rows}


def test_copies_are_found_and_marked_across_splits(audited):
    config, result = audited
    rows = audit_rows(result, audit.NEAR_DUPLICATES)
    pairs = pair_names(rows)
    png = pairs[frozenset(("horizontal_00.jpg", "copy_png.png"))]
    lossless = pairs[frozenset(("horizontal_00.jpg", "copy_lossless.png"))]
    inside = pairs[frozenset(("horizontal_01.jpg", "copy_in_train.png"))]
    assert float(png["similarity"]) > 0.99 and float(lossless["similarity"]) > 0.99
    assert (png["cross_split"], lossless["cross_split"], inside["cross_split"]) == ("1", "1", "0")
    assert {png["split_a"], png["split_b"]} == {"train", "test"}
    similarities = [float(r["similarity"]) for r in rows]
    assert similarities == sorted(similarities, reverse=True)
    assert result.leakage_pairs == sum(r["cross_split"] == "1" for r in rows) >= 3
    summary = result.summary
    assert summary["near_duplicates"]["threshold"] == config.duplicate_threshold
    assert summary["identity"]["image_size"] == 32
    assert audit.output(result.folder, summary, audit.PICTURE)[0] is not None
    named = {summary["outputs"][key]["file"] for key in audit.OUTPUTS}
    assert set(os.listdir(result.folder)) == named | {audit.SUMMARY, audit.OUTLIER_MODEL}


def test_distinct_images_are_not_paired(audited):
    _, result = audited
    rows = audit_rows(result, audit.NEAR_DUPLICATES)
    planted = {"copy_png.png", "copy_lossless.png", "copy_in_train.png"}
    others = [r for r in rows if not planted & {os.path.basename(r["path_a"]),
                                                os.path.basename(r["path_b"])}]
    assert others == []


def test_blocked_search_equals_the_whole_matrix():
    """Tiles of 7 rows over 40 vectors find exactly the pairs of the full matrix, and a cap
    keeps the most similar ones."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 8)).astype(np.float32)
    vectors[20:30] = vectors[:10] + 0.05 * rng.standard_normal((10, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    full = vectors @ vectors.T
    want = {(a, b) for a in range(40) for b in range(a + 1, 40) if full[a, b] >= 0.9}
    (i, j, s), identical = duplicate_analysis.pairs(vectors, 0.9, block=7)
    assert set(zip(i.tolist(), j.tolist())) == want and len(i) == len(want) and identical == 0
    assert np.all(np.diff(s) <= 0)
    (i2, j2, s2), _ = duplicate_analysis.pairs(vectors, 0.9, block=7, max_pairs=3)
    np.testing.assert_allclose(s2, s[:3])


def separable_toy(n=30, flip=7, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-2, 1, (n, 10)), rng.normal(2, 1, (n, 10))])
    y = np.repeat([0, 1], n)
    y[flip] = 1  # a class-0 point labelled 1
    return x, y


def test_a_flipped_label_ranks_first():
    x, y = separable_toy()
    probabilities = label_analysis.out_of_fold_probabilities(x, y, folds=5)
    found = label_analysis.label_issues(probabilities, y)
    assert found.rows[0] == 7 and found.suggested[7] == 0 and len(found.rows) <= 3
    assert probabilities[7, 1] < 0.25 and found.thresholds.shape == (2,)
    assert found.joint.shape == (2, 2) and found.joint.sum() <= len(y)


class Spy(BaseEstimator, ClassifierMixin):
    """Remembers the row ids (feature 0) it trained on and fails if asked about any of them."""

    def fit(self, x, y):
        self.classes_, self.seen_ = np.unique(y), set(x[:, 0].tolist())
        return self

    def predict_proba(self, x):
        assert not self.seen_ & set(x[:, 0].tolist()), "a row scored by a model that saw it"
        return np.full((len(x), len(self.classes_)), 1 / len(self.classes_))

    def predict(self, x):
        return self.classes_[self.predict_proba(x).argmax(axis=1)]


def test_out_of_fold_no_row_is_scored_by_a_model_that_saw_it():
    x, y = separable_toy()
    x = np.column_stack([np.arange(len(x)), x])  # feature 0: the row id
    probabilities = label_analysis.out_of_fold_probabilities(x, y, folds=4, estimator=Spy())
    assert probabilities.shape == (len(x), 2)


def colour_folder(root, per_class=8):
    """root/{train,validation,test}/{red,blue}/*: noisy pictures whose tint is the class,
    which even random weights tell apart (make_image_folder's stripes they do not, at 32 px)."""
    rng = np.random.default_rng(0)
    for split in ("train", "validation", "test"):
        for k, name in enumerate(("red", "blue")):
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                picture = rng.integers(0, 120, (40, 40, 3))
                picture[..., 0 if k == 0 else 2] += 135
                Image.fromarray(picture.astype(np.uint8)).save(
                    os.path.join(root, split, name, f"{name}_{i:02d}.png"))
    return str(root)


def test_a_swapped_image_ranks_first_end_to_end(tmp_path, make_config):
    data = colour_folder(tmp_path / "data")
    shutil.move(os.path.join(data, "train", "blue", "blue_03.png"),
                os.path.join(data, "train", "red", "swapped.png"))
    config = make_config(data, name="swapped", audit_folds=3)
    extract.run(config)
    result = audit.run(config)
    issues = audit_rows(result, audit.LABEL_ISSUES)
    assert os.path.basename(issues[0]["path"]) == "swapped.png"
    assert (issues[0]["label"], issues[0]["suggested"]) == ("red", "blue")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_trained_run(tmp_path_factory)


def test_predict_flags_an_image_from_another_domain(run, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(os.path.join(run.data, "horizontal", "horizontal_02.jpg"), folder / "a.jpg")
    shutil.copy(os.path.join(run.data, "vertical", "vertical_02.jpg"), folder / "b.jpg")
    # a blank page among the striped drawings the models were trained on (random weights see
    # little else: a photograph among them scores as near as the stripes do)
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(folder / "other_domain.png")
    for model in ("logreg", "finetuned"):
        result = predict.run(run.replace(images=str(folder), model=model))
        rows = {os.path.basename(r["path"]): r for r in read_csv(result.path)}
        assert rows["other_domain.png"]["unlike_training"] == "1", model
        assert rows["a.jpg"]["unlike_training"] == rows["b.jpg"]["unlike_training"] == "0"
        assert result.unlike_training == 1
        distance = {k: float(r["distance_to_training"]) for k, r in rows.items()}
        assert distance["other_domain.png"] > max(distance["a.jpg"], distance["b.jpg"])


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def cli_args(config):
    return ["audit", "--data", config.data, "--name", config.name, "--size", "32",
            "--weights", "none", "--features-root", config.features_root,
            "--models-root", config.models_root]


def test_bad_input_is_one_line(tmp_path, make_config, capsys):
    config = make_config(tmp_path / "nothing", name="none")
    assert "no feature cache" in one_line_error(capsys, cli_args(config))
    few = make_image_folder(tmp_path / "few", per_class=3)
    config = make_config(few, name="few")
    extract.run(config)
    capsys.readouterr()
    assert "too few for AUDIT_FOLDS=5" in one_line_error(capsys, cli_args(config))
    with pytest.raises(UserError, match="AUDIT_FOLDS=1 is out of range"):
        make_config(few, audit_folds=1)
    with pytest.raises(UserError, match="DUPLICATE_THRESHOLD=1.5 is out of range"):
        make_config(few, duplicate_threshold=1.5)


def test_a_cache_of_one_class_is_one_line(tmp_path, make_config, capsys, monkeypatch):
    """extract refuses a class without images, so a one-class cache is forged here: every row
    relabelled as the first class, as an older or foreign cache could hold."""
    config = make_config(make_image_folder(tmp_path / "data", per_class=6), name="one")
    extract.run(config)
    capsys.readouterr()

    class OneClass(cache.FeatureStore):
        def __init__(self, folder):
            super().__init__(folder)
            self.labels = np.zeros_like(self.labels)
    monkeypatch.setattr(cache, "FeatureStore", OneClass)
    assert "one class only" in one_line_error(capsys, cli_args(config))


def test_batch_audits_each_dataset_and_counts_leakage(tmp_path, make_config):
    from pipeline import batch
    first = make_image_folder(tmp_path / "first", per_class=6, seed=0)
    # a lossless copy of one image under another name (its split is drawn by its own hash)
    Image.open(os.path.join(first, "horizontal", "horizontal_00.jpg")).save(
        os.path.join(first, "horizontal", "copy.png"), format="PNG")
    config = make_config("unused", datasets=(first,), finetune=False, duplicate_threshold=0.97)
    row = batch.run(config).rows[0]
    assert row["status"] == "trained" and row["error"] == ""
    assert row["near_duplicates"] >= 1 and row["label_issues"] != ""
    assert row["leakage_pairs"] == audit.current_summary(
        config.replace(data=first, name="first"))["near_duplicates"]["cross_split_pairs"]
    assert float(row["audit_s"]) > 0
    again = batch.run(config).rows[0]  # nothing changed: the audit is not run again
    assert again["status"] == "unchanged" and again["audit_s"] == ""
    assert again["near_duplicates"] == row["near_duplicates"]
    assert "label issues" in open(batch.run(config).md_path).read()


def test_predict_reuses_the_audits_measure_while_the_cache_is_the_same(run, tmp_path,
                                                                       monkeypatch):
    models = tmp_path / "models"
    shutil.copytree(os.path.dirname(run.models_dir), models)
    config = run.replace(models_root=str(models))
    audit.run(config)
    with cache.FeatureStore(config.features_dir) as store:
        computed = outliers.outlier_model(store, config.outlier_percentile)
        monkeypatch.setattr(outliers, "outlier_model", lambda *a: pytest.fail("not reused"))
        saved = outliers.load_outlier_model(config.models_dir, store, config.outlier_percentile)
        np.testing.assert_allclose(saved.precision, computed.precision, rtol=1e-5)
        np.testing.assert_allclose(saved.mean, computed.mean, rtol=1e-6)
        assert saved.threshold == pytest.approx(computed.threshold)
        monkeypatch.undo()
        # another percentile, or a file that is not ours: computed again, never trusted
        other = outliers.load_outlier_model(config.models_dir, store, 50.0)
        assert other.threshold < computed.threshold
        with open(os.path.join(config.models_dir, "audit", audit.OUTLIER_MODEL), "wb") as f:
            f.write(b"not an npz")
        again = outliers.load_outlier_model(config.models_dir, store, config.outlier_percentile)
        assert again.threshold == pytest.approx(computed.threshold)
        # arrays of another width (the mean alone) under the right metadata: checked, not used
        path = os.path.join(config.models_dir, "audit", audit.OUTLIER_MODEL)
        outliers.save_outlier_model(path, computed, store.attrs["index_digest"], store.shape(),
                                    config.outlier_percentile)
        with np.load(path, allow_pickle=False) as arrays:
            narrow = dict(arrays)
        channels = store.shape()[-1]
        narrow.update(mean=narrow["mean"][:channels], threshold=np.float64(1e9),
                      precision=narrow["precision"][:channels, :channels],
                      class_means=narrow["class_means"][:, :channels])
        with open(path, "wb") as f:
            np.savez(f, **narrow)
        checked = outliers.load_outlier_model(config.models_dir, store, config.outlier_percentile)
        assert checked.mean.shape == (2 * channels,)
        assert checked.threshold == pytest.approx(computed.threshold)


def test_identical_copies_do_not_push_real_pairs_out(tmp_path, make_config, monkeypatch):
    """Many copies of one file make more identical pairs than MAX_PAIRS keeps: they are set
    aside before the cap, so the real copy across splits is still found."""
    data = split_folder(tmp_path / "data")
    original = Image.open(os.path.join(data, "train", "horizontal", "horizontal_00.jpg"))
    original.save(renamed(data, "test", "horizontal_", "copy_png.png"))
    same = os.path.join(data, "train", "vertical", "vertical_00.jpg")
    for k in range(4):  # 5 rows of one file: 10 identical pairs
        shutil.copy(same, os.path.join(data, "train", "vertical", f"same_{k}.jpg"))
    config = make_config(data, name="identical", duplicate_threshold=0.97)
    extract.run(config)
    monkeypatch.setattr(duplicate_analysis, "MAX_PAIRS", 3)
    result = audit.run(config)
    pairs = pair_names(audit_rows(result, audit.NEAR_DUPLICATES))
    assert frozenset(("horizontal_00.jpg", "copy_png.png")) in pairs
    assert result.leakage_pairs >= 1
    assert result.summary["near_duplicates"]["identical_files_left_out"] == 10


def test_an_identical_file_under_two_classes_is_a_label_conflict(tmp_path, make_config):
    data = split_folder(tmp_path / "data")
    shutil.copy(os.path.join(data, "train", "horizontal", "horizontal_02.jpg"),
                os.path.join(data, "train", "vertical", "also_vertical.jpg"))
    config = make_config(data, name="conflict")
    extract.run(config)
    result = audit.run(config)
    issues = audit_rows(result, audit.LABEL_ISSUES)
    top = {os.path.basename(r["path"]): (r["label"], r["suggested"]) for r in issues[:2]}
    assert top == {"horizontal_02.jpg": ("horizontal", "vertical"),
                   "also_vertical.jpg": ("vertical", "horizontal")}
    assert result.summary["label_issues"]["identical_files_with_different_labels"] == 2


def test_conflicting_copies_on_arrays():
    shas = np.array(["a", "b", "a", "c", "a", "b"])
    y = np.array([0, 1, 1, 0, 1, 1])
    rows, other = label_analysis.conflicting_copies(shas, y)
    assert dict(zip(rows.tolist(), other.tolist())) == {0: 1, 2: 0, 4: 0}


def test_a_killed_audit_leaves_the_previous_one_whole(audited, monkeypatch):
    """Killed after its files are written and before audit.json: the previous audit.json still
    names its own files, with their hashes, and what it counts is what they hold."""
    config, first = audited
    monkeypatch.setattr(audit, "_commit", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        audit.run(config.replace(duplicate_threshold=0.5))
    summary = audit.current_summary(config)
    assert summary is not None and summary["near_duplicates"]["threshold"] == 0.97
    rows = audit.output_rows(first.folder, summary, audit.NEAR_DUPLICATES)[0]
    assert len(rows) == summary["near_duplicates"]["pairs"] == first.duplicate_pairs
    for key in audit.OUTPUTS:
        assert audit.output(first.folder, summary, key)[0] is not None, key
    monkeypatch.undo()
    again = audit.run(config.replace(duplicate_threshold=0.5))  # the leftovers are swept
    named = {again.summary["outputs"][k]["file"] for k in audit.OUTPUTS}
    assert set(os.listdir(again.folder)) == named | {audit.SUMMARY, audit.OUTLIER_MODEL}


def test_temporaries_in_the_audit_folder_are_swept(audited):
    config, result = audited
    leftovers = [os.path.join(result.folder, name) for name in
                 (".near_duplicates.csv.0123abcd.tmp", ".outlier_model.npz.89abcdef.tmp")]
    for path in leftovers:
        open(path, "w").close()
    audit.run(config)
    assert not any(os.path.exists(p) for p in leftovers)


def test_a_mirrored_or_shifted_map_ranks_first():
    """The descriptor keeps what a crop (the map shifted by a cell) or a mirror (flipped) keeps:
    among 60 random maps, each edited copy's most similar row is its original."""
    rng = np.random.default_rng(0)
    maps = rng.gamma(0.5, 1.0, (60, 4, 4, 32)).astype(np.float32)
    shifted = np.roll(maps[:5], 1, axis=2)
    shifted[:, :, 0] = maps[:5, :, 0]  # a crop: the edge column stays, the rest moves over
    edited = np.concatenate([shifted, maps[5:10, :, ::-1]])
    descriptor = duplicate_analysis.Descriptor.fit_on(maps)
    vectors = descriptor.vectors(maps)
    similarity = descriptor.vectors(edited) @ vectors.T
    assert similarity.argmax(axis=1).tolist() == list(range(10))
    distinct = (vectors @ vectors.T)[np.triu_indices(len(maps), 1)]
    assert similarity.max(axis=1).min() > distinct.max()  # a threshold separates them


def test_a_map_with_typical_means_but_its_activity_in_one_place_is_an_outlier():
    """The measure sees how each channel spreads over the map, not only its mean: a map whose
    channels fire in one cell (a flat picture with one blob), at the means of a typical map,
    is past the threshold where the typical map is not."""
    rng = np.random.default_rng(0)
    train, calibration = (rng.gamma(2.0, 1.0, (n, 4, 4, 16)).astype(np.float32)
                          for n in (200, 100))
    model = outliers.fit(outliers.summaries(train), np.repeat([0, 1], 100),
                         outliers.summaries(calibration), 99, "validation")
    typical = rng.gamma(2.0, 1.0, (1, 4, 4, 16)).astype(np.float32)
    concentrated = np.zeros_like(typical)
    concentrated[:, 0, 0] = typical.sum(axis=(1, 2))  # the same mean, all in one cell
    distance, _ = model.distance(np.concatenate([typical, concentrated]))
    assert distance[0] <= model.threshold < distance[1]


def test_a_label_error_that_only_the_layout_shows_ranks_first():
    """Two classes with the same channel means, told apart by where in the map they fire (left
    half or right half): the label model reads regions of the map, so the one flipped label
    ranks first, where the global means could not tell the classes apart."""
    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 0.1, (40, 4, 4, 8)).astype(np.float32)
    y = np.repeat([0, 1], 20)
    maps[y == 0, :, :2] += 1.0  # class 0 fires on the left
    maps[y == 1, :, 2:] += 1.0  # class 1 on the right: the same means
    y[3] = 1
    cached = SimpleNamespace(y=y, shas=np.array([f"{k:064x}" for k in range(40)]),
                             pooled=maps.mean(axis=(1, 2)),
                             regions=label_analysis.grid_pooled(maps))
    issues = audit._label_issues(cached, folds=4, seed=0)
    assert issues["rows"][0] == 3 and issues["suggested"][0] == 0
