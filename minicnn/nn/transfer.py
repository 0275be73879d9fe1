"""Transfer learning: freeze a trained base, give it a new head, fine-tune.

    model = minicnn.load("base.npz")             # trained on other classes
    replace_head(model, num_classes=2)           # a fresh last Dense for the new classes
    freeze(model, up_to=-2)                      # every layer but the head: trainable = False
    model.compile("adam", metrics=["accuracy"]); model.fit(...)     # trains the head only
    unfreeze(model)
    model.compile(Adam(1e-4), metrics=["accuracy"]); model.fit(...) # fine-tunes everything

A frozen layer (layer.trainable = False, Keras's name) gets no update from any optimiser, not
even weight decay; its backward computes no weight gradient, and a Sequential runs no backward
at all through the frozen layers before its first trainable one; a frozen BatchNorm
normalises with its running statistics and keeps them, in training mode too (Keras 3's rule).
The flags are part of the model's description: they survive save and load, checkpoints and
--resume. After unfreezing, compile again: a fresh optimiser starts Adam's bias correction
afresh for the layers that join (minicnn.nn.optim.Adam's known limit).
"""
import numbers

import numpy as np

from minicnn.nn.containers import Sequential
from minicnn.nn.layers import Dense, walk


def freeze(model, up_to=None):
    """Freeze model's layers: all of them (up_to None), or its top-level layers up to and
    including up_to (a Sequential's layer, its index, negative ones counted from the end, or its
    name in model.named_layers(), "3"); the later ones are made trainable. -> model."""
    if up_to is None:
        model.trainable = False
        return model
    layers = model.layers()
    last = _index_of(model, layers, up_to)
    for i, layer in enumerate(layers):
        layer.trainable = i > last
    return model


def unfreeze(model):
    """Make every layer of model trainable again. -> model."""
    model.trainable = True
    return model


def _index_of(model, layers, up_to):
    """The index among model's top-level layers of up_to (a layer, an index or a name)."""
    if isinstance(up_to, numbers.Integral) and not isinstance(up_to, bool):
        if not -len(layers) <= up_to < len(layers):
            raise ValueError(f"freeze up_to={up_to} is not a layer index of a model of "
                             f"{len(layers)} layers.")
        return up_to % len(layers)
    if isinstance(up_to, str):
        names = [name for name, _ in model.named_layers()]
        if up_to not in names:
            raise ValueError(f"freeze up_to={up_to!r} names no layer of the model (its names: "
                             f"{', '.join(names)}).")
        return names.index(up_to)
    for i, layer in enumerate(layers):
        if layer is up_to:
            return i
    raise ValueError(f"freeze up_to={up_to!r} is not one of the model's top-level layers; give "
                     f"the layer itself, its index or its name.")


def head_of(model):
    """(parent Sequential, index) of model's last Dense layer, the head that replace_head swaps;
    ValueError when there is none, or it is not directly in a Sequential."""
    found = None
    for layer in walk(model):
        if isinstance(layer, Sequential):
            found = next(((layer, i) for i in reversed(range(len(layer)))
                          if isinstance(layer[i], Dense)), found)
    if found is None:
        raise ValueError("the model has no Dense layer in a Sequential to replace as its head.")
    return found


def replace_head(model, num_classes, rng=None):
    """Put a fresh Dense(in_features, num_classes) (PyTorch's initialisation, the old head's
    dtype and bias) in place of model's last Dense layer; trainable, on the CPU (model.to
    moves it). -> the new head."""
    parent, i = head_of(model)
    old = parent[i]
    head = Dense(old.in_features, num_classes, bias="bias" in old.params, dtype=old.dtype,
                 rng=rng if rng is not None else np.random.default_rng())
    parent._layers[i] = head
    return head
