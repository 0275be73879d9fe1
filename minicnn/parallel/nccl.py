"""The GPU transport of minicnn.parallel.group: NCCL's collectives on CuPy arrays, one GPU a
process, for the processes mpiexec started (minicnn.parallel.mpi).

    mpiexec -n 4 python -m minicnn.train --backend cupy ...     (one process a GPU)

The same two calls as the other transports, with the same rules (each sum the same bits on
every rank):

    sum_in_place(gradients)   a bucket at a time (group.BUCKET_BYTES): ncclReduceScatter, each
                              rank summing one piece on its GPU, then ncclAllGather
    sum(values)               BatchNorm's few sums: every rank's values gathered
                              (ncclAllGather, as float64, exact) and added in rank order

NCCL needs one id shared by every rank before it connects them: rank 0 draws it
(ncclGetUniqueId) and MPI broadcasts it. Each process uses the GPU of its place among the
processes on its machine (use_local_gpu).

Unverified: this file has run only on a machine without a GPU, with a stand-in for NCCL's
communicator (tests/test_mpi.py checks the buckets, the pieces, the counts and dtypes it
passes, and the sums that come back); the device pointers, the stream, NCCL's own calls and
a speed-up on real GPUs have not been seen (docs/distributed.md says what would check them).
"""
import importlib

import numpy as np

from minicnn.parallel import group


def _pointer(a):
    """The device address of a CuPy array: what NCCL's calls take."""
    return a.data.ptr


def _stream(xp):
    """The CUDA stream CuPy's work runs on (NCCL's calls go after it, in order)."""
    return xp.cuda.get_current_stream().ptr


def _nccl_type(nccl, dtype):
    """NCCL's name for a dtype."""
    names = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
             "int32": "NCCL_INT32", "int64": "NCCL_INT64"}
    return getattr(nccl, names[np.dtype(dtype).name])


class NcclGroup(group.Group):
    """The processes of host (an MpiGroup), one GPU each, summing CuPy arrays through NCCL.
    xp: CuPy; nccl: its NCCL bindings (cupy.cuda.nccl, unless given)."""

    def __init__(self, host, xp, nccl=None):
        self.host, self.xp = host, xp
        self.rank, self.size = host.rank, host.size
        # (cupy.cuda.nccl is a module of its own: imported, not an attribute, until then)
        self.nccl = nccl if nccl is not None else importlib.import_module(
            f"{xp.__name__}.cuda.nccl")
        uid = host.broadcast(self.nccl.get_unique_id() if host.rank == 0 else None)
        self.comm = self.nccl.NcclCommunicator(self.size, uid, self.rank)

    def sum_in_place(self, arrays):
        nccl, xp = self.nccl, self.xp

        def reduce_scatter(flat, piece):
            self.comm.reduceScatter(_pointer(flat), _pointer(piece), piece.size,
                                    _nccl_type(nccl, flat.dtype), nccl.NCCL_SUM, _stream(xp))

        def all_gather(piece, flat):
            self.comm.allGather(_pointer(piece), _pointer(flat), piece.size,
                                _nccl_type(nccl, flat.dtype), _stream(xp))

        group.sum_pieces_in_place(arrays, self.size, reduce_scatter, all_gather, xp)

    def sum(self, values):
        xp = self.xp
        flat, specs = group.pack_values(values, xp)                 # (values,) float64
        every = xp.empty((self.size, len(flat)), dtype=xp.float64)  # (ranks, values)
        self.comm.allGather(_pointer(flat), _pointer(every), len(flat),
                            _nccl_type(self.nccl, flat.dtype), _stream(xp))
        return group.add_in_rank_order([group.unpack_values(row, specs) for row in every])

    def gather(self, array):
        """Every rank's array concatenated in rank order (the logits: small, so through the
        host and MPI)."""
        xp = self.xp
        return xp.asarray(self.host.gather(xp.asnumpy(array)))


def use_local_gpu(xp):
    """Make this process's GPU the one of its place among mpiexec's processes on this machine
    (process k uses GPU k mod the GPUs there), before any array is made on it."""
    xp.cuda.Device(group.local_rank() % xp.cuda.runtime.getDeviceCount()).use()
