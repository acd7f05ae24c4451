"""The report's sections laid out from what evaluate computed: pictures by their hash, ROC and
precision-recall curves, calibration before and after the temperature, the most-confused pairs,
the feature projection and the stage times.

Imports no stage. Everything comes from evaluation.json, which is untrusted: each value is
checked (registry.Checker) before it is shown, text is escaped (escape.markdown_text), and a
picture is shown only when evaluation.json names it and its content has the recorded hash
(pictures.verified).
"""
from ..config import warn
from ..fs.escape import markdown_text as cell
from ..model import registry
from ..model.registry import TITLES
from . import diagnostics, pictures, plots


def picture(folder, record, alt, what, fix="run `make evaluate` again"):
    """The Markdown of a picture that `record` names, or one line saying it is left out: a
    picture missing, changed or not named is never combined with numbers it does not show."""
    data, why = pictures.verified(folder, record)
    if data is not None:
        return [f"![{alt}]({record['file']})", ""]
    warn(f"the {what} picture is {why}: left out of the report; {fix}")
    return [f"(The {what} picture is {why}, so it is left out: {fix}.)", ""]


def curves_section(folder, evaluation):
    lines = ["## ROC and precision-recall curves", "",
             f"On the {evaluation.split} split. "
             + ("The positive class is " + cell(evaluation.class_names[1]) + "."
                if len(evaluation.class_names) == 2 else
                "One-vs-rest: each class against all the others; with many classes the figure "
                "shows the classes with the lowest AUC.")
             + " AUC: the area under the ROC curve (0.5 is chance); AP: average precision, the "
               "area under the precision-recall curve (chance is the class's share).", "",
             "| model | macro ROC AUC | macro average precision |", "|---|---:|---:|"]
    check = registry.Checker(evaluation.path, "run `make evaluate` again")
    found = []
    for model, m in _models(evaluation):
        where = f"models.{model}.curves."
        entry = check(m, "curves", dict, optional=True, where=f"models.{model}.")
        if entry is None:
            continue
        for key in ("macro_roc_auc", "macro_average_precision"):
            if entry.get(key) is not None:
                check.number(entry, key, 0, 1, where=where)
        for key in ("roc_auc", "average_precision"):
            for name, value in check(entry, key, dict, where=where).items():
                if value is not None:
                    check.number({name: value}, name, 0, 1, where=where + key + ".")
        found.append((model, entry))
        lines.append(f"| {TITLES[model]} | {_num(entry.get('macro_roc_auc'))} | "
                     f"{_num(entry.get('macro_average_precision'))} |")
    if not found:
        return lines[:2] + ["No curves in evaluation.json: run `make evaluate` again.", ""]
    lines.append("")
    for model, entry in found:
        lines += [f"### {TITLES[model].capitalize()}", ""]
        if "png" in entry:
            lines += picture(folder, entry["png"], f"ROC and precision-recall, {TITLES[model]}",
                             f"ROC and precision-recall ({TITLES[model]})")
        else:
            lines += ["No curve: the split holds a single class.", ""]
    return lines


def confused_section(evaluation):
    lines = ["## Most-confused class pairs", "",
             f"The class pairs each model most often takes for each other on the "
             f"{evaluation.split} split, both directions counted (from the confusion matrix); "
             "share: of the two classes' images.", "",
             "| model | class A | class B | A taken for B | B taken for A | together | share |",
             "|---|---|---|---:|---:|---:|---:|"]
    check = registry.Checker(evaluation.path, "run `make evaluate` again")
    for model, m in _models(evaluation):
        pairs = check(m, "confused_pairs", list, optional=True, where=f"models.{model}.")
        if pairs is None:
            continue
        if not pairs:
            lines.append(f"| {TITLES[model]} | no mistakes | | | | | |")
        for i, pair in enumerate(pairs[:10]):
            where = f"models.{model}.confused_pairs[{i}]."
            if not isinstance(pair, dict):
                check.refuse(where[:-1], pair, "an object")
            for key in ("a", "b"):
                if check(pair, key, str, where=where) not in evaluation.class_names:
                    check.refuse(where + key, pair[key], "one of class_names")
            counts = [check.number(pair, key, 0, evaluation.images, integer=True, where=where)
                      for key in ("a_as_b", "b_as_a", "total")]
            share = check.number(pair, "share", 0, 1, where=where)
            lines.append(f"| {TITLES[model] if i == 0 else ''} | {cell(pair['a'])} | "
                         f"{cell(pair['b'])} | {counts[0]} | {counts[1]} | {counts[2]} | "
                         f"{share:.1%} |")
    return lines + [""]


def projection_section(folder, evaluation, projection):
    lines = ["## Feature projection", ""]
    if not isinstance(projection, dict):
        return lines + ["No projection in evaluation.json: run `make evaluate` again.", ""]
    check = registry.Checker(evaluation.path, "run `make evaluate` again")
    rows = check.number(projection, "rows", 0, integer=True, where="projection.")
    total = check.number(projection, "of", rows, integer=True, where="projection.")
    marked = check.number(projection, "marked", 0, rows, integer=True, where="projection.")
    model = check(projection, "model", str, where="projection.")
    if model not in TITLES:
        check.refuse("projection.model", model, "a model name")
    variance = check(projection, "explained_variance", list, where="projection.")
    if len(variance) > 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    and 0 <= v <= 1 for v in variance):
        check.refuse("projection.explained_variance", variance, "two shares")
    sample = "every image" if rows == total else f"a fixed sample of {rows} of {total} images"
    lines += [f"The cached feature maps (averaged over positions) of {sample}, projected on "
              f"their first two principal components (PCA, {sum(variance):.0%} of the variance), "
              f"one colour per class. Circled: the {marked} {evaluation.split} images the "
              f"{TITLES[model]} ({_most_accurate(evaluation, model)}) gets wrong. Classes that "
              "overlap here are hard for a head on these features.", ""]
    return lines + picture(folder, projection.get("png"), "PCA of the cached features",
                           "feature projection")


def times_section(evaluation, times):
    lines = ["## Stage times", ""]
    if not isinstance(times, list) or not times:
        return lines + ["No stage times in evaluation.json: run `make evaluate` again.", ""]
    check = registry.Checker(evaluation.path, "run `make evaluate` again")
    lines += ["Wall-clock seconds each stage recorded, and images a second: extract counts the "
              "images it put through the backbone, training the training images times the "
              "epochs, evaluate the images times the models scored.", "",
              "| stage | seconds | images | images/s |", "|---|---:|---:|---:|"]
    for i, entry in enumerate(times[:10]):
        where = f"stage_times[{i}]."
        if not isinstance(entry, dict):
            check.refuse(where[:-1], entry, "an object")
        stage = check(entry, "stage", str, where=where)
        seconds = check.number(entry, "seconds", 0, where=where)
        images = check.number(entry, "images", 0, integer=True, where=where)
        rate = f"{images / seconds:,.1f}" if seconds > 0 and images else "-"
        lines.append(f"| {cell(stage)} | {seconds:,.1f} | {images:,} | {rate} |")
    return lines + [""]


def _most_accurate(evaluation, model):
    """"the most accurate model", or the tie it is one of (diagnostics.tied_with): equal
    accuracies at the precision the report shows."""
    accuracies = {m: scores["accuracy"] for m, scores in _models(evaluation)}
    if model not in accuracies:
        return "the most accurate model"
    tied = diagnostics.tied_with(accuracies, model)
    if not tied:
        return "the most accurate model"
    others = " and the ".join(TITLES[m] for m in tied)
    return (f"tied for the most accurate with the {others}, all at accuracy "
            f"{accuracies[model]:.3f}: the first of them is shown")


def _models(evaluation):
    return [(model, evaluation.models[model]) for model in registry.NAMES
            if model in evaluation.models]


def _num(value, digits=3):
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def settings_section(values):
    """The settings the cache was made with ({VARIABLE: value})."""
    lines = ["## Settings", "",
             "The dataset's settings, as `make extract` recorded them in the cache. Every later "
             "stage used them, but for SEED, UNFREEZE, FINETUNE_FROM and CUT_STORAGE, which a "
             "stage may be told otherwise: each model's record holds the values it used.", "",
             "| setting | value |", "|---|---|"]
    return lines + [f"| {name} | {cell(str(value)) if value != '' else '–'} |"
                    for name, value in values.items()] + [""]


def calibration_section(folder, evaluation, drawn):
    """Reliability diagram, ECE and Brier score per model, before and after its temperature
    (evaluate's calibration_before and calibration entries)."""
    lines = ["## Calibration", "",
             f"Whether a model's probabilities mean what they say, on the {evaluation.split} "
             "split: in a reliability diagram a calibrated model follows the diagonal (of the "
             "images it gives 0.8, 80% are right). ECE: the expected calibration error, the "
             "bins' gap between accuracy and confidence weighted by their images; Brier: the mean "
             "squared distance of the probabilities from the truth. Lower is better for both. "
             "Each model's probabilities are divided, as logits, by a temperature T fitted on "
             "the validation split (T = 1: none fitted, or too few validation images); "
             "predict, the Classifier and the export use them after T.",
             "", "| model | T | ECE before | ECE after | Brier before | Brier after | images |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    curves, check = [], registry.Checker(evaluation.path, "run `make evaluate` again")
    for model in registry.NAMES:
        scores = evaluation.models.get(model, {})
        if scores.get("calibration") is None:
            continue
        after = _checked_reliability(check, evaluation, scores, model, "calibration")
        before = (_checked_reliability(check, evaluation, scores, model, "calibration_before")
                  if "calibration_before" in scores else after)
        temperature = check.number(scores, "temperature", 0, optional=True,
                                   where=f"models.{model}.") or 1.0
        curves.append((f"{TITLES[model]}, T={temperature:.2f}", *after[2][:2]))
        if before is not after:
            curves.append((f"{TITLES[model]}, before", *before[2][:2]))
        lines.append(f"| {TITLES[model]} | {temperature:.2f} | {before[0]:.3f} | {after[0]:.3f} "
                     f"| {before[1]:.3f} | {after[1]:.3f} | {int(sum(after[2][2]))} |")
    if not curves:
        return lines[:2] + ["No calibration figures in evaluation.json: run `make evaluate` "
                            "again.", ""]
    drawn.append(pictures.write(folder, "reliability", plots.png_bytes(plots.plot_reliability(
        curves, title=f"Reliability on the {evaluation.split} split"))))
    return lines + ["", f"![reliability diagram]({drawn[-1]['file']})", ""]


def _checked_reliability(check, evaluation, scores, model, key):
    """(ECE, Brier, [confidence, accuracy, counts]) of scores[key], each value checked."""
    entry, where = scores[key], f"models.{model}.{key}."
    if not isinstance(entry, dict):
        check.refuse(where[:-1], entry, "an object")
    ece = check.number(entry, "ece", 0, 1, where=where)
    brier = check.number(entry, "brier", 0, 2, where=where)
    series = [check(entry, name, list, where=where) for name in ("confidence", "accuracy",
                                                                 "counts")]
    for name, values in zip(("confidence", "accuracy", "counts"), series):
        if len(values) != len(series[0]) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= (
                    evaluation.images if name == "counts" else 1) for v in values):
            check.refuse(where + name, values, "a list of numbers in range, one per bin")
    return ece, brier, series
