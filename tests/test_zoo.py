"""The presets (minicnn.nn.zoo): their sizes at 32x32 are the ones the published results were
trained with, their Dense and pooling layers follow image_size, the Keras dropout net has the
tutorial's layer list, and a seeded build is reproducible."""
import numpy as np
import pytest

import minicnn
from minicnn.nn import (Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, SoftmaxCrossEntropy,
                        layer_config, zoo)

SIZES = [(32, 32), (64, 48), (150, 150)]


def _count(model):
    return sum(int(p.size) for p in model.params.values())


@pytest.mark.parametrize("name, params", [
    ("keras-tutorial", 122_570), ("resnet-small", 408_746), ("keras-dropout", 361_034)])
def test_parameter_counts_at_32x32(name, params):
    """keras-tutorial and resnet-small as before image_size existed (README's table)."""
    assert _count(zoo.build_model(name, rng=np.random.default_rng(0))) == params
    assert _count(zoo.build_model(name, rng=np.random.default_rng(0), image_size=32)) == params


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_forward_shapes_at_each_image_size(name, size):
    model = zoo.build_model(name, num_classes=7, rng=np.random.default_rng(0), image_size=size)
    x = np.random.default_rng(1).standard_normal((2, 3) + size).astype(np.float32)
    for implementation in ("fast", "reference"):
        with minicnn.use(implementation):
            y = model.forward(x)
        assert y.shape == (2, 7) and y.dtype == np.float32 and np.all(np.isfinite(y))


@pytest.mark.parametrize("name, size, dense_in", [
    ("keras-tutorial", (32, 32), 64 * 4 * 4), ("keras-tutorial", (64, 48), 64 * 12 * 8),
    ("keras-tutorial", (150, 150), 64 * 34 * 34),
    ("keras-dropout", (32, 32), 128 * 2 * 2), ("keras-dropout", (64, 48), 128 * 6 * 4),
    ("keras-dropout", (150, 150), 128 * 17 * 17)])
def test_the_flatten_size_follows_the_image_size(name, size, dense_in):
    """3x3 valid convs take 2 off a side, 2x2 pools halve it rounding down:
    keras-tutorial 64 -> 62 -> 31 -> 29 -> 14 -> 12; keras-dropout 150 -> 148 -> 74 -> 72 ->
    36 -> 34 -> 17."""
    model = zoo.build_model(name, rng=np.random.default_rng(0), image_size=size)
    first_dense = next(layer for layer in model if isinstance(layer, Dense))
    assert first_dense.in_features == dense_in


@pytest.mark.parametrize("size, window", [((32, 32), [4, 4]), ((64, 48), [8, 6]),
                                          ((150, 150), [18, 18]), ((8, 15), [1, 1])])
def test_resnet_small_ends_in_a_global_max_pool_of_its_last_map(size, window):
    """At 32x32 the MaxPool2D(4) it always had (same weights, same outputs: the trained results
    stand); at other sizes a window of the whole last map, H//8 x W//8."""
    model = zoo.build_model("resnet-small", rng=np.random.default_rng(0), image_size=size)
    assert layer_config(model[-3]) == {"type": "MaxPool2D", "kernel_size": window,
                                       "stride": window}
    assert isinstance(model[-2], Flatten) and model[-1].in_features == 128


def test_the_keras_dropout_layer_list():
    """Conv 32 - MaxPool - Conv 64 - MaxPool - Conv 128 - MaxPool - Flatten - Dense 512 -
    Dropout(0.5) - Dense, valid 3x3 convs with ReLU, 2x2 pools."""
    model = zoo.build_model("keras-dropout", num_classes=2, rng=np.random.default_rng(0),
                            image_size=(150, 150))
    assert [type(layer) for layer in model] == [
        Conv2D, ReLU, MaxPool2D, Conv2D, ReLU, MaxPool2D, Conv2D, ReLU, MaxPool2D,
        Flatten, Dense, ReLU, Dropout, Dense]
    convs = [layer for layer in model if isinstance(layer, Conv2D)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 32), (32, 64), (64, 128)]
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) for c in convs)
    assert all(layer.kernel_size == layer.stride == (2, 2) and layer.padding == (0, 0)
               for layer in model if isinstance(layer, MaxPool2D))
    assert (model[10].in_features, model[10].out_features) == (128 * 17 * 17, 512)
    assert model[12].p == 0.5
    assert (model[13].in_features, model[13].out_features) == (512, 2)
    assert _count(zoo.keras_dropout(2, image_size=150, widths=(16, 32, 64))) == (
        448 + 4_640 + 18_496 + (64 * 17 * 17 + 1) * 512 + 513 * 2)    # the ML Practicum's sizes


def test_a_seeded_build_is_reproducible_dropout_masks_included():
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    outputs = []
    for _ in range(2):
        model = zoo.build_model("keras-dropout", rng=np.random.default_rng(5))
        outputs.append((model.params, model.forward(x, training=True)))
    (params_a, y_a), (params_b, y_b) = outputs
    assert all(np.array_equal(params_a[k], params_b[k]) for k in params_a)
    np.testing.assert_array_equal(y_a, y_b)        # the same units dropped
    other = zoo.build_model("keras-dropout", rng=np.random.default_rng(6))
    assert not np.array_equal(other.forward(x, training=True), y_a)


@pytest.mark.parametrize("name", list(zoo.MODELS))
def test_a_training_step_at_150x150(name):
    model = zoo.build_model(name, num_classes=2, rng=np.random.default_rng(0),
                            image_size=(150, 150))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 150, 150)).astype(np.float32)
    loss, dlogits = SoftmaxCrossEntropy()(model.forward(x, training=True), np.array([0, 1]))
    assert np.isfinite(loss)
    model.backward(dlogits)
    for key, grad in model.grads.items():
        assert grad.dtype == np.float32 and np.all(np.isfinite(grad)), key
        assert np.any(grad != 0), key


@pytest.mark.parametrize("name, smallest", [
    ("keras-tutorial", 18), ("resnet-small", 8), ("keras-dropout", 22)])
def test_too_small_an_image_is_one_sentence(name, smallest):
    zoo.build_model(name, rng=np.random.default_rng(0), image_size=smallest)
    with pytest.raises(ValueError, match=f"{name} needs larger images than "
                                         f"{smallest - 1}x{smallest}"):
        zoo.build_model(name, image_size=(smallest - 1, smallest))
    with pytest.raises(ValueError, match="image_size must be"):
        zoo.build_model(name, image_size=(0, 32))


def test_unknown_model_names_the_presets():
    with pytest.raises(ValueError, match="keras-tutorial, resnet-small, keras-dropout"):
        zoo.build_model("vgg")
