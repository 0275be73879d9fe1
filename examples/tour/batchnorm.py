"""The backprop tour, stop 3: batch normalisation, forward and backward, step by step.

    python examples/tour/batchnorm.py            (docs/tour/03-batchnorm.md explains it)

Per channel c, over its m = N*H*W values:
    mean = sum x / m,  var = sum (x - mean)^2 / m,  xhat = (x - mean) / sqrt(var + eps),
    y = gamma * xhat + beta.
Backward, with sums over the channel's m values:
    dbeta = sum dy,  dgamma = sum dy * xhat,
    dx = gamma / sqrt(var + eps) * (dy - mean(dy) - xhat * mean(dy * xhat)).
Every step is done by hand and printed with its shape; then the script checks itself against
the reference functions (minicnn/reference/batchnorm.py), centred differences
(minicnn.gradcheck) and the fast engine (minicnn.ops), and exits non-zero if a check fails.
"""
import numpy as np

import minicnn
from minicnn import ops
from minicnn.nn import BatchNorm2D
from minicnn.reference import batchnorm_backward, batchnorm_forward
from tourkit import check, rel_err, show


rng = np.random.default_rng(0)
N, C, H, W = 4, 3, 3, 3
m = N * H * W                                          # 36 values per channel
eps = 1e-5
x = 2.0 + 3.0 * rng.standard_normal((N, C, H, W))     # float64; mean ~2, spread ~3
gamma = 1.0 + 0.5 * rng.standard_normal(C)            # (C,) scale, learned
beta = 0.5 * rng.standard_normal(C)                    # (C,) shift, learned
axes = (0, 2, 3)                                       # every axis but the channel
per_channel = (1, C, 1, 1)                             # (C,) -> broadcast over N, H, W

print(f"forward: each of the {C} channels is normalised over its m = N*H*W = {m} values")
show("x", x)
mean = x.mean(axis=axes)                               # (C,)
show("mean", mean)
var = ((x - mean.reshape(per_channel)) ** 2).mean(axis=axes)   # (C,), biased: / m
show("var", var)
invstd = 1.0 / np.sqrt(var + eps)                      # (C,)
xhat = (x - mean.reshape(per_channel)) * invstd.reshape(per_channel)   # (N, C, H, W)
show("xhat", xhat)
print(f"            xhat's channels have mean {np.abs(xhat.mean(axis=axes)).max():.0e} "
      f"and variance {xhat.var(axis=axes).round(4)}")
show("gamma", gamma)
show("beta", beta)
y = gamma.reshape(per_channel) * xhat + beta.reshape(per_channel)      # (N, C, H, W)
show("y", y)

print("\nbackward: a random upstream gradient dy = dL/dy")
dy = rng.standard_normal(y.shape)                      # (N, C, H, W)
show("dy", dy)
dbeta = dy.sum(axis=axes)                              # (C,): beta is added to every value
show("dbeta", dbeta)
dgamma = (dy * xhat).sum(axis=axes)                    # (C,)
show("dgamma", dgamma)
dxhat = dy * gamma.reshape(per_channel)                # (N, C, H, W)
dx = invstd.reshape(per_channel) * (                   # (N, C, H, W)
    dxhat - dxhat.mean(axis=axes, keepdims=True)
    - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))
show("dx", dx)
print(f"            per channel, sum(dx) = {np.abs(dx.sum(axis=axes)).max():.0e}: adding a "
      f"constant to a channel's inputs")
print("            changes nothing once the mean is subtracted, so dx has no part in that "
      "direction")

print()
# 1. the steps above are what the reference functions do
y_ref, cache, (mean_ref, var_ref, m_ref) = batchnorm_forward(x, gamma, beta, eps)
dx_ref, dgamma_ref, dbeta_ref = batchnorm_backward(dy, cache)
check("by hand vs reference batchnorm_forward/backward",
      max(rel_err(y_ref, y), rel_err(mean_ref, mean), rel_err(var_ref, var),
          rel_err(dx_ref, dx), rel_err(dgamma_ref, dgamma), rel_err(dbeta_ref, dbeta)), 1e-12)
# 2. the backward is the derivative of the forward: centred differences, in float64
layer = BatchNorm2D(C, eps=eps, dtype=np.float64)
layer.params["weight"][...], layer.params["bias"][...] = gamma, beta
with minicnn.use("reference"):                         # the layer calls minicnn/reference
    errors = minicnn.gradcheck(layer, x)               # {"input", "weight", "bias"}
check("reference vs gradcheck (dx, dgamma, dbeta)", max(errors.values()), 1e-6)
# 3. the fast engine computes the same numbers, another way (on channel rows, without xhat)
y_fast, cache_fast, _ = ops.batchnorm_forward(x, gamma, beta, eps)
dx_fast, dgamma_fast, dbeta_fast = ops.batchnorm_backward(dy, cache_fast)
check("reference vs fast minicnn.ops (y, dx, dgamma, dbeta)",
      max(rel_err(y_ref, y_fast), rel_err(dx_ref, dx_fast), rel_err(dgamma_ref, dgamma_fast),
          rel_err(dbeta_ref, dbeta_fast)), 1e-10)
