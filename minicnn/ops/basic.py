"""Dense, ReLU, softmax, dropout, batch norm and the softmax cross-entropy loss."""
from minicnn.backend import array_module


# ---- dense ---------------------------------------------------------------------------------
def dense_forward(x, w, b):
    """y = x @ w.T + b.  x (N, IN), w (OUT, IN), b (OUT,) or None -> y (N, OUT)."""
    y = x @ w.T
    if b is not None:
        y += b
    return y, (x, w)


def dense_backward(dy, cache, input_grad=True):
    """dy (N, OUT) -> dx = dy @ w (N, IN), dw = dy.T @ x (OUT, IN), db = sum_n dy (OUT,).

    input_grad=False skips dx (returned as None).
    """
    x, w = cache
    return (dy @ w if input_grad else None), dy.T @ x, dy.sum(axis=0)


# ---- ReLU ----------------------------------------------------------------------------------
def relu_forward(x):
    """y = max(x, 0). cache: the mask y > 0 only (one byte a value).

    np.maximum keeps x's memory order (NHWC stays NHWC) and, unlike x * mask, needs no
    bool-to-float conversion.
    """
    xp = array_module(x)
    y = xp.maximum(x, x.dtype.type(0))
    return y, y > 0


def relu_backward(dy, mask):
    return dy * mask


# ---- softmax -------------------------------------------------------------------------------
def log_softmax(z):
    """(N, K) -> (N, K). Subtracting the row max first keeps exp() from overflowing."""
    xp = array_module(z)
    z = z - z.max(axis=1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))


def softmax(z):
    """(N, K) -> (N, K), rows summing to 1."""
    xp = array_module(z)
    e = xp.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_backward(dy, y):
    """dx = y * (dy - sum_k dy_k y_k): the softmax Jacobian applied to dy. cache: the output y."""
    return y * (dy - (dy * y).sum(axis=1, keepdims=True))


# ---- dropout -------------------------------------------------------------------------------
def dropout_forward(x, p, rng):
    """Inverted dropout, as PyTorch: zero each value with probability p, scale the rest by 1/(1-p).

    rng: a numpy Generator; the mask is drawn on the CPU and moved to x's device.
    cache: the scaled mask.
    """
    xp = array_module(x)
    keep = rng.random(x.shape, dtype="float32") >= p
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    mask = xp.asarray(keep, dtype=x.dtype) * x.dtype.type(scale)
    return x * mask, mask


def dropout_backward(dy, mask):
    return dy * mask


# ---- batch norm ----------------------------------------------------------------------------
def _channel_rows(x):
    """x (N, C) or (N, C, H, W) -> (M, C), one row per value of each channel: a free view of
    channels-last memory (what minicnn's convs produce); a copy for NCHW memory."""
    if x.ndim == 2:
        return x
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def _like_input(rows, x):
    """(M, C) rows -> x's shape (an NCHW view of NHWC memory for 4-D x)."""
    if x.ndim == 2:
        return rows
    n, c, h, w = x.shape
    return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def _channel_sums(rows):
    """(M, C) -> (C,) column sums, as one BLAS matrix-vector product: both cores, one pass."""
    xp = array_module(rows)
    return xp.ones(rows.shape[0], dtype=rows.dtype) @ rows


def batchnorm_forward(x, gamma, beta, eps, mean=None, var=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel.

    x (N, C) or (N, C, H, W); gamma, beta (C,). With mean/var None (training) the batch's
    statistics are used (biased variance, as PyTorch) and returned so the caller can update
    its running estimates; otherwise the given running statistics are used.
    -> (y, cache, (mean, var)); cache: xhat (M, C) rows, 1/sqrt(var + eps), gamma.
    Works on x as an (M, C) matrix of channel rows, so each op streams through memory once.
    """
    xp = array_module(x)
    rows = _channel_rows(x)                               # (M, C)
    m = rows.shape[0]
    if mean is None:
        mean = _channel_sums(rows) / m
    xhat = rows - mean                                    # (M, C), becomes xhat in place
    y = xp.empty_like(xhat)
    if var is None:
        var = _channel_sums(xp.square(xhat, out=y)) / m   # y as scratch: no extra temporary
    invstd = 1.0 / xp.sqrt(var + eps)
    xhat *= invstd
    xp.multiply(xhat, gamma, out=y)
    y += beta
    return _like_input(y, x), (xhat, invstd, gamma), (mean, var)


def batchnorm_backward(dy, cache):
    """Backward of the training-mode forward (batch statistics), with m values per channel:

    dbeta = sum dy,  dgamma = sum dy * xhat,
    dx = gamma / sqrt(var + eps) * (dy - dbeta / m - xhat * dgamma / m).
    """
    xp = array_module(dy)
    xhat, invstd, gamma = cache
    rows = _channel_rows(dy)                              # (M, C)
    m = rows.shape[0]
    dbeta = _channel_sums(rows)
    dx = xp.multiply(rows, xhat)                          # scratch for dy * xhat, then dx
    dgamma = _channel_sums(dx)
    xp.multiply(xhat, dgamma / m, out=dx)
    xp.subtract(rows, dx, out=dx)
    dx -= dbeta / m
    dx *= gamma * invstd
    return _like_input(dx, dy), dgamma, dbeta


# ---- loss ----------------------------------------------------------------------------------
def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean cross-entropy of softmax(logits) against (smoothed) one-hot labels.

    logits (N, K), labels (N,) ints -> (loss, dlogits (N, K)).
    Target q = (1 - eps) * onehot + eps / K (PyTorch's label_smoothing); loss = -mean_n sum_k q log p;
    dlogits = (softmax(logits) - q) / N.
    """
    xp = array_module(logits)
    n, k = logits.shape
    logp = log_softmax(logits)                                  # (N, K), stable for |z| ~ 1e4
    q = xp.full((n, k), label_smoothing / k, dtype=logits.dtype)
    q[xp.arange(n), labels] += 1.0 - label_smoothing
    loss = -(q * logp).sum() / n
    dlogits = (xp.exp(logp) - q) / n
    return float(loss), dlogits
