"""Training checkpoints: everything a run needs to continue exactly where it stopped, and the
inference helpers that evaluate, predict and the validation pass share.

A checkpoint is a minicnn model file (so minicnn.load returns the model) whose header also holds
the settings, epoch and step, history, optimiser and schedule state, the state of every random
generator, the class names and the normalisation statistics; the optimiser's per-parameter
buffers are stored as arrays named "optim:<param>:<buffer>". Written atomically, never unpickled.
"""
from typing import NamedTuple

import numpy as np

from minicnn.datasets import loading as datasets
from minicnn.parallel import data_parallel
from minicnn.backend import get_backend, to_numpy
from minicnn.errors import CheckpointError
from minicnn.nn.model import model_from_archive, save_model
from minicnn.nn.serialization import read_archive


def save_checkpoint(path, model, optimizer, info):
    """Write model + optimizer buffers + info (a JSON-able dict) to path, atomically."""
    arrays = {f"optim:{name}:{buf}": value
              for name, buffers in optimizer.state.items() for buf, value in buffers.items()}
    sd = optimizer.state_dict()
    # info last would let a resumed run's header (read from the previous checkpoint, with its
    # own "optimizer" entry) overwrite the live optimizer's lr and step count.
    save_model(model, path, {**info, "kind": "checkpoint",
                             "optimizer": {"lr": sd["lr"], "steps": sd["steps"]}}, arrays)


def load_checkpoint(path):
    """-> (model, info dict, optimizer buffers {param: {buffer: numpy array}}).

    Raises CheckpointError when the file is not a training checkpoint.
    """
    header, arrays = read_archive(path)
    model = model_from_archive(path, header, arrays)
    info = header.get("extra", {})
    if info.get("kind") != "checkpoint":
        raise CheckpointError(f"{path} holds a model but not a training checkpoint "
                              f"(no optimiser state, history or normalisation statistics).")
    buffers = {}
    for key, value in arrays.items():
        if key.startswith("optim:"):
            _, name, buf = key.split(":", 2)
            buffers.setdefault(name, {})[buf] = value
    return model, info, buffers


class Inference(NamedTuple):
    """What evaluate and predict need from a checkpoint: the model on its backend, the class
    names, the normalisation statistics (3,), one image's (H, W) and the array module."""
    model: object
    classes: list
    mean: np.ndarray
    std: np.ndarray
    size: tuple
    xp: object


def load_for_inference(path, backend="numpy"):
    """-> Inference(...) from a checkpoint written by minicnn.train, the model moved to backend."""
    xp = get_backend(backend)                       # a missing CuPy/GPU fails before the read
    header, arrays = read_archive(path)
    model = model_from_archive(path, header, arrays)
    info = header.get("extra", {})
    if "classes" not in info or "norm" not in info:
        raise CheckpointError(f"{path} has no class names or normalisation statistics; "
                              f"give a checkpoint written by python -m minicnn.train.")
    model.to(backend)
    return Inference(model, list(info["classes"]),
                     np.asarray(info["norm"]["mean"], dtype=np.float32),
                     np.asarray(info["norm"]["std"], dtype=np.float32),
                     tuple(info.get("input_shape", (3, 32, 32))[1:]), xp)


def predict_logits(model, x_uint8, mean, std, xp, batch_size=500, tta=False):
    """Inference-mode logits (N, K) as NumPy for uint8 images (N, 3, H, W); tta averages the
    logits of each image and its mirror."""
    out = []
    for start in range(0, len(x_uint8), batch_size):
        xb = datasets.normalize(x_uint8[start:start + batch_size], mean, std, xp)
        logits = data_parallel.predict(model, xb)           # model.forward(xb), on all cores
        if tta:
            mirrored = xp.ascontiguousarray(xb[..., ::-1])
            logits = 0.5 * (logits + data_parallel.predict(model, mirrored))
        out.append(to_numpy(logits))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def finite_logits(logits, path):
    """logits, unless some are nan or inf: then the checkpoint at path is unusable (its weights
    overflowed in training), and a CheckpointError says so."""
    if not np.isfinite(logits).all():
        raise CheckpointError(f"{path} gives non-finite outputs (its weights diverged in "
                              f"training); use another checkpoint, e.g. best.npz.")
    return logits
