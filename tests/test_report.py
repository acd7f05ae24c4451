"""The report: every section, links that resolve, the dataset summary, and the random-weights
notice."""
import base64
import io
import os
import re
import shutil
from html.parser import HTMLParser

import pytest
from helpers import make_image_folder
from PIL import Image
from trained_run import shared_trained_run, tiny_config

from pipeline import artifacts, audit, backbone, cache, evaluate, extract, report, train_head
from pipeline.config import UserError

SECTIONS = ["Models", "Learning curves", "Confusion matrices", "Calibration",
            "Misclassified images", "Dataset", "Audit", "Cache identity and weights"]


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


class Page(HTMLParser):
    """Every tag opened is closed in order (void tags aside); collects headings and pictures."""
    VOID = {"img", "meta", "br"}

    def __init__(self):
        super().__init__()
        self.open, self.errors, self.images, self.headings, self._heading = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.open.append(tag)
            if tag in ("h1", "h2", "h3"):
                self._heading = [tag, ""]

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.errors.append(tag)
        if self._heading and tag == self._heading[0]:
            self.headings.append(tuple(self._heading))
            self._heading = None

    def handle_data(self, data):
        if self._heading:
            self._heading[1] += data


def test_calibration_audit_and_a_self_contained_html_page(run, tmp_path):
    config = copy_models(run, tmp_path)
    text = open(report.run(config).path).read()
    assert "No audit of this cache yet: run `make audit`" in text
    audit.run(config)
    result = report.run(config)
    text = open(result.path).read()
    assert result.sections == SECTIONS
    evaluation = artifacts.read_json(artifacts.path(config, artifacts.EVALUATION), "")
    for model, title in report.TITLES.items():  # ECE and Brier per model, from evaluate
        calibration = evaluation["models"][model]["calibration"]
        assert f"| {title} | {calibration['ece']:.3f} | {calibration['brier']:.3f} |" in text
        assert 0 <= calibration["ece"] <= 1 and sum(calibration["counts"]) == evaluation["images"]
    summary = artifacts.read_json(os.path.join(config.models_dir, "audit", "audit.json"), "")
    assert (f"| near-duplicate pairs | {summary['near_duplicates']['pairs']} |") in text
    assert (f"| label-issue candidates | {summary['label_issues']['candidates']} |") in text
    links = linked_files(text)
    assert {report.RELIABILITY_PLOT, "audit/audit.png"} <= set(links)

    page = Page()
    page.feed(open(artifacts.path(config, report.HTML), encoding="utf-8").read())
    page.close()
    assert page.errors == [] and page.open == []
    assert [h for tag, h in page.headings if tag == "h2"] == SECTIONS
    assert len(page.images) == len(links)  # every picture of report.md, each inline
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as png:
            assert png.format == "PNG"
    assert not re.search(r"""(src|href)=["'](?!data:)""", open(
        artifacts.path(config, report.HTML), encoding="utf-8").read())


def test_html_renders_untrusted_text_inert():
    lines = ["# A `code` title", "", "| a | b |", "|---|---:|",
             f"| {report._cell('<script>alert(1)</script>')} | {report._cell('x|y')} |", "",
             "> **WARNING: w.** more", "", "![missing](nowhere.png)"]
    page = report._html(lines, "/nonexistent", "t")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<td>x|y</td>" in page and "<code>code</code>" in page
    assert "<strong>WARNING: w.</strong>" in page and 'src="data:,"' in page
