"""Figures written next to the models: PNG files drawn with matplotlib's Agg backend.

Figures are built with `matplotlib.figure.Figure` and an Agg canvas rather than pyplot, so no
global figure state is kept between calls and no display is ever needed. Every figure is built,
saved and turned into PNG bytes under escape.plain_plot_text: class and file names are drawn as
they are, never read as mathtext or TeX.
"""
import contextlib
import io
import os

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..fs import files
from ..fs.escape import plain_plot_text

PANELS = (("accuracy", "Accuracy"), ("loss", "Loss"))


@contextlib.contextmanager
def _figure(path, size, title="", grid=(1, 1)):
    """A figure of `grid` (rows, columns) axes, yielded as (figure, the one axes or a flat array
    of them). On leaving, the title goes above the one axes, or above the whole grid, and the
    figure is saved to `path` (None: the caller takes the picture with `png_bytes`). Its text is
    drawn literally (escape.plain_plot_text)."""
    with plain_plot_text():
        fig = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(*grid, squeeze=False)
        yield fig, (axes[0, 0] if axes.size == 1 else axes.ravel())
        if title:
            (axes[0, 0].set_title if axes.size == 1 else fig.suptitle)(title)
        _save(fig, path)


def plot_history(histories, path, title=""):
    """Training (solid) vs validation (dashed) accuracy and loss per epoch, in two panels.

    `histories` is a list of (label, history dict) segments, e.g. [("head", ...), ("fine-tune",
    ...)], drawn one after another along the epoch axis: a later segment continues the curves
    of the one before it, as in the article's fine-tuning plots. A history dict holds lists
    "accuracy", "val_accuracy", "loss" and "val_loss" (keras History.history); missing keys are
    skipped. Returns the Figure (already saved to `path`).
    """
    with _figure(path, (11, 4.2), title, grid=(1, 2)) as (fig, axes):
        for ax, (metric, name) in zip(axes, PANELS):
            _plot_segments(ax, histories, metric)
            ax.set_title(f"Training and validation {name.lower()}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize="small")
    return fig


def _plot_segments(ax, histories, metric):
    """One metric's training and validation curves, each segment continuing the one before."""
    first = 1  # the epoch number where the current segment starts
    for i, (label, history) in enumerate(histories):
        length = max((len(history.get(k) or []) for k in (metric, "val_" + metric)), default=0)
        epochs = np.arange(first, first + length)
        for key, style, kind in ((metric, "-", "training"), ("val_" + metric, "--", "validation")):
            values = history.get(key) or []
            if values:
                ax.plot(epochs[:len(values)], values, style, color=f"C{i}", marker=".",
                        label=f"{label} {kind}")
        if i and length:  # mark where one segment hands over to the next
            ax.axvline(first - 0.5, color="grey", linewidth=0.8, linestyle=":")
        first += length


def _save(fig, path):
    """Atomically, like every other output: a reader never sees half a PNG. No path: the caller
    takes the picture with `png_bytes` (pictures.write names it by its content)."""
    if path is None:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with files.replacing(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def png_bytes(fig):
    """The figure as PNG bytes, for pictures.write."""
    out = io.BytesIO()
    with plain_plot_text():  # tick labels are made now, as the figure is drawn
        fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


def plot_confusion_matrix(matrix, class_names, path=None, title=""):
    """A confusion-matrix PNG that stays readable from 2 to dozens of classes: the figure grows
    with the number of classes (each cell stays ~0.35 inch, 25 points), so the labels keep a
    legible size, and the counts are written into the cells while they fit."""
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(class_names)
    side = min(4.0 + 0.35 * n, 30.0)
    fontsize = 11.0 if n <= 10 else 8.0 if n <= 60 else 6.0
    with _figure(path, (side + 1.0, side), title) as (fig, ax):
        ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(class_names)).plot(
            ax=ax, cmap="Blues", colorbar=n > 2, include_values=n <= 30,
            xticks_rotation="vertical" if n > 6 else "horizontal", text_kw={"fontsize": fontsize})
        ax.tick_params(labelsize=fontsize)
        ax.set_xlabel("predicted", fontsize=12)
        ax.set_ylabel("true", fontsize=12)
    return fig


def plot_misclassified_grid(pictures, path=None, title="", columns=5):
    """A grid of pictures with a caption each; `pictures` is a list of (RGB array or PIL image,
    caption). For display only: the caller opens the original files, never model input."""
    rows = max(1, -(-len(pictures) // columns))
    with _figure(path, (2.4 * columns, 2.8 * rows + 0.4), title, grid=(rows, columns)) as (
            fig, axes):
        for ax in axes:
            ax.axis("off")
        for ax, (picture, caption) in zip(axes, pictures):
            ax.imshow(np.asarray(picture))
            ax.set_title(caption, fontsize=8)
    return fig


def plot_reliability(curves, path=None, title=""):
    """A reliability diagram: for each (label, confidence per bin, accuracy per bin) in `curves`,
    accuracy against mean confidence, with the diagonal a perfectly calibrated model follows."""
    with _figure(path, (5.2, 5.0), title) as (fig, ax):
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
        for i, (label, confidence, accuracy) in enumerate(curves):
            ax.plot(confidence, accuracy, ("-", "--", "-.", ":")[i % 4],  # coinciding curves show
                    marker="osD^v"[i % 5], markersize=8 - 1.5 * min(i, 3), color=f"C{i}",
                    label=label)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence (probability of the predicted class)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    return fig


def plot_roc_pr(curves, path=None, title=""):
    """ROC (left) and precision-recall (right) curves side by side. `curves`: (label, fpr, tpr,
    auc, recall, precision, average precision[, class index for the colour]), one per class
    (one-vs-rest), or one for two classes. Chance is the diagonal on the left."""
    with _figure(path, (10, 4.0), title, grid=(1, 2)) as (fig, (roc, pr)):
        roc.plot([0, 1], [0, 1], ":", color="grey", label="chance")
        for i, (label, fpr, tpr, auc, recall, precision, ap, *index) in enumerate(curves):
            color = f"C{(index[0] if index else i) % 10}"  # a class's colour, as in the projection
            roc.plot(fpr, tpr, color=color, label=f"{label} (AUC {auc:.3f})")
            pr.plot(recall, precision, drawstyle="steps-post", color=color,  # as sklearn draws it
                    label=f"{label} (AP {ap:.3f})")
        for ax, (x, y, name) in zip((roc, pr), (
                ("false positive rate", "true positive rate", "ROC"),
                ("recall", "precision", "Precision-recall"))):
            ax.set_xlim(-0.01, 1.01), ax.set_ylim(-0.01, 1.02)
            ax.set_xlabel(x), ax.set_ylabel(y), ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small", loc="lower right" if ax is roc else "best")
    return fig


def plot_projection(points, labels, class_names, mistakes, path=None, title="", note=""):
    """A 2-D scatter of `points` ((n, 2)), one colour per class, with the rows where `mistakes`
    is true circled in black. Up to 20 classes get their own colour and legend entry."""
    points, labels, mistakes = np.asarray(points), np.asarray(labels), np.asarray(mistakes, bool)
    colours = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    with _figure(path, (8.5, 6.2), title) as (fig, ax):
        for label, name in enumerate(class_names):
            here = labels == label
            if here.any():
                ax.scatter(points[here, 0], points[here, 1], s=14, alpha=0.7,
                           color=colours(label % colours.N),
                           label=name if len(class_names) <= 20 else None)
        if mistakes.any():
            ax.scatter(points[mistakes, 0], points[mistakes, 1], s=70, facecolors="none",
                       edgecolors="black", linewidths=1.3,
                       label=f"misclassified ({mistakes.sum()})")
        ax.set_xlabel("first principal component"), ax.set_ylabel("second principal component")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
        if note:
            fig.supxlabel(note, fontsize="small")
    return fig
