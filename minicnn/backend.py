"""The one module that knows CuPy exists.

Every other module takes its array module from the arrays it is given
(``xp = array_module(x)``), so the same layer code runs on NumPy and on CuPy.
CuPy is imported behind a guard: a CPU-only install imports everything.
This module also holds what differs between the devices outside the maths: moving arrays,
seeding, and timing (a GPU runs asynchronously, so a timer must wait for it).
"""
import contextlib
import statistics
import time

import numpy as np

from minicnn.errors import BackendError

try:  # CuPy is optional: pip install -e ".[gpu-cuda13]" (or ".[gpu-cuda12]")
    import cupy as _cupy
except Exception:  # ImportError, or a CuPy that finds no CUDA driver
    _cupy = None

BACKENDS = ("numpy", "cupy")


def array_module(*arrays):
    """numpy or cupy, whichever the arrays live in (numpy for plain Python values)."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


# What to install, by the CUDA major version a CuPy wheel is built for (pyproject.toml's extras).
INSTALL_HINT = ("install the CuPy that matches your driver's CUDA (nvidia-smi shows it, top right): "
                "pip install -e \".[gpu-cuda13]\" for CUDA 13, pip install -e \".[gpu-cuda12]\" "
                "for CUDA 12, never both")
_checked = {}    # CuPy module -> None (it works) or the one-sentence reason it does not; per process


def _cuda_major(cupy):
    """12 or 13 (the CUDA a CuPy wheel is built for), from its runtime or its wheel's name."""
    try:
        return cupy.cuda.runtime.runtimeGetVersion() // 1000
    except Exception:
        pass
    from importlib import metadata
    for major in (13, 12, 11):
        try:
            metadata.version(f"cupy-cuda{major}x")
            return major
        except metadata.PackageNotFoundError:
            continue
    return 13


def _reason(e):
    """The first line of an exception, short enough for a sentence."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[:160] + ("..." if len(text) > 160 else "")


def library_checks(cupy):
    """[(library, what it is for, fn)]: one tiny operation per CUDA library the cupy backend uses.

    NVRTC compiles every elementwise kernel on first use (CuPy's on-disk kernel cache asks NVRTC
    its version for the cache key, so even a cached kernel loads it); cuBLAS does the matmuls and
    the convolutions' GEMMs; cuRAND draws the dropout masks and cupy.random.
    """
    def elementwise():
        y = cupy.arange(4, dtype=cupy.float32) * 2 + 1
        if float(y.sum()) != 16.0:
            raise RuntimeError(f"2*arange(4)+1 summed to {float(y.sum())}, not 16")

    def matmul():
        a = cupy.ones((8, 8), dtype=cupy.float32)
        if float((a @ a).sum()) != 512.0:
            raise RuntimeError("ones(8,8) @ ones(8,8) did not sum to 512")

    def draw():
        r = cupy.random.random(16)
        if not 0 <= float(r.min()) <= float(r.max()) < 1:
            raise RuntimeError("cupy.random.random gave values outside [0, 1)")

    return [("NVRTC", "compile kernels", elementwise), ("cuBLAS", "multiply matrices", matmul),
            ("cuRAND", "draw random numbers", draw)]


def _problem(cupy):
    """None when CuPy can run on a GPU here, else one sentence: what failed and what to install."""
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:   # no driver, or one older than CuPy's CUDA: say which, and what to do
        major = _cuda_major(cupy)
        if "insufficient" in str(e).lower():
            return (f"The cupy backend needs an NVIDIA GPU driver for CUDA {major}, and this one "
                    f"is older (CUDA says: {_reason(e)}): update the driver, or {INSTALL_HINT}.")
        return (f"The cupy backend needs an NVIDIA GPU and its driver, but CUDA reports: "
                f"{_reason(e)}.")
    if count == 0:
        return "The cupy backend needs an NVIDIA GPU, and none was found."
    major = _cuda_major(cupy)
    for library, purpose, fn in library_checks(cupy):
        try:
            fn()
        except Exception as e:
            component = {"NVRTC": "nvrtc", "cuBLAS": "cublas", "cuRAND": "curand"}[library]
            return (f"CuPy cannot {purpose} ({library} failed: {_reason(e)}): install the CUDA "
                    f"{major} runtime libraries that match cupy-cuda{major}x "
                    f"(pip install \"cuda-toolkit[{component}]=={major}.*\") or the CUDA toolkit.")
    return None


def get_backend(name):
    """The array module called name ("numpy" or "cupy"), or BackendError saying what is missing.

    For "cupy", the first call in a process runs one tiny operation through each CUDA library
    the backend needs (library_checks), so a broken install fails here, in one sentence, rather
    than later in a library-loading traceback."""
    if name == "numpy":
        return np
    if name != "cupy":
        raise BackendError(f"Unknown backend {name!r}; choose 'numpy' or 'cupy'.")
    if _cupy is None:
        raise BackendError(f"The cupy backend needs CuPy: {INSTALL_HINT}.")
    if _cupy not in _checked:
        _checked[_cupy] = _problem(_cupy)
    if _checked[_cupy] is not None:
        raise BackendError(_checked[_cupy])
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
    """True when the cupy backend can run: CuPy imports, CUDA sees a GPU, and NVRTC, cuBLAS
    and cuRAND each ran their tiny operation (get_backend)."""
    return gpu_problem() is None


def gpu_problem():
    """None when the cupy backend can run, else the one sentence get_backend("cupy") raises."""
    try:
        get_backend("cupy")
    except BackendError as e:
        return str(e)
    return None


def seed_all(seed):
    """Seed NumPy's and (when a GPU is there) CuPy's global generators; return a numpy Generator.

    minicnn itself never draws from a global generator (layers take an rng), so this is for
    scripts and notebooks that do; pass the returned Generator on to the layers.
    """
    np.random.seed(seed)
    if gpu_available():
        _cupy.random.seed(seed)
    return np.random.default_rng(seed)


@contextlib.contextmanager
def tf32_matmuls(x):
    """Inside the block, float32 GEMMs on x's device (CuPy) run on TF32 tensor cores (10-bit
    mantissa inputs, float32 sums), as CUPY_TF32=1 makes them; the compute type before it
    comes back at the end. BackendError for NumPy arrays (a CPU has no TF32) and for a CuPy
    without set_compute_type. Unverified: written without a GPU."""
    if _cupy is None or not isinstance(x, _cupy.ndarray):
        raise BackendError("TF32 is a GPU format: give CuPy arrays (--backend cupy).")
    try:
        from cupy._core import _routines_linalg as linalg      # CuPy's own switch, private
        before = linalg.get_compute_type(np.float32)
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
    except (ImportError, AttributeError) as e:
        raise BackendError(f"This CuPy cannot switch its GEMMs to TF32 ({_reason(e)}).") from None
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, before)


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
