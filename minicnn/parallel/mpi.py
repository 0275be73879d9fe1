"""Data-parallel training over MPI: the processes `mpiexec -n N` starts, as one group
(minicnn.parallel.group), through mpi4py.

    mpiexec -n 2 python -m minicnn.train --batch-size 64 ...

Every process (rank) runs the same program on the same data: it draws the same global batches,
builds the same model from the same seed, and in each step takes its share of the batch
(minicnn.parallel.data_parallel.train_step):

    rank r: images [lo_r, hi_r) of the global batch -> forward, loss, backward   (all at once)
            BatchNorm's batch sums                   -> sum over the ranks (group.sum)
            gradients                                -> sum over the ranks (group.sum_in_place)
            logits, loss                             -> the whole batch's, on every rank
    every rank: the same optimizer step on the same gradients: the models stay equal

so the run equals one process on the whole batch up to float rounding, for any N
(tests/test_mpi.py). Rank 0 alone writes files and prints.

The sums give every rank the same bits: BatchNorm's few values are gathered (MPI_Allgather)
and added in rank order by every rank, as the in-machine workers add theirs; the gradients go
a bucket at a time (group.BUCKET_BYTES) through MPI_Reduce_scatter_block, each rank summing
one piece of the bucket, then MPI_Allgather, which copies every summed piece to every rank:
the two halves of the ring all-reduce, written out, so no MPI library's algorithm choice can
leave two ranks with different roundings.

A run's setup (settings, data, checkpoint) is each rank's own; agree() at its end tells every
rank whether all are ready, so an error there is printed once, by rank 0, and every rank exits
with it. After that a rank that fails ends every rank: it prints its sentence and leaves at once
(end_job), and the launcher ends the others.
"""
import os
import sys

import numpy as np

from minicnn.backend import array_module
from minicnn.errors import MinicnnError, UsageError
from minicnn.parallel import group

MPI = None                    # mpi4py's MPI, imported by world() under mpiexec only


class OtherRankFailed(MinicnnError):
    """Another rank's setup failed: rank 0 prints its sentence; this one has nothing to say."""
    quiet = True


class MpiGroup(group.Group):
    """The processes of an MPI communicator (MPI.COMM_WORLD: every process mpiexec started)."""

    def __init__(self, comm):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.started = False                  # agree() has been called: the setup is over
        self._nccl = None                     # the NCCL twin, made on the first CuPy step

    def for_arrays(self, x):
        """The group that sums arrays like x: this one for NumPy arrays, its NCCL twin for
        CuPy's (minicnn.parallel.nccl: the same processes, one GPU each)."""
        if array_module(x) is np:
            return self
        if self._nccl is None:
            from minicnn.parallel import nccl         # only with CuPy arrays
            self._nccl = nccl.NcclGroup(self, array_module(x))
        return self._nccl

    def sum(self, values):
        """group.Group.sum: every rank's values gathered (as one float64 vector each, exact)
        and added up in rank order, by every rank alike."""
        flat, specs = group.pack_values(values)
        every = np.empty((self.size, len(flat)))                    # (ranks, values)
        self.comm.Allgather(flat, every)
        return group.add_in_rank_order([group.unpack_values(row, specs) for row in every])

    def sum_in_place(self, arrays):
        """group.Group.sum_in_place for NumPy arrays: a bucket at a time, each rank summing
        one piece (MPI_Reduce_scatter_block), every piece then copied to every rank
        (MPI_Allgather)."""
        group.sum_pieces_in_place(
            arrays, self.size,
            lambda flat, piece: self.comm.Reduce_scatter_block(flat, piece, op=MPI.SUM),
            lambda piece, flat: self.comm.Allgather(piece, flat))

    def gather(self, array):
        """Every rank's array (NumPy, any length along axis 0), concatenated in rank order."""
        return np.concatenate(self.comm.allgather(array))

    def allgather(self, obj):
        """[every rank's obj] (small Python values)."""
        return self.comm.allgather(obj)

    def broadcast(self, obj):
        """Rank 0's obj, on every rank."""
        return self.comm.bcast(obj, root=0)

    def barrier(self):
        self.comm.Barrier()

    def agree(self, error=None):
        """The end of a run's setup, which each rank does alone: every rank calls this once,
        with the exception that stopped its setup, or None. Returns when every rank is ready;
        otherwise raises on every rank: rank 0 the first failed rank's error (its own, or its
        sentence), the others OtherRankFailed (nothing to print: rank 0 prints)."""
        sentence = None if error is None else f"{error}" or type(error).__name__
        failures = [(r, s) for r, s in enumerate(self.comm.allgather(sentence)) if s is not None]
        self.started = True
        if not failures:
            return
        first, sentence = failures[0]
        if self.rank != 0:
            raise OtherRankFailed(sentence)
        if first == 0:
            raise error
        raise MinicnnError(f"Process {first} of {self.size}: {sentence}")


_world = None


def world():
    """The group of the processes mpiexec started (MPI.COMM_WORLD), or None for a plain run and
    for mpiexec -n 1: mpi4py is imported in the first case only (group.launched() reads the
    launcher's variables). A UsageError naming the `distributed` extra when mpiexec started
    several but mpi4py is missing."""
    global _world, MPI
    rank, size = group.launched()
    if _world is None and size > 1:
        try:
            from mpi4py import MPI
        except ImportError:                 # (each process finds it: rank 0 says it)
            raise (UsageError if rank == 0 else OtherRankFailed)(
                f"mpiexec started {size} processes, but mpi4py is not installed: pip install "
                f"\"minicnn[distributed]\" (mpi4py, and MPICH's mpiexec).") from None
        _world = MpiGroup(MPI.COMM_WORLD)
    return _world


def leave_after_error(status):
    """Under mpiexec (once world() has been made): end this process at once with status, its
    error printed (end_job). Nothing otherwise."""
    if _world is not None:
        end_job(status)


def end_job(status):
    """After an error in one rank's training (its sentence printed): leave at once with
    status. The launcher (MPICH's hydra, Open MPI's mpirun) then ends every other rank, which
    may be waiting for this one in a sum; MPI_Abort would do the same with a line of its own."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
