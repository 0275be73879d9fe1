"""Max and average pooling over KH x KW windows, vectorised over the batch.

Reference: minicnn.reference.pool (im2col of each channel + a reduction, NCHW).

As in im2col, the only Python loop runs over the KH*KW offsets inside a window; each step
handles a strided view of the whole batch. Windows may overlap (stride < kernel).

Every function here works on any memory order (NCHW, or the NHWC memory that minicnn.ops.conv
hands on): the taps are strided views, and NumPy's elementwise ops keep their input's order.
"""
import numpy as np

from minicnn.parallel import workers
from minicnn.backend import array_module
from minicnn.ops.im2col import conv_output_size, to_pair


def _windows(shape, kernel, stride):
    """Yield (k, slice_h, slice_w): the k-th tap of every window, as slices of x."""
    _, _, h, w = shape
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = conv_output_size(h, kh, sh, 0, 0), conv_output_size(w, kw, sw, 0, 0)
    for i in range(kh):
        for j in range(kw):
            yield i * kw + j, slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw)


def _halving(kernel, stride):
    """True for the 2x2, stride-2 window of nearly every CNN, which max-pool takes in two
    halving steps (_maxpool2x2_forward)."""
    return tuple(kernel) == tuple(stride) == (2, 2)


def pool2d_path(op, kernel, stride):
    """The path a pooling layer takes, in words: "2x2 halving steps" for a 2x2, stride-2
    max-pool, else "strided taps" (one strided view of the batch per window tap).
    op: "max" or "avg"; kernel, stride: an int or a pair."""
    if op not in ("max", "avg"):
        raise ValueError(f"op must be 'max' or 'avg', got {op!r}.")
    kernel, stride = to_pair(kernel, "kernel"), to_pair(stride, "stride")
    return "2x2 halving steps" if op == "max" and _halving(kernel, stride) else "strided taps"


def _tiles(kernel, stride):
    """True when windows tile the image (stride == kernel): every pixel is in at most one window."""
    return tuple(kernel) == tuple(stride)


def maxpool2d_forward(x, kernel, stride, training=True):
    """x (N, C, H, W) -> out (N, C, OH, OW), the max of each window.

    Reference: minicnn.reference.maxpool2d_forward.
    Differs: strided taps in x's memory order, a uint8 winner, 2x2 in halving steps on workers.

    cache: the input shape and, per output pixel, which tap of its window won (uint8).
    Ties: the first maximum in row-major window order wins, as in PyTorch.
    training=False: the max only, cache None (inference has no backward, and finding the
    winners is about half of the work).
    """
    xp = array_module(x)
    if _halving(kernel, stride):
        return _maxpool2x2_forward(x, training)
    # The max of the taps is one np.maximum per tap (no masks, no where); the winner index is
    # found afterwards by comparing each tap with the max, last tap first so that the first
    # maximum overwrites the later ones.
    taps = [(k, x[:, :, rows, cols]) for k, rows, cols in _windows(x.shape, kernel, stride)]
    out = taps[0][1].copy()                            # (N, C, OH, OW), x's memory order
    for _, tap in taps[1:]:
        xp.maximum(out, tap, out=out)
    if not training:
        return out, None
    argmax = xp.zeros(out.shape, dtype=xp.uint8)
    for k, tap in reversed(taps):
        xp.copyto(argmax, k, where=tap == out)
    return out, (x.shape, x.strides, argmax, kernel, stride)


def _empty_like_layout(shape, strides, dtype, xp):
    """An empty array of shape with the memory order of strides (e.g. NHWC memory, NCHW shape)."""
    order = sorted(range(len(shape)), key=lambda a: -abs(strides[a]))   # outermost axis first
    inverse = [order.index(a) for a in range(len(shape))]
    return xp.empty([shape[a] for a in order], dtype=dtype).transpose(inverse)


def maxpool2d_backward(dout, cache):
    """dout (N, C, OH, OW) -> dx (N, C, H, W): each window's gradient goes to its max.

    Reference: minicnn.reference.maxpool2d_backward.
    Differs: one write per pixel when windows tile, the 2x2 path's masks, any memory order.

    dx has the memory order of the forward's input, so a channels-last net stays channels-last.
    """
    if cache[0] == "2x2":
        return _maxpool2x2_backward(dout, cache)
    x_shape, x_strides, argmax, kernel, stride = cache
    xp = array_module(dout)
    dx = _empty_like_layout(x_shape, x_strides, dout.dtype, xp)
    zero = dout.dtype.type(0)
    if _tiles(kernel, stride):
        # Non-overlapping windows: each pixel is written exactly once (no zero-fill, no +=),
        # except the rows and columns that no window covers, zeroed below.
        oh, ow = argmax.shape[2:]
        dx[:, :, kernel[0] * oh:] = 0
        dx[:, :, :, kernel[1] * ow:] = 0
        for k, rows, cols in _windows(x_shape, kernel, stride):
            xp.multiply(dout, argmax == k, out=dx[:, :, rows, cols])
        return dx
    dx[...] = zero
    for k, rows, cols in _windows(x_shape, kernel, stride):
        dx[:, :, rows, cols] += dout * (argmax == k)
    return dx


# ---- the 2x2, stride-2 max-pool of nearly every CNN, in two halving steps ---------------------
# Pool the row pairs first, then the column pairs. The row step compares whole image rows
# (W*C contiguous floats when the memory is NHWC), which NumPy streams much faster than four
# strided taps; the column step then works on half the data. Each step keeps a boolean "the
# second one won", which is all backward needs (0.75 bytes per input pixel, no index maths).

# Each worker pools its images a block at a time, about this many bytes of input: the passes
# after the first then read what the first wrote from the core's cache, not from memory
# (docs/performance.md#max-pool-blocks).
POOL_BLOCK_BYTES = 2**20


def _by_blocks(fn, x, xp):
    """A worker's fn(lo, hi) that calls fn on its images a block of POOL_BLOCK_BYTES of x at a
    time (all of them at once on a GPU, where blocks would only mean more kernel launches)."""
    block = len(x) if xp is not np else max(1, POOL_BLOCK_BYTES // max(1, x[:1].nbytes))

    def work(lo, hi):
        for s in range(lo, hi, block):
            fn(s, min(s + block, hi))
    return work


def _maxpool2x2_forward(x, training):
    """x (N, C, H, W) -> out (N, C, H//2, W//2); an odd last row or column is dropped, as PyTorch.

    The workers each pool their share of the images, a block at a time (POOL_BLOCK_BYTES). Not
    training: the two max passes only.
    """
    xp = array_module(x)
    n, c, h, w = x.shape
    oh, ow = h // 2, w // 2
    out = _empty_like_layout((n, c, oh, ow), x.strides, x.dtype, xp)
    row_second = _empty_like_layout((n, c, oh, 2 * ow), x.strides, bool, xp) if training else None
    col_second = _empty_like_layout((n, c, oh, ow), x.strides, bool, xp) if training else None

    def pool_block(lo, hi):
        xs = x[lo:hi]
        top, bottom = xs[:, :, 0:2 * oh:2, :2 * ow], xs[:, :, 1:2 * oh:2, :2 * ow]  # (n, C, OH, 2*OW)
        rows = xp.maximum(top, bottom)                 # max of each column pair of rows
        if training:
            rs, cs = row_second[lo:hi], col_second[lo:hi]
            xp.greater(bottom, top, out=rs)            # strict: on a tie the top row wins
        left, right = rows[..., 0::2], rows[..., 1::2]     # (n, C, OH, OW)
        xp.maximum(left, right, out=out[lo:hi])
        if not training:
            return
        xp.greater(right, left, out=cs)
        # Tie between the columns: the first maximum in row-major order is (0, right) when the
        # left column's maximum sits in its bottom row and the right column's in its top row.
        # Rare in conv outputs, so on the CPU the four passes that settle them run only when
        # there are; on a GPU they always run (asking would make the host wait for the GPU).
        ties = xp.equal(right, left)
        if xp is not np or ties.any():
            cs |= ties & rs[..., 0::2] & ~rs[..., 1::2]

    workers.map(_by_blocks(pool_block, x, xp), n, xp, x.size)
    return out, ("2x2", x.shape, x.strides, row_second, col_second) if training else None


def _maxpool2x2_backward(dout, cache):
    """dout (N, C, OH, OW) -> dx (N, C, H, W): dout routed to each window's winning pixel."""
    xp = array_module(dout)
    _, x_shape, x_strides, row_second, col_second = cache
    oh, ow = dout.shape[2:]
    dx = _empty_like_layout(x_shape, x_strides, dout.dtype, xp)

    def unpool_block(lo, hi):
        # second = g * won_second; first = g - second (exactly g or 0): no where().
        g, rs, d = dout[lo:hi], row_second[lo:hi], dx[lo:hi]
        drows = _empty_like_layout(rs.shape, rs.strides, dout.dtype, xp)
        left, right = drows[..., 0::2], drows[..., 1::2]       # (n, C, OH, OW) views
        xp.multiply(g, col_second[lo:hi], out=right)
        xp.subtract(g, right, out=left)
        d[:, :, 2 * oh:] = 0                                   # rows and columns no window covers
        d[:, :, :, 2 * ow:] = 0
        top, bottom = d[:, :, 0:2 * oh:2, :2 * ow], d[:, :, 1:2 * oh:2, :2 * ow]
        xp.multiply(drows, rs, out=bottom)
        xp.subtract(drows, bottom, out=top)

    workers.map(_by_blocks(unpool_block, dx, xp), len(dout), xp, dout.size * 4)
    return dx


def avgpool2d_forward(x, kernel, stride, training=True):
    """x (N, C, H, W) -> out (N, C, OH, OW), the mean of each window. cache: the input shape
    (kept whether training or not: it costs nothing).

    Reference: minicnn.reference.avgpool2d_forward.
    Differs: a sum of strided taps in x's memory order instead of im2col + mean.
    """
    out = None
    for _, rows, cols in _windows(x.shape, kernel, stride):
        out = x[:, :, rows, cols].copy() if out is None else out + x[:, :, rows, cols]
    out *= 1.0 / (kernel[0] * kernel[1])
    return out, (x.shape, kernel, stride)


def avgpool2d_backward(dout, cache):
    """dout (N, C, OH, OW) -> dx (N, C, H, W): each window's gradient shared equally by its taps.

    Reference: minicnn.reference.avgpool2d_backward.
    Differs: the share added tap by tap into strided views instead of col2im.
    """
    x_shape, kernel, stride = cache
    xp = array_module(dout)
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    share = dout * (1.0 / (kernel[0] * kernel[1]))
    for _, rows, cols in _windows(x_shape, kernel, stride):
        dx[:, :, rows, cols] += share
    return dx
