"""minicnn.parallel: the ops split over workers give what one thread gives, and the Sequential
schedule (ReLU after MaxPool) changes no output and no gradient."""
import contextlib
import threading
import warnings
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn
from minicnn.parallel import workers
from minicnn.nn import (BatchNorm1D, BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU,
                            Residual)
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.ops import pool as pool_ops
from minicnn.nn.zoo import keras_tutorial
from strategies import conv_problems, pool_problems


@contextlib.contextmanager
def thread_workers(k):
    """k workers and every size split (no small-work shortcut) inside; restored after."""
    before, min_size = workers.threads(), workers.MIN_PARALLEL_SIZE
    workers.MIN_PARALLEL_SIZE = 0
    workers.set_threads(k)
    try:
        yield
    finally:
        workers.MIN_PARALLEL_SIZE = min_size
        workers.set_threads(before)


def _forward_backward(layer, x, dy_seed):
    y = layer.forward(x, training=True)
    dy = np.random.default_rng(dy_seed).standard_normal(y.shape)
    dx = layer.backward(dy)
    inference = layer.forward(x)                     # BatchNorm: the running-statistics path
    grads = [g.copy() for g in layer.grads.values()]
    return [np.array(y), np.array(dx), np.array(inference)] + grads


def _same_with_workers(make_layer, x, rtol=1e-12):
    results = []
    for k in (1, 3):                     # 3 workers: uneven ranges, one run by the caller
        with thread_workers(k):
            results.append(_forward_backward(make_layer(), x, 1))
    for one, split in zip(*results):
        np.testing.assert_allclose(split, one, rtol=rtol, atol=1e-12)


@given(conv_problems(), st.integers(0, 2**32 - 1))
def test_split_conv_equals_one_thread(problem, seed):
    n, c, h, w, f, kernel, stride, padding = problem
    x = np.random.default_rng(seed).standard_normal((n + 4, c, h, w))
    _same_with_workers(lambda: Conv2D(c, f, kernel, stride, padding, dtype=np.float64,
                                      rng=np.random.default_rng(seed)), x)


@given(pool_problems(), st.integers(0, 2**32 - 1))
def test_split_pool_and_relu_equal_one_thread(problem, seed):
    n, c, h, w, kernel, stride = problem
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (n + 4, c, h + 1, w + 1)).astype(np.float64)   # many ties
    _same_with_workers(lambda: MaxPool2D(kernel, stride), x)
    _same_with_workers(lambda: MaxPool2D(2), x)                  # the 2x2 fast path
    _same_with_workers(ReLU, x)
    # ... and the 2x2 fast path a block of one image at a time inside each worker
    whole = _forward_backward(MaxPool2D(2), x, 1)
    with mock.patch.object(pool_ops, "POOL_BLOCK_BYTES", 1), thread_workers(3):
        for blocked, expected in zip(_forward_backward(MaxPool2D(2), x, 1), whole):
            np.testing.assert_array_equal(blocked, expected)


@given(st.integers(2, 9), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_split_batchnorm_equals_one_thread(n, c, seed):
    rng = np.random.default_rng(seed)
    x4 = rng.standard_normal((n, c, 3, 2)) * 3 + 1
    _same_with_workers(lambda: BatchNorm2D(c, dtype=np.float64), x4, rtol=1e-10)
    _same_with_workers(lambda: BatchNorm1D(c, dtype=np.float64), x4[:, :, 0, 0], rtol=1e-10)


@thread_workers(2)
def test_split_channels_last_memory_stays_channels_last():
    x = np.random.default_rng(0).standard_normal((6, 8, 4, 4)).astype(np.float32)
    y = Conv2D(8, 8, 3, padding=1).forward(x)
    for layer in (ReLU(), MaxPool2D(2), BatchNorm2D(8)):
        y = layer.forward(y, training=True)
        assert y.transpose(0, 2, 3, 1).flags.c_contiguous, type(layer).__name__


def test_whole_training_step_equals_one_thread():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 10)
    grads = []
    for k in (1, 2):
        with thread_workers(k):
            model = keras_tutorial(rng=np.random.default_rng(1))
            _, dlogits = SoftmaxCrossEntropy()(model.forward(x, training=True), labels)
            model.backward(dlogits, input_grad=False)
            grads.append(model.grads)
    for name, g in grads[0].items():
        np.testing.assert_allclose(grads[1][name], g, rtol=2e-4, atol=1e-6, err_msg=name)


def test_small_work_and_nested_calls_stay_in_the_calling_thread():
    before = workers.threads()
    workers.set_threads(2)
    try:
        seen = []

        def record(lo, hi):
            seen.append(threading.current_thread().name)
            return workers.map(lambda a, b: threading.current_thread().name, 4)   # nested

        workers.map(record, 10, size=workers.MIN_PARALLEL_SIZE - 1)
        assert seen == [threading.current_thread().name]
        seen.clear()
        nested = workers.map(record, 10)
        assert len(seen) == 2 and len(set(seen)) == 2          # two threads, one each
        assert all(len(inner) == 1 for inner in nested)         # a nested map does not split
    finally:
        workers.set_threads(before)


def test_split_ranges_cover_everything_once():
    for n in range(0, 12):
        for parts in range(1, 5):
            ranges = workers.split(n, parts)
            assert [i for lo, hi in ranges for i in range(lo, hi)] == list(range(n))
            sizes = [hi - lo for lo, hi in ranges]
            assert not sizes or max(sizes) - min(sizes) <= 1


def test_set_threads_rejects_nonsense_and_gives_blas_its_threads_back():
    with pytest.raises(ValueError, match="positive int"):
        workers.set_threads(0)
    if workers._blas is None:
        pytest.skip("no OpenBLAS found in numpy.libs to query")
    before = workers.threads()
    workers.set_threads(1)                                  # BLAS back to its own count
    original = workers._blas[0]()
    try:
        workers.set_threads(2)
        workers.map(lambda lo, hi: None, 4)
        assert workers._blas[0]() == 1                      # workers on, BLAS on one thread
        workers.set_threads(1)
        assert workers._blas[0]() == original
    finally:
        workers.set_threads(before)


def test_threads_from_the_environment(monkeypatch):
    monkeypatch.setenv("MINICNN_THREADS", "3")
    assert workers._default_threads() == 3
    for bad in ("0", "two", "-1", ""):
        monkeypatch.setenv("MINICNN_THREADS", bad)
        assert workers._default_threads() >= 1


# ---- Sequential runs ReLU after a MaxPool2D that follows it ----------------------------------
def test_relu_maxpool_schedule_changes_no_output_and_no_gradient():
    rng = np.random.default_rng(0)
    layers = [Conv2D(2, 3, 3, padding=1, dtype=np.float64, rng=rng), ReLU(), MaxPool2D(2),
              Residual([ReLU(), MaxPool2D(2, 1)], shortcut=[MaxPool2D(2, 1)]),
              Flatten(), Dense(3 * 2 * 2, 4, dtype=np.float64, rng=rng)]
    model = minicnn.Sequential(layers)
    assert model.schedule() == [0, 2, 1, 3, 4, 5]
    assert model[3].body.schedule() == [1, 0]
    # rounded inputs: plenty of exact ties and zeros in the pooling windows
    x = np.round(rng.standard_normal((3, 2, 7, 7)) * 2) / 2
    dy = rng.standard_normal((3, 4))
    y = model.forward(x, training=True)
    dx = model.backward(dy)
    got = [y, dx] + [g.copy() for g in model.grads.values()]

    # the same layers by hand, in their listed order
    conv, relu, pool, block, flatten, dense = layers
    (body_relu, body_pool), shortcut = block.body, block.shortcut
    h = pool.forward(relu.forward(conv.forward(x, True), True), True)
    h = body_pool.forward(body_relu.forward(h, True), True) + shortcut.forward(h, True)
    y_listed = dense.forward(flatten.forward(h, True), True)
    d = flatten.backward(dense.backward(dy))
    d = body_relu.backward(body_pool.backward(d)) + shortcut.backward(d)
    dx_listed = conv.backward(relu.backward(pool.backward(d)))
    want = [y_listed, dx_listed] + [g.copy() for g in model.grads.values()]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_workers_follow_the_callers_floating_point_error_settings():
    """np.errstate is per thread: an overflow in a worker obeys the caller's settings."""
    x = np.ones(1 << 16, dtype=np.float32)
    x[len(x) // 2:] = 3e38                       # only the second range (a worker's) overflows
    out = np.empty_like(x)

    def work(lo, hi):
        np.multiply(x[lo:hi], 10, out=out[lo:hi])
    with thread_workers(2):
        with np.errstate(over="raise"):
            with pytest.raises(FloatingPointError):
                workers.map(work, len(x))
        with np.errstate(over="ignore"), warnings.catch_warnings():
            warnings.simplefilter("error")       # a RuntimeWarning would fail the worker
            workers.map(work, len(x))
    assert np.isinf(out[len(x) // 2:]).all()
