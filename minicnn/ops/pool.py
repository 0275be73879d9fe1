"""Max and average pooling over KH x KW windows, vectorised over the batch; global average
pooling.

Reference: minicnn.reference.pool (im2col of each channel + a reduction, NCHW).

As in im2col, the only Python loop runs over the KH*KW offsets inside a window; each step
handles a strided view of the whole batch. Windows may overlap (stride < kernel). Padding
((top, bottom), (left, right)) pools a padded copy of the input (-inf around it for max, zeros
for the average, which then divides by each window's count of real pixels) and crops dx.

Every function here works on any memory order (NCHW, or the NHWC memory that minicnn.ops.conv
hands on): the taps are strided views, and NumPy's elementwise ops keep their input's order.
"""
import numpy as np

from minicnn.parallel import workers
from minicnn.backend import array_module
from minicnn.ops.im2col import conv_output_size, to_pair

NO_PADDING = ((0, 0), (0, 0))


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


def _as_padding(padding):
    """An int, a pair (ph, pw) or ((top, bottom), (left, right)) -> the last form, Python ints."""
    if isinstance(padding, (tuple, list)) and len(padding) == 2 \
            and all(isinstance(p, (tuple, list)) for p in padding):
        return tuple(to_pair(p, "padding", minimum=0) for p in padding)
    ph, pw = to_pair(padding, "padding", minimum=0)
    return (ph, ph), (pw, pw)


def _padded(padding):
    return _as_padding(padding) != NO_PADDING


def pool2d_path(op, kernel, stride, padding=0):
    """The path a pooling layer takes, in words: "2x2 halving steps" for a 2x2, stride-2
    max-pool, else "strided taps" (one strided view of the batch per window tap); "... of a
    padded copy" when padded.
    op: "max" or "avg"; kernel, stride: an int or a pair; padding: an int, a pair or
    ((top, bottom), (left, right)), as the layer resolved it for its input."""
    if op not in ("max", "avg"):
        raise ValueError(f"op must be 'max' or 'avg', got {op!r}.")
    kernel, stride = to_pair(kernel, "kernel"), to_pair(stride, "stride")
    path = "2x2 halving steps" if op == "max" and _halving(kernel, stride) else "strided taps"
    return path + " of a padded copy" if _padded(padding) else path


def _pad(x, padding, value):
    """x (N, C, H, W) with value around it, padding ((top, bottom), (left, right)), in x's
    memory order (a channels-last input stays channels-last)."""
    xp = array_module(x)
    (pt, pb), (pl, pr) = padding
    n, c, h, w = x.shape
    out = _empty_like_layout((n, c, h + pt + pb, w + pl + pr), x.strides, x.dtype, xp)
    out[:, :, :pt], out[:, :, pt + h:] = value, value
    out[:, :, pt:pt + h, :pl], out[:, :, pt:pt + h, pl + w:] = value, value
    out[:, :, pt:pt + h, pl:pl + w] = x
    return out


def _crop(dxpad, x_shape, padding):
    """The inverse of _pad for a gradient: the (N, C, H, W) middle of dxpad, a compact copy in
    dxpad's memory order."""
    xp = array_module(dxpad)
    (pt, _), (pl, _) = padding
    h, w = x_shape[2:]
    dx = _empty_like_layout(x_shape, dxpad.strides, dxpad.dtype, xp)
    dx[...] = dxpad[:, :, pt:pt + h, pl:pl + w]
    return dx


def _padded_shape(x_shape, padding):
    (pt, pb), (pl, pr) = padding
    n, c, h, w = x_shape
    return n, c, h + pt + pb, w + pl + pr


def _real_counts(x_shape, kernel, stride, padding, dtype, xp):
    """(OH, OW): how many real pixels (not padding) each window holds, the product of the
    counts along each axis."""
    counts = []
    for size, k, s, (before, after) in zip(x_shape[2:], kernel, stride, padding):
        start = xp.arange(conv_output_size(size, k, s, before, after)) * s - before
        counts.append(xp.minimum(start + k, size) - xp.maximum(start, 0))
    return (counts[0][:, None] * counts[1][None, :]).astype(dtype)


def _tiles(kernel, stride):
    """True when windows tile the image (stride == kernel): every pixel is in at most one window."""
    return tuple(kernel) == tuple(stride)


def maxpool2d_forward(x, kernel, stride, training=True, padding=NO_PADDING):
    """x (N, C, H, W) -> out (N, C, OH, OW), the max of each window.

    Reference: minicnn.reference.maxpool2d_forward.
    Differs: strided taps in x's memory order, a uint8 winner, 2x2 in halving steps on workers.

    cache: the input shape and, per output pixel, which tap of its window won (uint8; int32 for
    a window of more than 256 taps).
    Ties: the first maximum in row-major window order wins, as in PyTorch.
    training=False: the max only, cache None (inference has no backward, and finding the
    winners is about half of the work).
    padding ((top, bottom), (left, right)): the same paths on a copy of x with -inf around it;
    cache ("padded", x's shape, padding, the copy's cache).
    """
    xp = array_module(x)
    padding = _as_padding(padding)
    if padding != NO_PADDING:
        # -inf: a padded tap never wins (every window holds a real pixel); backward crops dx
        out, cache = maxpool2d_forward(_pad(x, padding, -xp.inf), kernel, stride, training)
        return out, ("padded", x.shape, padding, cache) if training else None
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
    argmax = xp.zeros(out.shape, dtype=xp.uint8 if len(taps) <= 256 else xp.int32)
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
    if cache[0] == "padded":               # the padded copy's gradient, then its middle
        _, x_shape, padding, padded_cache = cache
        return _crop(maxpool2d_backward(dout, padded_cache), x_shape, padding)
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


def avgpool2d_forward(x, kernel, stride, training=True, padding=NO_PADDING):
    """x (N, C, H, W) -> out (N, C, OH, OW), the mean of each window's real pixels. cache: the
    input shape, kernel, stride, padding and, when padded, the (OH, OW) counts of real pixels
    (kept whether training or not: they cost little).

    Reference: minicnn.reference.avgpool2d_forward.
    Differs: a sum of strided taps in x's memory order (of a zero-padded copy) instead of im2col.
    """
    xp = array_module(x)
    padding = _as_padding(padding)
    x_shape = x.shape
    count = None
    if padding != NO_PADDING:
        x = _pad(x, padding, 0)
        count = _real_counts(x_shape, kernel, stride, padding, x.dtype, xp)   # (OH, OW)
    out = None
    for _, rows, cols in _windows(x.shape, kernel, stride):
        out = x[:, :, rows, cols].copy() if out is None else out + x[:, :, rows, cols]
    if count is None:
        out *= 1.0 / (kernel[0] * kernel[1])
    else:
        out /= count
    return out, (x_shape, kernel, stride, padding, count)


def avgpool2d_backward(dout, cache):
    """dout (N, C, OH, OW) -> dx (N, C, H, W): each window's gradient shared equally by its
    real pixels.

    Reference: minicnn.reference.avgpool2d_backward.
    Differs: the share added tap by tap into strided views (of a padded dx, cropped) not col2im.
    """
    x_shape, kernel, stride, padding, count = cache
    xp = array_module(dout)
    dx = xp.zeros(_padded_shape(x_shape, padding), dtype=dout.dtype)
    share = dout * (1.0 / (kernel[0] * kernel[1])) if count is None else dout / count
    for _, rows, cols in _windows(dx.shape, kernel, stride):
        dx[:, :, rows, cols] += share
    return dx if count is None else _crop(dx, x_shape, padding)


def global_avgpool2d_forward(x):
    """x (N, C, H, W) -> out (N, C), the mean of each channel. cache: the input's shape and
    memory order.

    Reference: minicnn.reference.global_avgpool2d_forward.
    Differs: dx in the memory order of the forward's input (the mean is the reference's: NumPy
    reduces an NCHW view of channels-last memory as fast as channels-last rows of it).
    """
    return x.mean(axis=(2, 3)), (x.shape, x.strides)


def global_avgpool2d_backward(dout, cache):
    """dout (N, C) -> dx (N, C, H, W) = dout / (H*W) at every pixel of its channel.

    Reference: minicnn.reference.global_avgpool2d_backward.
    Differs: dx in the memory order of the forward's input, so a channels-last net stays so.
    """
    x_shape, x_strides = cache
    xp = array_module(dout)
    dx = _empty_like_layout(x_shape, x_strides, dout.dtype, xp)
    dx[...] = (dout * (1.0 / (x_shape[2] * x_shape[3])))[:, :, None, None]
    return dx
