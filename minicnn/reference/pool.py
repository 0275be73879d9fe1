"""Max and average pooling, as im2col of each image channel on its own + a reduction.

Pooling a channel is a convolution of a one-channel image without weights: reshaped to
(N*C, 1, H, W), its im2col columns (KH*KW, N*C*OH*OW) are the windows, one per output pixel
(row i*KW + j of a column is the window's tap (i, j), row-major), and pooling reduces each
column. Backward puts each window's gradient into its column and col2im adds it back to the
pixels. kernel and stride are pairs; windows may overlap (stride < kernel), and the rows and
columns at the bottom and right that no whole window covers are dropped (as PyTorch).
The fast version is minicnn.ops.pool (tap by tap, a 2x2 path in two halving steps, workers).
"""
from minicnn.backend import array_module
from minicnn.reference.conv import col2im, im2col

NO_PADDING = ((0, 0), (0, 0))


def _windows(x, kernel, stride):
    """x (N, C, H, W) -> its windows (KH*KW, N*C*OH*OW) and the output shape (N, C, OH, OW)."""
    n, c, h, w = x.shape
    cols = im2col(x.reshape(n * c, 1, h, w), kernel, stride, NO_PADDING)
    oh, ow = (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1
    return cols, (n, c, oh, ow)


def _add_back(dcols, x_shape, kernel, stride):
    """The adjoint of _windows: dcols (KH*KW, N*C*OH*OW) -> dx (N, C, H, W)."""
    n, c, h, w = x_shape
    return col2im(dcols, (n * c, 1, h, w), kernel, stride, NO_PADDING).reshape(x_shape)


def maxpool2d_forward(x, kernel, stride, training=True):
    """out[n, c, oh, ow] = max_{i < KH, j < KW} x[n, c, sh*oh + i, sw*ow + j]

    x (N, C, H, W), kernel (KH, KW), stride (sh, sw) -> out (N, C, OH, OW),
    OH = (H - KH) // sh + 1, OW likewise.
    cache: which tap of each window won, (N*C*OH*OW,), and the input shape; None when not
    training (inference has no backward).
    """
    cols, out_shape = _windows(x, kernel, stride)                 # (KH*KW, N*C*OH*OW)
    out = cols.max(axis=0).reshape(out_shape)                     # (N, C, OH, OW)
    if not training:
        return out, None
    # Ties: argmax takes the first maximum in row-major window order, as PyTorch does.
    winner = cols.argmax(axis=0)                                  # (N*C*OH*OW,)
    return out, (x.shape, winner, kernel, stride)


def maxpool2d_backward(dout, cache):
    """dx[n, c, sh*oh + i, sw*ow + j] += dout[n, c, oh, ow] for the tap (i, j) that won

    dout (N, C, OH, OW) -> dx (N, C, H, W): each window's gradient goes to its maximum only.
    """
    xp = array_module(dout)
    x_shape, winner, kernel, stride = cache
    taps = xp.arange(kernel[0] * kernel[1]).reshape(-1, 1)       # (KH*KW, 1)
    dcols = (taps == winner) * dout.reshape(1, -1)                # (KH*KW, N*C*OH*OW)
    return _add_back(dcols, x_shape, kernel, stride)


def avgpool2d_forward(x, kernel, stride, training=True):
    """out[n, c, oh, ow] = mean_{i < KH, j < KW} x[n, c, sh*oh + i, sw*ow + j]

    x (N, C, H, W), kernel (KH, KW), stride (sh, sw) -> out (N, C, OH, OW).
    cache: the input shape, kernel and stride (kept whether training or not: they cost nothing).
    """
    cols, out_shape = _windows(x, kernel, stride)                 # (KH*KW, N*C*OH*OW)
    out = cols.mean(axis=0).reshape(out_shape)                    # (N, C, OH, OW)
    return out, (x.shape, kernel, stride)


def avgpool2d_backward(dout, cache):
    """dx[n, c, sh*oh + i, sw*ow + j] += dout[n, c, oh, ow] / (KH*KW) for every tap (i, j)

    dout (N, C, OH, OW) -> dx (N, C, H, W): each window's gradient shared equally by its taps.
    """
    xp = array_module(dout)
    x_shape, kernel, stride = cache
    taps = kernel[0] * kernel[1]
    share = dout.reshape(1, -1) / taps                            # (1, N*C*OH*OW)
    dcols = xp.ones((taps, 1), dtype=dout.dtype) * share          # (KH*KW, N*C*OH*OW)
    return _add_back(dcols, x_shape, kernel, stride)
