"""Figures written next to the models: PNG files drawn with matplotlib's Agg backend.

Figures are built with `matplotlib.figure.Figure` and an Agg canvas rather than pyplot, so no
global figure state is kept between calls and no display is ever needed. Every function here
builds and draws under escape.plain_plot_text: class and file names are drawn as they are,
never read as mathtext or TeX.
"""
import functools
import io
import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import files
from .escape import plain_plot_text

PANELS = (("accuracy", "Accuracy"), ("loss", "Loss"))


def _plain_text(function):
    """`function` run under escape.plain_plot_text: the text it creates, and the tick labels
    drawn when it saves, are shown literally."""
    @functools.wraps(function)
    def plain(*args, **kwargs):
        with plain_plot_text():
            return function(*args, **kwargs)
    return plain


@_plain_text
def plot_history(histories, path, title=""):
    """Training (solid) vs validation (dashed) accuracy and loss per epoch, in two panels.

    `histories` is a list of (label, history dict) segments, e.g. [("head", ...), ("fine-tune",
    ...)], drawn one after another along the epoch axis: a later segment continues the curves
    of the one before it, as in the article's fine-tuning plots. A history dict holds lists
    "accuracy", "val_accuracy", "loss" and "val_loss" (keras History.history); missing keys are
    skipped. Returns the Figure (already saved to `path`).
    """
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, (metric, name) in zip(axes, PANELS):
        first = 1  # the epoch number where the current segment starts
        for i, (label, history) in enumerate(histories):
            length = max((len(history.get(k) or []) for k in (metric, "val_" + metric)), default=0)
            epochs = np.arange(first, first + length)
            for key, style, kind in ((metric, "-", "training"),
                                     ("val_" + metric, "--", "validation")):
                values = history.get(key) or []
                if values:
                    ax.plot(epochs[:len(values)], values, style, color=f"C{i}", marker=".",
                            label=f"{label} {kind}")
            if i and length:  # mark where one segment hands over to the next
                ax.axvline(first - 0.5, color="grey", linewidth=0.8, linestyle=":")
            first += length
        ax.set_title(f"Training and validation {name.lower()}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return fig


def _save(fig, path):
    """Atomically, like every other output: a reader never sees half a PNG. No path: the caller
    takes the picture with `png_bytes` (hashed.write names it by its content)."""
    if path is None:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with files.replacing(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


@_plain_text
def png_bytes(fig):
    """The figure as PNG bytes, for hashed.write."""
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


@_plain_text
def plot_confusion_matrix(matrix, class_names, path=None, title=""):
    """A confusion-matrix PNG that stays readable from 2 to dozens of classes: the figure grows
    with the number of classes (each cell stays ~0.35 inch, 25 points), so the labels keep a
    legible size, and the counts are written into the cells while they fit."""
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(class_names)
    side = min(4.0 + 0.35 * n, 30.0)
    fontsize = 11.0 if n <= 10 else 8.0 if n <= 60 else 6.0
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(class_names)).plot(
        ax=ax, cmap="Blues", colorbar=n > 2, include_values=n <= 30,
        xticks_rotation="vertical" if n > 6 else "horizontal", text_kw={"fontsize": fontsize})
    ax.tick_params(labelsize=fontsize)
    ax.set_xlabel("predicted", fontsize=12)
    ax.set_ylabel("true", fontsize=12)
    if title:
        ax.set_title(title, fontsize=13)
    _save(fig, path)
    return fig


@_plain_text
def plot_misclassified_grid(pictures, path=None, title="", columns=5):
    """A grid of pictures with a caption each; `pictures` is a list of (RGB array or PIL image,
    caption). For display only: the caller opens the original files, never model input."""
    rows = max(1, -(-len(pictures) // columns))
    fig = Figure(figsize=(2.4 * columns, 2.8 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (picture, caption) in zip(axes.flat, pictures):
        ax.imshow(np.asarray(picture))
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return fig


@_plain_text
def plot_reliability(curves, path=None, title=""):
    """A reliability diagram: for each (label, confidence per bin, accuracy per bin) in `curves`,
    accuracy against mean confidence, with the diagonal a perfectly calibrated model follows."""
    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for i, (label, confidence, accuracy) in enumerate(curves):
        ax.plot(confidence, accuracy, ("-", "--", "-.", ":")[i % 4],  # coinciding curves show
                marker="osD^v"[i % 5], markersize=8 - 1.5 * min(i, 3), color=f"C{i}", label=label)
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    if title:
        ax.set_title(title)
    _save(fig, path)
    return fig


@_plain_text
def plot_roc_pr(curves, path=None, title=""):
    """ROC (left) and precision-recall (right) curves side by side. `curves`: (label, fpr, tpr,
    auc, recall, precision, average precision[, class index for the colour]), one per class
    (one-vs-rest), or one for two classes. Chance is the diagonal on the left."""
    fig = Figure(figsize=(10, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    roc, pr = fig.subplots(1, 2)
    roc.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    for i, (label, fpr, tpr, auc, recall, precision, ap, *index) in enumerate(curves):
        color = f"C{(index[0] if index else i) % 10}"  # a class's colour, as in the projection
        roc.plot(fpr, tpr, color=color, label=f"{label} (AUC {auc:.3f})")
        pr.plot(recall, precision, drawstyle="steps-post", color=color,  # as sklearn draws it
                label=f"{label} (AP {ap:.3f})")
    for ax, (x, y, name) in zip((roc, pr), (("false positive rate", "true positive rate", "ROC"),
                                          ("recall", "precision", "Precision-recall"))):
        ax.set_xlim(-0.01, 1.01), ax.set_ylim(-0.01, 1.02)
        ax.set_xlabel(x), ax.set_ylabel(y), ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower right" if ax is roc else "best")
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return fig


@_plain_text
def plot_projection(points, labels, class_names, mistakes, path=None, title="", note=""):
    """A 2-D scatter of `points` ((n, 2)), one colour per class, with the rows where `mistakes`
    is true circled in black. Up to 20 classes get their own colour and legend entry."""
    fig = Figure(figsize=(8.5, 6.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    points, labels, mistakes = np.asarray(points), np.asarray(labels), np.asarray(mistakes, bool)
    palette = "tab10" if len(class_names) <= 10 else "tab20"
    colours = matplotlib.colormaps[palette]
    for label, name in enumerate(class_names):
        here = labels == label
        if here.any():
            ax.scatter(points[here, 0], points[here, 1], s=14, alpha=0.7,
                       color=colours(label % colours.N),
                       label=name if len(class_names) <= 20 else None)
    if mistakes.any():
        ax.scatter(points[mistakes, 0], points[mistakes, 1], s=70, facecolors="none",
                   edgecolors="black", linewidths=1.3, label=f"misclassified ({mistakes.sum()})")
    ax.set_xlabel("first principal component"), ax.set_ylabel("second principal component")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    if title:
        ax.set_title(title)
    if note:
        fig.supxlabel(note, fontsize="small")
    _save(fig, path)
    return fig
