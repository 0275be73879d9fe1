"""Max and average pooling over KH x KW windows, vectorised over the batch.

As in im2col, the only Python loop runs over the KH*KW offsets inside a window; each step
handles a strided view of the whole batch. Windows may overlap (stride < kernel).
"""
from minicnn.backend import array_module
from minicnn.ops.im2col import conv_output_size


def _windows(shape, kernel, stride):
    """Yield (k, slice_h, slice_w): the k-th tap of every window, as slices of x."""
    _, _, h, w = shape
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = conv_output_size(h, kh, sh, 0, 0), conv_output_size(w, kw, sw, 0, 0)
    for i in range(kh):
        for j in range(kw):
            yield i * kw + j, slice(i, i + sh * (oh - 1) + 1, sh), slice(j, j + sw * (ow - 1) + 1, sw)


def maxpool2d_forward(x, kernel, stride):
    """x (N, C, H, W) -> out (N, C, OH, OW), the max of each window.

    cache: the input shape and, per output pixel, which tap of its window won (uint8).
    Ties: the first maximum in row-major window order wins, as in PyTorch.
    """
    xp = array_module(x)
    out = argmax = None
    for k, rows, cols in _windows(x.shape, kernel, stride):
        tap = x[:, :, rows, cols]                      # (N, C, OH, OW)
        if out is None:
            out = tap.copy()
            argmax = xp.zeros(out.shape, dtype=xp.uint8)
        else:
            better = tap > out                         # strict: earlier taps keep ties
            out = xp.where(better, tap, out)
            argmax[better] = k
    return out, (x.shape, argmax, kernel, stride)


def maxpool2d_backward(dout, cache):
    """dout (N, C, OH, OW) -> dx (N, C, H, W): each window's gradient goes to its max."""
    x_shape, argmax, kernel, stride = cache
    xp = array_module(dout)
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    for k, rows, cols in _windows(x_shape, kernel, stride):
        dx[:, :, rows, cols] += dout * (argmax == k)
    return dx


def avgpool2d_forward(x, kernel, stride):
    """x (N, C, H, W) -> out (N, C, OH, OW), the mean of each window. cache: the input shape."""
    out = None
    for _, rows, cols in _windows(x.shape, kernel, stride):
        out = x[:, :, rows, cols].copy() if out is None else out + x[:, :, rows, cols]
    out *= 1.0 / (kernel[0] * kernel[1])
    return out, (x.shape, kernel, stride)


def avgpool2d_backward(dout, cache):
    """dout (N, C, OH, OW) -> dx (N, C, H, W): each window's gradient shared equally by its taps."""
    x_shape, kernel, stride = cache
    xp = array_module(dout)
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    share = dout * (1.0 / (kernel[0] * kernel[1]))
    for _, rows, cols in _windows(x_shape, kernel, stride):
        dx[:, :, rows, cols] += share
    return dx
