"""Hand-written CUDA kernels: the lab beside minicnn.ops, for CuPy float32 arrays.

Each wrapper has the signature and return values of its NumPy twin in minicnn.ops, so a layer
can call either; the twin is the specification (the tests and ``python -m minicnn.bench
kernels`` compare every kernel with it before timing it).

    im2col, col2im                          kernels/im2col.cu
    conv2d_forward, conv2d_backward         kernels/conv2d.cu     (implicit GEMM, no im2col matrix)
    maxpool2d_forward, maxpool2d_backward   kernels/maxpool2d.cu
    bias_relu_forward, bias_relu_backward   kernels/bias_relu.cu  (no NumPy twin in ops: the
                                            *_reference functions below are its spec)

The sources are the .cu files at the top of the repository; a wheel ships them inside the
package as minicnn/cuda_src/ (pyproject.toml maps one onto the other). Each file is compiled
once per process with NVRTC (cupy.RawModule) on first use, and each kernel function is looked
up once per device.

The layers use them under minicnn.use("raw") (minicnn.implementation), for float32 CuPy
arrays; minicnn.ops otherwise. Known limits: float32 only,
tensors below 2**30 elements, max-pool windows of at most 256 taps.
"""
import functools
import math
from pathlib import Path

import numpy as np

from minicnn import ops
from minicnn.backend import array_module, get_backend
from minicnn.ops.im2col import conv_output_size

# kernel function -> the .cu file (stem) that defines it
KERNEL_FILES = {
    "im2col": "im2col", "col2im": "im2col",
    "conv2d_forward": "conv2d", "conv2d_backward_data": "conv2d",
    "conv2d_backward_weight": "conv2d",
    "maxpool2d_forward": "maxpool2d", "maxpool2d_backward": "maxpool2d",
    "bias_relu_forward": "bias_relu", "bias_relu_backward": "bias_relu",
}
NVRTC_OPTIONS = ("--std=c++17",)
THREADS = 256                  # threads per block of the memory-bound kernels
CONV_THREADS = 128             # conv2d.cu's THREADS: 8 x 16, an 8 x 8 micro-tile each
TILE_ROWS = 64                 # conv2d.cu's BM: output rows (filters or channels) per block
TILE_COLS = 128                # conv2d.cu's BN: output columns (pixels or weight taps) per block
TILE_K = 16                    # conv2d.cu's BK: reduction step
SIZE_LIMIT = 2**30             # element count below which the kernels' int indices are safe
SPLIT_K_BLOCKS = 512           # backward_weight: aim for this many blocks (a few per SM)
SPLIT_K_MIN = 256              # ... but give each split at least this much of the reduction


# ---- finding and compiling the sources ------------------------------------------------------
def source_dir():
    """The folder holding the .cu files: minicnn/cuda_src in a wheel, kernels/ in a checkout."""
    package = Path(__file__).resolve().parent.parent          # minicnn/
    for folder in (package / "cuda_src", package.parent / "kernels"):
        if (folder / "conv2d.cu").is_file():
            return folder
    raise FileNotFoundError(f"minicnn's CUDA sources are missing: looked for conv2d.cu in "
                            f"{package / 'cuda_src'} (installed) and {package.parent / 'kernels'} "
                            f"(source tree).")


def kernel_source(name):
    """The CUDA C text that defines kernel function name (or the file stem name, e.g. "conv2d")."""
    stem = KERNEL_FILES.get(name, name)
    if stem not in set(KERNEL_FILES.values()):
        raise KeyError(f"No CUDA kernel called {name!r}; kernels: {', '.join(sorted(KERNEL_FILES))}.")
    return (source_dir() / f"{stem}.cu").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _module(stem):
    """The compiled cupy.RawModule of kernels/<stem>.cu (compiled once, then memoised)."""
    cupy = get_backend("cupy")            # BackendError naming what to install when absent
    return cupy.RawModule(code=kernel_source(stem), options=NVRTC_OPTIONS)


@functools.lru_cache(maxsize=None)
def _function(name, device):
    """Kernel function name of its compiled module, loaded on CUDA device id device (looked up
    once: get_function builds a new kernel object and hashes the whole source on every call)."""
    return _module(KERNEL_FILES[name]).get_function(name)


def _launch(name, grid, block, args):
    """Run kernel name on the current CUDA stream. args: CuPy arrays and NumPy scalars, in the
    order and C types of the kernel's parameters (np.int32 for int, np.int64 for long long).
    The tests replace this function to run the same kernels on a CPU emulation of CUDA.
    """
    if any(isinstance(a, np.ndarray) for a in args):
        raise TypeError(f"The raw CUDA kernel {name} takes CuPy arrays, got a NumPy array; "
                        f"use minicnn.ops for NumPy arrays.")
    if 0 in grid:
        return
    _function(name, _device(array_module(args[0])))(grid, block, args)


# ---- helpers ---------------------------------------------------------------------------------
def _check_size(shape, name):
    if math.prod(shape) >= SIZE_LIMIT:
        raise ValueError(f"{name} would have shape {tuple(shape)}; the raw CUDA kernels take "
                         f"fewer than 2**30 elements (their indices are 32-bit).")


def _float32(a, name):
    """a as a C-contiguous float32 array; TypeError for another dtype (no silent casts)."""
    if a.dtype != np.float32:
        raise TypeError(f"The raw CUDA kernels are float32 only; {name} is {a.dtype}.")
    _check_size(a.shape, name)
    return array_module(a).ascontiguousarray(a)


@functools.lru_cache(maxsize=None)
def _zero_bias(xp, device, f):
    """A read-only (F,) float32 zero bias for a bias-free convolution, one per array module,
    device id and F (F*4 bytes each), made once instead of on every forward."""
    return xp.zeros(f, dtype=np.float32)


@functools.lru_cache(maxsize=64)
def _taps(xp, device, c, kh, kw, h, w):
    """conv2d_forward's tap table for a (C, H, W) input and a KH x KW kernel: row
    k = (ci*KH + i)*KW + j of the reduction -> (ci*H*W + i*W + j, i, j, 0), the offset of x[ci,
    i, j] from a window's corner and the tap's place in the window; int32 (K', 4), K' = K rounded
    up to TILE_K with rows no pixel is inside (i = -2**30). Built once per shape and device."""
    k = c * kh * kw
    ci, i, j = np.unravel_index(np.arange(k), (c, kh, kw))
    table = np.zeros((-(-k // TILE_K) * TILE_K, 4), dtype=np.int32)
    table[:, 1] = -2**30
    table[:k, 0], table[:k, 1], table[:k, 2] = ci * h * w + i * w + j, i, j
    return xp.asarray(table)


def _device(xp):
    """The current CUDA device id for CuPy, None for NumPy (the tests' CUDA emulation)."""
    return None if xp is np else xp.cuda.Device().id


def _ints(*values):
    return tuple(np.int32(v) for v in values)


def _blocks(total):
    """A 1-D grid for a grid-stride loop over total elements."""
    return (min(-(-total // THREADS), 65536),)


def _split_k(reduction, tiles):
    """(splits, split_size): cut backward_weight's N*OH*OW reduction into splits of split_size
    (a multiple of TILE_K) so that tiles * splits blocks keep the GPU busy.
    """
    splits = max(1, min(-(-SPLIT_K_BLOCKS // tiles), reduction // SPLIT_K_MIN))
    split_size = -(-max(reduction, 1) // splits)
    split_size = -(-split_size // TILE_K) * TILE_K
    return -(-max(reduction, 1) // split_size), split_size


# ---- im2col / col2im -------------------------------------------------------------------------
def im2col(x, kernel, stride, padding):
    """x (N, C, H, W) -> cols (N, C*KH*KW, OH*OW); as minicnn.ops.im2col."""
    xp = array_module(x)
    x = _float32(x, "x")
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel, stride, padding
    oh, ow = conv_output_size(h, kh, sh, pt, pb), conv_output_size(w, kw, sw, pl, pr)
    _check_size((n, c * kh * kw, oh * ow), "cols")
    cols = xp.empty((n, c * kh * kw, oh * ow), dtype=np.float32)
    _launch("im2col", _blocks(cols.size), (THREADS,),
            (x, cols) + _ints(n, c, h, w, kh, kw, sh, sw, pt, pl, oh, ow))
    return cols


def col2im(cols, x_shape, kernel, stride, padding):
    """cols (N, C*KH*KW, OH*OW) -> dx (N, C, H, W), the adjoint of im2col; as minicnn.ops.col2im."""
    xp = array_module(cols)
    cols = _float32(cols, "cols")
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel, stride, padding
    oh, ow = conv_output_size(h, kh, sh, pt, pb), conv_output_size(w, kw, sw, pl, pr)
    if cols.shape != (n, c * kh * kw, oh * ow):
        raise ValueError(f"cols has shape {cols.shape}, expected {(n, c * kh * kw, oh * ow)}.")
    _check_size(x_shape, "dx")
    dx = xp.empty(x_shape, dtype=np.float32)
    _launch("col2im", _blocks(dx.size), (THREADS,),
            (cols, dx) + _ints(n, c, h, w, kh, kw, sh, sw, pt, pl, oh, ow))
    return dx


# ---- convolution -----------------------------------------------------------------------------
def conv2d_forward(x, w, b, stride, padding):
    """x (N, C, H, W), w (F, C, KH, KW), b (F,) or None -> out (N, F, OH, OW); as
    minicnn.ops.conv2d_forward, but as one implicit GEMM (the im2col matrix is never built).

    cache: (x, w, stride, padding, has_bias): the input itself, not an im2col matrix
    (KH*KW times smaller).
    """
    xp = array_module(x)
    x, w = _float32(x, "x"), _float32(w, "weight")
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    b_given = b is not None
    b = _float32(b, "bias") if b_given else _zero_bias(xp, _device(xp), f)
    (sh, sw), ((pt, pb), (pl, pr)) = stride, padding
    oh, ow = conv_output_size(h, kh, sh, pt, pb), conv_output_size(wd, kw, sw, pl, pr)
    _check_size((n, f, oh, ow), "out")
    out = xp.empty((n, f, oh, ow), dtype=np.float32)
    _launch("conv2d_forward", _conv_grid(n * oh * ow, f), (CONV_THREADS,),
            (x, w, b, _taps(xp, _device(xp), c, kh, kw, h, wd), out)
            + _ints(n, c, h, wd, f, kh, kw, sh, sw, pt, pl, oh, ow))
    return out, (x, w, stride, padding, b_given)


def conv2d_backward(dout, cache, input_grad=True, weight_grad=True):
    """dout (N, F, OH, OW) -> dx (N, C, H, W) (None unless input_grad), dw (F, C, KH, KW),
    db (F,) or None (no bias; both None unless weight_grad); as minicnn.ops.conv2d_backward:
    the two kernels below, and db as a CuPy reduction.
    """
    dout = _float32(dout, "dout")
    db = dout.sum(axis=(0, 2, 3)) if cache[4] and weight_grad else None
    dx = conv2d_backward_data(dout, cache) if input_grad else None
    return dx, conv2d_backward_weight(dout, cache) if weight_grad else None, db


def _conv_grid(columns, rows, splits=1):
    """conv2d.cu's grid: one block per TILE_ROWS x TILE_COLS output tile (and split)."""
    return (-(-columns // TILE_COLS), -(-rows // TILE_ROWS), splits)


def _conv_sizes(dout, cache):
    x, w, stride, ((pt, _), (pl, _)), _ = cache
    return _ints(*x.shape, *w.shape[:1], *w.shape[2:], *stride, pt, pl, *dout.shape[2:])


def conv2d_backward_data(dout, cache):
    """dout (N, F, OH, OW) -> dx (N, C, H, W): the transposed implicit GEMM (a gather).

    Stride 1: dx is the forward convolution of dout with w flipped in (kh, kw) and transposed to
    (C, F, KH, KW), padding (KH-1-PT, KW-1-PL), so the forward kernel computes it: one flat
    reduction over F*KH*KW (padded to TILE_K once, not per tap) with coalesced weight reads.
    Larger strides: the gather, where most taps of a pixel are empty.
    """
    x, w, stride, ((pt, _), (pl, _)), _ = cache
    xp = array_module(dout)
    dout = _float32(dout, "dout")
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    dx = xp.empty(x.shape, dtype=np.float32)
    if tuple(stride) == (1, 1):
        w_flipped = xp.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, F, KH, KW)
        _launch("conv2d_forward", _conv_grid(n * h * wd, c), (CONV_THREADS,),
                (dout, w_flipped, _zero_bias(xp, _device(xp), c),
                 _taps(xp, _device(xp), f, kh, kw, *dout.shape[2:]), dx)
                + _ints(n, f, *dout.shape[2:], c, kh, kw, 1, 1, kh - 1 - pt, kw - 1 - pl, h, wd))
    else:
        _launch("conv2d_backward_data", _conv_grid(n * h * wd, c), (CONV_THREADS,),
                (dout, w, dx) + _conv_sizes(dout, cache))
    return dx


def conv2d_backward_weight(dout, cache):
    """dout (N, F, OH, OW) -> dw (F, C, KH, KW): implicit GEMM over N*OH*OW, the reduction
    split into partial sums (split-K) that are added here.
    """
    x, w = cache[:2]
    xp = array_module(dout)
    dout = _float32(dout, "dout")
    f, k = w.shape[0], math.prod(w.shape[1:])
    tiles = math.prod(_conv_grid(k, f))
    splits, split_size = _split_k(dout.shape[0] * dout.shape[2] * dout.shape[3], tiles)
    _check_size((splits, f, k), "dw partial sums")
    partial = xp.empty((splits, f, k), dtype=np.float32)          # (SPLITS, F, C*KH*KW)
    _launch("conv2d_backward_weight", _conv_grid(k, f, splits), (CONV_THREADS,),
            (x, dout, partial, np.int32(split_size)) + _conv_sizes(dout, cache))
    return (partial[0] if splits == 1 else partial.sum(axis=0)).reshape(w.shape)


# ---- max pooling -----------------------------------------------------------------------------
def maxpool2d_forward(x, kernel, stride, training=True):
    """x (N, C, H, W) -> out (N, C, OH, OW); as minicnn.ops.maxpool2d_forward.

    cache: (x.shape, argmax (N, C, OH, OW) uint8, the winning tap kh*KW + kw, kernel, stride).
    The kernel finds the winner as it takes the max (one byte a window), so training=False
    changes nothing here; it is taken for the same signature as the generic op.
    A window holding a NaN gives NaN, as minicnn.ops, and its winner is its last NaN, as in
    PyTorch (minicnn.ops's winner there is a number's tap: NaN equals nothing).
    """
    xp = array_module(x)
    x = _float32(x, "x")
    n, c, h, w = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    if kh * kw > 256:
        raise ValueError(f"The raw max-pool kernel stores taps in uint8; window {kernel} has "
                         f"{kh * kw} > 256 taps.")
    oh, ow = conv_output_size(h, kh, sh, 0, 0), conv_output_size(w, kw, sw, 0, 0)
    out = xp.empty((n, c, oh, ow), dtype=np.float32)
    argmax = xp.empty((n, c, oh, ow), dtype=np.uint8)
    _launch("maxpool2d_forward", _blocks(out.size), (THREADS,),
            (x, out, argmax) + _ints(n, c, h, w, kh, kw, sh, sw, oh, ow))
    return out, (x.shape, argmax, kernel, stride)


def maxpool2d_backward(dout, cache):
    """dout (N, C, OH, OW) -> dx (N, C, H, W); as minicnn.ops.maxpool2d_backward."""
    x_shape, argmax, kernel, stride = cache
    xp = array_module(dout)
    dout = _float32(dout, "dout")
    n, c, h, w = x_shape
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = dout.shape[2:]
    dx = xp.empty(x_shape, dtype=np.float32)
    _launch("maxpool2d_backward", _blocks(dx.size), (THREADS,),
            (dout, xp.ascontiguousarray(argmax), dx) + _ints(n, c, h, w, kh, kw, sh, sw, oh, ow))
    return dx


# ---- fused bias + ReLU -----------------------------------------------------------------------
def _channel_axes(x):
    """Every axis of x but the channel axis 1."""
    return (0,) + tuple(range(2, x.ndim))


def bias_relu_forward_reference(x, b):
    """y = max(x + b[c], 0) for x (N, C, ...) and b (C,) -> (y, mask); the spec of the fused kernel."""
    return ops.relu_forward(x + b.reshape((1, -1) + (1,) * (x.ndim - 2)))


def bias_relu_backward_reference(dy, mask):
    """dx = dy * mask, db = sum of dx over every axis but C -> (dx, db)."""
    dx = ops.relu_backward(dy, mask)
    return dx, dx.sum(axis=_channel_axes(dx))


def bias_relu_forward(x, b):
    """The fused kernel: x (N, C, ...), b (C,) -> (y, mask bool); as bias_relu_forward_reference."""
    xp = array_module(x)
    x, b = _float32(x, "x"), _float32(b, "bias")
    if x.ndim < 2 or b.shape != (x.shape[1],):
        raise ValueError(f"bias_relu_forward needs x (N, C, ...) and b (C,), got {x.shape}, {b.shape}.")
    y = xp.empty(x.shape, dtype=np.float32)
    mask = xp.empty(x.shape, dtype=bool)
    spatial = math.prod(x.shape[2:])
    by4 = spatial % 4 == 0                 # the kernel then handles 4 neighbours per thread
    _launch("bias_relu_forward", _blocks(-(-x.size // 4) if by4 else x.size), (THREADS,),
            (x, b, y, mask) + _ints(x.size, x.shape[1], spatial))
    return y, mask


def bias_relu_backward(dy, mask):
    """dy, mask (N, C, ...) -> (dx, db (C,)); as bias_relu_backward_reference."""
    xp = array_module(dy)
    dy = _float32(dy, "dy")
    dx = xp.empty(dy.shape, dtype=np.float32)
    _launch("bias_relu_backward", _blocks(-(-dy.size // 4) if dy.size % 4 == 0 else dy.size),
            (THREADS,), (dy, xp.ascontiguousarray(mask), dx, np.int32(dy.size)))
    return dx, dx.sum(axis=_channel_axes(dx))
