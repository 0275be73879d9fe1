"""A whole training step on every core at once: the batch split, one model copy a worker.

minicnn.parallel splits each op's images over the workers, and every op ends by waiting for
all of them: 16 waits a Keras-tutorial training step, 68 a resnet-small one. On the 2-vCPU VM
this engine is tuned on, waking a sleeping thread takes ~130 us (more while the machine is
busy), and each wait also idles the worker that finished first. Here each worker instead runs
the whole step on its part of the batch:

    part k of the batch -> replica k: forward, loss, backward        (k = 0, 1, ...; at once)
    model.grads = sum over k of replica k's grads                    (after the step)

A replica is a copy of the model built from its config whose layers share the model's
parameter and state arrays (replica 0 is the model itself), with its own caches and gradients.
The loss is a mean over the batch, so part k's dlogits are scaled by n_k / N. The only waits
inside the step are BatchNorm's (three a layer, 21 a resnet-small step): its batch sums are
added up over the workers (parallel.all_sum), so every replica normalises with the whole
batch's mean and variance, as one model on the whole batch would (PyTorch calls this
SyncBatchNorm), and the first worker updates the running estimates. Outputs and gradients
equal the one-model step's up to float rounding (tests/test_data_parallel.py).

The step falls back to the plain one (each op split over the workers) on CuPy arrays, with one
worker, with fewer than two images a worker, and, in training, for a model with Dropout (its
masks come from the layer's one generator, which a training checkpoint keeps) or with a
layer minicnn cannot rebuild from its config.
"""
import weakref

import numpy as np

from minicnn import parallel
from minicnn.backend import array_module
from minicnn.layers import Container, Dropout, layer_config, layer_from_config, walk

_replicas = weakref.WeakKeyDictionary()         # model -> [replica 1, replica 2, ...]


def _split(x, k):
    """k parts of x along the batch axis, sizes differing by at most one."""
    return [x[lo:hi] for lo, hi in parallel.split(len(x), k)]


def _copies(model, x, training):
    """[model, replica 1, ...]: one model copy for each worker the step runs on ([model]: the
    plain step)."""
    k = parallel.threads()
    if k < 2 or array_module(x) is not np or len(x) < 2 * k or parallel.in_worker():
        return [model]
    if training and any(isinstance(layer, Dropout) for layer in walk(model)):
        return [model]
    return [model] + _replicas_of(model, k - 1)


def _replicas_of(model, count):
    """count replicas of model, their layers tied to the model's arrays; [] when the model
    cannot be rebuilt from its config (a layer class of the user's own)."""
    replicas = _replicas.get(model)
    if replicas is None or len(replicas) != count:
        try:
            config = layer_config(model)
        except ValueError:
            return []
        replicas = [layer_from_config(config) for _ in range(count)]
        _replicas[model] = replicas
    for replica in replicas:             # (again each step: the model's arrays may be new ones)
        for mine, theirs in zip(walk(model), walk(replica)):
            if not isinstance(mine, Container):
                theirs.params, theirs.state = mine.params, mine.state
    return replicas


def train_step(model, x, labels, loss_fn):
    """Forward, loss and backward of one training step of model (a Sequential); model.grads
    get the whole batch's gradients (the first layer's input gradient is skipped, as
    model.backward(..., input_grad=False) does). -> (loss, logits). loss_fn must average over
    the batch, as SoftmaxCrossEntropy does."""
    copies = _copies(model, x, training=True)
    if len(copies) == 1:
        return _part_step(model, x, labels, loss_fn, 1.0)
    n, k = len(x), len(copies)
    xs, ys = _split(x, k), _split(labels, k)
    parts = parallel.together([lambda c=c, a=a, b=b: _part_step(c, a, b, loss_fn, len(a) / n)
                               for c, a, b in zip(copies, xs, ys)])
    grads = model.grads
    for replica in copies[1:]:
        for name, g in replica.grads.items():
            grads[name] += g
    return (sum(loss * len(a) for (loss, _), a in zip(parts, xs)) / n,
            np.concatenate([lg for _, lg in parts]))


def _part_step(copy, x, labels, loss_fn, share):
    """Forward, loss and backward of one model copy on its part of the batch, share = its
    images / the batch's (the loss is a mean: the part's dlogits count that much).
    -> (the part's loss, its logits)."""
    logits = copy.forward(x, training=True)
    loss, dlogits = loss_fn(logits, labels)
    copy.backward(dlogits * share, input_grad=False)
    return loss, logits


def predict(model, x):
    """model.forward(x) in inference mode, each worker's part of the batch through its own
    replica at once."""
    copies = _copies(model, x, training=False)
    if len(copies) == 1:
        return model.forward(x)
    parts = parallel.together([lambda c=c, xs=xs: c.forward(xs) for c, xs
                               in zip(copies, _split(x, len(copies)))])
    return np.concatenate(parts)
