"""Dense, ReLU, softmax, dropout, batch norm and the softmax cross-entropy loss."""
from minicnn.backend import array_module


# ---- dense ---------------------------------------------------------------------------------
def dense_forward(x, w, b):
    """y = x @ w.T + b.  x (N, IN), w (OUT, IN), b (OUT,) or None -> y (N, OUT)."""
    y = x @ w.T
    if b is not None:
        y += b
    return y, (x, w)


def dense_backward(dy, cache):
    """dy (N, OUT) -> dx = dy @ w (N, IN), dw = dy.T @ x (OUT, IN), db = sum_n dy (OUT,)."""
    x, w = cache
    return dy @ w, dy.T @ x, dy.sum(axis=0)


# ---- ReLU ----------------------------------------------------------------------------------
def relu_forward(x):
    """y = max(x, 0). cache: the mask x > 0 only (one byte a value)."""
    mask = x > 0
    return x * mask, mask


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
def _bn_axes(x):
    """Reduce over every axis but the channel: (0,) for (N, C), (0, 2, 3) for (N, C, H, W)."""
    return (0,) if x.ndim == 2 else (0, 2, 3)


def _per_channel(v, x):
    """(C,) -> a shape that broadcasts along x's channel axis."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def batchnorm_forward(x, gamma, beta, eps, mean=None, var=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel.

    x (N, C) or (N, C, H, W); gamma, beta (C,). With mean/var None (training) the batch's
    statistics are used (biased variance, as PyTorch) and returned so the caller can update
    its running estimates; otherwise the given running statistics are used.
    -> (y, cache, (mean, var)); cache: xhat, 1/sqrt(var + eps), gamma.
    """
    xp = array_module(x)
    axes = _bn_axes(x)
    if mean is None:
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
    invstd = 1.0 / xp.sqrt(var + eps)
    xhat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
    y = xhat * _per_channel(gamma, x) + _per_channel(beta, x)
    return y, (xhat, invstd, gamma), (mean, var)


def batchnorm_backward(dy, cache):
    """Backward of the training-mode forward (batch statistics), with m values per channel:

    dbeta = sum dy,  dgamma = sum dy * xhat,
    dx = gamma / sqrt(var + eps) * (dy - dbeta / m - xhat * dgamma / m).
    """
    xhat, invstd, gamma = cache
    axes = _bn_axes(dy)
    m = dy.size // dy.shape[1]
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dx = _per_channel(gamma * invstd, dy) * (
        dy - _per_channel(dbeta / m, dy) - xhat * _per_channel(dgamma / m, dy))
    return dx, dgamma, dbeta


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
