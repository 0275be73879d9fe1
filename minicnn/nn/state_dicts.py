"""state_dict and load_state_dict under PyTorch's names: weights in and out of minicnn.

A model's arrays already carry PyTorch's names and shapes (Container.params: a Sequential's
children are 0, 1, 2, ... or the names of a dict, a layer's arrays weight, bias, running_mean,
running_var). Two things are added here:
  - BatchNorm's num_batches_tracked, which torch keeps as an int64 scalar. minicnn does not
    count batches (its running statistics always use momentum; torch reads the count only when
    momentum=None), so state_dict writes 0 and load_state_dict accepts the key, present or
    absent, as an integer scalar, and ignores its value.
  - strictness: every key, shape and dtype is checked before anything is copied
    (check_state_dict, which minicnn.weights also runs on a file's header before it reads an
    array), and one StateDictError lists the missing, unexpected and mis-shaped keys.
"""
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from minicnn.backend import array_module, to_numpy
from minicnn.errors import StateDictError
from minicnn.nn.serialization import show

BATCHES_TRACKED = "num_batches_tracked"
_SHOWN = 5                      # keys of each kind an error message names


class Spec(NamedTuple):
    """What a value of a state dict is, before it is read: its shape, and its dtype's name
    (None when it is not an array of numbers NumPy can hold)."""
    shape: tuple
    dtype: str = None


def named_layers_flat(layer, prefix=""):
    """(prefix, layer) for every layer that is not a container, in forward order, prefix its
    arrays' name prefix ("layer1.0.bn1."); a sub-layer named "" adds nothing to it."""
    if not layer.is_container:
        yield prefix, layer
        return
    for name, sub in layer.named_layers():
        yield from named_layers_flat(sub, f"{prefix}{name}." if name else prefix)


def _is_batchnorm(layer):
    return "running_var" in layer.state


def state_dict(model):
    """{name: NumPy array}, copies of model's parameters and running statistics, in PyTorch's
    order and names (per layer: weight, bias, running_mean, running_var, num_batches_tracked:
    0 as int64, see the module docstring)."""
    out = {}
    for prefix, layer in named_layers_flat(model):
        for name, array in (*layer.params.items(), *layer.state.items()):
            out[prefix + name] = np.array(to_numpy(array))
        if _is_batchnorm(layer):
            out[prefix + BATCHES_TRACKED] = np.array(0, dtype=np.int64)
    return out


def _targets(model):
    """({name: the model's live array}, {names that may be given or not: num_batches_tracked})"""
    targets, optional = {}, set()
    for prefix, layer in named_layers_flat(model):
        targets.update({prefix + k: v for k, v in (*layer.params.items(),
                                                   *layer.state.items())})
        if _is_batchnorm(layer):
            optional.add(prefix + BATCHES_TRACKED)
    return targets, optional


def check_state_dict(model, specs, strict=True, source=None):
    """Check specs {name: Spec} (a state dict's keys, shapes and dtypes) against model's arrays;
    -> (missing keys, unexpected keys), or StateDictError (see load_state_dict) naming source
    (a file) when given."""
    targets, optional = _targets(model)
    missing = [k for k in targets if k not in specs]
    unexpected = [k for k in specs if k not in targets and k not in optional]
    mismatched = []
    for key, spec in specs.items():
        numbers = spec.dtype is not None and np.dtype(spec.dtype).kind in "iuf"
        if key in targets:
            want = tuple(targets[key].shape)
            if not numbers or tuple(spec.shape) != want:
                mismatched.append((key, _describe(spec), want))
        elif key in optional and not (numbers and np.dtype(spec.dtype).kind in "iu"
                                      and int(np.prod(spec.shape)) == 1):
            mismatched.append((key, _describe(spec, with_dtype=True), "an integer scalar"))
    if mismatched or (strict and (missing or unexpected)):
        raise StateDictError(_sentence(missing if strict else [], unexpected if strict else [],
                                       mismatched, source), missing, unexpected, mismatched)
    return missing, unexpected


def load_state_dict(model, mapping, strict=True, source=None):
    """Copy mapping {name: array} (NumPy arrays, torch tensors or anything np.asarray takes)
    into model's parameters and running statistics, each cast to its array's dtype and put on
    its device. -> (missing keys, unexpected keys).

    strict=True: the keys must be exactly state_dict(model)'s (num_batches_tracked may be left
    out). Either way a key whose shape differs, or whose value is not real numbers, is an error;
    every key is checked before anything is copied, so on a StateDictError the model is as it
    was. The error is one sentence naming the first few keys of each kind (and source, a file
    name, when given); the exception's .missing, .unexpected and .mismatched list them all.
    """
    if not isinstance(mapping, Mapping):
        raise StateDictError(f"load_state_dict takes a mapping of names to arrays, got "
                             f"{type(mapping).__name__}.")
    given = {key: _as_array(value) for key, value in mapping.items()}
    specs = {key: Spec(() if a is None else tuple(a.shape), None if a is None else a.dtype.name)
             for key, a in given.items()}
    missing, unexpected = check_state_dict(model, specs, strict, source)
    for key, target in _targets(model)[0].items():
        if key in given:
            target[...] = array_module(target).asarray(given[key].astype(target.dtype))
    return missing, unexpected


def _as_array(value):
    """value as a NumPy array, or None when it is not an array of numbers (a torch tensor is
    detached and brought to the CPU first; bfloat16, which NumPy lacks, as float32)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):         # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    try:
        array = np.asarray(to_numpy(value))
    except (TypeError, ValueError, RuntimeError):
        return None
    return array if array.dtype.kind in "biufc" else None


def _describe(spec, with_dtype=False):
    """"(4, 3)", or "complex64 (4, 3)" for values that are not real numbers (or with_dtype)."""
    if spec.dtype is None:
        return "not an array of numbers"
    if np.dtype(spec.dtype).kind in "iuf" and not with_dtype:
        return str(tuple(spec.shape))
    return f"{spec.dtype} {tuple(spec.shape)}"


def _keys(keys):
    shown = ", ".join(show(k) for k in keys[:_SHOWN])
    return shown + (f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _sentence(missing, unexpected, mismatched, source):
    parts = []
    if missing:
        parts.append(f"missing {_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected {_keys(unexpected)}")
    if mismatched:
        shown = [f"{show(k)} is {got}, expected {want}" for k, got, want in mismatched[:_SHOWN]]
        more = len(mismatched) - _SHOWN
        parts.append("mis-shaped " + "; ".join(shown) + (f" (and {more} more)" if more > 0
                                                           else ""))
    where = f"in {source} " if source is not None else ""
    return f"The weights {where}do not fit the model: " + "; ".join(parts) + "."
