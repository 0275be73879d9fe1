"""2-D convolution (cross-correlation, as PyTorch's) as im2col + one matrix product.

The textbook layout (CS231n's im2col_indices), one column per output pixel:
    x    (N, C, H, W)
    cols (C*KH*KW, N*OH*OW)    row (c*KH + i)*KW + j, column (n*OH + oh)*OW + ow
    out  = W (F, C*KH*KW) @ cols + b  -> (F, N*OH*OW) -> (N, F, OH, OW)
stride is a pair (sh, sw); padding is ((top, bottom), (left, right)) zeros around the image;
dilation (dh, dw) spaces the kernel's taps (tap i reads row sh*oh + dh*i: a 3x3 kernel of
dilation 2 sees a 5x5 window); groups splits the channels into independent convolutions.
The fast version is minicnn.ops.conv (channels-last memory, chunks of images on workers).
"""
from minicnn.backend import array_module


def conv_output_size(size, kernel, stride, pad_before, pad_after, dilation=1):
    """Output positions along one axis: windows of `kernel` taps, `dilation` apart (so
    dilation*(kernel - 1) + 1 wide, as PyTorch's Conv2d), that fit the padded size."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def same_padding(size, kernel, stride):
    """(before, after) padding so that out = ceil(size / stride), as TensorFlow's "same"
    (for stride 1, PyTorch's padding="same": total kernel - 1, the odd extra after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def im2col(x, kernel, stride, padding, dilation=(1, 1)):
    """Every window of x as a column: x (N, C, H, W) -> cols (C*KH*KW, N*OH*OW),

        cols[(c*KH + i)*KW + j, (n*OH + oh)*OW + ow] = xpad[n, c, sh*oh + dh*i, sw*ow + dw*j]

    kernel (KH, KW), stride (sh, sw), padding ((top, bottom), (left, right)), dilation
    (dh, dw); xpad is x with that many zeros around. The loop runs over the KH*KW taps, each
    one a strided view of the whole batch.
    """
    xp = array_module(x)
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)), (dh, dw) = kernel, stride, padding, dilation
    oh, ow = conv_output_size(h, kh, sh, pt, pb, dh), conv_output_size(w, kw, sw, pl, pr, dw)
    xpad = xp.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))       # (N, C, H+pt+pb, W+pl+pr)
    cols = xp.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            # tap (i, j) of every window: rows dh*i, dh*i + sh, ..., columns dw*j, dw*j + sw, ...
            tap = xpad[:, :, dh * i:dh * i + sh * oh:sh, dw * j:dw * j + sw * ow:sw]
            cols[:, i, j] = tap.transpose(1, 0, 2, 3)             # (C, N, OH, OW)
    return cols.reshape(c * kh * kw, n * oh * ow)


def col2im(cols, x_shape, kernel, stride, padding, dilation=(1, 1)):
    """The adjoint of im2col: cols (C*KH*KW, N*OH*OW) -> dx (N, C, H, W) = x_shape.

    Each entry is added back onto the pixel im2col copied it from: a pixel in several windows
    (stride < kernel) gets the sum, a pixel in none gets 0, entries on the padding are dropped.
    <im2col(x), c> == <x, col2im(c)> for every x and c.
    """
    xp = array_module(cols)
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)), (dh, dw) = kernel, stride, padding, dilation
    oh, ow = conv_output_size(h, kh, sh, pt, pb, dh), conv_output_size(w, kw, sw, pl, pr, dw)
    cols6 = cols.reshape(c, kh, kw, n, oh, ow)
    dxpad = xp.zeros((n, c, h + pt + pb, w + pl + pr), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            tap = cols6[:, i, j].transpose(1, 0, 2, 3)            # (N, C, OH, OW)
            dxpad[:, :, dh * i:dh * i + sh * oh:sh, dw * j:dw * j + sw * ow:sw] += tap
    return dxpad[:, :, pt:pt + h, pl:pl + w]                      # (N, C, H, W): padding cut


def conv2d_forward(x, w, b, stride, padding, dilation=(1, 1), groups=1):
    """out[n, f, oh, ow] = sum_{c,i,j} w[f, c, i, j] * xpad[n, c, sh*oh + dh*i, sw*ow + dw*j] + b[f]

    as one matrix product, out = W @ im2col(x) + b with W = w as (F, C*KH*KW).
    x (N, C, H, W), w (F, C // groups, KH, KW), b (F,) or None, stride (sh, sw),
    padding ((top, bottom), (left, right)), dilation (dh, dw) -> out (N, F, OH, OW),
    OH = (H + top + bottom - dh*(KH - 1) - 1) // sh + 1, OW likewise.
    groups: the channels and filters in `groups` equal parts, filters of part g seeing input
    channels of part g only (groups == C: depthwise), as PyTorch's Conv2d; each part is the
    ungrouped convolution, and out their outputs side by side.
    cache: x's shape, w, stride, padding, dilation, the cols, and whether there is a bias
    (grouped: ("grouped", the caches of the parts)).
    """
    if groups != 1:
        xp = array_module(x)
        f = w.shape[0] // groups                                  # filters per group
        c = x.shape[1] // groups                                  # channels per group
        parts = [conv2d_forward(x[:, g * c:(g + 1) * c], w[g * f:(g + 1) * f],
                                None if b is None else b[g * f:(g + 1) * f],
                                stride, padding, dilation) for g in range(groups)]
        out = xp.concatenate([out for out, _ in parts], axis=1)   # (N, F, OH, OW)
        return out, ("grouped", [cache for _, cache in parts])
    n, _, h, wd = x.shape
    f, _, kh, kw = w.shape
    oh = conv_output_size(h, kh, stride[0], *padding[0], dilation[0])
    ow = conv_output_size(wd, kw, stride[1], *padding[1], dilation[1])
    cols = im2col(x, (kh, kw), stride, padding, dilation)        # (C*KH*KW, N*OH*OW)
    out = w.reshape(f, -1) @ cols                                 # (F, N*OH*OW)
    if b is not None:
        out = out + b.reshape(f, 1)                               # each filter's bias
    out = out.reshape(f, n, oh, ow).transpose(1, 0, 2, 3)         # (N, F, OH, OW)
    return out, (x.shape, w, stride, padding, dilation, cols, b is not None)


def conv2d_backward(dout, cache, input_grad=True, weight_grad=True):
    """dx, dw, db of out = W @ cols + b, with dY = dout as (F, N*OH*OW):

        dW = dY @ cols^T,   db = sum of dY's columns,   dx = col2im(W^T @ dY)

    dout (N, F, OH, OW) -> dx (N, C, H, W), dw (F, C // groups, KH, KW), db (F,) (None without
    a bias). Grouped: each part's gradients from its share of dout, side by side.
    input_grad=False skips dx (returned as None): a first layer's input needs no gradient.
    weight_grad=False skips dw and db (both None): a frozen layer's weights.
    """
    if cache[0] == "grouped":
        xp = array_module(dout)
        caches = cache[1]
        f = dout.shape[1] // len(caches)                          # filters per group
        dx, dw, db = zip(*(conv2d_backward(dout[:, g * f:(g + 1) * f], part, input_grad,
                                           weight_grad) for g, part in enumerate(caches)))
        return (xp.concatenate(dx, axis=1) if input_grad else None,
                xp.concatenate(dw, axis=0) if weight_grad else None,
                None if db[0] is None else xp.concatenate(db))
    x_shape, w, stride, padding, dilation, cols, has_bias = cache
    f = w.shape[0]
    dy = dout.transpose(1, 0, 2, 3).reshape(f, -1)               # (F, N*OH*OW)
    dw = (dy @ cols.T).reshape(w.shape) if weight_grad else None  # (F, C, KH, KW)
    db = dy.sum(axis=1) if has_bias and weight_grad else None     # (F,)
    dx = None
    if input_grad:
        dcols = w.reshape(f, -1).T @ dy                           # (C*KH*KW, N*OH*OW)
        dx = col2im(dcols, x_shape, w.shape[2:], stride, padding, dilation)  # (N, C, H, W)
    return dx, dw, db
