"""matmul for the fast path: xp.matmul, except float16 and bfloat16 on NumPy, which go
through float32 BLAS.

NumPy has no fast float16 GEMM: its float16 matmul is a plain C loop (float32 sums, one
rounding at the end), 25x to 100x slower than float32's BLAS on this repository's 2-core
machine; ml_dtypes' bfloat16 matmul returns float32 (docs/precision.md). Tensor cores compute
the same way, low-precision inputs with float32 sums, so this does too: both inputs widened to
float32 (exactly), one BLAS GEMM, the product rounded once to the inputs' dtype.

Reference: the plain a @ b of minicnn.reference (in float16, NumPy's loop).
Differs: the float32 sums run in BLAS's order, not the loop's (tests/test_mixed_precision.py).
"""
import numpy as np

from minicnn.backend import array_module

try:                        # bfloat16 for NumPy: optional (pip install "minicnn[precision]")
    from ml_dtypes import bfloat16 as _bfloat16
    WIDENED = (np.dtype(np.float16), np.dtype(_bfloat16))
except ImportError:
    WIDENED = (np.dtype(np.float16),)


def matmul(a, b, out=None):
    """a @ b with xp.matmul's broadcasting, into out when given; float16 and bfloat16 NumPy
    arrays as float32 GEMMs rounded once to a's dtype."""
    xp = array_module(a, b)
    if xp is not np or a.dtype not in WIDENED:
        return xp.matmul(a, b, out=out)
    product = np.matmul(a.astype(np.float32), b.astype(np.float32))
    if out is None:
        return product.astype(a.dtype)
    out[...] = product
    return out
