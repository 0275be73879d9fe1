"""Worker processes for the data-parallel step (minicnn.parallel.data_parallel), on Linux.

Threads share one interpreter lock. NumPy lets go of it inside its loops, but the Python
between them (slicing, views, the layers' bookkeeping: hundreds to thousands of calls in one
worker's part of a step) runs one thread at a time, and a thread that finds the lock taken
sleeps until it is handed over, and waking one is slow. Processes have an interpreter each, and
steps on them measured faster (docs/performance.md#worker-processes).

So on Linux the workers are processes forked from this one, each a copy of the model as it was
then; the model's arrays travel through one shared memory mapping instead of being copied into
messages:

    this process (rank 0)                        worker r (r = 1, 2, ...)
    params, state -> shared memory               (its params and state are views of it)
    part r of the batch -> shared memory, "run" message -> forward, loss, backward of part r,
    part 0: forward, loss, backward                 its gradients written straight into
    (BatchNorm: all_sum in shared memory)           shared memory (its grads are views too)
    grads += worker r's          <- "done" message with the loss and logits

A pool serves one model description (its config and its arrays' shapes) with one number of
workers and a set input size per worker; anything else (another model, a bigger batch, a
worker that has died) closes it and forks a new one. An error in any member of a step ends
the pool (no worker is left halfway through a step) and is raised here; the next step starts
a new pool.
"""
import ctypes
import mmap
import multiprocessing
import multiprocessing.util
import os
import pickle
import platform
import signal
import sys
import time
import warnings

import numpy as np

from minicnn import dtype_policy
from minicnn.parallel import workers
from minicnn.parallel.group import Group, add_in_rank_order
from minicnn.errors import MinicnnError
from minicnn.nn.layers import walk
from minicnn.nn.model import layer_config

# fork: a worker starts as a copy of this process, the model and all (spawn would rebuild it,
# and would import the user's main script again). Only Linux: macOS's system libraries do not
# survive fork, and Windows has none.
AVAILABLE = sys.platform.startswith("linux")

_ALIGN = 64                            # bytes: each array in the mapping starts on a cache line


def _aligned(nbytes):
    return -(-nbytes // _ALIGN) * _ALIGN


def _arrays(model, attr):
    """[(dict, key)] for every array of kind attr ("params", "state" or "grads") of model's
    plain layers, in walk order (the same in a forked copy)."""
    return [(d, key) for layer in walk(model) if not layer.is_container
            for d in [getattr(layer, attr)] for key in d]


def _shared_arrays(model):
    return _arrays(model, "params") + _arrays(model, "state")


def describe(model, config=None):
    """What a pool is made for: the model's config (layer_config(model) unless given), with
    the precision policy its workers compute under (forked with it), and its arrays' shapes and
    dtypes. ValueError for a layer minicnn cannot describe (a user's own class)."""
    return (repr(layer_config(model) if config is None else config)
            + f" under {dtype_policy.global_policy().name}",
            tuple(_specs(d[k] for d, k in _shared_arrays(model))),
            tuple(_specs(d[k] for d, k in _arrays(model, "grads"))))


def sendable(*values):
    """Whether values can go into a message (a loss function of the user's own may not)."""
    try:
        pickle.dumps(values)
    except Exception:                   # pickle raises several types: PicklingError, TypeError..
        return False
    return True


def _span(specs):
    """The bytes that arrays of the given (shape, dtype str) take, laid out by _views."""
    return sum(_aligned(np.dtype(dtype).itemsize * int(np.prod(shape))) for shape, dtype in specs)


def _specs(arrays):
    """[(shape, dtype str)] of arrays: what _views lays out and _span measures."""
    return [(a.shape, a.dtype.str) for a in arrays]


def _views(buf, specs, offset):
    """Arrays of the given (shape, dtype str) laid out one after another in buf from offset.
    -> (arrays, the offset after them)."""
    views = []
    for shape, dtype in specs:
        views.append(np.ndarray(shape, np.dtype(dtype), buffer=buf, offset=offset))
        offset += _aligned(views[-1].nbytes)
    return views, offset


class Pool:
    """size - 1 worker processes (rank 0 is the calling process), each holding a copy of
    model, and the shared memory between them: params and state, and for each worker its
    gradients and input_bytes of input. key: describe(model)."""

    def __init__(self, model, size, input_bytes, key):
        self.key, self.size, self.input_bytes = key, size, _aligned(input_bytes)
        self.owner = os.getpid()           # a process forked from this one inherits the pool
        _, shared_specs, grad_specs = key
        self.buf = mmap.mmap(-1, _span(shared_specs) + _SharedSums.nbytes(size)
                             + (size - 1) * (_span(grad_specs) + self.input_bytes))
        self.shared, offset = _views(self.buf, shared_specs, 0)
        self.sums_at = offset
        offset += _SharedSums.nbytes(size)
        self.grads, self.inputs = [], []                       # index r - 1: worker r's
        for _ in range(size - 1):
            grads, offset = _views(self.buf, grad_specs, offset)
            self.grads.append(grads)
            self.inputs.append(offset)
            offset += self.input_bytes
        self.conns, self.procs = [], []
        self.hub = _Hub(self.conns, _SharedSums(self.buf, self.sums_at, size, 0))
        context = multiprocessing.get_context("fork")
        for rank in range(1, size):
            mine, theirs = context.Pipe()
            proc = context.Process(target=_serve, args=(model, rank, theirs, mine, self),
                                   daemon=True, name=f"minicnn-worker-{rank}")
            try:
                with warnings.catch_warnings():    # Python 3.12+ warns of fork in a threaded
                    warnings.simplefilter("ignore", DeprecationWarning)   # process; the
                    proc.start()                   # worker uses no lock another thread holds
            except OSError:                        # no fork here (a process limit, a sandbox)
                mine.close()
                self.close(wait=False)
                raise
            finally:
                theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)

    def alive(self):
        """Whether every worker is running (none is, once the pool is closed)."""
        return bool(self.procs) and all(proc.is_alive() for proc in self.procs)

    def run(self, model, fn, parts):
        """[fn(model, *arrays, *args) for (arrays, args) in parts]: part 0 here, part r in
        worker r. arrays: NumPy arrays (they go through shared memory, and must fit in
        input_bytes); args: small values (they go in the message)."""
        try:
            for view, (d, key) in zip(self.shared, _shared_arrays(model)):
                np.copyto(view, d[key])
            for rank, (conn, (arrays, args)) in enumerate(zip(self.conns, parts[1:]), start=1):
                conn.send((fn, self._put(rank, arrays), args))
            arrays, args = parts[0]
            with workers.member(self.hub, 0):
                first = fn(model, *arrays, *args)
            return [first] + [_receive(conn, "done") for conn in self.conns]
        except BaseException:
            self.close(wait=False)
            raise

    def _put(self, rank, arrays):
        """Copy arrays into worker rank's input memory (laid out by _views) -> their specs."""
        specs = _specs(arrays)
        for view, a in zip(_views(self.buf, specs, self.inputs[rank - 1])[0], arrays):
            np.copyto(view, a)
        return specs

    def add_grads(self, model):
        """model's grads += every worker's, worker 1's first."""
        for i, (d, key) in enumerate(_arrays(model, "grads")):
            for grads in self.grads:
                d[key] += grads[i]

    def close(self, wait=True):
        """End the workers: wait=True lets each finish and exit, False stops them at once."""
        for conn in self.conns:
            if wait:
                try:
                    conn.send(None)
                except OSError:
                    pass
            conn.close()
        for proc in self.procs:
            if wait:
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()                    # SIGKILL: a worker ignores SIGTERM (_serve)
            proc.join()
        self.conns.clear()
        self.procs.clear()


def input_bytes(arrays):
    """The input memory a worker needs for arrays (as Pool._put lays them out)."""
    return _span(_specs(arrays))


_pool = None
_fork_works = True


def pool_for(model, size, needed_bytes, config=None):
    """The running pool for model (config: its layer_config, when the caller has it) with size
    members, input room for needed_bytes a worker; a new one (the old one closed) if there is
    none such. BLAS runs on one thread in this process and, inherited, in the workers."""
    global _pool
    # On every step, not only a new pool's: set_threads(1) gives this process's BLAS its threads
    # back, and kept on rank 0 they spin on the workers' cores
    # (docs/performance.md#single-threaded-blas).
    workers._single_threaded_blas()
    key = describe(model, config)
    # (a pool this process inherited by a fork is not its own: close() lets go of it)
    if _pool is not None and (_pool.owner != os.getpid() or _pool.key != key
                              or _pool.size != size or not _pool.alive()
                              or _pool.input_bytes < needed_bytes):
        needed_bytes = max(needed_bytes, _pool.input_bytes if _pool.key == key else 0)
        close()
    if _pool is None:
        _pool = Pool(model, size, needed_bytes, key)
        _close_at_exit()
    return _pool


_closes_at_exit = None          # the process that has close() registered to run at its exit


def _close_at_exit():
    """Have close() run when this process exits (also as a multiprocessing child, which skips
    atexit), ahead of multiprocessing's own exit handler: that one would send the workers
    SIGTERM, which they ignore, and wait for them forever. (A Finalize of priority >= 0 runs
    first in that handler.)"""
    global _closes_at_exit
    if _closes_at_exit != os.getpid():
        multiprocessing.util.Finalize(None, close, exitpriority=100)
        _closes_at_exit = os.getpid()


def can_start():
    """False in a daemonic process (a multiprocessing.Pool's worker, which may not have children
    of its own) and once forking a worker has failed in this process: the steps then run on
    threads."""
    return _fork_works and not multiprocessing.current_process().daemon


def close():
    """End the running pool's workers, if any (a later step starts new ones)."""
    global _pool
    if _pool is not None:
        pool, _pool = _pool, None
        if pool.owner == os.getpid():      # (not a pool inherited by a fork: its workers are
            pool.close()                   # the parent's)


def run(model, fn, parts, config=None):
    """Pool.run on the pool for model (started here when needed; config: as pool_for's)
    -> (the pool, the results); pool.add_grads(model) then sums the gradients fn left in the
    members. None when no worker could be forked (and can_start() is False from then on)."""
    global _fork_works
    try:
        pool = pool_for(model, len(parts), max(input_bytes(arrays) for arrays, _ in parts[1:]),
                        config)
    except OSError:
        _fork_works = False
        return None
    try:
        return pool, pool.run(model, fn, parts)
    except BaseException:
        close()                     # its workers are stopped already: this lets go of it
        raise


# ---- the messages --------------------------------------------------------------------------
class WorkerError(MinicnnError, RuntimeError):
    """A worker process stopped in the middle of a step, or sent what no step sends (one
    sentence: the command-line tools print it as their error). The pool is closed; the next
    step forks a new one."""


def _receive(conn, kind):
    """The payload of the next message on conn, which must be (kind, payload); a worker's
    error is raised here."""
    try:
        message = _recv(conn)
    except (EOFError, OSError):
        raise WorkerError("A minicnn worker process stopped in the middle of a step (killed, "
                          "or out of memory?).") from None
    if message[0] == "error":
        raise message[1]
    if message[0] != kind:
        raise WorkerError(f"A minicnn worker process sent {message[0]!r} where {kind!r} was "
                          f"due.")
    return message[1]


# A member that waits for another's message first polls for it this long, then sleeps: the
# other member is usually about to send (both run the same step on equal parts), and waking a
# sleeping process costs more than a short poll (docs/performance.md#spin-then-sleep).
SPIN_SECONDS = 0.005
SLEEP_SECONDS = 1e-4                   # then, in shared memory, looks again this often


def _recv(conn):
    """conn.recv(), polling for up to SPIN_SECONDS first."""
    end = time.perf_counter() + SPIN_SECONDS
    while not conn.poll() and time.perf_counter() < end:
        pass
    return conn.recv()


class _Hub(Group):
    """workers.all_sum in rank 0 (a minicnn.parallel.group.Group): through shared memory
    (_SharedSums), else every worker's values, summed with this process's in rank order, and
    the sums sent back to each."""

    def __init__(self, conns, shared):
        self.conns, self.shared = conns, shared

    def sum(self, values):
        arrays = self.shared.fitting(values)
        if arrays is not None:
            return self.shared.sum(values, arrays, self._check)
        sums = add_in_rank_order([values] + [_receive(c, "sum") for c in self.conns])
        for conn in self.conns:
            conn.send(sums)
        return sums

    def _check(self, met):
        """While rank 0 waits in shared memory and the sum is not met(): a message from a worker
        is its error (or its end), raised. (Once the sum is met, a worker may have finished its
        part and sent "done": that message is left for Pool.run.)"""
        for conn in self.conns:
            if conn.poll() and not met():      # met() read after the message arrived
                _receive(conn, "sum")
                raise WorkerError("A minicnn worker process sent its sums as a message where "
                                  "they were due in shared memory.")


class _Spoke(Group):
    """workers.all_sum in a worker (a minicnn.parallel.group.Group): through shared memory
    (_SharedSums), else its values to rank 0 and the sums back."""

    def __init__(self, conn, shared):
        self.conn, self.shared = conn, shared

    def sum(self, values):
        arrays = self.shared.fitting(values)
        if arrays is not None:
            return self.shared.sum(values, arrays, _no_check)
        self.conn.send(("sum", values))
        return _recv(self.conn)


def _no_check(met):
    """A worker waiting in shared memory checks nothing: if rank 0 fails, it ends the workers."""


class _SharedSums:
    """all_sum's meeting point in the pool's shared memory, one per process.

    Each member writes its values into its slot and then its count of sums into its counter;
    it waits until every counter has reached that count and adds the slots up itself, in rank
    order, as every other member does. Two sets of slots alternate: a member writes sum s + 2
    into the set of sum s only after every member has reached sum s + 1, so all have read
    sum s by then. Several times faster than pipe messages (pickled arrays, a round trip
    through rank 0) (docs/performance.md#shared-memory-sums).

    Only on x86, whose stores reach other cores in program order, so that a counter is never
    seen before the values written ahead of it; elsewhere, and for values that do not fit a
    slot (or are not numbers), the sums go through the pipes.
    """
    SLOT_BYTES = 1 << 16
    ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")

    @classmethod
    def nbytes(cls, size):
        return size * _ALIGN + 2 * size * cls.SLOT_BYTES

    def __init__(self, buf, offset, size, rank):
        self.rank, self.count = rank, 0
        # one counter a cache line (int64 at the start of each), so that no two members write
        # the same line
        self.counters = np.ndarray((size,), np.int64, buf, offset, strides=(_ALIGN,))
        self.slots = np.ndarray((2, size, self.SLOT_BYTES), np.uint8, buf, offset + size * _ALIGN)

    def fitting(self, values):
        """values as arrays when they go through here (numbers that fit a slot), else None."""
        if not self.ORDERED_STORES:
            return None
        arrays = [np.asarray(v) for v in values]
        if (all(a.dtype.kind in "biuf" for a in arrays)
                and sum(a.nbytes for a in arrays) <= self.SLOT_BYTES):
            return arrays
        return None

    def sum(self, values, arrays, check):
        """values (as arrays: fitting(values)) summed over every member, as workers.all_sum;
        check(met) is called while waiting long, met() telling whether every member is here."""
        s, self.count = self.count, self.count + 1
        slots = self.slots[s % 2]
        mine, at = slots[self.rank], 0
        for a in arrays:
            mine[at:at + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            at += a.nbytes
        self.counters[self.rank] = s + 1
        end = time.perf_counter() + SPIN_SECONDS
        while self.counters.min() <= s:
            if time.perf_counter() > end:
                check(lambda: self.counters.min() > s)
                time.sleep(SLEEP_SECONDS)
        members = [values if k == self.rank else self._read(slots[k], values, arrays)
                   for k in range(len(slots))]
        return add_in_rank_order(members)

    @staticmethod
    def _read(slot, values, arrays):
        """Another member's values from its slot, shaped and typed as this member's own."""
        out, at = [], 0
        for v, a in zip(values, arrays):
            x = np.frombuffer(slot, a.dtype, a.size, at).reshape(a.shape).copy()
            out.append(x if isinstance(v, np.ndarray) else type(v)(x[()]))
            at += a.nbytes
        return out


def _die_with_parent():
    """Have the kernel kill this process when its parent dies (prctl PR_SET_PDEATHSIG), so that
    a worker busy with a step does not outlive a killed rank 0 (a worker waiting for a message
    would see the end of its pipe anyway). Best effort: without it, a worker finishes its part
    first."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)     # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(model, rank, conn, rank0_end, pool):
    """A worker process's life: its copy of model on the shared arrays, then one run of a step
    function a message, until the pool closes (None) or rank 0's end of the pipe does (rank 0
    has exited: the kernel closes it, and this process holds no copy of it)."""
    # Ctrl-C and SIGTERM are rank 0's to handle: sent to the whole process group (a terminal's
    # Ctrl-C, `timeout`, `kill -TERM -PGID`, a batch system stopping a job), they would kill a
    # worker in the middle of the step that the trainer finishes and checkpoints before it
    # exits. Rank 0 stops us (Pool.close, at its exit too: _close_at_exit), and we die with it
    # (_die_with_parent).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    for other in pool.conns + [rank0_end]:         # copies of rank 0's ends, forked with us
        other.close()
    for view, (d, key) in zip(pool.shared, _shared_arrays(model)):
        d[key] = view
    for view, (d, key) in zip(pool.grads[rank - 1], _arrays(model, "grads")):
        d[key] = view
    with workers.member(_Spoke(conn, _SharedSums(pool.buf, pool.sums_at, pool.size, rank)),
                         rank):
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message is None:
                return
            fn, specs, args = message
            try:
                arrays, _ = _views(pool.buf, specs, pool.inputs[rank - 1])
                reply = ("done", fn(model, *arrays, *args))
            except BaseException as e:             # sent to rank 0, which raises it
                reply = ("error", e if sendable(e) else WorkerError(f"{type(e).__name__}: {e}"))
            try:
                conn.send(reply)
            except (OSError, ValueError):
                return
