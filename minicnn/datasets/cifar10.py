"""CIFAR-10 as Keras's keras.datasets.cifar10 gives it, in minicnn's layout.

    (x_train, y_train), (x_test, y_test) = minicnn.datasets.cifar10.load_data()
    x_train (50000, 3, 32, 32) uint8, NCHW (Keras: (50000, 32, 32, 3));
    y_train (50000,) int64 (Keras: (50000, 1)); the test split likewise with 10000 images.

The official binary archive is downloaded once (md5-checked, with retries) into
$MINICNN_DATA (default ~/.cache/minicnn) and its decoded arrays cached there; records are
parsed with NumPy, never unpickled.
"""
from minicnn.datasets import loading

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck")


def load_data(path=None):
    """-> ((x_train, y_train), (x_test, y_test)). path: a local copy of the binary or python
    archive, or an extracted batch directory; None downloads the official archive."""
    data = loading.load_cifar10(path)
    return (data.x_train, data.y_train), (data.x_test, data.y_test)
