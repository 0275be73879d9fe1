"""The one module that knows CuPy exists.

Every other module takes its array module from the arrays it is given
(``xp = array_module(x)``), so the same layer code runs on NumPy and on CuPy.
CuPy is imported behind a guard: a CPU-only install imports everything.
"""
import numpy as np

try:  # CuPy is optional: pip install -e ".[gpu]"
    import cupy as _cupy
except Exception:  # ImportError, or a CuPy that finds no CUDA driver
    _cupy = None


def array_module(*arrays):
    """numpy or cupy, whichever the arrays live in (numpy for plain Python values)."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def to_numpy(a):
    """A NumPy copy (or the array itself) of a NumPy or CuPy array."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)
