"""Padded pooling ("same" and explicit padding) and GlobalAveragePooling2D: the reference against
nested loops over each window's real pixels and hand-worked TensorFlow "same" examples, the fast
path against the reference (outputs and gradients, float64, both memory orders, ties), PyTorch
as a second opinion, gradcheck, the layers' config and save/load, and the raw fallback."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn
from minicnn import implementation, ops
from minicnn import reference as R
from minicnn.nn import (AvgPool2D, Conv2D, Dense, Flatten, GlobalAveragePooling2D, MaxPool2D,
                        ReLU, layer_config, layer_from_config)
from minicnn.ops import pool as pool_ops
from test_reference import LAYOUTS, MANY, SEEDS, _close, _in_layout, _patched, _threads

NO_PADDING = ((0, 0), (0, 0))


def _pool_loops(x, kernel, stride, padding, reduce):
    """The spec: out[n, c, oh, ow] = reduce(the real pixels of window (oh, ow)), one value per
    iteration; padding ((top, bottom), (left, right)) only moves and adds windows."""
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    out = np.zeros((n, c, oh, ow), dtype=x.dtype)
    for i, ch, r, s in np.ndindex(n, c, oh, ow):
        top, left = r * sh - pt, s * sw - pl
        window = x[i, ch, max(top, 0):min(top + kh, h), max(left, 0):min(left + kw, w)]
        out[i, ch, r, s] = reduce(window)
    return out


@st.composite
def padded_pool_problems(draw, max_size=7):
    """(N, C, H, W, kernel, stride, padding): padding ((top, bottom), (left, right)) of at most
    kernel - 1 on each side, so that every window holds a real pixel (as "same" and PyTorch's
    padding <= kernel // 2 guarantee), often asymmetric."""
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = tuple((draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))) for k in kernel)
    h, w = (draw(st.integers(max(1, k - sum(p)), max_size)) for k, p in zip(kernel, padding))
    return draw(st.integers(1, 3)), draw(st.integers(1, 3)), h, w, kernel, stride, padding


# ---- the reference against the spec and hand-worked examples ----------------------------------
@given(padded_pool_problems(), SEEDS)
def test_padded_reference_pools_match_nested_loops(problem, seed):
    n, c, h, w, kernel, stride, padding = problem
    x = np.random.default_rng(seed).standard_normal((n, c, h, w))
    _close(R.maxpool2d_forward(x, kernel, stride, True, padding)[0],
           _pool_loops(x, kernel, stride, padding, np.max))
    _close(R.avgpool2d_forward(x, kernel, stride, True, padding)[0],
           _pool_loops(x, kernel, stride, padding, np.mean))


def test_same_padding_as_tensorflow_by_hand():
    """5x5, 2x2 windows, stride 2, "same": TensorFlow pads (0, 1), 3x3 outputs; the last row and
    column of windows hold 2 real pixels (1 in the corner), and average them only."""
    x = np.arange(25.0).reshape(1, 1, 5, 5)
    assert R.same_padding(5, 2, 2) == (0, 1)
    expected_max = [[6, 8, 9], [16, 18, 19], [21, 23, 24]]
    expected_avg = [[3, 5, 6.5], [13, 15, 16.5], [20.5, 22.5, 24]]
    for impl in (R, ops):
        for layer_impl in ("reference", "fast"):
            with minicnn.use(layer_impl):
                np.testing.assert_array_equal(MaxPool2D(2, padding="same").forward(x)[0, 0],
                                              expected_max)
                np.testing.assert_array_equal(AvgPool2D(2, padding="same").forward(x)[0, 0],
                                              expected_avg)
        pad = ((0, 1), (0, 1))
        np.testing.assert_array_equal(impl.maxpool2d_forward(x, (2, 2), (2, 2), True, pad)[0][0, 0],
                                      expected_max)
        out, cache = impl.avgpool2d_forward(x, (2, 2), (2, 2), True, pad)
        np.testing.assert_array_equal(out[0, 0], expected_avg)
        # each output's gradient shared by its real pixels only: 1/4, 1/2 or 1 of it
        dx = impl.avgpool2d_backward(np.ones((1, 1, 3, 3)), cache)[0, 0]
        np.testing.assert_array_equal(dx, [[.25, .25, .25, .25, .5]] * 4 + [[.5, .5, .5, .5, 1]])


def test_same_padding_splits_as_tensorflow_with_the_odd_extra_after():
    """3x3 windows, stride 1 on 4 rows: one row each side; stride 2 on 6 rows: (0, 1); 3x3 stride
    2 on 5 rows: (1, 1). A max-pool of all -1s never sees the padding (no 0 comes out)."""
    x = -np.ones((1, 1, 6, 5))
    for kernel, stride, rows, cols in (((3, 3), (1, 1), (1, 1), (1, 1)),
                                       ((3, 3), (2, 2), (0, 1), (1, 1)),
                                       ((2, 3), (2, 3), (0, 0), (0, 1))):
        layer = MaxPool2D(kernel, stride, padding="same")
        assert layer._padding_for(6, 5) == (rows, cols)
        y = layer.forward(x)
        assert y.shape[2:] == (math.ceil(6 / stride[0]), math.ceil(5 / stride[1]))
        assert np.all(y == -1)


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 3), st.integers(1, 3), st.sampled_from([MaxPool2D, AvgPool2D]))
def test_same_pools_give_ceil_of_size_over_stride(h, w, kh, kw, sh, sw, pool):
    y = pool((kh, kw), (sh, sw), padding="same").forward(np.ones((1, 2, h, w)))
    assert y.shape == (1, 2, math.ceil(h / sh), math.ceil(w / sw))
    np.testing.assert_array_equal(y, 1.0)          # an average of real pixels only, every window


def test_padded_maxpool_ties_go_to_the_first_real_maximum():
    x = np.zeros((1, 1, 3, 3))                     # every window a tie of real zeros
    for impl in (R, ops):
        out, cache = impl.maxpool2d_forward(x, (2, 2), (2, 2), True, ((1, 0), (1, 0)))
        assert out.shape == (1, 1, 2, 2) and np.all(out == 0)
        dx = impl.maxpool2d_backward(np.arange(1.0, 5.0).reshape(out.shape), cache)
        np.testing.assert_array_equal(dx[0, 0], [[1, 2, 0], [3, 4, 0], [0, 0, 0]])


# ---- the fast path against the reference --------------------------------------------------------
def _compare_padded_pools(x, kernel, stride, padding, dout_layout, rng):
    for op in ("maxpool2d", "avgpool2d"):
        fast_fwd, fast_bwd = getattr(ops, f"{op}_forward"), getattr(ops, f"{op}_backward")
        ref_fwd, ref_bwd = getattr(R, f"{op}_forward"), getattr(R, f"{op}_backward")
        expected, ref_cache = ref_fwd(x, kernel, stride, True, padding)
        out, cache = fast_fwd(x, kernel, stride, True, padding)
        _close(out, expected)
        _close(fast_fwd(x, kernel, stride, False, padding)[0], expected)
        dout = _in_layout(rng.standard_normal(out.shape), dout_layout)
        dx = fast_bwd(dout, cache)
        _close(dx, ref_bwd(dout, ref_cache))
        if op == "maxpool2d":                      # dx keeps the input's memory order
            assert (dx.strides[1] < dx.strides[3]) == (x.strides[1] < x.strides[3])


@pytest.mark.parametrize("threads", [1, 2])
@MANY
@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 7), w=st.integers(1, 7),
       padding=st.tuples(*[st.tuples(st.integers(0, 1), st.integers(0, 1))] * 2),
       ties=st.booleans(), block=st.sampled_from([None, 1]), x_layout=st.sampled_from(LAYOUTS),
       dout_layout=st.sampled_from(LAYOUTS), seed=SEEDS)
def test_fast_padded_2x2_maxpool_matches_reference(n, c, h, w, padding, ties, block, x_layout,
                                                   dout_layout, seed, threads):
    """The 2x2 stride-2 max-pool on a padded copy takes the halving steps: -inf rows and
    columns on either side, odd sizes, ties, a block of images at a time."""
    (pt, pb), (pl, pr) = padding
    if h + pt + pb < 2 or w + pl + pr < 2:
        return                                     # no window fits
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (n, c, h, w)).astype(np.float64) if ties else \
        rng.standard_normal((n, c, h, w))
    with _threads(threads), _patched(pool_ops, POOL_BLOCK_BYTES=block):
        _compare_padded_pools(_in_layout(x, x_layout), (2, 2), (2, 2), padding, dout_layout, rng)


@pytest.mark.parametrize("threads", [1, 2])
@MANY
@given(problem=padded_pool_problems(), ties=st.booleans(), x_layout=st.sampled_from(LAYOUTS),
       dout_layout=st.sampled_from(LAYOUTS), seed=SEEDS)
def test_fast_padded_pools_match_reference(problem, ties, x_layout, dout_layout, seed, threads):
    n, c, h, w, kernel, stride, padding = problem
    rng = np.random.default_rng(seed)
    shape = (n, c, h, w)
    x = rng.integers(-2, 3, shape).astype(np.float64) if ties else rng.standard_normal(shape)
    with _threads(threads):
        _compare_padded_pools(_in_layout(x, x_layout), kernel, stride, padding, dout_layout, rng)


def test_padded_pools_on_every_backend(xp):
    """NumPy, CuPy and the CuPy stand-in: the same numbers as the reference on NumPy, float32
    stays float32, no host array anywhere."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    dout_max, dout_avg = (rng.standard_normal((2, 3, 3, 3)).astype(np.float32) for _ in "ma")
    pad = ((0, 1), (1, 1))
    for impl in (R, ops):
        for op, dout in (("maxpool2d", dout_max), ("avgpool2d", dout_avg)):
            fwd, bwd = getattr(impl, f"{op}_forward"), getattr(impl, f"{op}_backward")
            out, cache = fwd(xp.asarray(x), (2, 3), (2, 2), True, pad)
            dx = bwd(xp.asarray(dout), cache)
            want, want_cache = getattr(R, f"{op}_forward")(x, (2, 3), (2, 2), True, pad)
            assert isinstance(out, xp.ndarray) and out.dtype == dx.dtype == np.float32
            _close(out, want, 1e-6, 1e-6)
            _close(dx, getattr(R, f"{op}_backward")(dout, want_cache), 1e-6, 1e-6)


# ---- PyTorch, a second opinion ------------------------------------------------------------------
def _assert_as_torch(layer, torch_fn, x, rng, impl):
    """layer's forward and backward (under implementation impl, a random dy) equal torch_fn's
    on x, float64; -> the layer's output."""
    import torch
    with minicnn.use(impl):
        y = layer.forward(x, training=True)
        dy = rng.standard_normal(y.shape)
        dx = layer.backward(dy)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch_fn(tx)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    return y


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("kernel, stride, padding", [
    (2, 2, 1), (3, 2, 1), (3, 1, 1), ((3, 2), (1, 2), (1, 1)), ((3, 5), 2, (0, 2))])
def test_explicit_padding_as_pytorch(kernel, stride, padding, impl):
    """MaxPool2D(padding=p) is nn.MaxPool2d's; AvgPool2D(padding=p) is nn.AvgPool2d's with
    count_include_pad=False (the mean of the real pixels)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 8))
    for layer, torch_fn in (
            (MaxPool2D(kernel, stride, padding),
             lambda t: F.max_pool2d(t, kernel, stride, padding)),
            (AvgPool2D(kernel, stride, padding),
             lambda t: F.avg_pool2d(t, kernel, stride, padding, count_include_pad=False))):
        _assert_as_torch(layer, torch_fn, x, rng, impl)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("h, w, kernel, stride", [
    (5, 5, 2, 2), (6, 7, 3, 2), (7, 4, (2, 3), (3, 1)), (4, 4, 3, 1)])
def test_same_padding_as_pytorch_on_a_padded_copy(h, w, kernel, stride, impl):
    """TensorFlow's "same", asymmetric: PyTorch on an explicitly padded copy, -inf around it for
    the max; for the average the window sums over the counts of real pixels (each a sum-pool,
    divisor_override=1, of zeros or ones around the image)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    k, s = (kernel,) * 2 if isinstance(kernel, int) else kernel, (stride,) * 2 if \
        isinstance(stride, int) else stride
    (pt, pb), (pl, pr) = (R.same_padding(h, k[0], s[0]), R.same_padding(w, k[1], s[1]))
    assert (pt, pb, pl, pr) != (0, 0, 0, 0)

    def torch_avg(t):
        def sum_pool(a):
            return F.avg_pool2d(F.pad(a, (pl, pr, pt, pb)), k, s, divisor_override=1)
        return sum_pool(t) / sum_pool(torch.ones_like(t))

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, h, w))
    for layer, torch_fn in (
            (MaxPool2D(kernel, stride, "same"),
             lambda t: F.max_pool2d(F.pad(t, (pl, pr, pt, pb), value=-math.inf), k, s)),
            (AvgPool2D(kernel, stride, "same"), torch_avg)):
        y = _assert_as_torch(layer, torch_fn, x, rng, impl)
        assert y.shape[2:] == (math.ceil(h / s[0]), math.ceil(w / s[1]))


# ---- gradcheck -----------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "fast"])
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from(["same", "half", "pair"]), st.sampled_from([MaxPool2D, AvgPool2D]), SEEDS)
def test_gradcheck_padded_pools(impl, n, c, h, w, kh, kw, sh, sw, kind, pool, seed):
    padding = {"same": "same", "half": min(kh, kw) // 2, "pair": (kh // 2, kw // 2)}[kind]
    layer = pool((kh, kw), (sh, sw), padding)
    pad = layer._padding_for(h, w)
    if h + sum(pad[0]) < kh or w + sum(pad[1]) < kw:
        return                                     # the window does not fit: nothing to check
    x = np.random.default_rng(seed).standard_normal((n, c, h, w))
    with minicnn.use(impl):
        errors = minicnn.gradcheck(layer, x, seed=seed)
    assert errors and all(e < 1e-6 for e in errors.values()), errors


def test_a_window_of_more_than_256_taps():
    """The fast path keeps each window's winning tap in a byte up to 256 taps, then in an int32
    (resnet-small's global max-pool of 150x150 images is 18x18)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 18, 19))
    for kernel, stride in (((18, 18), (18, 18)), ((16, 17), (1, 2))):
        expected, ref_cache = R.maxpool2d_forward(x, kernel, stride)
        out, cache = ops.maxpool2d_forward(x, kernel, stride)
        _close(out, expected)
        dout = rng.standard_normal(out.shape)
        _close(ops.maxpool2d_backward(dout, cache), R.maxpool2d_backward(dout, ref_cache))


# ---- the layers: arguments, config, save/load, paths, raw ---------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: MaxPool2D(2, padding=2), r"at most half the window \(2, 2\)"),
    (lambda: AvgPool2D((3, 1), padding=(1, 1)), "at most half"),
    (lambda: MaxPool2D(2, padding="full"), "'same' or 'valid'"),
    (lambda: AvgPool2D(3, padding=-1), "at least 0"),
    (lambda: MaxPool2D(3, padding=1.5), "pair of ints")])
def test_bad_padding_is_one_sentence(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("layer, config", [
    (MaxPool2D(2), {"type": "MaxPool2D", "kernel_size": [2, 2], "stride": [2, 2]}),
    (AvgPool2D(3, 2, padding="valid"), {"type": "AvgPool2D", "kernel_size": [3, 3],
                                        "stride": [2, 2], "padding": "valid"}),
    (MaxPool2D(3, 1, padding=1), {"type": "MaxPool2D", "kernel_size": [3, 3], "stride": [1, 1],
                                  "padding": [1, 1]}),
    (AvgPool2D((2, 3), padding="same"), {"type": "AvgPool2D", "kernel_size": [2, 3],
                                         "stride": [2, 3], "padding": "same"}),
    (GlobalAveragePooling2D(), {"type": "GlobalAveragePooling2D"})])
def test_config_round_trip(layer, config):
    """An unpadded pool's config is what it was before padding existed, so files written before
    (and after) load in either version; the padding round-trips."""
    assert layer_config(layer) == config
    again = layer_from_config(config)
    assert type(again) is type(layer) and layer_config(again) == config
    if hasattr(layer, "padding"):
        assert again.padding == layer.padding


def test_an_old_config_without_padding_loads_unpadded():
    old = {"type": "MaxPool2D", "kernel_size": [2, 2], "stride": [2, 2]}
    assert layer_from_config(old).padding == (0, 0)


def test_save_and_load_a_model_with_padded_pools_and_global_average_pooling(tmp_path):
    rng = np.random.default_rng(0)
    model = minicnn.Sequential([
        Conv2D(3, 4, 3, padding="same", rng=rng), ReLU(), MaxPool2D(2, padding="same"),
        AvgPool2D(3, 2, padding=1), Conv2D(4, 6, 1, rng=rng), GlobalAveragePooling2D(),
        Dense(6, 5, rng=rng)])
    x = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
    path = tmp_path / "padded.npz"
    model.save(path)
    loaded = minicnn.load(path)
    assert layer_config(loaded) == layer_config(model)
    assert loaded[2].padding == "same" and loaded[3].padding == (1, 1)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert model.forward(x).shape == (2, 5)


def test_pool2d_path_with_padding():
    assert ops.pool2d_path("max", 2, 2) == "2x2 halving steps"
    assert ops.pool2d_path("max", 2, 2, 0) == "2x2 halving steps"
    assert ops.pool2d_path("max", 2, 2, ((0, 1), (0, 1))) == "2x2 halving steps of a padded copy"
    assert ops.pool2d_path("max", 3, 2, ((0, 1), (0, 1))) == "strided taps of a padded copy"
    assert ops.pool2d_path("avg", 3, 1, 1) == "strided taps of a padded copy"
    assert ops.pool2d_path("avg", 3, 1, (0, 1)) == "strided taps of a padded copy"
    # "same" that needs no padding for this input (6 is a multiple of 2): the halving steps
    layer = MaxPool2D(2, padding="same")
    assert layer.path(np.zeros((1, 1, 6, 6))) == "fast: 2x2 halving steps"
    assert layer.path(np.zeros((1, 1, 5, 6))) == "fast: 2x2 halving steps of a padded copy"
    assert AvgPool2D(2, padding="same").path(np.zeros((1, 1, 5, 6))) == \
        "fast: strided taps of a padded copy"
    _, cache = ops.maxpool2d_forward(np.zeros((1, 1, 6, 6)), (2, 2), (2, 2), True, NO_PADDING)
    assert cache[0] == "2x2"
    _, cache = ops.maxpool2d_forward(np.zeros((1, 1, 5, 6)), (2, 2), (2, 2), True,
                                     ((0, 1), (0, 0)))
    assert cache[0] == "padded" and cache[3][0] == "2x2"       # the halving steps, padded
    _, cache = ops.maxpool2d_forward(np.zeros((1, 1, 5, 6)), (3, 3), (2, 2), True,
                                     ((1, 1), (1, 1)))
    assert cache[0] == "padded" and cache[3][0] == (1, 1, 7, 8)  # strided taps of the copy
    lines = []
    model = minicnn.Sequential([MaxPool2D(2, padding="same"), Flatten()])
    model.summary((1, 5, 5), print_fn=lines.append, paths=True)
    assert "fast: 2x2 halving steps of a padded copy" in "\n".join(lines)


def test_padded_maxpool_under_raw_falls_back_to_the_fast_ops(monkeypatch):
    """The CUDA max-pool kernel takes no padding and no window of more than 256 taps: under
    use("raw") such a MaxPool2D runs minicnn.ops's (others still run the kernel), on the CuPy
    stand-in."""
    import fake_cupy
    from minicnn import backend
    monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    cupy = fake_cupy.module
    calls = []

    def kernel_stand_in(x, kernel, stride, training=True):
        calls.append(kernel)
        return ops.maxpool2d_forward(x, kernel, stride, training)
    monkeypatch.setattr(implementation._RAW, "maxpool2d_forward", kernel_stand_in)
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    with minicnn.use("raw"):
        assert implementation.name_for(cupy.asarray(x)) == "raw"
        padded = MaxPool2D(2, padding="same")
        y = padded.forward(cupy.asarray(x), training=True)
        dx = padded.backward(cupy.ones(y.shape, dtype=np.float32))
        assert calls == []
        assert padded.path(cupy.asarray(x)) == "fast: 2x2 halving steps of a padded copy"
        MaxPool2D(2).forward(cupy.asarray(x[:, :, :4, :4]))
        assert calls == [(2, 2)]
        assert MaxPool2D(2).path(cupy.asarray(x)) == "raw: CUDA kernel"
        big = cupy.asarray(np.ones((1, 1, 17, 17), np.float32))
        assert MaxPool2D(17).forward(big).shape == (1, 1, 1, 1)          # 289 taps
        assert MaxPool2D(17).path(big) == "fast: strided taps"
        assert calls == [(2, 2)]
    with minicnn.use("reference"):
        want = MaxPool2D(2, padding="same")
        _close(y, want.forward(x, training=True))
        _close(dx, want.backward(np.ones(y.shape, dtype=np.float32)))


# Sequential.needed_input's rule (minicnn/nn/containers.py, _output_size) still takes every
# MaxPool2D and AvgPool2D as unpadded: until it checks the pool's padding as it does a conv's,
# the fast forward crops the input before a padded pool and Flatten gets the wrong size.
def test_a_padded_pool_after_unpadded_convs_in_a_sequential():
    """Sequential's fast forward reads only the part of the input its output depends on
    (needed_input); a padded pool's output depends on all of its input, so the crop must stop
    there, as it does at a padded conv: the same output as the reference, which never crops."""
    rng = np.random.default_rng(0)
    model = minicnn.Sequential([Conv2D(2, 3, 3, dtype=np.float64, rng=rng), ReLU(),
                                MaxPool2D(2, padding="same"), Flatten(),
                                Dense(3 * 4 * 4, 2, dtype=np.float64, rng=rng)])
    x = rng.standard_normal((2, 2, 9, 9))                 # conv 7x7, pool "same" 4x4
    with minicnn.use("reference"):
        expected = model.forward(x)
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-12)


# ---- global average pooling ---------------------------------------------------------------------
@pytest.mark.parametrize("threads", [1, 2])
@given(n=st.integers(1, 4), c=st.integers(1, 5), h=st.integers(1, 6), w=st.integers(1, 6),
       x_layout=st.sampled_from(LAYOUTS), dout_layout=st.sampled_from(["c", "f"]), seed=SEEDS)
def test_fast_global_average_pooling_matches_reference(n, c, h, w, x_layout, dout_layout, seed,
                                                       threads):
    rng = np.random.default_rng(seed)
    x = _in_layout(rng.standard_normal((n, c, h, w)), x_layout)
    with _threads(threads):
        out, cache = ops.global_avgpool2d_forward(x)
        expected, ref_cache = R.global_avgpool2d_forward(x)
        _close(out, expected)
        _close(out, x.sum(axis=(2, 3)) / (h * w))          # the definition
        dout = np.asarray(rng.standard_normal((n, c)), order=dout_layout.upper())
        dx = ops.global_avgpool2d_backward(dout, cache)
        _close(dx, R.global_avgpool2d_backward(dout, ref_cache))
        _close(dx, np.broadcast_to(dout[:, :, None, None] / (h * w), x.shape))
        assert (dx.strides[1] < dx.strides[3]) == (x.strides[1] < x.strides[3]) or c == 1 \
            or h * w == 1                                  # dx in the input's memory order


def test_global_average_pooling_on_every_backend(xp):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    dout = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    want, want_cache = R.global_avgpool2d_forward(x)
    for impl in (R, ops):
        out, cache = impl.global_avgpool2d_forward(xp.asarray(x))
        dx = impl.global_avgpool2d_backward(xp.asarray(dout), cache)
        assert isinstance(dx, xp.ndarray) and out.dtype == dx.dtype == np.float32
        assert dx.flags.writeable
        _close(out, want, 1e-6, 1e-6)
        _close(dx, R.global_avgpool2d_backward(dout, want_cache), 1e-6, 1e-6)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), SEEDS)
def test_gradcheck_global_average_pooling(impl, n, c, h, w, seed):
    x = np.random.default_rng(seed).standard_normal((n, c, h, w))
    with minicnn.use(impl):
        errors = minicnn.gradcheck(GlobalAveragePooling2D(), x, seed=seed)
    assert errors and all(e < 1e-6 for e in errors.values()), errors


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_global_average_pooling_as_pytorch(impl):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5, 6))
    layer = GlobalAveragePooling2D()
    with minicnn.use(impl):
        y = layer.forward(x, training=True)
        dy = rng.standard_normal(y.shape)
        dx = layer.backward(dy)
    for torch_fn in (lambda t: t.mean(dim=(2, 3)),
                     lambda t: torch.nn.functional.adaptive_avg_pool2d(t, 1).flatten(1)):
        tx = torch.tensor(x, requires_grad=True)
        ty = torch_fn(tx)
        ty.backward(torch.tensor(dy))
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_global_average_pooling_checks_its_input():
    layer = GlobalAveragePooling2D()
    with pytest.raises(ValueError, match=r"GlobalAveragePooling2D expects input of shape "
                                         r"\(N, C, H, W\)"):
        layer.forward(np.zeros((2, 3)))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((2, 3)))
    assert layer.forward(np.ones((2, 3, 7, 5), np.float32)).dtype == np.float32
