"""2-D convolution (cross-correlation, as PyTorch's) as im2col + one matrix product.

The textbook layout (CS231n's im2col_indices), one column per output pixel:
    x    (N, C, H, W)
    cols (C*KH*KW, N*OH*OW)    row (c*KH + i)*KW + j, column (n*OH + oh)*OW + ow
    out  = W (F, C*KH*KW) @ cols + b  -> (F, N*OH*OW) -> (N, F, OH, OW)
stride is a pair (sh, sw); padding is ((top, bottom), (left, right)) zeros around the image.
The fast version is minicnn.ops.conv (channels-last memory, chunks of images on workers).
"""
from minicnn.backend import array_module


def conv_output_size(size, kernel, stride, pad_before, pad_after):
    """Output positions along one axis: windows of `kernel` that fit the padded size."""
    return (size + pad_before + pad_after - kernel) // stride + 1


def same_padding(size, kernel, stride):
    """(before, after) padding so that out = ceil(size / stride), as TensorFlow's "same"
    (for stride 1, PyTorch's padding="same": total kernel - 1, the odd extra after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def im2col(x, kernel, stride, padding):
    """Every window of x as a column: x (N, C, H, W) -> cols (C*KH*KW, N*OH*OW),

        cols[(c*KH + i)*KW + j, (n*OH + oh)*OW + ow] = xpad[n, c, sh*oh + i, sw*ow + j]

    kernel (KH, KW), stride (sh, sw), padding ((top, bottom), (left, right)); xpad is x with
    that many zeros around. The loop runs over the KH*KW taps, each one a strided view of the
    whole batch.
    """
    xp = array_module(x)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel, stride, padding
    oh, ow = conv_output_size(h, kh, sh, pt, pb), conv_output_size(w, kw, sw, pl, pr)
    xpad = xp.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))       # (N, C, H+pt+pb, W+pl+pr)
    cols = xp.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            # tap (i, j) of every window: rows i, i + sh, ..., columns j, j + sw, ...
            tap = xpad[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw]  # (N, C, OH, OW)
            cols[:, i, j] = tap.transpose(1, 0, 2, 3)             # (C, N, OH, OW)
    return cols.reshape(c * kh * kw, n * oh * ow)


def col2im(cols, x_shape, kernel, stride, padding):
    """The adjoint of im2col: cols (C*KH*KW, N*OH*OW) -> dx (N, C, H, W) = x_shape.

    Each entry is added back onto the pixel im2col copied it from: a pixel in several windows
    (stride < kernel) gets the sum, a pixel in none gets 0, entries on the padding are dropped.
    <im2col(x), c> == <x, col2im(c)> for every x and c.
    """
    xp = array_module(cols)
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel, stride, padding
    oh, ow = conv_output_size(h, kh, sh, pt, pb), conv_output_size(w, kw, sw, pl, pr)
    cols6 = cols.reshape(c, kh, kw, n, oh, ow)
    dxpad = xp.zeros((n, c, h + pt + pb, w + pl + pr), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            tap = cols6[:, i, j].transpose(1, 0, 2, 3)            # (N, C, OH, OW)
            dxpad[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += tap
    return dxpad[:, :, pt:pt + h, pl:pl + w]                      # (N, C, H, W): padding cut


def conv2d_forward(x, w, b, stride, padding):
    """out[n, f, oh, ow] = sum_{c,i,j} w[f, c, i, j] * xpad[n, c, sh*oh + i, sw*ow + j] + b[f]

    as one matrix product, out = W @ im2col(x) + b with W = w as (F, C*KH*KW).
    x (N, C, H, W), w (F, C, KH, KW), b (F,) or None, stride (sh, sw),
    padding ((top, bottom), (left, right)) -> out (N, F, OH, OW),
    OH = (H + top + bottom - KH) // sh + 1, OW likewise.
    cache: x's shape, w, stride, padding, the cols, and whether there is a bias.
    """
    n, _, h, wd = x.shape
    f, _, kh, kw = w.shape
    oh = conv_output_size(h, kh, stride[0], *padding[0])
    ow = conv_output_size(wd, kw, stride[1], *padding[1])
    cols = im2col(x, (kh, kw), stride, padding)                  # (C*KH*KW, N*OH*OW)
    out = w.reshape(f, -1) @ cols                                 # (F, N*OH*OW)
    if b is not None:
        out = out + b.reshape(f, 1)                               # each filter's bias
    out = out.reshape(f, n, oh, ow).transpose(1, 0, 2, 3)         # (N, F, OH, OW)
    return out, (x.shape, w, stride, padding, cols, b is not None)


def conv2d_backward(dout, cache, input_grad=True):
    """dx, dw, db of out = W @ cols + b, with dY = dout as (F, N*OH*OW):

        dW = dY @ cols^T,   db = sum of dY's columns,   dx = col2im(W^T @ dY)

    dout (N, F, OH, OW) -> dx (N, C, H, W), dw (F, C, KH, KW), db (F,) (None without a bias).
    input_grad=False skips dx (returned as None): a first layer's input needs no gradient.
    """
    x_shape, w, stride, padding, cols, has_bias = cache
    f = w.shape[0]
    dy = dout.transpose(1, 0, 2, 3).reshape(f, -1)               # (F, N*OH*OW)
    dw = (dy @ cols.T).reshape(w.shape)                           # (F, C, KH, KW)
    db = dy.sum(axis=1) if has_bias else None                     # (F,)
    dx = None
    if input_grad:
        dcols = w.reshape(f, -1).T @ dy                           # (C*KH*KW, N*OH*OW)
        dx = col2im(dcols, x_shape, w.shape[2:], stride, padding)  # (N, C, H, W)
    return dx, dw, db
