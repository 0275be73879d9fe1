"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a minicnn model file (so minicnn.load returns the model) whose header also holds
the settings, epoch and step, history, optimiser and schedule state, the state of every random
generator, the class names and the normalisation statistics; the optimiser's per-parameter
buffers are stored as arrays named "optim:<param>:<buffer>". Written atomically, never unpickled.
"""
import numpy as np

from minicnn.errors import CheckpointError
from minicnn.model import model_from_archive, save_model
from minicnn.serialization import read_archive


def save_checkpoint(path, model, optimizer, info):
    """Write model + optimizer buffers + info (a JSON-able dict) to path, atomically."""
    arrays = {f"optim:{name}:{buf}": value
              for name, buffers in optimizer.state.items() for buf, value in buffers.items()}
    sd = optimizer.state_dict()
    save_model(model, path, {"kind": "checkpoint", "optimizer": {"lr": sd["lr"], "steps": sd["steps"]},
                             **info}, arrays)


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


def load_for_inference(path):
    """-> (model, classes, mean (3,), std (3,), info) from a checkpoint written by minicnn.train."""
    header, arrays = read_archive(path)
    model = model_from_archive(path, header, arrays)
    info = header.get("extra", {})
    if "classes" not in info or "norm" not in info:
        raise CheckpointError(f"{path} has no class names or normalisation statistics; "
                              f"give a checkpoint written by python -m minicnn.train.")
    mean = np.asarray(info["norm"]["mean"], dtype=np.float32)
    std = np.asarray(info["norm"]["std"], dtype=np.float32)
    return model, list(info["classes"]), mean, std, info
