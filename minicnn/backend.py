"""The one module that knows CuPy exists.

Every other module takes its array module from the arrays it is given
(``xp = array_module(x)``), so the same layer code runs on NumPy and on CuPy.
CuPy is imported behind a guard: a CPU-only install imports everything.
This module also holds what differs between the devices outside the maths: moving arrays,
seeding, and timing (a GPU runs asynchronously, so a timer must wait for it).
"""
import statistics
import time

import numpy as np

from minicnn.errors import BackendError

try:  # CuPy is optional: pip install -e ".[gpu]"
    import cupy as _cupy
except Exception:  # ImportError, or a CuPy that finds no CUDA driver
    _cupy = None

BACKENDS = ("numpy", "cupy")


def array_module(*arrays):
    """numpy or cupy, whichever the arrays live in (numpy for plain Python values)."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def get_backend(name):
    """The array module called name ("numpy" or "cupy"), or BackendError saying what is missing."""
    if name == "numpy":
        return np
    if name != "cupy":
        raise BackendError(f"Unknown backend {name!r}; choose 'numpy' or 'cupy'.")
    if _cupy is None:
        raise BackendError("The cupy backend needs CuPy: install it with pip install -e \".[gpu]\" "
                           "(any CuPy 13+ wheel that matches your CUDA driver works).")
    try:
        count = _cupy.cuda.runtime.getDeviceCount()
    except Exception as e:   # CUDA driver missing or broken: say so in one sentence
        raise BackendError(f"The cupy backend needs an NVIDIA GPU, but CUDA reports: {e}.") from None
    if count == 0:
        raise BackendError("The cupy backend needs an NVIDIA GPU, and none was found.")
    return _cupy


def to_device(a, backend):
    """a (NumPy or CuPy array) on the named backend's device."""
    if backend == "numpy":
        return to_numpy(a)
    return get_backend(backend).asarray(a)


def to_numpy(a):
    """A NumPy copy (or the array itself) of a NumPy or CuPy array."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def backend_name(*arrays):
    """"numpy" or "cupy": the name of the backend the arrays live on (for Layer.to)."""
    return array_module(*arrays).__name__


def gpu_available():
    """True when the cupy backend can run: CuPy imports and CUDA sees a GPU."""
    try:
        get_backend("cupy")
    except BackendError:
        return False
    return True


def seed_all(seed):
    """Seed NumPy's and (when a GPU is there) CuPy's global generators; return a numpy Generator.

    minicnn itself never draws from a global generator (layers take an rng), so this is for
    scripts and notebooks that do; pass the returned Generator on to the layers.
    """
    np.random.seed(seed)
    if gpu_available():
        _cupy.random.seed(seed)
    return np.random.default_rng(seed)


def synchronize(xp):
    """Wait until the device of array module xp has finished its queued work (no-op for NumPy)."""
    if xp is not np:
        xp.cuda.Device().synchronize()


class Timer:
    """Wall time of a block of device work, in milliseconds:

        with Timer(xp) as t:
            y = layer.forward(x)
        t.ms

    CuPy: CUDA events recorded on the current stream around the block (so only the GPU work
    queued inside it counts, and the timer waits for it); NumPy: time.perf_counter.
    """

    def __init__(self, xp=np):
        self.xp = xp
        self.ms = None

    def __enter__(self):
        if self.xp is np:
            self._start = time.perf_counter()
        else:
            self._start, self._end = self.xp.cuda.Event(), self.xp.cuda.Event()
            self._start.record()
        return self

    def __exit__(self, *exc):
        if self.xp is np:
            self.ms = (time.perf_counter() - self._start) * 1e3
        else:
            self._end.record()
            self._end.synchronize()
            self.ms = self.xp.cuda.get_elapsed_time(self._start, self._end)
        return False


def cuda_time(fn, xp=np, repeats=10, warmup=2):
    """The median time of fn() in milliseconds over repeats runs, after warmup untimed runs.

    xp: the array module fn works in (CUDA events for cupy, perf_counter for numpy). The warm-up
    runs absorb one-off costs: kernel compilation, memory-pool growth, cuDNN's algorithm search.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    for _ in range(warmup):
        fn()
    synchronize(xp)
    times = []
    for _ in range(repeats):
        with Timer(xp) as t:
            fn()
        times.append(t.ms)
    return statistics.median(times)
