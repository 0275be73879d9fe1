"""Both CPU cores for one layer's work: a batch's images split over a small pool of threads.

NumPy runs every elementwise op, copy and reduction on one core; only its BLAS uses more. On the
2-core machine this engine is tuned on, that left a core idle for half of a training step
(im2col, col2im, pooling, BatchNorm, ReLU). NumPy releases the GIL inside those loops and inside
BLAS, so threads that each take a share of the images really run at once, and each worker goes
through its images a few at a time, so that what one step writes is still in its core's cache
when the next step reads it.

BLAS runs single-threaded while this is on: the workers already use every core, and OpenBLAS's
own threads keep spinning for a while after each call, stealing a core from the workers
(docs/performance.md#single-threaded-blas). So the first parallel call sets BLAS to one thread
for the process, and set_threads(1) gives it its threads back.

    workers.map(fn, n, xp, size)  [fn(lo, hi) for each worker's range of n items], at once
    workers.threads()             how many workers: MINICNN_THREADS, else the CPU count
    workers.set_threads(k)        change it (1: everything in the calling thread)
    workers.blas_with_own_threads()   a block in which BLAS has its threads back
    workers.together(fns)         [fn() for fn in fns], each on its own worker at once, as one
                                  group: a whole training step a worker
                                  (minicnn.parallel.data_parallel, where worker processes cannot
                                  be forked: minicnn.parallel.processes)
    workers.all_sum(*values)      inside such a group: each value summed over its members
    workers.member(group, rank)   a block in which this thread is a group's member: the worker
                                  processes' groups (minicnn.parallel.processes) join all_sum
                                  this way
    workers.batch_part(first)     a block in which this thread works on the part of a batch
                                  that starts at the batch's image `first`, and
    workers.first_image()         that index (0 outside): Dropout keys each image's mask by its
                                  place in the whole batch (minicnn.parallel.data_parallel)

CuPy arrays always run in the calling thread: on a GPU one stream does the work.
"""
import contextlib
import ctypes
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minicnn.parallel.group import Group, add_in_rank_order, processes_here


def _default_threads():
    """MINICNN_THREADS when it is a positive int, else the cores this process may run on,
    shared with the other processes mpiexec started on this machine."""
    env = os.environ.get("MINICNN_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                        # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // processes_here())


_threads = _default_threads()
_pool = None
_local = threading.local()          # .worker: True inside a pool task (no nested splitting)


# Work smaller than this many values runs in the calling thread: handing it to a worker costs
# more (tens of microseconds, and NumPy keeps the GIL on small arrays) than it saves.
MIN_PARALLEL_SIZE = 1 << 15


def threads():
    return _threads


def set_threads(k):
    """Use k workers (k >= 1) for the layers' work from now on; k == 1 also gives BLAS back
    the thread count it had before minicnn's first parallel call."""
    global _threads, _pool
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"threads must be a positive int, got {k!r}")
    _threads = k
    if _pool is not None:
        _pool.shutdown()
        _pool = None
    if k == 1:
        _restore_blas_threads()


def split(n, parts):
    """[(lo, hi), ...]: n items in `parts` contiguous ranges whose sizes differ by at most one."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _get_pool():
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_threads - 1, thread_name_prefix="minicnn")
    return _pool


def map(fn, n, xp=np, size=None):               # noqa: A001 (a parallel map, on purpose)
    """[fn(lo, hi) for (lo, hi) in split(n, threads())], the calls running on the pool at once.

    n: items to split (images, rows); size: about how many values the work touches (None:
    large). fn must only write to its own range of the outputs. One range runs in the calling
    thread. Everything runs as one call fn(0, n) for CuPy (xp), one worker, n < 2, a size below
    MIN_PARALLEL_SIZE, or a call from inside a worker.
    """
    if (xp is not np or _threads == 1 or n < 2 or in_worker()
            or (size is not None and size < MIN_PARALLEL_SIZE)):
        return [fn(0, n)]
    _single_threaded_blas()
    ranges = split(n, _threads)
    errors = np.geterr()            # np.errstate is per thread: the workers take the caller's
    futures = [_get_pool().submit(_as_worker, fn, errors, lo, hi) for lo, hi in ranges[1:]]
    results = [_as_worker(fn, errors, *ranges[0])]
    return results + [f.result() for f in futures]


def in_worker():
    """Whether this thread is running a worker's share (of map or together) right now."""
    return getattr(_local, "worker", False)


def _as_worker(fn, errors, *args):
    """fn(*args) as a worker: nested maps run in this thread, under the caller's np.errstate."""
    _local.worker = True
    try:
        with np.errstate(**errors):
            return fn(*args)
    finally:
        _local.worker = False


# ---- groups: one whole task a worker, summing values across them ------------------------------
class _Group(Group):
    """The workers of one together() call (a minicnn.parallel.group.Group): a barrier, and two
    sets of slots that sum() alternates between (a member can start the next sum only after
    every member has reached this one's barrier, so the other set is free by then: one wait a
    sum)."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots = [[None] * size, [None] * size]

    def sum(self, values):
        """all_sum for the calling member (its rank and count of sums so far in _local)."""
        slots = self.slots[_local.sums % 2]
        _local.sums += 1
        slots[_local.rank] = values
        self.barrier.wait()
        return add_in_rank_order(slots)


def together(fns):
    """[fn() for fn in fns], each on its own worker at once (fns[0] in the calling thread), as
    one group: inside them rank() is the fn's index and all_sum() adds values up across the
    group. Inside, parallel.map runs in the calling worker. An error in one member breaks the
    group's barrier, so no member waits for it forever; the first error that is not that
    broken barrier is raised. len(fns) <= threads()."""
    if not 1 <= len(fns) <= _threads:
        raise ValueError(f"together() runs 1 to {_threads} tasks (the workers), got {len(fns)}.")
    if in_worker():
        raise RuntimeError("together() cannot run inside a worker: its group would wait for "
                           "a worker that is busy.")
    _single_threaded_blas()
    group, errors = _Group(len(fns)), np.geterr()
    futures = [_get_pool().submit(_as_member, fn, group, i, errors)
               for i, fn in enumerate(fns[1:], start=1)]
    outcomes = [_outcome(_as_member, fns[0], group, 0, errors)]
    outcomes += [_outcome(f.result) for f in futures]
    failures = [e for ok, e in outcomes if not ok]
    if failures:
        real = [e for e in failures if not isinstance(e, threading.BrokenBarrierError)]
        raise (real or failures)[0]
    return [value for _, value in outcomes]


def _outcome(fn, *args):
    try:
        return True, fn(*args)
    except BaseException as e:                  # re-raised by together(), after every member
        return False, e


def _as_member(fn, group, rank, errors):
    try:
        with member(group, rank):
            return _as_worker(fn, errors)
    except BaseException:
        group.barrier.abort()
        raise


@contextlib.contextmanager
def member(group, rank, worker=True):
    """Inside: the calling thread is member `rank` of group (a minicnn.parallel.group.Group:
    a together() group, minicnn.parallel.processes' worker processes, or mpiexec's processes),
    and with worker=True a worker (parallel.map runs in it). rank is the member's place among
    those that share the model's arrays (rank 0 updates their state): each of mpiexec's
    processes holds its own, and is member 0 for that."""
    _local.group, _local.rank, _local.sums, _local.worker = group, rank, 0, worker
    try:
        yield
    finally:
        _local.group, _local.rank, _local.worker = None, 0, False


def rank():
    """This worker's index inside together() or a member() block (0 outside them)."""
    return getattr(_local, "rank", 0)


@contextlib.contextmanager
def batch_part(first):
    """Inside: the calling thread runs a model on the part of a batch whose first image is image
    `first` of the whole batch (a data-parallel step's part; in a worker thread or process, or
    rank 0's own part). Dropout reads it (first_image()) to give each image the mask one model
    on the whole batch would give it."""
    before = first_image()
    _local.first = first
    try:
        yield
    finally:
        _local.first = before


def first_image():
    """The index in the whole batch of the first image this thread's model runs on: the
    batch_part() block's `first`, 0 outside one (the whole batch)."""
    return getattr(_local, "first", 0)


def all_sum(*values):
    """[each value summed over every member of the group this runs in] (NumPy arrays or
    numbers; every member gets the same sums, added in rank order); outside a group, the
    values as they are. Every member must make the same all_sum calls in the same order."""
    group = getattr(_local, "group", None)
    return list(values) if group is None else group.sum(list(values))


# ---- BLAS thread count ----------------------------------------------------------------------
# NumPy's wheels bundle OpenBLAS (as libscipy_openblas); its C API sets the thread count of the
# whole process. With another BLAS (none found here) the workers and the BLAS threads share the
# cores as they can.
_blas_lock = threading.Lock()


def _find_openblas():
    lib_dir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in sorted(glob.glob(os.path.join(lib_dir, "*openblas*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    return get, set_
    return None


_blas = _find_openblas()


_blas_threads_before = None          # BLAS's own count, while minicnn holds it at 1


def _single_threaded_blas():
    global _blas_threads_before
    if _blas is not None and _blas_threads_before is None:
        with _blas_lock:
            _blas_threads_before = _blas[0]()
            _blas[1](1)


def _restore_blas_threads():
    global _blas_threads_before
    if _blas is not None and _blas_threads_before is not None:
        with _blas_lock:
            _blas[1](_blas_threads_before)
            _blas_threads_before = None


@contextlib.contextmanager
def blas_with_own_threads():
    """BLAS with the thread count it had before minicnn set it to one, inside this block (to
    time BLAS itself, e.g. the SGEMM peak); back to minicnn's setting after."""
    held = _blas_threads_before is not None
    _restore_blas_threads()
    try:
        yield
    finally:
        if held:
            _single_threaded_blas()
