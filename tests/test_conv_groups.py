"""Conv2D's dilation and groups (depthwise included): the readable reference against PyTorch
(F.conv2d, forward and every gradient, float64), the fast path against the reference (both of
its layouts), the layer's gradients against centred differences, the index maths (im2col's
adjoint, output sizes, padding="same" of a dilated kernel), the layer's arguments, config,
save/load and schema, and the raw implementation's fallback to minicnn.ops."""
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minicnn
from minicnn import implementation, ops
from minicnn import reference as R
from minicnn.nn import Conv2D, Flatten, layer_config, schema
from minicnn.nn.layers import padding_for
from minicnn.ops import conv as conv_ops
from minicnn.ops.im2col import col2im as fast_col2im
from minicnn.ops.im2col import col2im_nhwc, im2col_nhwc
from minicnn.ops.im2col import im2col as fast_im2col

SEEDS = st.integers(0, 2**32 - 1)


@st.composite
def grouped_problems(draw, max_size=7):
    """(N, C, H, W, F, kernel, stride, padding, dilation, groups): C and F multiples of groups,
    images at least as large as the dilated kernel's span less the padding."""
    groups = draw(st.integers(1, 3))
    c, f = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                             st.sampled_from(["same", "valid"])))
    pads = (0, 0) if isinstance(padding, str) else padding
    smallest = [max(1, d * (k - 1) + 1 - 2 * p) for k, d, p in zip(kernel, dilation, pads)]
    h, w = (draw(st.integers(low, max(low, max_size))) for low in smallest)
    return draw(st.integers(1, 2)), c, h, w, f, kernel, stride, padding, dilation, groups


def _arrays(problem, seed, bias=True):
    n, c, h, w, f, kernel, stride, padding, dilation, groups = problem
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    weight = rng.standard_normal((f, c // groups) + kernel)
    b = rng.standard_normal(f) if bias else None
    pad = padding_for(padding, kernel, stride, h, w, dilation)
    return rng, x, weight, b, pad


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


# ---- the maths: reference against PyTorch, fast against reference -------------------------------
@settings(max_examples=25)
@given(grouped_problems(), SEEDS, st.booleans())
def test_the_reference_matches_torch_forward_and_backward(problem, seed, bias):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    stride, dilation, groups = problem[6], problem[8], problem[9]
    rng, x, weight, b, pad = _arrays(problem, seed, bias)
    out, cache = R.conv2d_forward(x, weight, b, stride, pad, dilation, groups)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = R.conv2d_backward(dout, cache)
    tx, tw = (torch.tensor(a, requires_grad=True) for a in (x, weight))
    tb = torch.tensor(b, requires_grad=True) if bias else None
    (pt, pb), (pl, pr) = pad
    ty = F.conv2d(F.pad(tx, (pl, pr, pt, pb)), tw, tb, stride=stride, dilation=dilation,
                  groups=groups)
    ty.backward(torch.tensor(dout))
    _close(out, ty.detach().numpy())
    _close(dx, tx.grad.numpy())
    _close(dw, tw.grad.numpy())
    if bias:
        _close(db, tb.grad.numpy())
    else:
        assert db is None


@given(grouped_problems(), SEEDS, st.booleans(), st.booleans(), st.sampled_from([0, 10**9]))
def test_the_fast_path_matches_the_reference(problem, seed, bias, input_grad,
                                             channels_first_below):
    """Both layouts of minicnn.ops (channels-last from one channel on, or channels-first for
    any count), outputs and every gradient in float64; input_grad=False skips dx in both."""
    stride, dilation, groups = problem[6], problem[8], problem[9]
    rng, x, weight, b, pad = _arrays(problem, seed, bias)
    want, ref_cache = R.conv2d_forward(x, weight, b, stride, pad, dilation, groups)
    dout = rng.standard_normal(want.shape)
    with mock.patch.object(conv_ops, "CHANNELS_FIRST_BELOW", channels_first_below):
        out, cache = ops.conv2d_forward(x, weight, b, stride, pad, dilation, groups)
        grads = ops.conv2d_backward(dout, cache, input_grad)
    _close(out, want)
    for got, expected in zip(grads, R.conv2d_backward(dout, ref_cache, input_grad)):
        if expected is None:
            assert got is None
        else:
            assert got.shape == expected.shape
            _close(got, expected)


@pytest.mark.parametrize("maths", ["fast", "reference"])
@pytest.mark.parametrize("c, f, kernel, stride, padding, dilation, groups", [
    (6, 6, 3, 1, 1, 1, 6),                    # depthwise
    (6, 12, 3, 2, 2, 2, 6),                   # depthwise, two filters a channel, dilated
    (8, 4, (3, 2), (1, 2), (2, 1), (2, 3), 2),
    (9, 9, 3, 1, "same", 2, 3),
    (16, 16, 3, 1, 2, 2, 1),                  # channels-last, dilated
])
def test_the_layer_matches_torch(maths, c, f, kernel, stride, padding, dilation, groups):
    """Conv2D itself, under each implementation, against torch.nn.functional.conv2d: output,
    dx, dW and db in float64."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    layer = Conv2D(c, f, kernel, stride, padding, dtype=np.float64, rng=rng, dilation=dilation,
                   groups=groups)
    x = rng.standard_normal((2, c, 9, 8))
    tx, tw, tb = (torch.tensor(a, requires_grad=True)
                  for a in (x, layer.params["weight"], layer.params["bias"]))
    ty = torch.nn.functional.conv2d(tx, tw, tb, stride, padding, dilation, groups)
    dy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(dy))
    with minicnn.use(maths):
        _close(layer.forward(x, training=True), ty.detach().numpy())
        _close(layer.backward(dy), tx.grad.numpy())
    _close(layer.grads["weight"], tw.grad.numpy())
    _close(layer.grads["bias"], tb.grad.numpy())


def test_a_frozen_grouped_conv_computes_dx_only():
    """weight_grad=False (a frozen layer) gives dx alone, grouped or not, in both maths."""
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((2, 4, 6, 6)), rng.standard_normal((6, 2, 3, 3))
    for impl in (R, ops):
        out, cache = impl.conv2d_forward(x, weight, np.zeros(6), (1, 1), ((1, 1), (1, 1)),
                                         (2, 1), 2)
        dx, dw, db = impl.conv2d_backward(np.ones(out.shape), cache, True, weight_grad=False)
        assert dw is None and db is None and dx.shape == x.shape


@given(grouped_problems(max_size=6), SEEDS, st.booleans(),
       st.sampled_from(["fast", "reference"]))
def test_the_layer_gradients_match_centred_differences(problem, seed, bias, maths):
    n, c, h, w, f, kernel, stride, padding, dilation, groups = problem
    rng = np.random.default_rng(seed)
    layer = Conv2D(c, f, kernel, stride, padding, bias=bias, dtype=np.float64, rng=rng,
                   dilation=dilation, groups=groups)
    with minicnn.use(maths):
        errors = minicnn.gradcheck(layer, rng.standard_normal((n, c, h, w)), seed=seed)
    assert errors and all(e < 1e-6 for e in errors.values()), errors


# ---- the index maths ----------------------------------------------------------------------------
@given(grouped_problems(), SEEDS)
def test_dilated_im2col_layout_and_col2im_is_its_adjoint(problem, seed):
    """The reference's documented layout, cols[(c*KH + i)*KW + j, (n*OH + oh)*OW + ow] =
    xpad[n, c, sh*oh + dh*i, sw*ow + dw*j], and <im2col(x), d> == <x, col2im(d)> for the
    reference, the fast teaching layout and the channels-last twins."""
    n, c, h, w, _, kernel, stride, _, dilation, _ = problem
    rng, x, _, _, pad = _arrays(problem, seed)
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = (R.conv_output_size(size, k, s, *p, d)
              for size, k, s, p, d in zip((h, w), kernel, stride, pad, dilation))
    cols = R.im2col(x, kernel, stride, pad, dilation)
    assert cols.shape == (c * kh * kw, n * oh * ow)
    xpad = np.pad(x, ((0, 0), (0, 0)) + pad)
    ni, ci, i, j, r, s = np.indices((n, c, kh, kw, oh, ow))
    np.testing.assert_array_equal(cols[(ci * kh + i) * kw + j, (ni * oh + r) * ow + s],
                                  xpad[ni, ci, sh * r + dh * i, sw * s + dw * j])
    d = rng.standard_normal(cols.shape)
    assert np.isclose(np.vdot(cols, d), np.vdot(x, R.col2im(d, x.shape, kernel, stride, pad,
                                                            dilation)), rtol=1e-10, atol=1e-10)
    fast = fast_im2col(x, kernel, stride, pad, dilation=dilation)   # (N, K, OH*OW)
    _close(fast, cols.reshape(-1, n, oh * ow).transpose(1, 0, 2))
    d = rng.standard_normal(fast.shape)
    back = fast_col2im(d, x.shape, kernel, stride, pad, dilation=dilation)
    assert np.isclose(np.vdot(fast, d), np.vdot(x, back), rtol=1e-10, atol=1e-10)
    xpad_nhwc = np.ascontiguousarray(xpad.transpose(0, 2, 3, 1))
    rows = im2col_nhwc(xpad_nhwc, kernel, stride, dilation=dilation)
    d = rng.standard_normal(rows.shape)
    back = col2im_nhwc(d, np.zeros_like(xpad_nhwc), kernel, stride, dilation)
    assert np.isclose(np.vdot(rows, d), np.vdot(xpad_nhwc, back), rtol=1e-10, atol=1e-10)


def test_output_sizes_count_the_dilated_span():
    """A 3x3 kernel of dilation 2 spans 5 pixels, as PyTorch's formula
    (H + 2p - d*(k - 1) - 1) // s + 1 says; the two modules agree."""
    assert R.conv_output_size(7, 3, 1, 0, 0, 2) == 3
    assert R.conv_output_size(7, 3, 2, 1, 1, 3) == 2          # (7 + 2 - 7) // 2 + 1
    for size in range(1, 12):
        for k in range(1, 4):
            for s in range(1, 3):
                for d in range(1, 4):
                    assert (R.conv_output_size(size, k, s, 1, 2, d)
                            == ops.conv_output_size(size, k, s, 1, 2, d)
                            == (size + 3 - d * (k - 1) - 1) // s + 1)


@pytest.mark.parametrize("size, kernel, stride, dilation", [
    (7, 3, 1, 2), (8, 3, 1, 3), (6, 2, 1, 2), (9, 3, 2, 2), (5, 3, 2, 3), (10, (3, 2), 1, (2, 3))])
def test_same_padding_of_a_dilated_kernel(size, kernel, stride, dilation):
    """padding="same": ceil(H / stride) outputs whatever the dilation (TensorFlow's rule), and
    for stride 1 the very output of PyTorch's padding="same"."""
    rng = np.random.default_rng(0)
    layer = Conv2D(2, 3, kernel, stride, "same", dtype=np.float64, rng=rng, dilation=dilation)
    x = rng.standard_normal((1, 2, size, size + 1))
    y = layer.forward(x)
    assert y.shape[2:] == (-(-size // stride), -(-(size + 1) // stride))
    torch = pytest.importorskip("torch")
    if stride == 1:
        want = torch.nn.functional.conv2d(
            torch.tensor(x), torch.tensor(layer.params["weight"]),
            torch.tensor(layer.params["bias"]), padding="same", dilation=dilation)
        _close(y, want.numpy())


# ---- the layer --------------------------------------------------------------------------------
def test_the_weight_has_pytorch_shape_and_init_bound():
    """weight (out, in // groups, kh, kw), drawn from U(-1/sqrt(fan_in), ...) with fan_in =
    in // groups * kh * kw, as torch.nn.Conv2d; depthwise is groups == in_channels."""
    layer = Conv2D(8, 16, 3, groups=4, rng=np.random.default_rng(0))
    assert layer.params["weight"].shape == (16, 2, 3, 3)
    assert np.abs(layer.params["weight"]).max() <= 1 / np.sqrt(2 * 9)
    assert np.abs(layer.params["weight"]).max() > 0.9 / np.sqrt(2 * 9)
    depthwise = Conv2D(6, 12, 3, padding=1, groups=6, bias=False)
    assert depthwise.params["weight"].shape == (12, 1, 3, 3)
    x = np.random.default_rng(1).standard_normal((2, 6, 5, 5)).astype(np.float32)
    y = depthwise.forward(x)
    # filters 2g and 2g + 1 see channel g only
    one = np.zeros_like(x)
    one[:, 2] = x[:, 2]
    np.testing.assert_allclose(depthwise.forward(one)[:, 4:6], y[:, 4:6], rtol=1e-5, atol=1e-5)
    assert not depthwise.forward(one)[:, :4].any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(groups=3), "Conv2D groups must divide in_channels and out_channels, got groups=3 "
                     "for 4 -> 6 channels."),
    (dict(groups=4), "groups=4 for 4 -> 6 channels"),
    (dict(groups=0), "Conv2D groups must be a positive int, got 0."),
    (dict(dilation=0), "dilation must be at least 1, got 0."),
    (dict(dilation=(1, 2, 3)), "dilation must be an int or a pair of ints"),
])
def test_bad_arguments_are_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Conv2D(4, 6, 3, **kwargs)


def test_a_dilated_kernel_larger_than_the_input_is_one_sentence():
    with pytest.raises(ValueError, match=r"kernel \(3, 3\) \(dilation \(3, 3\)\) is larger"):
        Conv2D(1, 1, 3, dilation=3).forward(np.zeros((1, 1, 6, 6), np.float32))


def test_config_save_load_and_schema(tmp_path):
    """dilation and groups are saved (only when not 1: older files load as before), rebuilt
    by minicnn.load with the same outputs, and the schema computes the weight's shape and the
    output size from them."""
    rng = np.random.default_rng(0)
    model = minicnn.Sequential([Conv2D(4, 8, 3, 2, "same", rng=rng, dilation=(2, 1), groups=2),
                                Conv2D(8, 8, 3, rng=rng, groups=8), Flatten()])
    assert "dilation" not in layer_config(Conv2D(4, 8, 3)) and "groups" not in \
        layer_config(Conv2D(4, 8, 3))
    assert layer_config(model[0])["dilation"] == [2, 1] and layer_config(model[0])["groups"] == 2
    x = rng.standard_normal((2, 4, 9, 8)).astype(np.float32)
    model.save(tmp_path / "m.npz")
    loaded = minicnn.load(tmp_path / "m.npz")
    assert (loaded[0].dilation, loaded[0].groups, loaded[1].groups) == ((2, 1), 2, 8)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    specs = schema.check_model(layer_config(model))
    assert specs["param:0.weight"].shape == (8, 2, 3, 3)
    assert specs["param:1.weight"].shape == (8, 1, 3, 3)
    assert schema.output_shape(layer_config(model), (4, 9, 8))[0] == model.forward(x).shape[1:]


@pytest.mark.parametrize("config, message", [
    ({"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 4},
     "the top layer (Conv2D) has groups 4, which does not divide both its in_channels 4 and "
     "out_channels 6"),
    ({"in_channels": 4, "out_channels": 4, "kernel_size": 3, "groups": 0},
     "groups 0, which must be a whole number from 1"),
    ({"in_channels": 4, "out_channels": 4, "kernel_size": 3, "dilation": [1, 0]},
     "dilation [1, 0], which must be a whole number from 1"),
])
def test_the_schema_refuses_bad_groups_and_dilation_in_one_sentence(config, message):
    with pytest.raises(schema.SchemaError, match=message.replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        schema.check_model({"type": "Conv2D", **config})


def test_the_schema_refuses_a_dilated_kernel_larger_than_the_image():
    config = {"type": "Conv2D", "in_channels": 1, "out_channels": 1, "kernel_size": 3,
              "dilation": 3}
    schema.check_model(config)
    assert schema.output_shape(config, (1, 7, 7))[0] == (1, 1, 1)
    with pytest.raises(schema.SchemaError, match="larger than the padded input"):
        schema.output_shape(config, (1, 6, 7))


def test_the_fast_forward_of_a_valid_dilated_conv_reads_all_it_needs():
    """Sequential.needed_input crops what the output does not read; its rule is for dense
    kernels, so a dilated conv is left whole: the fast and reference outputs agree."""
    rng = np.random.default_rng(0)
    model = minicnn.Sequential([Conv2D(1, 2, 3, rng=rng, dilation=3, dtype=np.float64),
                                Conv2D(2, 2, 2, 2, rng=rng, dtype=np.float64), Flatten()])
    x = rng.standard_normal((2, 1, 12, 12))
    with minicnn.use("reference"):
        want = model.forward(x)
    np.testing.assert_allclose(model.forward(x), want, rtol=1e-12, atol=1e-12)


def test_summary_path_names_the_groups():
    assert conv_ops.conv2d_path(64, 3, 1, 1, groups=64) == \
        "64 groups of channels-first im2col; dx col2im"
    assert conv_ops.conv2d_path(64, 3, 1, 2, dilation=2) == "channels-last; dx col2im"
    assert conv_ops.conv2d_path(64, 3, 1, 1) == "channels-last; dx as conv"
    x = np.zeros((1, 16, 8, 8), np.float32)
    assert Conv2D(16, 32, 3, groups=2).path(x) == "fast: 2 groups of channels-last; dx by taps"


def test_a_dilated_or_grouped_conv_under_raw_runs_the_fast_ops(monkeypatch):
    """The CUDA conv kernel takes neither dilation nor groups: under use("raw") such a Conv2D
    runs minicnn.ops's (a plain one still runs the kernel), on the CuPy stand-in."""
    import fake_cupy
    from minicnn import backend
    monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
    cupy = fake_cupy.module
    calls = []

    def kernel_stand_in(x, w, b, stride, padding):
        calls.append(w.shape)
        return ops.conv2d_forward(x, w, b, stride, padding)
    monkeypatch.setattr(implementation._RAW, "conv2d_forward", kernel_stand_in)
    x = cupy.asarray(np.random.default_rng(0).standard_normal((2, 4, 7, 7)).astype(np.float32))
    with minicnn.use("raw"):
        for layer in (Conv2D(4, 4, 3, dilation=2), Conv2D(4, 4, 3, groups=4)):
            layer.to("cupy")
            y = layer.forward(x, training=True)
            assert layer.backward(cupy.ones(y.shape, dtype=np.float32)).shape == x.shape
            assert layer.path(x).startswith("fast: ")
        assert calls == []
        Conv2D(4, 2, 3).to("cupy").forward(x)
        assert calls == [(2, 4, 3, 3)] and Conv2D(4, 2, 3).path(x) == "raw: CUDA implicit GEMM"
