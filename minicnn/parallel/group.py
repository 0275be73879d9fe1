"""One reduction interface, several transports: the members of a data-parallel step and the
sums they make across themselves.

A data-parallel step runs one model copy a member, each on its share of the batch; then every
member needs the sums of what all of them found:

    group.rank, group.size        this member's index (0, 1, ...) and how many there are
    group.sum(values)             [each value summed over the members]: BatchNorm's batch sums
                                  (small: a few per-channel vectors and a count a layer)
    group.sum_in_place(arrays)    each array overwritten with its sum over the members: the
                                  gradients after the backward (large: every parameter's)

Every member gets the same bits: small sums are added in rank order by every member
(add_in_rank_order), and large ones are cut into one piece a member, each piece summed by one
member and copied to the others (sum_pieces_in_place), so no library's choice of algorithm
can give two members different roundings, and their models stay equal without being sent.

The transports:

    minicnn.parallel.workers      the threads of one process (workers.together's group)
    minicnn.parallel.processes    the worker processes forked on one machine (shared memory)
    minicnn.parallel.mpi          the processes mpiexec starts, on one machine or many
                                  (mpi4py: MPI_Reduce_scatter_block and MPI_Allgather)
    minicnn.parallel.nccl         GPUs, one a process, beside mpi's processes (CuPy's NCCL)

(The in-machine step calls sum() for BatchNorm; its gradients it adds up in the calling
process alone, which alone steps the optimizer: minicnn.parallel.processes' add_grads. The
processes mpiexec starts each step their own optimizer, so each needs every sum.)

launched() reads the variables a launcher sets (PMI_SIZE...) without loading MPI: a plain run
never imports mpi4py (minicnn.parallel.mpi.world() does, under mpiexec only).
"""
import os

import numpy as np


class Group:
    """The interface, with sum_in_place written with sum(); a transport overrides what it
    can do better."""
    rank, size = 0, 1

    def sum(self, values):
        """[each value summed over the members, the same bits for every member]: NumPy (or
        CuPy) arrays and numbers, given in the same order by every member."""
        raise NotImplementedError

    def sum_in_place(self, arrays):
        """arrays[i][...] = arrays[i] summed over the members."""
        for a, total in zip(arrays, self.sum(list(arrays))):
            a[...] = total


def add_in_rank_order(members):
    """[each value summed over the members' lists of values, member 0's first]: the same sums,
    added in the same order, for every member."""
    return [sum((values[i] for values in members[1:]), members[0][i])
            for i in range(len(members[0]))]


# ---- packing: many arrays as one flat buffer a transfer ---------------------------------------
# A bucket of gradients a call: one call a parameter would pay a transport's fixed cost (tens of
# microseconds in MPI, more in NCCL) dozens of times a step, and one buffer of everything a copy
# as large as the model. With 4 MiB keras-tutorial's and resnet-small's float32 gradients (0.5
# and 1.6 MiB) go in one call (PyTorch DDP's buckets are 25 MiB, its first 1 MiB).
BUCKET_BYTES = 1 << 22


def buckets(arrays, bucket_bytes=BUCKET_BYTES):
    """[[index, ...], ...]: the arrays' indices in order, cut into runs of one dtype of at most
    bucket_bytes (an array larger than that is a bucket alone)."""
    runs, nbytes = [], 0
    for i, a in enumerate(arrays):
        if (not runs or a.dtype != arrays[runs[-1][0]].dtype
                or nbytes + a.nbytes > bucket_bytes):
            runs.append([])
            nbytes = 0
        runs[-1].append(i)
        nbytes += a.nbytes
    return runs


def pack(arrays, pieces, xp=np):
    """arrays (one dtype) flattened one after another into a new flat buffer whose length is a
    multiple of pieces (zero-padded at the end): (pieces * piece,)."""
    total = sum(int(a.size) for a in arrays)
    flat = xp.zeros(-(-total // pieces) * pieces, dtype=arrays[0].dtype)
    at = 0
    for a in arrays:
        flat[at:at + a.size] = a.reshape(-1)
        at += a.size
    return flat


def unpack(flat, arrays):
    """The inverse of pack: arrays[i][...] = their part of flat."""
    at = 0
    for a in arrays:
        a[...] = flat[at:at + a.size].reshape(a.shape)
        at += a.size


def sum_pieces_in_place(arrays, pieces, reduce_scatter, all_gather, xp=np):
    """arrays[i][...] = their sum over the members, a bucket at a time: each bucket packed flat
    and cut into `pieces` (the members) equal pieces; reduce_scatter(flat, piece) leaves in
    piece (piece,) the sum over the members of this member's piece of flat, all_gather(piece,
    flat) puts every member's summed piece in its place in flat. (The two halves of a ring
    all-reduce: each piece is summed once, by one member, so every member gets its bits.)"""
    for bucket in buckets(arrays):
        chosen = [arrays[i] for i in bucket]
        flat = pack(chosen, pieces, xp)                      # (pieces * piece,)
        piece = xp.empty(len(flat) // pieces, dtype=flat.dtype)
        reduce_scatter(flat, piece)
        all_gather(piece, flat)
        unpack(flat, chosen)


def pack_values(values, xp=np):
    """Small values (arrays and numbers of any real dtype) as one float64 vector, exactly (every
    float32, float16, bfloat16 and integer below 2**53 is a float64). -> (flat, specs)."""
    arrays = [xp.asarray(v) for v in values]
    flat = xp.concatenate([a.astype(np.float64).reshape(-1) for a in arrays])
    numbers = [type(v) if isinstance(v, (int, float, np.generic)) else None for v in values]
    return flat, [(a.shape, a.dtype, number) for a, number in zip(arrays, numbers)]


def unpack_values(flat, specs):
    """pack_values' inverse: one member's values, each of its own shape, dtype and type (an
    array as an array of flat's kind, a number as a number)."""
    out, at = [], 0
    for shape, dtype, number in specs:
        n = int(np.prod(shape))
        a = flat[at:at + n].astype(dtype).reshape(shape)
        out.append(a if number is None else number(a.item()))
        at += n
    return out


# ---- the processes mpiexec started ------------------------------------------------------------
# What launchers put in each process's environment: MPICH and Intel MPI (hydra) PMI_SIZE and
# PMI_RANK, Open MPI OMPI_COMM_WORLD_SIZE and _RANK, MVAPICH MV2_COMM_WORLD_SIZE and _RANK.
_LAUNCHERS = (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
              ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"))
# ... and how many of them share this machine (hydra, Open MPI): they share its cores.
_LOCAL_SIZES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def _launcher_int(names, default):
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return default


def launched():
    """(rank, size) that an MPI launcher gave this process ((0, 1) without one), read from the
    environment: no MPI library is loaded."""
    size = _launcher_int([s for s, _ in _LAUNCHERS], 1)
    return _launcher_int([r for _, r in _LAUNCHERS], 0), size


def local_rank():
    """This process's place among the launcher's processes on this machine (0 without one)."""
    return _launcher_int(("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                          "MV2_COMM_WORLD_LOCAL_RANK"), 0)


def processes_here():
    """How many of the launcher's processes run on this machine (1 without a launcher)."""
    return _launcher_int(_LOCAL_SIZES, 1)


def is_root():
    """Whether this process is the one that writes and prints: rank 0, or a plain run."""
    return launched()[0] == 0

