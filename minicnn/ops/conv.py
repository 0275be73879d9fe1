"""2-D convolution (cross-correlation, as in PyTorch) as im2col + one batched GEMM."""
from minicnn.ops.im2col import im2col, col2im, conv_output_size


def conv2d_forward(x, w, b, stride, padding):
    """out[n, f] = sum_{c, i, j} w[f, c, i, j] * xpad[n, c, s*oh + i, s*ow + j] + b[f]

    x (N, C, H, W), w (F, C, KH, KW), b (F,) or None, stride (sh, sw),
    padding ((top, bottom), (left, right)) -> out (N, F, OH, OW).
    cache: the im2col matrix and what the backward needs to undo it.
    """
    n = x.shape[0]
    f, _, kh, kw = w.shape
    cols = im2col(x, (kh, kw), stride, padding)      # (N, C*KH*KW, OH*OW)
    out = w.reshape(f, -1) @ cols                     # (N, F, OH*OW): one GEMM per image
    if b is not None:
        out += b[:, None]
    oh = conv_output_size(x.shape[2], kh, stride[0], *padding[0])
    ow = conv_output_size(x.shape[3], kw, stride[1], *padding[1])
    return out.reshape(n, f, oh, ow), (x.shape, cols, w, stride, padding)


def conv2d_backward(dout, cache):
    """dout (N, F, OH, OW) -> dx (N, C, H, W), dw (F, C, KH, KW), db (F,).

    dw = sum_n dout_n @ cols_n^T,  dcols = W^T @ dout,  dx = col2im(dcols).
    """
    x_shape, cols, w, stride, padding = cache
    n, f = dout.shape[:2]
    dout3 = dout.reshape(n, f, -1)                            # (N, F, OH*OW)
    db = dout3.sum(axis=(0, 2))                               # (F,)
    dw = (dout3 @ cols.transpose(0, 2, 1)).sum(axis=0)        # (F, C*KH*KW)
    dcols = w.reshape(f, -1).T @ dout3                        # (N, C*KH*KW, OH*OW)
    dx = col2im(dcols, x_shape, w.shape[2:], stride, padding)
    return dx, dw.reshape(w.shape), db

