"""A stand-in for CuPy on machines without a GPU: NumPy does the maths, but the arrays are their
own type with CuPy's device boundary, so code that only works by mixing host and device arrays
fails here as it would on a GPU.

What it enforces, as CuPy does:
- a device operation (ufunc, operator, cupy.* function, array method) refuses NumPy arrays among
  its array arguments with TypeError; cupy.asarray / cupy.array copy host data to the "device";
- NumPy refuses to convert a device array implicitly (np.asarray(a) is a TypeError, as CuPy's
  "Implicit conversion to a NumPy array is not allowed"); a.get() and cupy.asnumpy(a) copy back;
- NumPy functions called on device arrays dispatch to the device (NEP 18) and stay there;
- a full reduction or a full index gives a 0-d device array, not a scalar (float(), int(),
  bool(), .item() and format() read it back, as in CuPy);
- indexing may use NumPy index arrays, and assignment NumPy values (CuPy copies them over);
- the NumPy functions, submodule members and array methods that CuPy lacks are missing here too
  (NUMPY_ONLY, taken from CuPy 14.2 with dir()): np.errstate, for one, is NumPy's only.

What it counts: every device-to-host copy (get, asnumpy, float, int, bool, format, item, tolist,
repr, and cupy.lib.stride_tricks.sliding_window_view's read of its window shape, as CuPy's
does), in reads_back: on a GPU each one waits for the device's queued work.

What it cannot check: the keywords CuPy's functions take, cuBLAS's float32 rounding, asynchrony,
and the raw CUDA kernels (RawModule is not emulated here; tests/cuda_emulator.h runs those).

    import fake_cupy
    monkeypatch.setattr(minicnn.backend, "_cupy", fake_cupy.module)
"""
import time
import types

import numpy as np

NUMPY_ONLY = {   # NumPy names that CuPy 14.2.0 lacks, by namespace
    "": set("""
        False_ ScalarType True_ asmatrix block bmat busday_count busday_offset busdaycalendar
        bytes_ char character clongdouble complex256 core ctypeslib datetime64
        datetime_as_string datetime_data dtypes einsum_path emath errstate f2py flexible
        float128 frompyfunc fromregex geomspace get_include getbufsize geterr geterrcall
        histogram_bin_edges info insert is_busday isnat little_endian longdouble ma matrix
        matvec memmap nanpercentile nanquantile ndenumerate nditer nested_iters object_ polyder
        polydiv polyint rec recarray record sctypeDict setbufsize seterr seterrcall show_runtime
        spacing str_ strings test timedelta64 typecodes unstack vecdot vecmat void
    """.split()),
    "random": set("""
        MT19937 PCG64 PCG64DXSM Philox SFC64 SeedSequence bit_generator get_bit_generator
        get_state mtrand set_bit_generator set_state test
    """.split()),
    "linalg": set("""
        diagonal matrix_norm multi_dot outer svdvals tensordot test trace vecdot vector_norm
    """.split()),
}
NDARRAY_NUMPY_ONLY = set("ctypes getfield resize setfield setflags to_device".split())

reads_back = 0      # device-to-host copies so far (tests/test_device_waits.py reads the difference)


def _read_back(a):
    """a (NumPy storage of a device array), counted as one device-to-host copy."""
    global reads_back
    reads_back += 1
    return a


HOST_REFUSED = ("Unsupported type <class 'numpy.ndarray'>: {}, like CuPy, takes device arrays, "
                "not NumPy arrays (move them with cupy.asarray)")


def _refuse_host(name, values):
    """TypeError when a NumPy array (a host array) is among values, at any depth of lists,
    tuples and dicts."""
    for v in values:
        if isinstance(v, np.ndarray):
            raise TypeError(HOST_REFUSED.format(name))
        if isinstance(v, (list, tuple)):
            _refuse_host(name, v)
        elif isinstance(v, dict):
            _refuse_host(name, v.values())


def _unwrap(v):
    """Device arrays -> their NumPy storage (the same memory), through lists, tuples and dicts."""
    if isinstance(v, ndarray):
        return v._a
    if isinstance(v, (list, tuple)):
        return type(v)(_unwrap(e) for e in v)
    if isinstance(v, dict):
        return {k: _unwrap(e) for k, e in v.items()}
    return v


def _wrap(v):
    """NumPy results -> device arrays (views stay views); NumPy scalars -> 0-d device arrays."""
    if isinstance(v, np.ndarray):
        return ndarray(v)
    if isinstance(v, np.generic):
        return ndarray(np.asarray(v))
    if isinstance(v, (list, tuple)) and any(isinstance(e, (np.ndarray, np.generic)) for e in v):
        return type(v)(_wrap(e) for e in v)
    return v


def _call(fn, name, args, kwargs):
    """fn on the device: host arrays refused, device arrays unwrapped, results wrapped; a call
    with out= returns the out argument itself, as NumPy and CuPy do."""
    _refuse_host(name, args)
    _refuse_host(name, kwargs.values())
    result = fn(*_unwrap(args), **_unwrap(kwargs))
    if kwargs.get("out") is not None:
        out = kwargs["out"]
        return out[0] if isinstance(out, tuple) and len(out) == 1 else out
    return _wrap(result)


class _Function:
    """A NumPy function or ufunc seen as cupy.<name> (ufunc methods such as .at included)."""

    def __init__(self, fn, name):
        self._fn, self._name = fn, name

    def __call__(self, *args, **kwargs):
        return _call(self._fn, f"cupy.{self._name}", args, kwargs)

    def __getattr__(self, attr):
        value = getattr(self._fn, attr)
        return _Function(value, f"{self._name}.{attr}") if callable(value) else value


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):
    """A device array: NumPy storage in _a, reached only through device operations."""

    __array_priority__ = 100

    def __init__(self, a):
        self._a = a

    # ---- the boundary --------------------------------------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` "
                        "to construct a NumPy array explicitly.")

    def get(self):
        return _read_back(self._a).copy()

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _call(getattr(ufunc, method), f"cupy.{ufunc.__name__}", inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return _call(func, f"numpy.{func.__name__} on a device array", args, kwargs)

    # ---- indexing: NumPy index arrays and values are copied over, as CuPy does ----------------
    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _unwrap(value)

    # ---- reading values back -------------------------------------------------------------------
    def __bool__(self):
        return bool(_read_back(self._a))

    def __float__(self):
        return float(_read_back(self._a))

    def __int__(self):
        return int(_read_back(self._a))

    def __format__(self, spec):
        return format(_read_back(self._a), spec)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    def __repr__(self):
        return f"fake_cupy.{np.array_repr(_read_back(self._a))}"

    def __copy__(self):
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())

    # ---- everything else: NumPy's attributes and methods, on the device -------------------------
    def __getattr__(self, name):
        if name.startswith("__") or name == "_a" or name in NDARRAY_NUMPY_ONLY:
            raise AttributeError(f"'cupy.ndarray' object has no attribute '{name}'")
        if name in ("item", "tolist"):                 # Python values: read back
            return getattr(_read_back(self._a), name)
        value = getattr(self._a, name)
        return _Function(value, f"ndarray.{name}") if callable(value) else _wrap(value)


class _Module(types.ModuleType):
    """A NumPy namespace seen as a CuPy one: its functions run on device arrays."""

    def __init__(self, name, numpy_module):
        super().__init__(name)
        self._np = numpy_module

    def __getattr__(self, name):
        if name.startswith("__") or name in NUMPY_ONLY.get(self.__name__[len("cupy."):], ()):
            raise AttributeError(f"module '{self.__name__}' has no attribute '{name}'")
        if (self.__name__, name) in CUPY_OWN:
            return CUPY_OWN[self.__name__, name]
        value = getattr(self._np, name)
        if isinstance(value, types.ModuleType):
            return _Module(f"{self.__name__}.{name}", value)
        if callable(value) and not isinstance(value, type):
            return _Function(value, name)
        return value


class _Event:
    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class _Device:
    id = 0

    def __init__(self, device=0):
        pass

    def synchronize(self):
        pass


def _asarray(a, dtype=None, order=None):
    """cupy.asarray: a device array as it is (no copy), host data copied to the device."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    return ndarray(np.array(_unwrap(a), dtype=dtype, order=order or "C"))


def _array(a, dtype=None, copy=True, order="K"):
    return ndarray(np.array(_unwrap(a), dtype=dtype, order=order))


def _asnumpy(a):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def _get_array_module(*arrays):
    return module if any(isinstance(a, ndarray) for a in arrays) else np


def _sliding_window_view(x, window_shape, axis=None, **kwargs):
    """CuPy's checks its window shape on the device (cupy.any(cupy.array(window_shape) < 0),
    cupy/lib/stride_tricks.py): one read back a call, counted here as well."""
    _read_back(None)
    return _call(np.lib.stride_tricks.sliding_window_view, "cupy.lib.stride_tricks."
                 "sliding_window_view", (x, window_shape), dict(axis=axis, **kwargs))


CUPY_OWN = {   # (namespace, name) -> what CuPy does differently from NumPy there, as it matters here
    ("cupy.lib.stride_tricks", "sliding_window_view"): _sliding_window_view,
}


def _raw_module(*args, **kwargs):
    raise NotImplementedError("fake_cupy does not run CUDA C; tests/cuda_emulator.h does.")


module = _Module("cupy", np)
module.__dict__.update(
    ndarray=ndarray, asarray=_asarray, array=_array, asnumpy=_asnumpy,
    get_array_module=_get_array_module, RawModule=_raw_module,
    cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(
            getDeviceCount=lambda: 1,
            getDeviceProperties=lambda device: {"name": b"fake_cupy (NumPy on the CPU)"}),
        Device=_Device, Event=_Event,
        get_elapsed_time=lambda start, end: (end.t - start.t) * 1e3))
