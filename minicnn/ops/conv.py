"""2-D convolution (cross-correlation, as in PyTorch) as im2col + GEMMs, channels-last.

Reference: minicnn.reference.conv (the same maths as one GEMM over the whole batch, NCHW).

The layers see NCHW arrays, but the convolution works on NHWC *memory* (channels last), and
returns its output as an NCHW-shaped view of NHWC memory (out.transpose(0, 3, 1, 2)). NumPy's
elementwise ops keep the memory order of their input, so ReLU, pooling and BatchNorm pass that
layout on, and the next convolution gets its NHWC input for free. Why channels last
(docs/performance.md#channels-last-convolution):
  - im2col of NHWC memory is one strided copy whose innermost run is KW*C contiguous floats,
    not nine per-tap copies of NCHW rows of OW floats;
  - the GEMM's output rows (N*OH*OW, F) are already NHWC: no transpose of the output, ever.
A layer with only a few input channels (an RGB first layer) runs on the teaching-layout im2col
instead, cols (N, C*KH*KW, OH*OW) from minicnn/ops/im2col.py::im2col (see CHANNELS_FIRST_BELOW);
its output is NHWC memory all the same.

Work split: the batch's images are shared among minicnn.parallel's workers (one per core), and
each worker goes through its images a chunk at a time: build the chunk's im2col rows
(at most CONV_WORKSPACE_BYTES), then the GEMM that reads them while they are still in the
core's cache. Backward rebuilds each chunk from the (9x smaller) padded input instead of
keeping the matrix, and takes dx one of four ways, chosen by dx_strategy from the layer's
shapes: as a convolution, tap by tap, dcols + col2im, or not at all (input_grad=False, a first
layer, as PyTorch does). conv2d_path(...) says in words which path a layer takes.

Dilation takes the same paths, its taps dilation apart in the im2col views; its dx is always
dcols + col2im. Groups run as one ungrouped convolution per group (the reference's loop), each
written into its channels of one NHWC output: simple, not tuned (a depthwise conv of C channels
is C one-channel convolutions).
"""
import numpy as np

from minicnn.parallel import workers
from minicnn.backend import array_module
from minicnn.ops.gemm import matmul             # xp.matmul, float16 through float32 BLAS
from minicnn.ops.im2col import (col2im, col2im_nhwc, conv_output_size, im2col, im2col_nhwc,
                                pad_images, pad_nhwc, to_pair)

# The most bytes of im2col rows one worker builds at once: a chunk of a few images that stays
# in cache between the copy that builds it and the GEMMs that read it, yet gives those GEMMs
# enough rows (smaller budgets measured slower) (docs/performance.md#conv-workspace).
CONV_WORKSPACE_BYTES = 2 * 2**20

# On a GPU (CuPy arrays) a cache-sized chunk would only split the batch into many small
# kernel launches: there the budget is this, and a batch of 512 images of the CIFAR ladder's
# largest layer (64 channels @32x32, 1.2 GB of cols) runs in two chunks.
GPU_WORKSPACE_BYTES = 2**30

# A convolution of fewer input channels than this (an RGB first layer) runs in the teaching
# layout instead, cols (N, C*KH*KW, OH*OW) built from NCHW memory (_forward_channels_first): in
# NHWC memory a window row is only KW*C floats (9 for RGB), the inner loop of im2col's copy; in
# NCHW memory it is a run of OW (docs/performance.md#channels-first-first-layer).
CHANNELS_FIRST_BELOW = 8

# A stride-1 convolution with at least this many input channels takes its dx as a convolution
# or tap by tap (dx_strategy). Below it both would run GEMMs only C columns wide, and the
# convolution an im2col of dy K*K*F wide: dcols + col2im is faster (docs/performance.md#conv-dx).
# (The channels-first path, which takes dcols + col2im too, meets such layers first; the
# channels-last path sees so few channels only if CHANNELS_FIRST_BELOW is lowered.)
DX_GEMM_MIN_CHANNELS = 8

# A GEMM over the rows of many images whose two other sizes are both at most this runs as one
# GEMM per image (M = OH*OW rows) instead of one per chunk of images: OpenBLAS runs such small
# GEMMs faster (presumably its small-matrix kernels, which skip packing), deeper ones slower
# (docs/performance.md#per-image-gemms).
PER_IMAGE_GEMM_MAX_SIZE = 64


def _images_per_chunk(n, rows_per_image, k, itemsize, xp):
    """How many images' im2col rows fit in the workspace (at least one): CONV_WORKSPACE_BYTES
    for NumPy, GPU_WORKSPACE_BYTES for CuPy."""
    budget = CONV_WORKSPACE_BYTES if xp is np else GPU_WORKSPACE_BYTES
    return max(1, min(n, budget // max(1, rows_per_image * k * itemsize)))


def _cols_buffer(shape, k, dtype, xp):
    """An im2col workspace, (rows, K [+ 1]) or (images, K [+ 1], OH*OW): when its axis 1 is
    K + 1 long, its index K there is ones (the bias's column, or row)."""
    buf = xp.empty(shape, dtype=dtype)
    if shape[1] > k:
        buf[:, k] = 1
    return buf


def conv2d_forward(x, w, b, stride, padding, dilation=(1, 1), groups=1):
    """out[n, f] = sum_{c, i, j} w[f, c, i, j] * xpad[n, c, s*oh + d*i, s*ow + d*j] + b[f]

    Reference: minicnn.reference.conv2d_forward.
    Differs: NHWC memory, the bias as a GEMM column, cache-sized chunks on worker threads.

    x (N, C, H, W), w (F, C // groups, KH, KW), b (F,) or None, stride (sh, sw),
    padding ((top, bottom), (left, right)), dilation (dh, dw), groups (see the reference)
    -> out (N, F, OH, OW), an NCHW view of NHWC memory.
    cache: the padded NHWC input (backward rebuilds the cols chunk by chunk from it) and the
    GEMM-shaped weight.

    The bias rides in the GEMM: the cols get a column of ones and the weight matrix the bias as
    its last column, out = [cols 1] @ [W b]^T. Backward's dW GEMM then gives db as its last
    column. A separate out += b runs over only F floats at a time, and so does
    db = dY.sum(axis=0) (docs/performance.md#bias-in-the-gemm).
    """
    if groups != 1:
        return _forward_grouped(x, w, b, stride, padding, dilation, groups)
    if x.shape[1] < CHANNELS_FIRST_BELOW:
        return _forward_channels_first(x, w, b, stride, padding, dilation)
    xp = array_module(x)
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    (pt, pb), (pl, pr) = padding
    oh = conv_output_size(h, kh, stride[0], pt, pb, dilation[0])
    ow = conv_output_size(wd, kw, stride[1], pl, pr, dilation[1])
    k = kh * kw * c
    kb = k + (b is not None)                                     # GEMM columns: + the bias's
    # weight as (F, KH*KW*C [+ 1]), columns in the (i, j, c) order of the cols rows, then b
    w_bias = xp.empty((f, kb), dtype=w.dtype)
    w_bias[:, :k] = w.transpose(0, 2, 3, 1).reshape(f, k)
    if b is not None:
        w_bias[:, k] = b
    x_nhwc = x.transpose(0, 2, 3, 1)                             # (N, H, W, C), a view
    padded = not (pt == pb == pl == pr == 0 and x_nhwc.flags.c_contiguous)
    xpad = (xp.empty((n, h + pt + pb, wd + pl + pr, c), dtype=x.dtype) if padded
            else x_nhwc)                                         # (N, Hp, Wp, C)
    out = xp.empty((n, oh, ow, f), dtype=x.dtype)                # NHWC memory
    chunk = _images_per_chunk(n, oh * ow, kb, x.dtype.itemsize, xp)
    per_image = _per_image(kb, f)
    w_cols = xp.ascontiguousarray(w_bias.T) if per_image else w_bias.T   # (K [+ 1], F)

    def work(lo, hi):                                            # images lo:hi, one worker
        if padded:
            pad_nhwc(x[lo:hi], padding, out=xpad[lo:hi])
        buf = _cols_buffer((min(chunk, hi - lo) * oh * ow, kb), k, x.dtype, xp)
        for s in range(lo, hi, chunk):
            e = min(s + chunk, hi)
            cols = im2col_nhwc(xpad[s:e], (kh, kw), stride, buf, dilation)   # (rows, K [+ 1])
            gemms = _gemm_stack(e - s, oh * ow, per_image)       # (GEMMs, rows of each)
            matmul(cols.reshape(gemms + (kb,)), w_cols,          # out rows (rows, F), a view
                   out=out[s:e].reshape(gemms + (f,)))

    workers.map(work, n, xp)
    cache = ("channels-last", x.shape, xpad, chunk, w_bias, w.shape, stride, padding,
             b is not None, dilation)
    return out.transpose(0, 3, 1, 2), cache


def conv2d_backward(dout, cache, input_grad=True, weight_grad=True):
    """dout (N, F, OH, OW) -> dx (N, C, H, W), dw (F, C, KH, KW), db (F,) or None.

    Reference: minicnn.reference.conv2d_backward.
    Differs: NHWC memory, cols rebuilt per chunk on workers, db from the dW GEMM, four dx ways.

    input_grad=False skips dx (returned as None): a first layer's input needs no gradient.
    weight_grad=False skips dw and db (both None), and the cols: a frozen layer's weights.

    With dY = dout as (N*OH*OW, F) and cols (N*OH*OW, K), chunk by chunk of images:
    dW += dY^T @ cols,  db = sum of dY's rows, which is the last column of dY^T @ [cols 1] when
    the layer has a bias (see conv2d_forward). Each worker sums dW and db over its own images;
    the partial sums are added at the end. dx = col2im(dY @ W) in the maths; dx_strategy picks
    how it is computed: the whole batch at once as a convolution (_dx_as_conv) before the
    workers start, or chunk by chunk beside dW, tap by tap (_dx_by_taps) or as dcols + col2im
    (_dx_col2im).
    """
    if cache[0] == "grouped":
        return _backward_grouped(dout, cache[1], input_grad, weight_grad)
    if cache[0] == "channels-first":
        return _backward_channels_first(dout, cache, input_grad, weight_grad)
    xp = array_module(dout)
    _, x_shape, xpad, chunk, w_bias, w_shape, stride, padding, has_bias, dilation = cache
    n, c, h, wd = x_shape
    f, _, kh, kw = w_shape
    k, kb = kh * kw * c, w_bias.shape[1]                         # kb: k + 1 with a bias
    w_mat = w_bias[:, :k]                                        # (F, K), a view
    (pt, _), (pl, _) = padding
    dy = dout.transpose(0, 2, 3, 1)                              # (N, OH, OW, F), a view
    pixels = dy.shape[1] * dy.shape[2]                           # OH*OW: rows per image
    dw_per_image = _per_image(kb, f)

    strategy = dx_strategy(c, (kh, kw), stride, padding, input_grad, dilation)
    dx, add_dx, scratch_width = None, None, 0      # add_dx(dy_rows, dxpad, scratch): per chunk
    if strategy == "as-conv":
        dx = _dx_as_conv(dout, w_mat, (kh, kw), padding)         # (N, C, H, W), whole batch
    elif strategy == "by-taps":
        add_dx, scratch_width = _dx_by_taps(w_mat, (kh, kw)), c   # scratch: one tap's dx rows
    elif strategy == "col2im":
        add_dx, scratch_width = _dx_col2im(w_mat, (kh, kw), stride, dilation), k   # dcols
    dxpad = xp.empty(xpad.shape, dtype=dout.dtype) if add_dx else None   # NHWC memory

    def work(lo, hi):                                            # images lo:hi, one worker
        dy_part = xp.ascontiguousarray(dy[lo:hi])                # free when dout is NHWC memory
        rows = min(chunk, hi - lo) * pixels
        cols_buf = _cols_buffer((rows, kb), k, dout.dtype, xp)
        scratch = xp.empty((rows, scratch_width), dtype=dout.dtype) if add_dx else None
        dw, dw_part = xp.zeros((f, kb), dtype=dout.dtype), xp.empty((f, kb), dtype=dout.dtype)
        if add_dx:
            dxpad[lo:hi] = 0
        for s in range(lo, hi, chunk):
            e = min(s + chunk, hi)
            dy_rows = dy_part[s - lo:e - lo].reshape(-1, f)      # (rows, F)
            if add_dx:
                add_dx(dy_rows, dxpad[s:e], scratch)             # dxpad[s:e] += this chunk's
            if not weight_grad:
                continue
            cols = im2col_nhwc(xpad[s:e], (kh, kw), stride, cols_buf, dilation)  # (rows, K [+ 1])
            if dw_per_image:                                     # (images, K [+ 1], F), summed
                gemms = (e - s, pixels)                          # one GEMM per image
                dw += matmul(cols.reshape(gemms + (kb,)).transpose(0, 2, 1),
                             dy_rows.reshape(gemms + (f,))).sum(axis=0).T
            else:
                matmul(dy_rows.T, cols, out=dw_part)          # (F, K [+ 1]): dW [db]
                dw += dw_part
        return dw

    dw_bias = (sum(workers.map(work, n, xp))                    # (F, K [+ 1])
               if weight_grad or add_dx else None)
    if add_dx:
        dx = dxpad[:, pt:pt + h, pl:pl + wd, :].transpose(0, 3, 1, 2)
    if not weight_grad:
        return dx, None, None
    db = xp.ascontiguousarray(dw_bias[:, k]) if has_bias else None
    dw = dw_bias[:, :k].reshape(f, kh, kw, c).transpose(0, 3, 1, 2)   # (F, C, KH, KW)
    return dx, xp.ascontiguousarray(dw), db


# ---- dx: which way the backward takes it, and the ways ----------------------------------------
DX_STRATEGIES = ("as-conv", "by-taps", "col2im", "none")


def dx_strategy(c, kernel, stride, padding, input_grad=True, dilation=(1, 1)):
    """How conv2d_backward computes dx for c input channels, kernel (KH, KW), stride (sh, sw),
    padding ((top, bottom), (left, right)), dilation (dh, dw): one of DX_STRATEGIES.

        "none"     input_grad=False (a first layer's input needs no gradient)
        "col2im"   stride != 1, dilation != 1, or fewer than DX_GEMM_MIN_CHANNELS input
                   channels (or fewer than CHANNELS_FIRST_BELOW: the channels-first backward
                   has only this way)
        "as-conv"  stride 1 and K-1-p <= p <= K-1 for the padding p of every side (3x3 with
                   padding 1 or 2, 1x1 with none): dx is a convolution of dy
        "by-taps"  stride 1, any other padding (a valid conv): dx summed tap by tap
    A pure function of the shapes and the module's thresholds.
    """
    if not input_grad:
        return "none"
    if (tuple(stride) != (1, 1) or tuple(dilation) != (1, 1)
            or c < max(DX_GEMM_MIN_CHANNELS, CHANNELS_FIRST_BELOW)):
        return "col2im"
    flipped = _flipped_padding(kernel, padding)
    if all(0 <= q <= p for qs, ps in zip(flipped, padding) for q, p in zip(qs, ps)):
        return "as-conv"
    return "by-taps"


def _flipped_padding(kernel, padding):
    """The padding of dy under which dx is a stride-1 convolution of it: K-1-p on each side."""
    (kh, kw), ((pt, pb), (pl, pr)) = kernel, padding
    return (kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)


def _dx_as_conv(dout, w_mat, kernel, padding):
    """dx = conv(dy padded by K-1-p, the kernel flipped and transposed (C, F, KH, KW)), the
    textbook identity, for the whole batch at once through conv2d_forward.

    Chosen ("as-conv") for stride 1 when K-1-p <= p <= K-1 on every side, so that the flipped
    padding is a real (non-negative) padding no larger than the forward's. Why: its im2col and
    GEMM have the forward's shapes, and it skips col2im's nine read-modify-write passes whose
    inner loops run over only C floats (docs/performance.md#conv-dx). A valid conv would pad dy
    by K-1 on every side and do more work than by taps.
    dout (N, F, OH, OW), w_mat (F, KH*KW*C) -> dx (N, C, H, W), an NCHW view of NHWC memory.
    """
    f, k = w_mat.shape
    kh, kw = kernel
    w_flipped = w_mat.reshape(f, kh, kw, k // (kh * kw))[:, ::-1, ::-1, :].transpose(3, 0, 1, 2)
    dx, _ = conv2d_forward(dout, w_flipped, None, (1, 1), _flipped_padding(kernel, padding))
    return dx


def _dx_by_taps(w_mat, kernel):
    """dx tap by tap, chunk by chunk: -> add(dy_rows, dxpad, scratch), which adds a chunk's
    col2im(dy_rows @ W) into dxpad without the dcols matrix (_add_taps); scratch (>= rows, C).

    Chosen ("by-taps") for a stride-1 conv whose padding "as-conv" cannot take (a valid conv).
    Why: each tap's add runs over OW*C contiguous floats, where col2im's run over C
    (docs/performance.md#conv-dx).
    w_mat (F, KH*KW*C), columns in (i, j, c) order.
    """
    f, k = w_mat.shape
    kh, kw = kernel
    w_taps = array_module(w_mat).ascontiguousarray(              # (KH, KW, F, C)
        w_mat.reshape(f, kh, kw, k // (kh * kw)).transpose(1, 2, 0, 3))

    def add(dy_rows, dxpad, scratch):
        _add_taps(dy_rows, w_taps, dxpad, scratch)
    return add


def _dx_col2im(w_mat, kernel, stride, dilation):
    """dx as dcols = dY @ W and col2im, chunk by chunk: -> add(dy_rows, dxpad, scratch), which
    adds a chunk's col2im_nhwc(dy_rows @ W) into dxpad; scratch (>= rows, K) holds dcols.

    Chosen ("col2im") for any stride or dilation other than 1 (the other ways need both 1) and
    for few input channels (DX_GEMM_MIN_CHANNELS). Why: it is the general way; the dcols GEMM is one
    wide GEMM (K columns), one per image when F and K are small (PER_IMAGE_GEMM_MAX_SIZE).
    w_mat (F, KH*KW*C), columns in (i, j, c) order.
    """
    xp = array_module(w_mat)
    f, k = w_mat.shape
    per_image = _per_image(f, k)

    def add(dy_rows, dxpad, scratch):
        images = len(dxpad)
        dcols = scratch[:len(dy_rows)]                           # (rows, K) = dY @ W
        gemms = _gemm_stack(images, len(dy_rows) // images, per_image)
        matmul(dy_rows.reshape(gemms + (f,)), w_mat, out=dcols.reshape(gemms + (k,)))
        col2im_nhwc(dcols, dxpad, kernel, stride, dilation)
    return add


def _add_taps(dy_rows, w_taps, dxpad, buf):
    """dxpad (n, Hp, Wp, C) += col2im_nhwc(dy_rows @ W) for a stride-1 conv, one tap at a time.

    dy_rows (n*OH*OW, F), w_taps (KH, KW, F, C), buf (>= n*OH*OW, C) scratch.
    Tap (i, j)'s share of dx is dy_rows @ w_taps[i, j], (n, OH, OW, C), added at offset (i, j):
    both sides of that add are runs of OW*C contiguous floats, where col2im's adds run over C
    (the dcols matrix's rows interleave the taps). The GEMMs do the same multiply-adds as the
    one dcols GEMM (each one GEMM per image when F and C are at most PER_IMAGE_GEMM_MAX_SIZE).
    """
    xp = array_module(dxpad)
    n, hp, wp, c = dxpad.shape
    kh, kw = w_taps.shape[:2]
    oh, ow = hp - kh + 1, wp - kw + 1
    tap = buf[:len(dy_rows)]
    f = dy_rows.shape[1]
    gemms = _gemm_stack(n, oh * ow, _per_image(f, c))
    dy_stack, tap_stack = dy_rows.reshape(gemms + (f,)), tap.reshape(gemms + (c,))
    for i in range(kh):
        for j in range(kw):
            matmul(dy_stack, w_taps[i, j], out=tap_stack)    # (n*OH*OW, C) as (GEMMs, rows, C)
            dst = dxpad[:, i:i + oh, j:j + ow]
            xp.add(dst, tap.reshape(n, oh, ow, c), out=dst)


# ---- the path in words (model.summary()) ------------------------------------------------------
_DX_WORDS = {"as-conv": "dx as conv", "by-taps": "dx by taps", "col2im": "dx col2im",
             "none": "no dx"}


def conv2d_path(c, kernel, stride, padding, input_grad=True, dilation=1, groups=1):
    """The path a conv of c input channels takes, in words: its layout, then its dx strategy,
    e.g. "channels-first im2col; dx col2im" or "channels-last; dx as conv"; a grouped conv
    says "G groups of " and the path of each.

    kernel, stride, dilation: an int or a pair; padding: an int, a pair, or ((top, bottom),
    (left, right)) as conv2d_forward takes it. input_grad=False: "...; no dx".
    """
    kernel, stride = to_pair(kernel, "kernel"), to_pair(stride, "stride")
    dilation = to_pair(dilation, "dilation")
    if not (isinstance(padding, (tuple, list)) and all(isinstance(p, (tuple, list))
                                                       for p in padding)):
        padding = tuple((p, p) for p in to_pair(padding, "padding"))
    c //= groups                                                 # each group's channels
    layout = "channels-first im2col" if c < CHANNELS_FIRST_BELOW else "channels-last"
    dx = _DX_WORDS[dx_strategy(c, kernel, stride, padding, input_grad, dilation)]
    return (f"{groups} groups of " if groups != 1 else "") + f"{layout}; {dx}"


# ---- few input channels: the teaching layout, cols (N, C*KH*KW, OH*OW) -----------------------
def _forward_channels_first(x, w, b, stride, padding, dilation):
    """conv2d_forward for fewer than CHANNELS_FIRST_BELOW input channels: the same maths, the
    cols of each chunk of images built by minicnn.ops.im2col.im2col from NCHW memory, one GEMM
    per image, out[n] (OH*OW, F) = cols[n]^T @ [W b]^T, so the output is NHWC memory as the
    channels-last path's. cache: the padded NCHW input and the (K [+ 1], F) weight matrix."""
    xp = array_module(x)
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    oh = conv_output_size(h, kh, stride[0], *padding[0], dilation[0])
    ow = conv_output_size(wd, kw, stride[1], *padding[1], dilation[1])
    pixels, k = oh * ow, c * kh * kw
    kb = k + (b is not None)                                     # GEMM rows: + the bias's
    w_cols = xp.empty((kb, f), dtype=w.dtype)                    # rows in (c, i, j) order, b
    w_cols[:k] = w.reshape(f, k).T
    if b is not None:
        w_cols[k] = b
    xpad = pad_images(x, padding)                                # (N, C, Hp, Wp)
    out = xp.empty((n, pixels, f), dtype=x.dtype)                # NHWC memory
    chunk = _images_per_chunk(n, pixels, kb, x.dtype.itemsize, xp)

    def work(lo, hi):                                            # images lo:hi, one worker
        buf = _cols_buffer((min(chunk, hi - lo), kb, pixels), k, x.dtype, xp)
        for s in range(lo, hi, chunk):
            e = min(s + chunk, hi)
            im2col(xpad[s:e], (kh, kw), stride, _NO_PADDING, buf[:e - s], dilation)
            matmul(buf[:e - s].transpose(0, 2, 1), w_cols, out=out[s:e])

    workers.map(work, n, xp)
    cache = ("channels-first", x.shape, xpad, chunk, w_cols, w.shape, stride, padding,
             b is not None, dilation)
    return out.reshape(n, oh, ow, f).transpose(0, 3, 1, 2), cache


def _backward_channels_first(dout, cache, input_grad, weight_grad=True):
    """conv2d_backward of _forward_channels_first, per image n with dY[n] (OH*OW, F):
    [dW db]^T += cols[n] @ dY[n],  dcols[n] = W^T @ dY[n]^T,  dx = col2im(dcols) (NCHW memory,
    whose adds run along image rows). Its only dx strategies are "col2im" and "none"."""
    xp = array_module(dout)
    _, x_shape, xpad, chunk, w_cols, w_shape, stride, padding, has_bias, dilation = cache
    n, c, h, wd = x_shape
    f, _, kh, kw = w_shape
    k, kb = c * kh * kw, w_cols.shape[0]
    (pt, _), (pl, _) = padding
    dy = dout.transpose(0, 2, 3, 1)                              # (N, OH, OW, F), a view
    pixels = dy.shape[1] * dy.shape[2]
    dxpad = xp.empty(xpad.shape, dtype=dout.dtype) if input_grad else None   # NCHW memory

    def work(lo, hi):                                            # images lo:hi, one worker
        dy_part = xp.ascontiguousarray(dy[lo:hi]).reshape(hi - lo, pixels, f)
        images = min(chunk, hi - lo)
        buf = _cols_buffer((images, kb, pixels), k, dout.dtype, xp)
        dcols_buf = xp.empty((images, k, pixels), dtype=dout.dtype) if input_grad else None
        dw = xp.zeros((kb, f), dtype=dout.dtype)
        if input_grad:
            dxpad[lo:hi] = 0
        for s in range(lo, hi, chunk):
            e = min(s + chunk, hi)
            g = dy_part[s - lo:e - lo]                           # (images, OH*OW, F)
            if weight_grad:
                im2col(xpad[s:e], (kh, kw), stride, _NO_PADDING, buf[:e - s], dilation)
                dw += matmul(buf[:e - s], g).sum(axis=0)      # (K [+ 1], F): [dW db]^T
            if input_grad:
                dcols = matmul(w_cols[:k], g.transpose(0, 2, 1), out=dcols_buf[:e - s])
                col2im(dcols, (e - s, c, h, wd), (kh, kw), stride, padding, dxpad[s:e],
                       dilation)
        return dw

    dw_t = sum(workers.map(work, n, xp)) if weight_grad or input_grad else None   # (K [+ 1], F)
    dx = dxpad[:, :, pt:pt + h, pl:pl + wd] if input_grad else None
    if not weight_grad:
        return dx, None, None
    db = xp.ascontiguousarray(dw_t[k]) if has_bias else None
    dw = xp.ascontiguousarray(dw_t[:k].T).reshape(f, c, kh, kw)
    return dx, dw, db


_NO_PADDING = ((0, 0), (0, 0))


# ---- groups: one ungrouped convolution per group -----------------------------------------------
def _forward_grouped(x, w, b, stride, padding, dilation, groups):
    """conv2d_forward of a grouped conv: conv2d_forward of each group's C/groups channels and
    F/groups filters, written into its channels of one NHWC output (the layout every path
    returns). cache: ("grouped", the groups' caches)."""
    xp = array_module(x)
    c, f = x.shape[1] // groups, w.shape[0] // groups            # per group
    out, caches = None, []
    for g in range(groups):
        part, cache = conv2d_forward(x[:, g * c:(g + 1) * c], w[g * f:(g + 1) * f],
                                     None if b is None else b[g * f:(g + 1) * f],
                                     stride, padding, dilation)  # (N, F/groups, OH, OW)
        if out is None:
            out = xp.empty((len(x),) + part.shape[2:] + (w.shape[0],), dtype=x.dtype)
        out[..., g * f:(g + 1) * f] = part.transpose(0, 2, 3, 1)   # (N, OH, OW, F/groups)
        caches.append(cache)
    return out.transpose(0, 3, 1, 2), ("grouped", caches)


def _backward_grouped(dout, caches, input_grad, weight_grad):
    """conv2d_backward of _forward_grouped: each group's backward on its filters' share of
    dout; dx (NHWC memory), dw and db put together from the groups'."""
    xp = array_module(dout)
    f = dout.shape[1] // len(caches)                             # filters per group
    n, c, h, wd = caches[0][1]                                   # one group's input shape
    dx = xp.empty((n, h, wd, c * len(caches)), dtype=dout.dtype) if input_grad else None
    dws, dbs = [], []
    for g, cache in enumerate(caches):
        dx_g, dw_g, db_g = conv2d_backward(dout[:, g * f:(g + 1) * f], cache, input_grad,
                                           weight_grad)
        if input_grad:
            dx[..., g * c:(g + 1) * c] = dx_g.transpose(0, 2, 3, 1)
        dws.append(dw_g)
        dbs.append(db_g)
    return (dx.transpose(0, 3, 1, 2) if input_grad else None,
            xp.concatenate(dws) if weight_grad else None,
            xp.concatenate(dbs) if weight_grad and dbs[0] is not None else None)


def _per_image(*sizes):
    """Whether a GEMM over many images' rows, whose other sizes are `sizes`, runs one per image
    (see PER_IMAGE_GEMM_MAX_SIZE)."""
    return max(sizes) <= PER_IMAGE_GEMM_MAX_SIZE


def _gemm_stack(images, rows_per_image, per_image):
    """The (GEMMs, rows each) shape a chunk's rows take: one GEMM per image, or one in all."""
    return (images, rows_per_image) if per_image else (1, images * rows_per_image)
