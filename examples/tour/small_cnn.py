"""The backprop tour, stop 6: a whole small CNN trained by hand, reference functions chained.

    python examples/tour/small_cnn.py            (docs/tour/06-small-cnn.md explains it)

    x (N, 3, 16, 16) -> conv 3->8, 3x3, pad 1 -> ReLU -> max-pool 2   (N, 8, 8, 8)
                     -> conv 8->16, 3x3, pad 1 -> ReLU -> max-pool 2  (N, 16, 4, 4)
                     -> flatten (N, 256) -> dense 256->4 -> logits (N, 4) -> softmax cross-entropy

No Sequential and no optimiser class: the forward pass calls the forward functions of
minicnn/reference one after the other and keeps each cache, the backward pass calls the backward
functions in the opposite order, and SGD with momentum is written out. The data are generated
here: 3x16x16 images of 4 kinds of stripes, with random phase, colour and noise.
At the end the script checks that one step by hand equals the same step through
minicnn.Sequential, under minicnn.use("reference") and minicnn.use("fast").
"""
import time

import numpy as np

import minicnn
from minicnn.nn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, SoftmaxCrossEntropy
from minicnn.reference import (conv2d_backward, conv2d_forward, dense_backward, dense_forward,
                               maxpool2d_backward, maxpool2d_forward, relu_backward,
                               relu_forward, softmax_cross_entropy)
from tourkit import check, rel_err

HYPER = dict(images=640, test_images=160, classes=4, epochs=5, batch_size=32,
             lr=0.005, momentum=0.9, seed=0)     # lr per step; momentum as torch.optim.SGD's
PAD1 = ((1, 1), (1, 1))                         # padding 1 on every side: 3x3 keeps H and W
ONE, TWO = (1, 1), (2, 2)                       # stride 1; pooling window and stride 2


# ---- the data: the class is the direction of the stripes --------------------------------------
STRIPES = [lambda r, c: r // 2,                 # 0: horizontal, 2 pixels wide
           lambda r, c: c // 2,                 # 1: vertical
           lambda r, c: (r + c) // 2,           # 2: diagonal
           lambda r, c: r // 2 + c // 2]        # 3: a checkerboard of 2x2 squares


def make_images(n, rng):
    """n images (n, 3, 16, 16) float64 and their labels (n,) in [0, 4): stripes of a random
    phase and colour, plus Gaussian noise a little stronger than the stripes."""
    labels = rng.integers(0, len(STRIPES), n)
    r, c = np.mgrid[0:16, 0:16]                                 # row and column, (16, 16)
    images = np.empty((n, 3, 16, 16))
    for i, label in enumerate(labels):
        dr, dc = rng.integers(0, 4, 2)                          # the phase
        pattern = STRIPES[label](r + dr, c + dc) % 2 - 0.5      # (16, 16), +-0.5
        colour = rng.uniform(0.5, 1.5, (3, 1, 1))               # a strength per channel
        images[i] = colour * pattern + 0.7 * rng.standard_normal((3, 16, 16))
    return images, labels


# ---- the network as functions ------------------------------------------------------------------
def init_params(classes, rng):
    """He initialisation for the convs, w ~ N(0, 2 / fan_in), biases 0; the dense layer 10x
    smaller, so that the first predictions are near uniform (loss near log 4 = 1.386).
    Names as minicnn.Sequential's: the index of the layer in the stack, then weight or bias."""
    def he(*shape):
        return rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    return {"0.weight": he(8, 3, 3, 3), "0.bias": np.zeros(8),              # conv 3->8
            "3.weight": he(16, 8, 3, 3), "3.bias": np.zeros(16),            # conv 8->16
            "7.weight": he(classes, 256) * 0.1, "7.bias": np.zeros(classes)}   # dense


def forward(params, x):
    """x (N, 3, 16, 16) -> logits (N, K) and the caches backward needs, layer by layer."""
    h1, conv1 = conv2d_forward(x, params["0.weight"], params["0.bias"], ONE, PAD1)
    a1, relu1 = relu_forward(h1)                                      # (N, 8, 16, 16)
    p1, pool1 = maxpool2d_forward(a1, TWO, TWO)                       # (N, 8, 8, 8)
    h2, conv2 = conv2d_forward(p1, params["3.weight"], params["3.bias"], ONE, PAD1)
    a2, relu2 = relu_forward(h2)                                      # (N, 16, 8, 8)
    p2, pool2 = maxpool2d_forward(a2, TWO, TWO)                       # (N, 16, 4, 4)
    flat = p2.reshape(len(x), -1)                                     # (N, 256)
    logits, dense = dense_forward(flat, params["7.weight"], params["7.bias"])   # (N, K)
    shapes = {"x": x.shape, "relu(conv1)": a1.shape, "pool1": p1.shape, "relu(conv2)": a2.shape,
              "pool2": p2.shape, "flatten": flat.shape, "logits": logits.shape}
    return logits, (conv1, relu1, pool1, conv2, relu2, pool2, p2.shape, dense), shapes


def backward(dlogits, caches):
    """dlogits (N, K) -> the gradient of every parameter: the forward's steps in reverse."""
    conv1, relu1, pool1, conv2, relu2, pool2, p2_shape, dense = caches
    dflat, dw3, db3 = dense_backward(dlogits, dense)               # (N, 256), (K, 256), (K,)
    dp2 = dflat.reshape(p2_shape)                                  # (N, 16, 4, 4)
    da2 = maxpool2d_backward(dp2, pool2)                           # (N, 16, 8, 8)
    dh2 = relu_backward(da2, relu2)                                # (N, 16, 8, 8)
    dp1, dw2, db2 = conv2d_backward(dh2, conv2)                    # (N, 8, 8, 8), (16, 8, 3, 3)
    da1 = maxpool2d_backward(dp1, pool1)                           # (N, 8, 16, 16)
    dh1 = relu_backward(da1, relu1)                                # (N, 8, 16, 16)
    _, dw1, db1 = conv2d_backward(dh1, conv1, input_grad=False)    # the image needs no dx
    return {"0.weight": dw1, "0.bias": db1, "3.weight": dw2, "3.bias": db2,
            "7.weight": dw3, "7.bias": db3}


def sgd_step(params, grads, velocity, lr, momentum):
    """torch.optim.SGD with momentum, written out: v = momentum * v + g;  p = p - lr * v
    (v starts at 0, so the first step's v is g)."""
    for k in params:
        velocity[k] = momentum * velocity[k] + grads[k]
        params[k] -= lr * velocity[k]


def accuracy(params, x, labels):
    """The fraction of x's images whose largest logit is their label."""
    return float((forward(params, x)[0].argmax(axis=1) == labels).mean())


# ---- training ----------------------------------------------------------------------------------
hp = HYPER
rng = np.random.default_rng(hp["seed"])
x_all, y_all = make_images(hp["images"] + hp["test_images"], rng)
x_train, y_train = x_all[:hp["images"]], y_all[:hp["images"]]
x_test, y_test = x_all[hp["images"]:], y_all[hp["images"]:]
params = init_params(hp["classes"], rng)
start_params = {k: p.copy() for k, p in params.items()}        # for the check at the end
velocity = {k: np.zeros_like(p) for k, p in params.items()}
print(f"data: {len(x_train)} training and {len(x_test)} test images {x_train.shape[1:]}, "
      f"{hp['classes']} classes of stripes")
_, _, shapes = forward(params, x_train[:hp["batch_size"]])
steps = [f"{name} {shape}" for name, shape in shapes.items()]
print("the shapes of one batch:\n  " + " -> ".join(steps[:3]) + "\n  -> "
      + " -> ".join(steps[3:5]) + "\n  -> " + " -> ".join(steps[5:]))
print("the parameters:\n  " + ", ".join(f"{k} {p.shape}" for k, p in list(params.items())[:4])
      + "\n  " + ", ".join(f"{k} {p.shape}" for k, p in list(params.items())[4:]))
print(f"training: SGD lr {hp['lr']}, momentum {hp['momentum']}, batch {hp['batch_size']}; "
      f"loss and train acc: over the epoch's batches")
print(f"  {'epoch':>5} {'loss':>7} {'train acc':>9} {'test acc':>8} {'time':>6}")
epoch_losses = [softmax_cross_entropy(forward(params, x_train)[0], y_train)[0]]
print(f"  {0:>5} {epoch_losses[0]:7.4f} {accuracy(params, x_train, y_train):9.1%} "
      f"{accuracy(params, x_test, y_test):8.1%}")
for epoch in range(1, hp["epochs"] + 1):
    start, losses, right = time.perf_counter(), [], 0
    order = rng.permutation(len(x_train))
    for i in range(0, len(order), hp["batch_size"]):
        batch = order[i:i + hp["batch_size"]]
        logits, caches, _ = forward(params, x_train[batch])
        loss, dlogits = softmax_cross_entropy(logits, y_train[batch])
        right += int((logits.argmax(axis=1) == y_train[batch]).sum())
        sgd_step(params, backward(dlogits, caches), velocity, hp["lr"], hp["momentum"])
        losses.append(loss)
    epoch_losses.append(np.mean(losses))
    print(f"  {epoch:>5} {epoch_losses[-1]:7.4f} {right / len(x_train):9.1%} "
          f"{accuracy(params, x_test, y_test):8.1%} {time.perf_counter() - start:5.2f}s")
print(f"final test accuracy: {accuracy(params, x_test, y_test):.1%}")
went_down = epoch_losses[-1] < 0.5 * epoch_losses[0]
print(f"check: the loss went down, {epoch_losses[0]:.4f} before training -> "
      f"{epoch_losses[-1]:.4f} in the last epoch {'OK' if went_down else 'FAIL'}")
if not went_down:
    raise SystemExit("check failed: the loss did not fall to half its starting value")


# ---- the same step through minicnn.Sequential --------------------------------------------------
def sequential_step(params, x, labels, classes, lr, momentum):
    """One step through minicnn's layers (the active implementation) from copies of params ->
    (loss, grads, the params after minicnn.optim.SGD's step)."""
    model = minicnn.Sequential([
        Conv2D(3, 8, 3, padding=1, dtype=np.float64), ReLU(), MaxPool2D(2),
        Conv2D(8, 16, 3, padding=1, dtype=np.float64), ReLU(), MaxPool2D(2),
        Flatten(), Dense(256, classes, dtype=np.float64)])
    for k, p in model.params.items():
        p[...] = params[k]
    opt = minicnn.optim.SGD(model, lr, momentum=momentum)
    loss, dlogits = SoftmaxCrossEntropy()(model.forward(x, training=True), labels)
    model.backward(dlogits)
    grads = {k: g.copy() for k, g in model.grads.items()}
    opt.step()
    return loss, grads, {k: p.copy() for k, p in model.params.items()}


print()
# the first step of training again, from the starting weights
x, labels = x_train[:hp["batch_size"]], y_train[:hp["batch_size"]]
logits, caches, _ = forward(start_params, x)             # by hand, as in training
loss, dlogits = softmax_cross_entropy(logits, labels)
grads = backward(dlogits, caches)
after = {k: p.copy() for k, p in start_params.items()}
sgd_step(after, grads, {k: np.zeros_like(p) for k, p in after.items()}, hp["lr"], hp["momentum"])
for implementation in ("reference", "fast"):
    with minicnn.use(implementation):
        seq_loss, seq_grads, seq_after = sequential_step(start_params, x, labels,
                                                         hp["classes"], hp["lr"], hp["momentum"])
    check(f"one step by hand vs Sequential, use({implementation!r}): loss, grads, new weights",
          max([rel_err(loss, seq_loss)] + [rel_err(grads[k], seq_grads[k]) for k in grads]
              + [rel_err(after[k], seq_after[k]) for k in after]), 1e-10)
