"""Sequential, training a small model, save/load, and the errors users see on bad input."""
import os
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minicnn
from minicnn.nn import optim
from minicnn.errors import CheckpointError
from minicnn.nn import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                            MaxPool2D, ReLU, Residual, Softmax)
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.nn.zoo import keras_tutorial, resnet_small


def small_resnet(rng):
    return minicnn.Sequential([
        Conv2D(3, 8, 3, padding="same", rng=rng), BatchNorm2D(8), ReLU(),
        Residual([Conv2D(8, 8, 3, padding=1, rng=rng), BatchNorm2D(8), ReLU(),
                  Conv2D(8, 8, 3, padding=1, rng=rng), BatchNorm2D(8)]), ReLU(),
        Residual([Conv2D(8, 16, 3, stride=2, padding=1, rng=rng), BatchNorm2D(16)],
                 shortcut=Conv2D(8, 16, 1, stride=2, rng=rng)), ReLU(),
        MaxPool2D(2), Flatten(), Dense(16 * 2 * 2, 16, rng=rng), BatchNorm1D(16), ReLU(),
        Dropout(0.1, rng=rng), Dense(16, 10, rng=rng)])


def test_small_model_overfits_64_random_images():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    model = small_resnet(rng)
    opt = optim.Adam(model, lr=3e-3)
    loss_fn = SoftmaxCrossEntropy()
    for _ in range(150):
        loss, d = loss_fn(model.forward(x, training=True), y)
        model.backward(d)
        opt.step()
    accuracy = (model.forward(x).argmax(axis=1) == y).mean()
    assert accuracy == 1.0, (accuracy, loss)


def test_keras_tutorial_training_step_lowers_the_loss():
    rng = np.random.default_rng(0)
    model = keras_tutorial(rng=rng)
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    loss_fn, opt = SoftmaxCrossEntropy(), optim.SGD(model, 0.05, momentum=0.9)
    losses = []
    for _ in range(10):
        loss, d = loss_fn(model.forward(x, training=True), y)
        losses.append(loss)
        model.backward(d)
        opt.step()
    assert losses[-1] < losses[0]
    assert all(p.dtype == np.float32 for p in model.params.values())


@pytest.mark.parametrize("name", ["keras-tutorial", "resnet-small"])
def test_the_presets_stay_float32_end_to_end(name):
    """No silent float64 anywhere in a training step or in inference: every layer's output and
    input gradient, the loss's gradient, the parameter gradients, the updated parameters and
    the optimiser's buffers (a float64 array in the middle would halve the speed of everything
    after it)."""
    model = minicnn.nn.zoo.build_model(name, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    layers = [model[i] for i in model.schedule()]
    h, seen = x, []
    for layer in layers:
        h = layer.forward(h, training=True)
        seen.append((f"{type(layer).__name__} output", h))
    _, d = SoftmaxCrossEntropy()(h, np.arange(4))
    seen.append(("dlogits", d))
    for layer in reversed(layers):
        d = layer.backward(d)
        seen.append((f"{type(layer).__name__} input gradient", d))
    opt = optim.AdamW(model, 1e-3)
    opt.step()
    seen += [(f"grad {k}", g) for k, g in model.grads.items()]
    seen += [(f"param {k}", p) for k, p in model.params.items()]
    seen += [(f"{k} {b}", v) for k, bufs in opt.state.items() for b, v in bufs.items()
             if hasattr(v, "dtype")]
    seen.append(("inference", model.forward(x)))
    wrong = [label for label, a in seen if a.dtype != np.float32]
    assert not wrong, wrong


def test_params_and_grads_are_live_and_named_like_pytorch():
    model = keras_tutorial(rng=np.random.default_rng(0))
    assert list(model.params)[:2] == ["0.weight", "0.bias"]
    assert model.params["0.weight"].shape == (32, 3, 3, 3)
    assert model.params["9.weight"].shape == (64, 1024)
    assert model.params.keys() == model.grads.keys()
    model[0].params["weight"][...] = 0.5
    assert np.all(model.params["0.weight"] == 0.5)
    x = np.zeros((2, 3, 32, 32), np.float32)
    model.forward(x, training=True)
    model.backward(np.ones((2, 10), np.float32))
    assert np.abs(model.grads["11.bias"]).sum() > 0
    model.zero_grad()
    assert all(np.all(g == 0) for g in model.grads.values())


def test_summary_table(capsys):
    model = keras_tutorial(rng=np.random.default_rng(0))
    lines = []
    model.summary((3, 32, 32), print_fn=lines.append)
    text = "\n".join(lines)
    assert "Conv2D" in text and "(N, 64, 4, 4)" in text.replace("'", "")
    assert "Total params: 122,570" in text
    with pytest.raises(ValueError, match="input_shape"):
        keras_tutorial().summary()


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    model = small_resnet(rng)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    model.forward(x, training=True)              # moves BatchNorm running statistics
    path = tmp_path / "model.npz"
    model.save(path, note="round trip")
    loaded = minicnn.load(path)
    np.testing.assert_array_equal(loaded.forward(x), model.forward(x))
    assert loaded.state.keys() == model.state.keys()
    assert repr(loaded) == repr(model)
    assert [f for f in os.listdir(tmp_path)] == ["model.npz"]     # no temporary left behind


def test_bad_model_files_raise_clear_errors(tmp_path):
    path = tmp_path / "model.npz"
    keras_tutorial(rng=np.random.default_rng(0)).save(path)
    data = path.read_bytes()
    cases = {
        "truncated.npz": data[: len(data) // 2],
        "corrupt.npz": data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:],
        "foreign.npz": b"just some text, not a model",
        "empty.npz": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=r"truncated or corrupt|not a minicnn file"):
            minicnn.load(tmp_path / name)
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a minicnn file"):
        minicnn.load(tmp_path / "plain.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        minicnn.load(tmp_path / "missing.npz")


def test_pickle_payload_is_never_unpickled(tmp_path):
    """A real object-dtype .npy whose unpickling creates a file: NumPy runs it when told
    allow_pickle=True (checked first, so the payload is live); minicnn refuses it unread."""
    import io
    import zipfile

    class Boom:
        def __reduce__(self):
            return open, (str(tmp_path / "pwned"), "w")
    payload = np.empty(1, dtype=object)
    payload[0] = Boom()
    npy = io.BytesIO()
    np.save(npy, payload, allow_pickle=True)
    np.load(io.BytesIO(npy.getvalue()), allow_pickle=True)[0].close()
    assert (tmp_path / "pwned").exists()
    (tmp_path / "pwned").unlink()
    path = tmp_path / "evil.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("__minicnn__.npy", npy.getvalue())
    with pytest.raises(CheckpointError, match="of dtype 'object'; minicnn files hold only numbers"):
        minicnn.load(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("layer,x,match", [
    (Conv2D(3, 4, 3), np.zeros((2, 3, 8), np.float32), r"Conv2D expects input of shape \(N, C, H, W\), got shape \(2, 3, 8\)"),
    (Conv2D(3, 4, 3), np.zeros((2, 5, 8, 8), np.float32), r"Conv2D expects 3 input channels, got shape \(2, 5, 8, 8\)"),
    (Conv2D(3, 4, 3), np.zeros((2, 3, 8, 8), np.float64), r"Conv2D has float32 parameters and expects float32 input, got float64"),
    (Conv2D(3, 4, 5), np.zeros((1, 3, 3, 3), np.float32), r"larger than the padded input"),
    (Dense(10, 2), np.zeros((4, 9), np.float32), r"Dense expects 10 input features"),
    (Dense(10, 2), np.zeros((4, 2, 5), np.float32), r"Dense expects input of shape \(N, features\)"),
    (BatchNorm2D(4), np.zeros((2, 3, 2, 2), np.float32), r"BatchNorm2D expects 4 input channels"),
    (MaxPool2D(2), np.zeros((2, 3), np.float32), r"MaxPool2D expects input of shape \(N, C, H, W\)"),
    (MaxPool2D(4), np.zeros((1, 1, 3, 3), np.float32), r"larger than the input"),
    (ReLU(), np.zeros((2, 3), np.int64), r"ReLU expects floating-point input"),
    (Softmax(), [[1.0, 2.0]], r"Softmax expects an array"),
])
def test_bad_input_raises_value_error_naming_the_layer(layer, x, match):
    with pytest.raises(ValueError, match=match):
        layer.forward(x)


@pytest.mark.parametrize("layer", [Conv2D(1, 1, 1), Dense(2, 2), MaxPool2D(2), ReLU(),
                                   BatchNorm2D(1), Dropout(0.5), Flatten(), Softmax()])
def test_backward_before_forward_is_a_clear_error(layer):
    with pytest.raises(RuntimeError, match=r"backward\(\) was called before forward\(x, training=True\)"):
        layer.backward(np.zeros((1, 1, 2, 2), np.float32))


@pytest.mark.parametrize("layer,x", [
    (Conv2D(3, 4, 3), np.zeros((4, 3, 8, 8), np.float32)),
    (MaxPool2D(2), np.zeros((2, 3, 8, 8), np.float32)),
    (MaxPool2D(3, 2), np.zeros((2, 3, 9, 9), np.float32)),
    (Dense(5, 2), np.zeros((3, 5), np.float32)),
    (ReLU(), np.zeros((2, 3, 4, 4), np.float32)),
    (Flatten(), np.zeros((2, 3, 4, 4), np.float32)),
    (BatchNorm2D(3), np.ones((2, 3, 4, 4), np.float32)),
    (Softmax(), np.zeros((2, 3), np.float32)),
    (Residual([ReLU()]), np.zeros((2, 3), np.float32)),
])
def test_backward_with_a_dy_of_the_wrong_shape_names_both_shapes(layer, x):
    y = layer.forward(x, training=True)
    wrong = np.zeros((y.shape[0] + 1,) + y.shape[1:], np.float32)
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}.backward expects dy of shape "
                                         rf"\({y.shape[0]}, .*got \({y.shape[0] + 1}, "):
        layer.backward(wrong)


def test_stepping_backward_by_hand_in_list_order_says_to_follow_the_schedule():
    model = minicnn.Sequential([Conv2D(1, 2, 3), ReLU(), MaxPool2D(2)])
    y = model.forward(np.ones((1, 1, 6, 6), np.float32), training=True)
    dy = np.ones_like(y)
    with pytest.raises(ValueError, match=r"reversed\(model.schedule\(\)\)"):
        for layer in reversed(list(model)):
            dy = layer.backward(dy)
    dy = np.ones_like(y)
    for i in reversed(model.schedule()):
        dy = model[i].backward(dy)
    np.testing.assert_array_equal(dy, model.backward(np.ones_like(y)))


@pytest.mark.parametrize("make,match", [
    (lambda: Conv2D(3, 4, 3, stride=0), "stride must be at least 1"),
    (lambda: Conv2D(3, 4, 3, padding=-1), "padding must be at least 0"),
    (lambda: Conv2D(3, 4, 0), "kernel_size must be at least 1"),
    (lambda: Conv2D(0, 4, 3), "Conv2D in_channels must be a positive int, got 0"),
    (lambda: Conv2D(3, 4, 3, padding="SAME"), "'same' or 'valid', got 'SAME'"),
    (lambda: MaxPool2D(2, 0), "stride must be at least 1"),
    (lambda: MaxPool2D(0), "kernel_size must be at least 1"),
    (lambda: Dense(0, 2), "Dense in_features must be a positive int"),
    (lambda: BatchNorm2D(2.5), "BatchNorm2D num_features must be a positive int"),
    (lambda: optim.SGD(Dense(2, 2), 0.1, momentum=-1), "momentum and weight_decay must be"),
    (lambda: optim.SGD(Dense(2, 2), float("inf")), "learning rate must be a number >= 0"),
])
def test_bad_constructor_arguments_are_one_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_ints_are_ints_and_an_optimizer_wants_the_model():
    layer = Conv2D(np.int64(3), 4, np.int64(3), stride=np.int32(1))
    assert layer.kernel_size == (3, 3) and type(layer.kernel_size[0]) is int
    with pytest.raises(TypeError, match="Adam takes the model .* got dict"):
        optim.Adam(layer.params)


def test_a_model_with_a_layer_of_ones_own_is_refused_at_save_time(tmp_path):
    class Scale(ReLU):
        pass
    model = minicnn.Sequential([Flatten(), Scale(), Dense(4, 2)])
    with pytest.raises(ValueError, match="Scale is not one of minicnn's layers"):
        model.save(tmp_path / "custom.npz")
    assert not (tmp_path / "custom.npz").exists()


def test_inference_forward_keeps_no_cache():
    layer = Conv2D(1, 1, 1)
    layer.forward(np.zeros((1, 1, 2, 2), np.float32), training=True)
    layer.forward(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(RuntimeError):
        layer.backward(np.zeros((1, 1, 2, 2), np.float32))


def test_loss_rejects_bad_labels():
    loss = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        loss(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="integer labels"):
        loss(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="empty batch"):
        loss(np.zeros((0, 3)), np.zeros(0, np.int64))


@pytest.mark.parametrize("build,shape,first_layer_skips", [
    (lambda rng: keras_tutorial(rng=rng), (4, 3, 32, 32), True),
    (small_resnet, (4, 3, 8, 8), True),
    (lambda rng: minicnn.Sequential([Flatten(), Dense(192, 10, rng=rng)]), (4, 3, 8, 8), True),
])
def test_backward_without_input_grad_gives_the_same_parameter_gradients(build, shape,
                                                                        first_layer_skips):
    rng = np.random.default_rng(0)
    model = build(rng)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal((4, 10)).astype(np.float32)
    model.forward(x, training=True)
    assert model.backward(dy).shape == x.shape
    full = {k: g.copy() for k, g in model.grads.items()}
    skipped = model.backward(dy, input_grad=False)
    assert (skipped is None) == first_layer_skips      # Flatten first: skipped, no params
    for k, g in model.grads.items():
        np.testing.assert_array_equal(g, full[k])


def _run(model, x, dy, crop):
    """Forward (training), backward with the input gradient; as Sequential does it, or on the
    whole input (needed_input patched to keep everything)."""
    whole = (lambda self, h, w: (h, w)) if not crop else minicnn.Sequential.needed_input
    with mock.patch.object(minicnn.Sequential, "needed_input", whole):
        y = model.forward(x, training=True)
        dx = model.backward(dy)
    return y, dx, {k: g.copy() for k, g in model.grads.items()}


def _assert_same_step(model, x, dy):
    y, dx, grads = _run(model, x, dy, crop=True)
    y_whole, dx_whole, grads_whole = _run(model, x, dy, crop=False)
    np.testing.assert_allclose(y, y_whole, rtol=1e-12, atol=1e-12)
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx, dx_whole, rtol=1e-12, atol=1e-12)
    for k in grads:
        np.testing.assert_allclose(grads[k], grads_whole[k], rtol=1e-12, atol=1e-12)
    return dx


def test_keras_tutorial_reads_only_30x30_of_a_32x32_image():
    """Its second max-pool never reads the last row and column of the 13x13 map before it,
    so the last 2 rows and columns of the image never reach the output: forward leaves them
    out, with the same output and gradients, and their input gradient is 0."""
    rng = np.random.default_rng(0)
    model = keras_tutorial(rng=rng, dtype=np.float64)
    assert model.needed_input(32, 32) == (30, 30)
    assert model.needed_input(33, 35) == (30, 34)
    assert resnet_small(rng=rng).needed_input(32, 32) == (32, 32)     # padded convs, BatchNorm
    x, dy = rng.standard_normal((3, 3, 32, 32)), rng.standard_normal((3, 10))
    dx = _assert_same_step(model, x, dy)
    assert not dx[:, :, 30:].any() and not dx[:, :, :, 30:].any()
    assert dx[:, :, 28:30, :30].any() and dx[:, :, :30, 28:30].any()  # the cut is right there
    model.forward(x, training=True)
    assert model[0]._cache[1][2].shape == (3, 3, 30, 30)               # the first conv's input


@st.composite
def _chains(draw):
    """(model, x): a Sequential of unpadded convs, pools and ReLUs (Sequential.needed_input's
    rules), maybe with a padded conv or a BatchNorm among them, then Flatten and Dense; and an
    input for it."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c0, h, w = draw(st.integers(1, 3)), draw(st.integers(3, 14)), draw(st.integers(3, 14))
    layers, c, size = [], c0, (h, w)
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "conv", "max", "max", "avg", "relu", "padded", "bn"]))
        k, s = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        if kind in ("conv", "max", "avg") and min(size) < k:
            continue
        if kind == "conv":
            f, s = draw(st.integers(1, 3)), min(s, 2)
            layers.append(Conv2D(c, f, k, stride=s, dtype=np.float64, rng=rng))
            c = f
        elif kind == "padded":
            layers.append(Conv2D(c, c, 3, padding=1, dtype=np.float64, rng=rng))
            k = s = 1                                     # the size stays
        elif kind in ("max", "avg"):
            layers.append((MaxPool2D if kind == "max" else AvgPool2D)(k, s))
        else:
            layers.append(ReLU() if kind == "relu" else BatchNorm2D(c, dtype=np.float64))
            k = s = 1
        size = tuple((d - k) // s + 1 for d in size)
    layers += [Flatten(), Dense(c * size[0] * size[1], 4, dtype=np.float64, rng=rng)]
    return minicnn.Sequential(layers), rng.standard_normal((2, c0, h, w))


@settings(deadline=None)
@given(_chains(), st.integers(0, 2**32 - 1))
def test_leaving_out_the_input_the_output_never_reads_changes_nothing(chain, seed):
    """Output, parameter gradients and input gradient (zeros where the input is left out)."""
    model, x = chain
    h, w = model.needed_input(*x.shape[2:])
    assert 1 <= h <= x.shape[2] and 1 <= w <= x.shape[3]
    dx = _assert_same_step(model, x, np.random.default_rng(seed).standard_normal((2, 4)))
    assert not dx[:, :, h:].any() and not dx[:, :, :, w:].any()


def test_no_input_is_left_out_before_a_layer_that_sees_every_pixel():
    """A pool after BatchNorm (whose statistics see every pixel) or after a padded conv (whose
    border would move) reads less than all of its input, but nothing is cut: the output then
    depends on all of it. A pool before BatchNorm still gets its input cut."""
    rng = np.random.default_rng(1)
    for middle in (BatchNorm2D(2, dtype=np.float64),
                   Conv2D(2, 2, 3, padding=1, dtype=np.float64, rng=rng)):
        model = minicnn.Sequential([Conv2D(1, 2, 2, dtype=np.float64, rng=rng), middle,
                                    MaxPool2D(2), Flatten(),
                                    Dense(2 * 3 * 3, 4, dtype=np.float64, rng=rng)])
        assert model.needed_input(8, 8) == (8, 8)         # the pool alone would need 6 of 7
        _assert_same_step(model, rng.standard_normal((2, 1, 8, 8)), rng.standard_normal((2, 4)))
    model = minicnn.Sequential([Conv2D(1, 2, 2, dtype=np.float64, rng=rng), MaxPool2D(2),
                                BatchNorm2D(2, dtype=np.float64), Flatten(),
                                Dense(2 * 3 * 3, 4, dtype=np.float64, rng=rng)])
    assert model.needed_input(8, 8) == (7, 7)             # the pool comes first: cut before it
    _assert_same_step(model, rng.standard_normal((2, 1, 8, 8)), rng.standard_normal((2, 4)))


def test_bad_input_to_a_cropping_model_is_reported_with_the_shape_given():
    model = keras_tutorial(rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"expects 3 input channels, got shape \(2, 1, 32, 32\)"):
        model.forward(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="expects float32 input, got float64"):
        model.forward(np.zeros((2, 3, 32, 32)))
