"""Saving and loading models: a layer tree as a JSON description plus its arrays in one file.

layer_config(model) describes the architecture, layer_from_config rebuilds it; save_model and
load write and read the whole model (minicnn.nn.serialization holds the file format)."""
from minicnn.errors import CheckpointError
from minicnn.nn.layers import LAYER_TYPES
from minicnn.nn.serialization import read_archive, write_archive


def layer_config(layer):
    """{"type": class name, **constructor arguments}, nested for containers.

    Only minicnn's own layer classes: a file must say how to rebuild every layer it holds."""
    name = type(layer).__name__
    if LAYER_TYPES.get(name) is not type(layer):
        raise ValueError(f"{name} is not one of minicnn's layers ({', '.join(LAYER_TYPES)}), so "
                         f"a model holding it cannot be saved and rebuilt; save its params "
                         f"with numpy.savez instead.")
    return {"type": name, **layer.config()}


def layer_from_config(config):
    """Rebuild a layer (fresh parameters) from layer_config's output."""
    config = dict(config)
    name = config.pop("type", None)
    cls = LAYER_TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown layer type {name!r} in config")
    return cls.from_config(config)


def save_model(model, path, extra=None, arrays=None):
    """Write model (architecture, params, state) plus optional extra header and arrays."""
    payload = {f"param:{k}": v for k, v in model.params.items()}
    payload.update({f"state:{k}": v for k, v in model.state.items()})
    payload.update(arrays or {})
    write_archive(path, {"model": layer_config(model), "extra": extra or {}}, payload)


def model_from_archive(path, header, arrays):
    """Build the model described by a read_archive() result and fill its arrays."""
    if "model" not in header:
        raise CheckpointError(f"{path} is a minicnn file without a model.")
    try:
        model = layer_from_config(header["model"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} describes a model this minicnn cannot build ({e}).") from None
    for kind, live in (("param", model.params), ("state", model.state)):
        stored = {k.split(":", 1)[1]: v for k, v in arrays.items() if k.startswith(kind + ":")}
        if set(stored) != set(live):
            raise CheckpointError(f"{path} does not match its model description "
                                  f"({kind} names differ).")
        for name, target in live.items():
            if stored[name].shape != target.shape:
                raise CheckpointError(f"{path} was written by another model: {name} has shape "
                                      f"{stored[name].shape}, expected {target.shape}.")
            target[...] = stored[name]
    return model


def load(path):
    """Read a file written by Sequential.save (or a training checkpoint) and return the model."""
    header, arrays = read_archive(path)
    return model_from_archive(path, header, arrays)
