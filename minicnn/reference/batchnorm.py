"""Batch normalisation (Ioffe and Szegedy 2015) over each channel of a batch.

A channel's values are x[:, c] of a (N, C) batch or x[:, c, :, :] of a (N, C, H, W) one: m = N or
N*H*W values, averaged over axis 0 or axes (0, 2, 3). Per-channel vectors (C,) are reshaped to
(1, C) or (1, C, 1, 1) to broadcast. The fast version (minicnn.ops.basic) works on channel rows
of channels-last memory, on workers, and sums the statistics over a data-parallel step's parts
(minicnn.parallel.all_sum); this one normalises over the array it is given.
"""
from minicnn.backend import array_module


def _axes(x):
    """The axes a channel's values lie along: (0,) for (N, C), (0, 2, 3) for (N, C, H, W)."""
    return (0,) if x.ndim == 2 else (0, 2, 3)


def _per_channel(v, x):
    """v (C,) -> (1, C) or (1, C, 1, 1): broadcast over x's other axes."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def batchnorm_forward(x, gamma, beta, eps):
    """y = gamma * xhat + beta,  xhat = (x - mean) / sqrt(var + eps), per channel, with the
    batch's mean and biased variance (as PyTorch in training).

    x (N, C) or (N, C, H, W), gamma, beta (C,) -> (y (x's shape), cache, (mean, var, m)):
    mean and var (C,) and m (values per channel) let the layer update its running estimates.
    cache: xhat, gamma, 1/sqrt(var + eps).
    """
    xp = array_module(x)
    axes = _axes(x)
    m = x.size // x.shape[1]                                      # N or N*H*W
    mean = x.mean(axis=axes, keepdims=True)                       # (1, C[, 1, 1])
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)        # (1, C[, 1, 1]), biased
    invstd = 1.0 / xp.sqrt(var + eps)
    xhat = (x - mean) * invstd                                    # x's shape
    y = _per_channel(gamma, x) * xhat + _per_channel(beta, x)
    return y, (xhat, gamma, invstd), (mean.reshape(-1), var.reshape(-1), m)


def batchnorm_backward(dy, cache):
    """dbeta = sum dy,  dgamma = sum dy * xhat  (sums over each channel's m values),
    dx = gamma / sqrt(var + eps) * (dy - mean(dy) - xhat * mean(dy * xhat)).

    dy (x's shape) -> dx (x's shape), dgamma (C,), dbeta (C,).
    """
    xhat, gamma, invstd = cache
    axes = _axes(dy)
    dbeta = dy.sum(axis=axes)                                     # (C,)
    dgamma = (dy * xhat).sum(axis=axes)                           # (C,)
    dy_mean = dy.mean(axis=axes, keepdims=True)                   # (1, C[, 1, 1])
    dy_xhat_mean = (dy * xhat).mean(axis=axes, keepdims=True)     # (1, C[, 1, 1])
    dx = _per_channel(gamma, dy) * invstd * (dy - dy_mean - xhat * dy_xhat_mean)
    return dx, dgamma, dbeta


def batchnorm_inference(x, gamma, beta, eps, mean, var):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the running mean and var (C,).

    x (N, C) or (N, C, H, W) -> y (x's shape). No cache: inference has no backward.
    """
    xp = array_module(x)
    xhat = (x - _per_channel(mean, x)) / xp.sqrt(_per_channel(var, x) + eps)
    return _per_channel(gamma, x) * xhat + _per_channel(beta, x)
