"""Apply a trained model to new pictures.

    python -m pipeline predict --images DIR_OR_FILE [--name NAME]
                               [--model auto|logreg|dense|finetuned] [--out FILE.csv] [--top-k 1]

The model is a classifier.Classifier, the object `from pipeline import Classifier` gives: images
go through the one loader a batch at a time (Classifier.predict_batches) and each batch's rows
are written to OUT (default models/<NAME>/predictions.csv) as soon as they are known, so tens of
thousands of images never sit in memory. Files that do not decode, and the entries that
datasets.walk_files refuses to read (FIFOs, links to folders, broken links, names that are not
UTF-8), are listed beside it in <OUT>_skipped.csv (predictions_skipped.csv by default).
`auto` picks the model with the best validation accuracy among those trained. The probabilities
are the model's after its temperature (model/calibration.py).

Each image is also scored against the training data with the audit's outlier measure
(pipeline/analysis/outliers.py): the Mahalanobis distance of its feature map's per-channel
means and spreads to the training images', from the cache (the audit's saved measure while the
cache is unchanged, else computed from the cache at predict time), so it always describes the
current cache.
Past the OUTLIER_PERCENTILE-th percentile of the validation images' distances, the image is
`unlike_training` (1): the model was never shown anything like it, so its probabilities say
little. The fine-tuned model reads images, not feature maps, so for it the frozen backbone runs
once more per batch; without a cache the two columns stay empty. The printed table shows the
TOP_K most likely classes of the first rows and marks those unlike the training data with "!".
"""
import os
import stat
import time
from dataclasses import dataclass

from tqdm import tqdm

from .cache import settings
from .classifier import PREFERENCE, Classifier, choose, trained_models  # noqa: F401 - predict's names
from .config import Config, UserError, warn
from .data import datasets
from .fs import artifacts, escape, files
from .fs.escape import terminal_text

SKIPPED = "predictions_skipped.csv"
SHOW_ROWS = 20  # rows of the table printed on stdout


@dataclass
class PredictResult:
    path: str            # OUT, by default models/<NAME>/predictions.csv
    model: str           # the model used
    predicted: int       # images with a prediction
    skipped: int         # files that could not be read or decoded (the _skipped.csv beside it)
    counts: dict         # class name -> images predicted as that class
    unlike_training: int = 0  # images past the outlier threshold (None: not measured, no cache)


def run(config: Config) -> PredictResult:
    """Classify IMAGES with MODEL; it writes only files made without a lock (lock.UNLOCKED)."""
    return settings.run(config, "predict", _predict, None)


def _predict(config):
    start = time.perf_counter()
    out, skipped_out = output_paths(config)
    paths, ignored, unreadable = find_images(config.images)
    classifier = Classifier.from_config(config)
    record, class_names = classifier.record, classifier.classes
    print(f"predict {config.dataset_name}: {len(paths)} images with the {classifier.model} "
          f"model (validation accuracy {_fmt(record.validation.get('accuracy'))}, "
          f"T={classifier.temperature:.2f})"
          + (f", {ignored} other files ignored" if ignored else ""))
    if record.weights_notice:
        warn(record.weights_notice)

    counts, shown, skipped = dict.fromkeys(class_names, 0), [], list(unreadable)
    unlike = 0 if classifier.measure else None
    columns = ["path", "predicted", *(f"p_{name}" for name in class_names),
               "distance_to_training", "unlike_training"]
    # both files written whole, then renamed together: never a table of one run beside the
    # skipped list of another
    with files.replacing_together([skipped_out, out]) as temporary, \
            open(temporary[out], "x", newline="", encoding="utf-8") as f, \
            open(temporary[skipped_out], "x", newline="", encoding="utf-8") as g:
        # text from a LABELS file or a file name, neutralised: people open these in spreadsheets
        writer, skip_writer = escape.csv_writer(f), escape.csv_writer(g)
        writer.writerow(columns)
        skip_writer.writerow(["path", "reason"])
        skip_writer.writerows([path, reason] for path, reason in unreadable)
        progress = tqdm(total=len(paths), desc=f"predict ({classifier.model})", unit="img",
                        smoothing=0.1)
        for path, row, reason in classifier.predict_batches(paths, config.batch_size,
                                                            config.top_k):
            progress.update(1)
            if reason:
                skip_writer.writerow([path, reason])
                skipped.append((path, reason))
                continue
            counts[row["predicted"]] += 1
            unlike = unlike + row["unlike_training"] if unlike is not None else None
            # repr of the float: the CSV holds exactly what the model returned
            writer.writerow([row[c] for c in columns])
            if len(shown) < SHOW_ROWS:
                shown.append(row)
        progress.close()

    predicted_total = sum(counts.values())
    _print_table(shown, predicted_total, counts, skipped, skipped_out)
    if classifier.measure:
        print(f"unlike the training data: {unlike} of {predicted_total} images (distance to "
              f"the training images > {classifier.measure.threshold:.3f}, the "
              f"{config.outlier_percentile:g}th percentile of the "
              f"{classifier.measure.calibrated_on} images; column unlike_training, ! above)")
    print(f"wrote {out} ({predicted_total} rows, {time.perf_counter() - start:.1f} s)")
    return PredictResult(out, classifier.model, predicted_total, len(skipped), counts, unlike)


def output_paths(config):
    """(the predictions CSV: OUT or models/<NAME>/predictions.csv, the skipped list beside it),
    refused in one line when OUT cannot be written as a file."""
    if not config.out:
        return artifacts.path(config, artifacts.PREDICTIONS), artifacts.path(config, SKIPPED)
    out = config.out
    if not out.endswith(".csv"):
        raise UserError(f"OUT={out}: predict writes a CSV file: pass OUT=<name>.csv")
    if os.path.isdir(out):
        raise UserError(f"OUT={out} is a folder: pass OUT=<a file name>.csv")
    folder = os.path.dirname(out) or "."
    if not os.path.isdir(folder):
        raise UserError(f"OUT={out}: the folder {folder} does not exist: create it or pass "
                        "another OUT")
    return out, out[:-len(".csv")] + "_skipped.csv"


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


def _print_table(shown, total, counts, skipped, skipped_out):
    """The first rows (path, the top TOP_K classes with their probabilities, "!" for an image
    unlike the training data), the counts per class and the first skipped files, for the
    terminal: every file and class name through escape.terminal_text."""
    if shown:
        paths = [terminal_text(row["path"]) for row in shown]
        width = min(max(len(p) for p in paths), 60)
        print(f"\n{'image':<{width}}  {'':1} top classes (probability)")
        for path, row in zip(paths, shown):
            name = path if len(path) <= width else "..." + path[-(width - 3):]
            mark = "!" if row["unlike_training"] == 1 else ""
            top = ", ".join(f"{terminal_text(label)} {p:.3f}" for label, p in row["top"])
            print(f"{name:<{width}}  {mark:1} {top}")
        if total > len(shown):
            print(f"... and {total - len(shown)} more")
    print("\npredicted: " + ", ".join(f"{terminal_text(name)} {n}" for name, n in counts.items()))
    if skipped:
        print(f"skipped {len(skipped)} file(s) that cannot be read or decoded (all in "
              f"{skipped_out}):")
        for path, reason in skipped[:5]:
            print(f"  {terminal_text(path)}: {terminal_text(reason)}")


def _fmt(value):
    return "unknown" if value is None else f"{value:.3f}"
