"""python -m minicnn.inspect: pictures of what a trained network learned.

    python -m minicnn.inspect --checkpoint runs/keras-tutorial/best.npz cat.jpg ship.png
    python -m minicnn.inspect --checkpoint best.npz cat.jpg --layers 0,3 --out pictures

Writes to --out DIR (default: inspect):
    filters.png            the first Conv2D's filters, one tile each (RGB when they read 3 channels)
    <image>_features.png   the image, then the feature maps of the chosen layers (default: every
                           Conv2D's output), one tile per channel
    <image>_saliency.png   the saliency map (Simonyan et al., "Deep Inside Convolutional
                           Networks", 2014): |d score of the predicted class / d input pixel|,
                           the largest over the colour channels, beside and over the image

Images are read and normalised as python -m minicnn.predict reads them (the checkpoint's size
and statistics). The same in Python, on any minicnn model:

    from minicnn import inspect as mi
    maps = mi.feature_maps(model, x)            # {layer name: (C, H, W)} for x's first image
    s = mi.saliency(model, x)                   # s.maps (N, H, W), s.classes: the predicted
    mi.plot_filters(model, "filters.png")
"""
import argparse
import contextlib
import os
import re
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure

from minicnn.backend import array_module, to_numpy
from minicnn.datasets import loading as datasets
from minicnn.errors import UsageError
from minicnn.nn.containers import Residual, Sequential
from minicnn.nn.layers import Conv2D, Dropout, walk
from minicnn.ops import softmax
from minicnn.training.checkpoint import load_for_inference
from minicnn.training.cli import run
from minicnn.training.plots import _label, _save_png
from minicnn.training.predict import read_images


# ---- running a model one layer at a time -----------------------------------------------------
def join_names(prefix, name):
    """A sub-layer's name: "3" and "body" -> "3.body"; "" and "0" -> "0"."""
    return f"{prefix}.{name}" if prefix else name


def named_layers(model, prefix=""):
    """[(name, layer)] of every layer inside model that is not a container, and of every
    Residual block (its output is the sum), in forward order. A name is the prefix of the
    layer's parameters: model.params["3.body.0.weight"] belongs to "3.body.0"."""
    if isinstance(model, Sequential):
        return [pair for name, sub in model.named_layers()
                for pair in named_layers(sub, join_names(prefix, name))]
    if isinstance(model, Residual):
        return [pair for name, sub in model.named_layers()
                for pair in named_layers(sub, join_names(prefix, name))] + [(prefix, model)]
    return [(prefix, model)]


def forward_layers(model, x, training=False):
    """model's output for x, run one layer at a time in the order its lists give ->
    (y, {layer name: its output}).

    This is what Sequential.forward does under minicnn.use("reference"), on any implementation:
    no ReLU moved after a MaxPool2D and no cropping of the input (Sequential.schedule and
    needed_input), so every layer's output means the same thing on every implementation."""
    outputs = {}
    return _forward(model, x, "", training, outputs), outputs


def _forward(layer, x, name, training, outputs):
    if isinstance(layer, Sequential):
        for sub_name, sub in layer.named_layers():
            x = _forward(sub, x, join_names(name, sub_name), training, outputs)
        return x
    if isinstance(layer, Residual):                     # y = body(x) + shortcut(x)
        y = _forward(layer.body, x, join_names(name, "body"), training, outputs)
        s = x if layer.shortcut is None else _forward(layer.shortcut, x,
                                                      join_names(name, "shortcut"), training, outputs)
        outputs[name] = y + s
        return outputs[name]
    outputs[name] = layer.forward(x, training)
    return outputs[name]


def backward_layers(model, dy):
    """The backward of forward_layers(model, x, training=True): dy (the output's shape) ->
    (dx, {layer name: d loss / d that layer's input}); each layer's grads are filled."""
    input_grads = {}
    return _backward(model, dy, "", input_grads), input_grads


def _backward(layer, dy, name, input_grads):
    if isinstance(layer, Sequential):
        for sub_name, sub in reversed(layer.named_layers()):
            dy = _backward(sub, dy, join_names(name, sub_name), input_grads)
        return dy
    if isinstance(layer, Residual):                     # dx = body'(dy) + shortcut'(dy)
        dx = _backward(layer.body, dy, join_names(name, "body"), input_grads)
        dx = dx + (dy if layer.shortcut is None else
                   _backward(layer.shortcut, dy, join_names(name, "shortcut"), input_grads))
        input_grads[name] = dx
        return dx
    input_grads[name] = layer.backward(dy)
    return input_grads[name]


# ---- saliency ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _inference_with_backward(model):
    """The model computes what it computes at inference, but keeps what backward needs: every
    layer frozen (trainable = False: BatchNorm on its running statistics, its backward the
    affine map's; no weight gradients) and every Dropout's p at 0, both restored afterwards.
    Freezing zeroes a layer's grads, as setting trainable = False always does."""
    layers = [layer for layer in walk(model) if not layer.is_container]
    trainable = [layer.trainable for layer in layers]
    dropout = {layer: layer.p for layer in layers if isinstance(layer, Dropout)}
    try:
        for layer in layers:
            layer.trainable = False
        for layer in dropout:
            layer.p = 0.0
        yield
    finally:
        for layer, value in zip(layers, trainable):
            layer.trainable = value
        for layer, p in dropout.items():
            layer.p = p


def input_gradient(model, x, classes=None):
    """d score[n, classes[n]] / d x[n] for each image n, through minicnn's own backward.

    x (N, C, H, W); score: the model's output (the logits); classes (N,) ints, default the
    predicted ones. Each image's score depends on that image only (inference mode:
    _inference_with_backward), so one backward of a one-hot dy gives every image's gradient.
    -> (dx (N, C, H, W) on x's device, logits (N, K) NumPy, classes (N,) NumPy)."""
    xp = array_module(x)
    with _inference_with_backward(model):
        logits, _ = forward_layers(model, x, training=True)            # (N, K)
        scores = to_numpy(logits)
        classes = scores.argmax(axis=1) if classes is None else np.asarray(classes)
        dy = xp.zeros_like(logits)                                     # (N, K)
        dy[xp.arange(len(dy)), xp.asarray(classes)] = 1                # d score / d logits
        dx, _ = backward_layers(model, dy)
    return dx, scores, classes


class Saliency(NamedTuple):
    """saliency()'s result, NumPy: maps (N, H, W), the classes they are for (N,), logits (N, K)."""
    maps: np.ndarray
    classes: np.ndarray
    logits: np.ndarray


def saliency(model, x, classes=None):
    """Saliency maps, max over channels of |d score[class] / d x| (Simonyan et al. 2014,
    section 3), for x (N, C, H, W) -> Saliency(maps (N, H, W), classes, logits); classes
    default the predicted ones."""
    dx, logits, classes = input_gradient(model, x, classes)
    return Saliency(np.abs(to_numpy(dx)).max(axis=1), classes, logits)


# ---- filters and feature maps ------------------------------------------------------------------
def first_conv(model):
    """(name, the first Conv2D layer), or UsageError when the model has none."""
    for name, layer in named_layers(model):
        if isinstance(layer, Conv2D):
            return name, layer
    raise UsageError("The model has no Conv2D layer, so it has no filters to draw.")


def mosaic(tiles, columns=8, fill=np.nan):
    """tiles (T, h, w) or (T, h, w, 3), each scaled on its own to [0, 1] (a constant tile is 0),
    laid out in rows of `columns` with a 1-pixel border of `fill` ->
    (rows*(h+1)+1, columns*(w+1)+1[, 3]) float64."""
    tiles = np.asarray(tiles, dtype=np.float64)
    t, h, w = tiles.shape[:3]
    axes = tuple(range(1, tiles.ndim))
    low = tiles.min(axis=axes, keepdims=True)
    span = tiles.max(axis=axes, keepdims=True) - low
    tiles = np.divide(tiles - low, span, out=np.zeros_like(tiles), where=span > 0)
    columns = min(columns, t)
    rows = -(-t // columns)
    out = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1) + tiles.shape[3:], fill)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[1 + r * (h + 1):(r + 1) * (h + 1), 1 + c * (w + 1):(c + 1) * (w + 1)] = tile
    return out


def filter_grid(weight, columns=8):
    """A first layer's weight (F, C, KH, KW) as one picture: each filter a tile, RGB when C is
    3 (the colours it responds to), else the mean over its channels; white borders ->
    (rows*(KH+1)+1, columns*(KW+1)+1[, 3]) in [0, 1]."""
    w = to_numpy(weight).astype(np.float64)
    if w.shape[1] == 3:
        return mosaic(w.transpose(0, 2, 3, 1), columns, fill=1.0)     # (F, KH, KW, 3)
    return mosaic(w.mean(axis=1), columns)


def layer_choices(model):
    """'0 (Conv2D), 1 (ReLU), ...': the names feature_maps takes, for messages."""
    return ", ".join(f"{name} ({type(layer).__name__})" for name, layer in named_layers(model))


def check_layers(model, layers):
    """layers (names) as a list, or UsageError naming the first unknown one and the choices;
    None -> the name of every Conv2D."""
    names = dict(named_layers(model))
    if layers is None:
        return [name for name, layer in names.items() if isinstance(layer, Conv2D)]
    for name in layers:
        if name not in names:
            raise UsageError(f"The model has no layer {name!r}; choose from: "
                             f"{layer_choices(model)}.")
    return list(layers)


def feature_maps(model, x, layers=None):
    """{layer name: its output for x's first image, (C, H, W) NumPy} for the named layers
    (default: every Conv2D), at inference. x (N, C, H, W), or one image (C, H, W).
    UsageError for an unknown name or a layer whose output is not a stack of maps."""
    layers = check_layers(model, layers)
    x = x[None] if x.ndim == 3 else x
    _, outputs = forward_layers(model, x[:1])
    maps = {}
    for name in layers:
        out = outputs[name]
        if out.ndim != 4:
            raise UsageError(f"Layer {name} ({type(dict(named_layers(model))[name]).__name__}) "
                             f"gives (N, {out.shape[1]}), not feature maps; choose a layer before "
                             f"Flatten: {layer_choices(model)}.")
        maps[name] = to_numpy(out[0])
    return maps


# ---- pictures ----------------------------------------------------------------------------------
def plot_filters(model, path, columns=8):
    """Draw the first Conv2D's filters (filter_grid) to path (PNG)."""
    name, conv = first_conv(model)
    grid = filter_grid(conv.params["weight"], columns)
    f, c, kh, kw = conv.params["weight"].shape
    fig = Figure(figsize=(0.5 + 0.45 * min(columns, f), 0.9 + 0.45 * grid.shape[0] / (kh + 1)),
                 layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray", interpolation="nearest")
    ax.set_title(f"layer {name}: {f} filters {kh}x{kw}" + (" (RGB)" if c == 3 else
                                                           f" (mean of {c} channels)"), fontsize=9)
    ax.set_axis_off()
    _save_png(fig, path)


def plot_feature_maps(image, maps, path, columns=8, title=""):
    """The image (uint8 (3, H, W)) and beside it each layer's maps ({name: (C, h, w)}) as a
    mosaic, each map scaled to its own range (dark: low, yellow: high), to path (PNG)."""
    fig = Figure(figsize=(3 + 3.2 * len(maps), 3.6), layout="constrained")
    axes = fig.subplots(1, 1 + len(maps), squeeze=False)[0]
    axes[0].imshow(np.asarray(image).transpose(1, 2, 0), interpolation="nearest")
    axes[0].set_title(title or "image", fontsize=9)
    for ax, (name, m) in zip(axes[1:], maps.items()):
        ax.imshow(mosaic(m, columns), cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {name}: {m.shape[0]} maps {m.shape[1]}x{m.shape[2]}", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    _save_png(fig, path)


def plot_saliency(image, sal, path, title=""):
    """The image (uint8 (3, H, W)), its saliency map (H, W) and the map over the image, to
    path (PNG)."""
    rgb = np.asarray(image).transpose(1, 2, 0)
    fig = Figure(figsize=(7.5, 2.9), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_title(title or "image", fontsize=9)
    axes[1].imshow(sal, cmap="hot", interpolation="nearest")
    axes[1].set_title("saliency |d score / d pixel|", fontsize=9)
    axes[2].imshow(rgb, interpolation="nearest")
    axes[2].imshow(sal, cmap="hot", alpha=0.6, interpolation="nearest")
    axes[2].set_title("over the image", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    _save_png(fig, path)


def _stems(images):
    """A distinct file-name stem per image path, in safe characters: its name without the
    extension, or folder_name where two images share a name (cat/0000.jpg, ship/0000.jpg),
    and a count after a name seen before."""
    def safe(text):
        return re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    names = [safe(os.path.splitext(os.path.basename(path))[0]) for path in images]
    stems, seen = [], {}
    for path, name in zip(images, names):
        if names.count(name) > 1:
            name = f"{safe(os.path.basename(os.path.dirname(os.path.abspath(path))))}_{name}"
        seen[name] = seen.get(name, 0) + 1
        stems.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return stems


def inspect_checkpoint(checkpoint, images, layers=None, out="inspect", prefix="",
                       backend="numpy"):
    """Draw the pictures the module docstring lists for a checkpoint of python -m minicnn.train
    and image files -> [paths written]. layers: names (default: every Conv2D's output)."""
    net = load_for_inference(checkpoint, backend)
    layers = check_layers(net.model, layers)
    batch, _ = read_images(images, net.size)                           # uint8 (N, 3, H, W)
    x = datasets.normalize(batch, net.mean, net.std, net.xp)           # as the run normalised
    sal = saliency(net.model, x)
    probs = softmax(sal.logits)                                        # (N, K)
    written = [os.path.join(out, f"{prefix}filters.png")]
    plot_filters(net.model, written[0])
    for i, stem in enumerate(_stems(images)):
        k = int(sal.classes[i])
        title = f"{_label(net.classes[k])} {probs[i, k]:.2f}"
        paths = [os.path.join(out, f"{prefix}{stem}_{what}.png") for what in ("features",
                                                                              "saliency")]
        plot_feature_maps(batch[i], feature_maps(net.model, x[i:i + 1], layers), paths[0],
                          title=title)
        plot_saliency(batch[i], sal.maps[i], paths[1], title=title)
        written += paths
    return written


# ---- the command -------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minicnn.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .npz written by minicnn.train")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any Pillow format)")
    parser.add_argument("--layers", default=None,
                        help="comma-separated layer names whose feature maps to draw, e.g. 0,3 "
                             "(default: every Conv2D; a wrong name lists the choices)")
    parser.add_argument("--out", default="inspect", help="output directory (default inspect)")
    parser.add_argument("--prefix", default="", help="put before every file name written")
    parser.add_argument("--backend", default="numpy", help="numpy (CPU) or cupy (GPU)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _main(argv):
    args = build_parser().parse_args(argv)
    layers = None if args.layers is None else [n.strip() for n in args.layers.split(",")]
    for path in inspect_checkpoint(args.checkpoint, args.images, layers, args.out, args.prefix,
                                   args.backend):
        print(path)
    return 0


def main(argv=None):
    """The command line: exit status 0, or 2 with one sentence on stderr for bad input."""
    return run(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
