"""One convolution, forward and backward, by hand: every intermediate printed.

    python examples/backprop_by_hand.py

A 1-image, 2-channel 4x4 input goes through a Conv2D with 2 filters of 3x3, stride 1, padding 1.
We build the im2col matrix, do the forward as one matrix product, push a gradient back through
it, and check the result against centred differences with minicnn.gradcheck.
"""
import numpy as np

import minicnn
from minicnn.layers import Conv2D
from minicnn.ops import col2im, im2col

np.set_printoptions(precision=3, suppress=True, linewidth=120)
rng = np.random.default_rng(0)

# -- the layer and a tiny input ---------------------------------------------------------------
conv = Conv2D(in_channels=2, out_channels=2, kernel_size=3, stride=1, padding=1,
              dtype=np.float64, rng=rng)
x = np.arange(2 * 4 * 4, dtype=np.float64).reshape(1, 2, 4, 4) / 10     # (N=1, C=2, H=4, W=4)
w, b = conv.params["weight"], conv.params["bias"]                       # (F=2, C=2, 3, 3), (2,)
print("x", x.shape, "\n", x[0])
print("weight", w.shape, " bias", b.shape)

# -- forward: im2col, then one matrix product ---------------------------------------------------
padding = ((1, 1), (1, 1))
cols = im2col(x, (3, 3), (1, 1), padding)       # (N, C*KH*KW, OH*OW) = (1, 18, 16)
print("\nim2col matrix", cols.shape, "- column j holds the 18 inputs that output pixel j sees:")
print(cols[0])
out = w.reshape(2, -1) @ cols + b[:, None]      # (F, 18) @ (1, 18, 16) -> (1, 2, 16)
out = out.reshape(1, 2, 4, 4)                   # (N, F, OH, OW)
print("\nout = W @ cols + b, reshaped", out.shape, "\n", out[0])
assert np.allclose(out, conv.forward(x, training=True))
print("matches Conv2D.forward: yes")

# -- backward: the same matrices, transposed ---------------------------------------------------
dout = np.ones_like(out)                        # dL/dout for L = sum(out)
dout3 = dout.reshape(1, 2, 16)                  # (N, F, OH*OW)
dw = (dout3 @ cols.transpose(0, 2, 1)).sum(0)   # (F, C*KH*KW): dL/dW = dout @ cols^T
db = dout3.sum(axis=(0, 2))                     # (F,): each bias touches every output pixel
dcols = w.reshape(2, -1).T @ dout3              # (N, 18, 16): dL/dcols = W^T @ dout
dx = col2im(dcols, x.shape, (3, 3), (1, 1), padding)   # (N, C, H, W): scatter-add back
print("\ndL/db", db, "(= 16 output pixels each)")
print("dL/dW", dw.reshape(w.shape).shape, "\n", dw.reshape(w.shape)[0, 0])
print("dL/dx", dx.shape, "- each pixel sums the weights of every window that saw it:\n", dx[0, 0])
dx_layer = conv.backward(dout)
assert np.allclose(dx, dx_layer) and np.allclose(dw.reshape(w.shape), conv.grads["weight"])
print("matches Conv2D.backward: yes")

# -- is it right? ask the numbers ----------------------------------------------------------------
print()
errors = minicnn.gradcheck(conv, x, verbose=True)
assert all(e < 1e-6 for e in errors.values())
