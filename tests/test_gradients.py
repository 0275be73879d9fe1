"""Every layer's backward against centred differences in float64 (minicnn.gradcheck)."""
from unittest import mock

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import minicnn
from minicnn.nn import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                            MaxPool2D, ReLU, Residual, Softmax)
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.ops import conv as conv_ops
from strategies import conv_problems, pool_problems

TOL = 1e-6
seeds = st.integers(0, 2**32 - 1)


def _assert_ok(errors):
    assert errors and all(e < TOL for e in errors.values()), errors


@given(conv_problems(), seeds, st.booleans(), st.sampled_from([0, 10**9]),
       st.sampled_from([1, 10**9]), st.sampled_from([0, 10**9]))
def test_conv2d(problem, seed, bias, channels_first_below, dx_gemm_min_channels,
                per_image_gemm_max_size):
    """Both layouts: channels-first (the teaching im2col, for any channel count) and
    channels-last. In the latter, both ways a stride-1 conv can take its dx: as a convolution
    (padded) or tap by tap (valid), from 1 channel on; and dcols + col2im (never either). And
    the GEMMs run one per image (always) or one per chunk of images (never)."""
    n, c, h, w, f, kernel, stride, padding = problem
    rng = np.random.default_rng(seed)
    layer = Conv2D(c, f, kernel, stride, padding, bias=bias, dtype=np.float64, rng=rng)
    with mock.patch.multiple(conv_ops, CHANNELS_FIRST_BELOW=channels_first_below,
                             DX_GEMM_MIN_CHANNELS=dx_gemm_min_channels,
                             PER_IMAGE_GEMM_MAX_SIZE=per_image_gemm_max_size):
        _assert_ok(minicnn.gradcheck(layer, rng.standard_normal((n, c, h, w)), seed=seed))


@given(pool_problems(), seeds, st.sampled_from([MaxPool2D, AvgPool2D]))
def test_pools(problem, seed, pool):
    n, c, h, w, kernel, stride = problem
    x = np.random.default_rng(seed).standard_normal((n, c, h, w))
    _assert_ok(minicnn.gradcheck(pool(kernel, stride), x, seed=seed))


@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), seeds, st.booleans())
def test_dense(n, fin, fout, seed, bias):
    rng = np.random.default_rng(seed)
    layer = Dense(fin, fout, bias=bias, dtype=np.float64, rng=rng)
    _assert_ok(minicnn.gradcheck(layer, rng.standard_normal((n, fin)), seed=seed))


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), seeds,
       st.sampled_from([ReLU, Flatten, Softmax]))
def test_parameter_free_layers(n, a, b, seed, layer_cls):
    shape = (n, a) if layer_cls is Softmax else (n, a, b, 2)
    x = np.random.default_rng(seed).standard_normal(shape)
    _assert_ok(minicnn.gradcheck(layer_cls(), x, seed=seed))


@given(st.integers(1, 3), st.integers(1, 5), st.floats(0.0, 0.9), seeds)
def test_dropout(n, f, p, seed):
    x = np.random.default_rng(seed).standard_normal((n, f, 3))
    _assert_ok(minicnn.gradcheck(Dropout(p, rng=np.random.default_rng(seed)), x, seed=seed))


@given(st.integers(2, 4), st.integers(1, 3), st.integers(1, 4), seeds)
def test_batchnorm2d(n, c, hw, seed):
    x = np.random.default_rng(seed).standard_normal((n, c, hw, hw)) * 3 + 1
    _assert_ok(minicnn.gradcheck(BatchNorm2D(c, dtype=np.float64), x, seed=seed))


@given(st.integers(2, 6), st.integers(1, 5), seeds)
def test_batchnorm1d(n, f, seed):
    x = np.random.default_rng(seed).standard_normal((n, f)) * 2 - 1
    _assert_ok(minicnn.gradcheck(BatchNorm1D(f, dtype=np.float64), x, seed=seed))


@given(st.integers(1, 3), st.integers(1, 3), st.integers(3, 6), seeds, st.booleans())
def test_residual(n, c, hw, seed, project):
    rng = np.random.default_rng(seed)
    d = dict(dtype=np.float64, rng=rng)
    if project:   # downsampling block: stride-2 body, strided 1x1 projection shortcut
        block = Residual([Conv2D(c, c + 1, 3, 2, 1, **d), BatchNorm2D(c + 1, dtype=np.float64),
                          ReLU(), Conv2D(c + 1, c + 1, 3, 1, 1, **d)],
                         shortcut=Conv2D(c, c + 1, 1, 2, 0, **d))
    else:
        block = Residual([Conv2D(c, c, 3, 1, "same", **d), ReLU(), Conv2D(c, c, 3, 1, "same", **d)])
    x = rng.standard_normal((max(n, 2), c, hw, hw))
    _assert_ok(minicnn.gradcheck(block, x, seed=seed))


@given(st.integers(1, 5), st.integers(2, 6), st.floats(0.0, 0.5), seeds)
def test_softmax_cross_entropy(n, k, smoothing, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, k)) * 3
    labels = rng.integers(0, k, n)
    _assert_ok(minicnn.gradcheck(SoftmaxCrossEntropy(smoothing), logits, labels))


def test_gradcheck_catches_a_wrong_backward(capsys):
    class BrokenReLU(ReLU):
        def backward(self, dy):
            return dy            # forgets the mask
    x = np.random.default_rng(0).standard_normal((2, 5))
    errors = minicnn.gradcheck(BrokenReLU(), x, verbose=True)
    assert errors["input"] > 0.1
    assert "FAIL" in capsys.readouterr().out


def test_gradcheck_checks_float32_layers_on_a_float64_copy():
    layer = Conv2D(2, 3, 3, padding=1, rng=np.random.default_rng(0))
    weight_before = layer.params["weight"].copy()
    errors = minicnn.gradcheck(layer, np.random.default_rng(1).standard_normal((2, 2, 4, 4)))
    _assert_ok(errors)
    assert set(errors) == {"input", "weight", "bias"}
    assert layer.params["weight"].dtype == np.float32
    np.testing.assert_array_equal(layer.params["weight"], weight_before)


def test_loss_is_stable_for_huge_logits():
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], dtype=np.float32)
    loss, dlogits = SoftmaxCrossEntropy(0.1)(logits, np.array([0, 2]))
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
