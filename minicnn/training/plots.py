"""PNG figures of a training run: learning curves, a confusion matrix, a grid of predictions.

Figures are drawn on matplotlib's object API with the Agg canvas and never through pyplot,
so no global backend or figure state is touched. Each file is written atomically: to a
temporary file in the same directory, then renamed over ``path`` with ``os.replace``.
"""
import os
import uuid
import warnings

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from minicnn.datasets.loading import printable

RIGHT, WRONG = "tab:green", "tab:red"


def _label(name):
    """A class name as matplotlib text: loading.printable's one line (bytes that are not UTF-8
    as \\xNN, a newline as \\n), with "$" escaped so no name is read as mathtext."""
    return printable(name).replace("$", r"\$")


def _save_png(fig, path):
    """Write fig to path as a PNG without ever leaving a partial file at path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # open(..., "xb") rather than tempfile.mkstemp: the file gets the usual umask permissions
    # instead of mkstemp's 0600, and those carry over through the rename.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    FigureCanvasAgg(fig)                                           # attaches itself to fig
    try:
        with open(tmp, "xb") as f, warnings.catch_warnings():
            # A class name with a character the font lacks (an emoji) is drawn as a box.
            warnings.filterwarnings("ignore", message="Glyph .* missing from")
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):                                    # only when a step failed
            os.remove(tmp)


def _series(history, key):
    """history[key] as float64 with NaN for None entries, or None if the series is absent."""
    values = history.get(key)
    if values is None or all(v is None for v in values):
        return None
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def plot_curves(history, path):
    """Loss and accuracy per epoch, train against validation, side by side.

    history: dict of equal-length lists "epoch", "train_loss", "train_acc" and, optionally,
    "val_loss", "val_acc"; a missing or None validation series (or None entries in one,
    for epochs without validation) is left out of the plot.
    """
    epochs = np.asarray(history["epoch"])
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, metric, title in zip(fig.subplots(1, 2), ("loss", "acc"), ("loss", "accuracy")):
        for split in ("train", "val"):
            values = _series(history, f"{split}_{metric}")
            if values is not None:
                seen = ~np.isnan(values)                           # join the epochs that have one
                ax.plot(epochs[seen], values[seen], marker="o", markersize=3, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    _save_png(fig, path)


def plot_history(history, path):
    """plot_curves for a Keras-style History (model.fit's): its "loss", "accuracy",
    "val_loss" and "val_accuracy" lists (or the History's .history dict)."""
    h = getattr(history, "history", history)
    epochs = len(h["loss"])
    plot_curves({"epoch": list(range(1, epochs + 1)), "train_loss": h["loss"],
                 "train_acc": h.get("accuracy"), "val_loss": h.get("val_loss"),
                 "val_acc": h.get("val_accuracy")}, path)


def plot_confusion(confusion, class_names, path, normalize=True):
    """A heatmap of a (K, K) confusion matrix, rows = true class, columns = predicted.

    normalize=True colours each row by its fraction of the true class and annotates
    cells with that percentage above the count; otherwise the raw counts are shown.
    Cell annotations are left out above 20 classes, where they would not be legible.
    Class names may be any string (loading.printable shows them; "$" is not mathtext).
    """
    counts = np.asarray(confusion, dtype=np.int64)                 # (K, K)
    num_classes = counts.shape[0]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names given for {num_classes} classes.")
    if normalize:
        support = counts.sum(axis=1, keepdims=True)                # (K, 1)
        shown = np.divide(counts, support, out=np.zeros(counts.shape), where=support != 0)
    else:
        shown = counts.astype(np.float64)

    side = max(4.0, 0.6 * num_classes + 2.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, label="fraction of true class" if normalize else "count")
    ticks = np.arange(num_classes)
    labels = [_label(name) for name in class_names]
    ax.set_xticks(ticks, labels=labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if num_classes <= 20:
        dark = shown > 0.5 * shown.max()                           # white text on dark cells
        for i in range(num_classes):
            for j in range(num_classes):
                text = f"{100 * shown[i, j]:.0f}%\n{counts[i, j]}" if normalize else str(counts[i, j])
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if dark[i, j] else "black")
    _save_png(fig, path)


def _to_hwc(images):
    """uint8 images (N, 3, H, W) or (N, H, W, 3) as (N, H, W, 3).

    Channels-first is assumed when axis 1 has size 3 and the last axis does not.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"images must be uint8 of shape (N, 3, H, W) or (N, H, W, 3), "
                         f"got {images.dtype} {images.shape}.")
    if images.shape[1] == 3 and images.shape[3] != 3:
        return images.transpose(0, 2, 3, 1)
    return images


def plot_predictions(images, y_true, y_pred, class_names, path, probs=None):
    """A grid of up to 25 images (5 per row) titled "predicted / true".

    images: uint8 (N, 3, H, W) or (N, H, W, 3); y_true, y_pred: (N,) class indices;
    probs: optional (N, K) probabilities, whose value for the predicted class is shown.
    Correct predictions get a green title and frame, mistakes a red one.
    """
    images = _to_hwc(images)[:25]                                  # (n, H, W, 3)
    n = images.shape[0]
    if n == 0:
        raise ValueError("plot_predictions needs at least one image, got none.")
    cols = min(n, 5)
    rows = -(-n // cols)                                           # ceil(n / cols)
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_axis_off()
            continue
        true, pred = int(y_true[i]), int(y_pred[i])
        colour = RIGHT if pred == true else WRONG
        ax.imshow(images[i], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)
        confidence = f" {100 * probs[i][pred]:.0f}%" if probs is not None else ""
        ax.set_title(f"{_label(class_names[pred])}{confidence} / {_label(class_names[true])}",
                     color=colour, fontsize=9)
    _save_png(fig, path)
