"""Saving and loading models: a layer tree as a JSON description plus its arrays in one file.

layer_config(model) describes the architecture, layer_from_config rebuilds it; save_model and
load write and read the whole model (minicnn.nn.serialization holds the file format and checks
the file itself, minicnn.nn.schema what a description may say).

A file's arrays are "param:<name>" and "state:<name>", one for each array of the model, and in
a training checkpoint "optim:<param>:<buffer>" (a buffer of OPTIMIZER_BUFFERS, of its param's
shape and dtype). model_from_archive checks the description, then that the arrays are exactly
these, of the shapes and dtypes the description implies, reading only the .npy headers; only
then does it build the model and copy the arrays in, one at a time. Memory: the model's
parameters and gradients (twice its arrays; at the peak three times, while a layer draws its
initial weights in float64) and the one array being read.
"""
from minicnn.errors import CheckpointError
from minicnn.nn.layers import LAYER_TYPES
from minicnn.nn.schema import SchemaError, check_model
from minicnn.nn.serialization import array_specs, open_archive, show, write_archive

# minicnn.nn.optim's per-parameter state: SGD's "momentum", Adam's and AdamW's two moments.
OPTIMIZER_BUFFERS = ("momentum", "exp_avg", "exp_avg_sq")


def layer_config(layer):
    """{"type": class name, **constructor arguments}, nested for containers, and
    "trainable": false for a frozen layer (a container's flag is its layers').

    Only minicnn's own layer classes: a file must say how to rebuild every layer it holds."""
    name = type(layer).__name__
    if LAYER_TYPES.get(name) is not type(layer):
        raise ValueError(f"{name} is not one of minicnn's layers ({', '.join(LAYER_TYPES)}), so "
                         f"a model holding it cannot be saved and rebuilt; save its params "
                         f"with numpy.savez instead.")
    frozen = {} if layer.is_container or layer.trainable else {"trainable": False}
    return {"type": name, **layer.config(), **frozen}


def layer_from_config(config):
    """Rebuild a layer (fresh parameters) from layer_config's output."""
    config = dict(config)
    name = config.pop("type", None)
    trainable = config.pop("trainable", True)
    cls = LAYER_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown layer type {name!r} in config")
    layer = cls.from_config(config)
    if not trainable:
        layer.trainable = False
    return layer


def save_model(model, path, extra=None, arrays=None):
    """Write model (architecture, params, state) plus optional extra header and arrays."""
    payload = {f"param:{k}": v for k, v in model.params.items()}
    payload.update({f"state:{k}": v for k, v in model.state.items()})
    payload.update(arrays or {})
    write_archive(path, {"model": layer_config(model), "extra": extra or {}}, payload)


def check_archive(path, header, arrays):
    """Check header's model description and the arrays (an Archive or {name: array}) against
    each other, reading no array -> {"param:<name>" / "state:<name>": ArraySpec} of the model.
    Raises CheckpointError, one sentence naming path, for anything else."""
    if "model" not in header:
        raise CheckpointError(f"{path} is a minicnn file without a model.")
    try:
        expected = check_model(header["model"])
    except SchemaError as e:
        raise CheckpointError(f"{path} describes a model this minicnn cannot build "
                              f"({e}).") from None
    specs = array_specs(arrays)
    for name, spec in specs.items():
        group, _, rest = name.partition(":")
        param, _, buffer = rest.rpartition(":")
        if group == "optim" and f"param:{param}" in expected and buffer in OPTIMIZER_BUFFERS:
            want = expected[f"param:{param}"]                 # a buffer has its param's shape
        elif name in expected:
            want = expected[name]
        else:
            raise CheckpointError(f"{path} holds an array {show(name)} that its model does "
                                  f"not have.")
        if spec.shape != want.shape:
            raise CheckpointError(f"{path} was written by another model: {rest} has shape "
                                  f"{show(spec.shape)}, expected {want.shape}.")
        if spec.dtype.newbyteorder("=") != want.dtype:      # either byte order: copied in
            raise CheckpointError(f"{path} was written by another model: {rest} is "
                                  f"{spec.dtype}, expected {want.dtype}.")
    missing = [name for name in expected if name not in specs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path} does not match its model description: it has no array "
                              f"{show(missing[0])}{more}.")
    return expected


def model_from_archive(path, header, arrays):
    """Build the model described by an open_archive() (or read_archive()) result and fill its
    arrays, after check_archive: nothing is allocated for a file that fails a check."""
    check_archive(path, header, arrays)
    try:
        model = layer_from_config(header["model"])
    except ValueError as e:                   # a constructor's own check, in one sentence
        raise CheckpointError(f"{path} describes a model this minicnn cannot build "
                              f"({str(e).rstrip('.')}).") from None
    for group, live in (("param", model.params), ("state", model.state)):
        for name, target in live.items():
            target[...] = arrays[f"{group}:{name}"]            # an Archive reads it now
    return model


def load(path):
    """Read a file written by Sequential.save (or a training checkpoint) and return the model."""
    with open_archive(path) as archive:
        return model_from_archive(path, archive.header, archive)
