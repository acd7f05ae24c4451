"""Apply a trained model to new pictures.

    python -m pipeline predict --images DIR_OR_FILE [--name NAME]
                               [--model auto|logreg|dense|finetuned]

Images go through images.image_batches (the one loader) a batch at a time and each batch's rows
are written to models/<NAME>/predictions.csv as soon as they are known, so tens of thousands of
images never sit in memory. Files that do not decode, and the entries that datasets.walk_files
refuses to read (FIFOs, links to folders, broken links, names that are not UTF-8), are listed in
predictions_skipped.csv.
`auto` picks the model with the best validation accuracy among those trained.

Each image is also scored against the training data with the audit's outlier measure
(pipeline/analysis/outliers.py): the Mahalanobis distance of its pooled feature map to the
training images', from the cache (the audit's saved measure while the cache is unchanged, else
computed from the cache at predict time), so it always describes the current cache.
Past the OUTLIER_PERCENTILE-th percentile of the validation images' distances, the image is
`unlike_training` (1): the model was never shown anything like it, so its probabilities say
little. The fine-tuned model reads images, not feature maps, so for it the frozen backbone runs
once more per batch; without a cache the two columns stay empty.
"""
import os
import stat
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from . import cache
from .analysis import outliers
from .cache import settings
from .config import Config, UserError, warn
from .data import datasets, images
from .fs import artifacts, escape, files
from .fs.escape import terminal_text
from .model import backbone, registry

PREFERENCE = {"finetuned": 2, "dense": 1, "logreg": 0}  # breaks ties in validation accuracy
SKIPPED = "predictions_skipped.csv"
SHOW_ROWS = 20  # rows of the table printed on stdout


@dataclass
class PredictResult:
    path: str            # models/<NAME>/predictions.csv
    model: str           # the model used
    predicted: int       # images with a prediction
    skipped: int         # files that could not be read or decoded (predictions_skipped.csv)
    counts: dict         # class name -> images predicted as that class
    unlike_training: int = 0  # images past the outlier threshold (None: not measured, no cache)


def run(config: Config) -> PredictResult:
    """Classify IMAGES with MODEL; it writes only files made without a lock (lock.UNLOCKED)."""
    return settings.run(config, "predict", _predict, None)


def _predict(config):
    start = time.perf_counter()
    records = trained_models(config, config.model)
    model = choose(config.model, records, config.models_dir)
    record = records[model]
    paths, ignored, unreadable = find_images(config.images)
    predict_batch, size, measure = _predictor(config, model, record)
    # the backbone the model was trained on decides how its images are preprocessed
    preprocess = backbone.FeatureIdentity.read(record.identity).entry.preprocess
    class_names = record.class_names
    print(f"predict {config.dataset_name}: {len(paths)} images with the {model} model "
          f"(validation accuracy {_fmt(record.validation.get('accuracy'))})"
          + (f", {ignored} other files ignored" if ignored else ""))
    if record.weights_notice:
        warn(record.weights_notice)

    out = artifacts.path(config, artifacts.PREDICTIONS)
    skipped_out = artifacts.path(config, SKIPPED)
    counts, shown, skipped = dict.fromkeys(class_names, 0), [], list(unreadable)
    unlike = 0 if measure else None
    with files.replacing(out, "w", newline="", encoding="utf-8") as f, \
            files.replacing(skipped_out, "w", newline="", encoding="utf-8") as g:
        # text from a LABELS file or a file name, neutralised: people open these in spreadsheets
        writer, skip_writer = escape.csv_writer(f), escape.csv_writer(g)
        writer.writerow(["path", "predicted"] + [f"p_{name}" for name in class_names]
                        + ["distance_to_training", "unlike_training"])
        skip_writer.writerow(["path", "reason"])
        skip_writer.writerows([path, reason] for path, reason in unreadable)
        progress = tqdm(total=len(paths), desc=f"predict ({model})", unit="img", smoothing=0.1)
        decoded = images.image_batches(paths, size, config.batch_size, preprocess=preprocess)
        for (batch, reasons), first in zip(decoded, range(0, len(paths), config.batch_size)):
            ok = np.array([not r for r in reasons])
            probabilities, distances = predict_batch(batch[ok]) if ok.any() else ([], None)
            probabilities = iter(probabilities)
            distances = iter(distances if distances is not None else [])
            for path, reason in zip(paths[first:first + len(reasons)], reasons):
                if reason:
                    skip_writer.writerow([path, reason])
                    skipped.append((path, reason))
                    continue
                p = next(probabilities)
                predicted = class_names[int(p.argmax())]
                counts[predicted] += 1
                # repr of the float: the CSV holds exactly what the model returned
                distance = next(distances, None)
                flag = [] if distance is None else [float(distance),
                                                    int(distance > measure.threshold)]
                unlike = unlike + flag[1] if flag else unlike
                writer.writerow([path, predicted] + [float(x) for x in p]
                                + (flag or ["", ""]))
                if len(shown) < SHOW_ROWS:
                    shown.append((path, predicted, float(p.max())))
            progress.update(len(reasons))
        progress.close()

    predicted_total = sum(counts.values())
    _print_table(shown, predicted_total, counts, skipped, skipped_out)
    if measure:
        print(f"unlike the training data: {unlike} of {predicted_total} images (distance to "
              f"the training images > {measure.threshold:.3f}, the "
              f"{config.outlier_percentile:g}th percentile of the {measure.calibrated_on} "
              "images; column unlike_training)")
    print(f"wrote {out} ({predicted_total} rows, {time.perf_counter() - start:.1f} s)")
    return PredictResult(out, model, predicted_total, len(skipped), counts, unlike)


def trained_models(config, requested="auto"):
    """{model: registry.Record} of the models in models/<NAME>/ that their own runs' metrics
    describe; nothing is loaded here. A file that an interrupted or older run left is refused
    when asked for by name, and passed over with one line by MODEL=auto."""
    found, refused = registry.usable(config, same_split=False)  # it scores nothing
    if requested in refused:
        raise refused[requested]
    for refusal in refused.values():
        warn(f"passed over: {refusal}")
    return found


def choose(requested, records, models_dir):
    if not records:
        raise UserError(f"no trained model in {models_dir}: run `make train-head` "
                        "(and `make finetune`) first")
    if requested == "auto":
        return max(records, key=lambda m: (_or(records[m].validation.get("accuracy")),
                                           PREFERENCE[m]))
    if requested not in records:
        raise UserError(f"MODEL={requested}: there is no {requested} model in {models_dir}: run "
                        f"`{registry.KINDS[requested].make}`, or use MODEL=auto (available: "
                        f"{', '.join(sorted(records))})")
    return requested


def find_images(target):
    """(paths, number of non-image files ignored, [(path, reason)] for the entries that cannot be
    read) for a file or a folder walked recursively by datasets.walk_files: links to folders,
    broken links, FIFOs and names that are not UTF-8 go to predictions_skipped.csv, as files that
    do not decode do; files that are simply not images (notes, sidecar files) are only counted."""
    if not target:
        raise UserError("pass IMAGES=<an image file or a folder of images>")
    try:
        mode = os.stat(target).st_mode
    except OSError:
        raise UserError(f"IMAGES={target} does not exist: pass an image file or a folder of "
                        "images") from None
    if not datasets.is_utf8(target):
        raise UserError(f"IMAGES={datasets.printable(target)}: the name is not valid UTF-8: "
                        "rename it")
    if stat.S_ISREG(mode):
        if not datasets.is_image_candidate(target):
            raise UserError(f"IMAGES={target} is not an image file (by extension or content)")
        return [target], 0, []
    if not stat.S_ISDIR(mode):
        raise UserError(f"IMAGES={target} is not a regular file ({datasets.file_kind(mode)}): "
                        "pass an image file or a folder of images")
    paths, ignored, problems = [], 0, []
    for path, reason in datasets.walk_files(target, target):
        if reason is None:
            paths.append(path)
        elif reason == datasets.NOT_AN_IMAGE:
            ignored += 1
        else:
            problems.append((path, reason))
    if not paths:
        raise UserError(f"no images in {target} (looked for "
                        f"{', '.join(sorted(datasets.IMAGE_EXTENSIONS))} files and image content, "
                        "in every subfolder)")
    return paths, ignored, problems


def _predictor(config, model, record):
    """(function: a batch of loaded images -> ((n, classes) probabilities, (n,) distances to the
    training data or None), image size, the outliers.OutlierModel or None)."""
    size = int(record.identity["image_size"])
    predict = registry.predictor(config, model)
    takes_images = registry.KINDS[model].takes == "images"
    try:
        with cache.FeatureStore(config.features_dir) as store:
            if not takes_images:
                artifacts.require_same_identity(record.identity, store.identity,
                                                registry.path(config, model))
            weights = backbone.weights_of_cache(config.weights, store.attrs)
            identity = store.feature_identity
            try:  # never a reason to withhold the predictions themselves
                measure = outliers.load_outlier_model(config.models_dir, store,
                                                   config.outlier_percentile)
            except UserError as error:
                warn(f"predictions without the unlike_training column: {error}")
                measure = None
    except UserError:
        if not takes_images:
            raise  # a model of feature maps needs the cache
        warn(f"no usable feature cache in {config.features_dir}: predictions without the "
             "unlike_training column (run `make extract` to have it)")
        return (lambda x: (predict(x), None)), size, None
    if measure is None and takes_images:
        return (lambda x: (predict(x), None)), size, None
    # the frozen base with the weights the cache was built with: the features of new images
    features_of = backbone.feature_function(backbone.build_backbone_of(identity, weights))

    def predict_batch(x):
        features = features_of(x)
        distance = measure.distance(features)[0] if measure else None
        return (predict(x) if takes_images else predict(features)), distance
    return predict_batch, size, measure


def _print_table(shown, total, counts, skipped, skipped_out):
    """The first predictions, the counts per class and the first skipped files, for the
    terminal: every file and class name through escape.terminal_text."""
    shown = [(terminal_text(path), terminal_text(predicted), p) for path, predicted, p in shown]
    if shown:
        width = min(max(len(p) for p, _, _ in shown), 60)
        print(f"\n{'image':<{width}}  {'predicted':<16} probability")
        for path, predicted, probability in shown:
            name = path if len(path) <= width else "..." + path[-(width - 3):]
            print(f"{name:<{width}}  {predicted:<16} {probability:.3f}")
        if total > len(shown):
            print(f"... and {total - len(shown)} more")
    print("\npredicted: " + ", ".join(f"{terminal_text(name)} {n}" for name, n in counts.items()))
    if skipped:
        print(f"skipped {len(skipped)} file(s) that cannot be read or decoded (all in "
              f"{skipped_out}):")
        for path, reason in skipped[:5]:
            print(f"  {terminal_text(path)}: {terminal_text(reason)}")


def _or(value, default=-1.0):
    return default if value is None else value


def _fmt(value):
    return "unknown" if value is None else f"{value:.3f}"
