"""Every layer, the loss and the optimisers on each backend, against NumPy with the same weights.

The xp fixture (conftest.py) runs each test on numpy and on cupy. On cupy a layer moved to the
GPU with .to("cupy") is compared with its CPU twin (float32, so within a tolerance); on numpy the
same test checks that .to("numpy") keeps every value and that the results are bit-identical.
Then the backend module itself: errors, seeding, timing.
"""
import copy
import re
import time

import numpy as np
import pytest

import minicnn
from minicnn import backend
from minicnn.nn import optim
from minicnn.backend import array_module, get_backend, to_device, to_numpy
from minicnn.errors import BackendError
from minicnn.nn import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                            MaxPool2D, ReLU, Residual, Softmax)
from minicnn.nn.losses import SoftmaxCrossEntropy


def assert_same(got, expected, xp):
    """Bit-identical on NumPy (the same code on the same data); float32-close on the GPU."""
    got = to_numpy(got)
    assert got.shape == np.shape(expected) and got.dtype == np.asarray(expected).dtype
    if xp is np:
        np.testing.assert_array_equal(got, expected)
    else:
        scale = max(1.0, float(np.abs(expected).max(initial=0)))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)


def assert_on(arrays, xp):
    for name, a in arrays.items():
        assert array_module(a) is xp, f"{name} lives on {array_module(a).__name__}, not {xp.__name__}"


LAYERS = {
    "conv 3x3": (lambda r: Conv2D(3, 4, 3, rng=r), (2, 3, 7, 7)),
    "conv stride 2 pad 1": (lambda r: Conv2D(3, 5, 3, stride=2, padding=1, rng=r), (2, 3, 9, 8)),
    "conv 2x3 stride (2,1) same": (lambda r: Conv2D(2, 3, (2, 3), stride=(2, 1), padding="same",
                                                    rng=r), (1, 2, 7, 6)),
    "conv 1x1 valid no bias": (lambda r: Conv2D(4, 2, 1, padding="valid", bias=False, rng=r),
                               (3, 4, 5, 5)),
    "maxpool 2": (lambda r: MaxPool2D(2), (2, 3, 8, 8)),
    "maxpool 3 stride 2": (lambda r: MaxPool2D(3, stride=2), (2, 3, 9, 7)),
    "maxpool 2 with ties": (lambda r: MaxPool2D(2), (2, 3, 8, 8)),       # inputs rounded below
    "maxpool 3 stride 2 with ties": (lambda r: MaxPool2D(3, stride=2), (2, 3, 9, 7)),
    "avgpool 2": (lambda r: AvgPool2D(2), (2, 3, 6, 6)),
    "dense": (lambda r: Dense(12, 5, rng=r), (4, 12)),
    "dense no bias": (lambda r: Dense(12, 5, bias=False, rng=r), (4, 12)),
    "batchnorm2d": (lambda r: BatchNorm2D(3), (4, 3, 5, 5)),
    "batchnorm1d": (lambda r: BatchNorm1D(6), (8, 6)),
    "dropout": (lambda r: Dropout(0.3, rng=r), (4, 3, 5, 5)),
    "relu": (lambda r: ReLU(), (4, 3, 5, 5)),
    "flatten": (lambda r: Flatten(), (4, 3, 5, 5)),
    "softmax": (lambda r: Softmax(), (4, 10)),
    "residual identity": (lambda r: Residual([Conv2D(3, 3, 3, padding=1, rng=r), BatchNorm2D(3),
                                              ReLU(), Conv2D(3, 3, 3, padding=1, rng=r)]),
                          (2, 3, 6, 6)),
    "residual projection": (lambda r: Residual([Conv2D(3, 6, 3, stride=2, padding=1, rng=r)],
                                               shortcut=Conv2D(3, 6, 1, stride=2, rng=r)),
                            (2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_layer_forward_and_backward_match_numpy(xp, name):
    make, shape = LAYERS[name]
    reference = make(np.random.default_rng(0))
    layer = copy.deepcopy(reference).to(xp.__name__)          # same weights, same dropout rng
    assert_on(layer.params, xp)
    assert_on(layer.state, xp)
    for key, p in reference.params.items():
        assert_same(layer.params[key], p, np)                 # moving copies values exactly

    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    if name.endswith("with ties"):      # whole numbers: many windows with two equal maxima
        x = np.round(x)
    y = reference.forward(x, training=True)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = reference.backward(dy)

    got_y = layer.forward(xp.asarray(x), training=True)
    got_dx = layer.backward(xp.asarray(dy))
    assert array_module(got_y, got_dx) is xp
    assert_same(got_y, y, xp)
    assert_same(got_dx, dx, xp)
    for key in reference.grads:
        assert_same(layer.grads[key], reference.grads[key], xp)
    for key in reference.state:                               # BatchNorm's running statistics
        assert_same(layer.state[key], reference.state[key], xp)
    assert_same(layer.forward(xp.asarray(x)), reference.forward(x), xp)   # inference mode


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_matches_numpy(xp, smoothing):
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((6, 10)) * 5).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    loss, dlogits = SoftmaxCrossEntropy(smoothing)(logits, labels)
    got_loss, got_dlogits = SoftmaxCrossEntropy(smoothing)(xp.asarray(logits), xp.asarray(labels))
    assert got_loss.shape == () and array_module(got_loss) is xp        # read when needed
    if xp is np:
        assert got_loss == loss
    else:
        assert float(got_loss) == pytest.approx(float(loss), rel=1e-5)
    assert_same(got_dlogits, dlogits, xp)


OPTIMISERS = {
    "sgd nesterov wd": lambda m: optim.SGD(m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam l2": lambda m: optim.Adam(m, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda m: optim.AdamW(m, lr=1e-2),
}


@pytest.mark.parametrize("name", OPTIMISERS)
def test_optimiser_steps_match_numpy_and_keep_their_state_on_the_parameters_device(xp, name):
    rng = np.random.default_rng(3)
    # No conv bias before the BatchNorm: its true gradient is 0, so what the backends compute is
    # float32 rounding noise, which Adam's g / sqrt(v) scales up to full lr-sized steps of random
    # sign (the noise differs between BLAS libraries, and did between NumPy's and fake_cupy's
    # summation orders).
    reference = minicnn.Sequential([Conv2D(2, 3, 3, bias=False, rng=rng), BatchNorm2D(3), ReLU(),
                                    Flatten(), Dense(3 * 4 * 4, 5, rng=rng)])
    model = copy.deepcopy(reference).to(xp.__name__)
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    labels = rng.integers(0, 5, 4)
    loss_fn = SoftmaxCrossEntropy()
    states = []
    for net, xs, ys in ((reference, x, labels), (model, xp.asarray(x), xp.asarray(labels))):
        opt = OPTIMISERS[name](net)
        for _ in range(3):
            net.zero_grad()
            _, dlogits = loss_fn(net.forward(xs, training=True), ys)
            net.backward(dlogits)
            opt.step()
        states.append(opt.state)
    for key, p in reference.params.items():
        assert_same(model.params[key], p, xp)
    reference_state, state = states
    for key, buffers in reference_state.items():
        assert set(state[key]) == set(buffers) != set()
        for buffer, value in buffers.items():
            assert array_module(state[key][buffer]) is xp           # created on the device
            assert_same(state[key][buffer], value, xp)


def test_a_model_moves_there_and_back_unchanged(xp):
    rng = np.random.default_rng(4)
    model = minicnn.Sequential([Conv2D(3, 4, 3, rng=rng), BatchNorm2D(4), ReLU(), Flatten(),
                                Dense(4 * 3 * 3, 2, rng=rng)])
    original = {k: v.copy() for k, v in {**model.params, **model.state}.items()}
    model.to(xp.__name__)
    assert_on({**model.params, **model.grads, **model.state}, xp)
    model.to("numpy")
    assert_on({**model.params, **model.grads, **model.state}, np)
    for key, value in {**model.params, **model.state}.items():
        np.testing.assert_array_equal(value, original[key])
        assert value.dtype == np.float32
    assert all(not g.any() for g in model.grads.values())


def test_to_device_and_to_numpy_copy_values_between_backends(xp):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    on_device = to_device(a, xp.__name__)
    assert array_module(on_device) is xp and backend.backend_name(on_device) == xp.__name__
    back = to_numpy(on_device)
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, a)


# ---- the backend module itself ---------------------------------------------------------------
def test_asking_for_cupy_without_it_says_what_to_install():
    if backend.gpu_available():
        pytest.skip("CuPy and a GPU are available here: there is no error to check")
    with pytest.raises(BackendError) as info:
        Conv2D(1, 1, 1).to("cupy")
    message = str(info.value)
    assert message.startswith("The cupy backend needs ")
    # without CuPy: the pip command; with CuPy but no GPU: what CUDA said about the GPU
    assert 'pip install -e ".[gpu-cuda13]"' in message or "NVIDIA GPU" in message
    with pytest.raises(BackendError, match="Unknown backend 'tpu'; choose 'numpy' or 'cupy'"):
        get_backend("tpu")


def test_seed_all_returns_a_reproducible_generator_and_seeds_the_global_ones():
    a = backend.seed_all(7)
    legacy = np.random.random(3)
    b = backend.seed_all(7)
    assert isinstance(a, np.random.Generator)
    np.testing.assert_array_equal(a.random(5), b.random(5))
    np.testing.assert_array_equal(np.random.random(3), legacy)
    np.testing.assert_array_equal(backend.seed_all(7).random(5), np.random.default_rng(7).random(5))
    if backend.gpu_available():
        cupy = get_backend("cupy")
        backend.seed_all(7)
        first = cupy.random.random(4)
        backend.seed_all(7)
        np.testing.assert_array_equal(to_numpy(cupy.random.random(4)), to_numpy(first))


def test_timer_and_cuda_time_measure_milliseconds(xp):
    with backend.Timer(xp) as t:
        time.sleep(0.02)          # the GPU records its end event only after the host returns
    assert 15 <= t.ms < 2000
    calls = []
    median = backend.cuda_time(lambda: calls.append(time.sleep(0.002)), xp=xp, repeats=5, warmup=2)
    assert len(calls) == 7
    assert 1.5 <= median < 1000
    backend.synchronize(xp)       # a no-op on NumPy; waits for the device on CuPy
    with pytest.raises(ValueError, match="repeats"):
        backend.cuda_time(lambda: None, xp=xp, repeats=0)


class BrokenCuPy:
    """fake_cupy with some attributes replaced (a CuPy whose library or driver is broken)."""

    def __init__(self, **replaced):
        import types
        import fake_cupy
        cuda = types.SimpleNamespace(**vars(fake_cupy.module.cuda))     # a CuPy for CUDA 13.0
        cuda.runtime = types.SimpleNamespace(**vars(cuda.runtime), runtimeGetVersion=lambda: 13000)
        self._replaced = {"cuda": cuda, **replaced}
        self._base = fake_cupy.module

    def __getattr__(self, name):
        return self._replaced[name] if name in self._replaced else getattr(self._base, name)


def _fails(message):
    def fn(*args, **kwargs):
        raise RuntimeError(message)
    return fn


def _broken_library(library):
    """A fake CuPy whose elementwise kernels (NVRTC), matmul (cuBLAS) or random (cuRAND) fail."""
    import types
    import fake_cupy
    base = fake_cupy.module
    if library == "cuRAND":
        return BrokenCuPy(random=types.SimpleNamespace(
            random=_fails("libcurand.so.10: cannot open shared object file")))

    class Array:                          # arange's result: its arithmetic or @ fails
        def __init__(self, a):
            self.a = a

        def __mul__(self, k):
            if library == "NVRTC":
                _fails("libnvrtc.so.13: cannot open shared object file")()
            return self.a * k

        def __matmul__(self, other):
            _fails("libcublas.so.13: cannot open shared object file")()
    if library == "NVRTC":
        return BrokenCuPy(arange=lambda *a, **k: Array(base.arange(*a, **k)))
    return BrokenCuPy(ones=lambda *a, **k: Array(base.ones(*a, **k)))


@pytest.mark.parametrize("library, purpose, component", [
    ("NVRTC", "compile kernels", "nvrtc"), ("cuBLAS", "multiply matrices", "cublas"),
    ("cuRAND", "draw random numbers", "curand")])
def test_a_cupy_missing_a_cuda_library_fails_in_one_sentence_naming_it(monkeypatch, library,
                                                                        purpose, component):
    monkeypatch.setattr(backend, "_cupy", _broken_library(library))
    with pytest.raises(BackendError) as info:
        get_backend("cupy")
    message = str(info.value)
    assert message.startswith(f"CuPy cannot {purpose} ({library} failed: lib{component}")
    assert message.endswith(f'cupy-cuda13x (pip install "cuda-toolkit[{component}]==13.*") '
                            "or the CUDA toolkit.")
    assert message.count(". ") == 0 and "\n" not in message                # one sentence
    assert not backend.gpu_available() and backend.gpu_problem() == message


def test_the_gpu_check_runs_once_per_process_and_passes_on_a_working_cupy(monkeypatch):
    import fake_cupy
    calls = []
    cupy = BrokenCuPy(matmul=None)
    real_ones = fake_cupy.module.ones
    cupy._replaced["ones"] = lambda *a, **k: calls.append(1) or real_ones(*a, **k)
    monkeypatch.setattr(backend, "_cupy", cupy)
    assert get_backend("cupy") is cupy
    assert get_backend("cupy") is cupy and backend.gpu_available()
    assert calls == [1]


@pytest.mark.parametrize("error, expected", [
    ("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version",
     "The cupy backend needs an NVIDIA GPU driver for CUDA 13, and this one is older"),
    ("cudaErrorNoDevice: no CUDA-capable device is detected",
     "The cupy backend needs an NVIDIA GPU and its driver, but CUDA reports: cudaErrorNoDevice")])
def test_a_missing_or_old_driver_is_answered_in_one_sentence(monkeypatch, error, expected):
    import types
    import fake_cupy
    cuda = types.SimpleNamespace(**vars(fake_cupy.module.cuda))
    cuda.runtime = types.SimpleNamespace(getDeviceCount=_fails(error),
                                         runtimeGetVersion=lambda: 13000)
    monkeypatch.setattr(backend, "_cupy", BrokenCuPy(cuda=cuda))
    with pytest.raises(BackendError, match=re.escape(expected)) as info:
        get_backend("cupy")
    if "older" in expected:
        assert 'pip install -e ".[gpu-cuda12]" for CUDA 12' in str(info.value)
