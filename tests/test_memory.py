"""The memory bound of the CPU-speed work: training the Keras-tutorial CNN at batch 128 peaks
under 1.5 GB of RSS (measured: 76-93 MiB), in a fresh interpreter so that nothing the other
tests allocated counts."""
import subprocess
import sys

import pytest

resource = pytest.importorskip("resource")        # ru_maxrss: Unix only

LIMIT_BYTES = 1.5e9

TRAIN_AND_REPORT = """
import resource, sys
import numpy as np
from minicnn import optim
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.zoo import keras_tutorial

rng = np.random.default_rng(0)
model = keras_tutorial(rng=rng)
x = rng.standard_normal((128, 3, 32, 32)).astype(np.float32)
labels = rng.integers(0, 10, 128)
loss_fn, opt = SoftmaxCrossEntropy(), optim.Adam(model, 1e-3)
for _ in range(5):
    _, dlogits = loss_fn(model.forward(x, training=True), labels)
    model.backward(dlogits, input_grad=False)
    opt.step()
    model.forward(x)                               # and inference, as evaluate() runs it
# ru_maxrss is in KiB on Linux, in bytes on macOS
scale = 1 if sys.platform == "darwin" else 1024
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
"""


def test_keras_tutorial_training_at_batch_128_peaks_under_1_5_gb():
    run = subprocess.run([sys.executable, "-c", TRAIN_AND_REPORT], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    peak = int(run.stdout.split()[-1])
    assert 0 < peak < LIMIT_BYTES, f"peak RSS {peak / 2**20:.0f} MiB"
