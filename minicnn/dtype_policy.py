"""The dtype policy in force (Keras's name) and the casting of the maths under it: the low
level of minicnn.mixed_precision, which is the public API (read its docstring first). Apart
from it so that minicnn.implementation, which applies autocast() to the maths every layer
calls, needs nothing above it.
"""
import types

import numpy as np

from minicnn.backend import array_module
from minicnn.errors import BackendError, UsageError

try:                        # bfloat16 for NumPy: optional (pip install "minicnn[precision]")
    from ml_dtypes import bfloat16 as BFLOAT16
except ImportError:
    BFLOAT16 = None

POLICIES = {"float32": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}

# The ops that run in float32 under any policy (PyTorch autocast's float32 list): batch norm's
# statistics, softmax and the loss need float32's range and precision.
FLOAT32_OPS = ("batchnorm_forward", "batchnorm_backward", "batchnorm_inference", "softmax",
               "log_softmax", "softmax_backward", "softmax_cross_entropy")


def _dtype(name):
    """np.dtype of "float16", "float32" or "bfloat16" (ml_dtypes')."""
    if name == "bfloat16":
        if BFLOAT16 is None:
            raise UsageError('bfloat16 on NumPy needs ml_dtypes: pip install "minicnn[precision]" '
                             '(or pip install ml_dtypes).')
        return np.dtype(BFLOAT16)
    return np.dtype(name)


class Policy:
    """A dtype policy (Keras's DTypePolicy): name, compute_dtype (what layers compute in) and
    variable_dtype (what the weights are kept in), both as names like Keras's ("float16")."""

    def __init__(self, name):
        if isinstance(name, Policy):
            name = name.name
        if name not in POLICIES:
            raise UsageError(f"Unknown precision policy {name!r}; choose one of "
                             f"{', '.join(POLICIES)}.")
        self.name = name
        self.compute_dtype, self.variable_dtype = POLICIES[name], "float32"
        _dtype(self.compute_dtype)                  # bfloat16 without ml_dtypes: say so now

    @property
    def mixed(self):
        """Whether layers compute in another dtype than the weights are kept in."""
        return self.compute_dtype != self.variable_dtype

    def __repr__(self):
        return f'<Policy "{self.name}">'


_policy = Policy("float32")


def global_policy():
    """The policy in force (Keras's name): Policy("float32") unless set_global_policy changed it."""
    return _policy


class set_global_policy:
    """Make policy ("float32", "mixed_float16", "mixed_bfloat16" or a Policy) the one every
    layer computes under, from now on, in every thread (Keras's function). Used as a context
    manager (as minicnn.use), the policy before it comes back at the end of the block.

    Set it before model.compile: under mixed_float16 compile wraps the optimiser in a
    LossScaleOptimizer, as Keras's does."""

    def __init__(self, policy):
        global _policy
        self.previous, _policy = _policy, Policy(policy)

    def __enter__(self):
        return _policy

    def __exit__(self, *exc):
        global _policy
        _policy = self.previous
        return False


def is_floating(dtype):
    """Whether dtype is a floating-point type: NumPy's, or ml_dtypes' bfloat16."""
    return np.dtype(dtype).kind == "f" or (BFLOAT16 is not None and dtype == BFLOAT16)


# ---- the casting: one wrapper around the maths ------------------------------------------------
_autocast = {}          # (module of forward/backward pairs, compute dtype name) -> its wrapper


def autocast(fns, policy=None):
    """fns (minicnn.reference or minicnn.ops: forward/backward pairs) under policy (default: the
    global one): each function casts its floating-point array arguments to its dtype (the
    compute dtype, or float32 for FLOAT32_OPS) and returns its arrays in it. A cache passes
    through untouched; the returned namespace keeps fns as .wraps."""
    policy = global_policy() if policy is None else policy
    key = (fns, policy.compute_dtype)
    if key not in _autocast:
        low = _dtype(policy.compute_dtype)
        table = {name: _cast_op(getattr(fns, name), np.dtype(np.float32) if name in FLOAT32_OPS
                                else low)
                 for name in fns.__all__ if callable(getattr(fns, name))}
        _autocast[key] = types.SimpleNamespace(wraps=fns, **table)
    return _autocast[key]


def _cast_op(fn, dtype):
    """fn with its floating-point array arguments cast to dtype, and the arrays it returns
    (directly, or as the items of a returned tuple: not a cache inside it) in dtype."""

    def op(*args, **kwargs):
        out = fn(*[_cast(a, dtype) for a in args],
                 **{k: _cast(v, dtype) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            return tuple(_cast(v, dtype) for v in out)
        return _cast(out, dtype)

    op.__name__ = op.__qualname__ = fn.__name__
    op.__doc__ = f"{fn.__name__} computed in {dtype.name} (minicnn.dtype_policy.autocast)."
    return op


def _cast(a, dtype):
    """a in dtype if it is a floating-point array (not a mask, labels or a cache); else a."""
    if not hasattr(a, "astype") or a.dtype == dtype or not is_floating(a.dtype):
        return a
    if dtype == BFLOAT16 and array_module(a) is not np:
        _check_bfloat16_arrays(array_module(a))
    return a.astype(dtype)


_takes_bfloat16 = set()     # the array modules (CuPy) found to take ml_dtypes' bfloat16


def _check_bfloat16_arrays(xp):
    """BackendError unless xp (CuPy) takes ml_dtypes' bfloat16 arrays (unverified: no GPU here)."""
    if xp in _takes_bfloat16:
        return
    try:
        xp.zeros(1, dtype=BFLOAT16)
    except (TypeError, ValueError):
        raise BackendError("This CuPy has no bfloat16 arrays: use mixed_float16 on the GPU "
                           "(or mixed_bfloat16 with --backend numpy).") from None
    _takes_bfloat16.add(xp)
