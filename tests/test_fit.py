"""The Keras workflow on any model: compile, fit (arrays, validation, callbacks, generators),
evaluate, predict; and each callback's rule, with a test that fails when the rule is broken."""
import csv
import math

import numpy as np
import pytest

import minicnn
from minicnn import callbacks
from minicnn.nn import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from minicnn.nn.optim import SGD, Adam


def _net(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return minicnn.Sequential([Conv2D(3, 4, 3, dtype=dtype, rng=rng), ReLU(), MaxPool2D(2),
                               Flatten(), Dense(4 * 3 * 3, 3, dtype=dtype, rng=rng)])


def _data(n=48, seed=1):
    """Images whose class is the brightest of their three channels: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.uniform(0, 0.5, (n, 3, 8, 8))
    x[np.arange(n), y] += 0.5
    return x.astype(np.float32), y


class Scripted(callbacks.Callback):
    """Feeds fit a scripted value of a monitored key at each epoch end (before the callbacks
    under test see the logs: it is listed first)."""

    def __init__(self, key, values):
        super().__init__()
        self.key, self.values = key, list(values)

    def on_epoch_end(self, epoch, logs=None):
        logs[self.key] = self.values[epoch]


class Recorder(callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.calls, self.lrs, self.params_seen = [], [], []

    def on_train_begin(self, logs=None):
        self.calls.append("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(f"epoch_begin {epoch}")

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(f"batch_end {batch}")
        assert "loss" in logs

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(f"epoch_end {epoch}")
        self.lrs.append(self.model.optimizer.lr)
        self.params_seen.append(self.model.params["0.weight"].copy())

    def on_train_end(self, logs=None):
        self.calls.append("train_end")


# ---- compile, fit, evaluate, predict ----------------------------------------------------------
def test_fit_learns_and_returns_kerass_history():
    model = _net()
    x, y = _data(96)
    model.compile(optimizer=Adam(lr=0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy", "top5"])
    history = model.fit(x, y, batch_size=16, epochs=6, validation_split=0.25, verbose=0, seed=0)
    assert set(history.history) == {"loss", "accuracy", "top5", "val_loss", "val_accuracy",
                                     "val_top5", "lr"}
    assert history.epoch == list(range(6))
    assert all(len(v) == 6 for v in history.history.values())
    assert history.history["loss"][-1] < 0.7 * history.history["loss"][0]
    assert history.history["val_accuracy"][-1] >= 0.8
    assert history.history["val_top5"][-1] == 1.0             # 3 classes: always in the top 5
    loss, acc, top5 = model.evaluate(x[72:], y[72:], batch_size=10)
    assert loss == pytest.approx(history.history["val_loss"][-1], rel=1e-5)
    assert acc == pytest.approx(history.history["val_accuracy"][-1])
    assert model.evaluate(x, y, return_dict=True).keys() == {"loss", "accuracy", "top5"}


def test_fit_steps_like_a_hand_written_loop():
    """One epoch, no shuffling: the same parameters as forward/backward/step by hand."""
    x, y = _data(32)
    by_fit, by_hand = _net(dtype=np.float64), _net(dtype=np.float64)
    by_fit.compile(SGD(lr=0.1, momentum=0.9), "sparse_categorical_crossentropy")
    by_fit.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    optimizer, loss_fn = SGD(by_hand, lr=0.1, momentum=0.9), minicnn.losses.SoftmaxCrossEntropy()
    for lo in range(0, 32, 8):
        _, d = loss_fn(by_hand.forward(x[lo:lo + 8].astype(np.float64), training=True),
                       y[lo:lo + 8])
        by_hand.backward(d)
        optimizer.step()
    for key, value in by_hand.params.items():
        np.testing.assert_allclose(by_fit.params[key], value, rtol=1e-10, err_msg=key)


def test_compile_takes_names_and_objects_and_refuses_unknown_ones():
    model = _net()
    model.compile("sgd")
    assert isinstance(model.optimizer, SGD) and model.optimizer.model is model
    model.compile(Adam(lr=0.5), metrics=["acc"])
    assert model.optimizer.lr == 0.5 and model.metrics == ["accuracy"]
    for kwargs, message in [(dict(optimizer="rmsprop"), "Unknown optimizer 'rmsprop'"),
                            (dict(loss="mse"), "Unknown loss 'mse'"),
                            (dict(metrics=["f1"]), "Unknown metric 'f1'")]:
        with pytest.raises(ValueError, match=message):
            model.compile(**kwargs)
    with pytest.raises(RuntimeError, match="compile"):
        _net().fit(*_data(8), verbose=0)


def test_predict_returns_numpy_outputs_and_takes_one_image_as_a_batch_of_one():
    model = _net()
    x, _ = _data(5)
    out = model.predict(x, batch_size=2)
    assert isinstance(out, np.ndarray) and out.shape == (5, 3)
    np.testing.assert_allclose(out, model.forward(x), rtol=1e-6)
    one = model.predict(x[0])                                  # (3, 8, 8), no batch axis
    assert one.shape == (1, 3)
    np.testing.assert_allclose(one[0], out[0], rtol=1e-6)


def test_fit_takes_an_iterator_with_a_length_and_uint8_images_and_column_labels():
    model = _net()
    x, y = _data(24)

    class Flow:
        def __len__(self):
            return 3

        def __iter__(self):
            while True:
                for lo in range(0, 24, 8):
                    yield (x[lo:lo + 8] * 255).astype(np.uint8), y[lo:lo + 8, None]
    model.compile("adam", metrics=["accuracy"])
    recorder = Recorder()
    model.fit(Flow(), epochs=2, callbacks=[recorder], verbose=0)
    assert recorder.calls.count("batch_end 2") == 2 and "batch_end 3" not in recorder.calls
    with pytest.raises(ValueError, match="len"):
        model.fit(iter([]), verbose=0)


def test_callback_hooks_come_in_kerass_order(capsys):
    model = _net()
    model.compile("sgd")
    recorder = Recorder()
    model.fit(*_data(16), batch_size=8, epochs=2, callbacks=[recorder], verbose=2)
    assert recorder.calls == ["train_begin", "epoch_begin 0", "batch_end 0", "batch_end 1",
                              "epoch_end 0", "epoch_begin 1", "batch_end 0", "batch_end 1",
                              "epoch_end 1", "train_end"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                                  "lr", "seconds"]
    assert [line.split()[0] for line in printed[1:]] == ["1", "2"]
    model.fit(*_data(16), batch_size=8, epochs=1, verbose=0)
    assert capsys.readouterr().out == ""


# ---- the callbacks, each rule --------------------------------------------------------------------
def test_early_stopping_stops_at_the_right_epoch_and_restores_the_best_weights():
    model = _net()
    model.compile(SGD(lr=0.05))
    recorder, stop = Recorder(), callbacks.EarlyStopping("val_loss", patience=2,
                                                        restore_best_weights=True)
    scripted = Scripted("val_loss", [1.0, 0.5, 0.6, 0.55, 0.4, 0.3])   # best: epoch 1
    history = model.fit(*_data(16), batch_size=8, epochs=6, verbose=0,
                        callbacks=[scripted, recorder, stop])
    assert history.epoch == [0, 1, 2, 3] and stop.stopped_epoch == 3   # 2 epochs without gain
    np.testing.assert_array_equal(model.params["0.weight"], recorder.params_seen[1])
    assert not np.array_equal(recorder.params_seen[3], recorder.params_seen[1])


def test_early_stopping_min_delta_mode_and_baseline():
    model = _net()
    model.compile("sgd")
    stop = callbacks.EarlyStopping("val_accuracy", min_delta=0.05, patience=1)
    scripted = Scripted("val_accuracy", [0.5, 0.53, 0.9, 0.9])      # +0.03 is no gain
    history = model.fit(*_data(8), epochs=4, verbose=0, callbacks=[scripted, stop])
    assert history.epoch == [0, 1]
    stop = callbacks.EarlyStopping("val_loss", patience=2, baseline=0.5)
    scripted = Scripted("val_loss", [0.9, 0.8, 0.7, 0.6, 0.1])       # never beats 0.5
    assert model.fit(*_data(8), epochs=5, verbose=0, callbacks=[scripted, stop]).epoch == [0, 1]


def test_reduce_lr_on_plateau_divides_after_patience_with_cooldown_and_floor():
    model = _net()
    model.compile(SGD(lr=1.0))
    recorder = Recorder()
    plateau = callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=2, cooldown=1,
                                          min_lr=0.2)
    scripted = Scripted("val_loss", [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    model.fit(*_data(8), epochs=8, verbose=0, callbacks=[scripted, plateau, recorder])
    # Keras's rule: epochs 1-2 without gain -> 0.5 at epoch 2; the cooldown epoch 3 counts
    # from 0 again (wait 1), epoch 4 -> 0.25; epoch 6 -> max(0.125, min_lr 0.2)
    assert recorder.lrs == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2]


def test_model_checkpoint_saves_every_epoch_or_the_best_only(tmp_path):
    model = _net()
    model.compile("sgd")
    every = callbacks.ModelCheckpoint(tmp_path / "e{epoch:02d}-{val_loss:.1f}.npz")
    best = callbacks.ModelCheckpoint(tmp_path / "best.npz", monitor="val_loss",
                                     save_best_only=True)
    recorder = Recorder()
    scripted = Scripted("val_loss", [0.9, 0.5, 0.7])
    model.fit(*_data(8), epochs=3, verbose=0, callbacks=[scripted, every, best, recorder])
    assert sorted(p.name for p in tmp_path.glob("e*.npz")) == ["e01-0.9.npz", "e02-0.5.npz",
                                                              "e03-0.7.npz"]
    saved = minicnn.load(tmp_path / "best.npz")                      # the epoch-2 weights
    np.testing.assert_array_equal(saved.params["0.weight"], recorder.params_seen[1])
    assert not list(tmp_path.glob("*.tmp"))


def test_learning_rate_scheduler_sets_each_epochs_rate():
    model = _net()
    model.compile(SGD(lr=1.0))
    recorder = Recorder()
    model.fit(*_data(8), epochs=3, verbose=0, callbacks=[
        callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5 if epoch else lr), recorder])
    assert recorder.lrs == [1.0, 0.5, 0.25]
    history = model.fit(*_data(8), epochs=2, verbose=0, callbacks=[
        callbacks.LearningRateScheduler(lambda epoch: 0.1 * (epoch + 1))])
    assert history.history["lr"] == [0.1, pytest.approx(0.2)]


def test_csv_logger_writes_every_epoch_and_appends(tmp_path):
    model = _net()
    model.compile("sgd", metrics=["accuracy"])
    path = tmp_path / "log.csv"
    model.fit(*_data(8), epochs=2, verbose=0, callbacks=[callbacks.CSVLogger(path)])
    rows = list(csv.DictReader(open(path)))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert list(rows[0]) == ["epoch", "accuracy", "loss", "lr"]
    model.fit(*_data(8), epochs=3, initial_epoch=2, verbose=0,
              callbacks=[callbacks.CSVLogger(path, append=True)])
    assert [r["epoch"] for r in csv.DictReader(open(path))] == ["0", "1", "2"]


def test_terminate_on_nan_stops_at_the_first_bad_batch():
    model = _net()
    recorder = Recorder()

    def loss_that_turns_nan(logits, labels):              # the third batch's loss is nan
        batch = sum(c.startswith("batch_end") for c in recorder.calls)
        return (float("nan") if batch == 2 else 1.0), np.zeros_like(logits)
    model.compile("sgd", loss=loss_that_turns_nan)
    history = model.fit(*_data(32), batch_size=8, epochs=2, verbose=0,
                        callbacks=[callbacks.TerminateOnNaN(), recorder])
    batches = [c for c in recorder.calls if c.startswith("batch_end")]
    assert len(history.epoch) == 1 and batches == ["batch_end 0", "batch_end 1", "batch_end 2"]
    assert not math.isfinite(history.history["loss"][0])


def test_a_monitor_the_logs_lack_is_one_sentence():
    model = _net()
    model.compile("sgd")
    with pytest.raises(ValueError, match="monitors 'val_loss', which the logs do not have"):
        model.fit(*_data(8), epochs=1, verbose=0, callbacks=[callbacks.EarlyStopping()])
