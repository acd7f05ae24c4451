"""Figures written next to the models: PNG files drawn with matplotlib's Agg backend.

Figures are built with `matplotlib.figure.Figure` and an Agg canvas rather than pyplot, so no
global figure state is kept between calls and no display is ever needed.
"""
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import files

PANELS = (("accuracy", "Accuracy"), ("loss", "Loss"))


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
    """Atomically, like every other output: a reader never sees half a PNG."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with files.replacing(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def plot_confusion_matrix(matrix, class_names, path, title=""):
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


def plot_misclassified_grid(pictures, path, title="", columns=5):
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


def plot_reliability(curves, path, title=""):
    """A reliability diagram: for each (label, confidence per bin, accuracy per bin) in `curves`,
    accuracy against mean confidence, with the diagonal a perfectly calibrated model follows."""
    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for i, (label, confidence, accuracy) in enumerate(curves):
        ax.plot(confidence, accuracy, "-", marker="o", color=f"C{i}", label=label)
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    if title:
        ax.set_title(title)
    _save(fig, path)
    return fig
