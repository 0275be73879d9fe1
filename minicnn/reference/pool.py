"""Max and average pooling, as im2col of each image channel on its own + a reduction; global
average pooling, a mean over each channel.

Pooling a channel is a convolution of a one-channel image without weights: reshaped to
(N*C, 1, H, W), its im2col columns (KH*KW, N*C*OH*OW) are the windows, one per output pixel
(row i*KW + j of a column is the window's tap (i, j), row-major), and pooling reduces each
column. Backward puts each window's gradient into its column and col2im adds it back to the
pixels. kernel and stride are pairs; windows may overlap (stride < kernel), and the rows and
columns at the bottom and right that no whole window covers are dropped (as PyTorch).

padding ((top, bottom), (left, right)) surrounds the image with taps that are not pixels: a
window's maximum and mean are over its real pixels only (max-pool pads with -inf, average
pooling divides by the number of real pixels: TensorFlow's "same", PyTorch's padding with
count_include_pad=False). im2col of an image of ones tells which taps are real.
The fast version is minicnn.ops.pool (tap by tap, a 2x2 path in two halving steps, workers).
"""
from minicnn.backend import array_module
from minicnn.reference.conv import col2im, conv_output_size, im2col

NO_PADDING = ((0, 0), (0, 0))


def _windows(x, kernel, stride, padding):
    """x (N, C, H, W) -> its windows (KH*KW, N*C*OH*OW) with zeros on the padding, which of
    their taps are real pixels (bool, the same shape) and the output shape (N, C, OH, OW)."""
    xp = array_module(x)
    n, c, h, w = x.shape
    cols = im2col(x.reshape(n * c, 1, h, w), kernel, stride, padding)
    ones = xp.ones((1, 1, h, w), dtype=x.dtype)
    real = im2col(ones, kernel, stride, padding) > 0              # (KH*KW, OH*OW), one image
    oh = conv_output_size(h, kernel[0], stride[0], *padding[0])
    ow = conv_output_size(w, kernel[1], stride[1], *padding[1])
    return cols, xp.tile(real, (1, n * c)), (n, c, oh, ow)


def _add_back(dcols, x_shape, kernel, stride, padding):
    """The adjoint of _windows: dcols (KH*KW, N*C*OH*OW) -> dx (N, C, H, W); entries on the
    padding are dropped."""
    n, c, h, w = x_shape
    return col2im(dcols, (n * c, 1, h, w), kernel, stride, padding).reshape(x_shape)


def maxpool2d_forward(x, kernel, stride, training=True, padding=NO_PADDING):
    """out[n, c, oh, ow] = max_{i < KH, j < KW} xpad[n, c, sh*oh + i, sw*ow + j]

    x (N, C, H, W), kernel (KH, KW), stride (sh, sw), padding ((top, bottom), (left, right))
    -> out (N, C, OH, OW), OH = (H + top + bottom - KH) // sh + 1, OW likewise; xpad is x
    with -inf around it, so a padded tap never wins (every window holds a real pixel).
    cache: which tap of each window won, (N*C*OH*OW,), the input shape, kernel, stride and
    padding; None when not training (inference has no backward).
    """
    xp = array_module(x)
    cols, real, out_shape = _windows(x, kernel, stride, padding)  # (KH*KW, N*C*OH*OW)
    cols[~real] = -xp.inf                                         # padding: -inf, never a max
    out = cols.max(axis=0).reshape(out_shape)                     # (N, C, OH, OW)
    if not training:
        return out, None
    # Ties: argmax takes the first maximum in row-major window order, as PyTorch does.
    winner = cols.argmax(axis=0)                                  # (N*C*OH*OW,)
    return out, (x.shape, winner, kernel, stride, padding)


def maxpool2d_backward(dout, cache):
    """dx[n, c, sh*oh + i - top, sw*ow + j - left] += dout[n, c, oh, ow] for the tap (i, j)
    that won

    dout (N, C, OH, OW) -> dx (N, C, H, W): each window's gradient goes to its maximum only.
    """
    xp = array_module(dout)
    x_shape, winner, kernel, stride, padding = cache
    taps = xp.arange(kernel[0] * kernel[1]).reshape(-1, 1)       # (KH*KW, 1)
    dcols = (taps == winner) * dout.reshape(1, -1)                # (KH*KW, N*C*OH*OW)
    return _add_back(dcols, x_shape, kernel, stride, padding)


def avgpool2d_forward(x, kernel, stride, training=True, padding=NO_PADDING):
    """out[n, c, oh, ow] = (1 / count[oh, ow]) * sum_{real taps (i, j)} x[n, c, sh*oh + i - top,
    sw*ow + j - left],  count[oh, ow] = the number of real (not padding) pixels in the window

    x (N, C, H, W), kernel (KH, KW), stride (sh, sw), padding ((top, bottom), (left, right))
    -> out (N, C, OH, OW); without padding count = KH*KW and out is the window's mean.
    cache: the input shape, kernel, stride, padding and the counts, (N*C*OH*OW,) (kept
    whether training or not: they cost little).
    """
    cols, real, out_shape = _windows(x, kernel, stride, padding)  # (KH*KW, N*C*OH*OW)
    count = real.sum(axis=0, dtype=x.dtype)                       # (N*C*OH*OW,)
    out = (cols.sum(axis=0) / count).reshape(out_shape)           # padding adds zeros
    return out, (x.shape, kernel, stride, padding, count)


def avgpool2d_backward(dout, cache):
    """dx[n, c, sh*oh + i - top, sw*ow + j - left] += dout[n, c, oh, ow] / count[oh, ow] for
    every real tap (i, j)

    dout (N, C, OH, OW) -> dx (N, C, H, W): each window's gradient shared equally by its real
    pixels (col2im drops the shares of the padding).
    """
    xp = array_module(dout)
    x_shape, kernel, stride, padding, count = cache
    share = dout.reshape(1, -1) / count                           # (1, N*C*OH*OW)
    dcols = xp.ones((kernel[0] * kernel[1], 1), dtype=dout.dtype) * share
    return _add_back(dcols, x_shape, kernel, stride, padding)    # (N, C, H, W)


def global_avgpool2d_forward(x):
    """out[n, c] = mean_{h, w} x[n, c, h, w]

    x (N, C, H, W) -> out (N, C): Keras's GlobalAveragePooling2D, an average pool whose window
    is the whole image. cache: the input shape.
    """
    return x.mean(axis=(2, 3)), x.shape


def global_avgpool2d_backward(dout, cache):
    """dx[n, c, h, w] = dout[n, c] / (H*W)

    dout (N, C) -> dx (N, C, H, W): each channel's gradient shared equally by its pixels.
    """
    xp = array_module(dout)
    n, c, h, w = cache
    share = dout.reshape(n, c, 1, 1) / (h * w)                    # (N, C, 1, 1)
    return xp.broadcast_to(share, cache).copy()                   # (N, C, H, W)
