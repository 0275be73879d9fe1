"""im2col and its adjoint col2im: the index maths behind convolution as a matrix product.

Reference: minicnn.reference.conv (im2col, col2im: one column per output pixel of the batch).

Layout (shared with the CUDA kernels in kernels/):
    x    (N, C, H, W)                      images, NCHW
    cols (N, C*KH*KW, OH*OW)               row index (c*KH + kh)*KW + kw, column oh*OW + ow
so that a convolution is one batched GEMM, W (F, C*KH*KW) @ cols -> (N, F, OH*OW), which is
already NCHW: no transpose of the output is needed.

The loops below run over the KH*KW kernel offsets only (9 for a 3x3 kernel); each iteration
copies a strided view of the whole batch, so no Python loop ever touches a pixel.

This layout is the one to learn from (and the CUDA kernels' layout); minicnn.ops.conv uses it
for a first layer of a few (RGB) channels, whose NCHW image rows make long copies. Deeper layers
run on the channels-last twins at the bottom of this file, which measured faster there
(docs/performance.md#channels-last-convolution):
    x    (N, H, W, C)                      NHWC memory
    cols (N*OH*OW, KH*KW*C)                row (n*OH + oh)*OW + ow, column (kh*KW + kw)*C + c
"""
import numbers

from minicnn.backend import array_module


def to_pair(value, name, minimum=None):
    """An int or a pair of ints (NumPy ints too) -> a pair of Python ints (height, width), each
    at least minimum when one is given."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        pair = tuple(value)
    else:
        pair = (value, value)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}.")
    pair = tuple(int(v) for v in pair)
    if minimum is not None and min(pair) < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}.")
    return pair


def same_padding(size, kernel, stride):
    """(before, after) padding so that out = ceil(size / stride), as TensorFlow's "same".

    For stride 1 this is PyTorch's padding="same": total k-1, the odd extra on the after side.

    Reference: minicnn.reference.same_padding.
    Differs: nothing (the same formula; tests/test_reference.py checks both agree).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_output_size(size, kernel, stride, pad_before, pad_after, dilation=1):
    """Output positions along one axis: windows of `kernel` taps `dilation` apart that fit the
    padded size.

    Reference: minicnn.reference.conv_output_size.
    Differs: nothing (the same formula; tests/test_reference.py checks both agree).
    """
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def pad_images(x, padding):
    """x (N, C, H, W) -> (N, C, H+pt+pb, W+pl+pr), zeros around; x itself when no padding."""
    (pt, pb), (pl, pr) = padding
    if pt == pb == pl == pr == 0:
        return x
    xp = array_module(x)
    n, c, h, w = x.shape
    out = xp.zeros((n, c, h + pt + pb, w + pl + pr), dtype=x.dtype)
    out[:, :, pt:pt + h, pl:pl + w] = x
    return out


def im2col(x, kernel, stride, padding, out=None, dilation=(1, 1)):
    """x (N, C, H, W) -> cols (N, C*KH*KW, OH*OW).

    Reference: minicnn.reference.im2col.
    Differs: cols per image, (N, C*KH*KW, OH*OW) not (C*KH*KW, N*OH*OW); an out= buffer.

    kernel, stride, dilation: (h, w) pairs; padding: ((top, bottom), (left, right)).
    out: a buffer (N, >= C*KH*KW, OH*OW) to fill instead of a new array; its first C*KH*KW
    rows are filled and returned, the rows below are left as they are (minicnn.ops.conv keeps
    a row of ones there, which turns the bias into one more row of the GEMM).
    """
    xp = array_module(x)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh = conv_output_size(h, kh, sh, *padding[0], dh)
    ow = conv_output_size(w, kw, sw, *padding[1], dw)
    xpad = pad_images(x, padding)                          # (N, C, Hp, Wp)
    if out is None:
        out = xp.empty((n, c * kh * kw, oh * ow), dtype=x.dtype)
    cols = out[:, :c * kh * kw]
    cols6 = cols.reshape(n, c, kh, kw, oh, ow)             # a view: only axes are split
    for i in range(kh):
        for j in range(kw):
            # every output pixel's (i, j) tap, for the whole batch at once
            top, left = dh * i, dw * j
            cols6[:, :, i, j] = xpad[:, :, top:top + sh * (oh - 1) + 1:sh,
                                     left:left + sw * (ow - 1) + 1:sw]
    return cols


def col2im(cols, x_shape, kernel, stride, padding, out=None, dilation=(1, 1)):
    """The adjoint of im2col: cols (N, C*KH*KW, OH*OW) -> dx (N, C, H, W).

    Reference: minicnn.reference.col2im.
    Differs: cols per image, as this im2col's; out= a padded array to add into.

    Each column entry is added back to the pixel it was copied from; pixels read by several
    windows (overlap) receive the sum. <im2col(x), c> == <x, col2im(c)> for all x, c.
    out: a padded (N, C, H+pt+pb, W+pl+pr) array to add into, returned as it is (uncropped),
    instead of a new zeroed one cropped to (N, C, H, W).
    """
    xp = array_module(cols)
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    (pt, pb), (pl, pr) = padding
    oh = conv_output_size(h, kh, sh, pt, pb, dh)
    ow = conv_output_size(w, kw, sw, pl, pr, dw)
    cols6 = cols.reshape(n, c, kh, kw, oh, ow)
    dxpad = (xp.zeros((n, c, h + pt + pb, w + pl + pr), dtype=cols.dtype) if out is None
             else out)
    for i in range(kh):
        for j in range(kw):
            top, left = dh * i, dw * j
            dxpad[:, :, top:top + sh * (oh - 1) + 1:sh,
                  left:left + sw * (ow - 1) + 1:sw] += cols6[:, :, i, j]
    if out is not None or pt == pb == pl == pr == 0:
        return dxpad
    return xp.ascontiguousarray(dxpad[:, :, pt:pt + h, pl:pl + w])


# ---- channels-last (NHWC) twins, used by minicnn.ops.conv --------------------------------------
def pad_nhwc(x, padding, out=None):
    """x (N, C, H, W), any memory order -> (N, H+pt+pb, W+pl+pr, C) contiguous, zeros around.

    A free view when x's memory is already NHWC and there is no padding. Only the border is
    zeroed (not the whole array, which would write the interior twice). out: the array to fill
    (e.g. one worker's range of images of a larger one), or None for a new one.
    """
    xp = array_module(x)
    (pt, pb), (pl, pr) = padding
    n, c, h, w = x.shape
    if out is None and pt == pb == pl == pr == 0:
        return xp.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if out is None:
        out = xp.empty((n, h + pt + pb, w + pl + pr, c), dtype=x.dtype)
    out[:, :pt], out[:, pt + h:] = 0, 0                          # top and bottom rows
    out[:, pt:pt + h, :pl], out[:, pt:pt + h, pl + w:] = 0, 0    # left and right columns
    out[:, pt:pt + h, pl:pl + w] = x.transpose(0, 2, 3, 1)
    return out


def im2col_nhwc(xpad, kernel, stride, out=None, dilation=(1, 1)):
    """xpad (N, Hp, Wp, C) padded NHWC -> cols (N*OH*OW, KH*KW*C), in one strided copy.

    A strided view gives every window without copying, (N, OH, OW, KH, KW, C): a window row
    (KW, C) is KW*C floats contiguous in xpad, so NumPy's copy runs over long contiguous
    stretches. (as_strided rather than sliding_window_view, which on CuPy copies its window
    shape to the GPU and back on every call.) out: a reused buffer with at least N*OH*OW rows
    (its first rows are filled and returned), or None for a new array. out may have more than
    KH*KW*C columns: the extra ones on the right are left as they are (conv2d_forward keeps a
    column of ones there, which turns the bias into one more column of the GEMM).
    """
    xp = array_module(xpad)
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    n, hp, wp, c = xpad.shape
    oh, ow = conv_output_size(hp, kh, sh, 0, 0, dh), conv_output_size(wp, kw, sw, 0, 0, dw)
    s_n, s_h, s_w, s_c = xpad.strides
    win = xp.lib.stride_tricks.as_strided(                   # (N, OH, OW, KH, KW, C), a view
        xpad, (n, oh, ow, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
    rows, k = n * oh * ow, kh * kw * c
    cols = xp.empty((rows, k), dtype=xpad.dtype) if out is None else out[:rows]
    # a view of the first K columns as (N, OH, OW, KH, KW, C): only axes are split, so no copy
    cols.reshape(n, oh, ow, -1)[..., :k].reshape(win.shape)[...] = win
    return cols


def col2im_nhwc(cols, dxpad, kernel, stride, dilation=(1, 1)):
    """The adjoint of im2col_nhwc: add cols (N*OH*OW, KH*KW*C) into dxpad (N, Hp, Wp, C).

    dxpad is accumulated into (pass zeros for a plain col2im); one strided add per kernel tap.
    """
    n, hp, wp, c = dxpad.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = conv_output_size(hp, kh, sh, 0, 0, dh), conv_output_size(wp, kw, sw, 0, 0, dw)
    xp = array_module(cols)
    cols6 = cols.reshape(n, oh, ow, kh, kw, c)
    for i in range(kh):
        for j in range(kw):
            top, left = dh * i, dw * j
            dst = dxpad[:, top:top + sh * (oh - 1) + 1:sh, left:left + sw * (ow - 1) + 1:sw]
            xp.add(dst, cols6[:, :, :, i, j], out=dst)
    return dxpad
