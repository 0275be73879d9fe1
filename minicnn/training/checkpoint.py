"""Training checkpoints: everything a run needs to continue exactly where it stopped, and the
inference helpers that evaluate, predict and the validation pass share.

A checkpoint is a minicnn model file (so minicnn.load returns the model) whose header also holds
the settings, epoch and step, history, optimiser and schedule state, the state of every random
generator, the class names and the normalisation statistics; the optimiser's per-parameter
buffers are stored as arrays named "optim:<param>:<buffer>". Written atomically, never unpickled.

Nothing read is trusted before it is checked: minicnn.nn.serialization checks the file (sizes,
dtypes, the JSON), minicnn.nn.model the model's description and its arrays; load_checkpoint and
load_for_inference check the rest of the header here, before the model is built: the class
names (distinct, one per output of the model for images of input_shape), the
normalisation statistics (3 finite numbers each, std > 0), input_shape ([3, H, W]), and in a
training checkpoint what a resumed run reads back (epoch, step, history, settings, optimiser,
schedule and random-generator states: each one the file holds, and with load_checkpoint(path,
resumable=True) every one) and the optimiser buffers. Each problem is a CheckpointError of one
sentence, "<path>: <what is wrong>."
"""
import math
import numbers
from typing import NamedTuple

import numpy as np

from minicnn.datasets import loading as datasets
from minicnn.parallel import data_parallel
from minicnn.backend import get_backend, to_numpy
from minicnn.errors import CheckpointError
from minicnn.nn.model import check_archive, layer_config, model_from_archive, save_model
from minicnn.nn.schema import SchemaError, output_shape
from minicnn.nn.serialization import open_archive, show

MAX_CLASSES = 100_000        # class names in a checkpoint
MAX_NAME = 1024              # characters in a class name (a folder name: any text)
MAX_IMAGE_SIDE = 4096        # pixels on a side of the model's input images
MAX_TEXT = 4096              # characters in a setting's text
MAX_COUNT = 2**62            # epochs, steps, images counted
# predict_logits' batches: at most this many values in a layer's output or im2col matrix
# (512 MiB of float32; the Keras-tutorial CNN's largest holds 48,672 values an image, so it
# keeps its 500 images a batch).
FORWARD_VALUES = 2**27

# The settings a checkpoint records and a resumed run reads back: the names and types of
# minicnn.training.trainer.HYPERPARAMETERS (the tests hold the two equal), an int also for
# image_size, which Python callers give as one. Each may be null (the setting's default).
SETTING_TYPES = {"data": (str,), "model": (str,), "epochs": (int,), "batch_size": (int,),
                 "optimizer": (str,), "lr": (float,), "weight_decay": (float,),
                 "schedule": (str,), "label_smoothing": (float,), "augment": (str,),
                 "seed": (int,), "image_size": (str, int), "backend": (str,),
                 "implementation": (str,), "out": (str,), "resume": (bool,), "force": (bool,),
                 "precision": (str,),
                 "early_stopping": (int,), "val_split": (float,), "checkpoint_every": (int,),
                 "limit": (int,), "tta": (bool,), "pretrained": (str,), "freeze_base": (bool,),
                 "unfreeze_after": (int,), "fine_tune_lr": (float,), "trace": (int,)}
# What a resumed run reads back from a checkpoint's info: load_checkpoint(resumable=True)
# requires every one (each present is checked either way).
RUN_FIELDS = ("epoch", "step", "history", "best_val_acc", "bad_epochs", "partial", "rng",
              "optimizer", "settings", "schedule")
# The columns of a checkpoint's history (minicnn.training.trainer.HISTORY_KEYS).
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
# The buffers each optimiser keeps per parameter: none yet, SGD's, Adam's and AdamW's.
OPTIMIZER_BUFFER_SETS = ((), ("momentum",), ("exp_avg", "exp_avg_sq"))
# The state each schedule of --schedule saves (minicnn.nn.optim's state_dict()).
SCHEDULE_FIELDS = {"none": None, "step": ("base_lr", "last_step"),
                   "cosine": ("base_lr", "last_step"), "onecycle": ("base_lr", "last_step"),
                   "plateau": ("best", "bad_epochs", "cooldown_left")}


def save_checkpoint(path, model, optimizer, info):
    """Write model + optimizer buffers + info (a JSON-able dict) to path, atomically."""
    arrays = {f"optim:{name}:{buf}": value
              for name, buffers in optimizer.state.items() for buf, value in buffers.items()}
    sd = optimizer.state_dict()
    # info last would let a resumed run's header (read from the previous checkpoint, with its
    # own "optimizer" entry) overwrite the live optimizer's lr and step count.
    # (A LossScaleOptimizer's loss scale too: --precision mixed_float16.)
    kept = {k: sd[k] for k in ("lr", "steps", "loss_scale") if k in sd}
    save_model(model, path, {**info, "kind": "checkpoint", "optimizer": kept}, arrays)


def load_checkpoint(path, resumable=False):
    """-> (model, info dict, optimizer buffers {param: {buffer: numpy array}}).

    Raises CheckpointError when the file is not a training checkpoint, or anything it holds is
    not what minicnn.train writes (the module docstring lists the checks); resumable=True (for
    --resume) also when info lacks one of RUN_FIELDS, which a resumed run reads back.
    """
    with open_archive(path) as archive:
        header = archive.header
        check_archive(path, header, archive)
        info = _extra(path, header)
        if info.get("kind") != "checkpoint":
            raise CheckpointError(f"{path} holds a model but not a training checkpoint "
                                  f"(no optimiser state, history or normalisation statistics).")
        _check_training_info(path, info, resumable)
        _check_inference_info(path, header, info)
        members = _optimizer_members(path, archive)
        model = model_from_archive(path, header, archive)
        buffers = {name: {buf: archive[member] for buf, member in bufs.items()}
                   for name, bufs in members.items()}
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
    with open_archive(path) as archive:
        header = archive.header
        check_archive(path, header, archive)
        info = _extra(path, header)
        if "classes" not in info or "norm" not in info:
            raise CheckpointError(f"{path} has no class names or normalisation statistics; "
                                  f"give a checkpoint written by python -m minicnn.train.")
        size = _check_inference_info(path, header, info)
        model = model_from_archive(path, header, archive)
    model.to(backend)
    return Inference(model, list(info["classes"]),
                     np.asarray(info["norm"]["mean"], dtype=np.float32),
                     np.asarray(info["norm"]["std"], dtype=np.float32), size, xp)


def predict_logits(model, x_uint8, mean, std, xp, batch_size=500, tta=False):
    """Inference-mode logits (N, K) as NumPy for uint8 images (N, 3, H, W); tta averages the
    logits of each image and its mirror. batch_size images go through the model at a time, or
    fewer where that many would make one of its layers hold more than FORWARD_VALUES values
    (a checkpoint's model may be large per image: the memory stays bounded, the logits the
    same)."""
    batch_size = _bounded_batch(model, tuple(x_uint8.shape[1:]), batch_size)
    out = []
    for start in range(0, len(x_uint8), batch_size):
        xb = datasets.normalize(x_uint8[start:start + batch_size], mean, std, xp)
        logits = data_parallel.predict(model, xb)           # model.forward(xb), on all cores
        if tta:
            mirrored = xp.ascontiguousarray(xb[..., ::-1])
            logits = 0.5 * (logits + data_parallel.predict(model, mirrored))
        out.append(to_numpy(logits))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _bounded_batch(model, image_shape, batch_size):
    """batch_size, or fewer images: at most FORWARD_VALUES values in the largest layer."""
    try:
        _, peak = output_shape(layer_config(model), image_shape, limit=math.inf)
    except ValueError:      # not minicnn's layers, or not for this input: forward will say so
        return batch_size
    return max(1, min(batch_size, FORWARD_VALUES // max(peak, 1)))


def finite_logits(logits, path, classes=None):
    """logits, unless some are nan or inf: then the checkpoint at path is unusable (its weights
    overflowed in training), and a CheckpointError says so; with classes, also unless logits
    has another number of columns than there are class names."""
    if classes is not None and (logits.ndim != 2 or logits.shape[1] != len(classes)):
        raise CheckpointError(f"{path} gives {show(logits.shape[1:])} outputs per image for its "
                              f"{len(classes)} class names; use a checkpoint written by "
                              f"python -m minicnn.train.")
    if not np.isfinite(logits).all():
        raise CheckpointError(f"{path} gives non-finite outputs (its weights diverged in "
                              f"training); use another checkpoint, e.g. best.npz.")
    return logits


# ---- checking the header ---------------------------------------------------------------------
def _fail(path, field, what, value):
    raise CheckpointError(f"{path}: its {field} must be {what}, got {show(value)}.")


def _is_int(v, low=0, high=MAX_COUNT):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and low <= v <= high


def _is_number(v, finite=True):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and (math.isfinite(v) or not finite))


def _extra(path, header):
    """The header's "extra" dict (the checkpoint's info); {} when there is none."""
    info = header.get("extra", {})
    if not isinstance(info, dict):
        _fail(path, "extra header", "a JSON object", info)
    return info


def _check_inference_info(path, header, info):
    """Check classes, norm and input_shape where info has them, and that the model gives one
    output per class for images of input_shape -> the images' (H, W)."""
    classes = info.get("classes", ["a class"])
    if not (isinstance(classes, list) and 1 <= len(classes) <= MAX_CLASSES):
        _fail(path, "classes", f"a list of 1 to {MAX_CLASSES:,} class names", classes)
    for name in classes:
        if not (isinstance(name, str) and 1 <= len(name) <= MAX_NAME):
            _fail(path, "classes", f"names of 1 to {MAX_NAME} characters", name)
    if len(set(classes)) != len(classes):
        _fail(path, "classes", "distinct names", classes)
    norm = info.get("norm", {"mean": [0, 0, 0], "std": [1, 1, 1]})
    if not isinstance(norm, dict):
        _fail(path, "norm", 'a JSON object of "mean" and "std"', norm)
    for key in ("mean", "std"):
        value = norm.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(map(_is_number, value))
                and (key == "mean" or min(value) > 0)):
            _fail(path, f"norm {key}", "3 finite numbers" + (", each above 0" if key == "std"
                                                            else ""), value)
    shape = info.get("input_shape", [3, 32, 32])
    if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == 3
            and all(_is_int(n, 1, MAX_IMAGE_SIDE) for n in shape)):
        _fail(path, "input_shape", f"[3, H, W] with H and W from 1 to {MAX_IMAGE_SIDE}", shape)
    if "classes" not in info:
        return tuple(shape[1:])
    try:
        out, _ = output_shape(header["model"], shape)
    except SchemaError as e:
        raise CheckpointError(f"{path} holds a model that cannot classify its own "
                              f"{shape[1]}x{shape[2]} images ({e}).") from None
    if out != (len(classes),):
        raise CheckpointError(f"{path} names {len(classes)} classes, but its model gives "
                              f"{show(out)} outputs per image.")
    return tuple(shape[1:])


def _is_generator_state(v):
    """A numpy PCG64 bit_generator.state, which a resumed run assigns to its generators."""
    return (isinstance(v, dict) and set(v) == {"bit_generator", "state", "has_uint32", "uinteger"}
            and v["bit_generator"] == "PCG64" and isinstance(v["state"], dict)
            and set(v["state"]) == {"state", "inc"}
            and all(_is_int(n, 0, 2**128 - 1) for n in v["state"].values())
            and _is_int(v["has_uint32"], 0, 1) and _is_int(v["uinteger"], 0, 2**32 - 1))


def _is_fields(v, names, ok):
    """A JSON object of exactly these fields, each ok."""
    return isinstance(v, dict) and set(v) == set(names) and all(ok(v[n]) for n in names)


def _check_training_info(path, info, resumable):
    """Check what a resumed run (minicnn.training.trainer) reads back from info: each of its
    fields info has; with resumable, also that it has every one of RUN_FIELDS."""
    missing = [field for field in RUN_FIELDS if field not in info] if resumable else []
    if missing:
        raise CheckpointError(f"{path}: it has no {missing[0]}, which a resumed run reads back; "
                              f"give a checkpoint written by python -m minicnn.train.")
    for field in ("epoch", "step", "bad_epochs"):
        if field in info and not _is_int(info[field]):
            _fail(path, field, "a whole number >= 0", info[field])
    if "best_val_acc" in info and not _is_number(info["best_val_acc"]):
        _fail(path, "best_val_acc", "a finite number", info["best_val_acc"])
    history = info.get("history", {k: [] for k in HISTORY_KEYS})
    if not (isinstance(history, dict)
            and all(isinstance(history.get(k), list) for k in HISTORY_KEYS)
            and len({len(history[k]) for k in HISTORY_KEYS}) == 1
            and all(_is_number(v, finite=False) for k in HISTORY_KEYS for v in history[k])):
        _fail(path, "history", f"lists of numbers of one length named {', '.join(HISTORY_KEYS)}",
              history)
    partial = info.get("partial", {"loss_sum": 0, "correct": 0, "seen": 0})
    if not (isinstance(partial, dict) and _is_number(partial.get("loss_sum"))
            and _is_int(partial.get("correct")) and _is_int(partial.get("seen"))):
        _fail(path, "partial", "loss_sum, correct and seen, numbers >= 0", partial)
    rng = info.get("rng", {})
    if not (isinstance(rng, dict) and all(_is_generator_state(rng.get(k))
                                          for k in ("order", "augment") if k in rng or resumable)
            and isinstance(rng.get("dropout", []), list)
            and all(map(_is_generator_state, rng.get("dropout", [])))
            and (not resumable or "dropout" in rng)):
        _fail(path, "rng", "the states of numpy PCG64 generators (order, augment, dropout)", rng)
    optimizer = info.get("optimizer", {"lr": 0, "steps": 0})
    if not (isinstance(optimizer, dict) and _is_number(optimizer.get("lr"))
            and optimizer["lr"] >= 0 and _is_int(optimizer.get("steps"))):
        _fail(path, "optimizer", "an lr >= 0 and a count of steps", optimizer)
    scale = optimizer.get("loss_scale", {"scale": 1.0, "good_steps": 0})
    if not (_is_fields(scale, ("scale", "good_steps"), lambda v: _is_number(v) and v >= 0)
            and scale["scale"] > 0 and _is_int(scale["good_steps"])):
        _fail(path, "optimizer's loss_scale", "a scale > 0 and a count of good steps", scale)
    if "code_version" in info and not isinstance(info["code_version"], str):
        _fail(path, "code_version", "a string", info["code_version"])
    _check_settings(path, info, resumable)


def _check_settings(path, info, resumable):
    """The run's settings (SETTING_TYPES), and the schedule state that goes with them."""
    settings = info.get("settings", {})
    if not (isinstance(settings, dict) and all(isinstance(k, str) for k in settings)):
        _fail(path, "settings", "a JSON object of minicnn.train's settings", settings)
    for key, value in settings.items():
        kinds = SETTING_TYPES.get(key, (str, int, float, bool))     # one the run does not read
        if not (value is None or any(_is_setting(value, kind) for kind in kinds)):
            words = {str: "a string", bool: "true or false", int: "a whole number",
                     float: "a finite number"}
            _fail(path, f"setting {show(key)}", " or ".join(words[k] for k in kinds) + " or null",
                  value)
    if ("lr" in settings or resumable) and not (_is_number(settings.get("lr"))
                                                and settings["lr"] > 0):
        _fail(path, "setting 'lr'", "a number above 0", settings.get("lr"))
    if ("schedule" in settings or resumable) and settings.get("schedule") not in SCHEDULE_FIELDS:
        _fail(path, "setting 'schedule'", ", ".join(SCHEDULE_FIELDS), settings.get("schedule"))
    if "schedule" in info:
        names = [settings["schedule"]] if "schedule" in settings else list(SCHEDULE_FIELDS)
        if not any(_is_schedule_state(info["schedule"], SCHEDULE_FIELDS[n]) for n in names):
            fields = SCHEDULE_FIELDS[names[0]]
            what = (f"the state of the {names[0]} schedule "
                    f"({', '.join(fields) if fields else 'null'})" if len(names) == 1
                    else "null or the state of a schedule")
            _fail(path, "schedule", what, info["schedule"])


def _is_setting(value, kind):
    """Whether value, a setting's, is of kind (str, bool, int or float; an int is a float)."""
    if kind is str:
        return isinstance(value, str) and len(value) <= MAX_TEXT
    if kind is bool:
        return isinstance(value, bool)
    return _is_int(value, -MAX_COUNT) if kind is int else _is_number(value)


def _is_schedule_state(state, fields):
    """Whether state is what a schedule's state_dict() gives (fields), or None for no schedule."""
    if fields is None:
        return state is None
    return isinstance(state, dict) and set(state) == set(fields) and all(
        _is_int(state[f]) if f in ("last_step", "bad_epochs", "cooldown_left")
        else _is_number(state[f], finite=False) and not math.isnan(state[f]) for f in fields)


def _optimizer_members(path, archive):
    """{param: {buffer: member name}} of the optimiser's buffers, which check_archive matched
    with the params: the same buffers for every param, those of one optimiser."""
    members = {}
    for name in archive:
        if name.startswith("optim:"):
            param, _, buffer = name[len("optim:"):].rpartition(":")
            members.setdefault(param, {})[buffer] = name
    kinds = {tuple(sorted(bufs)) for bufs in members.values()}
    if len(kinds) > 1 or not kinds <= set(OPTIMIZER_BUFFER_SETS):
        got = ", ".join(sorted("+".join(k) for k in kinds))
        raise CheckpointError(f"{path}: its optimiser buffers must be the same for every "
                              f"parameter, those of one optimiser (momentum; or exp_avg and "
                              f"exp_avg_sq), got {got}.")
    return members
