"""Callbacks for model.fit, with Keras's names, hooks and rules (keras.callbacks).

A callback is told what happens as fit runs:

    on_train_begin(logs)            on_train_end(logs)
    on_epoch_begin(epoch, logs)     on_epoch_end(epoch, logs)    epoch counts from 0
    on_train_batch_begin(batch, logs)   on_train_batch_end(batch, logs)

logs is a dict: after a batch, the epoch's running "loss" and metrics ("accuracy", ...); after an
epoch, those and "val_loss", "val_accuracy", ... and "lr". A batch's logs stay on the model's
device until a callback looks one up (minicnn.nn.fitting.DeviceNumbers: on a GPU each read waits
for it, so a callback that needs no numbers costs none). A callback reaches the model through
self.model (its optimizer through self.model.optimizer), and stops training by setting
self.model.stop_training = True (fit checks it after every batch).

    EarlyStopping          stop when a monitored value stops improving; restore the best weights
    ReduceLROnPlateau      divide the learning rate when it stops improving
    ModelCheckpoint        save the model (atomically) every epoch, or its best
    LearningRateScheduler  set the learning rate from a function of the epoch
    CSVLogger              the epochs' logs as a CSV file, rewritten atomically each epoch
    TerminateOnNaN         stop at the first batch whose loss is not finite
    BackpropTrace          every layer's activations, gradients and updates every N steps,
                           and the rules of thumb they break (minicnn.trace)
    History                fit's return value: .history[key] is a list over epochs
"""
import csv
import io
import math
from pathlib import Path

from minicnn.nn.serialization import atomic_write
from minicnn.trace import Trace


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    def __init__(self):
        self.model = None
        self.params = {}

    def set_model(self, model):
        self.model = model

    def set_params(self, params):
        self.params = params

    def on_train_begin(self, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_batch_begin(self, batch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        pass


class CallbackList:
    """Several callbacks told in order, as one."""

    def __init__(self, callbacks, model, params):
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks must be minicnn.callbacks.Callback objects, got "
                                f"{type(callback).__name__}.")
            callback.set_model(model)
            callback.set_params(params)

    def __getattr__(self, hook):                       # on_epoch_end(...) etc. on each one
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def call(*args):
            for callback in self.callbacks:
                getattr(callback, hook)(*args)
        return call


class History(Callback):
    """Records every epoch's logs: history.history["val_accuracy"][e] is epoch e's."""

    def __init__(self):
        super().__init__()
        self.history, self.epoch = {}, []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)


def _monitor_mode(monitor, mode):
    """"min" or "max": mode, or for "auto" "max" for accuracies, "min" for the rest (Keras)."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}.")
    if mode == "auto":
        return "max" if "acc" in monitor or monitor.endswith("top5") else "min"
    return mode


def _monitored(logs, monitor, who):
    value = (logs or {}).get(monitor)
    if value is None:
        raise ValueError(f"{who} monitors {monitor!r}, which the logs do not have (they have "
                         f"{', '.join(sorted(logs or {})) or 'nothing'}); give validation "
                         f"data for val_ values, or another monitor.")
    return float(value)


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than min_delta for `patience` epochs.

    restore_best_weights=True: when it stops, the model gets back the parameters of its best
    epoch. baseline: a value the monitor must beat for the patience to reset.
    """

    def __init__(self, monitor="val_loss", min_delta=0.0, patience=0, verbose=0, mode="auto",
                 baseline=None, restore_best_weights=False, start_from_epoch=0):
        super().__init__()
        self.monitor, self.patience, self.verbose = monitor, patience, verbose
        self.min_delta, self.baseline = abs(min_delta), baseline
        self.mode = _monitor_mode(monitor, mode)
        self.restore_best_weights, self.start_from_epoch = restore_best_weights, start_from_epoch

    def _better(self, value, reference):
        if reference is None:
            return True
        if self.mode == "max":
            return value - self.min_delta > reference
        return value + self.min_delta < reference

    def on_train_begin(self, logs=None):
        self.wait, self.stopped_epoch, self.best, self.best_epoch = 0, 0, None, None
        self.best_weights = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.start_from_epoch:
            return
        current = _monitored(logs, self.monitor, "EarlyStopping")
        self.wait += 1
        if self._better(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = {k: v.copy() for k, v in self.model.params.items()}
            if self.baseline is None or self._better(current, self.baseline):
                self.wait = 0
                return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.restore_best_weights and self.best_weights is not None:
                for name, value in self.model.params.items():
                    value[...] = self.best_weights[name]
            if self.verbose:
                print(f"Epoch {epoch + 1}: early stopping (best {self.monitor} "
                      f"{self.best:.4f} at epoch {self.best_epoch + 1}).")


class ReduceLROnPlateau(Callback):
    """lr = max(lr * factor, min_lr) once `monitor` has not improved by min_delta for
    `patience` epochs; then wait `cooldown` epochs before counting again."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto",
                 min_delta=1e-4, cooldown=0, min_lr=0.0):
        super().__init__()
        if not 0 <= factor < 1:
            raise ValueError(f"ReduceLROnPlateau's factor must be in [0, 1), got {factor}.")
        self.monitor, self.factor, self.patience, self.verbose = monitor, factor, patience, verbose
        self.mode = _monitor_mode(monitor, mode)
        self.min_delta, self.cooldown, self.min_lr = min_delta, cooldown, min_lr

    def on_train_begin(self, logs=None):
        self.wait, self.cooldown_counter, self.best = 0, 0, None

    def _better(self, value):
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def on_epoch_end(self, epoch, logs=None):
        current = _monitored(logs, self.monitor, "ReduceLROnPlateau")
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._better(current):
            self.best, self.wait = current, 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            optimizer = self.model.optimizer
            if self.wait >= self.patience and optimizer.lr > self.min_lr:
                optimizer.lr = max(optimizer.lr * self.factor, self.min_lr)
                self.cooldown_counter, self.wait = self.cooldown, 0
                if self.verbose:
                    print(f"Epoch {epoch + 1}: ReduceLROnPlateau set the learning rate to "
                          f"{optimizer.lr:.3g}.")


class ModelCheckpoint(Callback):
    """Save the model to filepath at the end of every epoch (model.save: one file, written
    atomically, so an interrupted save keeps the old one), or with save_best_only=True only
    when `monitor` improved. filepath may hold {epoch} and the logs' keys, Keras's way:
    "ckpt-{epoch:02d}-{val_loss:.2f}.npz"."""

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False,
                 mode="auto"):
        super().__init__()
        self.filepath, self.monitor, self.verbose = str(filepath), monitor, verbose
        self.save_best_only, self.mode = save_best_only, _monitor_mode(monitor, mode)

    def on_train_begin(self, logs=None):
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.save_best_only:
            current = _monitored(logs, self.monitor, "ModelCheckpoint")
            worse = self.best is not None and (current <= self.best if self.mode == "max"
                                               else current >= self.best)
            if worse:
                return
            self.best = current
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"ModelCheckpoint's filepath {self.filepath!r} names what the logs "
                             f"do not have ({e}); they have {', '.join(sorted(logs))}.") from None
        self.model.save(path)
        if self.verbose:
            print(f"Epoch {epoch + 1}: saved the model to {path}.")


class LearningRateScheduler(Callback):
    """At the start of each epoch, lr = schedule(epoch, lr) (epoch from 0), or schedule(epoch)
    for a function of one argument."""

    def __init__(self, schedule, verbose=0):
        super().__init__()
        self.schedule, self.verbose = schedule, verbose

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = self.model.optimizer
        try:
            lr = self.schedule(epoch, optimizer.lr)
        except TypeError:                       # a schedule of the epoch alone
            lr = self.schedule(epoch)
        lr = float(lr)
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"LearningRateScheduler's schedule gave {lr} for epoch {epoch}; "
                             f"a learning rate is a number >= 0.")
        optimizer.lr = lr
        if self.verbose:
            print(f"Epoch {epoch + 1}: LearningRateScheduler set the learning rate to {lr:.3g}.")


class CSVLogger(Callback):
    """Write each epoch's logs as a row of a CSV file ("epoch" first, then the keys in sorted
    order, as Keras). The whole file is rewritten atomically each epoch; append=True keeps the
    rows a file already has (a resumed run)."""

    def __init__(self, filename, separator=",", append=False):
        super().__init__()
        self.filename, self.separator, self.append = Path(filename), separator, append

    def on_train_begin(self, logs=None):
        self.rows = []
        if self.append and self.filename.exists():
            with open(self.filename, newline="") as f:
                self.rows = list(csv.DictReader(f, delimiter=self.separator))

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch, **(logs or {})})
        keys = ["epoch"] + sorted({k for row in self.rows for k in row} - {"epoch"})
        text = io.StringIO()
        writer = csv.DictWriter(text, keys, delimiter=self.separator, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.filename, lambda f: f.write(text.getvalue().encode()))


class TerminateOnNaN(Callback):
    """Stop training at the first batch whose loss is nan or infinite."""

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            print(f"Batch {batch}: invalid loss {loss}, terminating training.")
            self.model.stop_training = True


class BackpropTrace(Trace, Callback):
    """BackpropTrace(every=50, log_dir=None, gradcheck=False): every `every` steps, each
    layer's output shape, cache bytes, activation mean and std, dead ReLU units, the norms of
    the gradient arriving and of its weight gradient, and each parameter's update ratio; a
    table and the broken rules of thumb at each epoch end; trace.jsonl and trace.png in
    log_dir. minicnn.trace says how and why."""
