"""The backprop tour, stop 1: a convolution, forward and backward, step by step.

    python examples/tour/convolution.py          (docs/tour/01-convolution.md explains it)

Forward:  cols = im2col(x);  Y = W @ cols + b;  out = Y as (N, F, OH, OW).
Backward: dY = dout as (F, N*OH*OW);  dW = dY @ cols^T;  db = sum of dY's columns;
          dcols = W^T @ dY;  dx = col2im(dcols).
Every step is done by hand with the reference engine (minicnn/reference/conv.py) and printed
with its shape; then the script checks itself against nested loops, centred differences
(minicnn.gradcheck) and the fast engine (minicnn.ops), and exits non-zero if a check fails.
"""
import numpy as np

import minicnn
from minicnn import ops
from minicnn.nn import Conv2D
from minicnn.reference import col2im, conv2d_backward, conv2d_forward, conv2d_loops, im2col
from tourkit import check, rel_err, show


rng = np.random.default_rng(0)
N, C, H, W = 2, 3, 5, 5                 # 2 images, 3 channels (RGB), 5x5 pixels
F, KH, KW = 4, 3, 3                     # 4 filters of 3x3
P = 1                                   # one ring of zeros around each image
stride, padding = (1, 1), ((P, P), (P, P))    # padding as ((top, bottom), (left, right))
OH = (H + 2 * P - KH) // stride[0] + 1  # 5: padding 1 keeps a 3x3 conv's output 5x5
OW = (W + 2 * P - KW) // stride[1] + 1
x = rng.standard_normal((N, C, H, W))   # float64 throughout: the checks compare to ~1e-10
w = rng.standard_normal((F, C, KH, KW)) * 0.3
b = rng.standard_normal(F) * 0.1

print("forward: cols = im2col(x), Y = W @ cols + b, out = Y as (N, F, OH, OW)")
show("x", x)
show("w", w)
show("b", b)
cols = im2col(x, (KH, KW), stride, padding)          # (C*KH*KW, N*OH*OW) = (27, 50)
show("cols", cols)
print("            one column per output pixel; column 0 is image 0's top-left window,")
print("            channel 0 of it (the zeros are padding):")
for row in cols[:KH * KW, 0].reshape(KH, KW):
    print("            " + " ".join(f"{v:7.3f}" for v in row))
Y = w.reshape(F, -1) @ cols + b.reshape(F, 1)        # (F, C*KH*KW) @ (C*KH*KW, N*OH*OW)
show("Y", Y)                                         # (F, N*OH*OW) = (4, 50)
out = Y.reshape(F, N, OH, OW).transpose(1, 0, 2, 3)  # (N, F, OH, OW)
show("out", out)

print("\nbackward: a random upstream gradient dout = dL/dout")
dout = rng.standard_normal(out.shape)                # (N, F, OH, OW), not all ones
show("dout", dout)
dY = dout.transpose(1, 0, 2, 3).reshape(F, -1)       # (F, N*OH*OW): Y's layout
dW = (dY @ cols.T).reshape(w.shape)                  # (F, C*KH*KW) -> (F, C, KH, KW)
show("dW", dW)
db = dY.sum(axis=1)                                  # (F,): b[f] is added to every pixel
show("db", db)
dcols = w.reshape(F, -1).T @ dY                      # (C*KH*KW, N*OH*OW)
show("dcols", dcols)
dx = col2im(dcols, x.shape, (KH, KW), stride, padding)   # (N, C, H, W): copies summed back
show("dx", dx)

print()
# 1. the steps above are what the reference functions do
out_ref, cache = conv2d_forward(x, w, b, stride, padding)
dx_ref, dW_ref, db_ref = conv2d_backward(dout, cache)
check("by hand vs reference conv2d_forward/backward",
      max(rel_err(out_ref, out), rel_err(dx_ref, dx), rel_err(dW_ref, dW),
          rel_err(db_ref, db)), 1e-12)
# 2. the GEMM computes the convolution's definition: one output value per loop iteration
check("reference vs nested loops (conv2d_loops)",
      rel_err(conv2d_loops(x, w, b, stride, padding), out_ref), 1e-12)
# 3. the backward is the derivative of the forward: centred differences, in float64
layer = Conv2D(C, F, (KH, KW), stride=stride, padding=P, dtype=np.float64)
layer.params["weight"][...], layer.params["bias"][...] = w, b
with minicnn.use("reference"):                       # the layer calls minicnn/reference
    errors = minicnn.gradcheck(layer, x)             # {"input": .., "weight": .., "bias": ..}
check("reference vs gradcheck (dx, dW, db)", max(errors.values()), 1e-6)
# 4. the fast engine computes the same numbers, another way
out_fast, cache_fast = ops.conv2d_forward(x, w, b, stride, padding)
dx_fast, dW_fast, db_fast = ops.conv2d_backward(dout, cache_fast)
check("reference vs fast minicnn.ops (out, dx, dW, db)",
      max(rel_err(out_ref, out_fast), rel_err(dx_ref, dx_fast), rel_err(dW_ref, dW_fast),
          rel_err(db_ref, db_fast)), 1e-10)
