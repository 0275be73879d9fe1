"""On a GPU every number read back to the host waits for all the work queued before it. A
training step must not read any: fit keeps the running loss and metrics on the device and reads
them once per progress-bar redraw, once per epoch, and when a callback looks at its logs. Counted
on fake_cupy, which counts every device-to-host copy (tests/fake_cupy.py: reads_back)."""
import contextlib
import io
import math

import fake_cupy
import numpy as np
import pytest

import minicnn
from minicnn import backend, callbacks
from minicnn.backend import to_numpy
from minicnn.datasets import loading
from minicnn.nn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, fitting
from minicnn.training import trainer as train
from test_train import _train_args as train_args

STEPS, EPOCHS = 6, 2                     # 48 images in batches of 8


@pytest.fixture
def fake(monkeypatch):
    """fake_cupy as minicnn's CuPy, its library checks already run (they read numbers back)."""
    monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    backend.get_backend("cupy")
    return fake_cupy.module


@contextlib.contextmanager
def counted():
    """{"reads": device-to-host copies made inside the block}."""
    count, before = {}, fake_cupy.reads_back
    yield count
    count["reads"] = fake_cupy.reads_back - before


@contextlib.contextmanager
def bar_on_a_terminal(monkeypatch):
    """fit's progress bar shown (tqdm draws only on a terminal); -> what it wrote."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    yield screen


def _model(device, metrics=("accuracy",)):
    rng = np.random.default_rng(0)
    model = minicnn.Sequential([Conv2D(3, 4, 3, rng=rng), ReLU(), MaxPool2D(2), Flatten(),
                                Dense(4 * 3 * 3, 3, rng=rng)]).to(device)
    model.compile("adam", metrics=list(metrics))
    return model


def _data(n=STEPS * 8):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, n)
    x = rng.uniform(0, 0.5, (n, 3, 8, 8))
    x[np.arange(n), y] += 0.5
    return x.astype(np.float32), y


@pytest.mark.parametrize("metrics", [[], ["accuracy"], ["accuracy", "top5"]])
def test_silent_fit_reads_the_device_once_an_epoch(fake, metrics):
    model = _model("cupy", metrics)
    with counted() as silent:
        history = model.fit(*_data(), batch_size=8, epochs=EPOCHS, verbose=0)
    assert silent["reads"] == EPOCHS                        # the epoch's logs, all in one copy
    assert len(history.history["loss"]) == EPOCHS
    x, y = _data(16)
    with counted() as validated:
        model.fit(*_data(), batch_size=8, epochs=EPOCHS, verbose=0, validation_data=(x, y),
                  validation_batch_size=4)
    assert validated["reads"] == 2 * EPOCHS                 # and evaluate's, for 4 batches


@pytest.mark.parametrize("redraw_every, reads", [(0.0, EPOCHS * (STEPS + 1)),
                                                 (1e9, EPOCHS * 2)])
def test_the_bar_reads_the_device_once_a_redraw(fake, monkeypatch, redraw_every, reads):
    """Redrawn after every step: one read a step (not one for the loss, one for the accuracy
    and one for the labels' check); never redrawn after the first: no read in the steps."""
    monkeypatch.setattr(fitting, "REFRESH_SECONDS", redraw_every)
    with bar_on_a_terminal(monkeypatch) as screen, counted() as count:
        _model("cupy").fit(*_data(), batch_size=8, epochs=EPOCHS, verbose=1)
    assert count["reads"] == reads
    assert "accuracy=" in screen.getvalue() and "loss=" in screen.getvalue()


def test_callbacks_that_read_the_logs_share_one_read_a_step(fake, monkeypatch):
    """TerminateOnNaN reads every batch's loss, and the bar redraws after every step: still
    one read a step; params["progress"]["sums"] are read only when looked at."""
    monkeypatch.setattr(fitting, "REFRESH_SECONDS", 0.0)

    class Sums(callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_end(self, batch, logs=None):
            progress = self.params["progress"]
            assert "loss" in logs and "accuracy" in progress["sums"]    # keys: no read
            if batch == 1:
                self.seen.append((progress["seen"], dict(progress["sums"]), dict(logs)))

    sums = Sums()
    with bar_on_a_terminal(monkeypatch), counted() as count:
        _model("cupy").fit(*_data(), batch_size=8, epochs=EPOCHS, verbose=1,
                           callbacks=[callbacks.TerminateOnNaN(), sums])
    assert count["reads"] == EPOCHS * (STEPS + 1) + EPOCHS          # + the sums, once an epoch
    seen, progress_sums, logs = sums.seen[0]
    assert seen == 16 and logs["loss"] == pytest.approx(progress_sums["loss"] / 16)
    assert logs["accuracy"] * 16 == pytest.approx(progress_sums["accuracy"])


def test_logs_kept_for_later_hold_their_own_batch(fake):
    """A batch's logs are a snapshot: read after later steps, they still say that batch's."""
    kept = []

    class Keep(callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            kept.append(logs)

    model = _model("cupy")
    history = model.fit(*_data(), batch_size=8, epochs=1, verbose=0, callbacks=[Keep()])
    assert len(kept) == STEPS and kept[-1]["loss"] == pytest.approx(history.history["loss"][0])
    first = kept[0]["loss"]
    assert math.isfinite(first) and first != pytest.approx(kept[-1]["loss"], rel=1e-9)


def test_the_device_keeps_the_cpu_numbers(fake):
    """The means accumulated on the device are the ones the CPU accumulates on the host."""
    x, y = _data()
    on_cpu = _model("numpy", ["accuracy", "top5"]).fit(x, y, batch_size=8, epochs=EPOCHS,
                                                       verbose=0, shuffle=False)
    on_gpu = _model("cupy", ["accuracy", "top5"]).fit(x, y, batch_size=8, epochs=EPOCHS,
                                                      verbose=0, shuffle=False)
    for key in ("loss", "accuracy", "top5"):
        np.testing.assert_allclose(on_gpu.history[key], on_cpu.history[key], rtol=1e-5)
    assert all(type(v) is float for v in on_gpu.history["loss"] + on_gpu.history["accuracy"])


def test_the_crop_reads_nothing_back(fake):
    x = fake.asarray(np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    with counted() as count:
        out = loading.augment(x, np.random.default_rng(0), crop_padding=2, flip=True,
                              cutout_size=3)
    assert count["reads"] == 0 and out.shape == x.shape
    host = loading.augment(to_numpy(x), np.random.default_rng(0), crop_padding=2, flip=True,
                           cutout_size=3)
    np.testing.assert_array_equal(to_numpy(out), host)


# ---- the training tool ---------------------------------------------------------------------------
def _train_args(folder, out, *extra):      # 54 training images in batches of 16: 4 steps
    return train_args(folder, out, "--backend", "cupy", *extra)


def _reads_per_epoch(monkeypatch):
    """[(device reads, steps)] of each epoch fit trains, batches and augmentation included."""
    epochs, train_epoch = [], fitting._train_epoch

    def counting(model, epoch, batches, start, means, calls, params, verbose):
        with counted() as count:
            logs = train_epoch(model, epoch, batches, start, means, calls, params, verbose)
        epochs.append((count["reads"], params["steps"] - start))
        return logs
    monkeypatch.setattr(fitting, "_train_epoch", counting)
    return epochs


@pytest.mark.parametrize("check_every, reads", [(0.0, [4 + 1, 4 + 1]), (1e9, [1 + 1, 1])])
def test_the_training_tool_reads_the_loss_at_the_bars_pace(fake, folder, tmp_path, monkeypatch,
                                                           check_every, reads):
    """python -m minicnn.train checks the loss for a divergence at the bar's pace (and before
    each checkpoint): checked every step, one read a step; checked after the run's first step
    only, one. The epoch's end adds one; augmentation (crop, flip, cutout) none."""
    monkeypatch.setattr(fitting, "REFRESH_SECONDS", check_every)
    epochs = _reads_per_epoch(monkeypatch)
    assert train.main(_train_args(folder, tmp_path / "run", "--augment",
                                  "crop+flip+cutout")) == 0
    assert epochs == [(r, 4) for r in reads]


def test_the_training_tool_still_stops_a_diverged_run(fake, folder, tmp_path, monkeypatch,
                                                     capsys):
    """A nan loss is caught at the next check, or at the latest at the epoch's end, before its
    checkpoint is written."""
    monkeypatch.setattr(fitting, "REFRESH_SECONDS", 1e9)       # checked after step 1 only
    args = _train_args(folder, tmp_path / "run", "--optimizer", "sgd", "--lr", "1e12")
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "The loss became" in err and "at epoch 1, step 4;" in err
    assert "before any checkpoint was written" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "last.npz").exists()


def test_the_training_tool_checks_the_loss_before_each_checkpoint(fake, folder, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setattr(fitting, "REFRESH_SECONDS", 1e9)
    args = _train_args(folder, tmp_path / "run", "--optimizer", "sgd", "--lr", "1e4",
                       "--checkpoint-every", "1")
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "The loss became" in err and "The last checkpoint" in err
    model = minicnn.load(tmp_path / "run" / "last.npz")
    assert all(np.isfinite(p).all() for p in model.params.values())
