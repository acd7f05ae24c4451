"""The report: every section, links that resolve, the dataset summary, and the random-weights
notice."""
import base64
import errno
import io
import os
import re
import shutil
from html.parser import HTMLParser

import pytest
from helpers import edit_json, make_image_folder
from PIL import Image
from trained_run import run_config, shared_trained_run

from pipeline import audit, cache, evaluate, extract, report, train_head
from pipeline.config import UserError
from pipeline.fs import artifacts, files
from pipeline.model import backbone, registry
from pipeline.reporting import pictures, plots, sections

SECTIONS = ["Models", "Learning curves", "Confusion matrices", "Most-confused class pairs",
            "ROC and precision-recall curves", "Calibration", "Misclassified images",
            "Feature projection", "Dataset", "Settings", "Audit", "Stage times",
            "Cache identity and weights"]
HASHED = r"-[0-9a-f]{16}\.png"  # a picture's name: its stem, then its content's hash


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
    assert {"head_history.png", "finetune_history.png"} <= set(links)
    for stem in ("confusion_logreg", "confusion_dense", "confusion_finetuned", "curves_logreg",
                 "curves_dense", "curves_finetuned", "projection", "reliability"):
        assert [link for link in links if re.fullmatch(stem + HASHED, link)], stem
    for link in links:  # relative to report.md, and real PNGs
        with Image.open(os.path.join(run.models_dir, link)) as png:
            assert png.format == "PNG"
    evaluation = artifacts.read_json(artifacts.path(run, artifacts.EVALUATION), "")
    for model, title in report.TITLES.items():  # the models table has one row per model
        row = next(line for line in text.splitlines() if line.startswith(f"| {title} |"))
        low, high = evaluation["models"][model]["accuracy_ci95"]
        assert f"{evaluation['models'][model]['accuracy']:.3f} ({low:.3f}-{high:.3f})" in row
    # the tiny run's splits hold fewer than 30 images of each class: said at the top
    assert [line for line in text.splitlines() if line.startswith("> **Small sample:**")] == \
        [f"> **Small sample:** {line}." for line in evaluation["small_sample"]]
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
    assert "### Dense head: 7 of" in text
    png = re.search(r"!\[misclassified, dense head\]\((misclassified_dense" + HASHED + r")\)",
                    text).group(1)
    with Image.open(artifacts.path(config, png)) as png:
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
    def offline(entry):
        raise UserError(f"could not download the ImageNet {entry.constructor} weights (offline)")
    monkeypatch.setattr(backbone, "_imagenet_file", offline)
    config = run_config(str(tmp_path), weights="auto", head="logreg")
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
    """Every tag opened is closed in order (void tags aside); collects headings, pictures and
    links."""
    VOID = {"img", "meta", "br"}

    def __init__(self):
        super().__init__()
        self.open, self.errors, self.images, self.headings, self._heading = [], [], [], [], None
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs)["href"])
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
    assert "| model | T | ECE before | ECE after | Brier before | Brier after | images |" in text
    for model, title in report.TITLES.items():  # ECE and Brier per model, before and after T
        m = evaluation["models"][model]
        after, before = m["calibration"], m["calibration_before"]
        assert (f"| {title} | {m['temperature']:.2f} | {before['ece']:.3f} | {after['ece']:.3f} "
                f"| {before['brier']:.3f} | {after['brier']:.3f} |") in text
        assert 0 <= after["ece"] <= 1 and sum(after["counts"]) == evaluation["images"]
    summary = artifacts.read_json(os.path.join(config.models_dir, "audit", "audit.json"), "")
    assert (f"| near-duplicate pairs | {summary['near_duplicates']['pairs']} |") in text
    assert (f"| label-issue candidates | {summary['label_issues']['candidates']} |") in text
    links = linked_files(text)
    assert f"audit/{summary['outputs']['audit']['file']}" in links
    assert "### Outliers" in text  # listed, and pictured when there are any
    outliers = summary["outliers"]["rows"]
    assert (f"### Outliers ({min(outliers, report.AUDIT_ROWS)} of {outliers})" if outliers
            else "### Outliers\n\nNone.") in text
    assert summary["label_issues"]["weak"]  # random weights: the out-of-fold accuracy is low
    assert "**The label-issue candidates are weak evidence**" in text
    for model, title in report.TITLES.items():  # the new sections, from evaluation.json
        m = evaluation["models"][model]
        assert f"| {title} | {m['curves']['macro_roc_auc']:.3f} |" in text
        assert f"![ROC and precision-recall, {title}]({m['curves']['png']['file']})" in text
        pair = m["confused_pairs"][0] if m["confused_pairs"] else None
        assert (f"| {title} | {pair['a']} | {pair['b']} | {pair['a_as_b']} | {pair['b_as_a']} |"
                if pair else f"| {title} | no mistakes |") in text
    projection = evaluation["projection"]
    assert projection["rows"] == projection["of"] == 20  # the tiny cache: every row
    assert f"![PCA of the cached features]({projection['png']['file']})" in text
    stages = [t["stage"] for t in evaluation["stage_times"]]
    assert stages == ["extract", "train-head (logistic regression)", "train-head (dense head)",
                      "finetune", "evaluate"]
    for stage in stages:
        assert re.search(rf"\| {re.escape(stage)} \| [\d,.]+ \| [\d,]+ \| [\d,.]+ \|", text)

    page = Page()
    page.feed(open(artifacts.path(config, report.HTML), encoding="utf-8").read())
    page.close()
    assert page.errors == [] and page.open == []
    assert [h for tag, h in page.headings if tag == "h2"] == SECTIONS
    assert page.links == [f"#s{i}" for i in range(1, len(SECTIONS) + 1)]  # the contents
    assert len(page.images) == len(links)  # every picture of report.md, each inline
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as png:
            assert png.format == "PNG"
    assert not re.search(r"""(src|href)=["'](?!data:|#s\d+["'])""", open(
        artifacts.path(config, report.HTML), encoding="utf-8").read())


def test_html_renders_untrusted_text_inert():
    lines = ["# A `code` title", "", "| a | b |", "|---|---:|",
             f"| {report._cell('<script>alert(1)</script>')} | {report._cell('x|y')} |", "",
             "> **WARNING: w.** more", "", "![missing](nowhere.png)"]
    page = report._html(lines, "/nonexistent", "t")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<td class=\"n\">x|y</td>" in page and "<code>code</code>" in page  # "---:": right
    assert "<strong>WARNING: w.</strong>" in page and 'src="data:,"' in page


def picture_links(config):
    return linked_files(open(artifacts.path(config, artifacts.REPORT)).read())


def test_a_killed_evaluate_leaves_no_mixed_report(run, tmp_path):
    """evaluate killed after its new pictures, before evaluation.json: the report shows the
    pictures the old evaluation.json names, never the new ones beside them."""
    config = copy_models(run, tmp_path)
    evaluation = artifacts.read_json(artifacts.path(config, artifacts.EVALUATION), "")
    named = evaluation["models"]["logreg"]["confusion_matrix_png"]["file"]
    # what a killed evaluate wrote: a new, different matrix
    new = pictures.write(config.models_dir, "confusion_logreg", plots.png_bytes(
        plots.plot_confusion_matrix([[9, 0], [0, 9]], ["horizontal", "vertical"])))["file"]
    assert new != named
    report.run(config)
    links = picture_links(config)
    assert named in links and new not in links
    evaluate.run(config)  # the next evaluate commits, then removes what no JSON names
    assert not os.path.exists(artifacts.path(config, new))


@pytest.mark.parametrize("damage, why", [("remove", "missing"),
                                         ("rewrite", "changed since it was recorded")])
def test_a_picture_missing_or_stale_is_left_out_in_one_line(run, tmp_path, damage, why, capsys):
    """A picture evaluation.json names, gone or rewritten since (an older writer killed
    midway), is left out with one line: never shown beside numbers it does not match."""
    config = copy_models(run, tmp_path)
    evaluation = artifacts.read_json(artifacts.path(config, artifacts.EVALUATION), "")
    path = artifacts.path(config, evaluation["projection"]["png"]["file"])
    if damage == "remove":
        os.remove(path)
    else:
        shutil.copyfile(artifacts.path(config, artifacts.HEAD_HISTORY_PLOT), path)
    text = open(report.run(config).path).read()
    assert f"(The feature projection picture is {why}, so it is left out: run `make " \
           "evaluate` again.)" in text
    assert os.path.basename(path) not in linked_files(text)
    assert f"the feature projection picture is {why}" in capsys.readouterr().out
    page = Page()
    page.feed(open(artifacts.path(config, report.HTML), encoding="utf-8").read())
    assert len(page.images) == len(linked_files(text))


def test_stale_pictures_are_removed_in_the_folder_only_never_through_a_link(run, tmp_path):
    config = copy_models(run, tmp_path)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"a user's file")
    planted = artifacts.path(config, "reliability-" + "0" * 16 + ".png")
    os.symlink(outside, planted)
    leftover = artifacts.path(config, "curves_dense-" + "1" * 16 + ".png")  # a killed run's
    shutil.copyfile(artifacts.path(config, artifacts.HEAD_HISTORY_PLOT), leftover)
    report.run(config)
    evaluate.run(config)
    assert not os.path.exists(leftover)  # evaluate's own stem, named by no JSON: removed
    assert os.path.islink(planted) and outside.read_bytes() == b"a user's file"
    assert all(os.path.exists(artifacts.path(config, link)) for link in picture_links(config)
               if link.startswith(("reliability-", "misclassified_")))  # report's: kept


@pytest.mark.parametrize("change, key", [
    (lambda e: e["stage_times"][0].update(seconds="2.5"), r"stage_times\[0\]\.seconds"),
    (lambda e: e["projection"].update(rows=10**9), r"projection\.of"),
    (lambda e: e["projection"].update(model="<script>"), r"projection\.model"),
    (lambda e: e["models"]["dense"]["curves"].update(macro_roc_auc=1.5),
     r"models\.dense\.curves\.macro_roc_auc"),
    (lambda e: e["models"]["logreg"].update(confused_pairs=[{"a": "x", "b": "vertical"}]),
     r"models\.logreg\.confused_pairs\[0\]\.a"),
])
def test_the_new_sections_refuse_a_damaged_evaluation_in_one_line(run, tmp_path, change, key):
    config = copy_models(run, tmp_path)
    edit_json(artifacts.path(config, artifacts.EVALUATION), change)
    with pytest.raises(UserError, match=key + r" is .*: run `make evaluate` again"):
        report.run(config)


def test_a_killed_report_leaves_its_last_page_whole_and_the_next_one_tidies(run, tmp_path):
    config = copy_models(run, tmp_path)
    report.run(config)
    page = open(artifacts.path(config, report.HTML), encoding="utf-8").read()
    # killed after drawing a new reliability diagram, before report.md and report.html
    leftover = pictures.write(config.models_dir, "reliability", plots.png_bytes(
        plots.plot_reliability([("x", [0.5], [0.5])])))["file"]
    assert leftover not in picture_links(config)  # the last page names only its own pictures
    assert all(os.path.exists(artifacts.path(config, link)) for link in picture_links(config))
    assert open(artifacts.path(config, report.HTML), encoding="utf-8").read() == page
    report.run(config)
    assert not os.path.exists(artifacts.path(config, leftover))


def test_a_full_disk_writing_the_report_keeps_both_old_pages(run, tmp_path, monkeypatch):
    """report.md and report.html are one commit: never a new one beside an old one."""
    config = copy_models(run, tmp_path)
    report.run(config)
    pages = [artifacts.path(config, artifacts.REPORT), artifacts.path(config, report.HTML)]
    before = [(os.stat(page).st_ino, open(page, "rb").read()) for page in pages]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(report, "_html", full)
    with pytest.raises(files.NoSpace, match="^no space left on the disk writing .*report.html, "
                                            ".*report.md: free some space"):
        report.run(config)
    assert [(os.stat(page).st_ino, open(page, "rb").read()) for page in pages] == before
    assert not [name for name in os.listdir(config.models_dir) if files.temporary_of(name)]


@pytest.mark.parametrize("accuracies, caption", [
    ({"logreg": 0.75, "dense": 0.75, "finetuned": 0.75},
     "the logistic regression (tied for the most accurate with the dense head and the fine-tuned, "
     "all at accuracy 0.750: the first of them is shown) gets wrong"),
    ({"logreg": 0.75, "dense": 0.625, "finetuned": 0.5},
     "the logistic regression (the most accurate model) gets wrong"),
])
def test_the_projection_caption_calls_a_tie_a_tie(tmp_path, accuracies, caption):
    evaluation = registry.Evaluation(str(tmp_path / "evaluation.json"), "test", 8, ["a", "b"],
                                     {}, "", "", {m: {"accuracy": a}
                                                  for m, a in accuracies.items()})
    projection = {"rows": 8, "of": 8, "marked": 2, "model": "logreg",
                  "explained_variance": [0.5, 0.2]}
    text = " ".join(sections.projection_section(str(tmp_path), evaluation, projection))
    assert caption in text
