"""python -m minicnn.train: train a CNN on CIFAR-10 (or an image folder) with minicnn.

The Keras-tutorial workflow on a from-scratch engine: fit with a progress bar and a table line
per epoch, validation, early stopping, plateau LR, last/best checkpoints with exact resume, then
an evaluation report with pictures. Also callable from Python: minicnn.train.fit(epochs=1, ...).

Everything the run writes goes to --out DIR:
    last.npz, best.npz      checkpoints (minicnn.load(path) returns the model)
    history.json/.csv       per-epoch metrics;  settings.json   the settings and code version
    curves.png              loss and accuracy per epoch, train vs val
    report.json, confusion.png, predictions.png     the final evaluation
    trace.jsonl, trace.png  with --trace N: the backprop trace (minicnn.trace)
    .minicnn.lock           only while the run goes on: its pid (one run at a time per --out)
"""
import argparse
import contextlib
import csv
import functools
import importlib.util
import inspect
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

try:
    import fcntl
except ImportError:            # Windows: no flock, so --out is not locked (see hold_out)
    fcntl = None

import minicnn
from minicnn import augment, implementation, mixed_precision
from minicnn.callbacks import BackpropTrace, Callback
from minicnn.nn import fitting
from minicnn.datasets import loading as datasets
from minicnn.nn import optim
from minicnn.backend import get_backend, to_device
from minicnn.training.checkpoint import load_checkpoint, predict_logits, save_checkpoint
from minicnn.training.cli import run
from minicnn.training import finetune
from minicnn.errors import CheckpointError, DataError, FolderInUseError, MinicnnError, UsageError
from minicnn.nn.layers import Dropout, walk
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.training.metrics import classification_report, format_report
from minicnn.training.plots import plot_confusion, plot_curves, plot_predictions
from minicnn.parallel import data_parallel, group, mpi
from minicnn.parallel.processes import WorkerError
from minicnn.nn.serialization import atomic_write, is_temporary_of
from minicnn.nn.model import layer_config
from minicnn.nn.zoo import MODELS, build_model

# One readable dict of hyperparameters, turned into flags (name: default, type, help).
# None means "the model preset's choice" (MODEL_DEFAULTS below).
HYPERPARAMETERS = {
    "data": (None, str, "CIFAR-10 archive, extracted batch directory or image folder "
                        "(default: download CIFAR-10 into $MINICNN_DATA or ~/.cache/minicnn)"),
    "model": ("keras-tutorial", str, f"model preset: {', '.join(MODELS)}; or your own, "
                                     f"path/to/file.py:function (a function returning the model)"),
    "epochs": (None, int, "passes over the training split"),
    "batch_size": (None, int, "images per step"),
    "optimizer": (None, str, "sgd (Nesterov momentum 0.9), adam or adamw"),
    "lr": (None, float, "learning rate; the peak rate for --schedule onecycle"),
    "weight_decay": (None, float, "L2 penalty (decoupled for adamw)"),
    "schedule": (None, str, "none, step (x0.1 after each third of the epochs), cosine, "
                            "onecycle (linear warm-up then linear decay, per step) or plateau "
                            "(x0.1 after a third epoch in a row without val-loss "
                            "improvement: PyTorch's ReduceLROnPlateau, patience 2)"),
    "label_smoothing": (None, float, "cross-entropy label smoothing, 0 to switch off"),
    "augment": (None, str, "none, or joined by '+': crop, flip, cutout and ImageDataGenerator's "
                           "transforms rotation=DEG, shift=F, wshift=F, hshift=F, shear=DEG, "
                           "zoom=F, hflip, vflip, fill=nearest|reflect|wrap|constant "
                           "(e.g. crop+flip or rotation=15+zoom=0.1+hflip)"),
    "pretrained": (None, str, "a model file or checkpoint written by minicnn to start from: its "
                              "last Dense layer is replaced by a fresh one for the data's classes "
                              "(docs/transfer.md)"),
    "freeze_base": (False, bool, "with --pretrained: train the new head only, every other layer "
                                 "frozen"),
    "unfreeze_after": (0, int, "with --freeze-base: after N epochs unfreeze everything and "
                               "fine-tune at --fine-tune-lr (0: never)"),
    "fine_tune_lr": (None, float, "the learning rate after --unfreeze-after (default: --lr / 10), "
                                  "with a fresh optimiser and --schedule over the epochs left"),
    "seed": (0, int, "seed of every random generator (init, split, order, augmentation)"),
    "image_size": ("32", str, "H or HxW: the size image-folder images are resized to (the "
                              "checkpoint keeps it; evaluate and predict resize to it)"),
    "backend": ("numpy", str, "numpy (CPU) or cupy (GPU)"),
    "precision": ("fp32", str, "fp32, mixed_float16 (layers compute in float16, float32 master "
                               "weights, dynamic loss scaling) or mixed_bfloat16 (needs "
                               "ml_dtypes); on a CPU slower than fp32: for studying the "
                               "numerics (docs/precision.md)"),
    "implementation": ("fast", str, "reference (minicnn.reference: the textbook maths, slow), "
                                    "fast (minicnn.ops; on a GPU CuPy's operations and cuBLAS) or "
                                    "raw (the hand-written CUDA kernels of kernels/*.cu for the "
                                    "convs and max-pools; needs --backend cupy)"),
    "out": (None, str, "output directory (default: runs/<model>)"),
    "resume": (False, bool, "continue from --out DIR/last.npz"),
    "force": (False, bool, "with --resume: continue even if the settings differ; without: "
                           "start over in an --out that holds a run (its files are replaced)"),
    "early_stopping": (0, int, "stop after this many epochs without val-accuracy gain; 0: off"),
    "val_split": (None, float, "validation fraction carved from the training data "
                               "(default 0.1 when the data has no test split, else 0)"),
    "checkpoint_every": (0, int, "also checkpoint every N steps (0: at the end of each epoch only)"),
    "limit": (0, int, "train on a stratified subset of this many images, at least one per "
                      "class (0: all)"),
    "tta": (None, bool, "evaluate with horizontal-flip test-time augmentation"),
    "trace": (0, int, "record the backprop trace every N steps (N: 50 when left out): each "
                      "layer's activations, gradients and update ratios, a table and the broken "
                      "rules of thumb each epoch, trace.jsonl and trace.png in --out "
                      "(docs/trace.md); 0: off"),
}

MODEL_DEFAULTS = {
    # The TensorFlow tutorial's recipe (Adam 1e-3, 10 epochs) plus cosine decay and flips: with
    # the plain recipe this net reached 69.1% here, with these 70%+.
    "keras-tutorial": dict(epochs=10, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
                           schedule="cosine", label_smoothing=0.0, augment="flip", tta=False),
    # Fast-CIFAR recipe (Page's ResNet-9 / airbench): SGD-Nesterov, one-cycle LR, label
    # smoothing, crop + flip, flip test-time augmentation.
    "resnet-small": dict(epochs=11, batch_size=128, optimizer="sgd", lr=0.2, weight_decay=5e-4,
                         schedule="onecycle", label_smoothing=0.2, augment="crop+flip", tta=True),
    # A model from the user's file (--model file.py:function): Keras's defaults, Adam 1e-3,
    # batch 32, no schedule, no augmentation.
    "user": dict(epochs=10, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0,
                 schedule="none", label_smoothing=0.0, augment="none", tta=False),
    # The Keras small-data tutorial's dropout net (meant for 150x150 folder images): its recipe,
    # Adam 1e-3 with its ImageDataGenerator augmentation.
    "keras-dropout": dict(epochs=15, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.0,
                          schedule="none", label_smoothing=0.0,
                          augment="rotation=40+shift=0.2+shear=0.2+zoom=0.2+hflip", tta=False),
    # torchvision's ResNet-18: its reference ImageNet recipe (SGD momentum 0.9, lr 0.1 for
    # batch 256, weight decay 1e-4, x0.1 at each third of the run), at batch 128 and lr 0.05,
    # 30 epochs not 90; not tuned here (for pretrained weights see docs/transfer.md).
    "resnet18": dict(epochs=30, batch_size=128, optimizer="sgd", lr=0.05, weight_decay=1e-4,
                     schedule="step", label_smoothing=0.0, augment="crop+flip", tta=False),
}

# --precision's words -> minicnn.mixed_precision's policies
PRECISIONS = {"fp32": "float32", "mixed_float16": "mixed_float16",
              "mixed_bfloat16": "mixed_bfloat16"}

# Settings that may differ between a run and its --resume without changing the result (the
# backend and kernels only up to float32 rounding: a run started on a GPU may go on on the CPU).
RESUME_FREE = ("resume", "force", "out", "data", "debug", "backend", "implementation", "trace")

# The files a run writes to --out: a new run refuses a directory that holds them (unless
# --force), and only their temporary files (NAME.<8 hex digits>.tmp) count as debris.
TRACE_FILES = ("trace.jsonl", "trace.png")                     # only with --trace N
RUN_FILES = ("last.npz", "best.npz", "history.json", "history.csv", "settings.json", "curves.png",
             "report.json", "confusion.png", "predictions.png", *TRACE_FILES)


class TrainingStopped(MinicnnError):
    """The loss became NaN or inf, or a worker process was lost in the middle of a step."""


# ---- settings --------------------------------------------------------------------------------
def build_parser():
    presets = "\n".join(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                         for name, d in MODEL_DEFAULTS.items())
    parser = argparse.ArgumentParser(prog="python -m minicnn.train", description=__doc__,
                                     epilog="Each model preset chooses the settings you leave "
                                            "out:\n" + presets + "\n\nThen, with a checkpoint:\n"
                                            "  python -m minicnn.evaluate --checkpoint "
                                            "runs/<model>/best.npz [--data ...]\n"
                                            "  python -m minicnn.predict --checkpoint "
                                            "runs/<model>/best.npz IMAGE ...",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (default, kind, help_text) in HYPERPARAMETERS.items():
        flag = "--" + name.replace("_", "-")
        if name == "trace":                        # --trace alone: every 50 steps
            parser.add_argument(flag, type=int, nargs="?", const=50, default=None,
                                metavar="N", help=help_text)
        elif kind is bool and default is None:     # a preset's choice: --tta or --no-tta
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text + " (default: the preset's)")
        elif kind is bool:
            parser.add_argument(flag, action="store_true", default=default or None, help=help_text)
        else:                # None: "not given" (resolve_settings fills in the default)
            parser.add_argument(flag, type=kind, default=None,
                                help=help_text + ("" if default is None else f" (default {default})"))
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def resolve_settings(overrides):
    """Defaults, then the model preset, then what the user gave -> the settings dict."""
    unknown = set(overrides) - set(HYPERPARAMETERS) - {"debug"}
    if unknown:
        raise UsageError(f"Unknown setting(s): {', '.join(sorted(unknown))}.")
    settings = {name: default for name, (default, _, _) in HYPERPARAMETERS.items()}
    settings.update({k: v for k, v in overrides.items() if v is not None and k != "debug"})
    user_model = _user_model_spec(settings["model"])
    if settings["model"] not in MODELS and user_model is None:
        raise UsageError(f"Unknown model {settings['model']!r}; choose one of: {', '.join(MODELS)}, "
                         f"or give your own as path/to/file.py:function.")
    for k, v in MODEL_DEFAULTS["user" if user_model else settings["model"]].items():
        if settings.get(k) is None:
            settings[k] = v
    settings["resume"], settings["force"] = bool(settings["resume"]), bool(settings["force"])
    settings["tta"] = bool(settings["tta"])
    if settings["out"] is None:
        settings["out"] = os.path.join("runs", user_model[1] if user_model else settings["model"])
    if settings["data"] is not None:
        if not str(settings["data"]).strip():
            raise UsageError("--data is empty; give a path, or leave it out to download CIFAR-10.")
        settings["data"] = os.path.abspath(settings["data"])
    if settings["pretrained"] is not None:
        settings["pretrained"] = os.path.abspath(settings["pretrained"])
    _validate(settings)
    return settings


def _validate(s):
    checks = [
        (s["epochs"] >= 1, f"--epochs must be at least 1, got {s['epochs']}."),
        (s["batch_size"] >= 1, f"--batch-size must be at least 1, got {s['batch_size']}."),
        (s["optimizer"] in ("sgd", "adam", "adamw"),
         f"--optimizer must be sgd, adam or adamw, got {s['optimizer']!r}."),
        (0 < s["lr"] < math.inf, f"--lr must be a positive number, got {s['lr']}."),
        (0 <= s["weight_decay"] < math.inf,
         f"--weight-decay must be a number >= 0, got {s['weight_decay']}."),
        (s["schedule"] in ("none", "step", "cosine", "onecycle", "plateau"),
         f"--schedule must be none, step, cosine, onecycle or plateau, got {s['schedule']!r}."),
        (0 <= s["label_smoothing"] < 1, f"--label-smoothing must be in [0, 1), got {s['label_smoothing']}."),
        (s["val_split"] is None or 0 <= s["val_split"] < 1,
         f"--val-split must be in [0, 1), got {s['val_split']}."),
        (s["early_stopping"] >= 0, f"--early-stopping must be >= 0, got {s['early_stopping']}."),
        (s["checkpoint_every"] >= 0, f"--checkpoint-every must be >= 0, got {s['checkpoint_every']}."),
        (s["limit"] >= 0, f"--limit must be >= 0, got {s['limit']}."),
        (s["trace"] >= 0, f"--trace must be >= 0 (0: off), got {s['trace']}."),
        (s["seed"] >= 0, f"--seed must be >= 0, got {s['seed']}."),
        (s["backend"] in ("numpy", "cupy"), f"--backend must be numpy or cupy, got {s['backend']!r}."),
        (s["implementation"] in implementation.IMPLEMENTATIONS,
         f"--implementation must be reference, fast or raw, got {s['implementation']!r}."),
        (s["implementation"] != "raw" or s["backend"] == "cupy",
         "--implementation raw needs --backend cupy: the CUDA kernels run on the GPU only."),
        (s["precision"] in PRECISIONS,
         f"--precision must be {', '.join(PRECISIONS)}, got {s['precision']!r}."),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    parse_augment(s["augment"])
    parse_image_size(s["image_size"])
    mixed_precision.Policy(PRECISIONS[s["precision"]])    # bfloat16 without ml_dtypes: say so
    finetune.check_settings(s)


def parse_image_size(text):
    """"150" -> (150, 150); "150x120" -> (150, 120) (height x width)."""
    parts = str(text).lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        h, w = int(parts[0]), int(parts[-1])
        return h, w
    raise UsageError(f"--image-size takes H or HxW in pixels (e.g. 150 or 150x120), got {text!r}.")


def parse_augment(spec):
    """"crop+flip+rotation=15" -> dict(crop_padding=4, flip=True, cutout_size=0,
    warp=ImageDataGenerator(rotation_range=15) or None): crop, flip and cutout, and
    ImageDataGenerator's transforms (minicnn.augment.parse_spec)."""
    try:
        warp, words = augment.parse_spec(spec)
        generator = augment.ImageDataGenerator(**warp) if warp else None
    except ValueError as e:          # augment's words for the user, raised as plain ValueError
        raise UsageError(f"--augment: {e}") from None
    parts = set(words)
    return dict(crop_padding=4 if "crop" in parts else 0, flip="flip" in parts,
                cutout_size=8 if "cutout" in parts else 0, warp=generator)


@functools.lru_cache(maxsize=None)
def code_version():
    """minicnn's version, plus the git commit (and -dirty with uncommitted changes) when
    running from a checkout."""
    version = minicnn.__version__
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                                capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(__file__))
        if commit.returncode == 0:
            version += "+" + commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return version


# ---- the pieces of a run ---------------------------------------------------------------------
def prepare_data(settings):
    """-> dict with train/val/test uint8 arrays, classes, mean/std of the training split."""
    size = parse_image_size(settings["image_size"])
    ds = datasets.load_dataset(settings["data"], image_size=size)
    if ds.x_train.shape[2:] != size:
        raise DataError(f"{settings['data'] or 'CIFAR-10'} holds {ds.x_train.shape[2]}x"
                        f"{ds.x_train.shape[3]} images; --image-size resizes image folders "
                        f"only: leave it out for CIFAR-10.")
    seed = settings["seed"]
    x, y = ds.x_train, ds.y_train
    if settings["limit"]:
        drop_fraction = 1.0 - min(settings["limit"] / len(y), 1.0)
        keep, _ = datasets.stratified_split(y, drop_fraction, np.random.default_rng([seed, 5]))
        x, y = x[keep], y[keep]
    val_split = settings["val_split"]
    if val_split is None:
        val_split = 0.0 if ds.x_test is not None else 0.1
    if val_split > 0:
        train_idx, val_idx = datasets.stratified_split(y, val_split, np.random.default_rng([seed, 1]))
        x_val, y_val = x[val_idx], y[val_idx]
        x, y = x[train_idx], y[train_idx]
    else:                       # validate on the test split, as the Keras tutorial does
        x_val, y_val = ds.x_test, ds.y_test
    if val_split > 0 and len(x_val) == 0:
        raise DataError(f"--val-split {val_split} of {len(y):,} images leaves no class an image "
                        f"to validate on; give more images or a larger --val-split.")
    if x_val is None or len(x_val) == 0:
        raise DataError("There is no data to validate on; give --val-split > 0.")
    if settings["batch_size"] > len(x):
        raise DataError(f"The batch size {settings['batch_size']} is larger than the training "
                        f"split ({len(x)} images); give a smaller --batch-size.")
    mean, std = datasets.channel_stats(x)
    test = (ds.x_test, ds.y_test) if ds.x_test is not None else (x_val, y_val)
    return dict(x_train=x, y_train=y, x_val=x_val, y_val=y_val, x_test=test[0], y_test=test[1],
                classes=list(ds.classes), mean=mean, std=std, has_test=ds.x_test is not None)


def _check_shares(s, d):
    """Under mpiexec: every global batch (the epoch's last, smaller one too) must give each
    process an image, and the layers' maths must be one that sums across processes."""
    world = mpi.world()
    if world is not None and s["implementation"] == "reference":
        raise UsageError(f"--implementation reference: {data_parallel.REFERENCE_ALONE}")
    if world is not None and s.get("trace"):
        raise UsageError("--trace watches one model on the whole batch; under mpiexec each "
                         "process holds a share of it: trace a run without mpiexec.")
    last = len(d["x_train"]) % s["batch_size"] or s["batch_size"]
    if world is not None and min(last, s["batch_size"]) < world.size:
        raise DataError(f"--batch-size {s['batch_size']} on {len(d['x_train']):,} training "
                        f"images leaves a batch of {min(last, s['batch_size'])}, fewer images "
                        f"than the {world.size} processes: choose a --batch-size that leaves "
                        f"every batch at least {world.size}.")


def _build_model(settings, **kwargs):
    """The preset settings["model"] (zoo.build_model); the ValueError of an image size the
    preset cannot take is the user's, raised as a UsageError naming --image-size."""
    if _user_model_spec(settings["model"]):
        return build_user_model(settings["model"], **kwargs)
    try:
        return build_model(settings["model"], **kwargs)
    except ValueError as e:
        raise UsageError(f"--image-size {settings['image_size']}: {e}") from None


def make_optimizer(settings, model):
    """The optimiser of --optimizer; under --precision mixed_float16 inside a
    LossScaleOptimizer (minicnn.mixed_precision: dynamic loss scaling)."""
    lr, wd = settings["lr"], settings["weight_decay"]
    if settings["optimizer"] == "sgd":
        optimizer = optim.SGD(model, lr, momentum=0.9, nesterov=True, weight_decay=wd)
    elif settings["optimizer"] == "adam":
        optimizer = optim.Adam(model, lr, weight_decay=wd)
    else:
        optimizer = optim.AdamW(model, lr, weight_decay=wd)
    policy = mixed_precision.Policy(PRECISIONS[settings.get("precision") or "fp32"])
    return mixed_precision.for_policy(optimizer, policy)


def make_schedule(settings, optimizer, steps_per_epoch):
    """-> (schedule or None, when it steps: "batch", "epoch" or "metric")."""
    kind, epochs = settings["schedule"], settings["epochs"]
    if kind == "step":
        return optim.StepLR(optimizer, max(1, epochs // 3), 0.1), "epoch"
    if kind == "cosine":
        return optim.CosineAnnealingLR(optimizer, epochs), "epoch"
    if kind == "onecycle":
        return optim.OneCycleLR(optimizer, settings["lr"], epochs * steps_per_epoch,
                                pct_start=0.25, anneal="linear", div_factor=10.0,
                                final_div_factor=100.0), "batch"
    if kind == "plateau":
        return optim.ReduceLROnPlateau(optimizer, factor=0.1, patience=2), "metric"
    return None, None


def _dropout_layers(model):
    """The Dropout layers in forward order: each has a random generator a checkpoint keeps."""
    return [layer for layer in walk(model) if isinstance(layer, Dropout)]


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and exits.
    (Only in the main thread, the one Python runs signal handlers in: fit() called from
    another thread leaves the signals to the program's own handlers.)"""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:           # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- the run ---------------------------------------------------------------------------------
def fit(**overrides):
    """Train as `python -m minicnn.train` would with these settings; returns a dict with
    "history", "report", "out" and "status" ("finished", "early-stopped" or "interrupted").

    resume=True continues --out's last.npz with the settings that run was started with; the
    settings given here must agree with them (or force=True). One run at a time per --out:
    another process (or thread) training into it makes this raise FolderInUseError.

    Under mpiexec every process runs this with the same settings (minicnn.parallel.mpi): each
    sets the run up alone, rank 0 holding --out, and an error in any one's setup is raised on
    every one (rank 0's says what it was)."""
    world = mpi.world()            # None unless mpiexec started several processes
    if world is not None:
        world.started = False      # this run's setup: its errors are agreed on (MpiGroup.agree)
    try:
        given = {k: v for k, v in overrides.items() if v is not None and k != "debug"}
        s = resolve_settings(given)
        with (hold_out(Path(s["out"]), s["force"]) if group.is_root()   # before anything in
              else contextlib.nullcontext()):                          # --out is read
            return _fit(s, given)
    except BaseException as e:
        if world is not None and not world.started:     # in the setup: tell every rank
            world.agree(e)
        raise


def _fit(s, given):
    """fit's run, --out held."""
    out = Path(s["out"])
    last_path = out / "last.npz"
    if s["resume"]:
        if not last_path.exists():
            raise CheckpointError(f"There is no checkpoint to resume from: {last_path} does "
                                  f"not exist.")
        model, info, buffers = load_checkpoint(last_path, resumable=True)
        saved = {k: v for k, v in info["settings"].items()
                 if k in HYPERPARAMETERS and k not in ("resume", "force", "out")}
        _check_model(saved, given, last_path)
        if "backend" in given and "implementation" not in given:   # raw belongs to the GPU run
            saved.pop("implementation", None)
        s = resolve_settings({**saved, **given})       # what is not given: the run's own
    xp = get_backend(s["backend"])
    if mpi.world() is not None and s["backend"] == "cupy":
        from minicnn.parallel import nccl             # one GPU a process
        nccl.use_local_gpu(xp)
    _check_out(out, s)
    d = prepare_data(s)
    _check_shares(s, d)
    steps_per_epoch = -(-len(d["x_train"]) // s["batch_size"])
    seed = s["seed"]
    rng_order, rng_augment = np.random.default_rng([seed, 2]), np.random.default_rng([seed, 3])
    phase = finetune.phase_settings(s, info["epoch"] if s["resume"] else 0)
    if s["resume"]:
        _check_resume(info, s, d["classes"], last_path)
        if s["pretrained"]:                      # the base's statistics, as the run began
            d["mean"], d["std"] = (np.asarray(info["norm"][k], dtype=np.float32)
                                   for k in ("mean", "std"))
        model.to(s["backend"])
        optimizer = make_optimizer(phase, model)
        optimizer.load_state_dict({"lr": info["optimizer"]["lr"], "steps": info["optimizer"]["steps"],
                                   "loss_scale": info["optimizer"].get("loss_scale"),
                                   "state": {n: {b: to_device(v, s["backend"]) for b, v in bufs.items()}
                                             for n, bufs in buffers.items()}})
    else:
        model = (finetune.pretrained_model(s, d, np.random.default_rng([seed, 0]))
                 if s["pretrained"] else
                 _build_model(s, num_classes=len(d["classes"]),
                              image_size=tuple(d["x_train"].shape[2:]),
                              rng=np.random.default_rng([seed, 0]))).to(s["backend"])
        for i, layer in enumerate(_dropout_layers(model)):
            layer.rng = np.random.default_rng([seed, 4, i])
        optimizer = make_optimizer(phase, model)
        info = dict(epoch=0, step=0, history=_empty_history(), best_val_acc=-1.0, bad_epochs=0,
                    partial=dict(loss_sum=0.0, correct=0, seen=0),
                    rng=dict(order=rng_order.bit_generator.state,
                             augment=rng_augment.bit_generator.state))
    schedule, schedule_unit = make_schedule(phase, optimizer, steps_per_epoch)
    if s["resume"]:
        saved_phase = finetune.phase_settings(info["settings"], info["epoch"])
        _restore_lr(phase, dict(info, settings=saved_phase), optimizer, schedule, schedule_unit,
                    steps_per_epoch)
        rng_order.bit_generator.state = info["rng"]["order"]
        rng_augment.bit_generator.state = info["rng"]["augment"]
        for layer, state in zip(_dropout_layers(model), info["rng"]["dropout"]):
            layer.rng.bit_generator.state = state
        if group.is_root():
            print(f"Resuming {datasets.display_name(last_path)} at epoch {info['epoch'] + 1}, "
                  f"step {info['step']}.")
    if group.is_root():                       # under mpiexec, rank 0 alone writes and prints
        out.mkdir(parents=True, exist_ok=True)
        # (LOCK_FILE is not among RUN_FILES: --force never deletes the lock this run holds)
        for path in out.iterdir():
            if s["force"] and not s["resume"] and path.name in RUN_FILES:  # the old run's files
                path.unlink()
            elif is_temporary_of(path.name, RUN_FILES):     # a run killed while writing a file
                path.unlink()
        _write_json(out / "settings.json", {"settings": s, "code_version": code_version(),
                                            "classes": d["classes"],
                                            "train_images": len(d["x_train"]),
                                            "val_images": len(d["x_val"])})
        _print_header(s, d, model)
    if mpi.world() is not None:
        mpi.world().agree()     # the setup went well in every process, or all raise here

    loop = dict(s=s, d=d, xp=xp, model=model, optimizer=optimizer, schedule=schedule,
                schedule_unit=schedule_unit, rng_order=rng_order, rng_augment=rng_augment,
                steps_per_epoch=steps_per_epoch, out=out, info=info)
    # A diverging loss is reported by the loop in one sentence, not by NumPy's overflow warnings.
    epochs_done = info["epoch"]
    with (_StopSignal() as stop, implementation.use(s["implementation"]),
          mixed_precision.set_global_policy(PRECISIONS[s["precision"]]),
          np.errstate(over="ignore", invalid="ignore", divide="ignore")):
        try:
            status = _train(loop, stop)
        except WorkerError as e:
            raise TrainingStopped(_worker_lost(loop, e)) from None
    if status == "interrupted":
        return {"status": status, "history": info["history"], "out": str(out),
                "signal": stop.signum}
    # A finished run resumed trains no epoch, so nothing rewrote these: it may have been killed
    # between its last checkpoint and them.
    if not group.is_root():
        return {"status": status, "history": info["history"], "report": None, "out": str(out)}
    if info["epoch"] == epochs_done:
        _write_history(out, info["history"])
        plot_curves(info["history"], out / "curves.png")
    with (implementation.use(s["implementation"]),
          mixed_precision.set_global_policy(PRECISIONS[s["precision"]])):
        report = final_report(loop)
    return {"status": status, "history": info["history"], "report": report, "out": str(out)}


def _train(loop, stop):
    """The run's epochs through model.fit (minicnn.nn.fitting, the one training loop), with
    this tool's batches and its bookkeeping as a callback -> "finished", "early-stopped" or
    "interrupted"."""
    s, d, model, info = loop["s"], loop["d"], loop["model"], loop["info"]
    model.compile(loop["optimizer"], SoftmaxCrossEntropy(s["label_smoothing"]), ["accuracy"])
    source = _Batches(loop)
    run = _RunCallback(loop, stop, source)
    p = info["partial"]
    resume = ({"step": info["step"], "seen": p["seen"],
               "sums": {"loss": p["loss_sum"], "accuracy": p["correct"]}}
              if info["step"] else None)
    x_val = datasets.normalize(d["x_val"], d["mean"], d["std"], loop["xp"])
    try:
        model.fit(source, epochs=s["epochs"], initial_epoch=info["epoch"], initial_state=resume,
                  validation_data=(x_val, d["y_val"]), validation_batch_size=500,
                  callbacks=[*_trace(s, loop["out"]), run], verbose=1)
    except _Interrupted:
        return _interrupted(loop, stop)
    return run.status


def _trace(s, out):
    """[the backprop trace] for --trace N (appending to the run's trace.jsonl on --resume),
    or []. It goes before the run's callback, which may stop fit inside a step."""
    return ([BackpropTrace(every=s["trace"], log_dir=out, append=s["resume"])]
            if s["trace"] and group.is_root() else [])


class _Batches:
    """The training batches fit takes (a batch source: len() and epoch_batches): the epoch's
    order drawn from the run's order generator (replayed to resume inside an epoch), each
    batch normalised and augmented with the run's augmentation generator."""

    def __init__(self, loop):
        s, d = loop["s"], loop["d"]
        self.loop, self.aug = loop, parse_augment(s["augment"])
        self.iterator = datasets.BatchIterator(d["x_train"], d["y_train"], s["batch_size"],
                                               rng=loop["rng_order"])
        self.last = None                  # the last batch handed out, for the divergence report

    def __len__(self):
        return len(self.iterator)

    def epoch_batches(self, epoch, start):
        loop, info = self.loop, self.loop["info"]
        if start == 0:          # the epoch's order is drawn from this state: keep it
            info["rng"]["order"] = loop["rng_order"].bit_generator.state
        else:                   # resuming mid-epoch: replay the order, skip the done steps
            loop["rng_order"].bit_generator.state = info["rng"]["order"]
        d, xp = loop["d"], loop["xp"]
        for xb, yb in self.iterator.start_at(start):
            xb = datasets.normalize(xb, d["mean"], d["std"], xp)
            xb = _augmented(xb, loop["rng_augment"], self.aug)
            self.last = (xb, yb)       # labels on the host: moved only if needed
            yield xb, yb


class _Interrupted(Exception):
    """Raised by the run's callback after saving, on SIGINT or SIGTERM: fit stops at once."""


class _RunCallback(Callback):
    """The training tool's part of each step and epoch: what a resume needs (info), the
    learning-rate schedule, checkpoints (every N steps, on a signal, each epoch's last and
    best), a diverged loss reported in one sentence, history files and plots, early stopping."""

    def __init__(self, loop, stop, source):
        super().__init__()
        self.loop, self.stop, self.source, self.status = loop, stop, source, "finished"
        self.check_at = 0.0                    # when the loss is next read (see below)

    def on_train_batch_end(self, step, logs=None):
        loop, info, s = self.loop, self.loop["info"], self.loop["s"]
        info["step"] = self.params["progress"]["step"]
        every = s["checkpoint_every"]
        save = self._signalled() or (every and info["step"] % every == 0
                                     and info["step"] < loop["steps_per_epoch"])
        # Reading the loss waits for a GPU: there it is checked at the progress bar's pace and
        # before every checkpoint; on the CPU, where a read costs nothing, after every step.
        now = time.perf_counter()
        if save or loop["xp"] is np or now >= self.check_at:
            self.check_at = now + fitting.REFRESH_SECONDS
            self._stop_if_diverged(logs["loss"])
        if loop["schedule_unit"] == "batch":
            loop["schedule"].step()
        if save:
            progress = self.params["progress"]
            info["partial"] = dict(loss_sum=progress["sums"]["loss"], seen=progress["seen"],
                                   correct=int(progress["sums"]["accuracy"]))
            _save(loop, "last.npz")
            if self.stop.signum is not None:
                raise _Interrupted

    def _signalled(self):
        """Whether SIGINT or SIGTERM came; under mpiexec, to any of its processes (they all
        stop after this step, and rank 0 names the signal)."""
        world = mpi.world()
        if world is not None:
            self.stop.signum = next((n for n in world.allgather(self.stop.signum) if n), None)
        return self.stop.signum is not None

    def _stop_if_diverged(self, loss):
        """TrainingStopped, in _diverged's sentence, when loss (the epoch's running mean: nan
        or inf from the first such batch on) is not finite. Under mpiexec rank 0 raises it (the
        loss is the same in every process), and its exit ends the others."""
        if group.is_root() and not math.isfinite(loss):
            loop, (xb, yb) = self.loop, self.source.last
            raise TrainingStopped(_diverged(loop, xb, loop["xp"].asarray(yb), self.model.loss,
                                            loss, loop["info"]["epoch"] + 1, loop["info"]["step"]))

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self._stop_if_diverged(logs["loss"])                 # before the epoch's checkpoints
        status = _end_of_epoch(self.loop, logs, time.perf_counter() - self.started)
        if self._signalled():
            raise _Interrupted
        if status:
            self.status, self.model.stop_training = status, True


def _augmented(xb, rng, aug):
    """The batch cropped, flipped, cut out, and warped by ImageDataGenerator's transforms,
    all drawn from rng (the run's augmentation generator, which checkpoints keep)."""
    xb = datasets.augment(xb, rng, aug["crop_padding"], aug["flip"], aug["cutout_size"])
    if aug["warp"] is None:
        return xb
    params = [aug["warp"].get_random_transform(xb.shape[1:], seed=rng) for _ in range(len(xb))]
    return augment.apply_transforms(xb, params, aug["warp"].fill_mode, aug["warp"].cval)


def _diverged(loop, xb, yb, loss_fn, loss, epoch, step):
    """The sentence for a loss that became nan or inf at (epoch, step): it says whether the
    last checkpoint is one to go on from, i.e. still gives a finite loss on this batch (a
    checkpoint written a step before the blow-up may already hold overflowing weights)."""
    s, last = loop["s"], loop["out"] / "last.npz"
    head = f"The loss became {loss} at epoch {epoch}, step {step}; training stopped"
    lower = f"a lower learning rate than --lr {s['lr']}"
    if not last.exists():
        return f"{head} before any checkpoint was written. Start again with {lower}."
    model, info, _ = load_checkpoint(last, resumable=True)
    model.to(s["backend"])
    finite = math.isfinite(loss_fn(model.forward(xb, training=True), yb)[0])
    when = _saved_when(info)
    if finite:
        return (f"{head}. The last checkpoint, {last} (saved {when}), still gives a finite loss "
                f"on this batch: continue from it with --resume --force and {lower}.")
    return (f"{head}. The last checkpoint, {last} (saved {when}), diverges on this batch too: "
            f"start again with --force and {lower}.")


def _worker_lost(loop, error):
    """The sentence for a worker process that died in the middle of a step (killed, out of
    memory): that step made no update, and --resume continues from the last checkpoint, which
    a step never touches."""
    last, out = loop["out"] / "last.npz", loop["out"]
    head = f"{error} Training stopped in epoch {loop['info']['epoch'] + 1}"
    if not last.exists():
        return f"{head}, before any checkpoint was written: start again."
    _, info, _ = load_checkpoint(last, resumable=True)
    return (f"{head}; the last checkpoint, {last} (saved {_saved_when(info)}), is intact: "
            f"continue from it with python -m minicnn.train --resume --out {out}")


def _saved_when(info):
    """When a checkpoint with this info was saved, in words."""
    return (f"after epoch {info['epoch']}" if info["step"] == 0
            else f"at epoch {info['epoch'] + 1}, step {info['step']}")


def _end_of_epoch(loop, logs, seconds):
    """Record the epoch fit finished, step the schedule, checkpoint; -> "early-stopped" or None."""
    s, info = loop["s"], loop["info"]
    h = info["history"]
    epoch = info["epoch"] + 1
    row = dict(epoch=epoch, train_loss=logs["loss"], train_acc=logs["accuracy"],
               val_loss=logs["val_loss"], val_acc=logs["val_accuracy"], lr=logs["lr"],
               seconds=round(seconds, 2))
    for k, v in row.items():
        h[k].append(v)
    if loop["schedule_unit"] == "epoch":
        loop["schedule"].step()
    elif loop["schedule_unit"] == "metric":
        loop["schedule"].step(logs["val_loss"])
    if finetune.unfreezes_after(s, epoch):             # its checkpoints start the new phase
        finetune.start_fine_tuning(loop, make_optimizer, make_schedule)
    val_acc = logs["val_accuracy"]
    improved = val_acc > info["best_val_acc"]
    info["best_val_acc"] = max(val_acc, info["best_val_acc"])
    info["bad_epochs"] = 0 if improved else info["bad_epochs"] + 1
    info.update(epoch=epoch, step=0, partial=dict(loss_sum=0.0, correct=0, seen=0))
    if improved:
        _save(loop, "best.npz")
    _save(loop, "last.npz")
    if group.is_root():
        _write_history(loop["out"], h)
        plot_curves(h, loop["out"] / "curves.png")
    patience = s["early_stopping"]
    if patience and info["bad_epochs"] >= patience and epoch < s["epochs"]:
        epochs = "1 epoch" if patience == 1 else f"{patience} epochs"
        if group.is_root():
            tqdm.write(f"Early stopping: no val-accuracy gain for {epochs} "
                       f"(best {info['best_val_acc']:.4f}).")
        return "early-stopped"
    return None


def _save(loop, name):
    """Checkpoint the run to --out/name (under mpiexec, rank 0 alone)."""
    if not group.is_root():
        return
    info, s = loop["info"], loop["s"]
    if info["step"] == 0:    # between epochs: the next epoch's order comes from the current state
        info["rng"]["order"] = loop["rng_order"].bit_generator.state
    info["rng"]["augment"] = loop["rng_augment"].bit_generator.state
    info["rng"]["dropout"] = [layer.rng.bit_generator.state for layer in _dropout_layers(loop["model"])]
    info["schedule"] = loop["schedule"].state_dict() if loop["schedule"] is not None else None
    payload = dict(info, settings=s, classes=loop["d"]["classes"], code_version=code_version(),
                   norm={"mean": loop["d"]["mean"].tolist(), "std": loop["d"]["std"].tolist()},
                   input_shape=list(loop["d"]["x_train"].shape[1:]))
    save_checkpoint(loop["out"] / name, loop["model"], loop["optimizer"], payload)


def _interrupted(loop, stop):
    name = signal.Signals(stop.signum).name
    info = loop["info"]
    if group.is_root():
        print(f"\n{name} received: saved {loop['out'] / 'last.npz'} at epoch {info['epoch'] + 1}, "
              f"step {info['step']}. Resume with: python -m minicnn.train --resume --out "
              f"{loop['out']}", file=sys.stderr)
    if mpi.world() is not None:
        mpi.world().barrier()     # every process leaves once rank 0 has saved and said so
    return "interrupted"


# ---- one run per --out ----------------------------------------------------------------------
LOCK_FILE = ".minicnn.lock"      # in --out while a run holds it; not one of the RUN_FILES
_held_lock_fds = set()           # the lock files this process holds open


def _close_held_locks():
    """In a process forked from this one (the data-parallel workers): close its copies of the
    held locks' files, so that a worker still alive for a moment after its trainer was killed
    does not keep the lock. (A flock belongs to the open file, which the parent still holds:
    closing a copy leaves the parent's lock as it was.)"""
    for fd in _held_lock_fds:
        os.close(fd)
    _held_lock_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks)


@contextlib.contextmanager
def hold_out(out, force=False):
    """Hold the folder out for one run, from before anything in it is read until the run ends.

    An exclusive flock on out/LOCK_FILE, which holds this process's pid, host and start time
    (for the message another run gets). The operating system releases a flock when its process
    ends, however it ends: a run killed with SIGKILL leaves the file but no lock, so --resume
    goes on at once. Another run on out (another process, or fit in another thread) raises
    FolderInUseError at once, --force or not. Creates out and its missing parents; at the end
    removes the lock file, then the folders it created if nothing else was written into them.

    Where flock is not available (Windows; a file system without locks) the run goes on
    unlocked, after a one-line warning: two runs on one --out are then not refused.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory.")
    created, folder = [], out.absolute()
    while not folder.exists() and folder != folder.parent:
        created.append(folder)                   # innermost first
        folder = folder.parent
    fd = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _lock(out, force) if fcntl is not None else None
        if fd is None:
            warnings.warn(f"{out} cannot be locked on this system: make sure no other run uses "
                          f"it while this one does.")
        yield
    finally:
        if fd is not None:
            # removed while still held: a run that opens it now finds it gone once it has the
            # lock (_lock's same-file check), and tries again with a new file
            with contextlib.suppress(OSError):
                os.unlink(out / LOCK_FILE)
            _held_lock_fds.discard(fd)
            os.close(fd)
        for folder in created:
            try:
                os.rmdir(folder)                # only an empty folder
            except OSError:
                break


def _lock(out, force):
    """-> the descriptor of out/LOCK_FILE, flock'ed exclusively and holding this process's
    pid, host and start time; FolderInUseError when another run holds it; None when this
    file system cannot lock."""
    path = out / LOCK_FILE
    for _ in range(100):     # a run that ends removes its lock file: then try its successor's
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:               # out was removed after mkdir: try again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUseError(_in_use(out, _holder(path), force)) from None
        except OSError:                         # no locks here (ENOLCK, EOPNOTSUPP...)
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:                            # its last holder removed it meanwhile
            os.close(fd)
            continue
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (holder + "\n").encode("utf-8"), 0)
        except OSError as e:                    # a full disk: name the file
            os.close(fd)
            raise OSError(e.errno, e.strerror, str(path)) from None
        _held_lock_fds.add(fd)
        return fd
    raise FolderInUseError(f"{out} is in use by runs that keep starting and stopping: try again.")


def _holder(path):
    """{"pid", "host", "started"} from a held lock file, or None when it cannot be read. (Its
    holder writes them just after taking the lock: give it a moment.)"""
    for _ in range(40):
        try:
            text = Path(path).read_text(encoding="utf-8")
            if text.endswith("\n"):
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.025)
    return None


def _in_use(out, holder, force):
    """The sentence for an --out another run holds."""
    who = "another training run"
    if isinstance(holder, dict) and "pid" in holder:
        host = holder.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        mine = " (this process)" if not where and holder["pid"] == os.getpid() else ""
        who += f" (pid {holder['pid']}{where}{mine}, started {holder.get('started', '?')})"
    rule = ", and --force does not take a folder from a running run" if force else ""
    return f"{out} is in use by {who}{rule}: wait for it to end or stop it, or choose another --out."


def _check_out(out, s):
    """Refuse an --out that cannot hold the run's files, or (without --resume or --force) that
    holds another run's: running the same command twice must not replace a finished run.
    (hold_out, before it, has refused an --out that is a file, and one another run holds; its
    lock file is not a run's file.)"""
    for name in RUN_FILES:
        if (out / name).is_dir():
            raise DataError(f"{out / name} is a directory; the run writes a file there: "
                            f"choose another --out.")
    # settings.json alone is a run that stopped before its first checkpoint: nothing to keep
    held = [name for name in ("last.npz", "best.npz", "history.json") if (out / name).exists()]
    if held and not s["resume"] and not s["force"]:
        raise CheckpointError(f"{out} already holds a run ({', '.join(held)}): continue it with "
                              f"--resume, choose another --out, or add --force to start over "
                              f"(its files are replaced).")


def _restore_lr(s, info, optimizer, schedule, unit, steps_per_epoch):
    """Set the lr (and the schedule's position) of a resumed run.

    With the run's own settings this restores the saved state exactly. With --force and
    another --lr, the run goes on at the rate it had, scaled by new / old (the schedule's base
    becomes the new --lr); with another --schedule, the new schedule starts where the run is.
    """
    saved = info["settings"]
    same_schedule = saved["schedule"] == s["schedule"]
    lr = info["optimizer"]["lr"] * (s["lr"] / saved["lr"])
    if schedule is None:
        optimizer.lr = lr if same_schedule else s["lr"]
    elif unit == "metric":                                   # plateau: the lr is the state
        if same_schedule:
            schedule.load_state_dict(info["schedule"])
        optimizer.lr = lr if same_schedule else s["lr"]
    else:
        done = info["epoch"] if unit == "epoch" else info["epoch"] * steps_per_epoch + info["step"]
        state = info["schedule"] if same_schedule else {"last_step": done}
        schedule.load_state_dict(dict(state, base_lr=s["lr"]))   # sets optimizer.lr


def _user_model_spec(name):
    """(file, function) for --model path/to/file.py:function, else None."""
    file, sep, function = str(name).rpartition(":")
    return (file, function) if sep and file.endswith(".py") and function.isidentifier() else None


def build_user_model(spec, num_classes, image_size, rng):
    """The model function(...) in the user's file returns: called with those of num_classes,
    image_size, in_channels and rng that it takes. It must be a minicnn model (one that
    minicnn can save and rebuild) whose outputs are num_classes wide for such images."""
    file, function = _user_model_spec(spec)
    if not os.path.isfile(file):
        raise UsageError(f"--model {spec}: there is no file {file}.")
    module_spec = importlib.util.spec_from_file_location(f"minicnn_user_model_{function}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)                     # the user's own code, as given
    make = getattr(module, function, None)
    if not callable(make):
        raise UsageError(f"--model {spec}: {file} has no function {function}.")
    offered = dict(num_classes=num_classes, image_size=image_size, in_channels=3, rng=rng)
    takes = inspect.signature(make).parameters
    model = make(**{k: v for k, v in offered.items() if k in takes})
    try:
        layer_config(model)
    except (ValueError, AttributeError):
        raise UsageError(f"--model {spec}: {function}() returned {type(model).__name__}, not a "
                         f"model of minicnn's layers (a Sequential, say).") from None
    try:
        probe = model.forward(np.zeros((1, 3) + tuple(image_size), dtype=np.float32))
    except ValueError as e:                    # the layers' own sentence about shapes
        raise UsageError(f"--model {spec}: {function}()'s model cannot take "
                         f"{image_size[0]}x{image_size[1]} images: {e}") from None
    if probe.shape != (1, num_classes):
        raise UsageError(f"--model {spec}: {function}() gives outputs of shape "
                         f"{tuple(probe.shape[1:])} for {image_size[0]}x{image_size[1]} images; "
                         f"the data has {num_classes} classes.")
    return model


def _check_model(saved, given, path):
    """A run goes on with its own model, --force or not."""
    if "model" in given and given["model"] != saved.get("model"):
        raise CheckpointError(f"{path} holds a {saved.get('model')} run, not {given['model']}: "
                              f"resume it without --model, or give another --out for a new run.")


def _check_resume(info, settings, classes, path):
    saved = info["settings"]
    if list(info.get("classes", [])) != list(classes):
        raise CheckpointError(f"{path} was trained on {_names(info.get('classes', []))}, but "
                              f"{settings['data'] or 'CIFAR-10'} has {_names(classes)}: resume "
                              f"with the run's data.")
    # (a setting newer than the checkpoint: its default, which the run had)
    saved = {k: saved.get(k, HYPERPARAMETERS.get(k, (None,))[0]) for k in settings}
    differ = [k for k in settings if k not in RESUME_FREE and saved.get(k) != settings[k]]
    if differ and not settings["force"]:
        detail = "; ".join(f"--{k.replace('_', '-')} was {saved.get(k)!r}, now {settings[k]!r}"
                           for k in differ)
        raise CheckpointError(f"{path} was trained with other settings ({detail}); run with the "
                              f"same settings, or add --force to continue anyway.")


def _names(classes, shown=4):
    """"3 classes (circle, cross, stripes)", the first few names of a long list."""
    names = (", ".join(datasets.printable(c) for c in list(classes)[:shown])
             + (", ..." if len(classes) > shown else ""))
    return f"{len(classes)} classes ({names})"


# ---- output ----------------------------------------------------------------------------------
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def _empty_history():
    return {k: [] for k in HISTORY_KEYS}


def _write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode("utf-8")))


def _write_history(out, history):
    _write_json(out / "history.json", history)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(HISTORY_KEYS)
    writer.writerows(zip(*(history[k] for k in HISTORY_KEYS)))
    atomic_write(out / "history.csv", lambda f: f.write(text.getvalue().encode("utf-8")))


TABLE_HEADER = fitting.table_header()       # fit prints it, then a row an epoch


_IMPLEMENTATION_NOTE = {"fast": "", "raw": " (raw CUDA kernels)",
                        "reference": " (reference maths: slow)"}


def _print_header(s, d, model):
    params = sum(int(p.size) for p in model.params.values())
    trainable = sum(int(p.size) for p in model.trainable_params.values())
    frozen = f", {params - trainable:,} frozen" if trainable < params else ""
    base = f" from {datasets.display_name(s['pretrained'])}" if s["pretrained"] else ""
    print(f"minicnn {code_version()} | model {s['model']}{base} ({params:,} parameters{frozen}) | backend "
          f"{s['backend']}{_IMPLEMENTATION_NOTE[s['implementation']]} | "
          f"{'' if s['precision'] == 'fp32' else 'precision ' + s['precision'] + ' | '}"
          f"{len(d['x_train']):,} train / {len(d['x_val']):,} val images | "
          f"{len(d['classes'])} classes")
    print(f"optimizer {s['optimizer']} lr {s['lr']} wd {s['weight_decay']} schedule {s['schedule']} "
          f"| batch {s['batch_size']} | epochs {s['epochs']} | augment {s['augment']} | "
          f"label smoothing {s['label_smoothing']} | seed {s['seed']} | "
          f"out {datasets.display_name(s['out'])}")


def final_report(loop):
    """Evaluate on the test split (or validation split), print and save the report and plots.

    Class names and paths in the report are printable text (datasets.printable/display_name:
    bytes that are not UTF-8 as \\xNN, a newline as \\n), so report.json is valid UTF-8 JSON
    whatever the folder names, and the printout survives any stdout encoding (what it cannot
    encode becomes \\u escapes)."""
    s, d, out = loop["s"], loop["d"], loop["out"]

    def say(text):
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
        print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))

    split = "test" if d["has_test"] else "validation"
    logits = predict_logits(loop["model"], d["x_test"], d["mean"], d["std"], loop["xp"], tta=s["tta"])
    report = classification_report(logits, d["y_test"], d["classes"])
    report.update(split=split, tta=s["tta"], checkpoint=datasets.display_name(out / "last.npz"))
    say(f"\nEvaluation on the {split} split ({len(d['y_test']):,} images"
        f"{', flip TTA' if s['tta'] else ''}):")
    say(format_report(report))
    _write_json(out / "report.json", report)
    plot_confusion(np.array(report["confusion"]), d["classes"], out / "confusion.png")
    # 25 images drawn at random (seeded): the split is ordered by class
    show = np.sort(np.random.default_rng([s["seed"], 6]).choice(len(logits), min(25, len(logits)),
                                                                 replace=False))
    plot_predictions(d["x_test"][show], d["y_test"][show], logits[show].argmax(axis=1),
                     d["classes"], out / "predictions.png", probs=_softmax_np(logits[show]))
    say(f"Wrote {datasets.display_name(out)}/: last.npz best.npz history.json history.csv "
        f"settings.json curves.png report.json confusion.png predictions.png"
        f"{' trace.jsonl trace.png' if s['trace'] else ''}")
    return report


def _softmax_np(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _main(argv):
    # under mpiexec every process parses the same argv: rank 0 alone says what is wrong in it
    with contextlib.redirect_stderr(sys.stderr if group.is_root() else io.StringIO()):
        args = build_parser().parse_args(argv)
    result = fit(**vars(args))
    if result["status"] == "interrupted":
        return 128 + result["signal"]
    return 0


def main(argv=None):
    """The command line: exit status 0, or 2 with one sentence on stderr for bad input."""
    return run(_main, argv)

