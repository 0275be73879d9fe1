"""The backprop tour, stop 2: max pooling and average pooling, forward and backward.

    python examples/tour/pooling.py              (docs/tour/02-pooling.md explains it)

Pooling reduces each window: max or mean. As in minicnn/reference/pool.py, the windows are the
im2col columns of each channel on its own, cols (KH*KW, N*C*OH*OW), one column per window.
Backward puts each window's gradient into its column (all of it on the winner for max, an equal
share on every tap for mean) and col2im adds the columns back onto the pixels.
The script checks itself against nested loops, centred differences (minicnn.gradcheck) and the
fast engine (minicnn.ops), and exits non-zero if a check fails.
"""
import numpy as np

import minicnn
from minicnn import ops
from minicnn.nn import AvgPool2D, MaxPool2D
from minicnn.reference import (avgpool2d_backward, avgpool2d_forward, col2im, im2col,
                               maxpool2d_backward, maxpool2d_forward, pool2d_loops)
from tourkit import check, rel_err, show

NO_PADDING = ((0, 0), (0, 0))


rng = np.random.default_rng(0)
N, C, H, W = 2, 3, 4, 4
x = rng.standard_normal((N, C, H, W))                 # float64, distinct values: no ties

# ---- max pooling, 2x2 windows, stride 2: 4x4 -> 2x2 ----------------------------------------
K, S = (2, 2), (2, 2)
OH, OW = (H - K[0]) // S[0] + 1, (W - K[1]) // S[1] + 1
print(f"max pooling {K[0]}x{K[1]}, stride {S[0]}: out = the max of each window")
show("x", x)
cols = im2col(x.reshape(N * C, 1, H, W), K, S, NO_PADDING)   # (KH*KW, N*C*OH*OW) = (4, 24)
show("cols", cols)
print("            window 0 (image 0, channel 0, top left):",
      " ".join(f"{v:.3f}" for v in cols[:, 0]))
winner = cols.argmax(axis=0)                          # (N*C*OH*OW,): which tap won, 0..3
show("winner", winner)
out = cols.max(axis=0).reshape(N, C, OH, OW)          # (N, C, OH, OW)
show("out", out)

print("\nbackward: a random upstream gradient; each window's goes to its winner only")
dout = rng.standard_normal(out.shape)                 # (N, C, OH, OW)
show("dout", dout)
dcols = (np.arange(K[0] * K[1]).reshape(-1, 1) == winner) * dout.reshape(1, -1)  # (4, 24)
show("dcols", dcols)
print("            window 0:", " ".join(f"{v:.3f}" for v in dcols[:, 0]),
      f"  (dout there {dout.flat[0]:.3f}, winner tap {winner[0]})")
dx = col2im(dcols, (N * C, 1, H, W), K, S, NO_PADDING).reshape(x.shape)   # (N, C, H, W)
show("dx", dx)
print(f"            {np.count_nonzero(dx)} of {dx.size} pixels get a gradient (each window "
      f"sends it to one); image 0, channel 0:")
for row in dx[0, 0]:
    print("            " + " ".join(f"{v + 0:7.3f}" for v in row))

# ---- average pooling, 3x3 windows, stride 1: overlapping windows, 4x4 -> 2x2 ----------------
K3, S1 = (3, 3), (1, 1)
print("\naverage pooling 3x3, stride 1: windows overlap")
out_avg, cache_avg = avgpool2d_forward(x, K3, S1)     # (N, C, 2, 2)
show("out", out_avg)
dout_avg = rng.standard_normal(out_avg.shape)         # (N, C, 2, 2)
show("dout", dout_avg)
dx_avg = avgpool2d_backward(dout_avg, cache_avg)      # (N, C, H, W)
show("dx", dx_avg)
print(f"            pixel (1, 1), in all 4 windows: sum(dout) / 9 = "
      f"{dout_avg[0, 0].sum() / 9:7.4f}, dx[0, 0, 1, 1] = {dx_avg[0, 0, 1, 1]:7.4f}")
print(f"            pixel (0, 0), in 1 window:      dout / 9      = "
      f"{dout_avg[0, 0, 0, 0] / 9:7.4f}, dx[0, 0, 0, 0] = {dx_avg[0, 0, 0, 0]:7.4f}")

print()
# 1. the steps above are what the reference functions do
out_ref, cache = maxpool2d_forward(x, K, S)
dx_ref = maxpool2d_backward(dout, cache)
check("by hand vs reference maxpool2d_forward/backward",
      max(rel_err(out_ref, out), rel_err(dx_ref, dx)), 1e-12)
# 2. the reference computes the definition: one output value per loop iteration
check("reference vs nested loops (pool2d_loops, max and mean)",
      max(rel_err(pool2d_loops(x, K, S, np.max), out_ref),
          rel_err(pool2d_loops(x, K3, S1, np.mean), out_avg)), 1e-12)
# 3. the backward is the derivative of the forward: centred differences, in float64
with minicnn.use("reference"):                        # the layers call minicnn/reference
    err_max = minicnn.gradcheck(MaxPool2D(K, S), x)["input"]
    err_avg = minicnn.gradcheck(AvgPool2D(K3, S1), x)["input"]
check("reference vs gradcheck (max dx, avg dx)", max(err_max, err_avg), 1e-6)
# 4. the fast engine computes the same numbers, another way (its 2x2 max-pool has a path of
#    its own, in two halving steps)
out_fast, cache_fast = ops.maxpool2d_forward(x, K, S)
dx_fast = ops.maxpool2d_backward(dout, cache_fast)
out_avg_fast, cache_avg_fast = ops.avgpool2d_forward(x, K3, S1)
dx_avg_fast = ops.avgpool2d_backward(dout_avg, cache_avg_fast)
check("reference vs fast minicnn.ops (max out, dx; avg out, dx)",
      max(rel_err(out_ref, out_fast), rel_err(dx_ref, dx_fast),
          rel_err(out_avg, out_avg_fast), rel_err(dx_avg, dx_avg_fast)), 1e-10)
