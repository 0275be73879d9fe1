"""python -m minicnn.precision: one training step in float64, float32, float16 and bfloat16,
each layer's error against float64."""
import numpy as np
import pytest

from minicnn import precision
from minicnn.backend import tf32_matmuls
from minicnn.errors import BackendError
from minicnn.nn.containers import Sequential
from minicnn.nn.layers import BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU

pytest.importorskip("ml_dtypes")


def _tiny(rng):
    return Sequential([Conv2D(3, 4, 3, rng=rng, dtype=np.float64), BatchNorm2D(4, dtype=np.float64),
                       ReLU(), MaxPool2D(2), Flatten(), Dense(4 * 3 * 3, 5, rng=rng,
                                                              dtype=np.float64)])


def test_the_ladder_has_a_row_a_layer_and_float32_far_below_float16():
    rng = np.random.default_rng(0)
    result = precision.ladder(_tiny(rng), rng.standard_normal((6, 3, 8, 8)),
                              rng.integers(0, 5, 6))
    assert result["layers"] == ["0 Conv2D", "1 BatchNorm2D", "2 ReLU", "3 MaxPool2D",
                                "4 Flatten", "5 Dense"]
    assert result["grad_of"] == ["params", "params", "input", "input", "input", "params"]
    f32, f16, bf16 = (result["rungs"][p] for p in ("float32", "float16", "bfloat16"))
    for what in ("output", "gradient"):
        for e32, e16, ebf in zip(f32[what], f16[what], bf16[what]):
            assert 0 < e32 < e16 / 100, what     # float32: 24 bits; float16: 11
            assert e16 < 0.1 and ebf < 0.5, what
    assert f32["output"][0] < 1e-6 and 1e-5 < f16["output"][0] < 1e-2
    assert (f32["scale"], f16["scale"], bf16["scale"]) == (1.0, 2.0 ** 15, 2.0 ** 15)
    table = precision.format_table(result)
    assert "5 Dense" in table and "loss scale: float32 1, float16 32768" in table


def test_a_scale_that_overflows_is_halved_until_the_gradients_fit(monkeypatch):
    """The 16-bit rungs start at INITIAL_SCALE and halve it while a gradient is inf, as the
    loss scaler's skipped steps would."""
    monkeypatch.setattr(precision, "INITIAL_SCALE", 2.0 ** 40)
    rng = np.random.default_rng(1)
    with np.errstate(over="ignore", invalid="ignore"):
        result = precision.ladder(_tiny(rng), rng.standard_normal((6, 3, 8, 8)),
                                  rng.integers(0, 5, 6), precisions=("float16",))
    scale = result["rungs"]["float16"]["scale"]
    assert scale < 2.0 ** 40 and np.log2(scale) == int(np.log2(scale))
    assert max(result["rungs"]["float16"]["gradient"]) < 0.1


def test_the_command_prints_the_table(capsys):
    assert precision.main(["--model", "keras-tutorial", "--batch", "2", "--loss-scale", "8"]) == 0
    out = capsys.readouterr().out
    assert "precision ladder: keras-tutorial" in out and "11 Dense" in out
    assert "bfloat16" in out and "loss scale: float32 1, float16 8, bfloat16 8" in out


def test_the_command_refuses_an_unknown_model_and_a_scale_below_zero(capsys):
    assert precision.main(["--model", "vgg"]) == 2
    assert "Unknown model 'vgg'" in capsys.readouterr().err
    assert precision.main(["--loss-scale", "-1"]) == 2
    captured = capsys.readouterr()
    assert "--loss-scale must be a positive number" in captured.err and captured.out == ""


def test_tf32_is_for_gpu_arrays_only():
    with pytest.raises(BackendError, match="TF32 is a GPU format"):
        with tf32_matmuls(np.zeros(1, np.float32)):
            pass
