"""Model presets, by name: the classic Keras-tutorial CNN and a stronger residual net."""
import numpy as np

from minicnn.nn.containers import Residual, Sequential
from minicnn.nn.layers import BatchNorm2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU


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


def resnet_small(num_classes=10, in_channels=3, rng=None, dtype=np.float32, widths=(32, 64, 128)):
    """A ResNet-9-style net (Page, "How to train your ResNet", 2018) slimmed for a 2-core CPU
    (408,746 parameters).

    Three stages that each downsample with conv -> max-pool -> BN -> ReLU (pooling before BN and
    ReLU does their work on a quarter of the pixels, as airbench does); stages 1 and 3 add a
    residual block of two conv-BN-ReLU. Global max-pool, one Dense layer. Measured here: the
    first stage at full 32x32 resolution (a 3->16 stem, then 16->32) trained 1.5x slower per
    image for the same parameter count, so the stem convolution itself downsamples.
    """
    rng = rng if rng is not None else np.random.default_rng()
    w1, w2, w3 = widths

    def conv_bn(cin, cout, pool=False):
        conv = Conv2D(cin, cout, 3, padding=1, bias=False, rng=rng, dtype=dtype)
        return [conv] + ([MaxPool2D(2)] if pool else []) + [BatchNorm2D(cout, dtype=dtype), ReLU()]

    def residual(c):
        return Residual(conv_bn(c, c) + conv_bn(c, c))

    return Sequential(
        conv_bn(in_channels, w1, pool=True) + [residual(w1)]       # (w1, 16, 16)
        + conv_bn(w1, w2, pool=True)                                # (w2, 8, 8)
        + conv_bn(w2, w3, pool=True) + [residual(w3)]               # (w3, 4, 4)
        + [MaxPool2D(4), Flatten(), Dense(w3, num_classes, rng=rng, dtype=dtype)])


MODELS = {"keras-tutorial": keras_tutorial, "resnet-small": resnet_small}


def build_model(name, num_classes=10, rng=None, dtype=np.float32):
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(MODELS)}.")
    return MODELS[name](num_classes=num_classes, rng=rng, dtype=dtype)
