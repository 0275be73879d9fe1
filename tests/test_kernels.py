"""The CUDA kernels (kernels/*.cu through minicnn.cuda.kernels) against their NumPy twins in minicnn.ops.

Every kernel test runs on two devices:
  "emulated"  the .cu files compiled as C++ against tests/cuda_emulator.h and run on the CPU
              (needs g++): the real kernel text, launch shapes and argument lists, checked on
              any machine;
  "cupy"      CuPy on a GPU (NVRTC, the real hardware); skipped without one.
Plus CPU-only checks: the .cu headers, the package finding its sources once installed as a wheel,
the implementation switch, and the benchmark's CPU path.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minicnn import ops
from minicnn.cuda import kernels
from minicnn.backend import get_backend, to_numpy
from minicnn.errors import BackendError
from strategies import pool_problems

import fake_cupy

ROOT = Path(__file__).resolve().parent.parent
HEADER_FIELDS = ("Computes:", "Layout:", "Launch:", "Must match:", "Time:")


# ---- the two devices -------------------------------------------------------------------------
class RealCUDA:
    name = "cupy"

    def __init__(self, cupy):
        self.asarray = cupy.asarray

    @contextmanager
    def active(self):
        yield


@pytest.fixture(scope="session", params=["emulated", "cupy"])
def device(request):
    if request.param == "emulated":
        return request.getfixturevalue("emulator")
    try:
        return RealCUDA(get_backend("cupy"))
    except BackendError as e:
        pytest.skip(f"CuPy or a GPU is not available: {e}")


# ---- problems --------------------------------------------------------------------------------
@st.composite
def conv_shapes(draw):
    """(x shape, w shape, stride, padding) with odd sizes, stride 2, padding 0-2 per side, and
    channel counts that cross the kernels' 64-wide tiles and 16-deep reduction steps.
    """
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = ((draw(st.integers(0, 2)), draw(st.integers(0, 2))),
               (draw(st.integers(0, 2)), draw(st.integers(0, 2))))
    h = draw(st.integers(max(1, kh - sum(padding[0])), 9))
    w = draw(st.integers(max(1, kw - sum(padding[1])), 9))
    n = draw(st.integers(1, 3))
    c = draw(st.sampled_from([1, 2, 3, 5, 66]))
    f = draw(st.sampled_from([1, 3, 8, 65]))
    return (n, c, h, w), (f, c, kh, kw), stride, padding


def normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_close(got, expected, tol=1e-4):
    """float32 sums in another order: relative to the magnitude of the whole result."""
    got = to_numpy(got)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = max(1.0, float(np.abs(expected).max(initial=0)))
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol * scale)


# ---- the kernels against NumPy ---------------------------------------------------------------
@given(conv_shapes(), st.integers(0, 2**31))
def test_im2col_and_col2im_match_numpy(device, problem, seed):
    x_shape, w_shape, stride, padding = problem
    x = normal(x_shape, seed)
    kernel = w_shape[2:]
    expected = ops.im2col(x, kernel, stride, padding)
    c = normal(expected.shape, seed + 1)
    with device.active():
        cols = kernels.im2col(device.asarray(x), kernel, stride, padding)
        dx = kernels.col2im(device.asarray(c), x_shape, kernel, stride, padding)
    np.testing.assert_array_equal(to_numpy(cols), expected)            # a copy: exact
    np.testing.assert_array_equal(to_numpy(dx), ops.col2im(c, x_shape, kernel, stride, padding))


@given(conv_shapes(), st.booleans(), st.integers(0, 2**31))
def test_conv2d_forward_and_backward_match_numpy(device, problem, with_bias, seed):
    x_shape, w_shape, stride, padding = problem
    x, w = normal(x_shape, seed), normal(w_shape, seed + 1)
    b = normal(w_shape[:1], seed + 2) if with_bias else None
    out, cache = ops.conv2d_forward(x, w, b, stride, padding)
    dout = normal(out.shape, seed + 3)
    dx, dw, db = ops.conv2d_backward(dout, cache)
    to = device.asarray
    with device.active():
        got, got_cache = kernels.conv2d_forward(to(x), to(w), None if b is None else to(b),
                                                stride, padding)
        got_dx, got_dw, got_db = kernels.conv2d_backward(to(dout), got_cache)
    for a, e in [(got, out), (got_dx, dx), (got_dw, dw)]:
        assert_close(a, np.ascontiguousarray(e))
    if with_bias:
        assert_close(got_db, db)
    else:
        assert got_db is None and db is None


def test_conv2d_backward_weight_sums_its_split_k_partials(device):
    # N*OH*OW = 2*24*24 = 1152: backward_weight splits the reduction across several blocks.
    x, w = normal((2, 3, 24, 24), 0), normal((5, 3, 3, 3), 1)
    pad = ((1, 1), (1, 1))
    assert kernels._split_k(2 * 24 * 24, 1)[0] > 1
    out, cache = ops.conv2d_forward(x, w, None, (1, 1), pad)
    dout = normal(out.shape, 2)
    _, dw, _ = ops.conv2d_backward(dout, cache)
    with device.active():
        _, got_cache = kernels.conv2d_forward(device.asarray(x), device.asarray(w), None, (1, 1), pad)
        _, got_dw, _ = kernels.conv2d_backward(device.asarray(dout), got_cache)
    assert_close(got_dw, dw)


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", [
    ((2, 67, 9, 11), (129, 67, 3, 3), (1, 1), ((1, 1), (1, 1))),    # 3 row tiles, 5 of c, 2 of cols
    ((3, 5, 7, 6), (4, 5, 1, 1), (1, 1), ((2, 0), (1, 2))),         # 1x1, padding > kernel - 1
    ((1, 3, 10, 10), (6, 3, 3, 2), (1, 1), ((0, 2), (2, 1))),       # KH != KW, one-sided padding
    ((2, 17, 9, 9), (70, 17, 3, 3), (2, 2), ((1, 1), (1, 1))),      # stride 2: the gather
    ((2, 3, 8, 7), (5, 3, 2, 3), (2, 1), ((0, 1), (2, 0))),         # stride (2, 1): the gather
    ((1, 2, 12, 5), (3, 2, 1, 1), (3, 2), ((0, 0), (0, 0))),        # 1x1 stride 3: empty taps
])
def test_conv2d_backward_data_runs_stride_1_as_a_flipped_forward_and_strides_as_the_gather(
        device, x_shape, w_shape, stride, padding):
    """Stride 1: backward_data launches the forward kernel on dout with w flipped and transposed
    and padding (KH-1-PT, KW-1-PL) (negative when the padding exceeds the kernel); larger
    strides launch the gather. Both equal NumPy's dx, on odd shapes: channel counts that cross the
    64-row tiles and 16-deep steps, 1x1 kernels, uneven padding."""
    x, w = normal(x_shape, 0), normal(w_shape, 1)
    out, cache = ops.conv2d_forward(x, w, None, stride, padding)
    dout = normal(out.shape, 2)
    dx, dw, _ = ops.conv2d_backward(dout, cache)
    launched = []

    def launch(name, grid, block, args):
        launched.append(name)
        device_launch(name, grid, block, args)

    with device.active():
        device_launch = kernels._launch                        # the emulator's, or CuPy's
        with mock.patch.object(kernels, "_launch", launch):
            _, got_cache = kernels.conv2d_forward(device.asarray(x), device.asarray(w), None,
                                                  stride, padding)
            got_dx, got_dw, _ = kernels.conv2d_backward(device.asarray(dout), got_cache)
    data_kernel = "conv2d_forward" if stride == (1, 1) else "conv2d_backward_data"
    assert launched == ["conv2d_forward", data_kernel, "conv2d_backward_weight"]
    assert_close(got_dx, np.ascontiguousarray(dx))
    assert_close(got_dw, dw)


@given(pool_problems(max_size=9), st.booleans(), st.integers(0, 2**31))
def test_maxpool2d_matches_numpy_exactly(device, problem, ties, seed):
    n, c, h, w, kernel, stride = problem
    rng = np.random.default_rng(seed)
    # Small integers make ties common: the first maximum must win, as in NumPy.
    x = (rng.integers(0, 3, (n, c, h, w)) if ties else rng.standard_normal((n, c, h, w)))
    x = x.astype(np.float32)
    out, cache = ops.maxpool2d_forward(x, kernel, stride)
    dout = normal(out.shape, seed + 1)
    with device.active():
        got, got_cache = kernels.maxpool2d_forward(device.asarray(x), kernel, stride)
        got_dx = kernels.maxpool2d_backward(device.asarray(dout), got_cache)
    np.testing.assert_array_equal(to_numpy(got), out)
    dx = ops.maxpool2d_backward(dout, cache)
    if stride[0] >= kernel[0] and stride[1] >= kernel[1]:
        np.testing.assert_array_equal(to_numpy(got_dx), dx)    # each pixel in one window at most
    else:                                                      # overlapping windows: sums, in
        assert_close(got_dx, np.ascontiguousarray(dx), 1e-6)   # an order ops may change


def maxpool_winners(x, kernel, stride):
    """The spec of the raw kernel's winners, a plain loop over the taps: (N, C, OH, OW) tap
    kh*KW + kw, the first maximum of a window, or its last NaN when it holds one (PyTorch's rule)."""
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    taps = np.stack([x[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
                     for i in range(kh) for j in range(kw)], axis=-1)     # (N, C, OH, OW, K)
    nan = np.isnan(taps)
    last_nan = taps.shape[-1] - 1 - nan[..., ::-1].argmax(axis=-1)
    return np.where(nan.any(axis=-1), last_nan, np.nan_to_num(taps, nan=-np.inf).argmax(axis=-1))


@given(pool_problems(max_size=9), st.integers(0, 2**31))
def test_maxpool2d_lets_a_nan_anywhere_in_its_window_win(device, problem, seed):
    """A NaN wins its window wherever it sits: out is NaN, as in minicnn.ops (np.maximum), and
    the winner (where dout goes) is the window's last NaN, as in PyTorch."""
    n, c, h, w, kernel, stride = problem
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (n, c, h, w)).astype(np.float32)          # ties among the numbers
    x[rng.random(x.shape) < 0.2] = np.nan
    out, _ = ops.maxpool2d_forward(x, kernel, stride)
    winners = maxpool_winners(x, kernel, stride)
    dout = normal(out.shape, seed + 1)
    with device.active():
        got, got_cache = kernels.maxpool2d_forward(device.asarray(x), kernel, stride)
        got_dx = kernels.maxpool2d_backward(device.asarray(dout), got_cache)
    np.testing.assert_array_equal(to_numpy(got), out)         # NaN where ops has NaN, else equal
    np.testing.assert_array_equal(to_numpy(got_cache[1]), winners)
    # dx: dout routed to those winners by ops's own backward
    dx = ops.maxpool2d_backward(dout, (x.shape, x.strides, winners.astype(np.uint8), kernel, stride))
    assert_close(got_dx, np.ascontiguousarray(dx), 1e-6)
    try:
        import torch
    except ImportError:
        return
    t_out, index = torch.nn.functional.max_pool2d(torch.from_numpy(x), kernel, stride,
                                                  return_indices=True)
    np.testing.assert_array_equal(to_numpy(got), t_out.numpy())
    index = index.numpy()                                     # h * W + w in the input plane
    oh, ow = np.indices(out.shape[2:])
    taps = (index // w - oh * stride[0]) * kernel[1] + (index % w - ow * stride[1])
    np.testing.assert_array_equal(to_numpy(got_cache[1]), taps)


def test_maxpool2d_nan_at_each_tap_of_a_window_wins(device):
    """One 3x3 window, a NaN at each of its 9 taps in turn (and NaNs at two taps): out NaN, the
    NaN's tap the winner, the gradient on the NaN."""
    for taps in [[k] for k in range(9)] + [[0, 4], [2, 7], [5, 8]]:
        x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)  # the last tap is the maximum
        x.reshape(-1)[taps] = np.nan
        with device.active():
            got, cache = kernels.maxpool2d_forward(device.asarray(x), (3, 3), (1, 1))
            dx = kernels.maxpool2d_backward(device.asarray(np.ones((1, 1, 1, 1), np.float32)), cache)
        assert np.isnan(to_numpy(got)).all() and np.isnan(ops.maxpool2d_forward(x, (3, 3), (1, 1))[0])
        assert to_numpy(cache[1]).item() == taps[-1], taps
        assert to_numpy(dx).reshape(-1).tolist() == [float(k == taps[-1]) for k in range(9)]


@given(st.sampled_from([(1, 1), (3, 5), (2, 3, 4, 5), (1, 7, 3, 3)]), st.integers(0, 2**31))
def test_bias_relu_matches_its_reference_exactly(device, shape, seed):
    x, b, dy = normal(shape, seed), normal(shape[1:2], seed + 1), normal(shape, seed + 2)
    y, mask = kernels.bias_relu_forward_reference(x, b)
    dx, db = kernels.bias_relu_backward_reference(dy, mask)
    with device.active():
        got_y, got_mask = kernels.bias_relu_forward(device.asarray(x), device.asarray(b))
        got_dx, got_db = kernels.bias_relu_backward(device.asarray(dy), got_mask)
    np.testing.assert_array_equal(to_numpy(got_y), y)
    np.testing.assert_array_equal(to_numpy(got_mask), mask)
    np.testing.assert_array_equal(to_numpy(got_dx), dx)
    assert_close(got_db, db)


def test_bias_relu_takes_the_scalar_path_for_arrays_off_16_byte_alignment(emulator):
    """The kernels read four neighbours as one float4 when the arrays are 16-byte aligned (and
    four share a channel); an array that starts 4 bytes into a buffer (a contiguous slice) takes
    the one-element path. Both give the reference's result exactly."""
    shape = (2, 3, 4, 6)                                       # S = 24: four neighbours share c
    b = normal(shape[1:2], 1)

    def shifted(a):                                            # a copy starting 4 bytes past 16
        buffer = np.empty(a.size + 1, np.float32)
        buffer[1:] = a.reshape(-1)
        return buffer[1:].reshape(a.shape)

    for x, dy in [(normal(shape, 0), normal(shape, 2)), (shifted(normal(shape, 0)),
                                                          shifted(normal(shape, 2)))]:
        assert x.ctypes.data % 16 == dy.ctypes.data % 16 in (0, 4)
        y, mask = kernels.bias_relu_forward_reference(x, b)
        with emulator.active():
            got_y, got_mask = kernels.bias_relu_forward(x, b)
            got_dx, _ = kernels.bias_relu_backward(dy, got_mask)
        np.testing.assert_array_equal(got_y, y)
        np.testing.assert_array_equal(got_mask, mask)
        np.testing.assert_array_equal(got_dx, kernels.bias_relu_backward_reference(dy, mask)[0])


def test_raw_kernels_reject_other_dtypes_and_numpy_arrays():
    x = np.zeros((1, 1, 4, 4))
    with pytest.raises(TypeError, match="float32 only"):
        kernels.maxpool2d_forward(x, (2, 2), (2, 2))
    with pytest.raises(TypeError, match="takes CuPy arrays"):
        kernels.maxpool2d_forward(x.astype(np.float32), (2, 2), (2, 2))


def test_raw_kernels_through_the_layers_train_like_the_generic_ops(device, monkeypatch):
    """One SGD step of a net with strided, padded, bias-free and >64-channel convs and both pools:
    layers wired to minicnn.implementation, run with use("raw"), against the same step on
    minicnn.ops.
    Emulated: fake_cupy stands in for CuPy, so the model moves with .to("cupy") and select
    hands out the raw pair as on a GPU.
    """
    import copy

    import minicnn
    from minicnn.nn import layers
    from minicnn.nn import optim
    from minicnn.nn.losses import SoftmaxCrossEntropy
    rng = np.random.default_rng(0)
    generic = minicnn.Sequential([
        layers.Conv2D(3, 70, 3, stride=2, padding=1, rng=rng), layers.ReLU(),
        layers.MaxPool2D(3, stride=2), layers.Conv2D(70, 5, 2, bias=False, padding="same", rng=rng),
        layers.ReLU(), layers.AvgPool2D(1), layers.Flatten(), layers.Dense(5 * 3 * 3, 10, rng=rng)])
    raw = copy.deepcopy(generic)
    x, labels = normal((3, 3, 15, 15), 1), rng.integers(0, 10, 3)

    def step(model, x, labels):
        loss, d = SoftmaxCrossEntropy()(model.forward(x, training=True), labels)
        model.backward(d)
        optim.SGD(model, lr=0.1, momentum=0.9).step()
        return loss, {k: to_numpy(v) for k, v in {**model.grads, **model.params}.items()}

    expected_loss, expected = step(generic, x, labels)
    if device.name == "emulated":
        from minicnn import backend
        monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    cupy = get_backend("cupy")
    raw.to("cupy")
    with device.active(), minicnn.use("raw"):
        fns = minicnn.implementation.ops_for(cupy.zeros(1, dtype=np.float32))
        assert fns.conv2d_forward is kernels.conv2d_forward
        loss, got = step(raw, cupy.asarray(x), cupy.asarray(labels))
    assert float(to_numpy(loss)) == pytest.approx(float(to_numpy(expected_loss)), rel=1e-5)
    for key, value in expected.items():
        assert_close(got[key], value)


# ---- host overhead per launch ---------------------------------------------------------------
def test_each_kernel_function_is_looked_up_once_however_often_it_runs(monkeypatch):
    """_launch asks the compiled module for a kernel function once per device, not on every
    launch (CuPy's get_function builds a new kernel object and hashes the source each time).
    fake_cupy stands in for CuPy, with a RawModule that counts the lookups and the launches."""
    from minicnn import backend
    monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    compiled, lookups, launches = [], [], []

    class RawModule:
        def __init__(self, code, options):
            compiled.append(code)

        def get_function(self, name):
            lookups.append(name)
            return lambda grid, block, args: launches.append(name)

    monkeypatch.setattr(fake_cupy.module, "RawModule", RawModule)
    kernels._module.cache_clear(), kernels._function.cache_clear()
    try:
        cupy = fake_cupy.module
        x, b = cupy.asarray(normal((2, 3, 6, 6), 0)), cupy.asarray(normal((3,), 1))
        for _ in range(5):
            kernels.maxpool2d_forward(x, (2, 2), (2, 2))
            kernels.bias_relu_forward(x, b)
    finally:                      # no fake module or function left memoised for later tests
        kernels._module.cache_clear(), kernels._function.cache_clear()
    assert launches == ["maxpool2d_forward", "bias_relu_forward"] * 5
    assert sorted(lookups) == ["bias_relu_forward", "maxpool2d_forward"]
    assert len(compiled) == 2                                  # maxpool2d.cu and bias_relu.cu


def test_bias_free_convolutions_share_one_zero_bias(emulator, monkeypatch):
    """A bias-free conv2d_forward passes the kernel a cached zero bias (one per device and F),
    not a new array per call; the result is still the bias-free convolution."""
    from minicnn import backend
    monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    cupy = fake_cupy.module
    biases = []

    def launch(name, grid, block, args):
        biases.append(args[2])
        emulator.launch(name, grid, block, args)

    x = normal((2, 3, 7, 7), 0)
    pad = ((1, 1), (1, 1))
    outs = []
    with mock.patch.object(kernels, "_launch", launch):
        for f in (4, 4, 5, 4):
            w = normal((f, 3, 3, 3), f)
            outs.append((kernels.conv2d_forward(cupy.asarray(x), cupy.asarray(w), None, (1, 1),
                                                pad)[0], ops.conv2d_forward(x, w, None, (1, 1), pad)[0]))
    assert biases[0] is biases[1] is biases[3] and biases[2] is not biases[0]
    assert [to_numpy(b).tolist() for b in biases[1:3]] == [[0.0] * 4, [0.0] * 5]
    for got, expected in outs:
        assert_close(got, np.ascontiguousarray(expected))


# ---- choosing an implementation --------------------------------------------------------------
def test_use_switches_the_implementation_and_the_context_manager_restores_it():
    import threading

    import minicnn
    from minicnn import implementation, reference
    x32 = np.zeros((1, 1, 4, 4), dtype=np.float32)
    assert implementation.active() == "fast"
    assert implementation.ops_for(x32) is ops
    with minicnn.use("raw"):
        assert implementation.active() == "raw"
        assert implementation.ops_for(x32) is ops         # NumPy arrays: minicnn.ops, always
        with minicnn.use("reference"):
            assert implementation.ops_for(x32) is reference
        assert implementation.active() == "raw"
    assert implementation.active() == "fast"
    minicnn.use("reference")                               # as a statement: a global setting
    try:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(implementation.ops_for(x32)))
        thread.start()
        thread.join()
        assert seen == [reference]                         # worker threads see it too
    finally:
        minicnn.use("fast")
    with pytest.raises(ValueError, match="'reference', 'fast', 'raw'"):
        minicnn.use("generic")
    assert implementation.active() == "fast"


def test_every_fast_pair_has_its_reference_by_the_same_name():
    from minicnn import reference
    assert set(ops.__all__) <= set(dir(reference))


def test_ops_for_gives_the_raw_kernels_for_float32_cupy_arrays_only():
    from minicnn import implementation
    try:
        cupy = get_backend("cupy")
    except BackendError as e:
        pytest.skip(f"CuPy or a GPU is not available: {e}")
    x = cupy.zeros((1, 1, 4, 4), dtype=cupy.float32)
    with implementation.use("raw"):
        fns = implementation.ops_for(x)
        assert (fns.conv2d_forward, fns.conv2d_backward) == (kernels.conv2d_forward,
                                                             kernels.conv2d_backward)
        assert fns.avgpool2d_forward is ops.avgpool2d_forward
        assert implementation.ops_for(x.astype(cupy.float64)) is ops
    assert implementation.ops_for(x) is ops


# ---- the sources -----------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.cu")), ids=lambda p: p.name)
def test_every_cu_file_opens_with_the_required_header(path):
    text = path.read_text()
    header = text[:text.index("\n\n")]
    assert all(line.startswith("//") for line in header.splitlines())
    for field in HEADER_FIELDS:
        assert f"// {field}" in header, f"{path.name} header lacks {field!r}"
    assert "python -m minicnn.bench kernels" in header
    assert "minicnn/" in header.split("Must match:")[1].splitlines()[0]   # names its NumPy twin


def test_every_kernel_is_defined_in_the_file_the_table_names():
    assert {p.stem for p in (ROOT / "kernels").glob("*.cu")} == set(kernels.KERNEL_FILES.values())
    for name, stem in kernels.KERNEL_FILES.items():
        assert f" {name}(" in kernels.kernel_source(stem) or f"\n{name}(" in kernels.kernel_source(stem)
        assert kernels.kernel_source(name) == (ROOT / "kernels" / f"{stem}.cu").read_text()
    with pytest.raises(KeyError, match="No CUDA kernel called 'conv3d'"):
        kernels.kernel_source("conv3d")


def test_an_installed_wheel_finds_the_cuda_sources_outside_the_source_tree(tmp_path):
    """Build the wheel from a copy of the project, unpack it, and import it with no access to
    the checkout: kernel_source must find the .cu files inside the installed package.
    """
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    readme = ROOT / "README.md"
    (project / "README.md").write_text(readme.read_text() if readme.exists() else "minicnn\n")
    for folder in ("minicnn", "kernels"):
        shutil.copytree(ROOT / folder, project / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(project), "--no-deps", "-q",
                    "-w", str(wheels)], check=True)
    (wheel,) = wheels.glob("minicnn-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.endswith(".cu")}
        z.extractall(tmp_path / "site")
    assert shipped == {f"minicnn/cuda_src/{p.name}" for p in (ROOT / "kernels").glob("*.cu")}

    # python -S: no site-packages processing, so no editable install of the checkout is seen;
    # NumPy comes from its own folder on PYTHONPATH.
    numpy_home = str(Path(np.__file__).resolve().parent.parent)
    check = ("import minicnn.cuda.kernels as k, pathlib; "
             "print(k.source_dir()); print(len(k.kernel_source('conv2d_forward')))")
    result = subprocess.run([sys.executable, "-S", "-c", check], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                [str(tmp_path / "site"), numpy_home])}, check=True)
    folder, length = result.stdout.split()
    assert Path(folder) == tmp_path / "site" / "minicnn" / "cuda_src"
    assert int(length) == len((ROOT / "kernels" / "conv2d.cu").read_text())


# ---- the benchmark's memory-bound rows, on either device --------------------------------------
@pytest.mark.parametrize("c", [3, 8])
def test_bench_memory_bound_rows_check_every_raw_kernel(device, c):
    """The rows that time im2col, col2im, max-pool and bias+ReLU: every raw kernel's result is
    checked against minicnn.ops first, as on a GPU (here also on the CUDA emulation)."""
    from minicnn.bench import kernels as bench_kernels
    xp = np if device.name == "emulated" else get_backend("cupy")
    x = device.asarray(np.random.default_rng(0).standard_normal((2, c, 8, 8)).astype(np.float32))
    rows = []
    with device.active():
        bench_kernels.run_memory_bound(x, {"repeats": 1, "warmup": 0, "json": True}, rows, xp,
                                       f"{c}->{c}")
    assert len(rows) == 12 and {r["impl"] for r in rows} == {"cupy-generic", "raw"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), [r["status"] for r in rows]


def test_bench_kernels_gpu_rows_run_on_fake_cupy_and_the_cuda_emulation(emulator, monkeypatch,
                                                                        capsys):
    """The ladder's GPU path end to end where no GPU is: fake_cupy stands in for CuPy and the
    raw kernels run on the CUDA emulation. Every cupy-generic and raw row (the convolution passes
    and the memory-bound kernels) is checked against NumPy, then timed, and printed."""
    from minicnn import backend
    from minicnn.bench import kernels as bench_kernels
    monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    monkeypatch.setitem(bench_kernels.FP32_PEAK_TFLOPS, "fake_cupy", 0.1)
    with emulator.active():
        report = bench_kernels.main(["--tiny", "--quick", "--batches", "1"])
    printed = capsys.readouterr().out
    assert report["device"] == "fake_cupy (NumPy on the CPU): data sheet" and report["peak_tflops"]
    assert report["note"] == "cuDNN rows need PyTorch with CUDA."
    rows = report["rows"]
    assert {r["impl"] for r in rows} == {"numpy", "cupy-generic", "raw"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), [r["status"] for r in rows]
    for shape in bench_kernels.TINY:
        name = f"{shape[0]}->{shape[1]} {shape[2]}x{shape[2]} N=1"
        raw = {r["pass"] for r in rows if r["shape"] == name and r["impl"] == "raw"}
        assert {"forward", "backward_data", "backward_weight", "backward", "im2col", "col2im",
                "maxpool2d forward", "maxpool2d backward", "bias_relu forward",
                "bias_relu backward"} == raw
    assert all(r["pct_peak"] > 0 for r in rows if r.get("gflops") and r["impl"] != "numpy")
    assert "raw" in printed and "GB/s" in printed


# ---- the benchmark's CPU path ----------------------------------------------------------------
def test_bench_kernels_prints_checked_numpy_rows_and_says_what_the_gpu_rows_need(capsys):
    from minicnn.bench import kernels as bench_kernels
    results = bench_kernels.main(["--tiny", "--quick", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report == results
    rows = report["rows"]
    numpy_rows = [r for r in rows if r["impl"] == "numpy"]
    assert len(numpy_rows) == 2 * len(bench_kernels.TINY)
    assert {r["pass"] for r in numpy_rows} == {"forward", "backward"}
    for r in numpy_rows:
        assert r["status"] == "ok" and r["ms"] > 0
        assert r["gflops"] == pytest.approx(r["gflop"] / r["ms"] * 1e3)
    if len(rows) == len(numpy_rows):
        assert report["note"] == bench_kernels.GPU_NOTE


def test_bench_kernels_reports_a_wrong_result_as_fail_and_does_not_time_it(capsys, monkeypatch):
    from minicnn.bench import kernels as bench_kernels

    original = bench_kernels.generic_passes

    def wrong_forward(x, w, b, dout):
        passes = original(x, w, b, dout)
        passes["forward"] = lambda: np.zeros((x.shape[0], w.shape[0]) + x.shape[2:], np.float32)
        return passes

    monkeypatch.setattr(bench_kernels, "generic_passes", wrong_forward)
    report = bench_kernels.main(["--tiny", "--quick", "--json", "--batches", "1"])
    capsys.readouterr()
    forward = [r for r in report["rows"] if r["impl"] == "numpy" and r["pass"] == "forward"]
    assert forward and all(r["status"].startswith("FAIL: max abs err") for r in forward)
    assert all(r["ms"] is None and r["gflops"] is None for r in forward)
