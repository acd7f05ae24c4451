"""Stage four: every trained model (logreg, dense head, fine-tuned) on the held-out images.

    python -m pipeline evaluate [--name NAME]

The test split is used, or validation where the cache has no test rows. The feature-based models
read the cached features of those rows; the fine-tuned model reads the images themselves through
images.labelled_dataset (no augmentation). Each model is scored with its temperature applied
(model/calibration.py), as predict uses it; its calibration is also recorded without it
(calibration_before), for the report. Writes models/<NAME>/evaluation.json, with what the
report lays out (ROC and precision-recall figures, the most-confused pairs, a PCA projection of
the cached features, each stage's time), and the pictures it names. The pictures are written first,
each under a name holding its hash (reporting/pictures.py); evaluation.json is written last and is
the commit point: a kill before it leaves the previous evaluation.json naming its own pictures.
"""
import os
import time
from dataclasses import dataclass

import numpy as np
from sklearn import metrics

from . import cache
from .cache import settings
from .config import Config, UserError, warn
from .data import images
from .fs import artifacts
from .model import calibration, registry
from .reporting import diagnostics, pictures, plots

LEGACY_CONFUSION_PLOT = "confusion_{model}.png"   # before pictures were named by their hash
# the stems of evaluate's pictures (reporting/pictures.py): <stem>-<hash>.png, named in
# evaluation.json
PICTURES = {"projection", *(f"{kind}_{model}" for kind in ("confusion", "curves")
                            for model in registry.NAMES)}
MAX_MISCLASSIFIED = 100     # kept per model in evaluation.json (most confident mistakes first)


@dataclass
class EvaluateResult:
    path: str              # models/<NAME>/evaluation.json
    split: str             # "test", or "validation" when there is no test split
    accuracy: dict         # model -> accuracy on that split


def run(config: Config) -> EvaluateResult:
    """Score every usable model, holding models/<NAME>'s lock: a train-head or finetune meanwhile
    would replace a model between its scoring and its record."""
    return settings.run(config, "evaluate", _evaluate, config.models_dir)


def _evaluate(config):
    start = time.perf_counter()
    with cache.FeatureStore(config.features_dir) as store:
        split = "test" if len(store.rows("test")) else "validation"
        rows = store.rows(split)
        if len(rows) == 0:
            raise UserError(f"{store.path} has no test or validation images: add images or use "
                            "SPLIT with a non-zero validation share, then rerun `make extract`")
        labels = store.labels[rows]
        class_names = store.class_names
        trained, refused = registry.usable(config, store)
        if not trained:
            raise next(iter(refused.values()), UserError(
                f"no trained model in {config.models_dir}: run `make train-head` (and `make "
                "finetune`) first"))
        for refusal in refused.values():  # a model left by an interrupted run, or made for
            warn(f"not evaluated: {refusal}")  # other features or classes: skipped, not fatal
        scored, uncalibrated = {}, {}
        for model in trained:
            if registry.KINDS[model].takes == "images":
                raw = _image_probabilities(config, model, store, rows, labels)
            else:
                raw = _feature_probabilities(config, model, store, rows)
            # scored as predict sees it, with its temperature; the network's own for the report
            scored[model] = calibration.apply_temperature(raw, trained[model].temperature)
            uncalibrated[model] = raw
        paths, attrs, root = store.paths[rows], store.attrs, store.image_root(config.data)
        train_rows = len(store.rows("train"))
        small = diagnostics.small_splits(store.labels, store.splits, class_names)
        best = max(scored, key=lambda k: np.mean(scored[k].argmax(axis=1) == labels))
        projected = diagnostics.projection(store, rows[scored[best].argmax(axis=1) != labels],
                                       config.seed)

    report = {"identity": attrs["identity"], "identity_id": attrs["identity_id"],
              "class_names": class_names, "split": split, "images": int(len(rows)),
              "data_root": root,
              "weights_notice": attrs.get("weights_notice", ""), "config": config.to_dict(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "small_sample": small,
              "models": {}}
    named = []  # every picture evaluation.json names: the others are a killed run's
    for model, probabilities in scored.items():
        report["models"][model] = _scores(config, named, model, probabilities, labels, paths,
                                          class_names, split, trained[model].temperature,
                                          uncalibrated[model])
    entry, points, point_labels, marked = projected
    entry.update(model=best, png=_picture(
        config, named, "projection", png=diagnostics.projection_png(
            points, point_labels, class_names, marked, registry.TITLES[best], split, entry)))
    report["projection"] = entry
    report["stage_times"] = diagnostics.stage_times(attrs, trained, train_rows,
                                                time.perf_counter() - start,
                                                len(rows) * len(scored))
    out = artifacts.path(config, artifacts.EVALUATION)
    artifacts.write_json(out, report)  # the commit point: it names this run's pictures
    pictures.remove_stale(config.models_dir, PICTURES, named)
    for model in registry.NAMES:  # the fixed names of earlier versions would mislead
        legacy = artifacts.path(config, LEGACY_CONFUSION_PLOT.format(model=model))
        if os.path.isfile(legacy) and not os.path.islink(legacy):
            os.remove(legacy)

    _print_summary(config, report, time.perf_counter() - start, out)
    return EvaluateResult(out, split, {k: v["accuracy"] for k, v in report["models"].items()})


def _scores(config, named, model, probabilities, labels, paths, class_names, split,
            temperature, uncalibrated):
    """One model's entry of evaluation.json: its scores with their interval, its calibration
    before the temperature, its curves and confused pairs, and its pictures (added to `named`)."""
    m = score(probabilities, labels, class_names, paths)
    m["accuracy_ci95"] = list(diagnostics.accuracy_interval(m["accuracy"], len(labels)))
    m["temperature"] = temperature
    m["calibration_before"] = calibration.reliability(uncalibrated, labels)
    m["curves"], drawn = diagnostics.curves(probabilities, labels, class_names)
    m["confused_pairs"] = diagnostics.confused_pairs(m["confusion_matrix"], class_names)
    on = f"{registry.TITLES[model]} on {split} ({len(labels)} images)"
    m["confusion_matrix_png"] = _picture(config, named, f"confusion_{model}",
                                         plots.plot_confusion_matrix(
                                             m["confusion_matrix"], class_names, title=on))
    if drawn:
        m["curves"]["png"] = _picture(config, named, f"curves_{model}",
                                      plots.plot_roc_pr(drawn, title=on))
    return m


def _print_summary(config, report, seconds, out):
    print(f"evaluate {config.dataset_name} on the {report['split']} split ({report['images']} "
          f"images, {seconds:.1f} s):")
    for model, m in report["models"].items():
        auc = f", ROC AUC {m['roc_auc']:.3f}" if m.get("roc_auc") is not None else ""
        low, high = m["accuracy_ci95"]
        print(f"  {registry.TITLES[model]:<20} accuracy {m['accuracy']:.3f} (95% interval "
              f"{low:.3f}-{high:.3f}){auc}")
    for line in report["small_sample"]:
        warn(line)
    if report["weights_notice"]:
        warn(report["weights_notice"])
    print(f"wrote {out}")


def _picture(config, named, stem, figure=None, png=None):
    """Write a figure (or PNG bytes) under its content's name; returns its record."""
    record = pictures.write(config.models_dir, stem, png if png is not None
                          else plots.png_bytes(figure))
    named.append(record)
    return record


def _feature_probabilities(config, model, store, rows):
    """Score cached features a block at a time, so a large test split never sits in memory."""
    predict = registry.predictor(config, model, calibrated=False)
    return np.concatenate([predict(features) for _, features in store.blocks(rows)])


def _image_probabilities(config, model, store, rows, labels):
    root = store.image_root(config.data)
    paths = [os.path.join(root, p) for p in store.paths[rows]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise UserError(f"{missing[0]} (and {len(missing) - 1} more) no longer exist: pass the "
                        "DATA folder the cache was extracted from")
    predict = registry.predictor(config, model, calibrated=False)
    identity = store.feature_identity
    dataset = images.labelled_dataset(paths, labels, identity.image_size, config.batch_size,
                                      preprocess=identity.entry.preprocess)
    return np.concatenate([predict(batch) for batch, _ in dataset])  # a changed image: one line


def score(probabilities, labels, class_names, paths):
    """Accuracy, log loss, per-class precision/recall/F1, ROC AUC (binary), confusion matrix and
    the most confident mistakes, for one model's probabilities on one split."""
    indices = list(range(len(class_names)))
    predicted = probabilities.argmax(axis=1)
    # float32 models sum to 1 within 1e-7; log_loss checks float64 inputs to 1e-8
    normalised = probabilities / probabilities.sum(axis=1, keepdims=True)
    out = {
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "loss": float(metrics.log_loss(labels, normalised, labels=indices)),
        "classification_report": metrics.classification_report(
            labels, predicted, labels=indices, target_names=class_names, output_dict=True,
            zero_division=0),
        "classification_report_text": metrics.classification_report(
            labels, predicted, labels=indices, target_names=class_names, zero_division=0),
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=indices).tolist(),
        "roc_auc": None,
    }
    if len(class_names) == 2 and len(set(labels.tolist())) == 2:
        out["roc_auc"] = float(metrics.roc_auc_score(labels, probabilities[:, 1]))
    out["calibration"] = calibration.reliability(probabilities, labels)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]
    out["misclassified_count"] = int(len(wrong))
    out["misclassified"] = [
        {"path": str(paths[i]), "true": class_names[labels[i]],
         "predicted": class_names[predicted[i]],
         "probability": float(probabilities[i, predicted[i]])}
        for i in wrong[:MAX_MISCLASSIFIED]]
    return out
