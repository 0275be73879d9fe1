"""What a saved model's description may say: the schema that a file's "model" header is checked
against before any layer is built (minicnn.nn.model.model_from_archive).

A description is the tree layer_config writes: {"type": <a layer>, <argument>: <value>, ...},
the arguments exactly the constructor's (FIELDS; rng and kernel_initializer are not saved), a
Sequential's "layers" a list of descriptions, a Residual's "body" and "shortcut" one each; any
layer but a container may also say "trainable" (false: frozen).

    check_model(description) -> {"param:<name>" / "state:<name>": ArraySpec}
        every field of every layer checked (type, range, unknown or missing fields), and the
        arrays the model would have, computed from the numbers alone: a file that claims 2e9
        channels is refused before a byte is allocated, and its arrays can be compared with the
        .npy headers before anything is built.
    output_shape(description, (C, H, W)) -> (one image's output shape, largest layer size)
        one float32 image followed through the layers by arithmetic (conv_output_size,
        padding_for), as Sequential.summary would show it, without running anything: every
        layer must take what reaches it (shape, channels, dtype), as its forward checks.

Bounds: sizes (channels, features, kernel, stride, padding) at most MAX_SIZE, layers nested at
most MAX_DEPTH deep and MAX_LAYERS in all, MAX_PARAMETERS values in all the model's arrays, and
in output_shape MAX_ACTIVATION values per image in any layer's output or im2col matrix.
"""
import math
import numbers

import numpy as np

from minicnn.nn.layers import padding_for
from minicnn.nn.serialization import ArraySpec, show
from minicnn.ops.im2col import conv_output_size

MAX_SIZE = 2**24             # a channel or feature count, a kernel, stride or padding
MAX_DEPTH = 64               # layers inside layers
MAX_LAYERS = 100_000         # layers in a model, containers included
MAX_PARAMETERS = 2**31       # values in all the model's arrays (8 GiB of float32)
MAX_ACTIVATION = 2**26       # values per image in a layer's output or im2col (256 MiB float32)
DTYPES = ("float16", "float32", "float64")


class SchemaError(ValueError):
    """A model description that is not one minicnn can build: says where and what."""


class _Kind:
    """A kind of field value: ok(value) -> bool, and what it must be, in words."""

    def __init__(self, what, ok):
        self.what, self.ok = what, ok


def _is_int(v, low, high):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v <= high


def _is_pair(v, low):
    items = v if isinstance(v, list) and len(v) == 2 else [v]
    return all(_is_int(n, low, MAX_SIZE) for n in items)


def _is_number(v, low, high):
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and low <= v <= high)


SIZE = _Kind(f"a whole number from 1 to {MAX_SIZE:,}", lambda v: _is_int(v, 1, MAX_SIZE))
WINDOW = _Kind(f"a whole number from 1 to {MAX_SIZE:,}, or a list of two", lambda v: _is_pair(v, 1))
STRIDE = _Kind(f"a whole number from 1 to {MAX_SIZE:,}, a list of two, or null",
               lambda v: v is None or _is_pair(v, 1))
PADDING = _Kind(f'a whole number from 0 to {MAX_SIZE:,}, a list of two, "same" or "valid"',
                lambda v: v in ("same", "valid") if isinstance(v, str) else _is_pair(v, 0))
BOOL = _Kind("true or false", lambda v: isinstance(v, bool))
DTYPE = _Kind(" or ".join(map(repr, DTYPES)), lambda v: isinstance(v, str) and v in DTYPES)
PROBABILITY = _Kind("a number from 0 to 1", lambda v: _is_number(v, 0, 1))
POSITIVE = _Kind("a finite number above 0", lambda v: _is_number(v, 0, math.inf) and v > 0)
LAYER = _Kind("a layer description (a JSON object)", lambda v: isinstance(v, dict))
OPTIONAL_LAYER = _Kind("a layer description or null", lambda v: v is None or isinstance(v, dict))
NAMES = _Kind("a list of distinct names (text without dots)",
              lambda v: isinstance(v, list) and len(set(map(str, v))) == len(v)
              and all(isinstance(n, str) and "." not in n and len(n) <= 200 for n in v))
LAYER_LIST = _Kind(f"a list of at most {MAX_LAYERS:,} layer descriptions",
                   lambda v: isinstance(v, list) and len(v) <= MAX_LAYERS)

# Each layer's constructor arguments (its config()): {field: (kind, required)}.
_POOL = {"kernel_size": (WINDOW, True), "stride": (STRIDE, False), "padding": (PADDING, False)}
_BATCHNORM = {"num_features": (SIZE, True), "momentum": (PROBABILITY, False),
              "eps": (POSITIVE, False), "dtype": (DTYPE, False)}
FIELDS = {
    "Conv2D": {"in_channels": (SIZE, True), "out_channels": (SIZE, True),
               "kernel_size": (WINDOW, True), "stride": (WINDOW, False),
               "padding": (PADDING, False), "bias": (BOOL, False), "dtype": (DTYPE, False),
               "dilation": (WINDOW, False), "groups": (SIZE, False)},
    "MaxPool2D": _POOL,
    "AvgPool2D": _POOL,
    "GlobalAveragePooling2D": {},
    "Dense": {"in_features": (SIZE, True), "out_features": (SIZE, True), "bias": (BOOL, False),
              "dtype": (DTYPE, False)},
    "Flatten": {},
    "ReLU": {},
    "Softmax": {},
    "Dropout": {"p": (PROBABILITY, False)},
    "BatchNorm2D": _BATCHNORM,
    "BatchNorm1D": _BATCHNORM,
    "Residual": {"body": (LAYER, True), "shortcut": (OPTIONAL_LAYER, False),
                 "names": (NAMES, False)},
    "Sequential": {"layers": (LAYER_LIST, True), "names": (NAMES, False)},
}

CONTAINERS = ("Residual", "Sequential")      # their trainable flag is their layers'


def _pair(value):
    return tuple(value) if isinstance(value, list) else (value, value)


def _children(config):
    """[(name prefix, description)] of a container's layers: a Sequential's named 0, 1, ... or
    by its "names", a Residual's "body" and "shortcut" or its "names"; a name "" adds nothing
    (minicnn.nn.containers: a sub-layer named "" lends its names to its container)."""
    if config["type"] == "Sequential":
        layers = config["layers"]
        names = config.get("names", [str(i) for i in range(len(layers))])
    else:
        layers = [config["body"], config.get("shortcut")]
        names = config.get("names", ["body", "shortcut"])
    return [(f"{name}." if name else "", sub) for name, sub in zip(names, layers)
            if sub is not None]


def _where(prefix):
    return f"layer {prefix[:-1]}" if prefix else "the top layer"


def check_model(config):
    """-> {"param:<name>" or "state:<name>": ArraySpec} of the model config describes; raises
    SchemaError (where, and what is wrong) for anything but a description layer_config could
    have written within the bounds of the module docstring. Allocates nothing."""
    specs, counts = {}, {"layers": 0, "values": 0}
    _check_layer(config, "", 0, specs, counts)
    return specs


def _check_layer(config, prefix, depth, specs, counts):
    where = _where(prefix)
    if depth > MAX_DEPTH:
        raise SchemaError(f"layers nest more than {MAX_DEPTH} deep at {where}")
    if not isinstance(config, dict):
        raise SchemaError(f"{where} is {show(config)}, not a layer description (a JSON object)")
    kind = config.get("type")
    if not isinstance(kind, str) or kind not in FIELDS:
        raise SchemaError(f"{where} has type {show(kind)}, not one of minicnn's layers "
                          f"({', '.join(FIELDS)})")
    counts["layers"] += 1
    if counts["layers"] > MAX_LAYERS:
        raise SchemaError(f"the model has more than {MAX_LAYERS:,} layers")
    fields = FIELDS[kind] if kind in CONTAINERS else {**FIELDS[kind], "trainable": (BOOL, False)}
    unknown = [f for f in config if f != "type" and f not in fields]
    if unknown:
        raise SchemaError(f"{where} ({kind}) has the field {show(unknown[0])}, which {kind} "
                          f"does not take")
    missing = [f for f, (_, required) in fields.items() if required and f not in config]
    if missing:
        raise SchemaError(f"{where} ({kind}) lacks its {missing[0]!r}")
    for field, (field_kind, _) in fields.items():
        if field in config and not field_kind.ok(config[field]):
            raise SchemaError(f"{where} ({kind}) has {field} {show(config[field])}, which must "
                              f"be {field_kind.what}")
    dtype = np.dtype(config.get("dtype", "float32"))
    arrays = []
    if kind == "Conv2D":
        kh, kw = _pair(config["kernel_size"])
        f, c, groups = config["out_channels"], config["in_channels"], config.get("groups", 1)
        if c % groups or f % groups:
            raise SchemaError(f"{where} (Conv2D) has groups {groups}, which does not divide "
                              f"both its in_channels {c} and out_channels {f}")
        arrays = [("param", "weight", (f, c // groups, kh, kw))]
        arrays += [("param", "bias", (f,))] if config.get("bias", True) else []
    elif kind == "Dense":
        f = config["out_features"]
        arrays = [("param", "weight", (f, config["in_features"]))]
        arrays += [("param", "bias", (f,))] if config.get("bias", True) else []
    elif kind.startswith("BatchNorm"):
        c = (config["num_features"],)
        arrays = [("param", "weight", c), ("param", "bias", c),
                  ("state", "running_mean", c), ("state", "running_var", c)]
    elif kind in ("MaxPool2D", "AvgPool2D"):
        padding, window = config.get("padding", 0), _pair(config["kernel_size"])
        if not isinstance(padding, str) and any(p > k // 2 for p, k in zip(_pair(padding), window)):
            raise SchemaError(f"{where} ({kind}) has padding {show(padding)}, more than half "
                              f"its window {show(list(window))}")
    if kind in ("Sequential", "Residual"):
        count = len(config["layers"]) if kind == "Sequential" else 2
        if len(config.get("names", [None] * count)) != count:
            raise SchemaError(f"{where} ({kind}) has {len(config['names'])} names for its "
                              f"{count} layers")
    for group, name, shape in arrays:
        if f"{group}:{prefix}{name}" in specs:
            raise SchemaError(f"two arrays of the model are named {show(prefix + name)} (at "
                              f"{where})")
        counts["values"] += math.prod(shape)
        if counts["values"] > MAX_PARAMETERS:
            raise SchemaError(f"the model has more than {MAX_PARAMETERS:,} parameter values "
                              f"(at {where}, {kind} of shape {show(shape)})")
        specs[f"{group}:{prefix}{name}"] = ArraySpec(shape, dtype)
    if kind in ("Sequential", "Residual"):
        for name, sub in _children(config):
            _check_layer(sub, prefix + name, depth + 1, specs, counts)


def output_shape(config, input_shape, dtype="float32", limit=MAX_ACTIVATION):
    """-> (the output shape of one image of input_shape (C, H, W) and dtype, the most values
    per image any layer makes) for a description check_model accepted; SchemaError when a
    layer cannot take its input, or makes more than limit values per image."""
    peak = [0]
    shape, _ = _follow(config, tuple(input_shape), dtype, "", peak, limit)
    return shape, peak[0]


def _follow(config, shape, dtype, prefix, peak, limit):
    """(shape, dtype) of one image after the layer config (at prefix), given them before it."""
    kind, where = config["type"], _where(prefix)

    def need(condition, why):
        if not condition:
            raise SchemaError(f"{where} ({kind}) cannot take the {show(shape)} that reaches it "
                              f"per image: {why}")

    def made(values, what):
        peak[0] = max(peak[0], values)
        if values > limit:
            raise SchemaError(f"{where} ({kind}) makes {values:,} {what} per image, more than "
                              f"{limit:,}")

    if kind == "Sequential":
        for name, sub in _children(config):
            shape, dtype = _follow(sub, shape, dtype, prefix + name, peak, limit)
        return shape, dtype
    if kind == "Residual":
        (body_name, body), *shortcut = _children(config)
        body = _follow(body, shape, dtype, prefix + body_name, peak, limit)
        other = ((shape, dtype) if not shortcut
                 else _follow(shortcut[0][1], shape, dtype, prefix + shortcut[0][0], peak, limit))
        need(body == other, f"its body gives {show(body[0])} {body[1]} and its shortcut "
                            f"{show(other[0])} {other[1]}")
        return body
    if "dtype" in FIELDS[kind]:                      # a layer with parameters: their dtype
        own = config.get("dtype", "float32")
        need(dtype == own, f"it takes {own} input, not {dtype}")
    if kind in ("Conv2D", "MaxPool2D", "AvgPool2D"):
        need(len(shape) == 3, "it takes (C, H, W) images")
        if kind == "Conv2D":
            need(shape[0] == config["in_channels"], f"it takes {config['in_channels']} channels")
        window = _pair(config["kernel_size"])
        default_stride = 1 if kind == "Conv2D" else config["kernel_size"]
        stride = _pair(config.get("stride") or default_stride)
        padding = config.get("padding", 0)
        dilation = _pair(config.get("dilation", 1))
        pads = padding_for(padding if isinstance(padding, str) else _pair(padding), window,
                           stride, *shape[1:], dilation)
        need(all(n + sum(p) >= d * (k - 1) + 1
                 for n, p, k, d in zip(shape[1:], pads, window, dilation)),
             f"its window {show(list(window))} is larger than the padded input")
        oh, ow = (conv_output_size(n, k, s, *p, d)
                  for n, p, k, s, d in zip(shape[1:], pads, window, stride, dilation))
        made(shape[0] * window[0] * window[1] * oh * ow, "window values")     # im2col, pooling
        shape = (config["out_channels"] if kind == "Conv2D" else shape[0], oh, ow)
    elif kind == "GlobalAveragePooling2D":
        need(len(shape) == 3, "it takes (C, H, W) images")
        shape = shape[:1]
    elif kind == "Flatten":
        need(len(shape) >= 1, "it takes arrays of at least one axis per image")
        shape = (math.prod(shape),)
    elif kind == "Dense":
        need(shape == (config["in_features"],), f"it takes {config['in_features']} features")
        shape = (config["out_features"],)
    elif kind == "BatchNorm2D":
        need(len(shape) == 3 and shape[0] == config["num_features"],
             f"it takes (C, H, W) images of {config['num_features']} channels")
    elif kind == "BatchNorm1D":
        need(shape == (config["num_features"],), f"it takes {config['num_features']} features")
    elif kind == "Softmax":
        need(len(shape) == 1, "it takes one score per class")
    made(math.prod(shape), "values")
    return shape, dtype
