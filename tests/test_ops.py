"""The fast NumPy paths against the nested-loop spec, and im2col/col2im as adjoints."""
from unittest import mock

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minicnn import ops
from minicnn.nn import AvgPool2D, Conv2D, MaxPool2D
from minicnn.ops import col2im, im2col
from minicnn.ops import conv as conv_ops
from minicnn.ops.im2col import col2im_nhwc, im2col_nhwc, pad_nhwc
from minicnn.reference.loops import conv2d_loops as conv2d_reference, pool2d_loops as pool2d_reference
from strategies import conv_problems, pool_problems


def _layer_and_input(problem, seed):
    n, c, h, w, f, kernel, stride, padding = problem
    rng = np.random.default_rng(seed)
    layer = Conv2D(c, f, kernel, stride, padding, dtype=np.float64, rng=rng)
    return layer, rng.standard_normal((n, c, h, w))


@given(conv_problems(), st.integers(0, 2**32 - 1))
def test_im2col_and_col2im_are_adjoint(problem, seed):
    layer, x = _layer_and_input(problem, seed)
    pad = layer._padding_for(*x.shape[2:])
    cols = im2col(x, layer.kernel_size, layer.stride, pad)
    c = np.random.default_rng(seed + 1).standard_normal(cols.shape)
    lhs = np.vdot(cols, c)                                   # <im2col(x), c>
    rhs = np.vdot(x, col2im(c, x.shape, layer.kernel_size, layer.stride, pad))  # <x, col2im(c)>
    assert np.isclose(lhs, rhs, rtol=1e-10, atol=1e-10)
    # into a reused buffer with one more row (the conv's row of ones for the bias): the first
    # rows are the same cols, the last is left alone; col2im adds into a padded array
    taller = np.full((cols.shape[0], cols.shape[1] + 1, cols.shape[2]), 7.0)
    filled = im2col(x, layer.kernel_size, layer.stride, pad, out=taller)
    np.testing.assert_array_equal(filled, cols)
    assert np.shares_memory(filled, taller) and (taller[:, -1] == 7).all()
    (pt, pb), (pl, pr) = pad
    n, ch, h, w = x.shape
    padded = np.ones((n, ch, h + pt + pb, w + pl + pr))
    added = col2im(c, x.shape, layer.kernel_size, layer.stride, pad, out=padded)
    assert added is padded
    np.testing.assert_allclose(padded[:, :, pt:pt + h, pl:pl + w] - 1,
                               col2im(c, x.shape, layer.kernel_size, layer.stride, pad))


@given(conv_problems(), st.integers(0, 2**32 - 1))
def test_channels_last_im2col_and_col2im_are_adjoint(problem, seed):
    """The pair the fast conv path uses: <im2col_nhwc(x), c> == <x, col2im_nhwc(c)>."""
    layer, x = _layer_and_input(problem, seed)
    xpad = pad_nhwc(x, layer._padding_for(*x.shape[2:]))        # (N, Hp, Wp, C)
    cols = im2col_nhwc(xpad, layer.kernel_size, layer.stride)    # (N*OH*OW, KH*KW*C)
    c = np.random.default_rng(seed + 1).standard_normal(cols.shape)
    back = np.zeros_like(xpad)
    col2im_nhwc(c, back, layer.kernel_size, layer.stride)
    assert np.isclose(np.vdot(cols, c), np.vdot(xpad, back), rtol=1e-10, atol=1e-10)
    # into a reused, wider buffer (the conv keeps a bias column of ones on the right): the
    # first K columns of its first rows are the same cols, the rest is left alone
    wide = np.full((len(cols) + 3, cols.shape[1] + 1), 7.0)
    filled = im2col_nhwc(xpad, layer.kernel_size, layer.stride, out=wide)
    np.testing.assert_array_equal(filled[:, :-1], cols)
    assert np.shares_memory(filled, wide) and (wide[:, -1] == 7).all() and (wide[-3:] == 7).all()


@given(conv_problems(), st.integers(0, 2**32 - 1))
def test_conv_matches_nested_loop_reference(problem, seed):
    layer, x = _layer_and_input(problem, seed)
    pad = layer._padding_for(*x.shape[2:])
    expected = conv2d_reference(x, layer.params["weight"], layer.params["bias"], layer.stride, pad)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-10, atol=1e-12)
    # channels-first and channels-last; in the latter, one GEMM per chunk of images or per image
    for channels_first_below, per_image in ((10**9, 0), (0, 0), (0, 10**9)):
        with mock.patch.multiple(conv_ops, CHANNELS_FIRST_BELOW=channels_first_below,
                                 PER_IMAGE_GEMM_MAX_SIZE=per_image):
            np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-10, atol=1e-12)


def test_same_padding_keeps_size_and_valid_shrinks():
    x = np.zeros((1, 2, 9, 8), dtype=np.float32)
    assert Conv2D(2, 4, 3, padding="same").forward(x).shape == (1, 4, 9, 8)
    assert Conv2D(2, 4, (4, 2), padding="same").forward(x).shape == (1, 4, 9, 8)
    assert Conv2D(2, 4, 3, stride=2, padding="same").forward(x).shape == (1, 4, 5, 4)
    assert Conv2D(2, 4, 3, padding="valid").forward(x).shape == (1, 4, 7, 6)


@given(pool_problems(), st.integers(0, 2**32 - 1))
def test_maxpool_matches_reference(problem, seed):
    n, c, h, w, kernel, stride = problem
    x = np.random.default_rng(seed).standard_normal((n, c, h + 1, w + 1))
    for kernel, stride in ((kernel, stride), ((2, 2), (2, 2))):      # and the 2x2 fast path
        expected = pool2d_reference(x, kernel, stride, np.max)
        for training in (True, False):                # inference skips finding the winners
            pool = MaxPool2D(kernel, stride)
            np.testing.assert_array_equal(pool.forward(x, training), expected)
            assert (pool._cache is not None) == training


def test_relu_at_inference_gives_the_same_output_and_keeps_no_mask():
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 6)).astype(np.float32)
    y, mask = ops.relu_forward(x, training=False)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    assert mask is None
    y_train, mask = ops.relu_forward(x)
    np.testing.assert_array_equal(y_train, y)
    np.testing.assert_array_equal(mask, x > 0)


@given(pool_problems(), st.integers(0, 2**32 - 1))
def test_avgpool_matches_reference(problem, seed):
    n, c, h, w, kernel, stride = problem
    x = np.random.default_rng(seed).standard_normal((n, c, h, w))
    out = AvgPool2D(kernel, stride).forward(x)
    np.testing.assert_allclose(out, pool2d_reference(x, kernel, stride, np.mean), rtol=1e-12)


def test_maxpool_ties_send_the_gradient_to_the_first_maximum():
    x = np.ones((1, 1, 2, 2))
    pool = MaxPool2D(2)
    pool.forward(x, training=True)
    dx = pool.backward(np.full((1, 1, 1, 1), 3.0))
    np.testing.assert_array_equal(dx, [[[[3.0, 0.0], [0.0, 0.0]]]])
