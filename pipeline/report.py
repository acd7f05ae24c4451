"""Stage five: models/<NAME>/report.md, the one page to judge a run by.

    python -m pipeline report [--name NAME]

Reads what the earlier stages wrote (features/<NAME>/features.h5 and skipped.csv, the metrics
JSONs, evaluation.json and the pictures it names) and writes report.md beside the PNGs, linked
relatively, so the folder can be moved or zipped as a whole. Sections: a warning when the weights
were random, the models side by side, learning curves, confusion matrices, the most-confused
pairs, ROC and precision-recall curves, calibration (reliability diagram, ECE, Brier),
misclassified images, the feature projection, the dataset, the audit's findings (`make audit`),
the stage times and the cache identity and weights. It lays out what evaluate computed
(sections.py); a picture is shown only when evaluation.json names it by its hash
(reporting/pictures.py).
The same page is also written as report.html, one self-contained file to share: every picture
inline as base64, rendered from the Markdown by markdown.page (a renderer of exactly the subset
written here, so no text from the files becomes markup). report's own pictures are written
first under their hash, report.md and report.html last, so a kill leaves no mixed page.
"""
import os
import time
from dataclasses import dataclass

import numpy as np

from . import audit, cache
from .analysis import label_issues
from .cache import settings
from .config import RECORDED, Config, UserError, warn
from .data import datasets
from .fs import artifacts, files
from .fs.escape import csv_dicts, markdown_code, markdown_text
from .model import registry
from .model.registry import TITLES
from .reporting import diagnostics, markdown, pictures, plots, sections
from .reporting.thumbnails import short_name, thumbnail

# the stems of report's own pictures (reporting/pictures.py), and the fixed names of earlier
# versions
PICTURES = {"reliability", *(f"misclassified_{model}" for model in registry.NAMES)}
LEGACY_PICTURES = ("reliability.png", *(f"misclassified_{m}.png" for m in registry.NAMES))
GRID_IMAGES = 25         # most confident mistakes shown per model
SKIPPED_ROWS = 50        # skipped files listed in the report (all of them are in skipped.csv)
SPLITS = ("train", "validation", "test")
HTML = "report.html"
AUDIT_ROWS = 10          # near-duplicate pairs and label-issue candidates listed in the report


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
    return settings.run(config, "report", _report, config.models_dir)


def _report(config):
    evaluation = registry.evaluation(config)
    _refuse_stale(config, evaluation.path)
    with cache.FeatureStore(config.features_dir) as store:
        if evaluation.identity != store.identity:
            raise UserError(f"{evaluation.path} was made on another feature cache: run "
                            "`make evaluate` again")
        trained, _ = registry.usable(config, store)
        attrs, labels, splits = store.attrs, store.labels, store.splits
        store_identity = store.feature_identity
    notices = sorted({n for n in [attrs.get("weights_notice"), evaluation.weights_notice]
                      + [r.weights_notice for r in trained.values()] if n})

    lines = [f"# Transfer-learning report: {_cell(config.dataset_name)}", ""]
    for notice in notices:  # first thing a reader sees: the numbers below mean nothing
        lines += [f"> **WARNING: {_cell(notice)}.** The backbone had no pretrained weights "
                  "(WEIGHTS=auto fell back to random initialisation); the figures below only "
                  "show that the pipeline runs.", ""]
    lines += [f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {_code(config.models_dir)} and "
              f"{_code(config.features_dir)}. Backbone: {_backbone_named(store_identity)}.", ""]
    small = diagnostics.small_splits(labels, splits, attrs["class_names"])
    lines += [line for warning in small for line in (f"> **Small sample:** {_cell(warning)}.", "")]
    folder, drawn = config.models_dir, []  # drawn: the pictures this report names
    lines += _models_section(evaluation, trained)
    lines += _curves_section(config)
    lines += _confusion_section(folder, evaluation)
    lines += sections.confused_section(evaluation)
    lines += sections.curves_section(folder, evaluation)
    lines += sections.calibration_section(folder, evaluation, drawn)
    lines += _misclassified_section(folder, evaluation, drawn)
    lines += sections.projection_section(folder, evaluation, evaluation.projection)
    lines += _dataset_section(config, attrs, labels, splits)
    lines += sections.settings_section(_recorded_settings(config))
    lines += _audit_section(config, attrs)
    lines += sections.times_section(evaluation, evaluation.stage_times)
    lines += _identity_section(attrs, notices)

    # report.html and report.md last, as one commit: a failure or a kill before leaves the
    # old pair, naming their own pictures (reporting/pictures.py); only then are the pictures
    # they no longer name removed
    out, page = artifacts.path(config, artifacts.REPORT), artifacts.path(config, HTML)
    with files.replacing_together([page, out]) as temporary:
        with open(temporary[page], "x", encoding="utf-8") as f:
            f.write(_html(lines, folder, f"Transfer-learning report: {config.dataset_name}"))
        with open(temporary[out], "x", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    pictures.remove_stale(folder, PICTURES, drawn)
    for name in LEGACY_PICTURES:
        legacy = os.path.join(folder, name)
        if os.path.isfile(legacy) and not os.path.islink(legacy):
            os.remove(legacy)
    print(f"report {config.dataset_name}: wrote {out} and {page}")
    for notice in notices + small:
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
                else ".") + " In brackets, its 95% interval (Wilson score): the fewer the "
             "images, the wider it is.", "",
             f"| model | validation accuracy | {split} accuracy (95% interval) | {split} loss "
             "| ROC AUC | training seconds | epochs (best) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for model in registry.NAMES:
        if model not in evaluation.models or model not in trained:
            continue
        m, t = evaluation.models[model], trained[model]
        epochs = f"{t.get('epochs')} ({t.get('best_epoch', '-')})" if t.get("epochs") else "-"
        low, high = diagnostics.accuracy_interval(m["accuracy"], evaluation.images)
        lines.append(f"| {TITLES[model]} | {_num(t.validation.get('accuracy'))} "
                     f"| {_num(m['accuracy'])} ({low:.3f}-{high:.3f}) | {_num(m['loss'])} "
                     f"| {_num(m.get('roc_auc'))} "
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


def _confusion_section(folder, evaluation):
    lines = ["## Confusion matrices", "",
             f"Rows are the true class, columns the predicted one ({evaluation.split} split).", ""]
    for model in registry.NAMES:
        if model not in evaluation.models:
            continue
        m = evaluation.models[model]
        lines += [f"### {TITLES[model].capitalize()}", ""]
        lines += sections.picture(folder, m.get("confusion_matrix_png"),
                                  f"confusion matrix, {TITLES[model]}",
                                  f"confusion matrix ({TITLES[model]})")
        lines += ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        per_class = m["classification_report"]
        for name in evaluation.class_names + ["macro avg", "weighted avg"]:
            row = per_class.get(name, {})
            lines.append(f"| {_cell(name)} | {_num(row.get('precision'))} | "
                         f"{_num(row.get('recall'))} | {_num(row.get('f1-score'))} | "
                         f"{int(row.get('support', 0))} |")
        lines.append("")
    return lines


def _recorded_settings(config):
    """{VARIABLE: value} as features.h5 records them: the binding ones are this run's (resolve
    refused any other), the others (SEED, UNFREEZE, ...) extract's, which a stage told another
    value did not use."""
    record = settings.read(config.features_dir)
    recorded = record.values if record is not None and not record.problem else {}
    return {name.upper(): recorded.get(name, getattr(config, name)) for name in RECORDED}


def _audit_section(config, attrs):
    """The audit's counts, the top leakage pairs, label-issue candidates and outliers, and its
    picture, when models/<NAME>/audit/ describes this cache."""
    folder = os.path.join(config.models_dir, audit.FOLDER)
    summary_path = os.path.join(folder, audit.SUMMARY)
    lines = ["## Audit", ""]
    summary = artifacts.json_or_empty(summary_path)
    if not summary:
        return lines + ["No audit of this cache yet: run `make audit` for near-duplicates, "
                        "leakage between splits, likely label errors and outliers "
                        "(docs/audit.md).", ""]
    if summary.get("index_digest") != attrs.get("index_digest"):
        return lines + ["The audit in " + _code(folder) + " was made on an earlier cache: run "
                        "`make audit` again.", ""]
    check = registry.Checker(summary_path, "run `make audit` again")
    near = check(summary, "near_duplicates", dict)
    issues = check(summary, "label_issues", dict)
    outliers = check(summary, "outliers", dict)
    pairs = check.number(near, "pairs", 0, integer=True, where="near_duplicates.")
    cross = check.number(near, "cross_split_pairs", 0, integer=True, where="near_duplicates.")
    threshold = check.number(near, "threshold", 0, 1, where="near_duplicates.")
    candidates = check.number(issues, "candidates", 0, integer=True, where="label_issues.")
    folds = check.number(issues, "folds", 2, integer=True, where="label_issues.")
    accuracy = check.number(issues, "out_of_fold_accuracy", 0, 1, where="label_issues.")
    unlike = check.number(outliers, "rows", 0, integer=True, where="outliers.")
    distance = check.number(outliers, "threshold", 0, 1e9, where="outliers.")
    lines += [f"From the cached features alone ({_code(folder)}, docs/audit.md).", "",
              "| finding | count | how it was found |", "|---|---:|---|",
              f"| near-duplicate pairs | {pairs} | similarity of the feature maps' descriptors "
              f"≥ {threshold:g} |",
              f"| of which across splits (leakage) | {cross} | the two images are in different "
              "splits |",
              f"| label-issue candidates | {candidates} | identical files under different "
              f"labels, and confident learning on out-of-fold probabilities ({folds} folds) |",
              f"| outliers | {unlike} | distance to the training images > {distance:.3f} |", ""]
    if accuracy < label_issues.WEAK_ACCURACY:
        lines += [f"**The label-issue candidates are weak evidence**: the cached features "
                  f"classify only {accuracy:.0%} of the images right out of fold, so many "
                  "correct labels look doubtful to them.", ""]
    lines += _audit_table(folder, summary, audit.NEAR_DUPLICATES, "Leakage: near-duplicates "
                          "across splits", ["path_a", "split_a", "path_b", "split_b",
                                            "similarity"], lambda row: row["cross_split"] == "1")
    lines += _audit_table(folder, summary, audit.LABEL_ISSUES, "Likely label errors",
                          ["path", "split", "label", "suggested", "label_probability"])
    lines += _audit_table(folder, summary, audit.OUTLIERS, "Outliers",
                          ["path", "split", "label", "nearest_class", "distance"])
    data, why = audit.output(folder, summary, audit.PICTURE)  # none when nothing to show
    if data is not None:
        held = ", ".join(what for what, count in (("near-duplicate pairs", pairs), (
            "label-issue candidates", candidates), ("outliers", unlike)) if count)
        lines += [f"![audit: {held}]({audit.FOLDER}/{summary['outputs'][audit.PICTURE]['file']})",
                  ""]
    elif why != "not recorded":
        lines += [f"(The audit's picture is {why}, so it is left out: run `make audit` again.)",
                  ""]
    return lines


def _audit_table(folder, summary, key, title, columns, keep=lambda row: True):
    """The first AUDIT_ROWS rows of one of the audit's CSVs that `keep`, as an inert table
    titled with how many of how many it shows."""
    found, why = audit.output_rows(folder, summary, key)
    if found is None:
        return [f"### {title}", "", f"(The audit's {key} table is {why}: run `make audit` "
                "again.)", ""]
    rows = [row for row in found if all(isinstance(row.get(c), str) for c in columns)
            and keep(row)]
    if not rows:
        return [f"### {title}", "", "None.", ""]
    shown = rows[:AUDIT_ROWS]
    lines = [f"### {title} ({len(shown)} of {len(rows)})", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in shown]
    return lines + [""]


def _misclassified_section(folder, evaluation, drawn):
    lines = ["## Misclassified images", "",
             f"The most confident mistakes on the {evaluation.split} split, with the true and "
             "the predicted class and the probability given to the prediction.", ""]
    for model in registry.NAMES:
        if model not in evaluation.models:
            continue
        m = evaluation.models[model]
        lines += [f"### {TITLES[model].capitalize()}: {m['misclassified_count']} of "
                  f"{evaluation.images} wrong", ""]
        shown = _misclassified_grid(evaluation, m["misclassified"][:GRID_IMAGES], TITLES[model])
        if shown:
            drawn.append(pictures.write(folder, f"misclassified_{model}", shown))
            lines += [f"![misclassified, {TITLES[model]}]({drawn[-1]['file']})", ""]
        elif m["misclassified_count"]:
            lines += [f"(the images under {_code(evaluation.data_root)} could not be opened)", ""]
        else:
            lines += ["No misclassified images.", ""]
    return lines


def _misclassified_grid(evaluation, mistakes, title):
    """The grid as PNG bytes; None when no picture could be opened."""
    pictures, shown = [], False
    for mistake in mistakes:
        # moved, deleted or replaced since evaluate: a placeholder, the others are shown
        picture, found = thumbnail(os.path.join(evaluation.data_root, mistake["path"]))
        shown |= found
        pictures.append((picture, f"true: {mistake['true']}\npredicted: {mistake['predicted']} "
                                  f"({mistake['probability']:.2f})\n"
                                  + short_name(mistake["path"], 22)))
    if not shown:
        return None
    return plots.png_bytes(plots.plot_misclassified_grid(
        pictures, title=f"{title}: most confident mistakes"))


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
    skipped_csv = cache.side_file(config.features_dir, datasets.SKIPPED)
    skipped = []
    if skipped_csv:
        with files.open_regular(skipped_csv, newline="",
                                fix="remove it, then run `make extract` again") as f:
            skipped = [(row.get("path"), row.get("reason")) for row in csv_dicts(f)]
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


def _backbone_named(identity):
    """BACKBONE=name, and FEATURE_LAYER's stage when the heads read one below the top."""
    entry = identity.entry
    stage = entry.layer(identity.output_layer)
    below = f", features of its stage {stage.name}" if stage != entry.top else ""
    return f"{_code(entry.name)} ({_cell(entry.identity)}){below}"


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


_cell, _code, _html = markdown_text, markdown_code, markdown.page  # the names tests know
