"""python -m minicnn.train --pretrained FILE [--freeze-base [--unfreeze-after N [--fine-tune-lr LR]]]:
transfer learning on the command line (minicnn.training.trainer calls these).

    --pretrained FILE    the base: a model file or checkpoint written by minicnn (its own
                         architecture; --model only picks the recipe defaults), or a weights
                         file (.safetensors, or PyTorch's .pth/.pt/.bin/.ckpt: minicnn.weights)
                         of the --model preset as published, with the preset's default number
                         of classes (1000 for resnet18: torchvision's resnet18-f37072fd.pth).
                         Its last Dense layer is replaced by a fresh one for the data's
                         classes. The data is normalised as the base's training data was (its
                         filters expect their inputs scaled so): with a checkpoint's statistics,
                         or for resnet18's weights ImageNet's (PUBLISHED_NORM); a plain model
                         file or another preset's weights, with the data's own.
    --freeze-base        every layer but that new head frozen (trainable = False): the head
                         alone learns.
    --unfreeze-after N   after N epochs everything is unfrozen and the run goes on with a fresh
                         optimiser at --fine-tune-lr (default --lr / 10), as Keras's guide
                         recompiles at a low rate.

The run is then two phases: epochs 1..N at --lr, N+1..--epochs at the fine-tuning rate, each
with its own optimiser and its own --schedule over its own epochs (phase_settings). The
trainable flags travel in the checkpoints' model description, so --resume continues either
phase where it stopped.
"""
import inspect
import os

import numpy as np
from tqdm import tqdm

from minicnn.errors import UsageError
from minicnn.nn.model import layer_config, load
from minicnn.nn.schema import SchemaError, output_shape
from minicnn.nn.serialization import open_archive
from minicnn.nn.transfer import replace_head
from minicnn.nn.zoo import MODELS
from minicnn.training.checkpoint import load_for_inference
from minicnn.weights import TORCH_SUFFIXES, load_weights

FINE_TUNE_DIVISOR = 10          # the default fine-tuning rate: --lr / 10
# The (mean, std) of each channel that a preset's published weights were trained with:
# torchvision's ImageNet preprocessing for its resnet18 weights.
PUBLISHED_NORM = {"resnet18": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def check_settings(s):
    """One sentence (UsageError) for a combination of the transfer flags that cannot work.
    (A resumed run reads its model from its checkpoint: the base file may be gone.)"""
    if s["freeze_base"] and not s["pretrained"]:
        raise UsageError("--freeze-base needs --pretrained FILE: there is no trained base to "
                         "freeze.")
    if s["unfreeze_after"] < 0:
        raise UsageError(f"--unfreeze-after must be >= 0, got {s['unfreeze_after']}.")
    if s["unfreeze_after"] and not s["freeze_base"]:
        raise UsageError("--unfreeze-after needs --freeze-base: without it nothing is frozen.")
    if s["unfreeze_after"] and s["unfreeze_after"] >= s["epochs"]:
        raise UsageError(f"--unfreeze-after {s['unfreeze_after']} leaves no epoch of --epochs "
                         f"{s['epochs']} to fine-tune in; give more --epochs.")
    if s["fine_tune_lr"] is not None and not s["unfreeze_after"]:
        raise UsageError("--fine-tune-lr is the rate after --unfreeze-after N; give that too.")
    if s["fine_tune_lr"] is not None and not 0 < s["fine_tune_lr"] < float("inf"):
        raise UsageError(f"--fine-tune-lr must be a positive number, got {s['fine_tune_lr']}.")
    if s["pretrained"] and not s["resume"] and not os.path.isfile(s["pretrained"]):
        raise UsageError(f"--pretrained {s['pretrained']}: there is no such file.")


def fine_tune_lr(s):
    return s["fine_tune_lr"] if s.get("fine_tune_lr") is not None else s["lr"] / FINE_TUNE_DIVISOR


def phase_settings(s, epochs_done):
    """The settings the optimiser and schedule follow after epochs_done epochs: the run's own
    without --unfreeze-after; else the head phase's (epochs N) or the fine-tuning phase's
    (the remaining epochs, at fine_tune_lr)."""
    n = s.get("unfreeze_after") or 0
    if not n:
        return s
    if epochs_done < n:
        return {**s, "epochs": n}
    return {**s, "epochs": s["epochs"] - n, "lr": fine_tune_lr(s)}


def unfreezes_after(s, epochs_done):
    """Whether the fine-tuning phase starts once epochs_done epochs are done."""
    return bool(s.get("unfreeze_after")) and epochs_done == s["unfreeze_after"]


def pretrained_model(s, d, rng):
    """The base of --pretrained with a fresh head for d's classes (drawn from rng), frozen but
    for the head with --freeze-base; d's normalisation statistics become a checkpoint's."""
    path = s["pretrained"]
    size = tuple(d["x_train"].shape[2:])
    if is_weights_file(path):
        model = _preset_with_weights(s, path, size)
        if s["model"] in PUBLISHED_NORM:
            _use_norm(d, *PUBLISHED_NORM[s["model"]])
        return _prepared(s, d, rng, model)
    with open_archive(path) as archive:
        info = archive.header.get("extra")
    if isinstance(info, dict) and "classes" in info and "norm" in info:     # a checkpoint
        base = load_for_inference(path)
        if tuple(base.size) != size:
            raise UsageError(f"--pretrained {path} was trained on {base.size[0]}x{base.size[1]} "
                             f"images, and the data's are {size[0]}x{size[1]}; give "
                             f"--image-size {base.size[0]}x{base.size[1]}.")
        model = base.model
        _use_norm(d, base.mean, base.std)
    else:
        model = load(path)
    return _prepared(s, d, rng, model)


def _use_norm(d, mean, std):
    """Normalise the run's images with these channel statistics (the base's)."""
    d["mean"], d["std"] = (np.asarray(v, dtype=np.float32) for v in (mean, std))


def _prepared(s, d, rng, model):
    """The base model checked against the data's images, given its new head, frozen."""
    path, size = s["pretrained"], tuple(d["x_train"].shape[2:])
    try:
        output_shape(layer_config(model), (3,) + size)
    except SchemaError as e:
        raise UsageError(f"--pretrained {path} cannot take the data's {size[0]}x{size[1]} "
                         f"images ({e}).") from None
    try:
        head = replace_head(model, len(d["classes"]), rng=rng)
    except ValueError as e:
        raise UsageError(f"--pretrained {path}: {e}") from None
    if s["freeze_base"]:
        model.trainable = False
        head.trainable = True
    return model


def is_weights_file(path):
    """Whether --pretrained names a weights file (by its suffix), not a minicnn model file."""
    return str(path).endswith((".safetensors",) + TORCH_SUFFIXES)


def _preset_with_weights(s, path, size):
    """The --model preset (its default number of classes) with the weights of path."""
    make = MODELS.get(s["model"])
    if make is None:
        raise UsageError(f"--pretrained {path} is a weights file: give the preset it holds "
                         f"with --model ({', '.join(MODELS)}).")
    classes = inspect.signature(make).parameters["num_classes"].default
    try:
        model = make(num_classes=classes, image_size=size, rng=np.random.default_rng(0))
    except ValueError as e:
        raise UsageError(f"--image-size {s['image_size']}: {e}") from None
    load_weights(model, path)                      # one sentence when they do not fit
    return model


def start_fine_tuning(loop, make_optimizer, make_schedule):
    """Unfreeze the model and give the loop the fine-tuning phase's optimiser and schedule."""
    s, model = loop["s"], loop["model"]
    phase = phase_settings(s, s["unfreeze_after"])
    model.trainable = True
    loop["optimizer"] = model.optimizer = make_optimizer(phase, model)
    loop["schedule"], loop["schedule_unit"] = make_schedule(phase, loop["optimizer"],
                                                            loop["steps_per_epoch"])
    tqdm.write(f"Unfrozen after epoch {s['unfreeze_after']}: fine-tuning every layer at lr "
               f"{phase['lr']:g} for {phase['epochs']} more epochs.")
