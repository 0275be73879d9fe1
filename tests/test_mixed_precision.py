"""Mixed precision (minicnn.mixed_precision): the policy, the casting, the loss scaler's rule,
float32 master weights, fit and the training tool under mixed_float16 and mixed_bfloat16."""
import json

import numpy as np
import pytest

import minicnn
from minicnn import dtype_policy, mixed_precision
from minicnn.errors import UsageError
from minicnn.mixed_precision import LossScaleOptimizer, ScaledLoss, set_global_policy
from minicnn.nn import optim
from minicnn.nn.layers import BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU
from minicnn.nn.containers import Sequential
from minicnn.nn.losses import SoftmaxCrossEntropy
from minicnn.ops import gemm
from minicnn.parallel import processes
from minicnn.training import trainer as train
from minicnn.training.checkpoint import load_checkpoint
from test_train import _train_args as _args

try:                            # the test extra installs it; without it, its tests skip
    from ml_dtypes import bfloat16 as BFLOAT16
except ImportError:
    BFLOAT16 = None
needs_bfloat16 = pytest.mark.skipif(BFLOAT16 is None, reason="ml_dtypes is not installed")


def _net(seed=0, batchnorm=False):
    """A small conv net for (N, 3, 8, 8) images, 3 classes."""
    rng = np.random.default_rng(seed)
    layers = [Conv2D(3, 4, 3, rng=rng)]
    layers += [BatchNorm2D(4)] if batchnorm else []
    return Sequential(layers + [ReLU(), MaxPool2D(2), Flatten(), Dense(4 * 3 * 3, 3, rng=rng)])


def _blobs(n=96, seed=0):
    """Images whose class is the colour channel that is bright: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32) * 0.5
    x[np.arange(n), y] += 1.5
    return x, y


# ---- the policy ------------------------------------------------------------------------------
def test_policy_names_dtypes_and_scope():
    assert mixed_precision.global_policy().name == "float32"
    with set_global_policy("mixed_float16") as policy:
        assert mixed_precision.global_policy() is policy
        assert (policy.compute_dtype, policy.variable_dtype) == ("float16", "float32")
    assert mixed_precision.global_policy().name == "float32"       # the block undoes it
    assert mixed_precision.Policy("mixed_bfloat16").compute_dtype == "bfloat16"
    with pytest.raises(UsageError, match="mixed_float16"):
        set_global_policy("float16_mixed")


def test_bfloat16_without_ml_dtypes_says_what_to_install(monkeypatch):
    monkeypatch.setattr(dtype_policy, "BFLOAT16", None)
    with pytest.raises(UsageError, match=r'pip install "minicnn\[precision\]"'):
        set_global_policy("mixed_bfloat16")


# ---- the casting -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy, low", [("mixed_float16", np.float16),
                                         pytest.param("mixed_bfloat16", BFLOAT16,
                                                      marks=needs_bfloat16)])
def test_layers_compute_in_the_low_precision_and_the_loss_in_float32(policy, low):
    model = _net(batchnorm=True)
    x, y = _blobs(8)
    with set_global_policy(policy):
        logits = model.forward(x, training=True)
        loss, dlogits = SoftmaxCrossEntropy()(logits, y)
        model.backward(dlogits)
    conv, bn, relu = model[0], model[1], model[2]
    assert conv._cache[1][2].dtype == low            # the conv's kept input, in compute dtype
    assert relu._cache[1].dtype == bool and logits.dtype == low
    assert bn._cache[1][0].dtype == np.float32       # batch norm in float32 ...
    assert bn.state["running_mean"].dtype == np.float32
    assert loss.dtype == np.float32 and dlogits.dtype == np.float32      # ... and the loss
    for name, p in model.params.items():             # the weights and their grads: float32
        assert p.dtype == np.float32 and model.grads[name].dtype == np.float32, name
        assert np.abs(model.grads[name]).sum() > 0, name


def test_without_a_mixed_policy_nothing_is_cast():
    model = _net()
    model.forward(_blobs(4)[0], training=True)
    assert model[0]._cache[1][2].dtype == np.float32
    with pytest.raises(ValueError, match="float32 parameters and expects float32 input"):
        model.forward(_blobs(4)[0].astype(np.float16))


def test_float16_gemm_equals_numpys_float16_loop():
    """The fast path's float16 GEMM (float32 BLAS, rounded once) against NumPy's own float16
    matmul (float32 sums in a loop): equal up to the sums' order, at most an ulp apart."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 40, 70)).astype(np.float16)
    b = rng.standard_normal((70, 30)).astype(np.float16)
    fast, loop = gemm.matmul(a, b), np.matmul(a, b)
    assert fast.dtype == np.float16
    ulp = np.spacing(np.abs(loop).astype(np.float16)).astype(np.float32)
    assert (np.abs(fast.astype(np.float32) - loop.astype(np.float32)) <= ulp).all()
    out = np.empty((3, 40, 30), np.float16)
    assert gemm.matmul(a, b, out=out) is out and np.array_equal(out, fast)


@needs_bfloat16
def test_bfloat16_gemm_returns_bfloat16():
    """(ml_dtypes' own bfloat16 matmul returns float32.)"""
    a = np.ones((4, 5), BFLOAT16)
    assert gemm.matmul(a, a.T).dtype == BFLOAT16
    np.testing.assert_array_equal(gemm.matmul(a, a.T).astype(np.float32), 5.0)


def test_fake_cupy_runs_the_mixed_step(gpu_xp):
    model = _net().to("cupy")
    x, y = _blobs(8)
    with set_global_policy("mixed_float16"):
        logits = model.forward(gpu_xp.asarray(x), training=True)
        loss, dlogits = SoftmaxCrossEntropy()(logits, y)
        model.backward(dlogits)
    assert logits.dtype == np.float16 and isinstance(logits, gpu_xp.ndarray)
    assert all(g.dtype == np.float32 for g in model.grads.values())


def test_the_worker_pool_is_forked_for_one_policy():
    """Forked workers compute under the policy they were forked with: a pool serves one."""
    model = _net()
    with set_global_policy("mixed_float16"):
        mixed = processes.describe(model)
    assert processes.describe(model) != mixed


# ---- the loss scaler -------------------------------------------------------------------------
def _stepped(model, scale, grad_value):
    """A LossScaleOptimizer(SGD) of model at scale, after one step with every grad grad_value."""
    optimizer = LossScaleOptimizer(optim.SGD(model, lr=0.5), initial_scale=scale,
                                   dynamic_growth_steps=3)
    for g in model.grads.values():
        g[...] = grad_value
    optimizer.step()
    return optimizer


def test_an_inf_gradient_skips_the_step_and_halves_the_scale():
    model = _net()
    before = {k: v.copy() for k, v in model.params.items()}
    optimizer = _stepped(model, 1024.0, 1.0)                  # a good step first
    optimizer.good_steps = 2
    after_good = {k: v.copy() for k, v in model.params.items()}
    assert not all(np.array_equal(after_good[k], before[k]) for k in before)
    next(iter(model.grads.values()))[0] = np.inf              # one inf among finite grads
    assert optimizer.step() is False
    for k, v in model.params.items():                         # bitwise unchanged
        assert np.array_equal(v, after_good[k]), k
    assert (optimizer.loss_scale, optimizer.good_steps, optimizer.steps) == (512.0, 0, 1)
    next(iter(model.grads.values()))[0] = np.nan
    optimizer.step()
    assert optimizer.loss_scale == 256.0 and optimizer.skipped_steps == 2


def test_good_steps_unscale_the_gradients_and_grow_the_scale():
    model = _net()
    w = model.params["0.weight"].copy()
    optimizer = _stepped(model, 1024.0, 1024.0 * 0.25)       # scaled grads of 0.25
    np.testing.assert_array_equal(model.params["0.weight"], w - np.float32(0.5 * 0.25))
    assert (optimizer.loss_scale, optimizer.good_steps) == (1024.0, 1)
    for _ in range(2):                                        # the 3rd good step in a row
        optimizer.step()
    assert (optimizer.loss_scale, optimizer.good_steps) == (2048.0, 0)


def test_the_scaled_loss_scales_the_gradient_not_the_loss():
    x, y = _blobs(4)
    logits = _net().forward(x)
    loss, d = SoftmaxCrossEntropy()(logits, y)
    scaled_loss, scaled_d = ScaledLoss(SoftmaxCrossEntropy(), 8.0)(logits, y)
    assert scaled_loss == loss
    np.testing.assert_array_equal(scaled_d, d * 8)


def test_state_dict_round_trip_keeps_the_scale():
    model = _net()
    optimizer = _stepped(model, 64.0, 1.0)
    restored = LossScaleOptimizer(optim.SGD(model, lr=0.5))
    restored.load_state_dict(optimizer.state_dict())
    assert (restored.loss_scale, restored.good_steps, restored.steps) == (64.0, 1, 1)


# ---- compile and fit -------------------------------------------------------------------------
@needs_bfloat16
def test_compile_wraps_the_optimizer_under_mixed_float16_only():
    model = _net()
    with set_global_policy("mixed_float16"):
        model.compile(optim.Adam(1e-3))
        assert isinstance(model.optimizer, LossScaleOptimizer)
        assert model.optimizer.loss_scale == 2.0 ** 15       # Keras's default
        model.compile(model.optimizer)                        # not wrapped twice
        assert isinstance(model.optimizer.inner_optimizer, optim.Adam)
    with set_global_policy("mixed_bfloat16"):
        model.compile("adam")
        assert isinstance(model.optimizer, optim.Adam)


def test_mixed_float16_fit_learns_and_updates_float32_master_weights():
    model = _net(seed=1)
    x, y = _blobs(192)
    with set_global_policy("mixed_float16"):
        model.compile(optim.Adam(3e-2), metrics=["accuracy"])
        w = model.params["0.weight"].copy()
        history = model.fit(x, y, batch_size=32, epochs=4, verbose=0, seed=0)
    assert history.history["accuracy"][-1] > 0.9
    assert history.history["loss"][-1] < history.history["loss"][0] / 2
    assert model.params["0.weight"].dtype == np.float32 and model.optimizer.good_steps == 24


def test_the_master_weights_keep_updates_float16_would_round_away():
    """A step smaller than half a float16 ulp of the weight changes the float32 master."""
    model = Sequential([Dense(4, 3, rng=np.random.default_rng(0))])
    model.params["0.weight"][...] = 1.0
    with set_global_policy("mixed_float16"):
        model.compile(optim.SGD(lr=1e-5))
        model.fit(np.ones((8, 4), np.float32), np.zeros(8, int), batch_size=8, verbose=0)
    w = model.params["0.weight"]
    assert w.dtype == np.float32 and (w != 1.0).any()
    assert np.abs(w - 1.0).max() < np.spacing(np.float16(1.0)) / 2    # lost in float16


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_fit_skips_overflowing_steps_and_recovers():
    """A scale at which the float16 gradients overflow: the first steps are skipped, each
    halving it, until they fit; then the model learns."""
    model = _net(seed=2)
    x, y = _blobs(96)
    with set_global_policy("mixed_float16"):
        model.compile(LossScaleOptimizer(optim.Adam(3e-2), initial_scale=2.0 ** 22),
                      metrics=["accuracy"])
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0, seed=0)
    optimizer = model.optimizer
    assert optimizer.skipped_steps >= 1 and optimizer.loss_scale < 2.0 ** 22
    assert optimizer.steps == 18 - optimizer.skipped_steps
    assert all(np.isfinite(p).all() for p in model.params.values())
    assert history.history["accuracy"][-1] > 0.7


# ---- the training tool -----------------------------------------------------------------------
@needs_bfloat16
def test_precision_flag_refuses_unknown_words_and_a_changed_resume(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(_args(folder, out, "--precision", "fp16")) == 2
    assert "--precision must be fp32, mixed_float16, mixed_bfloat16" in capsys.readouterr().err
    assert train.main(_args(folder, out, "--epochs", "1", "--precision", "mixed_bfloat16")) == 0
    assert train.main(_args(folder, out, "--resume", "--precision", "fp32")) == 2
    assert "--precision was 'mixed_bfloat16', now 'fp32'" in capsys.readouterr().err


def test_resume_restores_the_loss_scale_exactly(folder, tmp_path, monkeypatch, capsys):
    """--precision mixed_float16 writes float32 weights and the loss scaler's state; a run
    stopped after epoch 1 and resumed ends bitwise equal to one that ran through, its count of
    good steps included."""
    whole = tmp_path / "whole"
    assert train.main(_args(folder, whole, "--precision", "mixed_float16")) == 0
    assert "precision mixed_float16" in capsys.readouterr().out
    model, info, _ = load_checkpoint(whole / "last.npz", resumable=True)
    assert {p.dtype for p in model.params.values()} == {np.dtype(np.float32)}
    assert info["optimizer"]["loss_scale"] == {"scale": 2.0 ** 15, "good_steps": 8}
    assert info["settings"]["precision"] == "mixed_float16"
    assert minicnn.mixed_precision.global_policy().name == "float32"      # put back after
    common = dict(data=str(folder), batch_size=16, val_split=0.25, epochs=2,
                  precision="mixed_float16")
    original = train._end_of_epoch

    def stop_after_first(loop, logs, seconds):
        original(loop, logs, seconds)
        raise KeyboardInterrupt                     # the process dies after its checkpoint
    monkeypatch.setattr(train, "_end_of_epoch", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        train.fit(out=str(tmp_path / "split"), **common)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "split" / "last.npz")[1]["optimizer"]["loss_scale"] == {
        "scale": 2.0 ** 15, "good_steps": 4}
    train.fit(out=str(tmp_path / "split"), resume=True, **common)
    (a, info_a, _), (b, info_b, _) = (load_checkpoint(tmp_path / d / "last.npz")
                                      for d in ("whole", "split"))
    for name, value in a.params.items():
        np.testing.assert_array_equal(value, b.params[name])
    assert info_a["optimizer"] == info_b["optimizer"]
    assert info_b["optimizer"]["loss_scale"]["good_steps"] == 8
    history = json.loads((tmp_path / "split" / "history.json").read_text())
    assert history["epoch"] == [1, 2]
