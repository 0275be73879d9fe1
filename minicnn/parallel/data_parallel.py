"""A whole training step on every core at once: the batch split, one model copy a worker.

minicnn.parallel splits each op's images over the workers, and every op ends by waiting for
all of them: dozens of waits a training step, each a sleeping thread to wake (slow on a small
VM, slower while the machine is busy) and the worker that finished first idle
(docs/performance.md#a-step-a-worker). Here each worker instead runs the whole step on its part
of the batch:

    part k of the batch -> model copy k: forward, loss, backward      (k = 0, 1, ...; at once)
    model.grads = sum over k of copy k's grads                        (after the step)

Copy 0 is the model itself, run by the calling thread. The others are, on Linux, worker
processes forked from this one (minicnn.parallel.processes: threads would share one
interpreter lock, and steps on threads measured longer: docs/performance.md#worker-processes),
and elsewhere replicas built from the model's config whose layers share the model's parameter
and state arrays, run by workers.together's threads.
Each copy keeps its own caches and gradients. The loss is a mean over the batch, so part k's
dlogits are scaled by n_k / N. The only waits inside the step are BatchNorm's (three a
layer): its batch sums are added up over the workers (workers.all_sum), so
every copy normalises with the whole batch's mean and variance, as one model on the whole batch
would (PyTorch calls this SyncBatchNorm), and copy 0 updates the running estimates. Outputs and
gradients equal the one-model step's up to float rounding (tests/test_data_parallel.py), and
the same split gives the same bits every time (a resumed training run is bitwise the one that
was not stopped).

A frozen layer (trainable = False) is frozen in every copy: the worker processes' copies are
forked from the model with its flags, and a pool is made for one model description, which
says which layers are frozen (a change forks a new pool); the thread replicas take the flags
each step. Frozen BatchNorm layers then use their running statistics in every copy, with no
sums to wait for.

Dropout draws each image's mask from a generator of its own, seeded from one draw of the
layer's generator and the image's index in the whole batch
(minicnn.reference.activations.image_generators). Each copy's Dropout layers draw from copies
of the model's generators as they were before the step, and each part tells its first image's
index (workers.batch_part): every copy drops what one model on the whole batch would drop,
with any number of workers, and the model's generators (which a training checkpoint keeps)
advance as in the one-model step.

The step falls back to the plain one (each op split over the workers) on CuPy arrays, with one
worker, with fewer than two images a worker, for a model with a layer minicnn cannot
rebuild from its config, and while model.whole_batch_step is True (a step the backprop trace
watches, minicnn.trace: it reads every image's numbers from the model's own layers). A loss
function that cannot be pickled into a message (a lambda) keeps the split on threads, and so
does a process that cannot fork.

Under mpiexec the processes it started are the split (rank_step): each runs its share of the
global batch through its own model, BatchNorm's sums and the gradients summed over them by
MPI, or by NCCL for CuPy arrays (minicnn.parallel.mpi, docs/distributed.md); no in-machine
copies are made there.
"""
import weakref
from copy import deepcopy

import numpy as np

from minicnn.parallel import group, mpi
from minicnn.parallel import workers
from minicnn.parallel import processes
from minicnn import implementation
from minicnn.backend import array_module
from minicnn.nn.layers import Dropout, walk
from minicnn.nn.model import layer_config, layer_from_config

# The workers: processes where they can be forked (Linux), else threads (see
# minicnn.parallel.processes for what each costs).
PROCESSES = processes.AVAILABLE

_replicas = weakref.WeakKeyDictionary()         # model -> [replica 1, replica 2, ...] (threads)


def _split(x, k):
    """k parts of x along the batch axis, sizes differing by at most one."""
    return [x[lo:hi] for lo, hi in workers.split(len(x), k)]


def _split_config(model, x):
    """model's config when the step on x splits over workers.threads() workers (the copies
    are made from it, or checked against it); None for the plain step."""
    k = workers.threads()
    if (k < 2 or array_module(x) is not np or len(x) < 2 * k or workers.in_worker()
            or getattr(model, "whole_batch_step", False)
            or group.launched()[1] > 1):        # mpiexec's processes: no forks of them
        return None
    if implementation.active() == "reference":      # the reference runs as written: one model
        return None
    try:
        return layer_config(model)
    except ValueError:
        return None


def _run_split(model, config, fn, parts, grads):
    """[fn(model copy k, *arrays, *args) for each part k = (arrays, args)], all at once on
    the workers; grads=True: model.grads += every other copy's after."""
    ran = (processes.run(model, fn, parts, config)
           if PROCESSES and processes.can_start() and processes.sendable(parts[-1][1]) else None)
    if ran is not None:
        pool, results = ran
        if grads:
            pool.add_grads(model)
        return results
    copies = [model] + _replicas_of(model, len(parts) - 1, config)
    results = workers.together([lambda c=c, p=p: fn(c, *p[0], *p[1])
                                 for c, p in zip(copies, parts)])
    if grads:
        total = model.grads
        for replica in copies[1:]:
            for name, g in replica.grads.items():
                total[name] += g
    return results


def _replicas_of(model, count, config):
    """count replicas of model (built from its config) for the worker threads, their layers
    tied to the model's arrays."""
    replicas = _replicas.get(model)
    if replicas is None or len(replicas) != count:
        replicas = [layer_from_config(config) for _ in range(count)]
        _replicas[model] = replicas
    for replica in replicas:             # (again each step: the model's arrays may be new ones,
        for mine, theirs in zip(walk(model), walk(replica)):      # its layers newly frozen)
            if not mine.is_container:
                theirs.params, theirs.state = mine.params, mine.state
                theirs.trainable = mine.trainable
    return replicas


def train_step(model, x, labels, loss_fn):
    """Forward, loss and backward of one training step of model (a Sequential); model.grads
    get the whole batch's gradients (the first layer's input gradient is skipped, as
    model.backward(..., input_grad=False) does). -> (loss, logits). loss_fn must average over
    the batch, as SoftmaxCrossEntropy does. Under mpiexec, x is the global batch, the same in
    every process, and each takes its share (rank_step)."""
    world = mpi.world()
    if world is not None:
        return rank_step(world, model, x, labels, loss_fn)
    config = _split_config(model, x)
    if config is None:
        return _part_step(model, x, labels, loss_fn, 1.0)
    n, rngs = len(x), [layer.rng for layer in _dropout_layers(model)]
    parts = [((x[lo:hi], labels[lo:hi]),
              (loss_fn, (hi - lo) / n, lo, None if lo == 0 else deepcopy(rngs)))
             for lo, hi in workers.split(n, workers.threads())]
    results = _run_split(model, config, _part_step, parts, grads=True)
    return (sum(loss * len(a) for (loss, _), ((a, _), _) in zip(results, parts)) / n,
            np.concatenate([logits for _, logits in results]))


def rank_share(n, world):
    """(lo, hi): the images of a global batch of n that this rank of world takes (contiguous,
    sizes differing by at most one, rank order); ValueError when a rank would get none."""
    if n < world.size:
        raise ValueError(f"A batch of {n} image{'s' if n != 1 else ''} cannot be shared by "
                         f"{world.size} processes (one image each at least): give a larger "
                         f"batch, or fewer processes.")
    return workers.split(n, world.size)[world.rank]


REFERENCE_ALONE = ("The reference maths runs as written, one model on the whole batch: its "
                   "BatchNorm sums nothing across processes. Run it without mpiexec, or use "
                   "the fast implementation.")


def rank_step(world, model, x, labels, loss_fn):
    """train_step in one of the processes of world (mpiexec's, minicnn.parallel.mpi): x is the
    global batch; this process runs its share through its own model, BatchNorm summing its
    batch sums over world, then model.grads = the sum of every process's gradients.
    -> (the global batch's loss, its logits), the same in every process.

    Its own model, not the in-machine copies: the processes are the split (their ops may
    still use threads: MINICNN_THREADS). On CuPy arrays the sums go through NCCL
    (minicnn.parallel.nccl), else through MPI."""
    if implementation.active() == "reference":
        raise ValueError(REFERENCE_ALONE)
    lo, hi = rank_share(len(x), world)
    sums = world.for_arrays(x)
    # the other ranks on this machine have the other cores: BLAS's own threads would spin there
    # (docs/performance.md#single-threaded-blas)
    workers._single_threaded_blas()
    with workers.member(sums, 0, worker=False):   # member 0: its model's state is its own
        loss, logits = _part_step(model, x[lo:hi], labels[lo:hi], loss_fn, (hi - lo) / len(x), lo)
    sums.sum_in_place(list(model.grads.values()))
    return sums.sum([loss * ((hi - lo) / len(x))])[0], sums.gather(logits)


def _part_step(copy, x, labels, loss_fn, share, first=0, dropout_rngs=None):
    """Forward, loss and backward of one model copy on its part of the batch, share = its
    images / the batch's (the loss is a mean: the part's dlogits count that much), first = the
    index of its first image in the batch. dropout_rngs: for the copy's Dropout layers, copies
    of the model's generators as they were before the step (None: the copy is the model).
    -> (the part's loss, its logits)."""
    for layer, rng in zip(_dropout_layers(copy), dropout_rngs or ()):
        layer.rng = rng
    with workers.batch_part(first):
        logits = copy.forward(x, training=True)
    loss, dlogits = loss_fn(logits, labels)
    copy.backward(dlogits * share, input_grad=False)
    return loss, logits


def _dropout_layers(model):
    """model's Dropout layers in walk order (the same in every copy)."""
    return [layer for layer in walk(model) if isinstance(layer, Dropout)]


def _forward(copy, x):
    return copy.forward(x)


def predict(model, x):
    """model.forward(x) in inference mode, each worker's part of the batch through its own
    model copy at once."""
    config = _split_config(model, x)
    if config is None:
        return model.forward(x)
    parts = [((part,), ()) for part in _split(x, workers.threads())]
    return np.concatenate(_run_split(model, config, _forward, parts, grads=False))
