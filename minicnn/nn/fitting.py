"""compile, fit, evaluate and predict: the Keras workflow on any minicnn model.

    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x_train, y_train, epochs=10, validation_data=(x_test, y_test))
    test_loss, test_acc = model.evaluate(x_test, y_test)
    logits = model.predict(x_test[:1])

Images are NCHW arrays, labels (N,) integers. fit takes arrays, or an iterator of (x, y)
batches that has a len() (ImageDataGenerator.flow), and returns a History whose .history has
Keras's keys: "loss", "accuracy", "val_loss", "val_accuracy", "lr". Each step runs through
minicnn.parallel.data_parallel (the batch split over the cores), then optimizer.step().
"""
import time
from collections.abc import Mapping

import numpy as np
from tqdm import tqdm

from minicnn import mixed_precision
from minicnn.backend import array_module, to_numpy
from minicnn.callbacks import CallbackList, History
from minicnn.nn import optim
from minicnn.nn.layers import Conv2D, Dense, walk
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.parallel import data_parallel, group

OPTIMIZERS = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW}
LOSSES = {"sparse_categorical_crossentropy": SoftmaxCrossEntropy,
          "softmax_cross_entropy": SoftmaxCrossEntropy}
METRICS = {"accuracy": 1, "acc": 1, "top5": 5}           # name -> k of its top-k accuracy


def compile(model, optimizer="adam", loss="sparse_categorical_crossentropy", metrics=None):
    """Give model what fit needs: an optimizer (a name or an object, bound to the model here),
    a loss (a name or a callable (logits, labels) -> (loss, dlogits)), and metrics by name."""
    if isinstance(optimizer, str):
        if optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}, or pass an optimizer object.")
        optimizer = OPTIMIZERS[optimizer.lower()]()
    if not isinstance(optimizer, optim.Optimizer):
        raise TypeError(f"optimizer must be a name or a minicnn.nn.optim optimizer, got "
                        f"{type(optimizer).__name__}.")
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"Unknown loss {loss!r}; choose one of {', '.join(LOSSES)} "
                             f"(logits in, integer labels), or pass a callable.")
        loss = LOSSES[loss]()
    if not callable(loss):
        raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}.")
    metrics = list(metrics or [])
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}.")
    # under mixed_float16: wrapped in a LossScaleOptimizer, as Keras's compile does
    model.optimizer, model.loss = mixed_precision.for_policy(optimizer).bind(model), loss
    model.metrics = ["accuracy" if m == "acc" else m for m in metrics]


def _compiled(model, what):
    if getattr(model, "optimizer", None) is None:
        raise RuntimeError(f"{what} needs a compiled model: call model.compile(optimizer=..., "
                           f"loss=..., metrics=[...]) first.")


# ---- batches -----------------------------------------------------------------------------------
def _labels(y, n, what):
    """y as (N,) integers: Keras's (N, 1) column is flattened."""
    y = np.asarray(to_numpy(y))
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise ValueError(f"{what} takes labels as (N,) integers for {n} images, got "
                         f"{y.dtype} of shape {y.shape}.")
    return y


def _as_input(model, x):
    """x on the model's device and in its parameter dtype (Keras casts inputs likewise)."""
    params = next(iter(model.params.values()), None)
    return x if params is None else _on_device(model, x).astype(params.dtype, copy=False)


def _on_device(model, a):
    """a on the device of the model's parameters."""
    params = next(iter(model.params.values()), None)
    return a if params is None else array_module(params).asarray(a)


def _array_batches(x, y, batch_size, shuffle, rng, start=0):
    """One epoch of (x, y) batches from arrays, in a fresh random order when shuffle, from
    batch start on."""
    order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
    for lo in range(start * batch_size, len(x), batch_size):
        take = np.sort(order[lo:lo + batch_size]) if shuffle else order[lo:lo + batch_size]
        yield x[take], y[take]


def _epochs_of(x, y, batch_size, shuffle, seed):
    """-> (steps per epoch, epoch_batches(epoch, start): that epoch's batches from batch start).

    x: arrays (with y); an iterator with len() (ImageDataGenerator.flow), whose next batches
    make each epoch; or a batch source, an object with len() and epoch_batches(epoch, start)
    (python -m minicnn.train's, which replays an epoch's order to resume inside it)."""
    if hasattr(x, "epoch_batches"):
        return len(x), x.epoch_batches
    if hasattr(x, "__next__") or (hasattr(x, "__iter__") and not hasattr(x, "shape")):
        if y is not None:
            raise ValueError("fit takes y only with array x; a generator yields (x, y) itself.")
        try:
            steps = len(x)
        except TypeError:
            raise ValueError("fit needs to know how many batches an epoch has: give an "
                             "iterator with len(), such as ImageDataGenerator.flow(...).") from None
        stream = iter(x)
        return steps, lambda epoch, start: (next(stream) for _ in range(start, steps))
    if y is None:
        raise ValueError("fit takes labels: model.fit(x, y, ...).")
    y = _labels(y, len(x), "fit")
    rng = np.random.default_rng(seed)
    return (-(-len(x) // batch_size),
            lambda epoch, start: _array_batches(x, y, batch_size, shuffle, rng, start))


# ---- running means of the loss and the metrics ----------------------------------------------
# On a GPU every number read back to the host waits for all the work queued before it, so the
# sums stay on the device and are read only when someone looks at them.
def _hits(logits, labels, k):
    """How many of the rows of logits (N, K) have their label among their k largest values:
    a 0-d array on logits' device, as are labels (N,)."""
    if k == 1:
        return (logits.argmax(axis=1) == labels).sum()
    top = array_module(logits).argsort(-logits, axis=1)[:, :k]              # (N, k)
    return (top == labels[:, None]).any(axis=1).sum()


def _to_host(values):
    """[float]: numbers and 0-d arrays of one device, read back in one device-to-host copy."""
    xp = array_module(*values)
    if xp is np:                                                  # on the host already
        return [float(v) for v in values]
    return to_numpy(xp.stack([xp.asarray(v, dtype=xp.float64) for v in values])).tolist()


class DeviceNumbers(Mapping):
    """A read-only dict of numbers that stay on the model's device (0-d arrays) until one is
    looked up: the first look-up reads them all back at once, as floats (one wait for a GPU;
    none on the CPU). Its keys are known without a read: "loss" in logs waits for nothing.
    fit's on_train_batch_end logs and params["progress"]["sums"] are these."""

    def __init__(self, values):
        self._values, self._host = dict(values), None

    def __getitem__(self, key):
        if self._host is None:
            self._host = dict(zip(self._values, _to_host(list(self._values.values()))))
        return self._host[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __contains__(self, key):
        return key in self._values

    def __repr__(self):
        return repr(dict(self))


class _Means:
    """The epoch's loss and metrics so far, weighted by batch size (Keras's running means).
    The sums are 0-d arrays on the model's device: add() waits for nothing."""

    def __init__(self, metrics, seen=0, sums=None):
        self.metrics, self.seen = metrics, seen
        self.sums = {**dict.fromkeys(["loss", *metrics], 0.0), **(sums or {})}

    def add(self, loss, logits, labels):
        """loss: the batch's mean (a 0-d array, or a number); logits (N, K); labels (N,)."""
        xp = array_module(logits)
        labels = xp.asarray(labels)                                  # (N,) on logits' device
        self.seen += len(labels)
        self.sums["loss"] = self.sums["loss"] + xp.asarray(loss, dtype=xp.float64) * len(labels)
        for name in self.metrics:
            self.sums[name] = self.sums[name] + _hits(logits, labels, METRICS[name])

    def state(self):
        """{"seen": images, "sums": {name: sum}}, the sums read back when first looked up."""
        return {"seen": self.seen, "sums": DeviceNumbers(self.sums)}

    def logs(self, prefix=""):
        """{prefix + name: running mean}, read back when first looked up."""
        seen = max(self.seen, 1)
        return DeviceNumbers({prefix + k: v / seen for k, v in self.sums.items()})


# ---- the loop ------------------------------------------------------------------------------------
TABLE_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr")


def table_header():
    return f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>8} " \
           f"{'lr':>9} {'seconds':>8}"


def table_row(epoch, logs, seconds):
    """The epoch's line, as python -m minicnn.train prints it; - for what the logs lack."""
    cells = [(k, w, "e" if k == "lr" else "f") for k, w in zip(TABLE_KEYS, (10, 9, 9, 8, 9))]
    text = [f"{logs[k]:>{w}.{2 if f == 'e' else 4}{f}}" if k in logs else f"{'-':>{w}}"
            for k, w, f in cells]
    return f"{epoch:>5d} " + " ".join(text) + f" {seconds:>8.1f}"


def fit(model, x, y=None, batch_size=32, epochs=1, validation_data=None, validation_split=0.0,
        callbacks=None, shuffle=True, verbose=1, initial_epoch=0, seed=None,
        validation_batch_size=None, initial_state=None):
    """Train model for epochs (from initial_epoch) on x, y; -> History. See the module's doc.

    validation_split: the last fraction of x, y (before shuffling) held out, as Keras does.
    seed: the shuffling's generator seed (None: a fresh one).
    initial_state: resume inside epoch initial_epoch: {"step": batches done, "seen": images
    done, "sums": {"loss": ..., "accuracy": ...}}, what params["progress"] held when a callback
    saved it. Callbacks see the running state in self.params["progress"] after every batch.

    The running loss and metrics stay on the model's device, and are read back (on a GPU, a
    wait for it) when the progress bar redraws (at most every REFRESH_SECONDS), at an epoch's
    end, and when a callback looks at its batch logs or at params["progress"]["sums"]
    (DeviceNumbers: one read for all the numbers of a batch).
    """
    _compiled(model, "fit")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}.")
    if validation_split:
        if not hasattr(x, "shape"):
            raise ValueError("validation_split needs array x; give validation_data instead.")
        cut = len(x) - int(round(len(x) * validation_split))
        validation_data, x, y = (x[cut:], y[cut:]), x[:cut], y[:cut]
    steps, epoch_batches = _epochs_of(x, y, batch_size, shuffle, seed)
    history = History()
    params = {"epochs": epochs, "steps": steps, "verbose": verbose, "progress": None}
    calls = CallbackList([*(callbacks or []), history], model, params)
    model.stop_training, logs = False, {}
    verbose = verbose if group.is_root() else 0          # under mpiexec, rank 0 alone prints
    calls.on_train_begin(logs)
    if verbose:
        tqdm.write(table_header())
    for epoch in range(initial_epoch, epochs):
        state = initial_state if epoch == initial_epoch and initial_state else {"step": 0}
        means = _Means(model.metrics, state.get("seen", 0), state.get("sums"))
        calls.on_epoch_begin(epoch, {})
        logs = _train_epoch(model, epoch, epoch_batches(epoch, state["step"]), state["step"],
                            means, calls, params, verbose)
        if validation_data is not None:
            values = evaluate(model, *validation_data, return_dict=True,
                              batch_size=validation_batch_size or batch_size)
            logs.update({f"val_{k}": v for k, v in values.items()})
        logs["lr"] = model.optimizer.lr
        if verbose:
            tqdm.write(table_row(epoch + 1, logs, logs.pop("seconds")))
        logs.pop("seconds", None)
        calls.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    calls.on_train_end(logs)
    return history


REFRESH_SECONDS = 0.1    # the progress bar's redraws (tqdm's default), each a read of the means


def _train_epoch(model, epoch, batches, start, means, calls, params, verbose):
    """One epoch's steps, from batch start: forward, loss, backward (the batch split over the
    cores), optimizer step, the callbacks; -> the epoch's logs, with its "seconds"."""
    started, seen_before = time.perf_counter(), means.seen
    bar = tqdm(total=params["steps"], initial=start, desc=f"epoch {epoch + 1}", unit="batch",
               leave=False, dynamic_ncols=True, disable=None if verbose == 1 else True,
               mininterval=float("inf"))                # redrawn below, with the means read
    redraw_at = started
    try:                                   # the bar is closed before any error is printed
        for step, (xb, yb) in enumerate(batches, start=start):
            calls.on_train_batch_begin(step, {})
            yb = _labels(yb, len(xb), "fit")           # (N,) on the host: the loss checks them
            loss, logits = data_parallel.train_step(model, _as_input(model, xb), yb,
                                                    model.optimizer.scale_loss(model.loss))
            model.optimizer.step()
            means.add(loss, logits, yb)
            params["progress"] = {"epoch": epoch, "step": step + 1, **means.state()}
            logs = means.logs()
            calls.on_train_batch_end(step, logs)
            bar.update(1)
            now = time.perf_counter()
            if not bar.disable and now >= redraw_at:
                img_s = (means.seen - seen_before) / max(now - started, 1e-9)
                bar.set_postfix({**{k: f"{v:.4f}" for k, v in logs.items()},
                                 "img_s": f"{img_s:.0f}"})
                redraw_at = now + REFRESH_SECONDS
            if model.stop_training:
                break
    finally:
        bar.close()
    return {**means.logs(), "seconds": time.perf_counter() - started}


def evaluate(model, x, y, batch_size=32, return_dict=False, verbose=0):
    """The loss and metrics on x, y in inference mode -> [loss, *metrics] (the loss alone
    without metrics), or a dict {"loss": ..., "accuracy": ...} with return_dict=True.
    verbose: 0 silent, 1 a progress bar, 2 one line with the results (Keras's)."""
    _compiled(model, "evaluate")
    y = _labels(y, len(x), "evaluate")
    means = _Means(model.metrics)
    for lo in tqdm(range(0, len(x), batch_size), desc="evaluate", leave=False,
                   disable=None if verbose == 1 else True):
        logits = data_parallel.predict(model, _as_input(model, x[lo:lo + batch_size]))
        labels = y[lo:lo + batch_size]                  # (n,) on the host: the loss checks them
        loss, _ = model.loss(logits, labels)
        means.add(loss, logits, labels)
    values = dict(means.logs())                         # the one read of the sums
    if verbose == 2:
        tqdm.write("evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    if return_dict:
        return values
    return values["loss"] if not model.metrics else list(values.values())


def predict(model, x, batch_size=32):
    """The model's outputs for x in inference mode, as a NumPy array (N, ...). A single image
    without its batch axis, (C, H, W) for a model that takes (N, C, H, W), is taken as a batch
    of one: the result is then (1, ...)."""
    x = _one_image_as_batch(model, x)
    outputs = [to_numpy(data_parallel.predict(model, _as_input(model, x[lo:lo + batch_size])))
               for lo in range(0, len(x), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0,))


def _one_image_as_batch(model, x):
    """x[None] when x is one example of what the model's first layer takes in batches."""
    first = next((layer for layer in walk(model) if not layer.is_container), None)
    wants = {Conv2D: 4, Dense: 2}.get(type(first))
    if wants is not None and getattr(x, "ndim", wants) == wants - 1:
        return x[None]
    return x
