"""Numerical gradient checking: is a hand-written backward right?

For a layer f, pick a random upstream gradient dy and the scalar L(x, params) = sum(f(x) * dy).
The analytic gradients are backward(dy) (for x) and layer.grads (for the params); the numerical
ones perturb each entry by +-eps and take the centred difference (L(+eps) - L(-eps)) / (2 eps),
in float64 (CS231n's eval_numerical_gradient_array). For a loss, L is the loss itself.

The error reported per tensor is max|analytic - numeric| / max(1, max|gradient|): relative for
gradients larger than 1, absolute below (as numpy.allclose with rtol = atol), so a gradient that
is exactly zero (a conv bias feeding batch norm) is judged by its absolute error.
"""
import numpy as np

from minicnn.backend import array_module, to_numpy
from minicnn.nn.layers import Layer, walk
from minicnn.nn.model import layer_config, layer_from_config


def gradcheck(target, x, labels=None, eps=1e-6, seed=0, verbose=False, tol=1e-6, entries=None):
    """Check a layer's (or a loss's) backward against centred differences in float64.

    target: a Layer (input and parameter gradients are checked) or a loss callable
            (logits, labels) -> (loss, dlogits) such as SoftmaxCrossEntropy (labels needed).
    x: the input (or logits); converted to float64. A float32 layer is checked on a float64 copy.
    Returns {tensor name: max error (see the module docstring)}; verbose=True also prints a table (rows above tol
    are marked FAIL).
    entries: check at most this many entries of each tensor, drawn at random (seed): a quick
    check of a large layer (None: every entry).
    """
    xp = array_module(x)
    x = xp.array(x, dtype=np.float64)
    if isinstance(target, Layer):
        # float64 layers are checked in place (their state is restored afterwards)
        in_place = all(p.dtype == np.float64 for p in target.params.values())
        layer = target if in_place else _float64_copy(target)
        snapshot = _snapshot(layer)
        analytic, scalar = _layer_problem(layer, x, np.random.default_rng(seed), snapshot)
        tensors = {"input": x, **layer.params}
        title = repr(target)
    else:
        dlogits = target(x, labels)[1]
        analytic = {"input": dlogits}
        tensors = {"input": x}
        scalar = lambda: float(target(x, labels)[0])  # noqa: E731 — the loss is the scalar
        title = repr(target)
    errors, rows = {}, []
    for name, t in tensors.items():
        picked = _entries(t.size, entries, seed)
        a = to_numpy(analytic[name]).reshape(-1)[picked]
        n = _numerical_gradient(scalar, t, eps, picked)
        scale = max(np.abs(a).max(initial=0.0), np.abs(n).max(initial=0.0))
        diff = np.abs(a - n).max(initial=0.0)
        errors[name] = float(diff / max(scale, 1.0))
        rows.append((name, tuple(t.shape), scale, diff, errors[name]))
    if isinstance(target, Layer):
        _restore(layer, snapshot)
    if verbose:
        _print_table(title, eps, rows, tol)
    return errors


def _layer_problem(layer, x, rng, snapshot):
    """-> (analytic gradients {name: array}, scalar() evaluating sum(forward(x) * dy))."""
    xp = array_module(x)
    y = layer.forward(x, training=True)
    dy = xp.asarray(rng.standard_normal(y.shape))
    analytic = {"input": layer.backward(dy), **{k: g.copy() for k, g in layer.grads.items()}}

    def scalar():
        _restore(layer, snapshot)     # same dropout mask, same running statistics every time
        return float((layer.forward(x, training=True) * dy).sum())
    return analytic, scalar


def _entries(size, entries, seed):
    """The flat indices a check looks at: all of them, or `entries` drawn at random, in order."""
    if entries is None or entries >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, entries, replace=False))


def _numerical_gradient(f, t, eps, picked):
    """Centred differences of the scalar f() with respect to the entries `picked` (flat
    indices) of t, perturbed in place -> (len(picked),) float64."""
    flat = t.reshape(-1)                 # a view: t is contiguous
    grad = np.zeros(len(picked))
    for j, i in enumerate(picked):
        old = float(flat[i])
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        grad[j] = (plus - minus) / (2 * eps)
    return grad


def _float64_copy(layer):
    """The same layer, parameters and state in float64 (random generators copied too)."""
    def to64(config):
        if isinstance(config, dict):
            return {k: ("float64" if k == "dtype" else to64(v)) for k, v in config.items()}
        if isinstance(config, list):
            return [to64(v) for v in config]
        return config
    copy = layer_from_config(to64(layer_config(layer)))
    for name, value in copy.params.items():
        value[...] = to_numpy(layer.params[name])
    for name, value in copy.state.items():
        value[...] = to_numpy(layer.state[name])
    for src, dst in zip(walk(layer), walk(copy)):
        if hasattr(src, "rng"):
            dst.rng.bit_generator.state = src.rng.bit_generator.state
    return copy


def _snapshot(layer):
    state = {k: v.copy() for k, v in layer.state.items()}
    rngs = [(sub, sub.rng.bit_generator.state) for sub in walk(layer) if hasattr(sub, "rng")]
    return state, rngs


def _restore(layer, snapshot):
    state, rngs = snapshot
    for k, v in layer.state.items():
        v[...] = state[k]
    for sub, s in rngs:
        sub.rng.bit_generator.state = s


def _print_table(title, eps, rows, tol):
    print(f"gradcheck {title}")
    print(f"  float64, centred differences, eps={eps:g}; "
          f"error = max|analytic - numeric| / max(1, max|gradient|)")
    print(f"  {'tensor':<22}{'shape':<18}{'max |grad|':>12}{'max |diff|':>12}{'error':>12}")
    for name, shape, scale, diff, err in rows:
        mark = "ok" if err < tol else "FAIL"
        print(f"  {name:<22}{str(shape):<18}{scale:>12.3e}{diff:>12.3e}{err:>12.3e}  {mark}")
