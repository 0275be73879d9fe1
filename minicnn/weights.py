"""Weights in and out as files other libraries read: safetensors, and PyTorch state dicts.

    minicnn.load_weights(model, "resnet18-f37072fd.pth")       torchvision's ImageNet weights
    minicnn.load_weights(model, "model.safetensors", strict=False)
    minicnn.save_weights(model, "model.safetensors")            safetensors.torch.load_file reads it

The names are PyTorch's (model.state_dict(), minicnn.nn.state_dicts): a model whose layers are
torchvision's, such as minicnn.nn.zoo.resnet18, takes torchvision's file as it is.

Reading trusts nothing in the file. A .safetensors file is read through safetensors.numpy
(`pip install "minicnn[weights]"`; no torch needed): its header (names, shapes, dtypes) is
checked against the model before any array is read, and only then are the arrays read, one at
a time. Any other file is a PyTorch state dict, read only where torch is installed, and only by
torch.load(path, weights_only=True, map_location="cpu"), whose unpickler builds tensors and
plain containers and nothing else: a file is never unpickled by pickle itself. Files larger than
$MINICNN_MAX_FILE_BYTES (4 GiB by default) are refused before they are opened. Every problem
is one sentence naming the file: a CheckpointError (StateDictError for weights that do not fit
the model, UsageError for a reader that is not installed).
"""
import os

import numpy as np

from minicnn.errors import CheckpointError, UsageError
from minicnn.nn.serialization import atomic_write, max_file_bytes, show
from minicnn.nn.state_dicts import Spec, check_state_dict, load_state_dict, state_dict

# safetensors' dtype names -> NumPy's; the others (BF16, F8_*) have no NumPy dtype
SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8",
                      "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8",
                      "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_weights(model, path, strict=True):
    """Copy the weights in path (.safetensors, or a PyTorch state-dict file) into model, by
    PyTorch's names (model.load_state_dict). -> (missing keys, unexpected keys), both empty
    when strict (the default: the file must hold exactly the model's arrays)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Weights file {path} does not exist." if not os.path.exists(path)
                              else f"Weights file {path} is not a regular file.")
    size, limit = os.path.getsize(path), max_file_bytes()
    if size > limit:
        raise CheckpointError(f"{path} holds {size:,} bytes, more than MINICNN_MAX_FILE_BYTES "
                              f"({limit:,}) allows.")
    if path.endswith(".npz"):
        raise CheckpointError(f"{path} is a minicnn file, not a PyTorch or safetensors one: "
                              f"minicnn.load(path) reads it, and model.load_state_dict("
                              f"minicnn.load(path).state_dict()) copies its weights.")
    if _is_safetensors(path):
        return _load_safetensors(model, path, strict)
    return _load_torch(model, path, strict)


def save_weights(model, path):
    """Write model's state dict (PyTorch's names; num_batches_tracked too, so torch's strict
    load_state_dict takes it) to path as .safetensors, atomically (a temporary file renamed)."""
    save = _safetensors_numpy("writing")[0].save
    arrays = {k: np.ascontiguousarray(v) for k, v in state_dict(model).items()}
    data = save(arrays, metadata={"format": "pt"})       # "pt": transformers' loaders take it
    atomic_write(path, lambda f: f.write(data))


def _is_safetensors(path):
    """By the suffix, or for another name by the first bytes: an 8-byte header length, then
    the header's JSON "{"."""
    if path.endswith(".safetensors"):
        return True
    if path.endswith(TORCH_SUFFIXES):
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{"


def _safetensors_numpy(doing):
    """(safetensors.numpy, safetensors.safe_open), or UsageError saying what to install."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise UsageError(f"{doing.capitalize()} .safetensors files needs the safetensors "
                         f"package: pip install \"minicnn[weights]\".") from None
    return safetensors.numpy, safetensors.safe_open, safetensors.SafetensorError


def _load_safetensors(model, path, strict):
    _, safe_open, SafetensorError = _safetensors_numpy("reading")
    try:
        with safe_open(path, framework="numpy") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}
            specs = {key: Spec(tuple(s.get_shape()), SAFETENSORS_DTYPES.get(s.get_dtype()))
                     for key, s in slices.items()}
            unread = [f"{show(k)} ({slices[k].get_dtype()})" for k, s in specs.items()
                      if s.dtype is None]
            if unread:
                raise CheckpointError(f"{path} holds {unread[0]} arrays, a dtype NumPy cannot "
                                      f"read; save them as float32.")
            check_state_dict(model, specs, strict, source=path)   # before any array is read
            return load_state_dict(model, {key: f.get_tensor(key) for key in specs}, strict, path)
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file "
                              f"({_first_line(e)}).") from None


def _load_torch(model, path, strict):
    try:
        import torch
    except ImportError:
        raise UsageError(f"{path} is a PyTorch file, and reading it needs torch "
                         f"(pip install torch); or convert it to .safetensors where torch is "
                         f"installed (safetensors.torch.save_file).") from None
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        # a system error naming the file (permission, ...) stays in the system's words; any
        # other is about what the file holds (torch's zip reader meets a corrupt offset as an
        # OSError, EINVAL, that names no file)
        if isinstance(e, OSError) and e.filename is not None:
            raise
        raise CheckpointError(f"{path} is not a PyTorch state dict that torch.load("
                              f"weights_only=True) can read ({_first_line(e)}).") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        what = (f"a dict with the key {show(next(k for k in loaded if not isinstance(k, str)))}"
                if isinstance(loaded, dict) else type(loaded).__name__)
        raise CheckpointError(f"{path} does not hold a state dict (a dict of names to "
                              f"tensors) but {what}.")
    nested = [k for k in ("state_dict", "model_state_dict", "model") if isinstance(
        loaded.get(k), dict)]
    if nested and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} is a training checkpoint, not a state dict: its "
                              f"{nested[0]!r} entry may hold the weights; load it with torch "
                              f"and pass that to model.load_state_dict.")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    specs = {k: Spec(tuple(v.shape), _torch_dtype(v)) if k in tensors else Spec(())
             for k, v in loaded.items()}
    check_state_dict(model, specs, strict, source=path)
    return load_state_dict(model, tensors, strict, path)


def _torch_dtype(tensor):
    """A tensor's dtype as NumPy names it (bfloat16 as float32, the dtype it is read as), or
    None for one that is not real numbers."""
    name = str(tensor.dtype).removeprefix("torch.")
    if name == "bfloat16":
        return "float32"
    try:
        return np.dtype(name).name if np.dtype(name).kind in "biuf" else None
    except TypeError:
        return None


def _first_line(error):
    """The first sentence of an error's message (torch's run on for lines), or its type."""
    text = str(error).strip().splitlines()
    return (text[0].split(". ")[0] if text else type(error).__name__)[:200].rstrip(".")
