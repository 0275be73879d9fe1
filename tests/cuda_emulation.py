"""The CUDA emulation the kernel tests run on where no GPU is: kernels/*.cu compiled as C++
against tests/cuda_emulator.h (needs g++), and kernels._launch redirected to it."""
import ctypes
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

import fake_cupy
from minicnn.cuda import kernels

ROOT = Path(__file__).resolve().parent.parent


class EmulatedCUDA:
    """Runs kernels._launch's calls on the CPU emulation; arrays stay NumPy arrays."""
    name = "emulated"
    _ctypes = {"i": (np.int32, ctypes.c_int32), "q": (np.int64, ctypes.c_int64),
               "f": (np.float32, ctypes.c_float)}

    def __init__(self, library):
        self.lib = ctypes.CDLL(str(library))

    def asarray(self, a):
        return np.ascontiguousarray(a)

    def launch(self, name, grid, block, args):
        signature = getattr(self.lib, f"signature_{name}")
        signature.restype = ctypes.c_char_p
        expected = signature().decode()
        assert len(args) == len(expected), f"{name}: {len(args)} arguments, kernel takes {len(expected)}"
        holders = []
        for i, (code, a) in enumerate(zip(expected, args)):
            a = a._a if isinstance(a, fake_cupy.ndarray) else a      # fake_cupy's NumPy storage
            if code == "p":
                assert isinstance(a, np.ndarray) and a.flags.c_contiguous, f"{name} argument {i}"
                holders.append(ctypes.c_void_p(a.ctypes.data))
            else:
                numpy_type, c_type = self._ctypes[code]
                assert type(a) is numpy_type, f"{name} argument {i}: {type(a).__name__} for {code!r}"
                holders.append(c_type(a.item()))
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        if 0 not in grid:
            getattr(self.lib, f"launch_{name}")(*map(ctypes.c_uint, grid + block), argv)

    @contextmanager
    def active(self):
        with mock.patch.object(kernels, "_launch", self.launch):
            yield


def build_emulator(folder):
    """Compile every kernels/*.cu against the emulation header into one shared library."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("the CUDA emulation needs g++ (apt-get install g++)")
    lines = [f'#include "{ROOT / "tests" / "cuda_emulator.h"}"']
    lines += [f'#include "{path}"' for path in sorted((ROOT / "kernels").glob("*.cu"))]
    lines += [f"EXPORT_KERNEL({name})" for name in kernels.KERNEL_FILES]
    source, library = folder / "emulated_kernels.cpp", folder / "emulated_kernels.so"
    source.write_text("\n".join(lines) + "\n")
    subprocess.run([compiler, "-std=c++20", "-O1", "-Wall", "-Wno-unknown-pragmas", "-Werror",
                    "-shared", "-fPIC", "-pthread", str(source), "-o", str(library)], check=True)
    return library
