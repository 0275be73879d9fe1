"""minicnn against PyTorch in float64: outputs, input gradients and parameter gradients of every
layer and of the loss, and several optimiser steps, with the fast maths (minicnn.ops) and the
reference (minicnn.reference). Skipped where torch is not installed."""
import numpy as np
import pytest

import minicnn
from minicnn.nn import optim
from minicnn.nn import (AvgPool2D, BatchNorm1D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten,
                            MaxPool2D, ReLU, Residual, Softmax)
from minicnn.nn.losses import SoftmaxCrossEntropy

torch = pytest.importorskip("torch")
F = torch.nn.functional
TOL = dict(rtol=1e-8, atol=1e-8)


@pytest.fixture(autouse=True, params=["fast", "reference"])
def implementation(request):
    """Every comparison runs on both implementations of the maths (minicnn.use)."""
    with minicnn.use(request.param):
        yield request.param


def _t(a):
    return torch.tensor(a, dtype=torch.float64, requires_grad=True)


def _compare(layer, torch_fn, x, torch_params=()):
    """Forward, input gradient and parameter gradients of layer vs torch_fn(x, *params)."""
    rng = np.random.default_rng(1)
    y = layer.forward(x, training=True)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    tx = _t(x)
    ty = torch_fn(tx, *torch_params)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **TOL)
    return ty


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), (1, "same"), ((2, 1), (0, 2)), (1, "valid")])
@pytest.mark.parametrize("kernel", [3, (2, 3), 1])
# PyTorch's note that an even kernel with padding="same" pads a copy of the input: about its
# speed, not its result, which this test compares
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
def test_conv2d(stride, padding, kernel):
    rng = np.random.default_rng(0)
    layer = Conv2D(3, 4, kernel, stride, padding, dtype=np.float64, rng=rng)
    x = rng.standard_normal((2, 3, 7, 6))
    w, b = _t(layer.params["weight"]), _t(layer.params["bias"])
    _compare(layer, lambda t, w, b: F.conv2d(t, w, b, stride=stride, padding=padding), x, (w, b))
    np.testing.assert_allclose(layer.grads["weight"], w.grad.numpy(), **TOL)
    np.testing.assert_allclose(layer.grads["bias"], b.grad.numpy(), **TOL)


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 2), ((2, 3), (1, 2))])
def test_pools(kernel, stride):
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 8))
    ts = stride if stride is not None else kernel
    _compare(MaxPool2D(kernel, stride), lambda t: F.max_pool2d(t, kernel, ts), x)
    _compare(AvgPool2D(kernel, stride), lambda t: F.avg_pool2d(t, kernel, ts), x)


def test_dense_flatten_relu_softmax():
    rng = np.random.default_rng(0)
    layer = Dense(12, 5, dtype=np.float64, rng=rng)
    x = rng.standard_normal((4, 12))
    w, b = _t(layer.params["weight"]), _t(layer.params["bias"])
    _compare(layer, lambda t, w, b: F.linear(t, w, b), x, (w, b))
    np.testing.assert_allclose(layer.grads["weight"], w.grad.numpy(), **TOL)
    np.testing.assert_allclose(layer.grads["bias"], b.grad.numpy(), **TOL)
    _compare(Flatten(), lambda t: t.flatten(1), rng.standard_normal((2, 3, 2, 2)))
    _compare(ReLU(), F.relu, rng.standard_normal((3, 4, 2, 2)))
    _compare(Softmax(), lambda t: F.softmax(t, dim=1), rng.standard_normal((3, 6)))


def test_dropout_scaling_matches_torch_convention():
    x = np.ones((200, 50))
    y = Dropout(0.3, rng=np.random.default_rng(0)).forward(x, training=True)
    kept = y[y != 0]
    np.testing.assert_allclose(kept, 1 / 0.7)          # torch scales survivors by 1/(1-p)
    assert abs((y == 0).mean() - 0.3) < 0.02
    np.testing.assert_array_equal(Dropout(0.3).forward(x), x)     # identity at inference


@pytest.mark.parametrize("cls,shape", [(BatchNorm2D, (4, 3, 5, 5)), (BatchNorm1D, (6, 3))])
def test_batchnorm_training_and_running_stats(cls, shape):
    rng = np.random.default_rng(0)
    layer = cls(3, momentum=0.2, dtype=np.float64)
    layer.params["weight"][...] = rng.uniform(0.5, 2, 3)
    layer.params["bias"][...] = rng.standard_normal(3)
    tbn = (torch.nn.BatchNorm2d if cls is BatchNorm2D else torch.nn.BatchNorm1d)(3, momentum=0.2).double()
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor(layer.params["weight"]))
        tbn.bias.copy_(torch.tensor(layer.params["bias"]))
    x = rng.standard_normal(shape) * 2 + 0.5
    _compare(layer, tbn, x)
    np.testing.assert_allclose(layer.grads["weight"], tbn.weight.grad.numpy(), **TOL)
    np.testing.assert_allclose(layer.grads["bias"], tbn.bias.grad.numpy(), **TOL)
    np.testing.assert_allclose(layer.state["running_mean"], tbn.running_mean.numpy(), **TOL)
    np.testing.assert_allclose(layer.state["running_var"], tbn.running_var.numpy(), **TOL)
    tbn.eval()
    expected = tbn(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(layer.forward(x), expected, **TOL)
    if x.ndim == 4:                                  # channels-last memory, as convs hand on
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(layer.forward(x_nhwc), expected, **TOL)


def test_residual_block_with_projection():
    rng = np.random.default_rng(0)
    d = dict(dtype=np.float64, rng=rng)
    block = Residual([Conv2D(2, 4, 3, 2, 1, **d), ReLU(), Conv2D(4, 4, 3, 1, 1, **d)],
                     shortcut=Conv2D(2, 4, 1, 2, 0, **d))
    p = {k: _t(v) for k, v in block.params.items()}

    def torch_block(t):
        h = F.relu(F.conv2d(t, p["body.0.weight"], p["body.0.bias"], stride=2, padding=1))
        h = F.conv2d(h, p["body.2.weight"], p["body.2.bias"], padding=1)
        return h + F.conv2d(t, p["shortcut.weight"], p["shortcut.bias"], stride=2)
    _compare(block, torch_block, rng.standard_normal((2, 2, 6, 6)))
    for k, v in p.items():
        np.testing.assert_allclose(block.grads[k], v.grad.numpy(), **TOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_softmax_cross_entropy(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 10)) * 4
    labels = rng.integers(0, 10, 8)
    loss, dlogits = SoftmaxCrossEntropy(smoothing)(logits, labels)
    t = _t(logits)
    tloss = F.cross_entropy(t, torch.tensor(labels), label_smoothing=smoothing)
    tloss.backward()
    assert abs(loss - tloss.item()) < 1e-10
    np.testing.assert_allclose(dlogits, t.grad.numpy(), **TOL)


# ---- optimisers ----------------------------------------------------------------------------
def _run_optimizer(make_ours, make_torch, steps=5):
    rng = np.random.default_rng(0)
    model = minicnn.Sequential([Dense(6, 4, dtype=np.float64, rng=rng), ReLU(),
                                Dense(4, 3, dtype=np.float64, rng=rng)])
    tmodel = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).double()
    with torch.no_grad():
        for (name, p), tp in zip(model.params.items(), tmodel.parameters()):
            tp.copy_(torch.tensor(p))
    ours, theirs = make_ours(model), make_torch(tmodel.parameters())
    loss_fn = SoftmaxCrossEntropy()
    for _ in range(steps):
        x = rng.standard_normal((5, 6))
        y = rng.integers(0, 3, 5)
        _, d = loss_fn(model.forward(x, training=True), y)
        model.backward(d)
        ours.step()
        theirs.zero_grad()
        F.cross_entropy(tmodel(torch.tensor(x)), torch.tensor(y)).backward()
        theirs.step()
    for p, tp in zip(model.params.values(), tmodel.parameters()):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.1, momentum=0.9),
                                dict(lr=0.1, momentum=0.9, nesterov=True),
                                dict(lr=0.05, momentum=0.9, weight_decay=5e-4),
                                dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2)])
def test_sgd_matches_torch(kw):
    _run_optimizer(lambda m: optim.SGD(m, **kw), lambda p: torch.optim.SGD(p, **kw))


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
                                dict(lr=3e-3, weight_decay=1e-2)])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_and_adamw_match_torch(kw, name):
    _run_optimizer(lambda m: getattr(optim, name)(m, **kw),
                   lambda p: getattr(torch.optim, name)(p, **kw), steps=8)


def _lr_sequence(schedule_ours, schedule_torch, steps, lr=0.1):
    model = minicnn.Sequential([Dense(2, 2)])
    ours = optim.SGD(model, lr)
    tparam = torch.nn.Parameter(torch.zeros(1))
    theirs = torch.optim.SGD([tparam], lr)
    s_ours, s_torch = schedule_ours(ours), schedule_torch(theirs)
    seq_ours, seq_torch = [], []
    for _ in range(steps):
        seq_ours.append(ours.lr)
        seq_torch.append(theirs.param_groups[0]["lr"])
        theirs.step()
        s_ours.step()
        s_torch.step()
    np.testing.assert_allclose(seq_ours, seq_torch, rtol=1e-9, atol=1e-12)


def test_schedules_match_torch():
    S = torch.optim.lr_scheduler
    _lr_sequence(lambda o: optim.StepLR(o, 3, 0.5), lambda o: S.StepLR(o, 3, 0.5), 10)
    _lr_sequence(lambda o: optim.CosineAnnealingLR(o, 10, 1e-3),
                 lambda o: S.CosineAnnealingLR(o, 10, 1e-3), 10)
    for anneal in ("cos", "linear"):
        _lr_sequence(lambda o: optim.OneCycleLR(o, 0.4, 20, pct_start=0.25, anneal=anneal),
                     lambda o: S.OneCycleLR(o, 0.4, total_steps=20, pct_start=0.25,
                                            anneal_strategy=anneal, cycle_momentum=False), 20)


def test_reduce_lr_on_plateau_matches_torch():
    model = minicnn.Sequential([Dense(2, 2)])
    ours = optim.SGD(model, 1.0)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], 1.0)
    s_ours = optim.ReduceLROnPlateau(ours, factor=0.5, patience=2, cooldown=1, min_lr=0.01)
    s_torch = torch.optim.lr_scheduler.ReduceLROnPlateau(theirs, factor=0.5, patience=2,
                                                         cooldown=1, min_lr=0.01)
    metrics = [1.0, 0.9, 0.9, 0.95, 0.91, 0.92, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6] + [0.6] * 20
    for m in metrics:
        s_ours.step(m)
        s_torch.step(m)
        assert ours.lr == pytest.approx(theirs.param_groups[0]["lr"])
    assert ours.lr == pytest.approx(0.01)
