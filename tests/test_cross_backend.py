"""One training step of the Keras-tutorial CNN on NumPy and on CuPy, from the same weights and batch:
every activation, every gradient and the updated weights compared, with the max abs/rel error
of each printed (pytest -s). Then checkpoints across devices: a model trained on the GPU is
saved as NumPy arrays and loads on a CPU-only machine.
"""
import contextlib
import copy

import fake_cupy
import numpy as np
import pytest

import minicnn
from minicnn.nn import optim
from minicnn.backend import array_module, to_numpy
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.nn.zoo import keras_tutorial

RTOL, ATOL = 1e-3, 1e-5        # float32 on two BLAS libraries, relative to each tensor's scale


def training_step(model, x, labels):
    """-> {name: array}: each layer's output and input gradient, the loss gradient, the
    parameter gradients and the parameters after one SGD step, all as NumPy arrays.
    """
    record = {}
    h = x
    for i, layer in enumerate(model):
        h = layer.forward(h, training=True)
        record[f"activation {i} {type(layer).__name__}"] = h
    loss, d = SoftmaxCrossEntropy()(h, labels)
    record["dlogits"] = d
    for i in reversed(range(len(model))):
        d = model[i].backward(d)
        record[f"gradient into {i} {type(model[i]).__name__}"] = d
    record.update({f"grad {k}": g.copy() for k, g in model.grads.items()})
    optim.SGD(model, lr=0.1, momentum=0.9).step()
    record.update({f"param {k}": p for k, p in model.params.items()})
    return loss, {k: to_numpy(v) for k, v in record.items()}


def compare(cpu, gpu):
    """-> [(name, max abs error, max rel error)], asserting each within tolerance."""
    rows = []
    for name, expected in cpu.items():
        got = gpu[name]
        err = np.abs(got.astype(np.float64) - expected)
        scale = max(float(np.abs(expected).max()), 1e-12)
        rel = float(err.max() / scale)
        rows.append((name, float(err.max()), rel))
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * max(scale, 1.0),
                                   err_msg=name)
    return rows


@pytest.mark.parametrize("implementation", ["fast", "raw"])
def test_one_keras_tutorial_training_step_agrees_on_numpy_and_cupy(gpu_xp, implementation,
                                                                   request):
    """On a GPU, batch 16; on fake_cupy, whose raw kernels run on the CUDA emulation (about 5 s
    an image), batch 2."""
    cupy = gpu_xp
    fake = cupy is fake_cupy.module
    launch = (request.getfixturevalue("emulator").active() if fake and implementation == "raw"
              else contextlib.nullcontext())
    batch = 2 if fake else 16
    rng = np.random.default_rng(0)
    cpu_model = keras_tutorial(rng=rng)
    gpu_model = copy.deepcopy(cpu_model).to("cupy")
    x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, batch)

    cpu_loss, cpu = training_step(cpu_model, x, labels)
    with minicnn.use(implementation), launch:
        gpu_loss, gpu = training_step(gpu_model, cupy.asarray(x), cupy.asarray(labels))

    assert set(gpu) == set(cpu)
    assert float(gpu_loss) == pytest.approx(float(cpu_loss), rel=1e-5)
    rows = compare(cpu, gpu)
    print(f"\nNumPy vs {cupy.__name__} ({implementation}), one training step of keras_tutorial, "
          f"batch {batch}{' (fake_cupy)' if fake else ''}:")
    print(f"{'tensor':<44}{'max abs err':>14}{'max rel err':>14}")
    for name, abs_err, rel_err in rows:
        print(f"{name:<44}{abs_err:>14.2e}{rel_err:>14.2e}")


def test_a_model_saved_on_any_device_loads_as_numpy_and_moves_back(xp, tmp_path):
    """minicnn's files hold NumPy arrays whatever device trained the model, so a checkpoint from
    a GPU run loads on a CPU-only machine; the loaded model can then be moved with .to().
    """
    rng = np.random.default_rng(5)
    model = keras_tutorial(rng=rng).to(xp.__name__)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, 4)
    _, d = SoftmaxCrossEntropy()(model.forward(xp.asarray(x), training=True), xp.asarray(labels))
    model.backward(d)
    optim.Adam(model, lr=1e-3).step()
    expected = model.forward(xp.asarray(x))

    path = tmp_path / "model.npz"
    model.save(path)
    loaded = minicnn.load(path)                       # on the CPU, whatever saved it
    for key, p in model.params.items():
        assert type(loaded.params[key]) is np.ndarray
        np.testing.assert_array_equal(loaded.params[key], to_numpy(p))
    np.testing.assert_allclose(loaded.forward(x), to_numpy(expected), rtol=1e-4, atol=1e-5)

    loaded.to(xp.__name__)
    assert all(array_module(p) is xp for p in loaded.params.values())
    np.testing.assert_allclose(to_numpy(loaded.forward(xp.asarray(x))), to_numpy(expected),
                               rtol=1e-6, atol=1e-7)
