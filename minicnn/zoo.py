"""Model presets, by name: the classic Keras-tutorial CNN and stronger ones."""
import numpy as np

from minicnn.layers import (BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Residual)
from minicnn.model import Sequential


def keras_tutorial(num_classes=10, in_channels=3, rng=None, dtype=np.float32):
    """The TensorFlow/Keras CNN tutorial's net for 32x32 images (122,570 parameters):
    Conv 32 - MaxPool - Conv 64 - MaxPool - Conv 64 - Dense 64 - Dense 10, 3x3 valid convs, ReLU.
    """
    rng = rng if rng is not None else np.random.default_rng()
    d = dict(rng=rng, dtype=dtype)
    return Sequential([
        Conv2D(in_channels, 32, 3, **d), ReLU(), MaxPool2D(2),      # (32, 15, 15)
        Conv2D(32, 64, 3, **d), ReLU(), MaxPool2D(2),               # (64, 6, 6)
        Conv2D(64, 64, 3, **d), ReLU(),                             # (64, 4, 4)
        Flatten(), Dense(64 * 4 * 4, 64, **d), ReLU(), Dense(64, num_classes, **d),
    ])


MODELS = {"keras-tutorial": keras_tutorial}


def build_model(name, num_classes=10, rng=None, dtype=np.float32):
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}.")
    return MODELS[name](num_classes=num_classes, rng=rng, dtype=dtype)
