import os
import sys

import pytest
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# Property tests run a modest number of examples by default; set HYPOTHESIS_PROFILE=thorough
# for a longer search.
settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _array_module(name, monkeypatch):
    """The array module called name; "fake-cupy" installs tests/fake_cupy.py as minicnn's CuPy
    (NumPy maths behind CuPy's device boundary, so the cupy code paths run, and host/device
    mixing fails, on every machine); "cupy" is skipped without CuPy and a GPU."""
    from minicnn import backend
    from minicnn.errors import BackendError
    if name == "fake-cupy":
        import fake_cupy
        monkeypatch.setattr(backend, "_cupy", fake_cupy.module)
        return fake_cupy.module
    try:
        return backend.get_backend(name)
    except BackendError as e:
        pytest.skip(f"CuPy or a GPU is not available: {e}")


@pytest.fixture(params=["numpy", "cupy", "fake-cupy"])
def xp(request, monkeypatch):
    """The array module of each backend (see _array_module)."""
    return _array_module(request.param, monkeypatch)


@pytest.fixture(params=["cupy", "fake-cupy"])
def gpu_xp(request, monkeypatch):
    """CuPy on a GPU, and fake_cupy everywhere (see _array_module)."""
    return _array_module(request.param, monkeypatch)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The CUDA emulation (tests/cuda_emulation.py), built once per session."""
    from cuda_emulation import EmulatedCUDA, build_emulator
    return EmulatedCUDA(build_emulator(tmp_path_factory.mktemp("cuda_emulator")))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A small image folder of three shape classes (make_folder), the data cache in tmp_path."""
    from _data_helpers import make_folder
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    return make_folder(tmp_path / "shapes")
