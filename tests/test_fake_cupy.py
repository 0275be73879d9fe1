"""fake_cupy, the CuPy stand-in the cupy code paths run on where no GPU is: it must keep CuPy's
device boundary, or the tests that use it would pass code that fails on a GPU."""
import numpy as np
import pytest

import fake_cupy

cp = fake_cupy.module


def test_device_operations_refuse_host_arrays():
    a, host = cp.ones((2, 3), dtype=cp.float32), np.ones((2, 3), dtype=np.float32)
    for mixed in (lambda: a + host, lambda: host * a, lambda: cp.maximum(a, host),
                  lambda: cp.matmul(a, host.T), lambda: cp.concatenate([a, host]),
                  lambda: a.dot(host.T), lambda: cp.add(host, host),
                  lambda: np.maximum(a, host, out=a)):
        with pytest.raises(TypeError, match="Unsupported type"):
            mixed()
    a += 1.5                                  # Python and NumPy scalars are fine
    assert float(a.sum() * np.float32(2)) == 2 * 6 * 2.5


def test_no_implicit_conversion_to_numpy_but_explicit_copies_both_ways():
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    a = cp.asarray(host)
    assert isinstance(a, cp.ndarray) and not isinstance(a, np.ndarray)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    back = cp.asnumpy(a)
    np.testing.assert_array_equal(back, host)
    back[0, 0] = 100                          # copies, not views of the device memory
    host[0, 1] = 100
    assert float(a[0, 0]) == 0 and float(a[0, 1]) == 1
    assert cp.asarray(a) is a and cp.get_array_module(a) is cp and cp.get_array_module(host) is np


def test_reductions_and_full_indexing_give_0d_device_arrays():
    a = cp.asarray(np.array([[1.0, -2.0], [3.0, 4.0]], dtype=np.float32))
    for r in (a.sum(), a.max(), a[1, 0], cp.mean(a), np.sum(a)):
        assert isinstance(r, cp.ndarray) and r.shape == ()
    assert f"{a.max():.1f}" == "4.0" and int(a.argmax()) == 3 and bool(a.min() < 0)


def test_views_out_and_indexing_reach_the_same_memory():
    a = cp.zeros((4, 4), dtype=cp.float32)
    a.T[0] = 1                                 # a view: writes a's first column
    cp.add(a, 1, out=a)
    out = cp.empty_like(a)
    assert cp.multiply(a, 2, out=out) is out
    a[np.array([3])] = np.float32(7)           # NumPy index arrays and values are copied over
    assert cp.asnumpy(a)[:, 0].tolist() == [2, 2, 2, 7]
    assert cp.asnumpy(out)[0].tolist() == [4, 2, 2, 2]
    window = cp.lib.stride_tricks.sliding_window_view(a, (2, 2))
    assert isinstance(window, cp.ndarray) and window.shape == (3, 3, 2, 2)


def test_what_cupy_lacks_is_missing():
    with pytest.raises(AttributeError, match="errstate"):
        cp.errstate
    with pytest.raises(AttributeError, match="get_state"):
        cp.random.get_state
    with pytest.raises(AttributeError, match="resize"):
        cp.zeros(2).resize
    assert cp.random.seed and cp.add.at and cp.lib.stride_tricks.as_strided
