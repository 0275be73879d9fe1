"""Which implementation of the maths the layers call: "reference", "fast" or "raw".

    minicnn.use("reference")            from now on, in every thread
    with minicnn.use("reference"):      inside the block only
        model.forward(x, training=True)

    reference  minicnn.reference: the textbook maths in plain NCHW array code; Sequential runs
               the layers exactly as written (no cropping of the input, no reordering), so the
               shapes a student sees are the ones summary() prints
    fast       minicnn.ops (the default): the same functions, with worker threads, cache-sized
               chunks and channels-last memory; on CuPy arrays its generic path
    raw        the hand-written CUDA kernels (minicnn.cuda.kernels) for float32 CuPy arrays;
               minicnn.ops for the ops they do not cover and for every other array

All three have the same functions with the same signatures: each forward returns (out, cache)
and only the backward of the same implementation understands that cache, so a layer keeps the
backward it must call beside its cache (ops_for(x).conv2d_backward, cache).
"""
import types

import numpy as np

from minicnn import dtype_policy, ops, reference
from minicnn.backend import array_module
from minicnn.cuda import kernels

IMPLEMENTATIONS = ("reference", "fast", "raw")

# What the raw kernels replace; everything else is minicnn.ops's.
_RAW = types.SimpleNamespace(**{name: getattr(ops, name) for name in ops.__all__})
for _name in ("conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward"):
    setattr(_RAW, _name, getattr(kernels, _name))

_active = "fast"


def active():
    """The implementation in force: "reference", "fast" or "raw"."""
    return _active


class use:
    """Choose the implementation the layers call: "reference", "fast" or "raw".

    Takes effect at once, for the whole process (worker threads included); used as a context
    manager it is undone at the end of the block, where the setting before it comes back."""

    def __init__(self, name):
        global _active
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"Unknown implementation {name!r}; choose "
                             f"{', '.join(map(repr, IMPLEMENTATIONS))}.")
        self.previous, _active = _active, name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _active
        _active = self.previous
        return False


def ops_for(x):
    """The module of forward/backward pairs the active implementation uses for array x:
    minicnn.reference, minicnn.ops, or (raw, float32 CuPy x) minicnn.ops with the CUDA kernels
    in place of its conv2d and maxpool2d pairs. Under a mixed-precision policy, reference's or
    ops's pairs, each casting to its dtype (minicnn.dtype_policy.autocast)."""
    name = active()
    if dtype_policy.global_policy().mixed:        # each op in its own dtype: the casting's one place
        return dtype_policy.autocast(reference if name == "reference" else ops)
    if name == "reference":
        return reference
    if name == "raw" and x.dtype == np.float32 and array_module(x) is not np:
        return _RAW
    return ops


def name_for(x):
    """"reference", "fast" or "raw": which of them ops_for(x) hands out for array x (under
    "raw", NumPy and non-float32 arrays take the fast path)."""
    fns = ops_for(x)
    fns = getattr(fns, "wraps", fns)                # under autocast: the module it wraps
    return "reference" if fns is reference else "raw" if fns is _RAW else "fast"
