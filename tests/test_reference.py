"""minicnn.reference, the readable engine: against the nested-loop spec and centred differences,
and the fast minicnn.ops against it, path by path (outputs and every gradient, float64).

Fast paths and what reaches them (minicnn/ops/conv.py, pool.py, basic.py):
- conv forward: channels-first when C < CHANNELS_FIRST_BELOW, else channels-last; one GEMM per
  image when the GEMM's other sizes are <= PER_IMAGE_GEMM_MAX_SIZE (F = 65 or a patched 0: not);
  chunks of CONV_WORKSPACE_BYTES (patched to 1: one image a chunk).
- conv dx (channels-last): "as-conv" for stride 1 and (K-1)/2 <= p <= K-1 on every side,
  "by-taps" for other stride-1 paddings, "col2im" (dcols + col2im) for stride != 1 or
  C < DX_GEMM_MIN_CHANNELS; the test asserts which one ran.
- max-pool: the 2x2 stride-2 path (tie fix-up, blocks of POOL_BLOCK_BYTES) and the general one.
- batch norm: channel rows r at a time (_channel_rows), r = 1 or more.
- each of them split over 2 workers (MIN_PARALLEL_SIZE patched to 1) as well as in one.
"""
import ast
import contextlib
import inspect
import pathlib
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn import ops
from minicnn import reference as R
from minicnn.backend import array_module, to_numpy
from minicnn.ops import basic as basic_ops
from minicnn.ops import conv as conv_ops
from minicnn.ops import pool as pool_ops
from strategies import conv_problems, pool_problems

REFERENCE_DIR = pathlib.Path(R.__file__).parent
SEEDS = st.integers(0, 2**32 - 1)
# The fast-vs-reference properties have many knobs to combine: 4x the profile's examples.
MANY = settings(max_examples=4 * settings.default.max_examples)
LAYOUTS = ("nchw", "nhwc")


# ---- helpers ---------------------------------------------------------------------------------
def _close(actual, expected, rtol=1e-10, atol=1e-10):
    """Equal shape and dtype, values within tolerance (None == None)."""
    if expected is None:
        assert actual is None
        return
    actual, expected = to_numpy(actual), to_numpy(expected)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def _in_layout(a, layout):
    """A 4-D array (NumPy or CuPy) as NCHW memory, or as an NCHW-shaped view of NHWC memory."""
    if a.ndim != 4 or layout == "nchw":
        return a
    return array_module(a).ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _workers_module():
    """The module whose map() splits work (it reads MIN_PARALLEL_SIZE and the thread count):
    minicnn/parallel.py, or the module inside minicnn/parallel/ once that is a package."""
    try:
        from minicnn.parallel import workers as module
    except ImportError:
        from minicnn import parallel as module
    return sys.modules[module.map.__module__]


@contextlib.contextmanager
def _threads(k):
    """k workers; with k > 1, even the smallest work is split (MIN_PARALLEL_SIZE = 1)."""
    workers = _workers_module()
    before = workers.threads()
    with pytest.MonkeyPatch.context() as mp:
        if k > 1:
            mp.setattr(workers, "MIN_PARALLEL_SIZE", 1)
        workers.set_threads(k)
        try:
            yield
        finally:
            workers.set_threads(before)


@contextlib.contextmanager
def _patched(module, **values):
    """Inside: module's constants named in values replaced (those given as None left alone)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in values.items():
            if value is not None:
                mp.setattr(module, name, value)
        yield


def _numerical_gradient(scalar, t, eps=1e-6):
    """d scalar() / d t by centred differences (t, float64, perturbed in place and restored)."""
    grad = np.zeros_like(t)
    for i in np.ndindex(t.shape):
        old = t[i]
        t[i] = old + eps
        plus = scalar()
        t[i] = old - eps
        minus = scalar()
        t[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def _check_backward(forward, backward, inputs, rng):
    """backward's gradients of L = sum(forward(*inputs) * dout), dout random, against centred
    differences; forward -> (out, cache), backward(dout, cache) -> a gradient per input."""
    out, cache = forward(*inputs)
    dout = rng.standard_normal(out.shape)
    grads = backward(dout, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    assert len(grads) == len(inputs)
    for t, g in zip(inputs, grads):
        numeric = _numerical_gradient(lambda: float((forward(*inputs)[0] * dout).sum()), t)
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-8)


def _distinct(rng, shape):
    """Values in [0, 1) at least 0.5 / size apart: no max-pool ties, even after a +-1e-6
    perturbation (and small, so the centred differences' rounding stays small too)."""
    size = int(np.prod(shape))
    return (rng.permutation(size).reshape(shape) + 0.5 * rng.random(shape)) / size


def _away_from_zero(rng, shape):
    """Random values at least 0.1 from zero, where ReLU has no derivative."""
    x = rng.standard_normal(shape)
    return x + 0.1 * np.sign(x)


def _resolve(padding, h, w, kernel, stride):
    """A conv_problems padding ("same", "valid", int or pair) as ((top, bottom), (left, right)),
    as minicnn's Conv2D resolves it."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        return (R.same_padding(h, kernel[0], stride[0]), R.same_padding(w, kernel[1], stride[1]))
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (ph, ph), (pw, pw)


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


# ---- the reference against the spec -----------------------------------------------------------
@given(conv_problems(), SEEDS)
def test_im2col_layout_and_col2im_is_its_adjoint(problem, seed):
    n, c, h, w, f, kernel, stride, padding = problem
    stride, rng = _pair(stride), np.random.default_rng(seed)
    pad = _resolve(padding, h, w, kernel, stride)
    x = rng.standard_normal((n, c, h, w))
    cols = R.im2col(x, kernel, stride, pad)
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel, stride, pad
    oh, ow = R.conv_output_size(h, kh, sh, pt, pb), R.conv_output_size(w, kw, sw, pl, pr)
    assert cols.shape == (c * kh * kw, n * oh * ow)
    xpad = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    for ni, ci, i, j, r, s in np.ndindex(n, c, kh, kw, oh, ow):     # the documented layout
        assert cols[(ci * kh + i) * kw + j, (ni * oh + r) * ow + s] == xpad[ni, ci, sh * r + i,
                                                                            sw * s + j]
    d = rng.standard_normal(cols.shape)
    back = R.col2im(d, x.shape, kernel, stride, pad)
    assert back.shape == x.shape
    assert np.isclose(np.vdot(cols, d), np.vdot(x, back), rtol=1e-10, atol=1e-10)


def test_output_size_and_same_padding_are_minicnn_ops_own():
    for size in range(1, 12):
        for k in range(1, 5):
            for s in range(1, 4):
                assert R.same_padding(size, k, s) == ops.same_padding(size, k, s)
                for before, after in ((0, 0), (1, 0), (2, 3)):
                    assert (R.conv_output_size(size, k, s, before, after)
                            == ops.conv_output_size(size, k, s, before, after))


@given(conv_problems(), st.booleans(), SEEDS)
def test_conv_matches_nested_loops(problem, bias, seed):
    n, c, h, w, f, kernel, stride, padding = problem
    stride, rng = _pair(stride), np.random.default_rng(seed)
    pad = _resolve(padding, h, w, kernel, stride)
    x, wt = rng.standard_normal((n, c, h, w)), rng.standard_normal((f, c) + kernel)
    b = rng.standard_normal(f) if bias else None
    out, _ = R.conv2d_forward(x, wt, b, stride, pad)
    _close(out, R.conv2d_loops(x, wt, b, stride, pad))


@pytest.mark.parametrize("c, h, w, f, kernel, stride, padding", [
    (2, 5, 4, 3, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (1, 6, 5, 2, (2, 3), (2, 1), ((0, 2), (1, 0))),      # asymmetric, overlap on one axis
    (3, 4, 7, 2, (1, 2), (1, 3), ((0, 0), (0, 0))),      # valid; columns no window reaches
])
def test_conv_backward_matches_centred_differences(c, h, w, f, kernel, stride, padding):
    rng = np.random.default_rng(0)
    x, wt, b = (rng.standard_normal(shape) for shape in ((2, c, h, w), (f, c) + kernel, (f,)))
    _check_backward(lambda x, wt, b: R.conv2d_forward(x, wt, b, stride, padding),
                    R.conv2d_backward, [x, wt, b], rng)
    out, cache = R.conv2d_forward(x, wt, None, stride, padding)       # no bias: db None
    dx, dw, db = R.conv2d_backward(np.ones(out.shape), cache, input_grad=False)
    assert dx is None and db is None and dw.shape == wt.shape


@given(pool_problems(), SEEDS)
def test_pools_match_nested_loops(problem, seed):
    n, c, h, w, kernel, stride = problem
    x = np.random.default_rng(seed).standard_normal((n, c, h, w))
    _close(R.maxpool2d_forward(x, kernel, stride)[0], R.pool2d_loops(x, kernel, stride, np.max))
    _close(R.avgpool2d_forward(x, kernel, stride)[0], R.pool2d_loops(x, kernel, stride, np.mean))


@pytest.mark.parametrize("h, w, kernel, stride", [
    (5, 5, (2, 2), (2, 2)), (6, 5, (3, 2), (1, 2)), (5, 7, (2, 3), (3, 2)), (4, 4, (3, 3), (1, 1))])
def test_pool_backward_matches_centred_differences(h, w, kernel, stride):
    rng = np.random.default_rng(1)
    x = _distinct(rng, (2, 2, h, w))
    _check_backward(lambda x: R.maxpool2d_forward(x, kernel, stride), R.maxpool2d_backward,
                    [x], rng)
    _check_backward(lambda x: R.avgpool2d_forward(x, kernel, stride), R.avgpool2d_backward,
                    [x], rng)


def test_maxpool_ties_send_the_gradient_to_the_first_maximum():
    x = np.zeros((1, 1, 3, 4))                      # every window is a tie
    out, cache = R.maxpool2d_forward(x, (2, 2), (1, 2))
    dx = R.maxpool2d_backward(np.arange(1.0, 5.0).reshape(out.shape), cache)
    np.testing.assert_array_equal(dx[0, 0], [[1, 0, 2, 0], [3, 0, 4, 0], [0, 0, 0, 0]])


def test_maxpool_ties_as_pytorch():
    """A second opinion: PyTorch's max-pool gradient on integer inputs full of ties."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    for kernel, stride in (((2, 2), (2, 2)), ((3, 2), (1, 2)), ((2, 3), (2, 1))):
        x = rng.integers(-1, 2, (2, 3, 7, 6)).astype(np.float64)
        out, cache = R.maxpool2d_forward(x, kernel, stride)
        dout = rng.standard_normal(out.shape)
        xt = torch.tensor(x, requires_grad=True)
        torch.nn.functional.max_pool2d(xt, kernel, stride).backward(torch.tensor(dout))
        _close(R.maxpool2d_backward(dout, cache), xt.grad.numpy())   # overlaps: sums differ


def test_every_other_backward_matches_centred_differences():
    rng = np.random.default_rng(3)
    n, k = 4, 5
    cases = [
        (R.dense_forward, R.dense_backward, [rng.standard_normal((n, 3)),
                                             rng.standard_normal((k, 3)), rng.standard_normal(k)]),
        (lambda x: R.relu_forward(x), R.relu_backward, [_away_from_zero(rng, (2, 3, 2, 2))]),
        (lambda z: (R.softmax(z),) * 2, R.softmax_backward, [rng.standard_normal((n, k))]),
        (lambda x: R.dropout_forward(x, 0.4, np.random.default_rng(7)), R.dropout_backward,
         [rng.standard_normal((n, k))]),
        (R.add_forward, R.add_backward, [rng.standard_normal((2, 3)), rng.standard_normal((2, 3))]),
    ]
    for shape in ((6, 3), (2, 3, 2, 3)):
        cases.append((lambda x, g, b: R.batchnorm_forward(x, g, b, 1e-3)[:2], R.batchnorm_backward,
                      [rng.standard_normal(shape), rng.standard_normal(3), rng.standard_normal(3)]))
    for forward, backward, inputs in cases:
        _check_backward(forward, backward, inputs, rng)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_loss_gradient_matches_centred_differences(smoothing):
    rng = np.random.default_rng(4)
    logits, labels = rng.standard_normal((5, 4)) * 3, rng.integers(0, 4, 5)
    loss, dlogits = R.softmax_cross_entropy(logits, labels, smoothing)
    assert isinstance(loss, float)
    numeric = _numerical_gradient(lambda: R.softmax_cross_entropy(logits, labels, smoothing)[0],
                                  logits)
    np.testing.assert_allclose(dlogits, numeric, rtol=1e-6, atol=1e-8)
    q = np.full((5, 4), smoothing / 4) + (1 - smoothing) * np.eye(4)[labels]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.isclose(loss, -(q * np.log(p)).sum() / 5, rtol=1e-12)


# ---- the fast convolution against the reference, path by path ---------------------------------
def _fast_conv_backward(dout, cache, input_grad):
    """conv_ops.conv2d_backward, and which way it took dx: "channels-first", "as-conv",
    "by-taps", "col2im" (dcols + col2im) or "none" (input_grad=False, channels-last)."""
    ran = []

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            ran.append(name)
            return fn(*args, **kwargs)
        return wrapper

    names = {"_backward_channels_first": "channels-first", "conv2d_forward": "as-conv",
             "_add_taps": "by-taps", "col2im_nhwc": "col2im"}
    with pytest.MonkeyPatch.context() as mp:
        for fn_name, path in names.items():
            mp.setattr(conv_ops, fn_name, spy(path, getattr(conv_ops, fn_name)))
        grads = conv_ops.conv2d_backward(dout, cache, input_grad)
    return grads, (ran[0] if ran else "none")


def _compare_conv(n, c, h, w, f, kernel, stride, padding, bias, input_grad, x_layout,
                  dout_layout, seed):
    """Fast and reference conv, forward and backward, on the same random problem; -> dx path."""
    rng = np.random.default_rng(seed)
    x = _in_layout(rng.standard_normal((n, c, h, w)), x_layout)
    wt, b = rng.standard_normal((f, c) + kernel), rng.standard_normal(f) if bias else None
    expected, ref_cache = R.conv2d_forward(x, wt, b, stride, padding)
    out, cache = conv_ops.conv2d_forward(x, wt, b, stride, padding)
    _close(out, expected)
    dout = _in_layout(rng.standard_normal(out.shape), dout_layout)
    grads, path = _fast_conv_backward(dout, cache, input_grad)
    for got, want in zip(grads, R.conv2d_backward(dout, ref_cache, input_grad)):
        _close(got, want)
    return path


# (C, H, W, F, kernel, stride, padding, the dx path it must take)
CONV_PATHS = [
    (3, 6, 5, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), "channels-first"),
    (1, 7, 6, 2, (2, 3), (2, 1), ((0, 2), (1, 0)), "channels-first"),
    (7, 5, 5, 65, (1, 1), (1, 1), ((0, 0), (0, 0)), "channels-first"),     # F > 64: one GEMM
    (8, 6, 5, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), "as-conv"),            # dx conv channels-first
    (9, 5, 6, 10, (3, 3), (1, 1), ((1, 2), (2, 1)), "as-conv"),           # ... channels-last
    (8, 4, 4, 9, (1, 1), (1, 1), ((0, 0), (0, 0)), "as-conv"),            # 1x1: per-image GEMMs
    (12, 4, 3, 65, (2, 2), (1, 1), ((1, 1), (1, 1)), "as-conv"),          # F > 64
    (8, 6, 6, 5, (3, 3), (1, 1), ((0, 0), (0, 0)), "by-taps"),            # valid
    (10, 5, 4, 9, (3, 2), (1, 1), ((0, 2), (1, 0)), "by-taps"),           # asymmetric
    (9, 3, 3, 65, (2, 2), (1, 1), ((0, 0), (0, 1)), "by-taps"),           # F > 64
    (8, 4, 5, 3, (1, 1), (1, 1), ((1, 0), (0, 0)), "by-taps"),            # 1x1 padded
    (8, 7, 6, 6, (3, 3), (2, 2), ((1, 1), (1, 1)), "col2im"),
    (11, 6, 7, 3, (2, 3), (1, 2), ((0, 1), (2, 0)), "col2im"),
    (8, 5, 5, 65, (3, 3), (2, 1), ((1, 1), (0, 0)), "col2im"),             # F > 64
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CONV_PATHS, ids=lambda case: case[-1])
def test_fast_conv_matches_reference_on_every_path(case, threads):
    c, h, w, f, kernel, stride, padding, path = case
    with _threads(threads):
        for workspace in (None, 1):                       # 1: one image a chunk
            with _patched(conv_ops, CONV_WORKSPACE_BYTES=workspace):
                for seed, (bias, x_layout, dout_layout) in enumerate(
                        [(True, "nchw", "nhwc"), (False, "nhwc", "nhwc"),
                         (True, "nhwc", "nchw"), (False, "nchw", "nchw")]):
                    for input_grad in (True, False):
                        ran = _compare_conv(3, c, h, w, f, kernel, stride, padding, bias,
                                            input_grad, x_layout, dout_layout, seed)
                        assert ran == (path if input_grad or path == "channels-first"
                                       else "none")


@pytest.mark.parametrize("per_image", [0, 10**9])
def test_fast_conv_matches_reference_with_every_gemm_split(per_image):
    """Every GEMM one per image, or one per chunk, on each dx path; and dcols + col2im for a
    stride-1 conv of few channels (DX_GEMM_MIN_CHANNELS), as the channels-last path of an RGB
    layer (CHANNELS_FIRST_BELOW lowered) takes it."""
    with _patched(conv_ops, PER_IMAGE_GEMM_MAX_SIZE=per_image):
        for c, h, w, f, kernel, stride, padding, path in CONV_PATHS:
            assert _compare_conv(2, c, h, w, f, kernel, stride, padding, True, True, "nhwc",
                                 "nchw", 0) == path
        with _patched(conv_ops, CHANNELS_FIRST_BELOW=0, CONV_WORKSPACE_BYTES=1):
            for c, padding in ((3, ((1, 1), (1, 1))), (3, ((0, 0), (0, 0))), (1, ((2, 0), (0, 1)))):
                assert _compare_conv(2, c, 5, 6, 4, (3, 3), (1, 1), padding, True, True, "nchw",
                                     "nhwc", 1) == "col2im"
        with _patched(conv_ops, DX_GEMM_MIN_CHANNELS=10**9):
            assert _compare_conv(2, 9, 5, 5, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), False, True,
                                 "nhwc", "nhwc", 2) == "col2im"


@st.composite
def fast_conv_problems(draw):
    """A conv problem with explicit, often asymmetric, padding, any of the fast path's knobs."""
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2))
    h, w = (draw(st.integers(max(1, k - sum(p)), 6)) for k, p in zip(kernel, padding))
    return dict(
        n=draw(st.integers(1, 3)), c=draw(st.integers(1, 12)), h=h, w=w,
        f=draw(st.one_of(st.integers(1, 10), st.just(65))), kernel=kernel,
        stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), padding=padding,
        bias=draw(st.booleans()), input_grad=draw(st.booleans()),
        x_layout=draw(st.sampled_from(LAYOUTS)), dout_layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(SEEDS)), dict(
        CONV_WORKSPACE_BYTES=draw(st.sampled_from([None, 1])),
        PER_IMAGE_GEMM_MAX_SIZE=draw(st.sampled_from([None, 0, 10**9])),
        DX_GEMM_MIN_CHANNELS=draw(st.sampled_from([None, 10**9])))


@pytest.mark.parametrize("threads", [1, 2])
@MANY
@given(problem=fast_conv_problems())
def test_fast_conv_matches_reference(problem, threads):
    args, knobs = problem
    with _threads(threads), _patched(conv_ops, **knobs):
        _compare_conv(**args)


# ---- pooling ----------------------------------------------------------------------------------
def _compare_pools(x, kernel, stride, dout_layout, rng):
    """Fast and reference max- and avg-pool, forward (training or not) and backward."""
    for fast_fwd, fast_bwd, ref_fwd, ref_bwd in (
            (ops.maxpool2d_forward, ops.maxpool2d_backward, R.maxpool2d_forward,
             R.maxpool2d_backward),
            (ops.avgpool2d_forward, ops.avgpool2d_backward, R.avgpool2d_forward,
             R.avgpool2d_backward)):
        expected, ref_cache = ref_fwd(x, kernel, stride)
        out, cache = fast_fwd(x, kernel, stride)
        _close(out, expected)
        inference, ref_inference = (fwd(x, kernel, stride, training=False)
                                    for fwd in (fast_fwd, ref_fwd))
        _close(inference[0], expected)
        _close(ref_inference[0], expected)
        assert (inference[1] is None) == (ref_inference[1] is None)   # max-pool: no cache
        dout = _in_layout(rng.standard_normal(out.shape), dout_layout)
        _close(fast_bwd(dout, cache), ref_bwd(dout, ref_cache))


def _pool_input(rng, shape, ties, layout):
    """Random values, or small integers (many ties inside windows), in the given layout."""
    x = rng.integers(-2, 3, shape).astype(np.float64) if ties else rng.standard_normal(shape)
    return _in_layout(x, layout)


@pytest.mark.parametrize("threads", [1, 2])
@MANY
@given(problem=pool_problems(), ties=st.booleans(), x_layout=st.sampled_from(LAYOUTS),
       dout_layout=st.sampled_from(LAYOUTS), seed=SEEDS)
def test_fast_pools_match_reference(problem, ties, x_layout, dout_layout, seed, threads):
    """The general paths: any kernel and stride, overlapping windows, windows that tile."""
    n, c, h, w, kernel, stride = problem
    rng = np.random.default_rng(seed)
    with _threads(threads):
        _compare_pools(_pool_input(rng, (n, c, h, w), ties, x_layout), kernel, stride,
                       dout_layout, rng)


@pytest.mark.parametrize("threads", [1, 2])
@MANY
@given(n=st.integers(1, 4), c=st.integers(1, 4), h=st.integers(2, 7), w=st.integers(2, 7),
       ties=st.booleans(), block=st.sampled_from([None, 1]), x_layout=st.sampled_from(LAYOUTS),
       dout_layout=st.sampled_from(LAYOUTS), seed=SEEDS)
def test_fast_2x2_maxpool_matches_reference(n, c, h, w, ties, block, x_layout, dout_layout,
                                            seed, threads):
    """The 2x2 stride-2 path: odd sizes (a row or column dropped), ties settled by the fix-up,
    the images a block at a time (POOL_BLOCK_BYTES = 1: one image a block)."""
    rng = np.random.default_rng(seed)
    with _threads(threads), _patched(pool_ops, POOL_BLOCK_BYTES=block):
        _compare_pools(_pool_input(rng, (n, c, h, w), ties, x_layout), (2, 2), (2, 2),
                       dout_layout, rng)


def test_2x2_maxpool_tie_fixup_is_exercised():
    """The column tie the fix-up settles: left column's max in its bottom row, right column's
    in its top row; the first maximum in row-major order is the top right one."""
    x = np.array([[[[0.0, 5.0], [5.0, 1.0]]]])
    for fwd, bwd in ((ops.maxpool2d_forward, ops.maxpool2d_backward),
                     (R.maxpool2d_forward, R.maxpool2d_backward)):
        out, cache = fwd(x, (2, 2), (2, 2))
        np.testing.assert_array_equal(bwd(np.full(out.shape, 3.0), cache)[0, 0],
                                      [[0, 3], [0, 0]])


# ---- batch norm, dense, ReLU, softmax, dropout, loss ------------------------------------------
def _compare_batchnorm(shape, layout, rng):
    x = _in_layout(rng.standard_normal(shape) * 3 + 1, layout)
    c = shape[1]
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    y, cache, stats = ops.batchnorm_forward(x, gamma, beta, 1e-5)
    ry, rcache, rstats = R.batchnorm_forward(x, gamma, beta, 1e-5)
    _close(y, ry)
    _close(stats[0], rstats[0])
    _close(stats[1], rstats[1])
    assert stats[2] == rstats[2] == x.size // c
    dy = _in_layout(rng.standard_normal(shape), layout)
    for got, want in zip(ops.batchnorm_backward(dy, cache), R.batchnorm_backward(dy, rcache)):
        _close(got, want, atol=1e-9)
    mean, var = rng.standard_normal(c), rng.random(c) + 0.1
    _close(ops.batchnorm_inference(x, gamma, beta, 1e-5, mean, var),
           R.batchnorm_inference(x, gamma, beta, 1e-5, mean, var))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, r", [
    ((5, 3), 1), ((8, 3), 8), ((4, 600), 2),                 # r limited by N, by WIDE_ROW
    ((3, 4, 3, 3), 1), ((2, 3, 4, 4), 32), ((2, 5, 2, 3), 4), ((1, 1100, 2, 2), 1)])
def test_fast_batchnorm_matches_reference_at_every_row_width(shape, r, threads):
    x = np.zeros(shape)
    assert basic_ops._channel_rows(x)[1] == r                 # the wide-row factor it reaches
    with _threads(threads):
        for layout in LAYOUTS:
            _compare_batchnorm(shape, layout, np.random.default_rng(r))


@pytest.mark.parametrize("threads", [1, 2])
@MANY
@given(n=st.integers(1, 8), c=st.integers(1, 6), hw=st.one_of(st.none(), st.tuples(
    st.integers(1, 5), st.integers(1, 5))), wide_row=st.sampled_from([None, 1, 8]),
    layout=st.sampled_from(LAYOUTS), seed=SEEDS)
def test_fast_batchnorm_matches_reference(n, c, hw, wide_row, layout, seed, threads):
    shape = (n, c) if hw is None else (n, c) + hw
    with _threads(threads), _patched(basic_ops, WIDE_ROW=wide_row):
        _compare_batchnorm(shape, layout, np.random.default_rng(seed))


@pytest.mark.parametrize("threads", [1, 2])
@given(shape=st.sampled_from([(7,), (4, 5), (3, 2, 4, 5), (1, 3, 2, 2)]),
       layout=st.sampled_from(LAYOUTS), seed=SEEDS)
def test_fast_relu_matches_reference(shape, layout, seed, threads):
    rng = np.random.default_rng(seed)
    x = _in_layout(rng.integers(-3, 4, shape) * rng.random(shape), layout)   # zeros too
    with _threads(threads):
        for training in (False, True):                    # the mask of the last: backward
            y, mask = ops.relu_forward(x, training)
            ry, rmask = R.relu_forward(x, training)
            _close(y, ry)
            assert (mask is None) == (rmask is None) == (not training)
        dy = _in_layout(rng.standard_normal(shape), layout)
        _close(ops.relu_backward(dy, mask), R.relu_backward(dy, rmask))


@given(n=st.integers(1, 5), k=st.integers(1, 6), i=st.integers(1, 6), bias=st.booleans(),
       input_grad=st.booleans(), scale=st.sampled_from([1.0, 100.0]), seed=SEEDS)
def test_fast_dense_and_softmax_match_reference(n, k, i, bias, input_grad, scale, seed):
    rng = np.random.default_rng(seed)
    x, w = np.asfortranarray(rng.standard_normal((n, i))), rng.standard_normal((k, i))
    b = rng.standard_normal(k) if bias else None
    y, cache = ops.dense_forward(x, w, b)
    ry, rcache = R.dense_forward(x, w, b)
    _close(y, ry)
    dy = rng.standard_normal(y.shape)
    for got, want in zip(ops.dense_backward(dy, cache, input_grad),
                         R.dense_backward(dy, rcache, input_grad)):
        _close(got, want)
    z = rng.standard_normal((n, k)) * scale
    _close(ops.softmax(z), R.softmax(z))
    _close(ops.log_softmax(z), R.log_softmax(z))
    _close(ops.softmax_backward(dy, ops.softmax(z)), R.softmax_backward(dy, R.softmax(z)))


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_dropout_draws_the_same_mask_as_reference(p, dtype):
    x = np.random.default_rng(5).standard_normal((4, 3, 5, 2)).astype(dtype)
    y, mask = ops.dropout_forward(x, p, np.random.default_rng(6))
    ry, rmask = R.dropout_forward(x, p, np.random.default_rng(6))
    np.testing.assert_array_equal(mask, rmask)
    np.testing.assert_array_equal(y, ry)
    assert ry.dtype == rmask.dtype == dtype
    if 0 < p < 1:
        assert 0 < (rmask == 0).sum() < rmask.size            # something dropped, not all
    dy = np.ones_like(x)
    np.testing.assert_array_equal(ops.dropout_backward(dy, mask), R.dropout_backward(dy, rmask))


@given(n=st.integers(1, 6), k=st.integers(1, 6), smoothing=st.sampled_from([0.0, 0.1, 0.5]),
       scale=st.sampled_from([1.0, 1e3]), seed=SEEDS)
def test_fast_loss_matches_reference(n, k, smoothing, scale, seed):
    rng = np.random.default_rng(seed)
    logits, labels = rng.standard_normal((n, k)) * scale, rng.integers(0, k, n)
    loss, dlogits = ops.softmax_cross_entropy(logits, labels, smoothing)
    rloss, rdlogits = R.softmax_cross_entropy(logits, labels, smoothing)
    assert isinstance(rloss, float) and np.isclose(loss, rloss, rtol=1e-10, atol=1e-10)
    _close(dlogits, rdlogits)


def test_add_is_the_residual_sum_and_passes_its_gradient_to_both():
    a, b = np.arange(6.0).reshape(2, 3), np.ones((2, 3))
    y, cache = R.add_forward(a, b)
    np.testing.assert_array_equal(y, a + b)
    da, db = R.add_backward(a * 2, cache)
    np.testing.assert_array_equal(da, a * 2)
    np.testing.assert_array_equal(db, a * 2)


# ---- every pair at once: backends, dtypes, memory orders, inputs left alone --------------------
class _Inputs:
    """Random arrays for one run, the same values for the same seed: on xp's device, in dtype,
    4-D ones in layout memory. Remembers each (and a host copy) to check none was modified."""

    def __init__(self, xp, dtype=np.float64, layout="nchw", seed=0):
        self.xp, self.dtype, self.layout = xp, dtype, layout
        self.rng = np.random.default_rng(seed)
        self.made = []

    def __call__(self, *shape, ints=None):
        host = (self.rng.standard_normal(shape) if ints is None
                else self.rng.integers(*ints, shape)).astype(self.dtype)
        return self._keep(_in_layout(self.xp.asarray(host), self.layout), host)

    def labels(self, n, k):
        host = self.rng.integers(0, k, n)
        return self._keep(self.xp.asarray(host), host)

    def _keep(self, a, host):
        self.made.append((a, host))
        return a

    def unchanged(self):
        return all(np.array_equal(to_numpy(a), host) for a, host in self.made)


def _every_pair(impl, make):
    """Every forward/backward pair of impl (minicnn.reference or minicnn.ops) on arrays from
    make: {name: [output, gradients...]}. The convs cover channels-first and each dx path."""
    runs = {}
    for name, (c, f, kernel, stride, padding) in {
            "conv-first": (3, 4, (3, 2), (1, 2), ((1, 0), (2, 1))),
            "conv-as-conv": (8, 9, (3, 3), (1, 1), ((1, 1), (1, 1))),
            "conv-by-taps": (8, 3, (2, 3), (1, 1), ((0, 0), (0, 1))),
            "conv-col2im": (9, 4, (3, 3), (2, 2), ((1, 1), (0, 1)))}.items():
        out, cache = impl.conv2d_forward(make(2, c, 5, 6), make(f, c, *kernel), make(f),
                                         stride, padding)
        runs[name] = [out, *impl.conv2d_backward(make(*out.shape), cache)]
    for name, x, kernel, stride in (
            ("maxpool", make(2, 3, 5, 6), (2, 3), (1, 2)),
            ("maxpool-2x2", make(2, 3, 5, 7, ints=(-2, 3)), (2, 2), (2, 2))):   # with ties
        out, cache = impl.maxpool2d_forward(x, kernel, stride)
        runs[name] = [out, impl.maxpool2d_backward(make(*out.shape), cache)]
    out, cache = impl.avgpool2d_forward(make(2, 3, 6, 5), (3, 2), (2, 2))
    runs["avgpool"] = [out, impl.avgpool2d_backward(make(*out.shape), cache)]
    out, cache = impl.dense_forward(make(4, 6), make(3, 6), make(3))
    runs["dense"] = [out, *impl.dense_backward(make(4, 3), cache)]
    out, mask = impl.relu_forward(make(2, 3, 4, 4))
    runs["relu"] = [out, impl.relu_backward(make(2, 3, 4, 4), mask)]
    z = make(4, 5)
    runs["softmax"] = [impl.softmax(z), impl.log_softmax(z),
                       impl.softmax_backward(make(4, 5), impl.softmax(z))]
    out, mask = impl.dropout_forward(make(2, 3, 4, 4), 0.3, np.random.default_rng(0))
    runs["dropout"] = [out, impl.dropout_backward(make(2, 3, 4, 4), mask)]
    for name, shape in (("batchnorm-2d", (6, 4)), ("batchnorm-4d", (2, 4, 3, 5))):
        x, gamma, beta = make(*shape), make(4), make(4)
        out, cache, (mean, var, m) = impl.batchnorm_forward(x, gamma, beta, 1e-3)
        runs[name] = [out, mean, var, m, *impl.batchnorm_backward(make(*shape), cache),
                      impl.batchnorm_inference(x, gamma, beta, 1e-3, make(4), make(4) ** 2)]
    for smoothing in (0.0, 0.1):
        runs[f"loss-{smoothing}"] = list(impl.softmax_cross_entropy(make(5, 4), make.labels(5, 4),
                                                                   smoothing))
    if hasattr(impl, "add_forward"):                   # minicnn.ops has no function for it
        out, cache = impl.add_forward(make(2, 3), make(2, 3))
        runs["add"] = [out, *impl.add_backward(make(2, 3), cache)]
    return runs


def _same_runs(got, want, rtol=1e-10, atol=1e-10):
    assert got.keys() == want.keys()
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for g, w in zip(got[name], want[name]):
            if type(w) in (int, float):           # Python numbers; an array module's scalars
                assert type(g) is type(w) and np.isclose(g, w, rtol=rtol, atol=atol), name
            else:
                _close(g, w, rtol, atol)


def test_reference_runs_on_every_backend(xp):
    """The same numbers from NumPy, CuPy and the CuPy stand-in; no input modified."""
    make = _Inputs(xp)
    runs = _every_pair(R, make)
    assert make.unchanged()
    _same_runs(runs, _every_pair(R, _Inputs(np)))
    for outputs in runs.values():
        assert all(isinstance(o, (int, float, xp.ndarray)) for o in outputs)


def test_fast_matches_reference_on_every_backend(xp):
    """minicnn.ops and the reference give the same numbers on each backend (the fast paths
    differ there: no workers, one chunk, the 2x2 pool's tie fix-up always on a GPU)."""
    want = _every_pair(R, _Inputs(xp))
    del want["add"]              # the last pair made: the random inputs of the others still match
    _same_runs(_every_pair(ops, _Inputs(xp)), want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_in_float32_and_either_memory_order(layout):
    """float32 in, float32 out, close to float64; an NCHW-shaped view of NHWC memory gives the
    same numbers as NCHW memory; no input modified."""
    make32 = _Inputs(np, np.float32, layout)
    runs32 = _every_pair(R, make32)
    assert make32.unchanged()
    runs64 = _every_pair(R, _Inputs(np, np.float64, layout))
    for name in runs64:
        for a, b in zip(runs32[name], runs64[name]):
            if isinstance(b, np.ndarray):
                assert a.dtype == np.float32, name
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
    _same_runs(runs64, _every_pair(R, _Inputs(np, np.float64, "nchw")), rtol=1e-12, atol=1e-12)


# ---- the reference stays readable --------------------------------------------------------------
def _reference_modules():
    return sorted(REFERENCE_DIR.glob("*.py"))


def test_reference_functions_are_at_most_40_lines():
    for path in _reference_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
                assert lines <= 40, f"{path.name}:{node.lineno} {node.name}: {lines} lines"


def test_reference_has_no_workers_nor_fast_ops_and_takes_xp_from_the_arrays():
    """No minicnn.parallel, no minicnn.ops; NumPy itself only in loops.py (the spec)."""
    for path in _reference_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("minicnn.parallel", "minicnn.ops")), path.name
                assert name.split(".")[0] != "numpy" or path.name == "loops.py", path.name


def test_every_fast_op_has_a_reference_with_its_signature():
    """Either can be called in place of the other: the same names, parameters and defaults
    (im2col and col2im excepted: the reference's cols are the textbook (C*KH*KW, N*OH*OW))."""
    names = [name for name in dir(ops) if callable(getattr(ops, name))
             and (name.endswith(("_forward", "_backward", "_inference"))
                  or name in ("softmax", "log_softmax", "softmax_cross_entropy"))]
    assert len(names) >= 17
    for name in names:
        assert inspect.signature(getattr(R, name)) == inspect.signature(getattr(ops, name)), name


def test_every_public_name_is_documented_and_exported():
    for name in R.__all__:
        fn = getattr(R, name)
        assert fn.__doc__ and fn.__module__.startswith("minicnn.reference."), name
        index = R.__doc__                              # "conv2d_forward/backward" names both
        assert name in index or name.replace("_backward", "_forward/backward") in index, name
