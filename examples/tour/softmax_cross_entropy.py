"""The backprop tour, stop 4: softmax and the cross-entropy loss, forward and backward.

    python examples/tour/softmax_cross_entropy.py    (docs/tour/04-softmax-cross-entropy.md)

Forward:  p = softmax(z) row by row;  loss = -1/N sum_n log p[n, label_n].
Backward: dz = (p - onehot) / N, which is what the chain rule through log and softmax gives
          (softmax_backward of dL/dp = -onehot / (N p)), simplified.
Every step is done by hand and printed with its shape; then the script checks itself against
the reference functions (minicnn/reference/loss.py, activations.py), centred differences
(minicnn.gradcheck) and the fast engine (minicnn.ops), and exits non-zero if a check fails.
"""
import numpy as np

import minicnn
from minicnn import ops
from minicnn.nn import Softmax, SoftmaxCrossEntropy
from minicnn.reference import log_softmax, softmax, softmax_backward, softmax_cross_entropy
from tourkit import check, rel_err, show as show_first


def show(name, a):
    show_first(name, a, count=5)               # a row of 5 classes, whole


rng = np.random.default_rng(0)
N, K = 4, 5                                          # 4 examples, 5 classes
z = 2.0 * rng.standard_normal((N, K))                # logits, float64
labels = np.array([0, 3, 1, 3])                      # (N,) the right class of each example

print("forward: p = softmax(z), loss = mean of -log p[n, label]")
show("z", z)
show("labels", labels)
e = np.exp(z - z.max(axis=1, keepdims=True))         # (N, K); the max is subtracted so that
p = e / e.sum(axis=1, keepdims=True)                 # exp never overflows (p is unchanged)
show("p", p)
print(f"            each row sums to 1: {p.sum(axis=1).round(12)}")
logp = np.log(p)                                     # (N, K) (log_softmax does it stably)
picked = logp[np.arange(N), labels]                  # (N,) log p of the right class
show("log p[y]", picked)
loss = -picked.mean()                                # a number
print(f"  loss      {loss:.4f}   (a guess of 1/K for every class would give log K = "
      f"{np.log(K):.4f})")

print("\nbackward: the loss is where backprop starts (dL/dloss = 1)")
onehot = np.eye(K)[labels]                           # (N, K): 1 at the right class
show("onehot", onehot)
dz = (p - onehot) / N                                # (N, K): the fused gradient
show("dz", dz)
print("            the chain rule, step by step: dL/dp = -onehot / (N p), then softmax's "
      "backward")
dp = -onehot / (N * p)                               # (N, K): d(-log p[y]) / dp, averaged
dz_chain = softmax_backward(dp, p)                   # p * (dp - sum_k dp_k p_k)
show("dz chain", dz_chain)
print(f"            each row of dz sums to {np.abs(dz.sum(axis=1)).max():.0e}: raising all of a "
      f"row's logits together changes no p")

print("\nsoftmax alone, with a random upstream gradient dy = dL/dp")
dy = rng.standard_normal((N, K))                     # (N, K), not all ones
show("dy", dy)
dz_soft = p * (dy - (dy * p).sum(axis=1, keepdims=True))   # (N, K): (diag(p) - p p^T) dy
show("dz", dz_soft)

print()
# 1. the steps above are what the reference functions do
loss_ref, dz_ref = softmax_cross_entropy(z, labels)
check("by hand vs reference softmax_cross_entropy (loss, dz)",
      max(rel_err(loss_ref, loss), rel_err(dz_ref, dz)), 1e-12)
check("by hand vs reference softmax, log_softmax, softmax_backward",
      max(rel_err(softmax(z), p), rel_err(log_softmax(z), logp),
          rel_err(softmax_backward(dy, p), dz_soft)), 1e-12)
check("fused (p - onehot) / N vs the chain rule through softmax", rel_err(dz, dz_chain), 1e-12)
# 2. the backward is the derivative of the forward: centred differences, in float64
with minicnn.use("reference"):                       # the loss and layer call minicnn/reference
    err_loss = minicnn.gradcheck(SoftmaxCrossEntropy(), z, labels)["input"]
    err_smooth = minicnn.gradcheck(SoftmaxCrossEntropy(label_smoothing=0.1), z, labels)["input"]
    err_softmax = minicnn.gradcheck(Softmax(), z)["input"]       # a random upstream gradient
check("reference vs gradcheck (loss, loss with label smoothing, softmax)",
      max(err_loss, err_smooth, err_softmax), 1e-6)
# 3. the fast engine computes the same numbers, another way
loss_fast, dz_fast = ops.softmax_cross_entropy(z, labels)
check("reference vs fast minicnn.ops (loss, dz, softmax_backward)",
      max(rel_err(loss_ref, loss_fast), rel_err(dz_ref, dz_fast),
          rel_err(softmax_backward(dy, p), ops.softmax_backward(dy, ops.softmax(z)))), 1e-10)
