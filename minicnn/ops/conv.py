"""2-D convolution (cross-correlation, as in PyTorch) as im2col + one big GEMM, channels-last.

The layers see NCHW arrays, but the convolution works on NHWC *memory* (channels last), and
returns its output as an NCHW-shaped view of NHWC memory (out.transpose(0, 3, 1, 2)). NumPy's
elementwise ops keep the memory order of their input, so ReLU, pooling and BatchNorm pass that
layout on, and the next convolution gets its NHWC input for free. Measured on a 2-core Xeon:
  - im2col of NHWC memory is one strided copy whose innermost run is KW*C contiguous floats,
    3-10x faster than nine per-tap copies of NCHW rows of OW floats;
  - the GEMM is one big (N*OH*OW, K) @ (K, F) product (K = KH*KW*C) instead of N small ones,
    and its output is already NHWC: no transpose of the output, ever.
The slow, obvious version of the same maths is tests/reference.py::conv2d_reference; the
teaching-layout im2col (N, C*KH*KW, OH*OW) is minicnn/ops/im2col.py::im2col.

Memory: the cols matrix of a layer that would exceed CONV_WORKSPACE_BYTES is built a few images
at a time (chunks) in one buffer, and then its backward rebuilds each chunk instead of keeping
it. conv2d_backward(..., input_grad=False) skips dx for a first layer, as PyTorch does.
"""
from minicnn.backend import array_module
from minicnn.ops.im2col import col2im_nhwc, conv_output_size, im2col_nhwc, pad_nhwc

# The most bytes of im2col matrix a convolution builds at once. A layer whose whole
# (N*OH*OW, KH*KW*C) matrix is larger works through the batch a chunk of images at a time, in
# one reused buffer, and its backward rebuilds each chunk from the (9x smaller) input instead
# of keeping the matrix. Chunks this size also stay in the CPU's last-level cache between the
# copy that builds them and the GEMMs that read them: on the 2-core Xeon, 64->64 @32x32 at batch
# 128 ran fwd+bwd in ~560 ms with 16 MiB chunks vs ~1040 ms with 256 MiB (2 chunks); 4-64 MiB
# were all alike, 1 MiB slower on the 256-channel layers.
CONV_WORKSPACE_BYTES = 16 * 2**20


def to_channels_last(x):
    """(N, C, H, W) -> an (N, H, W, C) contiguous array: a free view when x's memory is NHWC."""
    xp = array_module(x)
    return xp.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _images_per_chunk(n, rows_per_image, k, itemsize):
    """How many images' im2col rows fit in CONV_WORKSPACE_BYTES (at least one)."""
    return max(1, min(n, CONV_WORKSPACE_BYTES // max(1, rows_per_image * k * itemsize)))


def conv2d_forward(x, w, b, stride, padding):
    """out[n, f] = sum_{c, i, j} w[f, c, i, j] * xpad[n, c, s*oh + i, s*ow + j] + b[f]

    x (N, C, H, W), w (F, C, KH, KW), b (F,) or None, stride (sh, sw),
    padding ((top, bottom), (left, right)) -> out (N, F, OH, OW), an NCHW view of NHWC memory.
    cache: the cols matrix (N*OH*OW, KH*KW*C) when it was built whole, else the padded NHWC
    input (backward rebuilds cols chunk by chunk); and the GEMM-shaped weight.
    """
    xp = array_module(x)
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    oh = conv_output_size(h, kh, stride[0], *padding[0])
    ow = conv_output_size(wd, kw, stride[1], *padding[1])
    k = kh * kw * c
    # weight as (F, KH*KW*C), columns in the (i, j, c) order of the cols rows (a small copy)
    w_mat = xp.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(f, k)
    xpad = pad_nhwc(x, padding)                                  # (N, Hp, Wp, C)
    out = xp.empty((n, oh, ow, f), dtype=x.dtype)                # NHWC memory
    chunk = _images_per_chunk(n, oh * ow, k, x.dtype.itemsize)
    buf = xp.empty((chunk * oh * ow, k), dtype=x.dtype)          # the im2col workspace
    for s in range(0, n, chunk):
        cols = im2col_nhwc(xpad[s:s + chunk], (kh, kw), stride, out=buf)  # (chunk*OH*OW, K)
        out_rows = out[s:s + chunk].reshape(-1, f)               # (chunk*OH*OW, F), a view
        xp.matmul(cols, w_mat.T, out=out_rows)                   # one GEMM, BLAS-shaped
        if b is not None:
            out_rows += b                                        # while the rows are in cache
    saved = buf if chunk >= n else xpad                          # cols if it was built whole
    cache = (x.shape, saved, chunk, w_mat, w.shape, stride, padding, b is not None)
    return out.transpose(0, 3, 1, 2), cache


def conv2d_backward(dout, cache, input_grad=True):
    """dout (N, F, OH, OW) -> dx (N, C, H, W), dw (F, C, KH, KW), db (F,) or None.

    input_grad=False skips dx (returned as None): a first layer's input needs no gradient.

    With dY = dout as (N*OH*OW, F) and cols (N*OH*OW, K), chunk by chunk of images:
    dW += dY^T @ cols,  dcols = dY @ W,  dx = col2im(dcols);  db = sum of dY's rows.
    """
    xp = array_module(dout)
    x_shape, saved, chunk, w_mat, w_shape, stride, padding, has_bias = cache
    n, c, h, wd = x_shape
    f, _, kh, kw = w_shape
    (pt, pb), (pl, pr) = padding
    dy = to_channels_last(dout)                                  # (N, OH, OW, F)
    db = dy.reshape(-1, f).sum(axis=0) if has_bias else None
    if not input_grad:
        dxpad = None
    elif c >= 8:
        dxpad = xp.zeros((n, h + pt + pb, wd + pl + pr, c), dtype=dout.dtype)   # NHWC memory
    else:
        # Few channels (an RGB first layer): in NHWC memory each col2im add would run over only
        # C floats at a time; in NCHW memory it runs along image rows, about 2x faster here.
        dxpad = xp.zeros((n, c, h + pt + pb, wd + pl + pr), dtype=dout.dtype).transpose(0, 2, 3, 1)
    dw_mat = xp.zeros(w_mat.shape, dtype=dout.dtype)             # (F, K)
    dw_part = xp.empty_like(dw_mat)
    rows = chunk * dy.shape[1] * dy.shape[2]
    dcols_buf = xp.empty((rows, w_mat.shape[1]), dtype=dout.dtype) if input_grad else None
    cols_buf = xp.empty((rows, w_mat.shape[1]), dtype=dout.dtype) if chunk < n else None
    for s in range(0, n, chunk):
        dy_rows = dy[s:s + chunk].reshape(-1, f)                 # (chunk*OH*OW, F)
        cols = saved if chunk >= n else im2col_nhwc(saved[s:s + chunk], (kh, kw), stride,
                                                    out=cols_buf)
        xp.matmul(dy_rows.T, cols, out=dw_part)
        dw_mat += dw_part
        if input_grad:
            dcols = xp.matmul(dy_rows, w_mat, out=dcols_buf[:len(dy_rows)])   # (chunk*OH*OW, K)
            col2im_nhwc(dcols, dxpad[s:s + chunk], (kh, kw), stride)
    dw = dw_mat.reshape(f, kh, kw, c).transpose(0, 3, 1, 2)      # (F, C, KH, KW)
    dx = dxpad[:, pt:pt + h, pl:pl + wd, :].transpose(0, 3, 1, 2) if input_grad else None
    return dx, xp.ascontiguousarray(dw), db
