"""The report: every section, links that resolve, the dataset summary, and the random-weights
notice."""
import os
import re
import shutil

import pytest
from conftest import make_image_folder
from PIL import Image
from trained_run import shared_trained_run, tiny_config

from pipeline import artifacts, backbone, cache, evaluate, extract, report, train_head
from pipeline.config import UserError

SECTIONS = ["Models", "Learning curves", "Confusion matrices", "Misclassified images", "Dataset",
            "Cache identity and weights"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = shared_trained_run(tmp_path_factory)
    evaluate.run(config)
    return config


def linked_files(text):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def test_every_section_is_present_and_every_link_resolves(run):
    result = report.run(run)
    text = open(result.path).read()
    assert result.sections == SECTIONS and result.notices == []
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == SECTIONS
    assert "WARNING" not in text
    links = linked_files(text)
    assert {"head_history.png", "finetune_history.png", "confusion_logreg.png",
            "confusion_dense.png", "confusion_finetuned.png"} <= set(links)
    for link in links:  # relative to report.md, and real PNGs
        with Image.open(os.path.join(run.models_dir, link)) as png:
            assert png.format == "PNG"
    evaluation = artifacts.read_json(artifacts.path(run, artifacts.EVALUATION), "")
    for model, title in report.TITLES.items():  # the models table has one row per model
        row = next(line for line in text.splitlines() if line.startswith(f"| {title} |"))
        assert f"{evaluation['models'][model]['accuracy']:.3f}" in row
    for mistakes in (m["misclassified_count"] for m in evaluation["models"].values()):
        assert (f"{mistakes} of {evaluation['images']} wrong") in text


def test_dataset_summary_and_identity(run):
    text = open(report.run(run).path).read()
    with cache.FeatureStore(run.features_dir) as store:
        for label, name in enumerate(store.class_names):
            counts = [int(((store.labels == label) & (store.splits == s)).sum())
                      for s in ("train", "validation", "test")]
            assert f"| {name} | {' | '.join(map(str, counts))} | {sum(counts)} |" in text
        assert f"| identity id | {store.attrs['identity_id']} |" in text
    assert backbone.RANDOM_FINGERPRINT in text and "### Skipped files: 0" in text


def test_misclassified_grid_shows_the_mistakes(run, tmp_path):
    config = copy_models(run, tmp_path)
    path = artifacts.path(config, artifacts.EVALUATION)
    evaluation = artifacts.read_json(path, "")
    wrong = [{"path": "vertical/vertical_0%d.jpg" % i, "true": "vertical",
              "predicted": "horizontal", "probability": 0.75} for i in range(7)]
    evaluation["models"]["dense"].update(misclassified=wrong, misclassified_count=7)
    artifacts.write_json(path, evaluation)
    text = open(report.run(config).path).read()
    assert "### Dense head: 7 of" in text and \
        "![misclassified, dense head](misclassified_dense.png)" in text
    with Image.open(artifacts.path(config, "misclassified_dense.png")) as png:
        assert png.format == "PNG" and png.size[1] >= 500  # 7 pictures: two rows of five


def copy_models(config, root):
    shutil.copytree(config.models_dir, os.path.join(root, "models", config.dataset_name))
    return config.replace(models_root=os.path.join(root, "models"))


def test_report_needs_a_fresh_evaluation(run, tmp_path):
    config = copy_models(run, tmp_path)
    future = os.path.getmtime(artifacts.path(config, artifacts.EVALUATION)) + 10
    os.utime(artifacts.path(config, artifacts.HEAD), (future, future))  # retrained since
    with pytest.raises(UserError, match="newer than .*make evaluate"):
        report.run(config)
    os.remove(artifacts.path(config, artifacts.EVALUATION))
    with pytest.raises(UserError, match="run `make evaluate` first"):
        report.run(config)


def test_random_weights_notice_is_loud_and_skipped_files_are_listed(tmp_path, monkeypatch):
    def offline():
        raise UserError("could not download the ImageNet VGG16 weights (offline)")
    monkeypatch.setattr(backbone, "_imagenet_file", offline)
    config = tiny_config(str(tmp_path), weights="auto", head="logreg")
    make_image_folder(config.data, per_class=8)
    (tmp_path / "data" / "vertical" / "broken.jpg").write_bytes(b"not a picture")
    extract.run(config)
    train_head.run(config)
    evaluate.run(config)
    result = report.run(config)
    text = open(result.path).read()
    assert result.notices == [backbone.RANDOM_NOTICE]
    first_lines = text.splitlines()[:4]
    assert any(line.startswith("> **WARNING: weights are random: accuracy is not meaningful.**")
               for line in first_lines)
    assert "### Skipped files: 1" in text and "| vertical/broken.jpg |" in text
    assert "No learning curves" in text  # logistic regression only: nothing trained with Keras
    assert result.sections == SECTIONS
