"""minicnn.use("reference" | "fast" | "raw"): what a student stepping through a Sequential sees,
what summary(paths=True) says, and that a whole model gives the same outputs and gradients on
either implementation of the maths."""
import numpy as np
import pytest

import minicnn
from minicnn.nn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, SoftmaxCrossEntropy
from minicnn.nn.zoo import keras_tutorial, resnet_small


def _record_input_shapes(model):
    """[(layer index, input shape), ...] in the order the layers run, recorded as they run."""
    seen = []
    for i, layer in enumerate(model):
        forward = layer.forward

        def spy(x, training=False, i=i, forward=forward):
            seen.append((i, tuple(x.shape)))
            return forward(x, training)
        layer.forward = spy
    return seen


def _summary_shapes(model, input_shape):
    lines = []
    model.summary(input_shape, print_fn=lines.append)
    rows = lines[2:2 + len(model)]
    return [tuple(int(v) for v in row.split("(", 1)[1].split(")")[0].split(", ")[1:])
            for row in rows]


def test_reference_runs_the_layers_as_written_with_the_shapes_summary_prints():
    model = keras_tutorial(rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    printed = _summary_shapes(model, (3, 32, 32))         # each layer's output shape
    seen = _record_input_shapes(model)
    with minicnn.use("reference"):
        model.forward(x, training=True)
    assert [i for i, _ in seen] == list(range(len(model)))                 # in list order
    assert [shape[1:] for _, shape in seen] == [(3, 32, 32)] + printed[:-1]  # no cropping
    seen.clear()
    model.forward(x, training=True)                      # the fast path: reordered, cropped
    order = [i for i, _ in seen]
    assert order != list(range(len(model))) and sorted(order) == list(range(len(model)))
    assert seen[0][1] == (2, 3, 30, 30)


@pytest.mark.parametrize("build", [keras_tutorial, resnet_small], ids=["keras", "resnet"])
def test_a_whole_model_gives_the_same_step_on_reference_and_fast(build):
    model = build(rng=np.random.default_rng(0), dtype=np.float64)
    rng = np.random.default_rng(1)
    x, labels = rng.standard_normal((4, 3, 32, 32)), rng.integers(0, 10, 4)
    results = {}
    for name in ("reference", "fast"):
        with minicnn.use(name):
            loss, dlogits = SoftmaxCrossEntropy(0.1)(model.forward(x, training=True), labels)
            dx = model.backward(dlogits)
            results[name] = loss, dx, {k: g.copy() for k, g in model.grads.items()}
    (loss_r, dx_r, grads_r), (loss_f, dx_f, grads_f) = results["reference"], results["fast"]
    assert loss_f == pytest.approx(loss_r, rel=1e-12)
    np.testing.assert_allclose(dx_f, dx_r, rtol=1e-9, atol=1e-12)
    for key in grads_r:
        np.testing.assert_allclose(grads_f[key], grads_r[key], rtol=1e-9, atol=1e-12,
                                   err_msg=key)


def test_backward_follows_the_forward_that_ran_even_if_the_setting_changed():
    model = minicnn.Sequential([Conv2D(3, 4, 3, dtype=np.float64), ReLU(), MaxPool2D(2),
                                Flatten(), Dense(4 * 3 * 3, 2, dtype=np.float64)])
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    with minicnn.use("reference"):
        y = model.forward(x, training=True)
    dx_mixed = model.backward(np.ones_like(y))            # fast setting, reference caches
    with minicnn.use("reference"):
        model.forward(x, training=True)
        dx = model.backward(np.ones_like(y))
    np.testing.assert_allclose(dx_mixed, dx, rtol=1e-12)


def test_summary_paths_names_each_layers_path_and_what_the_fast_forward_changes():
    model = keras_tutorial(rng=np.random.default_rng(0))
    lines = []
    model.summary((3, 32, 32), print_fn=lines.append, paths=True)
    text = "\n".join(lines)
    assert "Path" in lines[0]
    assert "fast: channels-first im2col; dx col2im" in text          # the RGB first layer
    assert "fast: channels-last; dx by taps" in text                  # valid 3x3, 32+ channels
    assert "fast: 2x2 halving steps" in text
    assert "ReLU after the MaxPool2D at layers 1-2, 4-5" in text
    assert "top-left 30x30 of each 32x32 input" in text
    lines.clear()
    with minicnn.use("reference"):
        model.summary((3, 32, 32), print_fn=lines.append, paths=True)
    rows = lines[2:2 + len(model)]
    assert all(row.rstrip().endswith("reference") for row in rows)
    assert not any("forward" in line for line in lines)              # no reordering, no crop
    lines.clear()
    model.summary((3, 32, 32), print_fn=lines.append)                 # the default: no column
    assert "Path" not in lines[0] and "fast:" not in "\n".join(lines)
