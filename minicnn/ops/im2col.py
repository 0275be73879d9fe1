"""im2col and its adjoint col2im: the index maths behind convolution as a matrix product.

Layout (shared with the CUDA kernels in kernels/):
    x    (N, C, H, W)                      images, NCHW
    cols (N, C*KH*KW, OH*OW)               row index (c*KH + kh)*KW + kw, column oh*OW + ow
so that a convolution is one batched GEMM, W (F, C*KH*KW) @ cols -> (N, F, OH*OW), which is
already NCHW: no transpose of the output is needed.

The loops below run over the KH*KW kernel offsets only (9 for a 3x3 kernel); each iteration
copies a strided view of the whole batch, so no Python loop ever touches a pixel.
"""
from minicnn.backend import array_module


def to_pair(value, name):
    """An int or a pair of ints -> a pair of ints (height, width)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        pair = tuple(value)
    else:
        pair = (value, value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair


def same_padding(size, kernel, stride):
    """(before, after) padding so that out = ceil(size / stride), as TensorFlow's "same".

    For stride 1 this is PyTorch's padding="same": total k-1, the odd extra on the after side.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def conv_output_size(size, kernel, stride, pad_before, pad_after):
    return (size + pad_before + pad_after - kernel) // stride + 1


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


def im2col(x, kernel, stride, padding):
    """x (N, C, H, W) -> cols (N, C*KH*KW, OH*OW).

    kernel, stride: (h, w) pairs; padding: ((top, bottom), (left, right)).
    """
    xp = array_module(x)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    oh = conv_output_size(h, kh, sh, *padding[0])
    ow = conv_output_size(w, kw, sw, *padding[1])
    xpad = pad_images(x, padding)                          # (N, C, Hp, Wp)
    cols = xp.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            # every output pixel's (i, j) tap, for the whole batch at once
            cols[:, :, i, j] = xpad[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
    return cols.reshape(n, c * kh * kw, oh * ow)


def col2im(cols, x_shape, kernel, stride, padding):
    """The adjoint of im2col: cols (N, C*KH*KW, OH*OW) -> dx (N, C, H, W).

    Each column entry is added back to the pixel it was copied from; pixels read by several
    windows (overlap) receive the sum. <im2col(x), c> == <x, col2im(c)> for all x, c.
    """
    xp = array_module(cols)
    n, c, h, w = x_shape
    (kh, kw), (sh, sw) = kernel, stride
    (pt, pb), (pl, pr) = padding
    oh = conv_output_size(h, kh, sh, pt, pb)
    ow = conv_output_size(w, kw, sw, pl, pr)
    cols6 = cols.reshape(n, c, kh, kw, oh, ow)
    dxpad = xp.zeros((n, c, h + pt + pb, w + pl + pr), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxpad[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += cols6[:, :, i, j]
    if pt == pb == pl == pr == 0:
        return dxpad
    return xp.ascontiguousarray(dxpad[:, :, pt:pt + h, pl:pl + w])
