"""Dense, ReLU, softmax, dropout, batch norm and the softmax cross-entropy loss.

Reference: minicnn.reference.dense, .activations, .batchnorm and .loss.

The elementwise passes over activations (ReLU, BatchNorm) run on minicnn.parallel's workers, each
on its share of the batch: NumPy would run each of them on one core.
"""
import numpy as np

from minicnn.parallel import workers
from minicnn.backend import array_module
from minicnn.ops.gemm import matmul             # xp.matmul, float16 through float32 BLAS


# ---- dense ---------------------------------------------------------------------------------
def dense_forward(x, w, b):
    """y = x @ w.T + b.  x (N, IN), w (OUT, IN), b (OUT,) or None -> y (N, OUT).

    Reference: minicnn.reference.dense_forward.
    Differs: the bias added in place (y += b), not into a new array.
    """
    y = matmul(x, w.T)
    if b is not None:
        y += b
    return y, (x, w)


def dense_backward(dy, cache, input_grad=True, weight_grad=True):
    """dy (N, OUT) -> dx = dy @ w (N, IN), dw = dy.T @ x (OUT, IN), db = sum_n dy (OUT,).

    input_grad=False skips dx (returned as None); weight_grad=False skips dw and db (None).

    Reference: minicnn.reference.dense_backward.
    Differs: nothing (BLAS does the work either way).
    """
    x, w = cache
    dx = matmul(dy, w) if input_grad else None
    return (dx, matmul(dy.T, x), dy.sum(axis=0)) if weight_grad else (dx, None, None)


# ---- ReLU ----------------------------------------------------------------------------------
def relu_forward(x, training=True):
    """y = max(x, 0). cache: the mask y > 0 only (one byte a value); None when not training.

    np.maximum keeps x's memory order (NHWC stays NHWC) and, unlike x * mask, needs no
    bool-to-float conversion.

    Reference: minicnn.reference.relu_forward.
    Differs: np.maximum into x's memory order, split over workers; the mask is y > 0.
    """
    xp = array_module(x)
    zero = x.dtype.type(0)
    if x.ndim == 0:
        return xp.maximum(x, zero), (x > zero) if training else None
    y = xp.empty_like(x)                                  # x's memory order
    mask = xp.empty_like(x, dtype=bool) if training else None

    def work(lo, hi):
        xp.maximum(x[lo:hi], zero, out=y[lo:hi])
        if training:
            xp.greater(y[lo:hi], zero, out=mask[lo:hi])

    workers.map(work, len(x), xp, x.size)
    return y, mask


def relu_backward(dy, mask):
    """dx = dy where the input was positive, else 0.

    Reference: minicnn.reference.relu_backward.
    Differs: the multiply split over workers, into dy's memory order.
    """
    xp = array_module(dy)
    if dy.ndim == 0:
        return dy * mask
    dx = xp.empty_like(dy)

    def work(lo, hi):
        xp.multiply(dy[lo:hi], mask[lo:hi], out=dx[lo:hi])

    workers.map(work, len(dy), xp, dy.size)
    return dx


# ---- softmax -------------------------------------------------------------------------------
def log_softmax(z):
    """(N, K) -> (N, K). Subtracting the row max first keeps exp() from overflowing.

    Reference: minicnn.reference.log_softmax.
    Differs: nothing (the same code: (N, K) logits are too small to speed up).
    """
    xp = array_module(z)
    z = z - z.max(axis=1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))


def softmax(z):
    """(N, K) -> (N, K), rows summing to 1.

    Reference: minicnn.reference.softmax.
    Differs: nothing (the same code).
    """
    xp = array_module(z)
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_backward(dy, y):
    """dx = y * (dy - sum_k dy_k y_k): the softmax Jacobian applied to dy. cache: the output y.

    Reference: minicnn.reference.softmax_backward.
    Differs: nothing (the same code).
    """
    return y * (dy - (dy * y).sum(axis=1, keepdims=True))


# ---- dropout -------------------------------------------------------------------------------
def dropout_forward(x, p, rng, first=0):
    """Inverted dropout, as PyTorch: zero each value with probability p, scale the rest by 1/(1-p).

    x (N, ...); rng: a numpy Generator, one seed drawn from it a call; image n's mask from a
    generator of rng's kind seeded [seed, first + n], first: x[0]'s index in the whole batch (a
    worker's part of it), else 0. The mask is drawn on the CPU and moved to x's device.
    cache: the scaled mask. The seeding rule is minicnn.reference's image_generators.

    Reference: minicnn.reference.dropout_forward.
    Differs: each image's draws go straight into one float32 buffer (no array an image).
    """
    xp = array_module(x)
    seed, bit_generator = int(rng.integers(2**63)), type(rng.bit_generator)
    draws = np.empty(x.shape, dtype=np.float32)                   # x's shape, host
    for n, row in enumerate(draws.reshape(len(x), draws[:1].size)):   # row: image n's, flat
        np.random.Generator(bit_generator([seed, first + n])).random(dtype="float32", out=row)
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    mask = xp.asarray(draws >= p, dtype=x.dtype) * x.dtype.type(scale)
    return x * mask, mask


def dropout_backward(dy, mask):
    """dx = dy * the forward's scaled mask.

    Reference: minicnn.reference.dropout_backward.
    Differs: nothing (the same code).
    """
    return dy * mask


# ---- batch norm ----------------------------------------------------------------------------
# Batch norm works on x as channel rows, (M, C) with M = N*H*W: a free view of channels-last
# memory. A per-channel vector broadcast over (M, C) makes NumPy run its inner loop over only C
# values (32 floats) at a time, far slower than a plain pass; so the rows are taken r at a
# time, (M/r, r*C), and the per-channel vectors tiled r times, r*C up to this many values
# (docs/performance.md#batchnorm-wide-rows).
WIDE_ROW = 2048


def _channel_rows(x):
    """x (N, C) or (N, C, H, W) -> (rows, r): rows (M/r, r*C), r channel rows side by side,
    r the largest power of two that divides M with r*C <= WIDE_ROW. A free view of
    channels-last memory (what minicnn's convs produce); a copy for NCHW memory."""
    c = x.shape[1]
    rows = x if x.ndim == 2 else x.transpose(0, 2, 3, 1).reshape(-1, c)
    m, r = rows.shape[0], 1
    while 2 * r * c <= WIDE_ROW and m % (2 * r) == 0:
        r *= 2
    return rows.reshape(m // r, r * c), r


def _like_input(rows, x):
    """Channel rows -> x's shape (an NCHW view of NHWC memory for 4-D x)."""
    if x.ndim == 2:
        return rows.reshape(x.shape)
    n, c, h, w = x.shape
    return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def column_sums(rows):
    """(M, K) -> (K,) column sums, as one BLAS matrix-vector product.

    rows.sum(axis=0) runs its inner loop over only K values at a time; BLAS streams the rows
    (docs/performance.md#batchnorm-sums).
    """
    xp = array_module(rows)
    return xp.ones(rows.shape[0], dtype=rows.dtype) @ rows


def column_products(a, b):
    """(M, K), (M, K) -> (K,): sum over rows of a * b, without writing a * b out.

    np.einsum's sum-of-products loop reads both once; a * b into a scratch array and then
    column_sums reads and writes one pass more (BatchNorm's sums of squares and of
    dy * (x - mean); docs/performance.md#batchnorm-sums).
    """
    return array_module(a).einsum("ij,ij->j", a, b)


def _channel_sums(rows, r):
    """Wide channel rows (M/r, r*C), or their column sums (r*C,) -> (C,): the sum over all M
    values of each channel."""
    sums = column_sums(rows) if rows.ndim == 2 else rows
    return sums.reshape(r, -1).sum(axis=0)


def batchnorm_forward(x, gamma, beta, eps):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel, with the batch's mean and
    (biased, as PyTorch) variance: the training-mode forward.

    x (N, C) or (N, C, H, W); gamma, beta (C,).
    -> (y, cache, (mean, var, m)); cache: x - mean as channel rows, 1/sqrt(var + eps), gamma,
    r, m; the statistics (and m, the values per channel) are returned so the caller can update
    its running estimates. xhat itself is never written out: y = (x - mean) * (gamma /
    sqrt(var + eps)) + beta is one multiply and one add, and backward folds 1/sqrt(var + eps)
    into its per-channel factors: one pass fewer than writing xhat
    (docs/performance.md#batchnorm-without-xhat).
    Works on x as wide channel rows (see _channel_rows), so each op streams through memory
    once; the sums are BLAS matrix-vector products and the sums of squares einsum's sums of
    products (column_products), each worker summing the range it has just written (still in its
    cache) where it can.

    Reference: minicnn.reference.batchnorm_forward.
    Differs: wide channel rows on workers, no xhat written, sums over a data-parallel step.
    """
    xp = array_module(x)
    rows, r = _channel_rows(x)                            # (M/r, r*C)
    # sums and counts over the whole batch: inside a data-parallel step
    # (minicnn.parallel.data_parallel) x is one worker's part, and all_sum adds up every
    # worker's; elsewhere they are x's own
    sums, m = workers.all_sum(_channel_sums(rows, r), rows.shape[0] * r)
    mean = sums / m                                       # (C,); m values per channel
    mean_r = xp.tile(mean, r)                             # (r*C,): a wide row's worth
    xc = xp.empty_like(rows)                              # x - mean

    def center(lo, hi):                                   # -> this range's sums of squares
        xp.subtract(rows[lo:hi], mean_r, out=xc[lo:hi])
        return column_products(xc[lo:hi], xc[lo:hi])

    squares = _channel_sums(sum(workers.map(center, len(rows), xp, rows.size)), r)   # (C,)
    var = workers.all_sum(squares)[0] / m
    invstd = 1.0 / xp.sqrt(var + eps)
    scale_r, beta_r = xp.tile(gamma * invstd, r), xp.tile(beta, r)
    y = xp.empty_like(rows)

    def normalize(lo, hi):
        xp.multiply(xc[lo:hi], scale_r, out=y[lo:hi])
        y[lo:hi] += beta_r

    workers.map(normalize, len(rows), xp, rows.size)
    return _like_input(y, x), (xc, invstd, gamma, r, m), (mean, var, m)


def batchnorm_inference(x, gamma, beta, eps, mean, var):
    """Inference-mode batch norm with the running statistics, as the per-channel affine map
    y = x * scale + shift, scale = gamma / sqrt(var + eps), shift = beta - mean * scale: one
    pass to multiply and one to add, on the workers, where the normalisation written out makes four
    (docs/performance.md#batchnorm-at-inference). No cache: inference has no backward.

    Reference: minicnn.reference.batchnorm_inference.
    Differs: one multiply and one add per value, on wide channel rows, split over workers.
    """
    xp = array_module(x)
    scale = gamma / xp.sqrt(var + eps)                    # (C,)
    shift = beta - mean * scale
    rows, r = _channel_rows(x)                            # (M/r, r*C)
    scale_r, shift_r = xp.tile(scale, r), xp.tile(shift, r)
    y = xp.empty_like(rows)

    def affine(lo, hi):
        xp.multiply(rows[lo:hi], scale_r, out=y[lo:hi])
        y[lo:hi] += shift_r

    workers.map(affine, len(rows), xp, rows.size)
    return _like_input(y, x)


def batchnorm_backward(dy, cache):
    """Backward of the training-mode forward (batch statistics), with m values per channel:

    dbeta = sum dy,  dgamma = sum dy * xhat,
    dx = gamma / sqrt(var + eps) * (dy - dbeta / m - xhat * dgamma / m),
    with xhat = xc / sqrt(var + eps) (xc = x - mean, what the forward kept) folded in:
    dgamma = sum(dy * xc) / sqrt(var + eps),
    xhat * dgamma / m = xc * (dgamma / sqrt(var + eps) / m).

    Reference: minicnn.reference.batchnorm_backward.
    Differs: xhat folded into per-channel factors, wide channel rows on workers, all_sum.
    """
    xp = array_module(dy)
    xc, invstd, gamma, r, m = cache                       # m: values per channel, whole batch
    rows, _ = _channel_rows(dy)                           # (M/r, r*C), as xc

    def product(lo, hi):                                  # -> this range's sums of dy, dy * xc
        return column_sums(rows[lo:hi]), column_products(rows[lo:hi], xc[lo:hi])

    sums = workers.map(product, len(rows), xp, rows.size)
    dbeta = _channel_sums(sum(s for s, _ in sums), r)
    dgamma = _channel_sums(sum(s for _, s in sums), r) * invstd
    # dx needs the whole batch's sums: in a data-parallel step dy is one worker's part, and
    # all_sum adds up every worker's (dgamma and dbeta stay this part's: the step adds up
    # every replica's parameter gradients)
    dbeta_all, dgamma_all = workers.all_sum(dbeta, dgamma)
    dgamma_m, dbeta_m = xp.tile(dgamma_all * invstd / m, r), xp.tile(dbeta_all / m, r)
    scale = xp.tile(gamma * invstd, r)
    dx = xp.empty_like(xc)

    def combine(lo, hi):
        d = dx[lo:hi]
        xp.multiply(xc[lo:hi], dgamma_m, out=d)
        xp.subtract(rows[lo:hi], d, out=d)
        d -= dbeta_m
        d *= scale

    workers.map(combine, len(rows), xp, rows.size)
    return _like_input(dx, dy), dgamma, dbeta


# ---- loss ----------------------------------------------------------------------------------
def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean cross-entropy of softmax(logits) against (smoothed) one-hot labels.

    logits (N, K), labels (N,) ints -> (loss, dlogits (N, K)).
    Target q = (1 - eps) * onehot + eps / K (PyTorch's label_smoothing);
    loss = -mean_n sum_k q log p;  dlogits = (softmax(logits) - q) / N.

    Reference: minicnn.reference.softmax_cross_entropy.
    Differs: q filled in place from the labels instead of a one-hot comparison matrix.
    """
    xp = array_module(logits)
    n, k = logits.shape
    logp = log_softmax(logits)                                  # (N, K), stable for |z| ~ 1e4
    q = xp.full((n, k), label_smoothing / k, dtype=logits.dtype)
    q[xp.arange(n), labels] += 1.0 - label_smoothing
    loss = -(q * logp).sum() / n
    dlogits = (xp.exp(logp) - q) / n
    return loss, dlogits
