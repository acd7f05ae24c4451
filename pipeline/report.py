"""Stage five: models/<NAME>/report.md, the one page to judge a run by.

    python -m pipeline report [--name NAME]

Reads what the earlier stages wrote (features/<NAME>/features.h5 and skipped.csv, the metrics
JSONs, evaluation.json and their PNGs) and writes report.md beside the PNGs, linked relatively, so
the folder can be moved or zipped as a whole. Sections: a warning when the weights were random,
the models side by side, learning curves, confusion matrices, misclassified images, the dataset,
and the cache identity and weights.
"""
import csv
import os
import re
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from . import artifacts, cache, evaluate, files, lock, plots, registry
from .config import Config, UserError, warn
from .registry import TITLES

MISCLASSIFIED_PLOT = "misclassified_{model}.png"
GRID_IMAGES = 25         # most confident mistakes shown per model
THUMBNAIL = 128          # pixels: display only
SKIPPED_ROWS = 50        # skipped files listed in the report (all of them are in skipped.csv)
SPLITS = ("train", "validation", "test")


@dataclass
class ReportResult:
    path: str                # models/<NAME>/report.md
    sections: list           # the "## " headings written
    notices: list            # warnings shown at the top (random weights)


def run(config: Config) -> ReportResult:
    """Write report.md, holding models/<NAME>'s lock (no train-head or evaluate replaces what it
    reads meanwhile). Everything read back is untrusted: evaluation.json and the metrics are
    checked by registry, pictures are opened only if regular files, and text from the files
    is escaped into inert Markdown (`_cell`, `_code`)."""
    with lock.exclusive(config.models_dir, "report"):
        return _report(config)


def _report(config):
    evaluation = registry.evaluation(config)
    _refuse_stale(config, evaluation.path)
    trained, _ = registry.records(config)
    with cache.FeatureStore(config.features_dir) as store:
        if evaluation.identity != store.identity:
            raise UserError(f"{evaluation.path} was made on another feature cache: run "
                            "`make evaluate` again")
        attrs, labels, splits = store.attrs, store.labels, store.splits
    notices = sorted({n for n in [attrs.get("weights_notice"), evaluation.weights_notice]
                      + [r.weights_notice for r in trained.values()] if n})

    lines = [f"# Transfer-learning report: {config.dataset_name}", ""]
    for notice in notices:  # first thing a reader sees: the numbers below mean nothing
        lines += [f"> **WARNING: {_cell(notice)}.** The backbone had no pretrained weights "
                  "(WEIGHTS=auto fell back to random initialisation); the figures below only "
                  "show that the pipeline runs.", ""]
    lines += [f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {_code(config.models_dir)} and "
              f"{_code(config.features_dir)}.", ""]
    lines += _models_section(evaluation, trained)
    lines += _curves_section(config)
    lines += _confusion_section(evaluation)
    lines += _misclassified_section(config, evaluation)
    lines += _dataset_section(config, attrs, labels, splits)
    lines += _identity_section(attrs, notices)

    out = artifacts.path(config, artifacts.REPORT)
    with files.replacing(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"report {config.dataset_name}: wrote {out}")
    for notice in notices:
        warn(notice)
    return ReportResult(out, [line[3:] for line in lines if line.startswith("## ")], notices)


def _refuse_stale(config, evaluation_path):
    """A model retrained after `make evaluate` would make the report contradict itself."""
    written = os.path.getmtime(evaluation_path)
    for model in registry.NAMES:
        model_path = registry.path(config, model)
        if os.path.exists(model_path) and os.path.getmtime(model_path) > written:
            raise UserError(f"{model_path} is newer than {evaluation_path}: run `make evaluate` "
                            "again, then `make report`")


def _models_section(evaluation, trained):
    split = evaluation.split
    lines = ["## Models", "",
             f"Validation accuracy is measured while training; {split} accuracy by `make evaluate` "
             f"on {evaluation.images} held-out images"
             + (" (there is no test split, so validation stands in for it)." if split != "test"
                else "."), "",
             f"| model | validation accuracy | {split} accuracy | {split} loss | ROC AUC "
             "| training seconds | epochs (best) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for model in registry.NAMES:
        if model not in evaluation.models or model not in trained:
            continue
        m, t = evaluation.models[model], trained[model]
        epochs = f"{t.get('epochs')} ({t.get('best_epoch', '-')})" if t.get("epochs") else "-"
        lines.append(f"| {TITLES[model]} | {_num(t.validation.get('accuracy'))} "
                     f"| {_num(m['accuracy'])} | {_num(m['loss'])} | {_num(m.get('roc_auc'))} "
                     f"| {_num(t.get('seconds'), 1)} | {epochs} |")
    return lines + [""]


def _curves_section(config):
    lines = ["## Learning curves", ""]
    found = False
    for title, png in (("dense head on cached features", artifacts.HEAD_HISTORY_PLOT),
                       ("fine-tuning", artifacts.FINETUNE_HISTORY_PLOT)):
        if os.path.exists(artifacts.path(config, png)):
            lines += [f"### {title.capitalize()}", "", f"![{title}]({png})", ""]
            found = True
    if not found:
        lines += ["No learning curves: no model was trained with Keras (`make train-head`).", ""]
    return lines


def _confusion_section(evaluation):
    lines = ["## Confusion matrices", "",
             f"Rows are the true class, columns the predicted one ({evaluation.split} split).", ""]
    for model in registry.NAMES:
        if model not in evaluation.models:
            continue
        m = evaluation.models[model]
        png = evaluate.CONFUSION_PLOT.format(model=model)  # the name evaluate gives it, not the
        lines += [f"### {TITLES[model].capitalize()}", "",  # file's: that is only text
                  f"![confusion matrix, {TITLES[model]}]({png})", "",
                  "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        per_class = m["classification_report"]
        for name in evaluation.class_names + ["macro avg", "weighted avg"]:
            row = per_class.get(name, {})
            lines.append(f"| {_cell(name)} | {_num(row.get('precision'))} | "
                         f"{_num(row.get('recall'))} | {_num(row.get('f1-score'))} | "
                         f"{int(row.get('support', 0))} |")
        lines.append("")
    return lines


def _misclassified_section(config, evaluation):
    lines = ["## Misclassified images", "",
             f"The most confident mistakes on the {evaluation.split} split, with the true and "
             "the predicted class and the probability given to the prediction.", ""]
    for model in registry.NAMES:
        if model not in evaluation.models:
            continue
        m = evaluation.models[model]
        lines += [f"### {TITLES[model].capitalize()}: {m['misclassified_count']} of "
                  f"{evaluation.images} wrong", ""]
        png = MISCLASSIFIED_PLOT.format(model=model)
        shown = _misclassified_grid(evaluation, m["misclassified"][:GRID_IMAGES],
                                    artifacts.path(config, png), TITLES[model])
        if shown:
            lines += [f"![misclassified, {TITLES[model]}]({png})", ""]
        elif m["misclassified_count"]:
            lines += [f"(the images under {_code(evaluation.data_root)} could not be opened)", ""]
        else:
            lines += ["No misclassified images.", ""]
    return lines


def _misclassified_grid(evaluation, mistakes, png, title):
    """Draw the grid; returns how many pictures it shows."""
    pictures = []
    for mistake in mistakes:
        try:
            # Display only, never model input: PIL opens the original file for a thumbnail,
            # the way a person would look at it. Model input always goes through load_image.
            # A regular file only: a FIFO would hang the report.
            with files.open_regular(os.path.join(evaluation.data_root, mistake["path"]),
                                    "rb") as f, Image.open(f) as img:
                picture = ImageOps.exif_transpose(img).convert("RGB")
                picture.thumbnail((THUMBNAIL, THUMBNAIL))
        except (OSError, UserError):
            continue  # moved, deleted or replaced since evaluate: show the others
        name = os.path.basename(mistake["path"])
        name = name if len(name) <= 22 else name[:19] + "..."
        pictures.append((picture, f"true: {mistake['true']}\npredicted: {mistake['predicted']} "
                                  f"({mistake['probability']:.2f})\n{name}"))
    if pictures:
        plots.plot_misclassified_grid(pictures, png, title=f"{title}: most confident mistakes")
    return len(pictures)


def _dataset_section(config, attrs, labels, splits):
    class_names = attrs["class_names"]
    lines = ["## Dataset", "",
             f"{_code(attrs.get('data_root', config.data))} (layout: "
             f"{_cell(attrs.get('layout', '?'))}), "
             f"{len(labels)} images in {len(class_names)} classes.", "",
             "| class | " + " | ".join(SPLITS) + " | total |",
             "|---|" + "---:|" * (len(SPLITS) + 1)]
    for label, name in enumerate(class_names):
        counts = [int(np.sum((labels == label) & (splits == s))) for s in SPLITS]
        lines.append(f"| {_cell(name)} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} |")
    totals = [int(np.sum(splits == s)) for s in SPLITS]
    lines.append("| **total** | " + " | ".join(map(str, totals)) + f" | {sum(totals)} |")
    skipped_csv = os.path.join(config.features_dir, "skipped.csv")
    skipped = []
    if os.path.exists(skipped_csv):
        with files.open_regular(skipped_csv, newline="",
                                fix="remove it, then run `make extract` again") as f:
            skipped = [(row.get("path"), row.get("reason")) for row in csv.DictReader(f)]
    lines += ["", f"### Skipped files: {len(skipped)}", ""]
    if skipped:
        lines += [f"Files that were not used, and why (all of them: {_code(skipped_csv)}).", "",
                  "| file | reason |", "|---|---|"]
        lines += [f"| {_cell(path)} | {_cell(reason)} |" for path, reason in skipped[:SKIPPED_ROWS]]
        if len(skipped) > SKIPPED_ROWS:
            lines.append(f"| ... {len(skipped) - SKIPPED_ROWS} more | |")
    else:
        lines.append("Every file found was used.")
    return lines + [""]


def _identity_section(attrs, notices):
    identity = attrs["identity"]
    versions = attrs.get("versions", {})
    rows = [("identity id", attrs.get("identity_id", "")),
            ("backbone", identity.get("backbone", "")),
            ("weights asked for (WEIGHTS)", attrs.get("weights_spec", "")),
            ("weights file", attrs.get("weights_path") or "none (random initialisation)"),
            ("weights fingerprint", identity.get("weights", "")),
            ("image size", identity.get("image_size", "")),
            ("preprocessing", identity.get("preprocess", "")),
            ("notice", "; ".join(notices) or "none"),
            ("cache created", attrs.get("created", "")),
            ("library versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))]
    return (["## Cache identity and weights", "",
             "Features are reused, and models accepted, only when every part of this identity "
             "is equal.", "", "| | |", "|---|---|"]
            + [f"| {key} | {_cell(str(value))} |" for key, value in rows] + [""])


def _num(value, digits=3):
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


# Markdown's and HTML's active characters, each escaped with a backslash: text read from files
# (class names, paths, notices) can open no tag, link, picture, code span or table cell
_ESCAPES = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|&!#"})


def _cell(text):
    """Untrusted text as inert Markdown on one line, also inside a table cell."""
    return "".join(" " if not c.isprintable() else c for c in str(text)).translate(_ESCAPES)


def _code(text):
    """Untrusted text as one code span: a fence of more backticks than the text holds in a row,
    so no backtick inside can end it (Markdown shows a code span's text as is)."""
    text = "".join(" " if not c.isprintable() else c for c in str(text))
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"
